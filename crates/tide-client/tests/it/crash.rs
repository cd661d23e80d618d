//! The real client's sync loop killed with `SIGKILL` at named points
//! (reliability.md C3–C5, C9, through `Tide::sync_once`, not a copy of it).
//!
//! The parent re-runs this test binary as a child (`crash::child`) that
//! writes through a [`Tide`] and syncs it. The child's transport carries
//! each exchange over its stdout and stdin to the parent, which plays the
//! server from a `tide_core::Model` and kills the child: once the push is
//! sent (the server never sees it), once the server committed it (the
//! answer never arrives), right after the answer (while the client settles
//! and applies it), during the apply of a large page, or after a seeded
//! random number of events. The parent then reopens the store and checks:
//! it is intact; every write the child saw return is there, and queued or
//! on the server; a saved cursor implies the changes below it are applied;
//! and the same client, reopened, syncs to exactly the server's state.
//!
//! `TIDE_CRASH_SEED=n` replays the random-kill test for one seed.

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tide_client::Tide;
use tide_core::{Limits, Model, Op, Payload, SplitMix64, Stamp, SyncRequest, SyncResponse};
use tide_transport::{Error, Transport};

/// The child's transport: each request goes to the parent as a line on
/// stdout, each answer comes back as a line on stdin.
struct Pipe;

#[async_trait::async_trait]
impl Transport for Pipe {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error> {
        emit(&json!({"request": request}));
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        Ok(serde_json::from_str(&line).expect("the parent answers"))
    }
}

/// What the child tells the parent, one JSON line each, prefixed `TIDE `.
fn emit(event: &Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "TIDE {event}").unwrap();
    out.flush().unwrap();
}

/// The child: writes and syncs through a real client until killed. Run by
/// the parent, not alone.
#[test]
#[ignore = "the child process of the client crash tests; they run it"]
fn child() {
    let dir = std::env::var("TIDE_CRASH_DIR").expect("run by the crash tests");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tide = Tide::builder()
            .path(format!("{dir}/client.db"))
            .node_id("child")
            .transport(Arc::new(Pipe))
            .long_poll(None)
            .open()
            .await
            .unwrap();
        let notes = tide.collection::<Value>("notes");
        for i in 0u64.. {
            let id = format!("k{}", i % 20);
            let stamp = if i % 5 == 4 {
                notes.delete(&id).await.unwrap()
            } else {
                notes.put(&id, &json!({"i": i})).await.unwrap()
            };
            emit(&json!({"acked": [id, stamp]}));
            if i % 3 == 2 {
                tide.sync_once().await.unwrap();
                emit(&json!({"synced": i}));
            }
        }
    });
}

/// Where the parent kills the child.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A request with ops has been sent; the server never sees it.
    PushSent,
    /// The server committed a request with ops; the answer never arrives.
    AfterServerCommit,
    /// Right after answering a request with ops: the kill lands while the
    /// client settles its outbox or applies the page.
    AfterAnswer,
    /// A moment after answering the first pull, a page of 1,000 changes:
    /// the kill lands while the client applies it.
    DuringPageApply(Duration),
    /// After this many events, whatever they are.
    Event(usize),
}

struct Run {
    model: Model,
    acked: Vec<(String, Stamp)>,
}

fn spawn_child(dir: &std::path::Path) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash::child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TIDE_CRASH_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdin, stdout)
}

