//! Decoding, encoding and the specific errors for malformed messages.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use tide_core::{
    Change, Cursor, ErrorBody, ErrorCode, Op, OpResult, PROTOCOL_VERSION, Payload, Stamp, SyncRequest, SyncResponse,
};

use crate::doc;

fn decode_err(body: &serde_json::Value) -> (ErrorCode, String) {
    let e = SyncRequest::from_json(body.to_string().as_bytes()).unwrap_err();
    (e.code, e.message)
}

fn with_op(op: &serde_json::Value) -> serde_json::Value {
    json!({"node_id": "a", "cursor": null, "ops": [op]})
}

fn good_op() -> serde_json::Value {
    json!({"collection": "c", "id": "i", "kind": "put", "doc": {"x": 1}, "lamport": 1, "node_id": "a"})
}

#[test]
fn malformed_ops_get_specific_messages() {
    let mut cases = Vec::new();
    let mut bad = |field: &str, value: serde_json::Value, expect: &str| {
        let mut op = good_op();
        op[field] = value;
        cases.push((op, expect.to_owned()));
    };
    bad("kind", json!("bogus"), "unknown variant `bogus`");
    bad("doc", json!(null), "a put must carry a JSON object `doc`, found null");
    bad("doc", json!([1, 2]), "a put must carry a JSON object `doc`, found an array");
    bad("lamport", json!(1.9), "invalid type: floating point");
    bad("lamport", json!(-1), "invalid value: integer `-1`");
    bad("lamport", json!("3"), "invalid type: string");
    bad("seq", json!(7), "unknown field `seq`");
    let mut delete_with_doc = good_op();
    delete_with_doc["kind"] = json!("delete");
    cases.push((delete_with_doc, "a delete must carry `doc: null`".into()));
    let mut missing = good_op();
    missing.as_object_mut().unwrap().remove("lamport");
    cases.push((missing, "missing field `lamport`".into()));
    for (op, expect) in cases {
        let (code, message) = decode_err(&with_op(&op));
        assert_eq!(code, ErrorCode::InvalidRequest, "{op}");
        assert!(message.contains(&expect), "{op}: {message:?} lacks {expect:?}");
    }
}

#[test]
fn a_put_may_leave_doc_out_only_if_it_is_a_delete() {
    let mut op = good_op();
    op["kind"] = json!("delete");
    op.as_object_mut().unwrap().remove("doc");
    let req = SyncRequest::from_json(with_op(&op).to_string().as_bytes()).unwrap();
    assert_eq!(req.ops[0].payload, Payload::Delete);
}

