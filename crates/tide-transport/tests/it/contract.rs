//! The contract every transport keeps, run against the fake, against a
//! real server over HTTP, and over HTTPS: the same tests, three ways.

use std::sync::Arc;

use serde_json::json;
use tide_core::{Cursor, ErrorCode, Limits, Op, OpResult, Payload, Stamp, SyncRequest};
use tide_transport::{FakeServer, HttpTransport, Transport};

use crate::doc;
use crate::server::{self, CA_PEM, TestServer};

/// Where the transports under test connect.
pub(crate) enum Harness {
    Fake(FakeServer),
    Http(TestServer, bool),
    /// The product server, tide-server, on SQLite in a temp dir.
    TideServer {
        endpoint: String,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        _dir: tempfile::TempDir,
    },
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Self::TideServer { task, .. } = self {
            task.abort();
        }
    }
}

impl Harness {
    pub(crate) fn connect(&self, name: &str) -> Arc<dyn Transport> {
        match self {
            Self::Fake(server) => Arc::new(server.connect(name)),
            Self::Http(server, tls) => Arc::new(
                HttpTransport::builder(&server.endpoint(*tls)).add_root_certificates_pem(CA_PEM).build().unwrap(),
            ),
            Self::TideServer { endpoint, .. } => Arc::new(HttpTransport::new(endpoint).unwrap()),
        }
    }
}

fn limits() -> Limits {
    Limits { changes_per_response_max: 10, ..Limits::default() }
}

#[expect(clippy::unused_async, reason = "the three harnesses share one shape for the macro")]
pub(crate) async fn fake() -> Harness {
    Harness::Fake(FakeServer::with_limits(limits()))
}

pub(crate) async fn http() -> Harness {
    Harness::Http(server::start(false, limits()).await, false)
}

pub(crate) async fn tide_server() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let backend = tide_server::SqliteBackend::open(&dir.path().join("s.db"), tide_server::Durability::Normal, limits())
        .await
        .unwrap();
    let config = tide_server::ServerConfig { limits: limits(), ..tide_server::ServerConfig::default() };
    let server = tide_server::Server::new(backend, Arc::new(tide_server::NoAuth::new("test")), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    Harness::TideServer { endpoint, task, _dir: dir }
}

pub(crate) async fn https() -> Harness {
    Harness::Http(server::start(true, limits()).await, true)
}

fn put(node: &str, id: &str, lamport: u64, n: i64) -> Op {
    Op {
        collection: "notes".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc(json!({ "n": n }))),
        op_id: None,
    }
}

fn request(node: &str, cursor: Option<u64>, ops: Vec<Op>) -> SyncRequest {
    let mut req = SyncRequest::new(node, cursor.map(Cursor));
    req.ops = ops;
    req
}

async fn a_write_reaches_another_client(h: &Harness) {
    let (a, b) = (h.connect("a"), h.connect("b"));
    let mut del = put("a", "n1", 3, 0);
    del.payload = Payload::Delete;
    let resp = a.exchange(&request("a", None, vec![put("a", "n1", 1, 1), put("a", "n2", 2, 2), del])).await.unwrap();
    assert_eq!(
        resp.results,
        [OpResult::Applied { seq: 1 }, OpResult::Applied { seq: 2 }, OpResult::Applied { seq: 3 }]
    );
    let resp = b.exchange(&request("b", None, vec![])).await.unwrap();
    let got: Vec<_> = resp.changes.iter().map(|c| (c.id.as_str(), c.seq, c.payload.kind())).collect();
    assert_eq!(got, [("n2", 2, tide_core::Kind::Put), ("n1", 3, tide_core::Kind::Delete)]);
    assert_eq!((resp.cursor, resp.has_more), (Cursor(3), false));
}

async fn pages_are_followed_to_the_end(h: &Harness) {
    let (a, b) = (h.connect("a"), h.connect("b"));
    a.exchange(&request("a", None, (1..=25).map(|i| put("a", &format!("k{i:02}"), i, 0)).collect())).await.unwrap();
    let mut cursor = None;
    let mut seqs = Vec::new();
    for _ in 0..10 {
        let resp = b.exchange(&request("b", cursor, vec![])).await.unwrap();
        assert!(resp.changes.len() <= 10, "the server's page limit holds");
        seqs.extend(resp.changes.iter().map(|c| c.seq));
        cursor = Some(resp.cursor.seq());
        if !resp.has_more {
            break;
        }
    }
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "every change once, in seq order");
}

async fn a_resent_request_changes_nothing(h: &Harness) {
    let a = h.connect("a");
    let req = request("a", None, vec![put("a", "x", 1, 1), put("a", "y", 2, 1)]);
    a.exchange(&req).await.unwrap();
    let again = a.exchange(&req).await.unwrap();
    assert_eq!(again.results, [OpResult::Duplicate, OpResult::Duplicate]);
    let b = h.connect("b").exchange(&request("b", None, vec![])).await.unwrap();
    assert_eq!(b.cursor, Cursor(2), "no seq was spent on the duplicates");
}

async fn a_refusal_is_structured_and_applies_nothing(h: &Harness) {
    let a = h.connect("a");
    let err = a.exchange(&request("a", None, vec![put("a", "ok", 1, 1), put("mallory", "x", 1, 1)])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ForeignNodeId), "{err}");
    assert!(matches!(err, tide_transport::Error::Status { status: 400, op: Some(1), .. }), "{err}");
    assert!(!err.is_retryable());
    let b = h.connect("b").exchange(&request("b", None, vec![])).await.unwrap();
    assert!(b.changes.is_empty(), "nothing applied");
}

async fn own_writes_are_not_echoed_past_the_start(h: &Harness) {
    let (a, b) = (h.connect("a"), h.connect("b"));
    let first = a.exchange(&request("a", None, vec![put("a", "mine", 1, 1)])).await.unwrap();
    b.exchange(&request("b", None, vec![put("b", "theirs", 1, 1)])).await.unwrap();
    let resp = a.exchange(&request("a", Some(first.cursor.seq()), vec![put("a", "mine2", 2, 1)])).await.unwrap();
    assert_eq!(resp.changes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["theirs"]);
    assert_eq!(resp.cursor, Cursor(3));
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod over_fake { $( #[tokio::test] async fn $test() { super::$test(&super::fake().await).await } )* }
        mod over_http { $( #[tokio::test] async fn $test() { super::$test(&super::http().await).await } )* }
        mod over_https { $( #[tokio::test] async fn $test() { super::$test(&super::https().await).await } )* }
        mod over_tide_server { $( #[tokio::test] async fn $test() { super::$test(&super::tide_server().await).await } )* }
    };
}

contract!(
    a_write_reaches_another_client,
    pages_are_followed_to_the_end,
    a_resent_request_changes_nothing,
    a_refusal_is_structured_and_applies_nothing,
    own_writes_are_not_echoed_past_the_start,
);
