//! Schema versions: forward migration, refusal of newer files, and files
//! written by the original Python tide 0.2.1.

use serde_json::json;
use tide_core::{Cursor, Payload, Stamp};
use tide_store::{Error, SCHEMA_VERSION, Store};

use crate::doc;

fn copy_fixture(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("original.db");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/original-0.2.1.db"), &path).unwrap();
    path
}

#[tokio::test]
async fn an_original_store_migrates_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_fixture(&dir);
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.node_id(), "original-node", "the original's node id is kept");
    assert_eq!(store.cursor().await.unwrap(), Some(Cursor(4)));
    assert_eq!(store.lamport().await.unwrap(), 5);
    assert_eq!(store.get("notes", "from-other").await.unwrap(), Some(doc(json!({"by": "other", "n": 7}))));
    assert_eq!(store.get("notes", "n2").await.unwrap(), Some(doc(json!({"title": "pending put"}))));
    assert_eq!(store.get("notes", "n1").await.unwrap(), None, "deleted while offline");
    assert_eq!(store.get("notes", "gone").await.unwrap(), None);
    let pending = store.pending(10).await.unwrap();
    assert_eq!(pending.len(), 2, "the pending outbox survives");
    assert_eq!((pending[0].op.id.as_str(), &pending[0].op.stamp), ("n2", &Stamp::new(4, "original-node")));
    assert_eq!((pending[1].op.id.as_str(), &pending[1].op.payload), ("n1", &Payload::Delete));
    // New writes continue the original's clock and outbox sequence.
    let next = store.put("notes", "n3", doc(json!({}))).await.unwrap();
    assert_eq!(next, Stamp::new(6, "original-node"));
    assert!(store.pending(10).await.unwrap()[2].seq > pending[1].seq);
    store.check_integrity().await.unwrap();
    store.close().await;
    drop(store);
    // Opening again is a no-op migration.
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.count("notes").await.unwrap(), 3);
}

#[tokio::test]
async fn a_newer_schema_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    let store = Store::open(&path).await.unwrap();
    store.put("c", "keep", doc(json!({"v": 1}))).await.unwrap();
    store.close().await;
    drop(store);
    set_schema_version(&path, "99").await;
    let err = Store::open(&path).await.unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { found: 99, supported: SCHEMA_VERSION }), "{err}");
    let text = err.to_string();
    assert!(text.contains("schema v99") && text.contains(&format!("v{SCHEMA_VERSION}")), "{text}");
    // Nothing was changed: with the version put back, the data is there.
    set_schema_version(&path, &SCHEMA_VERSION.to_string()).await;
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.get("c", "keep").await.unwrap(), Some(doc(json!({"v": 1}))));
}

async fn set_schema_version(path: &std::path::Path, version: &str) {
    // A separate, plain connection, as another program would.
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(path).connect().await.unwrap();
    sqlx::query("UPDATE tide_meta SET value = ?1 WHERE key = 'schema_version'")
        .bind(version.to_owned())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}
