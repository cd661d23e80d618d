//! The outbox: pending ops in order, settling acknowledgements and rejections.

use serde_json::json;
use tide_core::{ErrorCode, Payload};
use tide_store::{Rejection, Store};

use crate::doc;

#[tokio::test]
async fn pending_ops_come_oldest_first_in_bounded_batches() {
    let store = Store::open_in_memory().await.unwrap();
    for i in 0..7 {
        store.put("c", &format!("k{i}"), doc(json!({"i": i}))).await.unwrap();
    }
    store.delete("c", "k0").await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 8);
    let first = store.pending(3).await.unwrap();
    assert_eq!(first.iter().map(|p| p.op.id.as_str()).collect::<Vec<_>>(), ["k0", "k1", "k2"]);
    assert!(first.iter().all(|p| p.op.stamp.node_id == store.node_id()));
    let all = store.pending(100).await.unwrap();
    assert_eq!(all.len(), 8);
    assert_eq!(all[7].op.payload, Payload::Delete, "every write is its own op, in order");
    assert_eq!(all[0].op.payload, Payload::Put(doc(json!({"i": 0}))));
}

#[tokio::test]
async fn acknowledged_ops_leave_and_rejected_ones_are_set_aside() {
    let store = Store::open_in_memory().await.unwrap();
    for i in 0..4 {
        store.put("c", &format!("k{i}"), doc(json!({"i": i}))).await.unwrap();
    }
    let pending = store.pending(10).await.unwrap();
    let rejection = Rejection { seq: pending[1].seq, code: ErrorCode::StampCollision, message: "two writers".into() };
    store.settle(vec![pending[0].seq, pending[2].seq], vec![rejection]).await.unwrap();
    let left = store.pending(10).await.unwrap();
    assert_eq!(left.iter().map(|p| p.seq).collect::<Vec<_>>(), [pending[3].seq], "one bad op does not block the rest");
    let rejected = store.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].seq, &rejected[0].op, rejected[0].code),
        (pending[1].seq, &pending[1].op, ErrorCode::StampCollision)
    );
    assert_eq!(rejected[0].message, "two writers");
    // Settling the same seqs again is harmless.
    store.settle(vec![pending[0].seq], vec![]).await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 1);
    assert_eq!(store.discard_rejected(vec![pending[1].seq]).await.unwrap(), 1);
    assert!(store.rejected().await.unwrap().is_empty());
    // The documents themselves stay as written.
    assert_eq!(store.count("c").await.unwrap(), 4);
}

#[tokio::test]
async fn writes_made_after_a_batch_was_read_are_not_settled_with_it() {
    let store = Store::open_in_memory().await.unwrap();
    store.put("c", "a", doc(json!({}))).await.unwrap();
    let batch = store.pending(10).await.unwrap();
    store.put("c", "a", doc(json!({"newer": true}))).await.unwrap();
    store.settle(batch.iter().map(|p| p.seq).collect(), vec![]).await.unwrap();
    let left = store.pending(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].op.payload, Payload::Put(doc(json!({"newer": true}))));
}

/// A write that must not wait (an event loop's) is refused at once, writing
/// nothing, while another command holds the writer; once the writer is
/// idle it commits on the caller's task like any write, and a write queued
/// the usual way meanwhile still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_if_idle_never_waits_behind_another_command() {
    use std::sync::{Arc, Mutex, mpsc};
    use tide_store::{CommitListener, Committed, OpenOptions, Write};

    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release_tx, release) = mpsc::channel::<()>();
    let release = Mutex::new(release);
    // The listener runs inside the writer: while it waits, the writer is busy.
    let listener: CommitListener = Arc::new(move |changes: Vec<Committed>| {
        if changes.iter().any(|c| c.collection == "slow") {
            entered_tx.send(()).unwrap();
            release.lock().unwrap().recv().unwrap();
        }
    });
    let (_dir, _path, store) = crate::temp_store(OpenOptions::new().on_commit(listener)).await;
    let busy = tokio::spawn({
        let store = store.clone();
        async move { store.put("slow", "a", doc(json!({}))).await }
    });
    tokio::task::spawn_blocking(move || entered.recv().unwrap()).await.unwrap();

    let write =
        |id: &str| Write { collection: "c".into(), id: id.into(), payload: Payload::Put(doc(json!({"id": id}))) };
    // (A write that waited here would wait forever: the listener holds on.)
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), store.write_if_idle(vec![write("x")]))
        .await
        .expect("write_if_idle waited behind the busy writer");
    assert!(refused.is_none(), "refused while the writer is busy");
    assert_eq!(store.version("c", "x").await.unwrap(), None, "nothing was written");
    let queued = tokio::spawn({
        let store = store.clone();
        async move { store.write(vec![write("y")]).await }
    });
    release_tx.send(()).unwrap();
    busy.await.unwrap().unwrap();
    let queued = queued.await.unwrap().unwrap();

    // The writer may still be finishing its last batch (its answers go out
    // before it lets go of the role): it takes the write once it is idle.
    let now = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            if let Some(written) = store.write_if_idle(vec![write("x")]).await {
                break written;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the writer went idle")
    .unwrap();
    assert!(now[0] > queued[0], "stamped after every earlier write");
    assert_eq!(store.get("c", "x").await.unwrap(), Some(doc(json!({"id": "x"}))));
    let pending: Vec<_> = store.pending(10).await.unwrap().into_iter().map(|p| p.op.id).collect();
    assert_eq!(pending, ["a", "y", "x"], "all three are in the outbox, in commit order");
    // The limits apply as to any write.
    let empty_id = Write { collection: "c".into(), id: String::new(), payload: Payload::Delete };
    assert!(store.write_if_idle(vec![empty_id]).await.expect("idle").is_err());
}

/// The writer connection never checkpoints inside a commit (SQLite's
/// automatic checkpoint would run on whichever caller crossed its line);
/// the writer checkpoints between batches every `CHECKPOINT_OPS` ops, in a
/// task of its own when the batch ran on a caller's task. So the log stays
/// about one checkpoint's worth: 2,000 writes without one fill ~60 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_between_batches() {
    use tide_store::{Durability, OpenOptions, Write};

    let (_dir, path, store) = crate::temp_store(OpenOptions::new().durability(Durability::Normal)).await;
    for i in 0..2_000 {
        let id = format!("k{i:05}");
        let write =
            vec![Write { collection: "c".into(), id, payload: Payload::Put(doc(json!({"body": "x".repeat(200)}))) }];
        match store.write_if_idle(write.clone()).await {
            Some(done) => drop(done.unwrap()),
            None => drop(store.write(write).await.unwrap()),
        }
    }
    let log = std::fs::metadata(path.with_extension("db-wal")).unwrap().len();
    assert!(log < 16 << 20, "the log grew to {log} bytes");
    assert_eq!(store.count("c").await.unwrap(), 2_000);
}
