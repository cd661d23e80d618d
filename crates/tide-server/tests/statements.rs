//! How many SQL statements an exchange costs on SQLite and on PostgreSQL,
//! counted from sqlx's own log of every statement it runs, so the number
//! cannot creep back up unnoticed. (A binary of its own, and one test: the
//! count is process-wide.)

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};

use serde_json::json;
use tide_core::{Cursor, Limits, Lineage, Op, Payload, Stamp, SyncRequest};
use tide_server::{Backend, Durability, Namespace, PostgresBackend, Principal, SqliteBackend};
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

/// A logged statement's text: the whole SQL when sqlx logs it (a long
/// one), else its summary (which is then the whole SQL).
#[derive(Default)]
struct Summary {
    summary: String,
    sql: String,
}

impl Visit for Summary {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => value.clone_into(&mut self.summary),
            "db.statement" => value.trim().clone_into(&mut self.sql),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            let mut summary = Summary::default();
            event.record(&mut summary);
            let text = if summary.sql.is_empty() { summary.summary } else { summary.sql };
            self.0.lock().unwrap().push(text);
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
            payload: Payload::Put(json!({"n": n, "i": i}).as_object().unwrap().clone().into()),
            op_id: None,
        })
        .collect();
    let prev = (lineage > 1).then(|| format!("t{}", lineage - 1));
    req.lineage = Some(Lineage { prev, next: format!("t{lineage}"), height: lineage });
    Arc::new(req)
}

/// The first three words of each statement of a multi-statement call.
fn statements_of(sql: &str) -> Vec<String> {
    sql.split(';').map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).collect()
}

#[tokio::test]
async fn an_exchange_is_one_write_group_and_one_page_statement() {
    let statements = Statements::default();
    tracing_subscriber::registry().with(statements.clone()).init();
    on_sqlite(&statements).await;
    on_postgres(&statements).await;
}

async fn on_sqlite(statements: &Statements) {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, Limits::default()).await.unwrap();
    let principal = Principal { id: "alice".into(), namespace: Namespace::new("default") };

    // The first exchange of a node binds it to its principal.
    backend.exchange(&principal, write("a", 1, 0, 1)).await.unwrap();
    statements.take();

    // A write exchange: the write group's two calls (each several
    // statements SQLite runs in one go) and one page statement, read
    // beside them (the cursor is past the start), so in any order.
    let reply = backend.exchange(&principal, write("a", 2, 10, 2)).await.unwrap();
    assert_eq!(reply.results.len(), 10);
    let mut ran = statements.take();
    assert_eq!(ran.len(), 3, "{ran:#?}");
    let page =
        ran.iter().position(|s| s.starts_with("SELECT ns.seq, ns.horizon, ns.size_max")).expect("a page statement");
    let page = ran.remove(page);
    // Begin; lock the counters; bind new node ids; read nodes and stored versions.
    assert_eq!(
        statements_of(&ran[0]),
        [
            "BEGIN IMMEDIATE",
            "INSERT INTO tide_namespaces",
            "INSERT INTO tide_nodes",
            "SELECT json_group_array(json_array(j.key, n.principal,",
            "SELECT json_group_array(json_array(j.key, r.lamport,"
        ],
        "{ran:#?}"
    );
    // Versions, roots, bucket deltas, chains, counters; commit.
    assert_eq!(
        statements_of(&ran[1]),
        [
            "INSERT INTO tide_changes",
            "INSERT INTO tide_digest",
            "INSERT INTO tide_digest_log",
            "UPDATE tide_nodes SET",
            "UPDATE tide_namespaces SET",
            "COMMIT"
        ],
        "{ran:#?}"
    );
    assert!(page.contains("node_id <> ?3"), "the page skips the writer's own changes: {page}");

    // A pull is one statement.
    backend.exchange(&principal, Arc::new(SyncRequest::new("b", Some(Cursor(20))))).await.unwrap();
    let ran = statements.take();
    // The node's binding is looked up once, then known.
    assert_eq!(ran.len(), 2, "{ran:#?}");
    backend.exchange(&principal, Arc::new(SyncRequest::new("b", Some(Cursor(20))))).await.unwrap();
    let ran = statements.take();
    assert_eq!(ran.len(), 1, "{ran:#?}");
    assert!(ran[0].starts_with("SELECT ns.seq, ns.horizon, ns.size_max"), "{ran:?}");
}

async fn on_postgres(statements: &Statements) {
    let Some(url) = common::service("TIDE_TEST_POSTGRES_URL", "PostgreSQL's statements per exchange") else {
        return;
    };
    let url = common::fresh_schema(&url).await;
    let backend = PostgresBackend::open(&url, tide_server::Durability::Full, Limits::default()).await.unwrap();
    let principal = Principal { id: "alice".into(), namespace: Namespace::new("default") };
    backend.exchange(&principal, write("a", 1, 0, 1)).await.unwrap();
    statements.take();

    // A write exchange: the write group's read and its conditional write,
    // which commits (no transaction around them), then the page.
    let reply = backend.exchange(&principal, write("a", 2, 10, 2)).await.unwrap();
    assert_eq!(reply.results.len(), 10);
    let mut ran = statements.take();
    assert_eq!(ran.len(), 3, "{ran:#?}");
    let page = ran.iter().position(|s| s.starts_with("SELECT ns.seq, ns.horizon,")).expect("a page statement");
    ran.remove(page);
    let words: Vec<Vec<String>> = ran.iter().map(|sql| statements_of(sql)).collect();
    assert_eq!(words, [["WITH made AS"], ["WITH n AS"]], "{ran:#?}");
    assert!(ran[1].contains("UPDATE tide_namespaces") && ran[1].contains("xmin::text = $26"), "{ran:#?}");

    // A pull is one statement.
    backend.exchange(&principal, Arc::new(SyncRequest::new("a", Some(Cursor(20))))).await.unwrap();
    let ran = statements.take();
    assert_eq!(ran.len(), 1, "{ran:#?}");
    assert!(ran[0].starts_with("SELECT ns.seq, ns.horizon, ns.size_max"), "{ran:?}");
}
