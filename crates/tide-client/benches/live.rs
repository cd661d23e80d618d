//! Write-to-remote-watch latency: how long from a write on one client until
//! it shows in another client's watch stream, with many idle clients
//! holding long-polls on the same server (loopback, SQLite).
//!
//! `cargo bench -p tide-client --bench live` (`TIDE_BENCH_IDLE`, default
//! 1,000 idle clients; `TIDE_BENCH_WRITES`, default 200). Idle clients are
//! in another namespace (idle: nothing they watch changes); with
//! `TIDE_BENCH_SHARED=1` they share the writer's namespace, so every write
//! wakes all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tide_client::{Tide, WatchEvent};
use tide_core::SyncRequest;
use tide_server::{Durability, Server, ServerConfig, SqliteBackend, StaticTokens};
use tide_transport::Headers;
use tide_transport::{HttpTransport, Transport};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (idle, writes) = (env_or("TIDE_BENCH_IDLE", 1_000), env_or("TIDE_BENCH_WRITES", 200));
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&dir.path().join("server.db"), Durability::Full, tide_core::Limits::default())
        .await
        .unwrap();
    let config = ServerConfig { connections_max: idle + 64, ..ServerConfig::default() };
    let shared = std::env::var("TIDE_BENCH_SHARED").is_ok_and(|v| v == "1");
    let tokens = StaticTokens::new([("live-token", "live"), ("idle-token", if shared { "live" } else { "idle" })]);
    let server = Server::new(backend, Arc::new(tokens), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    // Idle clients: each holds a long-poll, and polls again when it returns.
    for i in 0..idle {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let t = HttpTransport::builder(&endpoint).header("authorization", "Bearer idle-token").build().unwrap();
            let mut cursor = None;
            loop {
                let mut req = SyncRequest::new(format!("idle{i}"), cursor);
                req.wait = Some(Duration::from_secs(25));
                match t.exchange(&req).await {
                    Ok(r) => cursor = Some(r.cursor),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }

    let open = |name: &str| {
        let headers = Headers::Static(vec![("authorization".into(), "Bearer live-token".into())]);
        Tide::builder().path(dir.path().join(format!("{name}.db"))).endpoint(&endpoint).headers(headers).open()
    };
    let author = open("writer").await.unwrap();
    let watcher = open("watcher").await.unwrap();
    let _live = watcher.sync_forever(Duration::from_hours(1)).await.unwrap();
    let mut watch = watcher.collection::<serde_json::Value>("notes").watch();
    watcher.sync_once().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the idle clients settle into their polls

    let notes = author.collection::<serde_json::Value>("notes");
    let mut latencies = Vec::with_capacity(writes);
    for i in 0..writes {
        let start = Instant::now();
        notes.put(&format!("n{i}"), &serde_json::json!({"i": i})).await.unwrap();
        author.sync_once().await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
                Ok(Some(WatchEvent::Change(c))) if c.id == format!("n{i}") => break,
                Ok(Some(_)) => {}
                other => panic!("write {i} never reached the watcher: {other:?}"),
            }
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    // Nearest rank, with q in per mille.
    let p = |per_mille: usize| ms(latencies[(latencies.len() - 1) * per_mille / 1000]);
    println!(
        "write-to-remote-watch with {idle} idle clients holding long-polls{}: {writes} writes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        if shared { " in the writer's namespace" } else { "" },
        p(500),
        p(990),
        p(1000)
    );
    let out = serde_json::json!({"idle_clients": idle, "shared_namespace": shared, "writes": writes, "p50_ms": p(500), "p99_ms": p(990), "max_ms": p(1000)});
    std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-live.json"), out.to_string()).unwrap();
}
