//! tide-store's integration tests, one binary.

mod apply;
mod crash;
mod faults;
mod horizon;
mod outbox;
mod query;
mod schema;
mod store;

use tide_core::Doc;
use tide_store::{OpenOptions, Store};

pub(crate) fn doc(v: serde_json::Value) -> Doc {
    match v {
        serde_json::Value::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}

/// A store in a fresh temporary directory, with the directory kept alive.
pub(crate) async fn temp_store(options: OpenOptions) -> (tempfile::TempDir, std::path::PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = options.open(&path).await.unwrap();
    (dir, path, store)
}
