//! The server killed mid-write: `tide-server` processes, on SQLite (at the
//! default `synchronous=FULL`) and on PostgreSQL, killed with `SIGKILL` at
//! seeded random moments under a mixed load from real clients (the client's own
//! `sync_once`), and restarted on the same port; then every client runs to
//! completion. Every op a client saw acknowledged is on the server, no op is
//! applied twice (a namespace of unique keys ends with exactly one seq per
//! op), and the replicas of a namespace of contended keys equal the server,
//! which holds the last writer of every key.
//!
//! CI runs a few kills per backend. The long run, which prints its counts:
//! `TIDE_CRASH_KILLS=1000 cargo test --release -p tide-server --test it crash -- --nocapture`;
//! `TIDE_CRASH_SEED=n` replays a run.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tide_client::Tide;
use tide_core::{Cursor, SplitMix64, Stamp, SyncRequest};
use tide_transport::{Headers, HttpTransport, Transport};

const TOKENS: &str = "tok-unique=unique,tok-shared=shared";
/// Clients per namespace.
const CLIENTS: usize = 2;
/// Kills in a CI run, per backend.
const KILLS_DEFAULT: usize = 4;

/// A `tide-server` process, killed when dropped (a failing test leaves no
/// server behind).
struct Process {
    child: Child,
    port: u16,
    args: Vec<String>,
}

impl Process {
    fn start(args: Vec<String>) -> Self {
        let (child, port) = spawn(&args, 0);
        Self { child, port, args }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/sync", self.port)
    }

    /// SIGKILL, then a new process on the same port.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let (child, _) = spawn(&self.args, self.port);
        self.child = child;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `port` (0: any); returns it and its port.
fn spawn(args: &[String], port: u16) -> (Child, u16) {
    let mut all = vec!["--tokens", TOKENS];
    all.extend(args.iter().map(String::as_str));
    let (child, endpoint) = crate::binary::spawn_on(&format!("127.0.0.1:{port}"), &all);
    let port = endpoint.rsplit(':').next().and_then(|p| p.split('/').next()?.parse().ok()).expect("a port");
    (child, port)
}

fn bearer(token: &str) -> Headers {
    Headers::Static(vec![("authorization".into(), format!("Bearer {token}"))])
}

/// What one run saw.
#[derive(Debug, Default)]
struct Counts {
    kills: usize,
    /// Ops written to unique keys, every one acknowledged by the end.
    unique_ops: usize,
    /// Ops written to contended keys.
    shared_ops: usize,
    /// Exchanges that failed because the server was down or died.
    failed_syncs: usize,
    /// Unique ops missing from the server, or stored with another stamp.
    lost: usize,
    /// Seqs the unique namespace issued beyond one per op.
    duplicated: usize,
}

/// A client's writes: to unique keys (`u`, each id once) or to a few
/// contended keys (`s`, puts and deletes).
async fn writer(
    tide: Arc<Tide>,
    unique: bool,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<(String, Stamp, Option<Value>)>, usize) {
    let mut rng = SplitMix64::new(seed);
    let mut written = Vec::new();
    let mut failed = 0;
    let name = tide.node_id();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..=rng.below(5) {
            i += 1;
            if unique {
                let id = format!("{name}-{i}");
                let value = json!({"i": i, "by": name});
                let stamp = tide.collection::<Value>("u").put(&id, &value).await.unwrap();
                written.push((id, stamp, Some(value)));
            } else {
                let id = format!("k{}", rng.below(4));
                if rng.below(4) == 0 {
                    let stamp = tide.collection::<Value>("s").delete(&id).await.unwrap();
                    written.push((id, stamp, None));
                } else {
                    let value = json!({"i": i, "by": name});
                    let stamp = tide.collection::<Value>("s").put(&id, &value).await.unwrap();
                    written.push((id, stamp, Some(value)));
                }
            }
        }
        if tide.sync_once().await.is_err() {
            failed += 1;
            tokio::time::sleep(Duration::from_millis(2 + rng.below(10))).await;
        }
    }
    (written, failed)
}

/// Syncs until the outbox is empty and the store is caught up.
async fn complete(tide: &Tide) {
    let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
    loop {
        if tide.sync_once().await.is_ok() && tide.pending_count().await.unwrap() == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "client {} never completed", tide.node_id());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything the server holds in a namespace (live or not), and its cursor.
async fn server_state(endpoint: &str, token: &str) -> (BTreeMap<String, (Stamp, Option<Value>)>, u64) {
    let t = HttpTransport::builder(endpoint).headers(bearer(token)).build().unwrap();
    let mut state = BTreeMap::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let resp = t.exchange(&SyncRequest::new("crash-checker", cursor)).await.unwrap();
        for c in resp.changes {
            let doc = c.payload.doc().map(|d| d.decode::<Value>().unwrap());
            state.insert(c.id, (c.stamp, doc));
        }
        cursor = Some(resp.cursor);
        if !resp.has_more {
            return (state, resp.cursor.0);
        }
    }
}

