//! The reference model's semantics, one rule at a time.

use serde_json::json;
use tide_core::{Cursor, ErrorCode, Limits, Model, Op, OpResult, Payload, Stamp, SyncRequest, SyncResponse};

use crate::doc;

fn put(id: &str, lamport: u64, node: &str, n: i64) -> Op {
    Op {
        collection: "c".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc(json!({ "n": n }))),
        op_id: None,
    }
}

fn delete(id: &str, lamport: u64, node: &str) -> Op {
    Op { payload: Payload::Delete, ..put(id, lamport, node, 0) }
}

fn sync(model: &mut Model, node: &str, cursor: Option<u64>, ops: Vec<Op>) -> SyncResponse {
    let mut req = SyncRequest::new(node, cursor.map(Cursor));
    req.ops = ops;
    model.exchange(&req).unwrap()
}

fn ids(resp: &SyncResponse) -> Vec<(&str, u64)> {
    resp.changes.iter().map(|c| (c.id.as_str(), c.seq)).collect()
}

#[test]
fn every_op_gets_its_result() {
    let mut m = Model::new(Limits::default());
    let r = sync(&mut m, "a", None, vec![put("x", 2, "a", 1), put("y", 1, "a", 1)]);
    assert_eq!(r.results, [OpResult::Applied { seq: 1 }, OpResult::Applied { seq: 2 }]);
    let r = sync(&mut m, "b", None, vec![put("x", 1, "b", 9), put("x", 2, "b", 9)]);
    assert_eq!(r.results, [OpResult::Superseded { lamport: 2, node_id: "a".into() }, OpResult::Applied { seq: 3 }]);
    // A retry of an applied op is a duplicate; a retry of a beaten one, superseded.
    let r = sync(&mut m, "a", Some(3), vec![put("y", 1, "a", 1), put("x", 2, "a", 1)]);
    assert_eq!(r.results, [OpResult::Duplicate, OpResult::Superseded { lamport: 2, node_id: "b".into() }]);
    // The same stamp with another payload is a collision, never a silent drop.
    let r = sync(&mut m, "a", Some(3), vec![put("y", 1, "a", 2)]);
    assert!(matches!(&r.results[..], [OpResult::Rejected { code: ErrorCode::StampCollision, .. }]));
    assert_eq!(m.seq(), 3, "seq moves only for applied ops");
}

#[test]
fn changes_are_compacted_per_key_in_seq_order() {
    let mut m = Model::new(Limits::default());
    sync(&mut m, "a", None, vec![put("n1", 1, "a", 1), put("n2", 2, "a", 1), delete("n1", 3, "a")]);
    let r = sync(&mut m, "b", None, vec![]);
    assert_eq!(ids(&r), [("n2", 2), ("n1", 3)]);
    assert_eq!(r.changes[1].payload, Payload::Delete);
    assert_eq!((r.cursor, r.has_more), (Cursor(3), false));
    let r = sync(&mut m, "b", Some(3), vec![]);
    assert_eq!((r.changes.len(), r.cursor), (0, Cursor(3)), "no changes: the cursor stays");
}

#[test]
fn pages_are_bounded_by_count_and_bytes() {
    let mut m = Model::new(Limits { changes_per_response_max: 3, ..Limits::default() });
    sync(&mut m, "a", None, (1..=7).map(|i| put(&format!("k{i}"), i, "a", 0)).collect());
    let mut cursor = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let mut req = SyncRequest::new("b", cursor.map(Cursor));
        req.limit = Some(1000); // asks for more than the server allows
        let r = m.exchange(&req).unwrap();
        assert!(r.changes.len() <= 3);
        seen.extend(r.changes.iter().map(|c| c.seq));
        cursor = Some(r.cursor.seq());
        pages += 1;
        if !r.has_more {
            break;
        }
    }
    assert_eq!((seen, pages), ((1..=7).collect::<Vec<_>>(), 3));

    // By bytes: each change here is 89 bytes of JSON (+1 for the comma), so 200 bytes hold two.
    let m2 = {
        let mut m2 = Model::new(Limits { response_bytes_max: 200, ..Limits::default() });
        sync(&mut m2, "a", None, (1..=5).map(|i| put(&format!("k{i}"), i, "a", 0)).collect());
        m2
    };
    let page = m2.page(Cursor::START, None, 100);
    assert_eq!((page.changes.len(), page.cursor, page.has_more), (2, Cursor(2), true));
    // A change larger than the byte cap still goes out, alone.
    let mut m3 = Model::new(Limits { response_bytes_max: 10, ..Limits::default() });
    sync(&mut m3, "a", None, vec![put("big", 1, "a", 1), put("big2", 2, "a", 1)]);
    let page = m3.page(Cursor::START, None, 100);
    assert_eq!((page.changes.len(), page.has_more), (1, true));
}

