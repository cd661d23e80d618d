//! Store throughput beside raw SQLite doing the same transactions, and
//! beside the original Python tide 0.2.1 for gets.
//!
//! `cargo bench -p tide-store --bench store` (set `TIDE_PYTHON` to a Python
//! with `tide==0.2.1` installed to measure the original; `TIDE_BENCH_SECS`
//! sets the seconds per measurement, default 2).
//!
//! Ratios matter more than absolute rates on a shared machine: each pair is
//! measured back to back in the same run.

#![expect(clippy::cast_precision_loss, reason = "rates are counts over seconds; a few digits are plenty")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tide_core::{Change, Cursor, Doc, Payload, SplitMix64, Stamp};
use tide_store::{Durability, OpenOptions, Store};

fn secs() -> Duration {
    Duration::from_secs_f64(std::env::var("TIDE_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0))
}

fn doc200(i: u64) -> Doc {
    let v = json!({"title": format!("document number {i}"), "body": "x".repeat(150), "n": i});
    v.as_object().cloned().unwrap().into()
}

fn id(i: u64) -> String {
    format!("{i:026}")
}

const RAW_SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    CREATE TABLE docs (collection TEXT NOT NULL, id TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL,
                       node_id TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (collection, id));
    CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, id TEXT NOT NULL,
                         kind TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL, node_id TEXT NOT NULL);
    CREATE TABLE clock (id INTEGER PRIMARY KEY, lamport INTEGER NOT NULL);
    INSERT INTO clock VALUES (1, 0);";

fn raw(dir: &std::path::Path, sync: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).unwrap();
    conn.execute_batch(RAW_SCHEMA).unwrap();
    conn.execute_batch(&format!("PRAGMA synchronous = {sync}")).unwrap();
    conn
}

/// The raw equivalent of one local put: outbox row, document, clock, one transaction.
fn raw_put(conn: &rusqlite::Connection, i: u64, doc: &str) {
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.prepare_cached(
        "INSERT INTO outbox (collection, id, kind, doc, lamport, node_id) VALUES ('c', ?1, 'put', ?2, ?3, 'n')",
    )
    .unwrap()
    .execute(rusqlite::params![id(i), doc, i.cast_signed()])
    .unwrap();
    conn.prepare_cached(
        "INSERT INTO docs (collection, id, doc, lamport, node_id, deleted) VALUES ('c', ?1, ?2, ?3, 'n', 0) \
         ON CONFLICT (collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, node_id = excluded.node_id, deleted = 0",
    )
    .unwrap()
    .execute(rusqlite::params![id(i), doc, i.cast_signed()])
    .unwrap();
    conn.prepare_cached("UPDATE clock SET lamport = max(lamport, ?1) WHERE id = 1")
        .unwrap()
        .execute([i.cast_signed()])
        .unwrap();
    conn.execute_batch("COMMIT").unwrap();
}

fn report(name: &str, ours: f64, raw: Option<f64>, unit: &str, target: &str) -> serde_json::Value {
    let ratio = raw.map(|r| ours / r);
    println!(
        "{name:<44} {ours:>12.0} {unit:<8} raw {:>12} ratio {:>6}   target: {target}",
        raw.map_or("-".into(), |r| format!("{r:.0}")),
        ratio.map_or("-".into(), |r| format!("{r:.2}x")),
    );
    json!({"name": name, "tide": ours, "raw": raw, "unit": unit, "ratio": ratio, "target": target})
}

