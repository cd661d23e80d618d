//! The benchmark suite: every workload of BENCHMARKS.md in one command,
//! beside the raw limits (plain SQLite, an empty HTTP round trip, and a
//! minimal sync server, [`raw`], under the same loads) and the original
//! Python tide 0.2.1, measured in the same run.
//!
//! ```text
//! TIDE_PYTHON=/path/to/python-with-tide-0.2.1 cargo bench -p tide-testkit --bench suite
//! ```
//!
//! Sizes: `TIDE_BENCH_OPS` (local ops, default 2,000), `TIDE_BENCH_PUSH`
//! (default 100,000), `TIDE_BENCH_DOCS` (initial sync, default 1,000,000),
//! `TIDE_BENCH_IDLE` (idle clients for live sync, default 1,000),
//! `TIDE_BENCH_SECS` (per load run, default 5), `TIDE_BENCH_CHURN` (churn
//! writes, default 1,000,000) over `TIDE_BENCH_CHURN_KEYS` (10,000) with a
//! horizon of `TIDE_BENCH_CHURN_HORIZON` changes (1,000), `TIDE_BENCH_QUERY_DOCS`
//! (local queries, default 100,000). `TIDE_BENCH_ONLY` runs some groups
//! (`local`, `push`, `initial`, `load`, `live`, `fanout`, `churn`, `query`;
//! comma-separated). The table is printed and written as JSON to
//! `target/bench-suite.json`.
#![expect(clippy::cast_precision_loss, reason = "rates and latencies are shown to a few digits")]

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tide_client::{Batch, Durability, Tide, WatchEvent};
use tide_core::{Op, Payload, Stamp, SyncRequest};
use tide_server::{Server, ServerConfig, SqliteBackend, StaticTokens};
use tide_transport::{Headers, HttpTransport, Transport};

#[path = "suite/raw.rs"]
mod raw;

/// Ops per exchange of the suite's push by a client with no store, and of
/// the raw limit's push (tide's own client pushes in batches of its own).
const PUSH_OPS_PER_EXCHANGE: usize = 1_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p-th per mille of sorted durations, in ms.
fn pct(sorted: &[Duration], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    ms(sorted[(sorted.len() - 1) * per_mille / 1000])
}

fn doc(i: usize) -> Value {
    json!({"title": format!("document number {i}"), "body": "x".repeat(150), "n": i})
}

fn peak_rss_mib() -> f64 {
    peak_rss_of("/proc/self/status")
}

fn peak_rss_mib_of(pid: u32) -> f64 {
    peak_rss_of(&format!("/proc/{pid}/status"))
}