#[test]
fn a_client_past_the_start_is_not_sent_its_own_writes_but_a_wiped_one_is() {
    let mut m = Model::new(Limits::default());
    let r = sync(&mut m, "a", None, vec![put("mine", 1, "a", 1)]);
    assert_eq!(ids(&r), [("mine", 1)], "a fresh client gets everything");
    sync(&mut m, "b", None, vec![put("theirs", 1, "b", 1)]);
    let r = sync(&mut m, "a", Some(1), vec![put("mine2", 2, "a", 1)]);
    assert_eq!(ids(&r), [("theirs", 2)], "own writes are skipped...");
    assert_eq!(r.cursor, Cursor(3), "...but the cursor passes them");
    // The original lost a reinstalled client's data (quirk 1); here a wiped
    // store coming back with its old node id gets everything.
    let r = sync(&mut m, "a", None, vec![]);
    assert_eq!(ids(&r), [("mine", 1), ("theirs", 2), ("mine2", 3)]);
}

#[test]
fn a_cursor_from_a_lost_server_state_is_reset() {
    let mut m = Model::new(Limits::default());
    sync(&mut m, "a", None, vec![put("x", 1, "a", 1)]);
    let r = sync(&mut m, "b", Some(57), vec![]);
    assert!(r.reset);
    assert_eq!((ids(&r), r.cursor), (vec![("x", 1)], Cursor(1)));
    assert!(!sync(&mut m, "b", Some(1), vec![]).reset);
}

#[test]
fn a_bad_op_refuses_the_whole_request() {
    let mut m = Model::new(Limits::default());
    let mut req = SyncRequest::new("a", None);
    req.ops = vec![put("x", 1, "a", 1), put("y", 1, "intruder", 1)];
    let err = m.exchange(&req).unwrap_err();
    assert_eq!((err.code, err.op), (ErrorCode::ForeignNodeId, Some(1)));
    assert_eq!((m.seq(), m.rows().count()), (0, 0), "nothing applied");
}

#[test]
fn a_counter_far_ahead_of_the_highest_seen_is_refused() {
    let mut m = Model::new(Limits { lamport_lead_max: 100, ..Limits::default() });
    sync(&mut m, "a", None, vec![put("x", 50, "a", 1)]);
    let mut req = SyncRequest::new("b", None);
    req.ops = vec![put("y", 150, "b", 1), put("x", 151, "b", 1)];
    let err = m.exchange(&req).unwrap_err();
    assert_eq!((err.code, err.op), (ErrorCode::LamportOutOfRange, Some(1)));
    assert_eq!(m.row("c", "x").unwrap().stamp, Stamp::new(50, "a"), "the key is not poisoned");
    assert_eq!(m.lamport_max(), 50);
    sync(&mut m, "b", None, vec![put("x", 150, "b", 1)]);
    assert_eq!(m.lamport_max(), 150);
}

#[test]
fn delete_then_recreate_and_no_resurrection() {
    let mut m = Model::new(Limits::default());
    sync(&mut m, "a", None, vec![put("x", 1, "a", 1), delete("x", 2, "a")]);
    let r = sync(&mut m, "b", None, vec![put("x", 1, "b", 7)]);
    assert_eq!(r.results, [OpResult::Superseded { lamport: 2, node_id: "a".into() }]);
    assert_eq!(m.row("c", "x").unwrap().payload, Payload::Delete);
    sync(&mut m, "b", None, vec![put("x", 3, "b", 8)]);
    assert_eq!(m.row("c", "x").unwrap().payload, Payload::Put(doc(json!({"n": 8}))));
}

