//! The stable twin of the cargo-fuzz target `decode` (reliability.md F1,
//! F2, P5, P7): arbitrary bodies through the real handler and the SQLite
//! backend never panic and never answer 5xx; what decodes re-encodes.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tide_core::{Limits, SyncRequest};
use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};

/// Bodies that are mostly almost-valid requests, so the fuzzing gets past
/// the first byte: real requests with a mutation, JSON fragments, and noise.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let valid = r#"{"node_id":"a","cursor":"1","ops":[{"collection":"c","id":"i","kind":"put","doc":{"x":[1,{"y":null}]},"lamport":3,"node_id":"a"}],"limit":5}"#;
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
        "[\\[\\]{}\":,0-9a-z.e+-]{0,64}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_body_gets_a_clean_answer(bodies in prop::collection::vec(body(), 1..8)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let backend = SqliteBackend::open(&dir.path().join("s.db"), Durability::Normal, Limits::default()).await.unwrap();
            let server = Server::new(backend, Arc::new(NoAuth::new("fuzz")), ServerConfig::default());
            for body in bodies {
                if let Ok(req) = SyncRequest::from_json(&body) {
                    let again = SyncRequest::from_json(&serde_json::to_vec(&req).unwrap()).unwrap();
                    assert_eq!(again, req, "what decodes re-encodes");
                }
                let req = http::Request::post("/sync").body(Full::new(Bytes::from(body.clone()))).unwrap();
                let resp = server.handle(req).await;
                let status = resp.status().as_u16();
                let text = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(status == 200 || (400..500).contains(&status), "{status} for {:?}: {:?}", String::from_utf8_lossy(&body), text);
            }
        });
    }
}
