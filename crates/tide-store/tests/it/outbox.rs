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