/// PROTOCOL.md §11, first example and its retry, byte for byte.
#[test]
fn the_worked_examples_of_protocol_md() {
    let mut m = Model::new(Limits::default());
    let body = r#"{"node_id":"A","cursor":null,"ops":[
     {"collection":"notes","id":"n1","kind":"put","doc":{"title":"Hello"},"lamport":1,"node_id":"A"},
     {"collection":"notes","id":"n2","kind":"put","doc":{"title":"Two"},"lamport":2,"node_id":"A"},
     {"collection":"notes","id":"n1","kind":"delete","doc":null,"lamport":3,"node_id":"A"}],
   "protocol":1}"#;
    let req = SyncRequest::from_json(body.as_bytes()).unwrap();
    let resp = serde_json::to_string(&m.exchange(&req).unwrap()).unwrap();
    assert_eq!(
        resp,
        concat!(
            r#"{"cursor":"3","changes":["#,
            r#"{"collection":"notes","id":"n2","kind":"put","doc":{"title":"Two"},"lamport":2,"node_id":"A","seq":2},"#,
            r#"{"collection":"notes","id":"n1","kind":"delete","doc":null,"lamport":3,"node_id":"A","seq":3}],"#,
            r#""protocol":1,"#,
            r#""results":[{"status":"applied","seq":1},{"status":"applied","seq":2},{"status":"applied","seq":3}]}"#
        )
    );
    let retry = m.exchange(&req).unwrap();
    assert_eq!(
        retry.results,
        [OpResult::Superseded { lamport: 3, node_id: "A".into() }, OpResult::Duplicate, OpResult::Duplicate]
    );
    let b = r#"{"node_id":"B","cursor":null,"ops":[{"collection":"notes","id":"n2","kind":"put","doc":{"title":"B's"},"lamport":1,"node_id":"B"}],"protocol":1}"#;
    let resp = m.exchange(&SyncRequest::from_json(b.as_bytes()).unwrap()).unwrap();
    assert_eq!(resp.results, [OpResult::Superseded { lamport: 2, node_id: "A".into() }]);
    assert_eq!(resp.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [2, 3]);
    let err = SyncRequest::from_json(br#"{"node_id":"A","cursor":"abc"}"#).unwrap_err();
    assert_eq!(
        serde_json::to_string(&err.to_body()).unwrap(),
        r#"{"error":"bad request: invalid cursor \"abc\": expected a decimal string at line 1 column 29","code":"invalid_request"}"#
    );
}

/// A namespace where x (seq 1) and y (seq 2) were put, x deleted (seq 3),
/// and z put (seq 4): x's tombstone is the only one.
fn with_a_deletion() -> Model {
    let mut m = Model::new(Limits::default());
    sync(&mut m, "a", None, vec![put("x", 1, "a", 1), put("y", 2, "a", 1), delete("x", 3, "a"), put("z", 4, "a", 1)]);
    m
}

#[test]
fn collection_removes_tombstones_up_to_the_horizon_only() {
    let mut m = with_a_deletion();
    assert_eq!(m.collect(2), 0, "no tombstone at or below seq 2");
    assert_eq!(m.horizon().seq, 2);
    assert_eq!(m.collect(4), 1);
    assert!(m.row("c", "x").is_none(), "the tombstone is gone");
    assert_eq!((m.horizon().seq, m.horizon().stamp.clone()), (4, Some(Stamp::new(3, "a"))));
    assert_eq!(m.collect(9), 0, "never past the head");
    assert_eq!(m.horizon().seq, 4);
    let r = sync(&mut m, "b", None, vec![]);
    assert_eq!(ids(&r), [("y", 2), ("z", 4)], "a new client gets the live documents");
    assert_eq!(r.horizon, Some(4), "and the horizon");
}

