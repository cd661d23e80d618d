//! Bounded storage on the client (PROTOCOL.md §14): each op carries the
//! seq of the server version it was edited from; tombstones follow the
//! server's horizon; versions the server dropped as deleted go.

use serde_json::json;
use tide_core::{Change, Cursor, DocKey, Payload, Stamp};
use tide_store::{Ack, Acked, Committed, OpenOptions, Origin};

use crate::doc;

fn change(id: &str, lamport: u64, payload: Payload, seq: u64) -> Change {
    Change { collection: "c".into(), id: id.into(), stamp: Stamp::new(lamport, "server"), payload, seq }
}

fn put(n: i64) -> Payload {
    Payload::Put(doc(json!({ "n": n })))
}

#[tokio::test]
async fn an_op_carries_the_seq_of_the_server_version_it_edits() {
    let store = OpenOptions::new().node_id("me").open_in_memory().await.unwrap();
    store.apply_page(vec![change("x", 1, put(1), 7), change("gone", 2, put(1), 8)], Cursor(8)).await.unwrap();
    store.apply_page(vec![change("gone", 3, Payload::Delete, 9)], Cursor(9)).await.unwrap();
    store.put("c", "x", doc(json!({"n": 2}))).await.unwrap(); // an edit of seq 7
    store.put("c", "x", doc(json!({"n": 3}))).await.unwrap(); // an edit of that edit: still from 7
    store.put("c", "new", doc(json!({}))).await.unwrap(); // a new document
    store.put("c", "gone", doc(json!({}))).await.unwrap(); // made again after its deletion
    store.delete("c", "x").await.unwrap(); // a delete needs no base
    let bases: Vec<Option<u64>> = store.pending(10).await.unwrap().iter().map(|p| p.base).collect();
    assert_eq!(bases, [Some(7), Some(7), None, None, None]);

    // Once the server stored an edit, the next edit is of that version.
    let pending = store.pending(10).await.unwrap();
    store.settle_acks(vec![Ack { seq: pending[2].seq, acked: Acked::Applied(12) }], vec![]).await.unwrap();
    store.put("c", "new", doc(json!({"n": 1}))).await.unwrap();
    let last = store.pending(10).await.unwrap().pop().unwrap();
    assert_eq!((last.op.id.as_str(), last.base), ("new", Some(12)));
}

#[tokio::test]
async fn tombstones_go_once_the_servers_horizon_passes_them_unless_an_op_needs_them() {
    let store = OpenOptions::new().node_id("me").open_in_memory().await.unwrap();
    let page = vec![
        change("a", 1, put(1), 1),
        change("b", 1, put(1), 2),
        change("c", 1, put(1), 3),
        change("a", 2, Payload::Delete, 4),
        change("b", 2, Payload::Delete, 5),
        change("c", 2, Payload::Delete, 9),
    ];
    store.apply_page(page, Cursor(9)).await.unwrap();
    store.delete("c", "b").await.unwrap(); // a pending op on b's key
    assert_eq!(store.collect_tombstones(5).await.unwrap(), 1, "a goes; b is pending; c is above the horizon");
    assert_eq!(store.version("c", "a").await.unwrap(), None);
    assert!(store.version("c", "b").await.unwrap().is_some());
    assert!(store.version("c", "c").await.unwrap().is_some());
    // The deletion of a document never held here is not stored at all.
    store.apply_page(vec![change("never", 3, Payload::Delete, 10)], Cursor(10)).await.unwrap();
    assert_eq!(store.version("c", "never").await.unwrap(), None);
}

#[tokio::test]
async fn a_version_the_server_dropped_as_deleted_goes_and_the_watchers_hear_it() {
    let (seen_tx, seen) = std::sync::mpsc::channel::<Vec<Committed>>();
    let listener: tide_store::CommitListener = std::sync::Arc::new(move |c| {
        let _ = seen_tx.send(c);
    });
    let store = OpenOptions::new().node_id("me").on_commit(listener).open_in_memory().await.unwrap();
    store.apply_page(vec![change("x", 1, put(1), 1), change("y", 1, put(1), 2)], Cursor(2)).await.unwrap();
    let before = store.settled_roots().await.unwrap();
    let stamp = store.put("c", "x", doc(json!({"n": 2}))).await.unwrap();
    let pending = store.pending(10).await.unwrap();
    while seen.try_recv().is_ok() {}
    store.settle_acks(vec![Ack { seq: pending[0].seq, acked: Acked::Deleted }], vec![]).await.unwrap();
    assert_eq!(store.version("c", "x").await.unwrap(), None, "no version, not even a tombstone");
    assert_eq!(store.pending_count().await.unwrap(), 0);
    let told = seen.try_recv().unwrap();
    assert_eq!((told[0].id.as_str(), told[0].doc.is_none(), told[0].origin), ("x", true, Origin::Reverted));
    assert_eq!(told[0].stamp, stamp);
    assert_ne!(store.settled_roots().await.unwrap(), before, "x left the digests");
    // A repair's version dropped the same way, only while it is still the key's version.
    store.forget_deleted(vec![(DocKey("c".into(), "y".into()), Stamp::new(9, "server"))]).await.unwrap();
    assert!(store.version("c", "y").await.unwrap().is_some(), "another version stays");
    store.forget_deleted(vec![(DocKey("c".into(), "y".into()), Stamp::new(1, "server"))]).await.unwrap();
    assert_eq!(store.version("c", "y").await.unwrap(), None);
    assert_eq!(store.settled_roots().await.unwrap(), Some(std::collections::BTreeMap::new()), "nothing live is left");
}

#[tokio::test]
async fn the_head_a_store_began_again_at_is_kept() {
    let (_dir, path, store) = crate::temp_store(OpenOptions::new()).await;
    assert_eq!(store.from_head(), None);
    store.set_from_head(41).await.unwrap();
    store.close().await;
    let store = OpenOptions::new().open(&path).await.unwrap();
    assert_eq!(store.from_head(), Some(41));
}
