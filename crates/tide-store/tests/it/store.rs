//! Local writes and reads, settings, node id and the clock.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use tide_core::{Payload, Stamp};
use tide_store::{Durability, Error, OpenOptions, Store, Write};

use crate::{doc, temp_store};

#[tokio::test]
async fn put_get_delete_and_tombstones_are_never_documents() {
    let store = Store::open_in_memory().await.unwrap();
    let s1 = store.put("notes", "a", doc(json!({"t": 1}))).await.unwrap();
    assert_eq!(store.get("notes", "a").await.unwrap(), Some(doc(json!({"t": 1}))));
    assert_eq!(store.get("notes", "missing").await.unwrap(), None);
    assert_eq!(store.get("other", "a").await.unwrap(), None, "collections are separate");
    let s2 = store.delete("notes", "a").await.unwrap();
    assert!(s2 > s1);
    assert_eq!(store.get("notes", "a").await.unwrap(), None);
    assert_eq!(store.count("notes").await.unwrap(), 0);
    assert!(store.list("notes", None, 10).await.unwrap().is_empty());
    let v = store.version("notes", "a").await.unwrap().unwrap();
    assert_eq!((v.stamp, v.payload), (s2, Payload::Delete));
    // Re-create after delete.
    store.put("notes", "a", doc(json!({"t": 2}))).await.unwrap();
    assert_eq!(store.get("notes", "a").await.unwrap(), Some(doc(json!({"t": 2}))));
}

#[tokio::test]
async fn documents_keep_their_content_exactly() {
    let store = Store::open_in_memory().await.unwrap();
    let d = doc(
        json!({"z": 1, "a": [1, 2.5, "é\"\\\u{0}"], "nested": {"deep": null, "b": true}, "big": 9_007_199_254_740_993_u64}),
    );
    store.put("c", "k", d.clone()).await.unwrap();
    let back = store.get("c", "k").await.unwrap().unwrap();
    assert_eq!(back, d);
    assert_eq!(back.to_map().keys().collect::<Vec<_>>(), ["z", "a", "nested", "big"], "key order kept");
}

#[tokio::test]
async fn list_pages_by_id_and_count_skips_tombstones() {
    let store = Store::open_in_memory().await.unwrap();
    for i in (0..25).rev() {
        store.put("c", &format!("id{i:02}"), doc(json!({"i": i}))).await.unwrap();
    }
    store.delete("c", "id03").await.unwrap();
    store.put("d", "id00", doc(json!({}))).await.unwrap();
    assert_eq!(store.count("c").await.unwrap(), 24);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list("c", after.as_deref(), 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = Some(page.last().unwrap().0.clone());
        seen.extend(page.into_iter().map(|(id, d)| (id, d.to_map()["i"].as_i64().unwrap())));
    }
    let expected: Vec<_> = (0..25).filter(|i| *i != 3).map(|i| (format!("id{i:02}"), i)).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_specific_error_and_nothing_is_written() {
    let store = Store::open_in_memory().await.unwrap();
    for (collection, id) in [("", "x"), ("a/b", "x"), ("c", ""), ("c", "bad\nid")] {
        let err = store.put(collection, id, doc(json!({}))).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{collection:?}/{id:?}: {err}");
    }
    let writes = vec![
        Write { collection: "c".into(), id: "ok".into(), payload: Payload::Put(doc(json!({}))) },
        Write { collection: "c".into(), id: String::new(), payload: Payload::Delete },
    ];
    assert!(matches!(store.write(writes).await, Err(Error::Invalid(_))));
    assert_eq!((store.pending_count().await.unwrap(), store.count("c").await.unwrap()), (0, 0));
}

#[tokio::test]
async fn several_writes_commit_atomically_with_increasing_stamps() {
    let store = Store::open_in_memory().await.unwrap();
    let writes = vec![
        Write { collection: "a".into(), id: "1".into(), payload: Payload::Put(doc(json!({"v": 1}))) },
        Write { collection: "b".into(), id: "2".into(), payload: Payload::Put(doc(json!({"v": 2}))) },
        Write { collection: "a".into(), id: "1".into(), payload: Payload::Delete },
    ];
    let stamps = store.write(writes).await.unwrap();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(store.get("a", "1").await.unwrap(), None, "the last write to a key wins");
    assert_eq!(store.get("b", "2").await.unwrap(), Some(doc(json!({"v": 2}))));
    assert_eq!(store.pending_count().await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_unique_strictly_increasing_stamps() {
    let (_dir, _path, store) = temp_store(OpenOptions::new().durability(Durability::Normal)).await;
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut stamps = Vec::new();
                for i in 0..40 {
                    stamps.push(store.put("c", &format!("{t}-{i}"), doc(json!({"t": t}))).await.unwrap());
                }
                stamps
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let stamps = task.await.unwrap();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "each task sees its stamps increase");
        all.extend(stamps);
    }
    let unique: BTreeSet<_> = all.iter().map(|s| s.lamport).collect();
    assert_eq!(unique.len(), 32 * 40, "no counter issued twice");
    // The outbox holds them in commit order, which is stamp order.
    let pending = store.pending(10_000).await.unwrap();
    assert_eq!(pending.len(), 32 * 40);
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq && w[0].op.stamp < w[1].op.stamp));
    assert_eq!(store.lamport().await.unwrap(), *unique.last().unwrap());
}