async fn crash_run(backend: Vec<String>, dir: &std::path::Path, seed: u64, kills: usize) -> Counts {
    eprintln!("crash run: seed {seed}, {kills} kills; replay with TIDE_CRASH_SEED={seed}");
    let mut rng = SplitMix64::new(seed);
    let mut server = Process::start(backend);
    let endpoint = server.endpoint();
    let mut clients = Vec::new();
    for c in 0..2 * CLIENTS {
        let unique = c < CLIENTS;
        let tide = Tide::builder()
            .path(dir.join(format!("client-{c}.db")))
            .endpoint(&endpoint)
            .headers(bearer(if unique { "tok-unique" } else { "tok-shared" }))
            .node_id(format!("c{c}"))
            .long_poll(None)
            .open()
            .await
            .unwrap();
        clients.push((Arc::new(tide), unique));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = clients
        .iter()
        .map(|(tide, unique)| tokio::spawn(writer(Arc::clone(tide), *unique, rng.next_u64(), Arc::clone(&stop))))
        .collect();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(10 + rng.below(90))).await;
        server.kill_and_restart();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = Counts { kills, ..Counts::default() };
    let mut unique_written = Vec::new();
    let mut shared_written = Vec::new();
    for (w, (_, unique)) in writers.into_iter().zip(&clients) {
        let (written, failed) = tokio::time::timeout(Duration::from_mins(2), w).await.expect("writers stop").unwrap();
        counts.failed_syncs += failed;
        if *unique { unique_written.extend(written) } else { shared_written.extend(written) }
    }
    for (tide, _) in &clients {
        complete(tide).await;
    }
    // Once more, so every client has pulled what the others pushed last.
    for (tide, _) in &clients {
        complete(tide).await;
    }
    counts.unique_ops = unique_written.len();
    counts.shared_ops = shared_written.len();

    let (unique_state, unique_cursor) = server_state(&endpoint, "tok-unique").await;
    for (id, stamp, value) in &unique_written {
        if unique_state.get(id) != Some(&(stamp.clone(), value.clone())) {
            counts.lost += 1;
        }
    }
    counts.duplicated = usize::try_from(unique_cursor).unwrap().saturating_sub(unique_written.len());
    assert_eq!(unique_state.len(), unique_written.len(), "the unique namespace holds exactly the ops written");

    let (shared_state, _) = server_state(&endpoint, "tok-shared").await;
    let mut last: BTreeMap<&str, (&Stamp, &Option<Value>)> = BTreeMap::new();
    for (id, stamp, value) in &shared_written {
        let entry = last.entry(id.as_str()).or_insert((stamp, value));
        if stamp > entry.0 {
            *entry = (stamp, value);
        }
    }
    let expected: BTreeMap<&str, (&Stamp, &Option<Value>)> = last;
    let held: BTreeMap<&str, (&Stamp, &Option<Value>)> =
        shared_state.iter().map(|(id, (s, v))| (id.as_str(), (s, v))).collect();
    assert_eq!(held, expected, "the server holds the last writer of every contended key");
    let live: BTreeMap<String, Value> = shared_state.into_iter().filter_map(|(id, (_, v))| Some((id, v?))).collect();
    for (tide, unique) in &clients {
        let collection = if *unique { "u" } else { "s" };
        let local: BTreeMap<String, Value> =
            tide.collection::<Value>(collection).list(None, 100_000).await.unwrap().into_iter().collect();
        if !*unique {
            assert_eq!(local, live, "client {} equals the server", tide.node_id());
        }
        tide.close().await;
    }
    drop(server);
    counts
}

fn seed_and_kills() -> (u64, usize) {
    let seed = std::env::var("TIDE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        u64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000,
        )
        .unwrap()
    });
    let kills = std::env::var("TIDE_CRASH_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(KILLS_DEFAULT);
    (seed, kills)
}

fn check(what: &str, counts: &Counts) {
    eprintln!(
        "crash run on {what}: {} kills, {} acknowledged ops on unique keys checked, {} on contended keys, \
         {} failed exchanges; lost {}, duplicated {}",
        counts.kills, counts.unique_ops, counts.shared_ops, counts.failed_syncs, counts.lost, counts.duplicated
    );
    assert_eq!((counts.lost, counts.duplicated), (0, 0), "{what}: {counts:?}");
    assert!(counts.unique_ops > 0 && counts.shared_ops > 0, "the clients wrote: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_sqlite_server_killed_under_load_keeps_every_acknowledged_op() {
    let (seed, kills) = seed_and_kills();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let backend = vec!["--db".to_owned(), db.to_str().unwrap().to_owned(), "--durability".into(), "full".into()];
    let counts = crash_run(backend, dir.path(), seed, kills).await;
    check("SQLite", &counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_postgres_server_killed_under_load_keeps_every_acknowledged_op() {
    let Some(url) = crate::postgres::url() else { return };
    let url = crate::postgres::fresh_schema(&url).await;
    let (seed, kills) = seed_and_kills();
    let dir = tempfile::tempdir().unwrap();
    let counts = crash_run(vec!["--database-url".to_owned(), url], dir.path(), seed, kills).await;
    check("PostgreSQL", &counts);
}
