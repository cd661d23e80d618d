//! Load benchmark: many concurrent clients pushing and pulling over
//! loopback, against tide-server (SQLite, FULL durability) and, in the same
//! run, the original Python reference server (tide 0.2.1 under uvicorn).
//!
//! `TIDE_PYTHON=/path/to/python cargo bench -p tide-server --bench load`
//! (`TIDE_BENCH_CLIENTS`, default 16; `TIDE_BENCH_SECS`, default 10;
//! `TIDE_BENCH_POSTGRES_URL` adds PostgreSQL with one and two server
//! processes, clients spread across them).
//!
//! Every client has its own connection and node id; every exchange pushes
//! 10 puts over the client's own 1,000 keys and pulls what changed since
//! its cursor. Both servers run as separate processes on the same machine
//! as the load, so they share its two cores.
#![expect(clippy::cast_precision_loss, reason = "rates and percentiles are shown to a few digits")]
#![expect(clippy::cast_sign_loss, reason = "a percentile in [0, 1] scaled to per mille")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tide_core::{Op, Payload, Stamp, SyncRequest};
use tide_transport::{HttpTransport, Transport};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

struct Stats {
    exchanges: usize,
    ops: usize,
    changes: usize,
    errors: usize,
    secs: f64,
    latencies: Vec<Duration>,
}