/// Plays the server for the child until the kill point, then kills it.
fn run_until_killed(dir: &std::path::Path, model: Model, kill: KillAt) -> Run {
    let (mut child, mut stdin, stdout) = spawn_child(dir);
    let mut run = Run { model, acked: Vec::new() };
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut events = 0;
    for line in stdout.lines() {
        assert!(Instant::now() < deadline, "the child never reached {kill:?}");
        let line = line.unwrap();
        let Some(event) = line.strip_prefix("TIDE ") else { continue };
        events += 1;
        let event: Value = serde_json::from_str(event).unwrap();
        if let Some(acked) = event.get("acked") {
            let (id, stamp): (String, Stamp) = serde_json::from_value(acked.clone()).unwrap();
            run.acked.push((id, stamp));
        } else if let Some(request) = event.get("request") {
            let request: SyncRequest = serde_json::from_value(request.clone()).unwrap();
            let pushes = !request.ops.is_empty();
            if pushes && matches!(kill, KillAt::PushSent) {
                break;
            }
            let resp = run.model.exchange(&request).unwrap();
            if pushes && matches!(kill, KillAt::AfterServerCommit) {
                break;
            }
            writeln!(stdin, "{}", serde_json::to_string(&resp).unwrap()).unwrap();
            stdin.flush().unwrap();
            match kill {
                KillAt::AfterAnswer if pushes => break,
                KillAt::DuringPageApply(after) if resp.changes.len() >= 1_000 => {
                    std::thread::sleep(after);
                    break;
                }
                _ => {}
            }
        }
        if matches!(kill, KillAt::Event(n) if events >= n) {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    run
}

/// The server, as a transport for the reopened client.
struct ModelTransport(Mutex<Model>);

#[async_trait::async_trait]
impl Transport for ModelTransport {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error> {
        Ok(self.0.lock().unwrap().exchange(request).unwrap())
    }
}

/// Reopens the store after the kill, checks every invariant, then syncs the
/// reopened client to completion and compares it with the server.
async fn check_after_crash(dir: &std::path::Path, run: Run) {
    let path = dir.join("client.db");
    let store = tide_store::Store::open(&path).await.expect("the store reopens after SIGKILL");
    store.check_integrity().await.unwrap();
    let pending = store.pending(100_000).await.unwrap();
    let mut stamps: Vec<&Stamp> = pending.iter().map(|p| &p.op.stamp).collect();
    stamps.sort();
    stamps.dedup();
    assert_eq!(stamps.len(), pending.len(), "an op is in the outbox at most once");
    for (id, stamp) in &run.acked {
        let local = store.version("notes", id).await.unwrap().expect("a write that returned is never lost");
        assert!(local.stamp >= *stamp, "notes/{id}: local {:?} older than written {stamp:?}", local.stamp);
        let queued = pending.iter().any(|p| p.op.stamp == *stamp);
        let on_server = run.model.row("notes", id).is_some_and(|r| r.stamp >= *stamp);
        assert!(queued || on_server, "notes/{id} {stamp:?} is neither queued nor on the server");
    }
    if let Some(cursor) = store.cursor().await.unwrap() {
        for ((collection, id), row) in run.model.rows() {
            if row.seq <= cursor.seq() {
                let local = store.version(collection, id).await.unwrap().expect("a change below the cursor is applied");
                assert!(local.stamp >= row.stamp, "{collection}/{id} is below the cursor but not applied");
            }
        }
    }
    store.close().await;

    // The same client, reopened, converges with the server.
    let server = Arc::new(ModelTransport(Mutex::new(run.model)));
    let tide = Tide::builder().path(&path).transport(Arc::clone(&server) as Arc<dyn Transport>).open().await.unwrap();
    tide.sync_once().await.unwrap();
    assert_eq!(tide.pending_count().await.unwrap(), 0, "the outbox drains");
    let model = server.0.lock().unwrap().clone();
    for ((collection, id), row) in model.rows() {
        let local = tide.version(collection, id).await.unwrap().expect("every server version is here");
        assert_eq!((&local.stamp, &local.payload), (&row.stamp, &row.payload), "{collection}/{id}");
    }
    let next = tide.collection::<Value>("notes").put("after-crash", &json!({})).await.unwrap();
    assert!(run.acked.iter().all(|(_, s)| next > *s), "no counter reuse after the crash");
    tide.close().await;
}

/// A server already holding 1,500 documents of another node: the child's
/// first pull is a page of 1,000 changes.
fn busy_server() -> Model {
    let mut model = Model::new(Limits::default());
    for chunk in (0..1_500u64).collect::<Vec<_>>().chunks(1_000) {
        let mut req = SyncRequest::new("other", None);
        req.ops = chunk
            .iter()
            .map(|&i| Op {
                collection: "notes".into(),
                id: format!("other{i}"),
                stamp: Stamp::new(i + 1, "other"),
                payload: Payload::Put(tide_core::Doc::from_value(&json!({"from": "other", "i": i})).unwrap()),
                op_id: None,
            })
            .collect();
        model.exchange(&req).unwrap();
    }
    model
}

fn crash_at(kill: KillAt) {
    let dir = tempfile::tempdir().unwrap();
    let run = run_until_killed(dir.path(), busy_server(), kill);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(check_after_crash(dir.path(), run));
}

#[test]
fn killed_after_sending_a_push() {
    crash_at(KillAt::PushSent);
}

#[test]
fn killed_after_the_server_committed_before_the_answer() {
    crash_at(KillAt::AfterServerCommit);
}

#[test]
fn killed_right_after_the_answer() {
    crash_at(KillAt::AfterAnswer);
}

#[test]
fn killed_while_applying_a_page() {
    for micros in [0, 500, 2_000, 8_000] {
        crash_at(KillAt::DuringPageApply(Duration::from_micros(micros)));
    }
}

#[test]
fn killed_at_seeded_random_times() {
    let seeds: Vec<u64> = match std::env::var("TIDE_CRASH_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..8).collect(),
    };
    for seed in seeds {
        let events = 1 + SplitMix64::new(seed).index(400);
        let result = std::panic::catch_unwind(|| crash_at(KillAt::Event(events)));
        if let Err(e) = result {
            eprintln!(
                "seed {seed} (kill after {events} events) failed; replay: TIDE_CRASH_SEED={seed} cargo test -p tide-client --test it crash::killed_at"
            );
            std::panic::resume_unwind(e);
        }
    }
}
