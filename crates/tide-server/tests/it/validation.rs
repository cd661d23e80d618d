//! The embedding application's validator: it accepts, refuses or rewrites
//! each op inside the write group, on both backends, in groups of many
//! requests; a retried rewritten op is a duplicate; and a client converges
//! on the rewritten document.

use std::sync::Arc;

use serde_json::{Value, json};
use tide_core::{ErrorCode, Op, OpResult, Payload, Stamp, SyncRequest};
use tide_server::{Backend, Durability, Namespace, Principal, Validator, Verdict};

/// Notes must have a title; the server stamps who wrote them.
struct NotesNeedATitle;

impl Validator for NotesNeedATitle {
    fn validate(&self, principal: &Principal, op: &Op) -> Verdict {
        #[derive(serde::Deserialize)]
        struct Note {
            #[expect(dead_code, reason = "its presence is the rule")]
            title: String,
        }
        let Payload::Put(doc) = &op.payload else { return Verdict::Accept };
        if doc.decode::<Note>().is_err() {
            return Verdict::Reject("a note needs a title".into());
        }
        let mut map = doc.to_map();
        map.insert("author".into(), json!(principal.id));
        Verdict::Rewrite(map.into())
    }
}

fn request(node: &str, lamport: u64) -> Arc<SyncRequest> {
    let op = |id: String, lamport: u64, payload: Payload| Op {
        collection: "notes".into(),
        id,
        stamp: Stamp::new(lamport, node),
        payload,
        op_id: None,
    };
    let doc = |v: Value| Payload::Put(tide_core::Doc::from_value(&v).unwrap());
    let mut req = SyncRequest::new(node, None);
    req.limit = Some(1);
    req.ops = vec![
        op(format!("{node}-good"), lamport, doc(json!({"title": "kept"}))),
        op(format!("{node}-bad"), lamport + 1, doc(json!({"body": "no title"}))),
        op(format!("{node}-gone"), lamport + 2, Payload::Delete),
    ];
    Arc::new(req)
}

async fn judged_in_groups(backend: Arc<dyn Backend>) {
    let alice = Principal { id: "alice".into(), namespace: Namespace::new("default") };
    let nodes: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    let replies = futures_util::future::join_all(nodes.iter().map(|n| backend.exchange(&alice, request(n, 10)))).await;
    for reply in replies {
        let results = reply.unwrap().results;
        assert!(matches!(results[0], OpResult::Applied { .. }), "{results:?}");
        assert_eq!(
            results[1],
            OpResult::Rejected { code: ErrorCode::ValidationFailed, message: "a note needs a title".into() }
        );
        assert!(matches!(results[2], OpResult::Applied { .. }), "{results:?}");
    }
    // A retry: the rewrite is the same document again, a duplicate.
    let again = backend.exchange(&alice, request("n0", 10)).await.unwrap().results;
    assert_eq!(again[0], OpResult::Duplicate, "{again:?}");
    assert_eq!(again[2], OpResult::Duplicate, "{again:?}");
    // What is stored: the rewritten notes, no refused one.
    let mut stored = Vec::new();
    let mut cursor = None;
    loop {
        let page = backend.exchange(&alice, Arc::new(SyncRequest::new("reader", cursor))).await.unwrap().to_response();
        stored.extend(page.changes);
        cursor = Some(page.cursor);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(stored.len(), 16, "a note and a tombstone per node");
    for change in &stored {
        assert!(!change.id.ends_with("-bad"));
        if let Some(doc) = change.payload.doc() {
            assert_eq!(doc.as_str(), r#"{"title":"kept","author":"alice"}"#);
        }
    }
}

#[tokio::test]
async fn a_validator_judges_every_op_inside_groups_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        tide_server::SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, tide_core::Limits::default())
            .await
            .unwrap();
    assert!(backend.set_validator(Arc::new(NotesNeedATitle)));
    judged_in_groups(backend).await;
}

#[tokio::test]
async fn a_validator_judges_every_op_inside_groups_on_postgres() {
    let Some(url) = crate::postgres::url() else { return };
    let url = crate::postgres::fresh_schema(&url).await;
    let backend =
        tide_server::PostgresBackend::open(&url, Durability::Full, tide_core::Limits::default()).await.unwrap();
    assert!(backend.set_validator(Arc::new(NotesNeedATitle)));
    judged_in_groups(backend).await;
}

/// A client converges on the document the server rewrote (the digest check
/// that ends its sync finds the same stamp with the server's text), and a
/// refused write lands in its rejected list.
#[tokio::test]
async fn a_client_converges_on_the_rewritten_document_and_learns_of_the_refused_one() {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        tide_server::SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, tide_core::Limits::default())
            .await
            .unwrap();
    backend.set_validator(Arc::new(NotesNeedATitle));
    let server = tide_server::Server::new(
        backend,
        Arc::new(tide_server::NoAuth::new("default")),
        tide_server::ServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    let tide = tide_client::Tide::builder().endpoint(&endpoint).node_id("phone").open().await.unwrap();
    let notes = tide.collection::<Value>("notes");
    notes.put("n1", &json!({"title": "groceries"})).await.unwrap();
    notes.put("n2", &json!({"body": "untitled"})).await.unwrap();
    let report = tide.sync_once().await.unwrap();
    assert_eq!(report.rejected, 1);
    assert_eq!(notes.get("n1").await.unwrap(), Some(json!({"title": "groceries", "author": "anonymous"})));
    let rejected = tide.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!((rejected[0].op.id.as_str(), rejected[0].code), ("n2", ErrorCode::ValidationFailed));
    assert_eq!(rejected[0].message, "a note needs a title");
    assert_eq!(tide.pending_count().await.unwrap(), 0);
    tide.close().await;
}