async fn t1_put_full(results: &mut Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let store = OpenOptions::new().durability(Durability::Full).open(dir.path().join("s.db")).await.unwrap();
    let d = doc200(0);
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < secs() {
        store.put("c", &id(n), d.clone()).await.unwrap();
        n += 1;
    }
    let ours = n as f64 / start.elapsed().as_secs_f64();
    let text = serde_json::to_string(&d).unwrap();
    let raw_rate = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let conn = raw(dir.path(), "FULL");
        let (mut n, start) = (0u64, Instant::now());
        while start.elapsed() < secs() {
            raw_put(&conn, n + 1, &text);
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
    .await
    .unwrap();
    results.push(report("T1 one put, FULL", ours, Some(raw_rate), "puts/s", ">= 0.6x raw"));
}

async fn t2_concurrent_normal(results: &mut Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let store = OpenOptions::new().durability(Durability::Normal).open(dir.path().join("s.db")).await.unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let (store, count) = (store.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                let d = doc200(t);
                let mut i = 0;
                while start.elapsed() < secs() {
                    store.put("c", &format!("{t}-{i}"), d.clone()).await.unwrap();
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let ours = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    results.push(report("T2 32 tasks putting, NORMAL", ours, None, "puts/s", ">= 50,000/s"));
}

fn page(base: u64) -> Vec<Change> {
    // 5,000 new ids and 5,000 existing ones: a quarter each newer, older,
    // tied and winning on node id, tied and losing; 10% tombstones.
    (0..10_000u64)
        .map(|i| {
            let (key, lamport, node) = if i < 5_000 {
                (base + 10_000 + i, 20, "m")
            } else {
                let k = i - 5_000;
                match k % 4 {
                    0 => (k, 20, "m"),
                    1 => (k, 5, "m"),
                    2 => (k, 10, "z"),
                    _ => (k, 10, "a"),
                }
            };
            let payload = if i % 10 == 0 { Payload::Delete } else { Payload::Put(doc200(i)) };
            Change { collection: "c".into(), id: id(key), stamp: Stamp::new(lamport, node), payload, seq: i + 1 }
        })
        .collect()
}

async fn t3_apply_page(results: &mut Vec<serde_json::Value>) {
    let reps: usize = 4;
    let mut ours = Vec::new();
    let mut raws = Vec::new();
    for rep in 0..reps as u64 {
        let dir = tempfile::tempdir().unwrap();
        let store = OpenOptions::new().durability(Durability::Normal).open(dir.path().join("s.db")).await.unwrap();
        let fixture: Vec<Change> = (0..10_000u64)
            .map(|k| Change {
                collection: "c".into(),
                id: id(k),
                stamp: Stamp::new(10, "m"),
                payload: Payload::Put(doc200(k)),
                seq: k + 1,
            })
            .collect();
        store.apply_page(fixture, Cursor(10_000)).await.unwrap();
        let p = page(rep);
        let start = Instant::now();
        let applied = store.apply_page(p, Cursor(20_000)).await.unwrap();
        ours.push(10_000.0 / start.elapsed().as_secs_f64());
        assert_eq!(applied.len(), 7_500, "5,000 new + 1,250 newer + 1,250 tie-winners");
        store.close().await;

        raws.push(
            tokio::task::spawn_blocking(move || {
                let dir = tempfile::tempdir().unwrap();
                let mut conn = raw(dir.path(), "NORMAL");
                let tx = conn.transaction().unwrap();
                for k in 0..10_000u64 {
                    tx.execute("INSERT INTO docs VALUES ('c', ?1, ?2, 10, 'm', 0)", rusqlite::params![id(k), serde_json::to_string(&doc200(k)).unwrap()]).unwrap();
                }
                tx.commit().unwrap();
                let p = page(rep);
                let start = Instant::now();
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
                {
                    let mut st = tx
                        .prepare_cached(
                            "INSERT INTO docs (collection, id, doc, lamport, node_id, deleted) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                             ON CONFLICT (collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, \
                             node_id = excluded.node_id, deleted = excluded.deleted \
                             WHERE (excluded.lamport, excluded.node_id) > (docs.lamport, docs.node_id)",
                        )
                        .unwrap();
                    for c in &p {
                        let doc = c.payload.doc().map(|d| serde_json::to_string(d).unwrap());
                        st.execute(rusqlite::params![c.collection, c.id, doc, c.stamp.lamport.cast_signed(), c.stamp.node_id, doc.is_none()]).unwrap();
                    }
                }
                tx.execute("UPDATE clock SET lamport = max(lamport, 20) WHERE id = 1", []).unwrap();
                tx.commit().unwrap();
                10_000.0 / start.elapsed().as_secs_f64()
            })
            .await
            .unwrap(),
        );
    }
    ours.sort_by(f64::total_cmp);
    raws.sort_by(f64::total_cmp);
    results.push(report(
        "T3 apply a 10,000-change page",
        ours[reps / 2],
        Some(raws[reps / 2]),
        "rows/s",
        ">= 185,000/s",
    ));
}

async fn t4_gets(results: &mut Vec<serde_json::Value>, python: Option<f64>) {
    const DOCS: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = OpenOptions::new().durability(Durability::Normal).readers(8).open(&path).await.unwrap();
    for chunk in (0..DOCS).collect::<Vec<_>>().chunks(4_000) {
        let writes = chunk
            .iter()
            .map(|&i| tide_store::Write { collection: "c".into(), id: id(i), payload: Payload::Put(doc200(i)) })
            .collect();
        store.write(writes).await.unwrap();
    }
    let mut rng = SplitMix64::new(7);
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < secs() {
        assert!(store.get("c", &id(rng.below(DOCS))).await.unwrap().is_some());
        n += 1;
    }
    let single = n as f64 / start.elapsed().as_secs_f64();

    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let (store, count) = (store.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                let mut rng = SplitMix64::new(t);
                while start.elapsed() < secs() {
                    assert!(store.get("c", &id(rng.below(DOCS))).await.unwrap().is_some());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let eight = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    store.close().await;

    let raw_single = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mut st = conn
            .prepare_cached("SELECT doc FROM tide_docs WHERE collection = 'c' AND id = ?1 AND deleted = 0")
            .unwrap();
        let mut rng = SplitMix64::new(7);
        let (mut n, start) = (0u64, Instant::now());
        while start.elapsed() < secs() {
            let d: String = st.query_row([id(rng.below(DOCS))], |r| r.get(0)).unwrap();
            let _: Doc = serde_json::from_str(&d).unwrap();
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
    .await
    .unwrap();
    let target = python.map_or("the original's rate (not measured: set TIDE_PYTHON)".into(), |p| {
        format!(">= original Python {p:.0}/s")
    });
    results.push(report("T4 get by key, 1 task", single, Some(raw_single), "gets/s", &target));
    results.push(report("T4 get by key, 8 tasks", eight, None, "gets/s", ">= 40,000/s"));
}

/// The original Python tide 0.2.1's get rate on the same data shape.
fn python_gets() -> Option<f64> {
    let python = std::env::var("TIDE_PYTHON").ok()?;
    let script = r#"
import asyncio, os, random, sys, tempfile, time
from tide import Tide
async def main():
    path = os.path.join(tempfile.mkdtemp(), "py.db")
    async with Tide(db_path=path, node_id="n") as t:
        c = t.collection("c")
        docs = 20000
        store = t._store
        conn = store._conn
        conn.execute("BEGIN")
        for i in range(docs):
            conn.execute("INSERT INTO tide_docs VALUES ('c', ?, ?, 1, 'n', 0)", (f"{i:026}", '{"title": "document number %d", "body": "%s", "n": %d}' % (i, "x" * 150, i)))
        conn.execute("COMMIT")
        rnd = random.Random(7)
        n, start, secs = 0, time.perf_counter(), float(os.environ.get("TIDE_BENCH_SECS", "2"))
        while time.perf_counter() - start < secs:
            assert await c.get(f"{rnd.randrange(docs):026}") is not None
            n += 1
        print(n / (time.perf_counter() - start))
asyncio.run(main())
"#;
    let out = std::process::Command::new(python).args(["-c", script]).output().ok()?;
    if !out.status.success() {
        eprintln!("original tide not measured: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() {
    let rt = if std::env::var("TIDE_BENCH_RT").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    };
    let python = python_gets();
    if let Some(p) = python {
        println!("original Python tide 0.2.1 get by key, 1 task: {p:.0} gets/s");
    }
    let only = std::env::var("TIDE_BENCH_ONLY").unwrap_or_default();
    let results = rt.block_on(async {
        let mut results = Vec::new();
        t1_put_full(&mut results).await;
        if only == "t1" {
            return results;
        }
        t2_concurrent_normal(&mut results).await;
        t3_apply_page(&mut results).await;
        t4_gets(&mut results, python).await;
        results
    });
    let sqlite = rt.block_on(async { Store::open_in_memory().await.unwrap().sqlite_version().await.unwrap() });
    let out = json!({"sqlite": sqlite, "python_gets_per_s": python, "results": results});
    let path = std::env::var("TIDE_BENCH_JSON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-store.json").into());
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("written to {path}");
}
