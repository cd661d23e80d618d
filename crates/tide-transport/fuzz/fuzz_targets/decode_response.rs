//! Any bytes as a server's answer (the first two bytes pick the status):
//! the client's decoding must never panic, a response that decodes
//! re-encodes to one that decodes to the same value, and its documents are
//! canonical text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tide_core::{Doc, SyncResponse};

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data {
        [a, b, rest @ ..] => (100 + u16::from_le_bytes([*a, *b]) % 500, rest),
        _ => (200, data),
    };
    let Ok(response) = tide_transport::decode_response(status, Some("1"), body) else { return };
    assert!((200..300).contains(&status));
    let again: SyncResponse = serde_json::from_slice(&serde_json::to_vec(&response).expect("responses serialize"))
        .expect("re-decodes");
    assert_eq!(again, response);
    for doc in response.changes.iter().chain(&response.fetched).filter_map(|c| c.payload.doc()) {
        assert_eq!(Doc::parse(doc.as_str()).expect("a document parses").as_str(), doc.as_str());
    }
});