#[tokio::test]
async fn every_connection_runs_with_the_asked_settings() {
    for (durability, sync) in [(Durability::Full, 2), (Durability::Normal, 1)] {
        let options = OpenOptions::new().durability(durability).readers(3).busy_timeout(Duration::from_millis(1234));
        let (_dir, _path, store) = temp_store(options).await;
        let settings = store.connection_settings().await.unwrap();
        assert_eq!(settings.len(), 4, "the writer and three readers");
        for s in settings {
            assert_eq!(s.journal_mode, "wal");
            assert_eq!(s.synchronous, sync);
            assert_eq!(s.foreign_keys, 1);
            assert_eq!(s.busy_timeout, Duration::from_millis(1234));
        }
    }
    let (_dir, _path, store) = temp_store(OpenOptions::new()).await;
    assert!(store.connection_settings().await.unwrap().iter().all(|s| s.synchronous == 2), "FULL is the default");
}

#[tokio::test]
async fn the_bundled_sqlite_has_the_wal_reset_fix() {
    let store = Store::open_in_memory().await.unwrap();
    let version = store.sqlite_version().await.unwrap();
    let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert!((parts[0], parts[1], parts[2]) >= (3, 51, 3), "SQLite {version} predates 3.51.3");
}

#[tokio::test]
async fn the_node_id_is_generated_once_and_kept() {
    let (_dir, path, store) = temp_store(OpenOptions::new()).await;
    let id = store.node_id();
    assert_eq!(id.len(), 26, "a ULID: {id}");
    store.close().await;
    drop(store);
    let again = Store::open(&path).await.unwrap();
    assert_eq!(again.node_id(), id);
    again.close().await;
    drop(again);
    let same = OpenOptions::new().node_id(id.clone()).open(&path).await.unwrap();
    assert_eq!(same.node_id(), id);
    same.close().await;
    drop(same);
    match OpenOptions::new().node_id("someone-else").open(&path).await {
        Err(Error::NodeIdMismatch { stored, requested }) => {
            assert_eq!((stored, requested.as_str()), (id, "someone-else"));
        }
        other => panic!("expected a node id mismatch, got {other:?}"),
    }
    let chosen = OpenOptions::new().node_id("my-node").open_in_memory().await.unwrap();
    assert_eq!(chosen.node_id(), "my-node");
}

#[tokio::test]
async fn the_clock_dominates_after_a_restart() {
    let (_dir, path, store) = temp_store(OpenOptions::new()).await;
    let mut last = Stamp::new(0, "");
    for i in 0..5 {
        last = store.put("c", &i.to_string(), doc(json!({}))).await.unwrap();
    }
    store.close().await;
    drop(store);
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.lamport().await.unwrap(), last.lamport);
    let next = store.put("c", "after", doc(json!({}))).await.unwrap();
    assert!(next > last, "{next:?} must beat {last:?}");
}

#[tokio::test]
async fn a_closed_store_refuses_writes() {
    let store = Store::open_in_memory().await.unwrap();
    let clone = store.clone();
    store.close().await;
    assert!(matches!(clone.put("c", "x", doc(json!({}))).await, Err(Error::Closed)));
}

/// Space freed by deleted documents (once their ops are acknowledged) goes
/// back to the file system a step at a time; a file made before incremental
/// vacuum is converted when opened.
#[tokio::test]
async fn freed_space_goes_back_to_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    rusqlite::Connection::open(&path).unwrap().execute_batch("CREATE TABLE leftover (x)").unwrap();
    let pages = || {
        let c = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mode: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
        let count: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        (mode, count)
    };
    let store = Store::open(&path).await.unwrap();
    assert_eq!(pages().0, 2, "converted to incremental vacuum");
    let acknowledge_all = || async {
        let acked = store.pending(10_000).await.unwrap().into_iter().map(|p| p.seq).collect();
        store.settle(acked, Vec::new()).await.unwrap();
    };
    for i in 0..200 {
        store.put("notes", &format!("k{i}"), doc(json!({"blob": "x".repeat(48 * 1024)}))).await.unwrap();
    }
    acknowledge_all().await;
    let full = pages().1;
    for i in 0..200 {
        store.delete("notes", &format!("k{i}")).await.unwrap();
    }
    acknowledge_all().await;
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..tide_store::VACUUM_CHECK_BATCHES {
            store.put("small", &format!("s{n}"), doc(json!({"n": n}))).await.unwrap();
            n += 1;
        }
        if pages().1 <= full - 2 * tide_store::VACUUM_PAGES_PER_STEP {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the file never shrank from {full} pages");
    }
    assert_eq!(store.get("notes", "k0").await.unwrap(), None);
    assert_eq!(store.get("small", "s0").await.unwrap(), Some(doc(json!({"n": 0}))));
    store.close().await;
}
