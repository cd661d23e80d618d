//! Golden vectors captured from the original Python tide 0.2.1 client and
//! reference server (see `tests/golden/capture.py`): ours decode them,
//! re-encode them to the same bytes, and our reference model serves the same
//! changes the original server did.

use serde::Deserialize;
use tide_core::{Cursor, ErrorBody, ErrorCode, Limits, Model, SyncRequest, SyncResponse};

#[derive(Deserialize)]
struct Vector {
    name: String,
    from: String,
    status: Option<u16>,
    body: String,
}

fn vectors() -> Vec<Vector> {
    serde_json::from_str(include_str!("../golden/original-0.2.1.json")).expect("golden file parses")
}

fn same_json(a: &str, b: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(a).ok() == serde_json::from_str::<serde_json::Value>(b).ok()
}

#[test]
fn every_original_request_decodes_and_reencodes_to_the_same_json() {
    let bad = ["not json", "missing node_id", "op missing lamport"];
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v.from == "client" && !bad.contains(&v.name.as_str())) {
        let req = SyncRequest::from_json(v.body.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let encoded = serde_json::to_string(&req).unwrap();
        assert!(same_json(&encoded, &v.body), "{}:\n ours {encoded}\n orig {}", v.name, v.body);
        if !v.body.contains(": ") {
            // Written by the original client itself (compact): byte for byte.
            assert_eq!(encoded, v.body, "{}", v.name);
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn every_original_response_decodes_and_reencodes_byte_for_byte() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v.from == "server" && v.status == Some(200)) {
        let resp: SyncResponse = serde_json::from_str(&v.body).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(serde_json::to_string(&resp).unwrap(), v.body, "{}", v.name);
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn original_error_bodies_decode_without_a_code() {
    let errors: Vec<_> = vectors().into_iter().filter(|v| v.status == Some(400)).collect();
    assert_eq!(errors.len(), 3);
    for v in errors {
        let body: ErrorBody = serde_json::from_str(&v.body).unwrap();
        assert!(body.error == "invalid JSON" || body.error.starts_with("bad request: "), "{}", body.error);
        assert_eq!(body.code, None);
        assert_eq!(serde_json::to_string(&body).unwrap(), v.body);
    }
}

#[test]
fn requests_the_original_server_refused_are_refused_with_a_code() {
    let codes = [
        ("not json", ErrorCode::InvalidJson),
        ("missing node_id", ErrorCode::InvalidRequest),
        ("op missing lamport", ErrorCode::InvalidRequest),
    ];
    for (name, code) in codes {
        let v = vectors().into_iter().find(|v| v.name == name && v.from == "client").unwrap();
        let err = SyncRequest::from_json(v.body.as_bytes()).unwrap_err();
        assert_eq!(err.code, code, "{name}: {err}");
        let body = err.to_body();
        let prefix = if code == ErrorCode::InvalidJson { "invalid JSON" } else { "bad request: " };
        assert!(body.error.starts_with(prefix), "{}", body.error);
    }
}

/// Replays the captured session through the reference model. Our server
/// answers with the same cursor and the same changes, except that a client
/// past the start is not sent its own writes again (the original client
/// dropped those echoes itself).
#[test]
fn the_model_serves_what_the_original_server_served() {
    let vectors = vectors();
    let mut model = Model::new(Limits::default());
    let mut replayed = 0;
    for pair in vectors.chunks(2) {
        let [req_v, resp_v] = pair else { panic!("vectors come in pairs") };
        if resp_v.status != Some(200) {
            continue;
        }
        let req = SyncRequest::from_json(req_v.body.as_bytes()).unwrap();
        let original: SyncResponse = serde_json::from_str(&resp_v.body).unwrap();
        let ours = model.exchange(&req).unwrap();
        let fresh = req.cursor.unwrap_or_default() == Cursor::START;
        let expected: Vec<_> =
            original.changes.into_iter().filter(|c| fresh || c.stamp.node_id != req.node_id).collect();
        assert_eq!(ours.changes, expected, "{}", req_v.name);
        assert_eq!(ours.cursor, original.cursor, "{}", req_v.name);
        assert!(ours.results.iter().all(tide_core::OpResult::is_ack), "{}", req_v.name);
        replayed += 1;
    }
    assert_eq!(replayed, 7);
}
