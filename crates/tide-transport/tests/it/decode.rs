//! The stable twin of the cargo-fuzz target `decode_response`
//! (`crates/tide-transport/fuzz`): any status and bytes as a server's answer
//! never panic the client's decoding; a non-2xx status is always an error
//! carrying its code; what decodes re-encodes to the same value, with every
//! document in canonical text.

use proptest::prelude::*;
use tide_core::{Doc, SyncResponse};
use tide_transport::{Error, decode_response};

/// Answers that are mostly almost-valid, so the fuzzing gets past the first
/// byte: a real response (documents spaced and escaped as other servers
/// write them, results, digests) with a mutation, JSON fragments, noise.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let valid = r#"{"cursor":"7","changes":[{"collection":"c","id":"i","kind":"put","doc":{"x": [1, {"y": null}], "é": "\u00e9\/", "n": 1.50},"lamport":3,"node_id":"a","seq":6},{"collection":"c","id":"j","kind":"delete","doc":null,"lamport":4,"node_id":"b","seq":7}],"protocol":1,"results":[{"status":"applied","seq":6},{"status":"superseded","lamport":9,"node_id":"z"},{"status":"rejected","code":"doc_too_large","message":"m"}],"has_more":true,"roots":{"c":"00000000000000ff"},"wanted":["k"]}"#;
    prop_oneof![
        (0..valid.len(), any::<u8>()).prop_map(move |(i, b)| {
            let mut v = valid.as_bytes().to_vec();
            v[i] = b;
            v
        }),
        (0..valid.len(), 0..valid.len()).prop_map(move |(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            let mut v = valid.as_bytes().to_vec();
            v.drain(a..b);
            v
        }),
        (0..valid.len(), "[\\[\\]{}\":,0-9a-z.e+\\\\ -]{0,8}").prop_map(move |(i, s)| {
            let mut v = valid.as_bytes().to_vec();
            v.splice(i..i, s.into_bytes());
            v
        }),
        "[\\[\\]{}\":,0-9a-z.e+-]{0,64}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_048, ..ProptestConfig::default() })]

    #[test]
    fn any_answer_decodes_cleanly(
        status in prop_oneof![4 => Just(200u16), 1 => 100u16..600],
        retry_after in prop::option::of("[0-9a-z ]{0,4}"),
        body in body(),
    ) {
        match decode_response(status, retry_after.as_deref(), &body) {
            Ok(response) => {
                prop_assert!((200..300).contains(&status));
                let again: SyncResponse = serde_json::from_slice(&serde_json::to_vec(&response).unwrap()).unwrap();
                prop_assert_eq!(&again, &response);
                for doc in response.changes.iter().chain(&response.fetched).filter_map(|c| c.payload.doc()) {
                    let again = Doc::parse(doc.as_str()).unwrap();
                    prop_assert_eq!(again.as_str(), doc.as_str());
                }
            }
            Err(Error::Status { status: s, .. }) => prop_assert_eq!(s, status),
            Err(Error::MalformedResponse { .. }) => prop_assert!((200..300).contains(&status)),
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

#[test]
fn a_spaced_document_from_another_server_becomes_canonical() {
    let body = br#"{"cursor":"1","changes":[{"collection":"c","id":"i","kind":"put","doc":{"a": 1, "b": "\u00e9"},"lamport":1,"node_id":"n","seq":1}]}"#;
    let response = decode_response(200, None, body).unwrap();
    assert_eq!(response.changes[0].payload.doc().unwrap().as_str(), r#"{"a":1,"b":"é"}"#);
}