#[test]
fn a_cursor_below_the_horizon_starts_again_from_the_beginning() {
    let mut m = with_a_deletion();
    m.collect(3);
    let mut req = SyncRequest::new("b", Some(Cursor(1)));
    req.verify = Some(tide_core::Verify::Roots);
    let r = m.exchange(&req).unwrap();
    assert!(r.resync, "b may hold x, whose deletion is gone");
    assert_eq!(ids(&r), [("y", 2), ("z", 4)]);
    assert_eq!(r.head, Some(4), "the head b begins again at");
    assert!(r.roots.is_none(), "digests compare only once b has caught up again");
    // Begun again at 4: the horizon is no longer past it.
    let mut req = SyncRequest::new("b", Some(Cursor(2)));
    req.from_head = Some(4);
    assert!(!m.exchange(&req).unwrap().resync);
    let r = sync(&mut m, "b", Some(3), vec![]);
    assert!(!r.resync, "a cursor at the horizon missed nothing");
    // A fresh client that held nothing when it began is not stale either.
    let mut req = SyncRequest::new("c", Some(Cursor(1)));
    req.live_below = Some(3);
    assert!(!m.exchange(&req).unwrap().resync);
}

#[test]
fn an_edit_of_a_collected_deletion_is_deleted_and_a_new_document_is_not() {
    let mut m = with_a_deletion();
    m.collect(3);
    let edit = |lamport| {
        let mut req = SyncRequest::new("b", Some(Cursor(4)));
        req.ops = vec![put("x", lamport, "b", 7)];
        req.bases = vec![Some(1)];
        req
    };
    // Edited from seq 1, which the deletion replaced and the horizon passed.
    let r = m.exchange(&edit(2)).unwrap();
    assert_eq!(r.results, [OpResult::Deleted]);
    assert!(m.row("c", "x").is_none(), "nothing stored");
    assert_eq!(m.seq(), 4, "no seq issued");
    // Stamped above every collected deletion, it beats the deletion anyway.
    let r = m.exchange(&edit(9)).unwrap();
    assert_eq!(r.results, [OpResult::Applied { seq: 5 }]);
    // A new document (no base) is a new document.
    let r = sync(&mut m, "b", Some(5), vec![put("w", 1, "b", 1)]);
    assert_eq!(r.results, [OpResult::Applied { seq: 6 }]);
    // A base above the horizon: a version the server lost, not a deletion it forgot.
    let mut req = SyncRequest::new("b", Some(Cursor(6)));
    req.ops = vec![put("v", 1, "b", 1)];
    req.bases = vec![Some(5)];
    assert_eq!(m.exchange(&req).unwrap().results, [OpResult::Applied { seq: 7 }]);
}

#[test]
fn bases_are_one_per_op() {
    let mut m = Model::new(Limits::default());
    let mut req = SyncRequest::new("b", None);
    req.ops = vec![put("x", 1, "b", 1), put("y", 1, "b", 1)];
    req.bases = vec![None];
    assert_eq!(m.exchange(&req).unwrap_err().code, ErrorCode::InvalidRequest);
}

#[test]
fn an_edit_of_a_gone_incarnation_is_deleted_even_after_the_key_is_made_again() {
    let mut m = with_a_deletion();
    m.collect(3);
    // x is made again from nothing: a new incarnation, begun at horizon 3.
    let r = sync(&mut m, "c", Some(4), vec![put("x", 1, "c", 5)]);
    assert_eq!(r.results, [OpResult::Applied { seq: 5 }]);
    assert_eq!(m.row("c", "x").unwrap().born, 3);
    let edit = |base, lamport| {
        let mut req = SyncRequest::new("b", Some(Cursor(5)));
        req.ops = vec![put("x", lamport, "b", 7)];
        req.bases = vec![Some(base)];
        req
    };
    // An edit of the version at seq 1 (deleted, collected) loses even
    // though its stamp beats the new incarnation's.
    assert_eq!(m.exchange(&edit(1, 2)).unwrap().results, [OpResult::Deleted]);
    assert_eq!(m.row("c", "x").unwrap().stamp, Stamp::new(1, "c"));
    // An edit of the new incarnation is decided as usual.
    assert_eq!(m.exchange(&edit(5, 2)).unwrap().results, [OpResult::Applied { seq: 6 }]);
    assert_eq!(m.row("c", "x").unwrap().born, 3, "the incarnation goes on");
}
