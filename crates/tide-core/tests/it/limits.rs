//! Validation against the named limits.

use serde_json::json;
use tide_core::limits::{OPS_PER_REQUEST_MAX, json_len};
use tide_core::{ErrorCode, LAMPORT_MAX, Limits, Op, Payload, Stamp, SyncRequest};

use crate::doc;

fn op(collection: &str, id: &str, lamport: u64, node: &str) -> Op {
    Op {
        collection: collection.into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc(json!({"x": 1}))),
        op_id: None,
    }
}

fn request(ops: Vec<Op>) -> SyncRequest {
    let mut req = SyncRequest::new("n", None);
    req.ops = ops;
    req
}

fn code_and_op(req: &SyncRequest, limits: &Limits) -> (ErrorCode, Option<usize>) {
    let v = limits.check_request(req).unwrap_err();
    (v.code, v.op)
}

#[test]
fn the_default_limits_accept_what_the_original_client_sends() {
    const { assert!(OPS_PER_REQUEST_MAX >= 500) };
    let ops = (0..500).map(|i| op("Notes & more", &format!("id {i} ü"), i + 1, "n")).collect();
    Limits::default().check_request(&request(ops)).unwrap();
}

#[test]
fn each_violation_names_its_code_and_op() {
    let l = Limits::default();
    let long = "x".repeat(l.id_bytes_max + 1);
    let cases = [
        (request(vec![op("a/b", "i", 1, "n")]), ErrorCode::InvalidCollection),
        (request(vec![op("", "i", 1, "n")]), ErrorCode::InvalidCollection),
        (request(vec![op("c", "", 1, "n")]), ErrorCode::InvalidId),
        (request(vec![op("c", &long, 1, "n")]), ErrorCode::InvalidId),
        (request(vec![op("c", "a\u{0}b", 1, "n")]), ErrorCode::InvalidId),
        (request(vec![op("c", "i", 1, "someone-else")]), ErrorCode::ForeignNodeId),
        (request(vec![op("c", "i", LAMPORT_MAX + 1, "n")]), ErrorCode::LamportOutOfRange),
    ];
    for (mut req, code) in cases {
        // The bad op is second; the first is fine.
        req.ops.insert(0, op("c", "ok", 1, "n"));
        assert_eq!(code_and_op(&req, &l), (code, Some(1)), "{req:?}");
    }
}

#[test]
fn request_level_violations() {
    let l = Limits { ops_per_request_max: 2, ..Limits::default() };
    let req = request((1..=3).map(|i| op("c", "i", i, "n")).collect());
    assert_eq!(code_and_op(&req, &l), (ErrorCode::TooManyOps, None));
    let mut req = request(vec![]);
    req.node_id = String::new();
    assert_eq!(code_and_op(&req, &l), (ErrorCode::InvalidNodeId, None));
    let mut req = request(vec![]);
    req.protocol = Some(99);
    let v = l.check_request(&req).unwrap_err();
    assert_eq!(v.code, ErrorCode::UnsupportedProtocol);
    assert!(v.message.contains("0..=1"), "{v}");
}

#[test]
fn doc_size_is_measured_as_compact_json() {
    let d = doc(json!({"body": "x".repeat(100)}));
    let size = json_len(&d);
    assert_eq!(size, serde_json::to_vec(&d).unwrap().len());
    let mut o = op("c", "i", 1, "n");
    o.payload = Payload::Put(d);
    let tight = Limits { doc_bytes_max: size, ..Limits::default() };
    tight.check_request(&request(vec![o.clone()])).unwrap();
    let tighter = Limits { doc_bytes_max: size - 1, ..Limits::default() };
    assert_eq!(code_and_op(&request(vec![o]), &tighter), (ErrorCode::DocTooLarge, Some(0)));
}

#[test]
fn status_codes_and_retryability() {
    assert_eq!(ErrorCode::TooManyOps.status(), 413);
    assert_eq!(ErrorCode::InvalidJson.status(), 400);
    assert_eq!(ErrorCode::Unauthorized.status(), 401);
    assert_eq!(ErrorCode::RateLimited.status(), 429);
    assert!(ErrorCode::Unavailable.is_retryable());
    assert!(!ErrorCode::InvalidRequest.is_retryable());
}
