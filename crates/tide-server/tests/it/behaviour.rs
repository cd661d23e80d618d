//! The server's behaviour through real HTTP: the protocol, namespaces and
//! authentication, the operational endpoints, graceful shutdown, and the
//! databases it refuses to open.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tide_core::{Cursor, ErrorCode, Limits, Op, OpResult, Payload, Stamp, SyncRequest};
use tide_server::{
    AuthError, Authenticator, Backend, Durability, Principal, ServerConfig, SqliteBackend, StaticTokens,
};
use tide_transport::{HttpTransport, Transport};
use tokio::io::AsyncWriteExt;

use crate::support::{self, Storage, on_both_backends, raw};

fn doc(v: serde_json::Value) -> tide_core::Doc {
    match v {
        serde_json::Value::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}

fn put(node: &str, id: &str, lamport: u64, v: i64) -> Op {
    Op {
        collection: "notes".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc(json!({"v": v}))),
        op_id: None,
    }
}

fn req(node: &str, cursor: Option<u64>, ops: Vec<Op>) -> SyncRequest {
    let mut r = SyncRequest::new(node, cursor.map(Cursor));
    r.ops = ops;
    r
}

async fn two_clients_converge_with_per_op_results(storage: Storage) {
    let running = support::start_on(storage).await;
    let a = HttpTransport::new(&running.endpoint()).unwrap();
    let b = HttpTransport::new(&running.endpoint()).unwrap();
    let ra = a.exchange(&req("a", None, vec![put("a", "n1", 1, 1), put("a", "n2", 2, 1)])).await.unwrap();
    assert_eq!(ra.results, [OpResult::Applied { seq: 1 }, OpResult::Applied { seq: 2 }]);
    // b wrote n2 offline at (1, b): it loses to (2, a) and learns the winner.
    let rb = b.exchange(&req("b", None, vec![put("b", "n2", 1, 9)])).await.unwrap();
    assert_eq!(rb.results, [OpResult::Superseded { lamport: 2, node_id: "a".into() }]);
    assert_eq!(rb.changes.len(), 2);
    // b deletes n1 at (3, b); a pulls it, and its own writes are not echoed.
    let mut del = put("b", "n1", 3, 0);
    del.payload = Payload::Delete;
    b.exchange(&req("b", Some(rb.cursor.seq()), vec![del])).await.unwrap();
    let ra = a.exchange(&req("a", Some(ra.cursor.seq()), vec![])).await.unwrap();
    assert_eq!(
        ra.changes.iter().map(|c| (c.id.as_str(), c.payload.kind())).collect::<Vec<_>>(),
        [("n1", tide_core::Kind::Delete)]
    );
    // A resend is harmless.
    let again = a.exchange(&req("a", None, vec![put("a", "n1", 1, 1)])).await.unwrap();
    assert_eq!(again.results, [OpResult::Superseded { lamport: 3, node_id: "b".into() }]);
    running.stop().await;
}

async fn a_cursor_beyond_the_namespace_is_reset(storage: Storage) {
    let running = support::start_on(storage).await;
    let a = HttpTransport::new(&running.endpoint()).unwrap();
    a.exchange(&req("a", None, vec![put("a", "x", 1, 1)])).await.unwrap();
    let r = a.exchange(&req("b", Some(57), vec![])).await.unwrap();
    assert!(r.reset);
    assert_eq!((r.changes.len(), r.cursor), (1, Cursor(1)));
}

