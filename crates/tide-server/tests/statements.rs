//! How many SQL statements an exchange costs on SQLite, counted from
//! sqlx's own log of every statement it runs, so the number cannot creep
//! back up unnoticed. (A binary of its own: the count is process-wide.)

use std::sync::{Arc, Mutex};

use serde_json::json;
use tide_core::{Cursor, Limits, Lineage, Op, Payload, Stamp, SyncRequest};
use tide_server::{Backend, Durability, Namespace, Principal, SqliteBackend};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// The summaries of the statements sqlx ran, in order.
#[derive(Clone, Default)]
struct Statements(Arc<Mutex<Vec<String>>>);

impl Statements {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Summary(String);

impl Visit for Summary {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "summary" {
            value.clone_into(&mut self.0);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            let mut summary = Summary(String::new());
            event.record(&mut summary);
            self.0.lock().unwrap().push(summary.0);
        }
    }
}

fn write(node: &str, n: u64, cursor: u64, lineage: u64) -> Arc<SyncRequest> {
    let mut req = SyncRequest::new(node, Some(Cursor(cursor)));
    req.ops = (0..10)
        .map(|i| Op {
            collection: "notes".into(),
            id: format!("k{i}"),
            stamp: Stamp::new(n * 10 + i, node),
            payload: Payload::Put(json!({"n": n, "i": i}).as_object().unwrap().clone()),
            op_id: None,
        })
        .collect();
    let prev = (lineage > 1).then(|| format!("t{}", lineage - 1));
    req.lineage = Some(Lineage { prev, next: format!("t{lineage}"), height: lineage });
    Arc::new(req)
}

#[tokio::test]
async fn an_exchange_is_one_write_group_and_one_page_statement() {
    let statements = Statements::default();
    tracing_subscriber::registry().with(statements.clone()).init();
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, Limits::default()).await.unwrap();
    let principal = Principal { id: "alice".into(), namespace: Namespace::new("default") };

    // The first exchange of a node binds it to its principal.
    backend.exchange(&principal, write("a", 1, 0, 1)).await.unwrap();
    statements.take();

    // A write exchange: the write group's statements, then one page statement.
    let reply = backend.exchange(&principal, write("a", 2, 10, 2)).await.unwrap();
    assert_eq!(reply.results.len(), 10);
    let ran = statements.take();
    let expected = [
        "INSERT INTO tide_namespaces …",               // the namespace's counters, locked
        "SELECT json_group_array(json_array(j.key, …", // the node's binding and chain
        "SELECT json_group_array(json_array(j.key, …", // the stored versions of the keys
        "INSERT INTO tide_changes …",                  // the versions written
        "INSERT INTO tide_digest …",                   // the roots
        "INSERT INTO tide_digest_log …",               // the bucket deltas
        "UPDATE tide_nodes …",                         // the chain moved on
        "UPDATE tide_namespaces …",                    // the counters
        "WITH g(total, n) AS …",                       // the page
    ];
    assert_eq!(ran.len(), expected.len(), "{ran:#?}");
    for (ran, expected) in ran.iter().zip(expected) {
        assert!(ran.starts_with(expected.trim_end_matches(" …")), "{ran:?} is not {expected:?}");
    }

    // A pull is one statement.
    backend.exchange(&principal, Arc::new(SyncRequest::new("b", Some(Cursor(20))))).await.unwrap();
    let ran = statements.take();
    // The node's binding is looked up once, then known.
    assert_eq!(ran.len(), 2, "{ran:#?}");
    backend.exchange(&principal, Arc::new(SyncRequest::new("b", Some(Cursor(20))))).await.unwrap();
    let ran = statements.take();
    assert_eq!(ran.len(), 1, "{ran:#?}");
    assert!(ran[0].starts_with("WITH g(total, n) AS"), "{ran:?}");
}
