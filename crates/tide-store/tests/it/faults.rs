//! Storage faults: corrupt and foreign files, a full disk, a lock held by
//! another process.

use std::time::Duration;

use serde_json::json;
use sqlx::{ConnectOptions, Connection};
use tide_store::{Error, OpenOptions, Store};

use crate::{doc, temp_store};

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let text = b"these are my notes, not a database. ".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let err = Store::open(&path).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(std::fs::read(&path).unwrap() == text, "the file is untouched");
}

#[tokio::test]
async fn a_damaged_store_is_refused_not_reset() {
    let (_dir, path, store) = temp_store(OpenOptions::new()).await;
    for i in 0..300 {
        store.put("c", &format!("k{i:04}"), doc(json!({"body": "x".repeat(200)}))).await.unwrap();
    }
    store.close().await;
    drop(store);
    // Garble the middle of the file: b-tree pages, not the header.
    assert!(!path.with_extension("db-wal").exists(), "closing checkpointed the WAL");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 16 * 4096, "the store spans many pages");
    for b in &mut bytes[4 * 4096..12 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(&path).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(std::fs::read(&path).unwrap() == bytes, "nothing was reset");
}

#[tokio::test]
async fn a_full_disk_fails_the_write_atomically_and_recovers() {
    let (_dir, _path, store) = temp_store(OpenOptions::new()).await;
    store.put("c", "before", doc(json!({"v": 1}))).await.unwrap();
    // 1 is below the current size, so the cap becomes the current size.
    let cap = store.set_max_page_count(1).await.unwrap();
    let big = doc(json!({"body": "x".repeat(64 * 1024)}));
    let err = store.put("c", "big", big.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Full), "{err}");
    assert_eq!(store.get("c", "big").await.unwrap(), None);
    assert_eq!(store.pending_count().await.unwrap(), 1, "no outbox row without its document");
    store.check_integrity().await.unwrap();
    // Space returns.
    assert!(store.set_max_page_count(cap * 1000).await.unwrap() > cap);
    store.put("c", "big", big.clone()).await.unwrap();
    assert_eq!(store.get("c", "big").await.unwrap(), Some(big));
    assert_eq!(store.pending_count().await.unwrap(), 2);
}

#[tokio::test]
async fn a_lock_held_elsewhere_is_a_clear_busy_error() {
    let (_dir, path, store) = temp_store(OpenOptions::new().busy_timeout(Duration::from_millis(100))).await;
    let mut other = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut other).await.unwrap();
    let err = store.put("c", "x", doc(json!({}))).await.unwrap_err();
    assert!(matches!(err, Error::Busy), "{err}");
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    store.put("c", "x", doc(json!({}))).await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 1, "the failed write left nothing behind");
}