#[test]
fn cursors_in_every_form_the_original_accepts() {
    let cursor = |c: serde_json::Value| {
        SyncRequest::from_json(json!({"node_id": "a", "cursor": c}).to_string().as_bytes()).map(|r| r.cursor)
    };
    assert_eq!(cursor(json!(null)), Ok(None));
    assert_eq!(cursor(json!("")), Ok(None));
    assert_eq!(cursor(json!("42")), Ok(Some(Cursor(42))));
    assert_eq!(cursor(json!(42)), Ok(Some(Cursor(42))));
    let missing = SyncRequest::from_json(br#"{"node_id":"a"}"#).unwrap();
    assert_eq!((missing.cursor, missing.ops.len()), (None, 0));
    for bad in [json!("abc"), json!("-1"), json!(" 1"), json!(-1), json!(1.5), json!("99999999999999999999999")] {
        let err = cursor(bad.clone()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{bad}");
        assert!(err.message.contains("cursor"), "{bad}: {err}");
    }
    // A response cursor may be a number (the original client accepts that).
    let resp: SyncResponse = serde_json::from_str(r#"{"cursor":7}"#).unwrap();
    assert_eq!((resp.cursor, resp.changes.len()), (Cursor(7), 0));
}

#[test]
fn not_json_and_json_bombs_are_invalid_json() {
    for body in ["{not json", "", "{\"node_id\":\"a\"", "[]garbage"] {
        assert_eq!(SyncRequest::from_json(body.as_bytes()).unwrap_err().code, ErrorCode::InvalidJson, "{body:?}");
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let body = format!(
        r#"{{"node_id":"a","ops":[{{"collection":"c","id":"i","kind":"put","lamport":1,"node_id":"a","doc":{{"x":{deep}}}}}]}}"#
    );
    let err = SyncRequest::from_json(body.as_bytes()).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidJson);
    assert!(err.message.contains("recursion limit"), "{err}");
    for body in [json!([]), json!("x"), json!({"cursor": null})] {
        assert_eq!(decode_err(&body).0, ErrorCode::InvalidRequest, "{body}");
    }
}

#[test]
fn a_document_may_nest_as_deep_as_its_message_allows() {
    let body = |depth: usize| {
        let doc = format!("{}{{}}{}", r#"{"a":"#.repeat(depth - 1), "}".repeat(depth - 1));
        format!(
            r#"{{"node_id":"a","ops":[{{"collection":"c","id":"i","kind":"put","lamport":1,"node_id":"a","doc":{doc}}}]}}"#
        )
    };
    let req = SyncRequest::from_json(body(tide_core::DOC_DEPTH_MAX).as_bytes()).unwrap();
    let Payload::Put(doc) = &req.ops[0].payload else { panic!("a put") };
    assert_eq!(doc.as_str(), format!("{}{{}}{}", r#"{"a":"#.repeat(123), "}".repeat(123)));
    let err = SyncRequest::from_json(body(tide_core::DOC_DEPTH_MAX + 1).as_bytes()).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidJson, "{err}");
}

#[test]
fn extensions_are_additive_and_named_as_documented() {
    let mut req = SyncRequest::new("a", Some(Cursor(3)));
    req.limit = Some(100);
    req.wait = Some(Duration::from_millis(2500));
    let v: serde_json::Value = serde_json::to_value(&req).unwrap();
    assert_eq!(
        v,
        json!({"node_id": "a", "cursor": "3", "ops": [], "protocol": PROTOCOL_VERSION, "limit": 100, "wait_ms": 2500})
    );

    let resp = SyncResponse {
        cursor: Cursor(9),
        changes: vec![],
        protocol: Some(1),
        results: vec![
            OpResult::Applied { seq: 9 },
            OpResult::Duplicate,
            OpResult::Superseded { lamport: 4, node_id: "b".into() },
            OpResult::Rejected { code: ErrorCode::StampCollision, message: "m".into() },
        ],
        has_more: true,
        reset: true,
        ..SyncResponse::new(Cursor(9))
    };
    assert_eq!(
        serde_json::to_value(&resp).unwrap(),
        json!({"cursor": "9", "changes": [], "protocol": 1, "results": [
            {"status": "applied", "seq": 9}, {"status": "duplicate"},
            {"status": "superseded", "lamport": 4, "node_id": "b"},
            {"status": "rejected", "code": "stamp_collision", "message": "m"}],
            "has_more": true, "reset": true})
    );
    // Unknown fields in a response and unknown codes decode (forward compatible).
    let body: ErrorBody = serde_json::from_str(r#"{"error":"x","code":"brand_new","later":1}"#).unwrap();
    assert_eq!(body.code, Some(ErrorCode::Unknown));
    let resp: SyncResponse = serde_json::from_str(r#"{"cursor":"1","changes":[],"future":true}"#).unwrap();
    assert_eq!(resp.cursor, Cursor(1));
}

fn payload() -> impl Strategy<Value = Payload> {
    let value = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        (-1_000_000i32..1_000_000).prop_map(|n| json!(f64::from(n) / 4.0)),
        "\\PC{0,8}".prop_map(|s| json!(s)),
    ];
    prop_oneof![
        Just(Payload::Delete),
        prop::collection::vec(("\\PC{0,6}", value), 0..4).prop_map(|kv| Payload::Put(kv.into_iter().collect())),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    (
        "\\PC{1,6}",
        "\\PC{1,6}",
        0u64..=tide_core::LAMPORT_MAX,
        "[a-z0-9]{1,8}",
        payload(),
        prop::option::of("[a-z]{1,4}"),
    )
        .prop_map(|(collection, id, l, n, payload, op_id)| Op {
            collection,
            id,
            stamp: Stamp::new(l, n),
            payload,
            op_id,
        })
}

proptest! {
    #[test]
    fn requests_round_trip(node in "[a-z]{1,8}", cursor in prop::option::of(any::<u64>()), ops in prop::collection::vec(op(), 0..5),
                           protocol in prop::option::of(0u32..3), limit in prop::option::of(any::<u32>()), wait in prop::option::of(0u64..100_000)) {
        let req = SyncRequest { cursor: cursor.map(Cursor), ops, protocol, limit, wait: wait.map(Duration::from_millis), ..SyncRequest::new(node, None) };
        let bytes = serde_json::to_vec(&req).unwrap();
        prop_assert_eq!(SyncRequest::from_json(&bytes).unwrap(), req);
    }

    #[test]
    fn responses_round_trip(cursor in any::<u64>(), changes in prop::collection::vec((op(), any::<u64>()), 0..5), has_more: bool, reset: bool, seqs in prop::collection::vec(any::<u64>(), 0..3)) {
        let resp = SyncResponse {
            cursor: Cursor(cursor),
            changes: changes.into_iter().map(|(o, seq)| Change { collection: o.collection, id: o.id, stamp: o.stamp, payload: o.payload, seq }).collect(),
            protocol: Some(1),
            results: seqs.into_iter().map(|seq| OpResult::Applied { seq }).collect(),
            has_more,
            reset,
            ..SyncResponse::new(Cursor(cursor))
        };
        let text = serde_json::to_string(&resp).unwrap();
        prop_assert_eq!(serde_json::from_str::<SyncResponse>(&text).unwrap(), resp);
    }
}

#[test]
fn docs_keep_their_key_order() {
    let req = SyncRequest::from_json(br#"{"node_id":"a","ops":[{"collection":"c","id":"i","kind":"put","doc":{"z":1,"a":2,"m":3},"lamport":1,"node_id":"a"}]}"#).unwrap();
    let Payload::Put(d) = &req.ops[0].payload else { panic!() };
    assert_eq!(d.as_str(), r#"{"z":1,"a":2,"m":3}"#);
    assert_eq!(d, &doc(json!({"z": 1, "a": 2, "m": 3})));
}

#[test]
fn an_unknown_op_status_decodes_as_not_acknowledged() {
    let resp: SyncResponse = serde_json::from_str(
        r#"{"cursor":"1","changes":[],"results":[{"status":"deferred","until":5},{"status":"duplicate"}]}"#,
    )
    .unwrap();
    assert_eq!(resp.results, vec![OpResult::Unknown, OpResult::Duplicate]);
    assert!(!resp.results[0].is_ack(), "an unknown status must not acknowledge the op");
}

#[test]
fn the_digest_extensions_round_trip() {
    let text = r#"{"node_id":"a","cursor":"4","ops":[],"request_id":"r1","verify":{"level":"keys","collection":"c","buckets":[3],"have":[["i",2,"b",true,"00000000000000ff"]]},"fetch":[["c","j"]]}"#;
    let req = SyncRequest::from_json(text.as_bytes()).unwrap();
    assert_eq!(req.request_id.as_deref(), Some("r1"));
    assert_eq!(
        req.verify,
        Some(tide_core::Verify::Keys {
            collection: "c".into(),
            buckets: vec![3],
            have: vec![tide_core::HeldVersion("i".into(), 2, "b".into(), true, tide_core::digest::Hash64(255))]
        })
    );
    assert_eq!(req.fetch, vec![tide_core::DocKey("c".into(), "j".into())]);
    let again = SyncRequest::from_json(&serde_json::to_vec(&req).unwrap()).unwrap();
    assert_eq!(again, req);
    let bad = SyncRequest::from_json(br#"{"node_id":"a","verify":{"level":"everything"}}"#).unwrap_err();
    assert_eq!(bad.code, ErrorCode::InvalidRequest);
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "\\PC{0,6}|[\\x00-\\x1f\"\\\\/é]{0,4}".prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec(("[a-c]{0,2}", inner), 0..5)
                .prop_map(|kv| json!(kv.into_iter().collect::<serde_json::Map<_, _>>())),
        ]
    })
}

proptest! {
    /// However a document's JSON is written (spaced, escaped, as Python
    /// writes it), it becomes the text serde_json writes for its map, and
    /// that text is kept as it is.
    #[test]
    fn documents_become_their_canonical_text(fields in prop::collection::vec(("[a-c]{0,2}|\\PC{0,3}", json_value()), 0..5)) {
        let map: serde_json::Map<String, serde_json::Value> = fields.iter().cloned().collect();
        let canonical = serde_json::to_string(&map).unwrap();
        // Duplicate keys, in the writer's order, as a non-Rust writer may send them.
        let with_duplicates = format!("{{{}}}", fields.iter()
            .map(|(k, v)| format!("{}: {}", json!(k), serde_json::to_string_pretty(v).unwrap()))
            .collect::<Vec<_>>().join(" , "));
        let mut escaped = String::new();
        for c in canonical.chars() {
            if c.is_ascii() {
                escaped.push(c);
            } else {
                for u in c.encode_utf16(&mut [0; 2]) {
                    std::fmt::Write::write_fmt(&mut escaped, format_args!("\\u{u:04X}")).unwrap();
                }
            }
        }
        for text in [&canonical, &serde_json::to_string_pretty(&map).unwrap(), &escaped] {
            let doc = tide_core::Doc::parse(text).unwrap();
            prop_assert_eq!(doc.as_str(), canonical.as_str(), "{}", text);
        }
        let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&with_duplicates).unwrap();
        let doc = tide_core::Doc::parse(&with_duplicates).unwrap();
        let expected = serde_json::to_string(&parsed).unwrap();
        prop_assert_eq!(doc.as_str(), expected.as_str());
    }
}

/// PROTOCOL.md §4.2: which requests may have their page read beside their
/// ops, and how far such a page's cursor moves past their own writes.
#[test]
fn a_page_read_beside_its_ops_passes_only_its_own_writes_that_follow_it() {
    let op = |node: &str| Op {
        collection: "c".into(),
        id: "k".into(),
        stamp: Stamp::new(1, node),
        payload: Payload::Delete,
        op_id: None,
    };
    let mut req = SyncRequest::new("a", Some(Cursor(7)));
    assert!(!req.page_beside_ops(), "nothing to apply");
    req.ops = vec![op("a"), op("a"), op("a")];
    assert!(req.page_beside_ops());
    for other in [
        SyncRequest { cursor: Some(Cursor::START), ..req.clone() },
        SyncRequest { cursor: None, ..req.clone() },
        SyncRequest { live_below: Some(3), ..req.clone() },
        SyncRequest { from_head: Some(3), ..req.clone() },
        SyncRequest { verify: Some(tide_core::Verify::Roots), ..req.clone() },
    ] {
        assert!(!other.page_beside_ops(), "{other:?}");
    }

    let superseded = OpResult::Superseded { lamport: 9, node_id: "b".into() };
    let applied = |seq| OpResult::Applied { seq };
    // Own writes right after the page's end: passed, whatever lost between them.
    assert_eq!(req.cursor_past_own(Cursor(10), &[applied(11), superseded.clone(), applied(12)]), Cursor(12));
    assert_eq!(req.cursor_past_own(Cursor(10), &[superseded.clone(), superseded.clone(), superseded]), Cursor(10));
    // Another's change between the page's end and them: not passed.
    assert_eq!(req.cursor_past_own(Cursor(10), &[applied(12), applied(13), applied(14)]), Cursor(10));
    // A write under another node's stamp (a repair) is not skipped, so not passed.
    req.ops[1] = op("b");
    assert_eq!(req.cursor_past_own(Cursor(10), &[applied(11), applied(12), applied(13)]), Cursor(10));
}