async fn load(endpoints: &[String], clients: u64, secs: u64) -> Stats {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let totals = Arc::new(Mutex::new((0usize, 0usize, 0usize, 0usize)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let endpoint = endpoints[usize::try_from(c).unwrap() % endpoints.len()].clone();
            let (latencies, totals) = (Arc::clone(&latencies), Arc::clone(&totals));
            tokio::spawn(async move {
                let t = HttpTransport::new(&endpoint).unwrap();
                let node = format!("client-{c:03}");
                let (mut lamport, mut cursor) = (0u64, None);
                let doc = json!({"title": "a note of about a hundred bytes", "body": "x".repeat(60)});
                let doc = tide_core::Doc::from_value(&doc).unwrap();
                while Instant::now() < deadline {
                    let mut req = SyncRequest::new(node.clone(), cursor);
                    req.ops = (0..10)
                        .map(|_| {
                            lamport += 1;
                            Op {
                                collection: "notes".into(),
                                id: format!("{node}-{}", lamport % 1000),
                                stamp: Stamp::new(lamport, node.clone()),
                                payload: Payload::Put(doc.clone()),
                                op_id: None,
                            }
                        })
                        .collect();
                    let sent = Instant::now();
                    let result = t.exchange(&req).await;
                    let took = sent.elapsed();
                    let mut totals = totals.lock().unwrap();
                    match result {
                        Ok(resp) => {
                            lamport = lamport.max(resp.changes.iter().map(|c| c.stamp.lamport).max().unwrap_or(0));
                            cursor = Some(resp.cursor);
                            totals.0 += 1;
                            totals.1 += req.ops.len();
                            totals.2 += resp.changes.len();
                            latencies.lock().unwrap().push(took);
                        }
                        Err(_) => totals.3 += 1,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let (exchanges, ops, changes, errors) = *totals.lock().unwrap();
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    Stats { exchanges, ops, changes, errors, secs, latencies }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: p in [0, 1] picks an index in range.
    let i = (sorted.len() - 1) * (p * 1000.0).round() as usize / 1000;
    sorted[i].as_secs_f64() * 1000.0
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn report(name: &str, s: &Stats, rss: Option<f64>) -> serde_json::Value {
    let rps = s.exchanges as f64 / s.secs;
    println!(
        "{name:<34} {rps:>9.0} req/s {:>10.0} ops/s  p50 {:>7.1} ms  p99 {:>7.1} ms  changes {:>9}  errors {}  peak RSS {}",
        s.ops as f64 / s.secs,
        percentile(&s.latencies, 0.50),
        percentile(&s.latencies, 0.99),
        s.changes,
        s.errors,
        rss.map_or("-".into(), |r| format!("{r:.0} MiB")),
    );
    json!({"server": name, "req_per_s": rps, "ops_per_s": s.ops as f64 / s.secs, "p50_ms": percentile(&s.latencies, 0.5),
           "p99_ms": percentile(&s.latencies, 0.99), "changes": s.changes, "errors": s.errors, "peak_rss_mib": rss})
}

fn wait_for_port(port: u16) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on port {port}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_ours(dir: &std::path::Path, database_url: Option<&str>) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tide-server"));
    cmd.args([
        "--no-auth",
        "--listen",
        "127.0.0.1:0",
        "--log",
        "warn",
        "--principal-requests-per-second-max",
        "0",
        "--db",
    ])
    .arg(dir.join("ours.db"));
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().trim_start_matches("tide-server listening on ").to_owned())
}

fn start_original(dir: &std::path::Path) -> Option<(Child, String)> {
    let python = std::env::var("TIDE_PYTHON").ok()?;
    let port = free_port();
    let script = format!(
        "import uvicorn; from tide.server import create_app; uvicorn.run(create_app({:?}), host='127.0.0.1', port={port}, log_level='warning')",
        dir.join("original.db").to_string_lossy()
    );
    let child = Command::new(python).args(["-c", &script]).stdout(Stdio::null()).spawn().ok()?;
    wait_for_port(port);
    Some((child, format!("http://127.0.0.1:{port}/sync")))
}

/// A new schema for one measurement; returns the URL that uses it.
fn fresh_postgres_schema(url: &str, tag: usize) -> String {
    let schema = format!("tide_bench_{}_{tag}", std::process::id());
    let status = Command::new("psql")
        .args([url, "-qc", &format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")])
        .status()
        .expect("psql runs");
    assert!(status.success(), "creating schema {schema}");
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={schema}")
}

fn main() {
    let clients = env_or("TIDE_BENCH_CLIENTS", 16);
    let secs = env_or("TIDE_BENCH_SECS", 10);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("{clients} clients, {secs} s each, 10 puts + a pull per exchange");
    let mut results = Vec::new();

    let (mut ours, endpoint) = start_ours(dir.path(), None);
    let stats = rt.block_on(load(&[endpoint], clients, secs));
    results.push(report("tide-server (SQLite, FULL)", &stats, peak_rss_mib(ours.id())));
    let _ = ours.kill();
    let _ = ours.wait();

    // PostgreSQL, with one server process and then two sharing the database.
    if let Ok(url) = std::env::var("TIDE_BENCH_POSTGRES_URL") {
        for processes in [1, 2] {
            let schema = fresh_postgres_schema(&url, processes);
            let servers: Vec<_> = (0..processes).map(|_| start_ours(dir.path(), Some(&schema))).collect();
            let endpoints: Vec<String> = servers.iter().map(|(_, e)| e.clone()).collect();
            let stats = rt.block_on(load(&endpoints, clients, secs));
            let rss = servers.iter().filter_map(|(c, _)| peak_rss_mib(c.id())).fold(0.0, f64::max);
            results.push(report(&format!("tide-server (PostgreSQL) x{processes}"), &stats, Some(rss)));
            for (mut child, _) in servers {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    } else {
        println!("tide-server on PostgreSQL: not measured (set TIDE_BENCH_POSTGRES_URL)");
    }

    match start_original(dir.path()) {
        Some((mut original, endpoint)) => {
            let stats = rt.block_on(load(&[endpoint], clients, secs));
            results.push(report("original Python tide 0.2.1", &stats, peak_rss_mib(original.id())));
            let _ = original.kill();
            let _ = original.wait();
        }
        None => println!("original Python tide 0.2.1: not measured (set TIDE_PYTHON)"),
    }
    if let (Some(ours), Some(original)) =
        (results.first(), results.iter().find(|r| r["server"].as_str().is_some_and(|s| s.starts_with("original"))))
    {
        let ratio = ours["req_per_s"].as_f64().unwrap() / original["req_per_s"].as_f64().unwrap();
        println!("throughput ratio, tide-server (SQLite) / original: {ratio:.1}x");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-server.json");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&json!({"clients": clients, "secs": secs, "results": results})).unwrap(),
    )
    .unwrap();
    println!("written to {path}");
}