async fn namespaces_are_isolated_by_token(storage: Storage) {
    let tokens = StaticTokens::parse_file("tok-alpha alpha alice\ntok-beta beta bob\n").unwrap();
    let running = support::start_on_with(storage, ServerConfig::default(), Arc::new(tokens)).await;
    let alice =
        HttpTransport::builder(&running.endpoint()).header("authorization", "Bearer tok-alpha").build().unwrap();
    let bob = HttpTransport::builder(&running.endpoint()).header("authorization", "Bearer tok-beta").build().unwrap();
    alice.exchange(&req("a", None, vec![put("a", "secret", 1, 1)])).await.unwrap();
    let seen = bob.exchange(&req("b", None, vec![put("b", "secret", 1, 2)])).await.unwrap();
    assert!(seen.changes.iter().all(|c| c.stamp.node_id == "b"), "bob never sees alice's data");
    assert_eq!(seen.results, [OpResult::Applied { seq: 1 }], "bob's namespace has its own seq and keys");
    let back = alice.exchange(&req("a", None, vec![])).await.unwrap();
    assert_eq!(back.changes.len(), 1);
    assert_eq!(back.changes[0].payload, Payload::Put(doc(json!({"v": 1}))), "bob's write landed only in beta");

    for header in ["", "authorization: Bearer wrong\r\n", "authorization: Basic dG9rLWFscGhh\r\n"] {
        let (status, body) = raw(running.addr, &support::post(r#"{"node_id":"a"}"#, header)).await;
        assert_eq!(status, 401, "{header:?}");
        assert!(body.contains(r#""code":"unauthorized""#), "{body}");
    }
}

struct Down;

#[async_trait::async_trait]
impl Authenticator for Down {
    async fn authenticate(&self, _: Option<&str>) -> Result<Principal, AuthError> {
        Err(AuthError::Unavailable("token service unreachable".into()))
    }
}

async fn an_unavailable_verifier_is_a_503_never_a_pass(storage: Storage) {
    let running = support::start_on_with(storage, ServerConfig::default(), Arc::new(Down)).await;
    let (status, body) = raw(running.addr, &support::post(r#"{"node_id":"a"}"#, "authorization: Bearer x\r\n")).await;
    assert_eq!(status, 503);
    assert!(body.contains(r#""code":"unavailable""#), "{body}");
}

async fn health_readiness_metrics_and_routes(storage: Storage) {
    let running = support::start_on(storage).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").into_bytes();
    assert_eq!(raw(running.addr, &get("/healthz")).await.0, 200);
    assert_eq!(raw(running.addr, &get("/readyz")).await.0, 200);
    let a = HttpTransport::new(&running.endpoint()).unwrap();
    a.exchange(&req("a", None, vec![put("a", "x", 1, 1), put("a", "x", 1, 1)])).await.unwrap();
    let (status, metrics) = raw(running.addr, &get("/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        r#"tide_requests_total{route="sync",status="200"} 1"#,
        r#"tide_ops_total{result="applied"} 1"#,
        r#"tide_ops_total{result="duplicate"} 1"#,
        "tide_changes_served_total 1",
        "tide_request_duration_seconds_count",
        "tide_open_connections",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    let (status, body) = raw(running.addr, &get("/sync")).await;
    assert_eq!(status, 405);
    assert!(body.contains("method_not_allowed"));
    let (status, body) = raw(running.addr, &support::post("{}", "").replace_path("/nope")).await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));
}

trait ReplacePath {
    fn replace_path(self, path: &str) -> Vec<u8>;
}

impl ReplacePath for Vec<u8> {
    fn replace_path(self, path: &str) -> Vec<u8> {
        String::from_utf8(self).unwrap().replacen("/sync", path, 1).into_bytes()
    }
}

async fn shutdown_lets_an_in_flight_exchange_finish(storage: Storage) {
    let running = support::start_on(storage).await;
    let body = serde_json::to_string(&req("a", None, vec![put("a", "late", 1, 1)])).unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let headers =
        format!("POST /sync HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    stream.write_all(headers.as_bytes()).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let addr = running.addr;
    let stopping = tokio::spawn(running.stop());
    // Wait until the listener is gone: new connections are refused.
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "shutdown stops accepting");
    stream.write_all(tail.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await.unwrap();
    let (status, body) = support::parse(&out);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"applied""#), "{body}");
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("the server stops").unwrap();
}

async fn a_foreign_node_id_names_the_op(storage: Storage) {
    let running = support::start_on(storage).await;
    let a = HttpTransport::new(&running.endpoint()).unwrap();
    let err = a.exchange(&req("a", None, vec![put("a", "x", 1, 1), put("b", "y", 1, 1)])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ForeignNodeId));
    assert!(matches!(err, tide_transport::Error::Status { status: 400, op: Some(1), .. }));
}

async fn gzip_requests_and_responses(storage: Storage) {
    use std::io::Write as _;
    let running = support::start_on(storage).await;
    let ops: Vec<Op> = (1..=50).map(|i| put("a", &format!("k{i}"), i, i64::try_from(i).unwrap())).collect();
    let body = serde_json::to_vec(&req("a", None, ops)).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&body).unwrap();
    let gz = enc.finish().unwrap();
    let mut bytes = format!(
        "POST /sync HTTP/1.1\r\nhost: x\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&gz);
    let (status, body) = raw(running.addr, &bytes).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.matches(r#""status":"applied""#).count(), 50);
    // A client that accepts gzip gets a compressed page, which decodes.
    let pull = HttpTransport::new(&running.endpoint()).unwrap().exchange(&req("b", None, vec![])).await.unwrap();
    assert_eq!(pull.changes.len(), 50);
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let q = r#"{"node_id":"b"}"#;
    let head = format!(
        "POST /sync HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{q}",
        q.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.to_ascii_lowercase().contains("content-encoding: gzip"), "the page was compressed");
}

/// A node id belongs to the first principal that writes with it: another
/// principal of the namespace gets 403 for writes and reads under it, and
/// the owner's data is untouched (PROTOCOL.md §7, `forbidden`).
async fn a_node_id_is_bound_to_its_first_principal(storage: Storage) {
    let tokens = StaticTokens::parse_file("tok-alice shared\ntok-mallory shared\n").unwrap();
    let running = support::start_on_with(storage, ServerConfig::default(), Arc::new(tokens)).await;
    let as_token = |t: &str| {
        HttpTransport::builder(&running.endpoint()).header("authorization", format!("Bearer {t}")).build().unwrap()
    };
    let (alice, mallory) = (as_token("tok-alice"), as_token("tok-mallory"));
    alice.exchange(&req("alice-phone", None, vec![put("alice-phone", "k", 1, 1)])).await.unwrap();

    let forged = mallory.exchange(&req("alice-phone", None, vec![put("alice-phone", "k", 9, 2)])).await.unwrap_err();
    assert_eq!(forged.code(), Some(ErrorCode::Forbidden), "{forged}");
    let read = mallory.exchange(&req("alice-phone", Some(1), vec![])).await.unwrap_err();
    assert_eq!(read.code(), Some(ErrorCode::Forbidden), "{read}");
    // Under a node id of its own, mallory reads and writes as usual.
    let own = mallory.exchange(&req("mallory", None, vec![])).await.unwrap();
    assert_eq!(own.changes.len(), 1);
    assert_eq!(own.changes[0].payload, Payload::Put(doc(json!({"v": 1}))), "alice's version is untouched");
    alice.exchange(&req("alice-phone", Some(1), vec![put("alice-phone", "k", 2, 3)])).await.unwrap();
}

/// Digests stay right when the log of bucket deltas is folded into the
/// bucket rows (past the configured number of logged rows), as the model
/// computes them.
async fn digests_survive_folding_the_bucket_log(storage: Storage) {
    let auth = Arc::new(tide_server::NoAuth::new("default"));
    let running = support::start_with_digest_log(storage, ServerConfig::default(), auth, Some(2_000)).await;
    let t = HttpTransport::new(&running.endpoint()).unwrap();
    let mut model = tide_core::digest::DigestTree::new();
    let n: usize = 4_500;
    for start in (0..n).step_by(1_000) {
        let ops: Vec<Op> = (start..n.min(start + 1_000)).map(|i| put("w", &format!("k{i}"), 1, 1)).collect();
        for op in &ops {
            let hash = tide_core::digest::payload_hash(&op.collection, &op.id, &op.stamp, &op.payload);
            model.replace(&op.collection, &op.id, None, Some(hash));
        }
        let mut r = req("w", None, ops);
        r.limit = Some(1);
        t.exchange(&r).await.unwrap();
    }
    let mut groups = req("w", None, vec![]);
    groups.limit = Some(1);
    groups.verify = Some(tide_core::Verify::Groups { collection: "notes".into() });
    assert_eq!(t.exchange(&groups).await.unwrap().groups.unwrap(), model.groups("notes"));
    let all: Vec<u16> = (0..256).collect();
    groups.verify = Some(tide_core::Verify::Buckets { collection: "notes".into(), groups: all.clone() });
    assert_eq!(t.exchange(&groups).await.unwrap().buckets.unwrap(), model.buckets("notes", &all));
    // At the end of the stream (its own writes skipped), the roots are sent.
    let mut roots = req("w", Some(n as u64), vec![]);
    roots.verify = Some(tide_core::Verify::Roots);
    assert_eq!(t.exchange(&roots).await.unwrap().roots.unwrap(), model.roots());
}

on_both_backends!(
    digests_survive_folding_the_bucket_log,
    a_node_id_is_bound_to_its_first_principal,
    two_clients_converge_with_per_op_results,
    a_cursor_beyond_the_namespace_is_reset,
    namespaces_are_isolated_by_token,
    an_unavailable_verifier_is_a_503_never_a_pass,
    health_readiness_metrics_and_routes,
    shutdown_lets_an_in_flight_exchange_finish,
    a_foreign_node_id_names_the_op,
    gzip_requests_and_responses,
);

/// A server database written by a newer build is refused by name and left
/// exactly as it was.
#[tokio::test]
async fn a_newer_server_schema_is_refused_and_left_alone() {
    use sqlx::Connection as _;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.db");
    let open = || SqliteBackend::open(&path, Durability::Normal, Limits::default());
    drop(open().await.unwrap());
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    sqlx::query("UPDATE tide_server_meta SET value = '99' WHERE key = 'schema_version'")
        .execute(&mut conn)
        .await
        .unwrap();

    let Err(err) = open().await else { panic!("a v99 database opened") };
    let text = err.to_string();
    assert!(text.contains("schema v99") && text.contains("(v4)"), "{text}");
    let version: String = sqlx::query_scalar("SELECT value FROM tide_server_meta WHERE key = 'schema_version'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, "99");
}

/// The tables of a version-1 database, as tide 0.1 wrote them (frozen here).
const SCHEMA_V1: &str = r#"
CREATE TABLE tide_server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO tide_server_meta (key, value) VALUES ('schema_version', '1');
CREATE TABLE tide_namespaces (namespace TEXT PRIMARY KEY, seq INTEGER NOT NULL, lamport_max INTEGER NOT NULL);
CREATE TABLE tide_rows (
    namespace TEXT NOT NULL, collection TEXT NOT NULL, id TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL,
    node_id TEXT NOT NULL, deleted INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (namespace, collection, id));
CREATE UNIQUE INDEX tide_rows_by_seq ON tide_rows (namespace, seq);
INSERT INTO tide_namespaces VALUES ('default', 3, 7), ('other', 1, 1);
INSERT INTO tide_rows VALUES
    ('default', 'notes', 'a', '{"t":"é\"\\","n":1.5}', 5, 'n1', 0, 1),
    ('default', 'notes', 'gone', NULL, 6, 'n2', 1, 2),
    ('default', 'todo', 'b', '{"done":false}', 7, 'n1', 0, 3),
    ('other', 'notes', 'a', '{"x":[1,{"y":null}]}', 1, 'n3', 0, 1);
"#;

/// What a version-2 database adds (tide 0.1 with digests, frozen here).
const SCHEMA_V2: &str = r"
ALTER TABLE tide_rows ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
CREATE TABLE tide_digest (namespace TEXT NOT NULL, level INTEGER NOT NULL, collection TEXT NOT NULL,
    ix INTEGER NOT NULL, hash INTEGER NOT NULL, PRIMARY KEY (namespace, level, collection, ix)) WITHOUT ROWID;
CREATE TABLE tide_digest_log (namespace TEXT NOT NULL, collection TEXT NOT NULL, bucket INTEGER NOT NULL,
    delta INTEGER NOT NULL);
CREATE TABLE tide_nodes (namespace TEXT NOT NULL, node_id TEXT NOT NULL, principal TEXT NOT NULL,
    chain_last TEXT, chain_before TEXT, chain_height INTEGER, PRIMARY KEY (namespace, node_id)) WITHOUT ROWID;
INSERT INTO tide_digest VALUES ('default', 0, 'notes', 0, 12345);
INSERT INTO tide_nodes VALUES ('default', 'n1', 'alice', 'link', '', 4);
UPDATE tide_server_meta SET value = '2' WHERE key = 'schema_version';
";

/// Version 4 back to 3: no horizons, no incarnation starts.
const DOWN_TO_V3: &str = "ALTER TABLE tide_namespaces DROP COLUMN horizon; \
    ALTER TABLE tide_namespaces DROP COLUMN horizon_lamport; ALTER TABLE tide_namespaces DROP COLUMN horizon_node; \
    ALTER TABLE tide_changes DROP COLUMN born; UPDATE tide_server_meta SET value = '3' WHERE key = 'schema_version';";

/// A database written by an earlier build (schema 1, 2 or 3) opens with
/// every version served exactly as before, its digests recomputed from the
/// versions, its node bindings and chains kept, and writes go on from its seqs.
#[tokio::test]
async fn databases_of_earlier_schemas_are_migrated_with_nothing_lost() {
    use sqlx::Connection as _;
    use tide_server::{Backend, Namespace};
    for version in [1, 2, 3] {
        let v2 = version >= 2;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(SCHEMA_V1).execute(&mut conn).await.unwrap();
        if v2 {
            sqlx::raw_sql(SCHEMA_V2).execute(&mut conn).await.unwrap();
        }
        drop(conn);
        if version == 3 {
            // Through this build's migration to 4, then back to how 3 was.
            drop(SqliteBackend::open(&path, Durability::Normal, Limits::default()).await.unwrap());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(DOWN_TO_V3).execute(&mut conn).await.unwrap();
        }
        let backend = SqliteBackend::open(&path, Durability::Normal, Limits::default()).await.unwrap();
        let principal = |id: &str| Principal { id: id.into(), namespace: Namespace::new("default") };

        let page = backend.exchange(&principal("bob"), Arc::new(req("r", None, vec![]))).await.unwrap().to_response();
        let expected = json!([
            {"collection": "notes", "id": "a", "kind": "put", "doc": {"t": "é\"\\", "n": 1.5}, "lamport": 5, "node_id": "n1", "seq": 1},
            {"collection": "notes", "id": "gone", "kind": "delete", "doc": null, "lamport": 6, "node_id": "n2", "seq": 2},
            {"collection": "todo", "id": "b", "kind": "put", "doc": {"done": false}, "lamport": 7, "node_id": "n1", "seq": 3},
        ]);
        assert_eq!(serde_json::to_value(&page.changes).unwrap(), expected, "v2: {v2}");
        assert_eq!(page.cursor, Cursor(3));

        // The roots are the digests of the live versions, whatever was stored before.
        let mut model = support::model_of(&page.changes);
        let mut ask = req("r", Some(3), vec![]);
        ask.verify = Some(tide_core::Verify::Roots);
        let roots = backend.exchange(&principal("bob"), Arc::new(ask.clone())).await.unwrap().to_response().roots;
        assert_eq!(roots, model.exchange(&ask).unwrap().roots, "v2: {v2}");

        // Bindings survive: n1 is alice's in a version-2 database.
        let write = req("n1", Some(3), vec![put("n1", "new", 8, 1)]);
        if v2 {
            let by_mallory = backend.exchange(&principal("mallory"), Arc::new(write.clone())).await;
            assert!(by_mallory.is_err(), "n1 is alice's");
        }
        let owner = if v2 { "alice" } else { "mallory" };
        let written = backend.exchange(&principal(owner), Arc::new(write)).await.unwrap();
        assert_eq!(written.results, [OpResult::Applied { seq: 4 }], "v2: {v2}");
    }
}

/// Space freed by replacing large documents with tombstones goes back to
/// the file system a step at a time, and a file made before incremental
/// vacuum is converted once when opened.
#[tokio::test]
async fn freed_space_goes_back_to_the_file_system() {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    // A file made without incremental vacuum, as earlier builds made them.
    let mut old =
        sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true).connect().await.unwrap();
    sqlx::query("CREATE TABLE leftover (x)").execute(&mut old).await.unwrap();
    old.close().await.unwrap();

    let backend = SqliteBackend::open(&path, Durability::Full, Limits::default()).await.unwrap();
    let principal = Principal { id: "p".into(), namespace: tide_server::Namespace::new("default") };
    let pages = || async {
        let mut c = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).read_only(true).connect().await.unwrap();
        let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum").fetch_one(&mut c).await.unwrap();
        let count: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(&mut c).await.unwrap();
        c.close().await.unwrap();
        (mode, count)
    };
    assert_eq!(pages().await.0, 2, "converted to incremental vacuum");
    let write = |i: u64, payload: Payload| {
        let mut req = SyncRequest::new("n", None);
        req.limit = Some(1);
        req.ops = vec![Op {
            collection: "c".into(),
            id: format!("k{}", i % 200),
            stamp: Stamp::new(i, "n"),
            payload,
            op_id: None,
        }];
        Arc::new(req)
    };
    let big = json!({"blob": "x".repeat(48 * 1024)}).as_object().cloned().unwrap();
    for i in 1..=400 {
        backend.exchange(&principal, write(i, Payload::Put(big.clone().into()))).await.unwrap();
    }
    let full = pages().await.1;
    for i in 401..=800 {
        backend.exchange(&principal, write(i, Payload::Delete)).await.unwrap();
    }
    // Enough groups after the deletes for the writer to look at its free
    // pages: it gives back all but VACUUM_FREE_PAGES_MIN of those freed.
    let mut small = 801;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pages().await.1 > full - 2 * tide_server::VACUUM_PAGES_PER_STEP {
        assert!(tokio::time::Instant::now() < deadline, "the file never shrank from {full} pages");
        for _ in 0..tide_server::VACUUM_CHECK_GROUPS {
            let doc = json!({"n": small}).as_object().cloned().unwrap();
            backend.exchange(&principal, write(small, Payload::Put(doc.into()))).await.unwrap();
            small += 1;
        }
    }
    // What is stored is all there: a version of every key.
    let mut keys = std::collections::BTreeSet::new();
    let mut cursor = None;
    loop {
        let page = backend.exchange(&principal, Arc::new(SyncRequest::new("r", cursor))).await.unwrap().to_response();
        keys.extend(page.changes.into_iter().map(|c| c.id));
        cursor = Some(page.cursor);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(keys.len(), 200);
}

/// Mounted in an application that authenticates requests itself, the
/// server takes the `Principal` the application put in the request's
/// extensions and never asks its own authenticator; without one it does.
#[tokio::test]
async fn a_principal_set_by_the_embedding_application_is_taken_as_given() {
    use http_body_util::BodyExt as _;
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, Limits::default()).await.unwrap();
    // A token list nobody's request matches.
    let server = tide_server::Server::new(
        backend,
        Arc::new(StaticTokens::new([("only-this", "elsewhere")])),
        ServerConfig::default(),
    );
    let body =
        r#"{"node_id":"n","ops":[{"collection":"c","id":"i","kind":"put","doc":{"v":1},"lamport":1,"node_id":"n"}]}"#;
    let request = |principal: Option<Principal>| {
        let mut req = http::Request::post("/sync").body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap();
        if let Some(p) = principal {
            req.extensions_mut().insert(p);
        }
        req
    };
    let refused = server.handle(request(None)).await;
    assert_eq!(refused.status(), 401, "no token, no principal: refused");
    let ann = Principal { id: "ann".into(), namespace: tide_server::Namespace::new("user-ann") };
    let answered = server.handle(request(Some(ann.clone()))).await;
    assert_eq!(answered.status(), 200);
    let text = answered.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains(r#""results":[{"status":"applied","seq":1}]"#), "{text:?}");
    // Ann's namespace holds the write; another user's is empty.
    let pull = |p: Principal| {
        let mut req = http::Request::post("/sync")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"node_id":"r"}"#)))
            .unwrap();
        req.extensions_mut().insert(p);
        req
    };
    let ann_sees = server.handle(pull(ann)).await.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&ann_sees).contains(r#""id":"i""#));
    let bob = Principal { id: "bob".into(), namespace: tide_server::Namespace::new("user-bob") };
    let bob_sees = server.handle(pull(bob)).await.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&bob_sees).contains(r#""changes":[]"#), "{bob_sees:?}");
}
