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

/// The limits of [`requests_near_every_limit_get_their_answer`].
fn small_limits() -> Limits {
    Limits {
        request_bytes_max: 2_048,
        ops_per_request_max: 4,
        doc_bytes_max: 256,
        id_bytes_max: 16,
        collection_bytes_max: 8,
        ..Limits::default()
    }
}

/// A request built near every size limit of [`small_limits`]: how many
/// ops, how long the collection, the id and the document, how much padding;
/// and how it is sent (plain, gzip, or a gzip bomb: a small body that
/// inflates far past the limit).
#[derive(Debug, Clone)]
struct NearLimits {
    ops: usize,
    collection: usize,
    id: usize,
    doc: usize,
    pad: usize,
    sent: Sent,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Plain,
    Gzip,
    Bomb,
}

impl NearLimits {
    fn body(&self) -> String {
        let ops: Vec<String> = (0..self.ops)
            .map(|i| {
                let doc = format!(r#"{{"p":"{}"}}"#, "d".repeat(self.doc.saturating_sub(8)));
                format!(
                    r#"{{"collection":"{}","id":"{}{i}","kind":"put","doc":{doc},"lamport":{},"node_id":"n"}}"#,
                    "c".repeat(self.collection),
                    "i".repeat(self.id.saturating_sub(1)),
                    i + 1
                )
            })
            .collect();
        format!(r#"{{"node_id":"n","ops":[{}],"pad":"{}"}}"#, ops.join(","), "x".repeat(self.pad))
    }

    /// The refusal the body must get, in the order the server checks.
    fn expected(&self, body: &str) -> Option<&'static str> {
        let limits = small_limits();
        if self.sent == Sent::Bomb || body.len() > limits.request_bytes_max {
            Some("body_too_large")
        } else if self.ops > limits.ops_per_request_max {
            Some("too_many_ops")
        } else if self.ops == 0 {
            None
        } else if self.collection > limits.collection_bytes_max {
            Some("invalid_collection")
        } else if self.id > limits.id_bytes_max {
            Some("invalid_id")
        } else if self.doc.max(8) > limits.doc_bytes_max {
            Some("doc_too_large")
        } else {
            None
        }
    }
}

fn near_limits() -> impl Strategy<Value = NearLimits> {
    (
        0usize..=5,
        6usize..=10,
        14usize..=18,
        250usize..=262,
        prop_oneof![Just(0usize), 600usize..1_400],
        prop_oneof![2 => Just(Sent::Plain), 2 => Just(Sent::Gzip), 1 => Just(Sent::Bomb)],
    )
        .prop_map(|(ops, collection, id, doc, pad, sent)| NearLimits { ops, collection, id, doc, pad, sent })
}

fn gzipped(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Requests at, just under and just over every size limit, plain, gzip
    /// and as gzip bombs: each gets 200 or its specific refusal (never 5xx),
    /// and a refused one changes nothing.
    #[test]
    fn requests_near_every_limit_get_their_answer(requests in prop::collection::vec(near_limits(), 1..6)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let backend = SqliteBackend::open(&dir.path().join("s.db"), Durability::Normal, small_limits()).await.unwrap();
            let config = ServerConfig { limits: small_limits(), ..ServerConfig::default() };
            let server = Server::new(backend, Arc::new(NoAuth::new("fuzz")), config);
            let state = || async {
                let req = http::Request::post("/sync").body(Full::new(Bytes::from_static(br#"{"node_id":"o"}"#))).unwrap();
                server.handle(req).await.into_body().collect().await.unwrap().to_bytes()
            };
            for r in requests {
                let body = r.body();
                let sent = match r.sent {
                    Sent::Plain => body.clone().into_bytes(),
                    Sent::Gzip => gzipped(body.as_bytes()),
                    Sent::Bomb => gzipped(&vec![b' '; 64 * 1024]),
                };
                let mut req = http::Request::post("/sync");
                if r.sent != Sent::Plain {
                    req = req.header("content-encoding", "gzip");
                }
                let before = state().await;
                let resp = server.handle(req.body(Full::new(Bytes::from(sent))).unwrap()).await;
                let status = resp.status().as_u16();
                let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
                match r.expected(&body) {
                    None => assert_eq!(status, 200, "{r:?}: {text}"),
                    Some(code) => {
                        assert!((400..500).contains(&status), "{r:?}: {status} {text}");
                        assert!(text.contains(&format!(r#""code":"{code}""#)), "{r:?}: expected {code}, got {text}");
                        assert_eq!(state().await, before, "{r:?}: a refused request changes nothing");
                    }
                }
            }
        });
    }
}