fn peak_rss_of(path: &str) -> f64 {
    let status = std::fs::read_to_string(path).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct Table {
    rows: Vec<Value>,
}

impl Table {
    fn row(
        &mut self,
        workload: &str,
        tide: String,
        raw: Option<String>,
        original: Option<String>,
        ratio: Option<f64>,
        target: &str,
    ) {
        println!(
            "{workload:<46} | {tide:<34} | {:<26} | {:<26} | {:>7} | {target}",
            raw.as_deref().unwrap_or("-"),
            original.as_deref().unwrap_or("-"),
            ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        );
        let row = serde_json::Map::from_iter([
            ("workload".to_owned(), Value::from(workload)),
            ("tide".to_owned(), Value::String(tide)),
            ("raw".to_owned(), raw.map_or(Value::Null, Value::String)),
            ("original".to_owned(), original.map_or(Value::Null, Value::String)),
            ("ratio".to_owned(), ratio.map_or(Value::Null, Value::from)),
            ("target".to_owned(), Value::from(target)),
        ]);
        self.rows.push(Value::Object(row));
    }
}

/// A tide-server in this process on SQLite in `dir`, for `namespace` tokens.
async fn server(dir: &std::path::Path, name: &str, config: ServerConfig) -> String {
    server_with(dir, name, config).await.0
}

/// [`server`], and the server itself.
async fn server_with(dir: &std::path::Path, name: &str, config: ServerConfig) -> (String, Server) {
    let backend: Arc<dyn tide_server::Backend> = match std::env::var("TIDE_BENCH_CHILD_POSTGRES") {
        Ok(url) => tide_server::PostgresBackend::open(&url, tide_server::Durability::Full, config.limits.clone())
            .await
            .expect("PostgreSQL opens"),
        Err(_) => {
            SqliteBackend::open(&dir.join(format!("{name}.db")), tide_server::Durability::Full, config.limits.clone())
                .await
                .expect("the server database opens")
        }
    };
    let tokens = StaticTokens::new(
        [("live", "live"), ("idle", "idle"), ("bench", "bench")]
            .into_iter()
            .chain(SPREAD_TOKENS.iter().map(|t| (*t, *t))),
    );
    let server = Server::new(backend, Arc::new(tokens), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    (endpoint, server)
}

/// Tokens of the load spread over namespaces: each is its own namespace.
const SPREAD_TOKENS: [&str; 8] = ["ns0", "ns1", "ns2", "ns3", "ns4", "ns5", "ns6", "ns7"];

fn auth(token: &str) -> Headers {
    Headers::Static(vec![("authorization".into(), format!("Bearer {token}"))])
}

async fn client(dir: &std::path::Path, name: &str, endpoint: &str, durability: Durability) -> Tide {
    Tide::builder()
        .path(dir.join(format!("{name}.db")))
        .endpoint(endpoint)
        .headers(auth("bench"))
        .durability(durability)
        .open()
        .await
        .unwrap()
}

/// The original Python tide, running `script` with `args`; its last stdout line as a number.
fn python(script: &str, args: &[&str]) -> Option<f64> {
    let python = std::env::var("TIDE_PYTHON").ok()?;
    let out = Command::new(python).arg("-c").arg(script).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!("original tide failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().last()?.trim().parse().ok()
}

const PY_LOCAL: &str = r#"
import asyncio, os, sys, tempfile, time
from tide import Tide
async def main(n, what):
    async with Tide(db_path=os.path.join(tempfile.mkdtemp(), "p.db"), node_id="py") as t:
        c = t.collection("c")
        doc = {"title": "document number", "body": "x" * 150, "n": 1}
        start = time.perf_counter()
        for i in range(n):
            await c.put(f"{i:026}", doc)
        puts = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            await c.get(f"{i:026}")
        gets = n / (time.perf_counter() - start)
        print(puts if what == "put" else gets)
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"#;

async fn local_ops(t: &mut Table, dir: &std::path::Path) {
    let n = env_or("TIDE_BENCH_OPS", 2_000);
    for (durability, name, sync) in [(Durability::Full, "FULL", "FULL"), (Durability::Normal, "NORMAL", "NORMAL")] {
        let tide =
            Tide::builder().path(dir.join(format!("local-{name}.db"))).durability(durability).open().await.unwrap();
        let c = tide.collection::<Value>("c");
        let mut lat = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let s = Instant::now();
            c.put(&format!("{i:026}"), &doc(i)).await.unwrap();
            lat.push(s.elapsed());
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        let raw = raw_sqlite_puts(dir, n, sync);
        let original = if sync == "NORMAL" { python(PY_LOCAL, &[&n.to_string(), "put"]) } else { None };
        t.row(
            &format!("local put, {name}"),
            format!("{rate:.0}/s p50 {:.2} p99 {:.2} ms", pct(&lat, 500), pct(&lat, 990)),
            Some(format!("{raw:.0}/s")),
            original.map(|o| format!("{o:.0}/s (NORMAL)")),
            Some(rate / raw),
            "(ratio to raw SQLite)",
        );
        let mut lat = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let s = Instant::now();
            c.get(&format!("{i:026}")).await.unwrap();
            lat.push(s.elapsed());
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        let original = if sync == "NORMAL" { python(PY_LOCAL, &[&n.to_string(), "get"]) } else { None };
        t.row(
            &format!("local get, {name}"),
            format!("{rate:.0}/s p50 {:.2} p99 {:.2} ms", pct(&lat, 500), pct(&lat, 990)),
            None,
            original.map(|o| format!("{o:.0}/s")),
            original.map(|o| rate / o),
            ">= the original (ratio to it)",
        );
        tide.close().await;
    }
}

/// Plain SQLite doing the same transaction as one local put.
fn raw_sqlite_puts(dir: &std::path::Path, n: usize, sync: &str) -> f64 {
    let conn = rusqlite::Connection::open(dir.join(format!("raw-{sync}.db"))).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};
         CREATE TABLE IF NOT EXISTS docs (collection TEXT, id TEXT, doc TEXT, lamport INTEGER, node_id TEXT, deleted INTEGER, PRIMARY KEY (collection, id));
         CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT, id TEXT, kind TEXT, doc TEXT, lamport INTEGER, node_id TEXT);
         CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY, lamport INTEGER); INSERT OR IGNORE INTO clock VALUES (1, 0);"
    ))
    .unwrap();
    let start = Instant::now();
    for i in 0..n {
        let text = doc(i).to_string();
        let lamport = i64::try_from(i).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn.prepare_cached(
            "INSERT INTO outbox (collection, id, kind, doc, lamport, node_id) VALUES ('c', ?1, 'put', ?2, ?3, 'n')",
        )
        .unwrap()
        .execute(rusqlite::params![format!("{i:026}"), text, lamport])
        .unwrap();
        conn.prepare_cached("INSERT OR REPLACE INTO docs VALUES ('c', ?1, ?2, ?3, 'n', 0)")
            .unwrap()
            .execute(rusqlite::params![format!("{i:026}"), text, lamport])
            .unwrap();
        conn.prepare_cached("UPDATE clock SET lamport = max(lamport, ?1) WHERE id = 1")
            .unwrap()
            .execute([lamport])
            .unwrap();
        conn.execute_batch("COMMIT").unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

const PY_PUSH: &str = r#"
import asyncio, os, sys, tempfile, time
from tide import Tide
async def main(n, endpoint):
    d = tempfile.mkdtemp()
    async with Tide(db_path=os.path.join(d, "c.db"), node_id="py", endpoint=endpoint) as t:
        c = t.collection("c")
        doc = {"title": "document number", "body": "x" * 150, "n": 1}
        for i in range(n):
            await c.put(f"{i:026}", doc)
        start = time.perf_counter()
        for _ in range((n + 499) // 500):
            await t.sync_once()
        print(n / (time.perf_counter() - start))
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"#;

/// The original reference server (uvicorn on loopback), killed on drop.
struct Original(std::process::Child, String);

impl Drop for Original {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_original(dir: &std::path::Path, name: &str) -> Option<Original> {
    let python = std::env::var("TIDE_PYTHON").ok()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let script = format!(
        "import uvicorn; from tide.server import create_app; uvicorn.run(create_app({:?}), host='127.0.0.1', port={port}, log_level='error', backlog=2048)",
        dir.join(format!("original-{name}.db")).to_string_lossy()
    );
    let child = Command::new(python).args(["-c", &script]).spawn().ok()?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(Original(child, format!("http://127.0.0.1:{port}/sync")))
}

async fn push(t: &mut Table, dir: &std::path::Path) {
    let n = env_or("TIDE_BENCH_PUSH", 100_000);
    let endpoint = server(dir, "push", ServerConfig::default()).await;
    let tide = client(dir, "pusher", &endpoint, Durability::Normal).await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(4_000) {
        let mut batch = Batch::default();
        for &i in chunk {
            batch = batch.put("c", &format!("{i:026}"), &doc(i)).unwrap();
        }
        tide.commit(batch).await.unwrap();
    }
    let start = Instant::now();
    let report = tide.sync_once().await.unwrap();
    let rate = report.acknowledged as f64 / start.elapsed().as_secs_f64();
    assert_eq!(report.acknowledged, n);
    // The original over HTTP to its reference server, on a tenth of the ops.
    let original = match start_original(dir, "push").await {
        Some(server) => python(PY_PUSH, &[&(n / 10).to_string(), &server.1]),
        None => None,
    };
    let (mut child, raw_endpoint) = raw_child(dir, "push-outbox");
    let raw = raw::push_from_outbox(&dir.join("raw-outbox.db"), n, &raw_endpoint).await;
    let _ = child.kill();
    let _ = child.wait();
    t.row(
        &format!("push {n} pending ops, one client"),
        format!("{rate:.0} ops/s ({} exchanges)", report.exchanges),
        Some(format!("{raw:.0} ops/s")),
        original.map(|o| format!("{o:.0} ops/s ({} ops)", n / 10)),
        original.map(|o| rate / o),
        ">= 150,000 ops/s",
    );
    tide.close().await;
    // The server's share: the same ops from a client with no store, to
    // tide-server and to the raw limit's server, each in a process of its own.
    let mut rates = Vec::new();
    for (mut child, endpoint) in [server_child(dir, "push-lean"), raw_child(dir, "push")] {
        rates.push(lean_push(&endpoint, n).await);
        let _ = child.kill();
        let _ = child.wait();
    }
    t.row(
        &format!("push {n} ops from a client with no store"),
        format!("{:.0} ops/s", rates[0]),
        Some(format!("{:.0} ops/s", rates[1])),
        None,
        Some(rates[0] / rates[1]),
        "(the server's share; ratio to the raw limit)",
    );
}

/// Ops per second of `n` new documents pushed in exchanges of
/// [`PUSH_OPS_PER_EXCHANGE`] by a [`LeanClient`] (the requests built
/// before the clock starts).
async fn lean_push(endpoint: &str, n: usize) -> f64 {
    let node = "lean-pusher";
    let requests: Vec<SyncRequest> = (0..n)
        .collect::<Vec<_>>()
        .chunks(PUSH_OPS_PER_EXCHANGE)
        .map(|chunk| {
            let mut req = SyncRequest::new(node, None);
            req.ops = chunk
                .iter()
                .map(|&i| Op {
                    collection: "c".into(),
                    id: format!("{i:026}"),
                    stamp: Stamp::new(i as u64 + 1, node),
                    payload: Payload::Put(tide_core::Doc::from_value(&doc(i)).unwrap()),
                    op_id: None,
                })
                .collect();
            req
        })
        .collect();
    let mut conn = LeanClient::connect(endpoint, "bench").await;
    let (start, mut cursor) = (Instant::now(), None);
    for mut req in requests {
        req.cursor = cursor;
        cursor = Some(conn.exchange(&req).await.expect("the push is answered").0);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The child process for the initial sync: only the client, so its peak
/// memory is the client's. Prints seconds and peak MiB.
async fn initial_sync_child(endpoint: &str, dir: &str) {
    let tide = Tide::builder()
        .path(std::path::Path::new(dir).join("fresh.db"))
        .endpoint(endpoint)
        .headers(auth("bench"))
        .open()
        .await
        .unwrap();
    let start = Instant::now();
    let report = tide.sync_once().await.unwrap();
    println!("{} {} {}", report.applied, start.elapsed().as_secs_f64(), peak_rss_mib());
}

const PY_INITIAL: &str = r#"
import asyncio, os, sys, tempfile, time
from tide import Tide
async def main(n, endpoint):
    async with Tide(db_path=os.path.join(tempfile.mkdtemp(), "c.db"), node_id="py", endpoint=endpoint) as t:
        start = time.perf_counter()
        await t.sync_once()
        print(n / (time.perf_counter() - start))
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"#;

async fn seed(endpoint: &str, n: usize) {
    let t = HttpTransport::builder(endpoint).headers(auth("bench")).build().unwrap();
    let d = tide_core::Doc::from_value(&doc(0)).unwrap();
    for start in (0..n).step_by(1_000) {
        let mut req = SyncRequest::new("seed", None);
        req.ops = (start..n.min(start + 1_000))
            .map(|i| Op {
                collection: "c".into(),
                id: format!("{i:026}"),
                stamp: Stamp::new(i as u64 + 1, "seed"),
                payload: Payload::Put(d.clone()),
                op_id: None,
            })
            .collect();
        req.limit = Some(1);
        t.exchange(&req).await.unwrap();
    }
}

async fn initial_sync_and_idle(t: &mut Table, dir: &std::path::Path) {
    let n = env_or("TIDE_BENCH_DOCS", 1_000_000);
    let big = server(dir, "big", ServerConfig::default()).await;
    let small = server(dir, "small", ServerConfig::default()).await;
    let seeding = Instant::now();
    seed(&big, n).await;
    seed(&small, 1_000).await;
    eprintln!("seeded {n} documents in {:.1} s", seeding.elapsed().as_secs_f64());

    let out = Command::new(std::env::current_exe().unwrap())
        .env("TIDE_BENCH_CHILD", "initial-sync")
        .args([&big, dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (applied, secs, rss) = (nums[0], nums[1], nums[2]);
    let rate = applied / secs;
    let original_n = n.min(100_000);
    let original = match start_original(dir, "initial").await {
        Some(server) => {
            seed(&server.1, original_n).await;
            python(PY_INITIAL, &[&original_n.to_string(), &server.1])
        }
        None => None,
    };
    t.row(
        &format!("initial sync of {n} documents"),
        format!("{rate:.0} docs/s, client peak {rss:.0} MiB"),
        None,
        original.map(|o| format!("{o:.0} docs/s ({original_n} docs)")),
        original.map(|o| rate / o),
        ">= 150,000 docs/s, < 100 MiB",
    );

    // An idle, caught-up client's sync, with 1,000 and with N documents on the server.
    let mut cost = Vec::new();
    for endpoint in [&small, &big] {
        let tide = client(dir, &format!("idle-{}", cost.len()), endpoint, Durability::Normal).await;
        while tide.sync_once().await.unwrap().applied > 0 {}
        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            tide.sync_once().await.unwrap();
        }
        cost.push(start.elapsed() / rounds);
        if endpoint == &big {
            digest_check_and_repair(t, &tide, endpoint, n).await;
        }
        tide.close().await;
    }
    t.row(
        "idle caught-up sync, 1,000 vs N docs on the server",
        format!("{:.2} ms vs {:.2} ms", ms(cost[0]), ms(cost[1])),
        None,
        None,
        Some(cost[1].as_secs_f64() / cost[0].as_secs_f64()),
        "ratio <= 1.5",
    );
}

/// A SQLite database's size: its file with its WAL, and its pages in use
/// (what incremental vacuum gives back over the next writes is the rest).
fn db_bytes(path: &std::path::Path) -> (u64, u64) {
    let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let file = len(path) + len(&std::path::PathBuf::from(format!("{}-wal", path.display())));
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let pragma = |name: &str| -> u64 {
        let n: i64 = conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0)).unwrap();
        n.unsigned_abs()
    };
    (file, (pragma("page_count") - pragma("freelist_count")) * pragma("page_size"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Most syncs [`settle`] makes before it gives up.
const SETTLE_SYNCS_MAX: usize = 20;

/// Syncs until a sync proves the store equal to the server.
async fn settle(tide: &Tide) {
    for _ in 0..SETTLE_SYNCS_MAX {
        let report = tide.sync_once().await.unwrap();
        if report.verified {
            return;
        }
        eprintln!("not yet verified: {report:?}");
    }
    panic!("the store never proved itself equal to the server");
}

/// Issue 16's churn: writes over a fixed set of keys, half of them
/// deletes, by two clients syncing throughout; the server's and a client's
/// database before and after collection against the live data alone, and
/// what a new client's initial sync transfers.
async fn churn(t: &mut Table, dir: &std::path::Path) {
    let n = env_or("TIDE_BENCH_CHURN", 1_000_000);
    let keys = env_or("TIDE_BENCH_CHURN_KEYS", 10_000) as u64;
    let horizon = env_or("TIDE_BENCH_CHURN_HORIZON", 1_000) as u64;
    let config =
        ServerConfig { tombstone_horizon_seqs: horizon, collect_interval: Duration::MAX, ..Default::default() };
    let (endpoint, server) = server_with(dir, "churn", config).await;
    let (phone, laptop) = (
        client(dir, "churn-a", &endpoint, Durability::Normal).await,
        client(dir, "churn-b", &endpoint, Durability::Normal).await,
    );
    let mut rng = tide_core::SplitMix64::new(16);
    let start = Instant::now();
    for (round, chunk) in (0..n).collect::<Vec<_>>().chunks(1_000).enumerate() {
        let mut batch = Batch::default();
        for &i in chunk {
            let id = format!("k{}", rng.below(keys));
            batch = if rng.below(2) == 0 { batch.delete("c", &id) } else { batch.put("c", &id, &doc(i)).unwrap() };
        }
        let writer = if round % 2 == 0 { &phone } else { &laptop };
        writer.commit(batch).await.unwrap();
        writer.sync_once().await.unwrap();
    }
    for tide in [&phone, &laptop, &phone] {
        settle(tide).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let live = phone.collection::<Value>("c").list(None, 10_000).await.unwrap();
    let live_bytes: u64 =
        live.iter().map(|(id, d)| (1 + id.len() + serde_json::to_string(d).unwrap().len()) as u64).sum();
    let server_path = dir.join("churn.db");
    let client_path = dir.join("churn-a.db");
    let (server_before, client_before) = (db_bytes(&server_path), db_bytes(&client_path));
    let collected = server.collect().await.unwrap();
    settle(&phone).await;
    let (server_after, client_after) = (db_bytes(&server_path), db_bytes(&client_path));
    if std::env::var("TIDE_BENCH_TRACE").is_ok() {
        for path in [&server_path, &client_path] {
            let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let mut q = conn.prepare("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").unwrap();
            let rows: Vec<(String, i64)> =
                q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
            eprintln!("{}: {rows:?}", path.display());
        }
    }
    let fresh = client(dir, "churn-fresh", &endpoint, Durability::Normal).await;
    let report = fresh.sync_once().await.unwrap();
    // The live documents alone, stored by each side: a new client's store
    // after its initial sync, and a new server holding only them.
    let client_alone = db_bytes(&dir.join("churn-fresh.db")).1;
    let (alone_endpoint, _alone) = server_with(dir, "churn-alone", ServerConfig::default()).await;
    let writer = client(dir, "churn-alone-writer", &alone_endpoint, Durability::Normal).await;
    for chunk in live.chunks(1_000) {
        let mut batch = Batch::default();
        for (id, d) in chunk {
            batch = batch.put("c", id, d).unwrap();
        }
        writer.commit(batch).await.unwrap();
    }
    settle(&writer).await;
    let server_alone = db_bytes(&dir.join("churn-alone.db")).1;
    let ratio = (server_after.1 as f64 / server_alone as f64).max(client_after.1 as f64 / client_alone as f64);
    t.row(
        &format!("churn: {n} writes over {keys} keys, half deletes"),
        format!(
            "{:.0} writes/s; {} live docs ({:.2} MiB); server {:.2} -> {:.2} MiB in use ({:.2} -> {:.2} MiB file), \
             client {:.2} -> {:.2} MiB in use; {} tombstones collected; a new client pulled {} changes",
            n as f64 / secs,
            live.len(),
            mib(live_bytes),
            mib(server_before.1),
            mib(server_after.1),
            mib(server_before.0),
            mib(server_after.0),
            mib(client_before.1),
            mib(client_after.1),
            collected.tombstones,
            report.pulled,
        ),
        Some(format!(
            "live docs {:.2} MiB; alone on a server {:.2} MiB, in a client {:.2} MiB",
            mib(live_bytes),
            mib(server_alone),
            mib(client_alone)
        )),
        None,
        Some(ratio),
        "<= 2x live (stored alone) after collection; initial sync = live docs",
    );
    for tide in [phone, laptop, fresh, writer] {
        tide.close().await;
    }
}

/// Concurrent clients pushing 10 puts and pulling, each on its own connection.
/// What a load run measured: ops per second, the sorted latencies of the
/// exchanges, how many failed, and the changes pulled per exchange.
type Load = (f64, Vec<Duration>, usize, f64);

async fn load(endpoint: &str, token: &str, clients: usize, secs: u64) -> Load {
    load_spread(&[endpoint.to_owned()], &[token], clients, secs).await
}

/// [`load`] with client `c` on `endpoints[c % n]` with `tokens[c % m]`
/// (other server processes, other namespaces).
async fn load_spread(endpoints: &[String], tokens: &[&str], clients: usize, secs: u64) -> Load {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let endpoint = endpoints[c % endpoints.len()].clone();
            let (latencies, token) = (Arc::clone(&latencies), tokens[c % tokens.len()].to_owned());
            let pulled = Arc::clone(&pulled);
            tokio::spawn(async move {
                let mut conn = LeanClient::connect(&endpoint, &token).await;
                let node = format!("client{c:03}");
                let d = tide_core::Doc::from_value(&json!({"title": "a note", "body": "x".repeat(60)})).unwrap();
                let (mut lamport, mut cursor, mut errors) = (0u64, None, 0usize);
                while Instant::now() < deadline {
                    let mut req = SyncRequest::new(node.clone(), cursor);
                    req.ops = (0..10)
                        .map(|_| {
                            lamport += 1;
                            Op {
                                collection: "notes".into(),
                                id: format!("{node}-{}", lamport % 1000),
                                stamp: Stamp::new(lamport, node.clone()),
                                payload: Payload::Put(d.clone()),
                                op_id: None,
                            }
                        })
                        .collect();
                    let s = Instant::now();
                    if let Some((next, changes)) = conn.exchange(&req).await {
                        cursor = Some(next);
                        latencies.lock().unwrap().push(s.elapsed());
                        pulled.fetch_add(changes, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        errors += 1;
                        conn = LeanClient::connect(&endpoint, &token).await;
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = 0;
    for task in tasks {
        errors += task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort();
    let per_exchange = pulled.load(std::sync::atomic::Ordering::Relaxed) as f64 / lat.len().max(1) as f64;
    (lat.len() as f64 * 10.0 / elapsed, lat, errors, per_exchange)
}

/// A load client as lean as `wrk`: one keep-alive connection, the request
/// body serialized, the response read as bytes and only its cursor (and a
/// count of its changes) taken out, so the load costs the shared cores as
/// little as possible and the servers are compared, not the clients.
struct LeanClient {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    uri: http::Uri,
    token: String,
}

impl LeanClient {
    async fn connect(endpoint: &str, token: &str) -> Self {
        let uri: http::Uri = endpoint.parse().unwrap();
        let authority = uri.authority().unwrap().as_str().to_owned();
        loop {
            if let Ok(stream) = tokio::net::TcpStream::connect(&authority).await {
                stream.set_nodelay(true).unwrap();
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Ok((sender, conn)) = hyper::client::conn::http1::handshake(io).await {
                    tokio::spawn(conn);
                    return Self { sender, uri, token: token.to_owned() };
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The cursor and the number of changes of one exchange, or `None` if it failed.
    async fn exchange(&mut self, req: &SyncRequest) -> Option<(tide_core::Cursor, usize)> {
        self.exchange_body(serde_json::to_vec(req).unwrap()).await
    }

    /// [`Self::exchange`] of a request already serialized.
    async fn exchange_body(&mut self, body: Vec<u8>) -> Option<(tide_core::Cursor, usize)> {
        use http_body_util::BodyExt;
        let request = http::Request::post(self.uri.path())
            .header("content-type", "application/json")
            .header("host", self.uri.authority()?.as_str())
            .header("authorization", format!("Bearer {}", self.token))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .ok()?;
        self.sender.ready().await.ok()?;
        let response = self.sender.send_request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        let text = std::str::from_utf8(&bytes).ok()?;
        // Both servers start the body with the cursor: {"cursor": "N", ...
        let rest = &text[text.find(r#""cursor""#)? + 8..];
        let rest = &rest[rest.find('"')? + 1..];
        let cursor = rest[..rest.find('"')?].parse().ok()?;
        Some((tide_core::Cursor(cursor), text.matches(r#""collection""#).count()))
    }
}

async fn server_throughput(t: &mut Table, dir: &std::path::Path) {
    let secs = env_or("TIDE_BENCH_SECS", 5) as u64;
    let empty = empty_http_round_trips(secs).await;
    t.row(
        "empty HTTP round trip, one client",
        "-".into(),
        Some(format!("{empty:.0}/s")),
        None,
        None,
        "(the raw limit)",
    );
    // TIDE_BENCH_CLIENTS=16 (for example) runs one load size.
    let sizes: Vec<usize> = std::env::var("TIDE_BENCH_CLIENTS")
        .map_or_else(|_| vec![1, 16, 64, 256], |s| s.split(',').filter_map(|n| n.parse().ok()).collect());
    for clients in sizes {
        // The server in a process of its own, so its peak memory is its own.
        let (mut child, endpoint) = server_child(dir, &format!("load{clients}"));
        let (ops, lat, errors, per_exchange) = load(&endpoint, "bench", clients, secs).await;
        let server_rss = peak_rss_mib_of(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let (mut child, endpoint) = raw_child(dir, &format!("load{clients}"));
        let (raw, raw_lat, _, _) = load(&endpoint, "bench", clients, secs).await;
        let _ = child.kill();
        let _ = child.wait();
        let original = original_load(dir, clients, secs).await;
        let raw_vs_original = original.as_ref().map_or(String::new(), |(o, _)| format!(", {:.1}x", raw / o));
        t.row(
            &format!("server, {clients} clients pushing and pulling"),
            format!(
                "{:.0} ex/s ({per_exchange:.0} pulled) p50 {:.1} p99 {:.1} ms, {server_rss:.0} MiB{}",
                ops / 10.0,
                pct(&lat, 500),
                pct(&lat, 990),
                if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
            ),
            Some(format!("{:.0} ex/s p99 {:.1} ms{raw_vs_original}", raw / 10.0, pct(&raw_lat, 990))),
            original.as_ref().map(|(o, l)| format!("{:.0} ex/s p99 {:.0} ms", o / 10.0, pct(l, 990))),
            original.as_ref().map(|(o, _)| ops / o),
            match clients {
                1 => ">= 2x the original",
                256 => ">= 25x the original, p99 <= 150 ms",
                _ => ">= 25x the original",
            },
        );
    }
    if let Ok(url) = std::env::var("TIDE_BENCH_POSTGRES_URL") {
        postgres_throughput(t, dir, &url, secs).await;
    }
}

/// PostgreSQL: 16 clients on one server process, beside the original (on
/// its SQLite); then the same clients over 8 namespaces and 2 processes.
async fn postgres_throughput(t: &mut Table, dir: &std::path::Path, base: &str, secs: u64) {
    let clients = 16;
    let schema = format!("tide_bench_{}", std::process::id());
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(base).await.expect("TIDE_BENCH_POSTGRES_URL connects");
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    }
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options[search_path]={schema}");
    let (mut one, endpoint) = server_child_on(dir, "pg1", Some(&url));
    let (ops, lat, errors, per_exchange) = load(&endpoint, "bench", clients, secs).await;
    let _ = one.kill();
    let _ = one.wait();
    let original = original_load(dir, clients, secs).await;
    t.row(
        &format!("PostgreSQL, {clients} clients, one process"),
        format!(
            "{:.0} ex/s ({per_exchange:.0} pulled) p50 {:.1} p99 {:.1} ms{}",
            ops / 10.0,
            pct(&lat, 500),
            pct(&lat, 990),
            if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
        ),
        None,
        original.as_ref().map(|(o, l)| format!("{:.0} ex/s p99 {:.0} ms (SQLite)", o / 10.0, pct(l, 990))),
        original.as_ref().map(|(o, _)| ops / o),
        ">= 3x the original",
    );
    let (mut a, first) = server_child_on(dir, "pg2a", Some(&url));
    let (mut b, second) = server_child_on(dir, "pg2b", Some(&url));
    let (spread, lat, errors, _) = load_spread(&[first, second], &SPREAD_TOKENS, clients, secs).await;
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(base).await.expect("TIDE_BENCH_POSTGRES_URL connects");
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    }
    t.row(
        &format!("PostgreSQL, {clients} clients, 8 namespaces, 2 processes"),
        format!(
            "{:.0} ex/s p50 {:.1} p99 {:.1} ms{}",
            spread / 10.0,
            pct(&lat, 500),
            pct(&lat, 990),
            if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
        ),
        Some(format!("one process: {:.0} ex/s", ops / 10.0)),
        None,
        Some(spread / ops),
        "(ratio to one process)",
    );
}

/// A server in a process of its own (its CPU and memory its own): the
/// child and its endpoint.
fn server_child(dir: &std::path::Path, name: &str) -> (std::process::Child, String) {
    server_child_on(dir, name, None)
}

/// [`server_child`], on PostgreSQL at `postgres` if given.
fn server_child_on(dir: &std::path::Path, name: &str, postgres: Option<&str>) -> (std::process::Child, String) {
    child_serving(dir, name, "server", postgres)
}

/// The raw limit's server ([`raw`]) in a process of its own.
fn raw_child(dir: &std::path::Path, name: &str) -> (std::process::Child, String) {
    child_serving(dir, &format!("raw-{name}.db"), "raw-server", None)
}

/// This binary as a child `kind` serving at `dir/name`; its endpoint.
fn child_serving(
    dir: &std::path::Path,
    name: &str,
    kind: &str,
    postgres: Option<&str>,
) -> (std::process::Child, String) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if let Some(url) = postgres {
        command.env("TIDE_BENCH_CHILD_POSTGRES", url);
    }
    let mut child = command
        .env("TIDE_BENCH_CHILD", kind)
        .env("GLIBC_TUNABLES", tide_server::GLIBC_TUNABLES)
        .arg(dir.join(name))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    (child, line.trim().to_owned())
}

/// The original reference server under the same load (uvicorn on loopback).
async fn original_load(dir: &std::path::Path, clients: usize, secs: u64) -> Option<(f64, Vec<Duration>)> {
    let server = start_original(dir, &format!("load{clients}")).await?;
    let (ops, lat, _, _) = load(&server.1, "none", clients, secs).await;
    Some((ops, lat))
}

/// Requests per second to a hyper server that answers every request with 200 and no body.
async fn empty_http_round_trips(secs: u64) -> f64 {
    use http_body_util::{BodyExt, Empty, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::new())))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < Duration::from_secs(secs.min(3)) {
        let req = http::Request::post("/").body(Empty::<bytes::Bytes>::new()).unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let _ = resp.into_body().collect().await;
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn live(t: &mut Table, dir: &std::path::Path) {
    let (idle, writes) = (env_or("TIDE_BENCH_IDLE", 1_000), 200);
    // The server in a process of its own, the idle clients as lean as wrk:
    // what is measured is the server's wake-up of a thousand polls.
    let (mut child, endpoint) = server_child(dir, "live");
    // TIDE_BENCH_SHARED=1 puts the idle clients in the writer's namespace,
    // so every write wakes them all. They run in a process of their own,
    // as the server does: a thousand clients are a thousand machines, not
    // tasks queued beside the watcher's on its runtime.
    let shared = std::env::var("TIDE_BENCH_SHARED").is_ok_and(|v| v == "1");
    let mut polls = Command::new(std::env::current_exe().unwrap())
        .env("TIDE_BENCH_CHILD", "idle-polls")
        .args([endpoint.as_str(), if shared { "live" } else { "idle" }, &idle.to_string()])
        .spawn()
        .unwrap();
    let open = |name: &str| {
        Tide::builder().path(dir.join(format!("{name}.db"))).endpoint(&endpoint).headers(auth("live")).open()
    };
    let (author, watcher) = (open("author").await.unwrap(), open("watcher").await.unwrap());
    let _sync = watcher.sync_forever(Duration::from_hours(1)).await.unwrap();
    let mut watch = watcher.watch();
    held_polls_reach(&endpoint, idle + 1).await;
    let notes = author.collection::<Value>("notes");
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let start = Instant::now();
        notes.put(&format!("n{i}"), &doc(i)).await.unwrap();
        author.sync_once().await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
                Ok(Some(WatchEvent::Change(c))) if c.id == format!("n{i}") => break,
                Ok(Some(_)) => {}
                other => panic!("write {i} never arrived: {other:?}"),
            }
        }
        lat.push(start.elapsed());
        // One write wakes them all: the next waits until all are held again.
        held_polls_reach(&endpoint, idle + 1).await;
    }
    lat.sort();
    let _ = polls.kill();
    let _ = polls.wait();
    let _ = child.kill();
    let _ = child.wait();
    t.row(
        &format!("write-to-remote-watch, {idle} idle clients{}", if shared { " (same namespace)" } else { "" }),
        format!("p50 {:.1} ms, p99 {:.1} ms", pct(&lat, 500), pct(&lat, 990)),
        None,
        Some("no live sync (polls every interval)".into()),
        None,
        "p50 <= 10 ms, p99 <= 50 ms",
    );
}
/// Waits until the server at `endpoint` holds `n` polls (tide-server's
/// `tide_held_requests` gauge, which the raw limit's server answers too).
async fn held_polls_reach(endpoint: &str, n: usize) {
    use http_body_util::BodyExt;
    let uri: http::Uri = endpoint.replace("/sync", "/metrics").parse().unwrap();
    let authority = uri.authority().unwrap().as_str().to_owned();
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(uri.path())
            .header("host", &authority)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let body = sender.send_request(request).await.unwrap().into_body().collect().await.unwrap().to_bytes();
        let held = String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("tide_held_requests ")?.parse::<usize>().ok());
        if held == Some(n) {
            return;
        }
        assert!(Instant::now() < deadline, "tide-server holds {held:?} polls, not {n}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `n` lean clients long-polling `endpoint` with `token`, each again as
/// soon as answered; aborted when the set is dropped.
fn idle_polls(endpoint: &str, token: &str, n: usize) -> tokio::task::JoinSet<()> {
    let mut polls = tokio::task::JoinSet::new();
    for i in 0..n {
        let (endpoint, token) = (endpoint.to_owned(), token.to_owned());
        polls.spawn(async move {
            let mut t = LeanClient::connect(&endpoint, &token).await;
            let mut cursor = None;
            loop {
                let mut req = SyncRequest::new(format!("idle{i}"), cursor);
                req.wait = Some(Duration::from_secs(25));
                if let Some((next, _)) = t.exchange(&req).await {
                    cursor = Some(next);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    t = LeanClient::connect(&endpoint, &token).await;
                }
            }
        });
    }
    polls
}

/// One write waking 1,000 polls in its own namespace, server against
/// server: a lean author writes one op per exchange and a lean watcher
/// polls beside the idle ones; from the author's exchange to the watcher's
/// answer, on tide-server and on the raw limit's server.
async fn fan_out(t: &mut Table, dir: &std::path::Path) {
    let (idle, writes) = (env_or("TIDE_BENCH_IDLE", 1_000), 200);
    let mut rows = Vec::new();
    for (mut child, endpoint) in [server_child(dir, "fan-out"), raw_child(dir, "fan-out")] {
        let polls = idle_polls(&endpoint, "live", idle);
        let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher_endpoint = endpoint.clone();
        let watcher = tokio::spawn(async move {
            let mut conn = LeanClient::connect(&watcher_endpoint, "live").await;
            let mut cursor = None;
            loop {
                let mut req = SyncRequest::new("watcher", cursor);
                req.wait = Some(Duration::from_secs(25));
                let (next, changes) = conn.exchange(&req).await.expect("the watcher's poll is answered");
                if changes > 0 && seen.send(Instant::now()).is_err() {
                    return;
                }
                cursor = Some(next);
            }
        });
        let mut author = LeanClient::connect(&endpoint, "live").await;
        held_polls_reach(&endpoint, idle + 1).await;
        let (mut lat, mut cursor) = (Vec::with_capacity(writes), None);
        let d = tide_core::Doc::from_value(&doc(0)).unwrap();
        for i in 0..writes {
            let mut req = SyncRequest::new("author", cursor);
            req.ops = vec![Op {
                collection: "notes".into(),
                id: format!("n{i}"),
                stamp: Stamp::new(i as u64 + 1, "author"),
                payload: Payload::Put(d.clone()),
                op_id: None,
            }];
            let start = Instant::now();
            cursor = Some(author.exchange(&req).await.expect("the write is answered").0);
            let at = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await;
            lat.push(at.expect("the watcher sees the write").expect("the watcher runs") - start);
            // One write wakes them all: the next waits until all are held again.
            held_polls_reach(&endpoint, idle + 1).await;
        }
        lat.sort();
        watcher.abort();
        drop(polls);
        let _ = child.kill();
        let _ = child.wait();
        rows.push(format!("p50 {:.1} ms, p99 {:.1} ms", pct(&lat, 500), pct(&lat, 990)));
    }
    t.row(
        &format!("one write waking {idle} polls in its namespace, lean watcher"),
        rows[0].clone(),
        Some(rows[1].clone()),
        None,
        None,
        "p50 <= 20 ms (server against server)",
    );
}

/// A caught-up replica of `n` documents proves it equals the server (one
/// exchange comparing digests), then repairs 1,000 keys the server holds
/// newer versions of that the change stream never brought it (written
/// under its own node id, so the echo rule skips them, as for a copied store).
async fn digest_check_and_repair(t: &mut Table, tide: &Tide, endpoint: &str, n: usize) {
    let rounds = 50;
    let start = Instant::now();
    for _ in 0..rounds {
        assert!(tide.sync_once().await.unwrap().verified, "a caught-up replica verifies");
    }
    let check = start.elapsed() / rounds;
    let lamport = 10 * n as u64;
    let raw = HttpTransport::builder(endpoint).headers(auth("bench")).build().unwrap();
    let mut req = SyncRequest::new(tide.node_id(), None);
    req.limit = Some(1);
    let d = tide_core::Doc::from_value(&json!({"title": "changed behind the replica's back"})).unwrap();
    req.ops = (0..1_000)
        .map(|i| Op {
            collection: "c".into(),
            id: format!("{:026}", i * (n / 1_000).max(1)),
            stamp: Stamp::new(lamport + i as u64, tide.node_id()),
            payload: Payload::Put(d.clone()),
            op_id: None,
        })
        .collect();
    raw.exchange(&req).await.unwrap();
    let start = Instant::now();
    let report = tide.sync_once().await.unwrap();
    let repair = start.elapsed();
    assert_eq!(report.repaired, 1_000, "{report:?}");
    assert!(tide.sync_once().await.unwrap().verified);
    t.row(
        &format!("digest check of a caught-up replica of {n} docs"),
        format!("{:.2} ms (one exchange)", ms(check)),
        None,
        None,
        None,
        "<= 50 ms",
    );
    t.row(
        &format!("repair of 1,000 differing keys among {n} docs"),
        format!("{:.0} ms ({} exchanges)", ms(repair), report.exchanges),
        None,
        None,
        None,
        "<= 1 s",
    );
}

/// A query document of about 200 bytes: 50 share each `group`.
fn query_doc(i: usize) -> Value {
    json!({"title": format!("item {i:06}"), "group": i % 2_000, "score": i % 1_000, "body": "y".repeat(120)})
}

/// Local queries on `TIDE_BENCH_QUERY_DOCS` documents: building an index,
/// an indexed equality returning 50, an unindexed filter over all of them,
/// each beside the same statement hand-written on rusqlite; and how soon a
/// live query's update follows a remote page's commit.
async fn queries(t: &mut Table, dir: &std::path::Path) {
    use tide_client::field;
    let n = env_or("TIDE_BENCH_QUERY_DOCS", 100_000);
    let server = tide_transport::FakeServer::new();
    let path = dir.join("queries.db");
    let tide = Tide::builder()
        .path(&path)
        .node_id("reader")
        .long_poll(None)
        .transport(Arc::new(server.connect("reader")))
        .open()
        .await
        .unwrap();
    let items = tide.collection::<Value>("items");
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let batch =
            chunk.iter().fold(Batch::default(), |b, i| b.put("items", &format!("i{i:06}"), &query_doc(*i)).unwrap());
        tide.commit(batch).await.unwrap();
    }
    tide.sync_once().await.unwrap();
    let start = Instant::now();
    items.create_index([field("group")]).await.unwrap();
    let build = start.elapsed();
    t.row(
        &format!("create_index on {n} docs (writes wait)"),
        format!("{:.0} ms", ms(build)),
        None,
        None,
        None,
        "(documented bound)",
    );

    query_latencies(t, &items, &path, n).await;
    live_query_latency(t, &tide, &server).await;
    tide.close().await;
}

/// Indexed and unindexed queries beside rusqlite on the same file.
async fn query_latencies(t: &mut Table, items: &tide_client::Collection<Value>, path: &std::path::Path, n: usize) {
    use tide_client::field;
    let raw = rusqlite::Connection::open(path).unwrap();
    let runs = 200;
    let (mut lat, mut raw_lat) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for r in 0..runs {
        let group = (r * 7) % 2_000;
        let q = items.query().filter(field("group").eq(group));
        let s = Instant::now();
        let found = q.fetch().await.unwrap().docs.len();
        lat.push(s.elapsed());
        assert_eq!(found, n / 2_000);
        let s = Instant::now();
        let mut stmt = raw
            .prepare_cached(
                "SELECT id, doc FROM tide_docs INDEXED BY tide_ix_tide_f1 WHERE collection = 'items' AND deleted = 0 \
                 AND tide_f1 = ?1 ORDER BY id LIMIT 1000",
            )
            .unwrap();
        let rows: Vec<(String, String)> = stmt
            .query_map([i64::try_from(group).unwrap()], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let _: Vec<Value> = rows.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        raw_lat.push(s.elapsed());
    }
    lat.sort();
    raw_lat.sort();
    t.row(
        &format!("indexed equality query, 50 of {n} docs"),
        format!("p50 {:.3} p99 {:.3} ms", pct(&lat, 500), pct(&lat, 990)),
        Some(format!("p50 {:.3} ms (rusqlite)", pct(&raw_lat, 500))),
        None,
        Some(pct(&lat, 500) / pct(&raw_lat, 500)),
        "p50 <= 1 ms",
    );

    let runs = 10;
    let (mut lat, mut raw_lat) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for r in 0..runs {
        let prefix = format!("item {:02}", r * 9);
        let q = items.query().filter(field("title").starts_with(prefix.clone()));
        let s = Instant::now();
        let found = q.fetch().await.unwrap().docs.len();
        lat.push(s.elapsed());
        let s = Instant::now();
        let mut stmt = raw
            .prepare_cached(
                "SELECT id, doc FROM tide_docs WHERE collection = 'items' AND deleted = 0 \
                 AND json_extract(doc, '$.title') >= ?1 AND json_extract(doc, '$.title') < ?2 ORDER BY id LIMIT 1000",
            )
            .unwrap();
        let rows: Vec<(String, String)> = stmt
            .query_map([&prefix, &format!("{prefix}\u{10FFFF}")], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let _: Vec<Value> = rows.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        raw_lat.push(s.elapsed());
        assert_eq!(found, rows.len());
    }
    lat.sort();
    raw_lat.sort();
    t.row(
        &format!("unindexed filter over {n} docs"),
        format!("p50 {:.1} max {:.1} ms", pct(&lat, 500), pct(&lat, 1000)),
        Some(format!("p50 {:.1} ms (rusqlite)", pct(&raw_lat, 500))),
        None,
        Some(pct(&lat, 500) / pct(&raw_lat, 500)),
        "<= 50 ms",
    );
    drop(raw);
}

/// From a remote page's commit to the live query's update.
async fn live_query_latency(t: &mut Table, tide: &Tide, server: &tide_transport::FakeServer) {
    use tide_client::field;
    let items = tide.collection::<Value>("items");
    // A live query on one group; another client's page of 100 changes to
    // it lands: from the page's commit (a watcher's first event) to the
    // update, read as JSON values.
    let writer = Tide::builder().node_id("writer").transport(Arc::new(server.connect("writer"))).open().await.unwrap();
    // What a screen shows: the group's 50 highest scores.
    let mut live =
        items.query().filter(field("group").eq(7)).order_by_desc(field("score")).limit(50).watch().await.unwrap();
    live.next().await.unwrap().unwrap();
    let mut lat = Vec::new();
    for round in 0..20usize {
        let batch = (0..100).fold(Batch::default(), |b, k| {
            let mut d = query_doc(7);
            d["score"] = json!(round * 1_000 + k);
            b.put("items", &format!("w{round:02}-{k:03}"), &d).unwrap()
        });
        writer.commit(batch).await.unwrap();
        writer.sync_once().await.unwrap();
        let mut watch = tide.watch();
        let syncing = tide.clone();
        let sync = tokio::spawn(async move { syncing.sync_once().await.unwrap() });
        let committed = loop {
            if let Some(WatchEvent::Change(_)) = watch.next().await {
                break Instant::now();
            }
        };
        let update = live.next().await.unwrap().unwrap();
        lat.push(committed.elapsed());
        assert_eq!(update.docs[0].1["score"], json!(round * 1_000 + 99));
        sync.await.unwrap();
    }
    lat.sort();
    t.row(
        "live query (top 50) after a remote page of 100",
        format!("p50 {:.2} p99 {:.2} ms", pct(&lat, 500), pct(&lat, 990)),
        None,
        None,
        None,
        "<= 5 ms after the commit",
    );
    writer.close().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("TIDE_BENCH_CHILD").as_deref() == Ok("server") {
        // A server for the load runs: prints its endpoint, serves until killed.
        let args: Vec<String> = std::env::args().collect();
        let base = std::path::PathBuf::from(args.iter().skip(1).rfind(|a| !a.starts_with("--")).expect("a db path"));
        let dir = base.parent().expect("a dir").to_owned();
        let name = base.file_name().expect("a name").to_string_lossy().into_owned();
        // Room for every client of the live run in one namespace: past the
        // per-namespace cap a poll is answered at once and its client backs off.
        let config = ServerConfig {
            connections_max: 4_096,
            held_per_namespace_max: 4_096,
            // Every load client is one principal here.
            principal_requests_per_second_max: 0,
            ..ServerConfig::default()
        };
        let endpoint = server(&dir, &name, config).await;
        println!("{endpoint}");
        std::future::pending::<()>().await;
    }
    if std::env::var("TIDE_BENCH_CHILD").as_deref() == Ok("raw-server") {
        let path = std::env::args().skip(1).rfind(|a| !a.starts_with("--")).expect("a db path");
        println!("{}", raw::serve(path.into()).await);
        std::future::pending::<()>().await;
    }
    if std::env::var("TIDE_BENCH_CHILD").as_deref() == Ok("idle-polls") {
        // The live run's idle clients: endpoint, token, how many; until killed.
        let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
        let _polls = idle_polls(&args[0], &args[1], args[2].parse().expect("a count"));
        std::future::pending::<()>().await;
    }
    if std::env::var("TIDE_BENCH_CHILD").as_deref() == Ok("initial-sync") {
        let args: Vec<String> = std::env::args().collect();
        let positional: Vec<&String> = args.iter().skip(1).filter(|a| !a.starts_with("--")).collect();
        initial_sync_child(positional[0], positional[1]).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:<46} | {:<34} | {:<26} | {:<26} | {:>7} | target",
        "workload", "tide", "raw limit", "original Python tide 0.2.1", "ratio"
    );
    let mut t = Table { rows: Vec::new() };
    // TIDE_BENCH_ONLY=initial (for example) runs one group of workloads.
    let only = std::env::var("TIDE_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|o| o == name));
    if run("local") {
        local_ops(&mut t, dir.path()).await;
    }
    if run("push") {
        push(&mut t, dir.path()).await;
    }
    if run("initial") {
        initial_sync_and_idle(&mut t, dir.path()).await;
    }
    if run("load") {
        server_throughput(&mut t, dir.path()).await;
    }
    if run("live") {
        live(&mut t, dir.path()).await;
    }
    if run("fanout") {
        fan_out(&mut t, dir.path()).await;
    }
    if run("churn") {
        churn(&mut t, dir.path()).await;
    }
    if run("query") {
        queries(&mut t, dir.path()).await;
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-suite.json");
    std::fs::write(path, serde_json::to_string_pretty(&json!({"rows": t.rows})).unwrap()).unwrap();
    println!("written to {path}");
}
