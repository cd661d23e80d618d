//! The PostgreSQL backend: several `tide-server` processes on one database.
//!
//! **The cursor problem and how it is solved.** Sequence numbers taken in
//! one order can commit in another: with a plain sequence, a pull between
//! two commits could move a client's cursor past a change that commits
//! later, and the client would never see it. Here every write transaction
//! of a namespace first locks that namespace's row (`SELECT … FOR UPDATE`),
//! takes its seqs from the counter on that row, and holds the lock until it
//! commits. So within a namespace, seqs are assigned and committed in the
//! same order: any snapshot sees a prefix of the seqs, and a pull never
//! skips or repeats a change, whatever the number of writers or server
//! processes. Writes to one namespace are serialized (as SQLite serializes
//! all writes); different namespaces write in parallel. Same-key conflicts
//! are decided under that lock by `tide_core::decide`, so there are no lost
//! updates, and one lock per transaction means no deadlocks.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use tide_core::{Cursor, Limits, OpResult, Payload, Stamp, SyncRequest};

use super::{
    Backend, BackendError, CommitCallback, PageRow, Reply, SELECT_SCHEMA_VERSION, Written, check_lead,
    check_schema_version, decide_all, page_start, render_change,
};
use crate::auth::Namespace;

/// Connections in the PostgreSQL pool of one server process.
pub const POSTGRES_POOL_MAX: u32 = 16;

/// The channel commits are announced on, for servers holding long-polls.
const COMMITS_CHANNEL: &str = "tide_commits";

/// A constant key for the advisory lock that serializes migrations when
/// several servers start together.
const MIGRATION_LOCK: i64 = 0x7469_6465; // "tide"

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tide_server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO tide_server_meta (key, value) VALUES ('schema_version', '1') ON CONFLICT DO NOTHING",
    r#"CREATE TABLE IF NOT EXISTS tide_namespaces (
        namespace   TEXT COLLATE "C" PRIMARY KEY,
        seq         BIGINT NOT NULL,
        lamport_max BIGINT NOT NULL)"#,
    // Text columns compare bytewise (COLLATE "C"), as Rust and SQLite do.
    // Documents are the exact compact JSON text written by serde (not
    // jsonb, which would reorder keys and refuse \u0000).
    r#"CREATE TABLE IF NOT EXISTS tide_rows (
        namespace  TEXT COLLATE "C" NOT NULL,
        collection TEXT COLLATE "C" NOT NULL,
        id         TEXT COLLATE "C" NOT NULL,
        doc        TEXT,
        lamport    BIGINT NOT NULL,
        node_id    TEXT COLLATE "C" NOT NULL,
        deleted    BOOLEAN NOT NULL,
        seq        BIGINT NOT NULL,
        PRIMARY KEY (namespace, collection, id))"#,
    "CREATE UNIQUE INDEX IF NOT EXISTS tide_rows_by_seq ON tide_rows (namespace, seq)",
];

/// A stored version as a page reads it: seq, collection, id, doc, lamport, node id, deleted.
type StoredRow = (i64, String, String, Option<String>, i64, String, bool);

/// The PostgreSQL backend.
pub struct PostgresBackend {
    pool: PgPool,
    limits: Limits,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend").finish_non_exhaustive()
    }
}

#[expect(clippy::needless_pass_by_value, reason = "the shape `map_err` wants")]
fn unavailable(e: sqlx::Error) -> BackendError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            BackendError::Unavailable(e.to_string())
        }
        _ => BackendError::Internal(e.to_string()),
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).expect("stored counters are never negative")
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("counters stay below 2^53")
}

impl PostgresBackend {
    /// Connects to `url` (for example `postgres://user@host/db`; a
    /// `?options[search_path]=schema` parameter picks a schema) and brings
    /// the schema up to date. Safe when several servers start together.
    pub async fn open(url: &str, limits: Limits) -> Result<Arc<Self>, BackendError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| BackendError::Internal(format!("database url: {e}")))?;
        let pool =
            PgPoolOptions::new().max_connections(POSTGRES_POOL_MAX).connect_with(options).await.map_err(unavailable)?;
        let mut tx = pool.begin().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        for statement in SCHEMA {
            sqlx::query(*statement).execute(&mut *tx).await.map_err(unavailable)?;
        }
        let version: String =
            sqlx::query_scalar(SELECT_SCHEMA_VERSION).fetch_one(&mut *tx).await.map_err(unavailable)?;
        check_schema_version(&version)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Arc::new(Self { pool, limits }))
    }

    async fn apply(&self, ns: &Namespace, req: &SyncRequest) -> Result<Vec<OpResult>, BackendError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO tide_namespaces (namespace, seq, lamport_max) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
        )
        .bind(ns.as_str())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        // The namespace lock: held to commit, it makes seq order commit order.
        let (seq, lamport_max): (i64, i64) =
            sqlx::query_as("SELECT seq, lamport_max FROM tide_namespaces WHERE namespace = $1 FOR UPDATE")
                .bind(ns.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        let (seq, lamport_max) = (to_u64(seq), to_u64(lamport_max));
        check_lead(req, lamport_max, self.limits.lamport_lead_max)?;

        let keys: Vec<(&str, &str)> = req.ops.iter().map(|o| (o.collection.as_str(), o.id.as_str())).collect();
        let (collections, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let rows: Vec<(String, String, i64, String, bool, Option<String>)> = sqlx::query_as(
            "SELECT r.collection, r.id, r.lamport, r.node_id, r.deleted, r.doc FROM tide_rows r \
             JOIN UNNEST($2::text[], $3::text[]) AS k(collection, id) ON r.collection = k.collection AND r.id = k.id \
             WHERE r.namespace = $1",
        )
        .bind(ns.as_str())
        .bind(&collections)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut current: HashMap<(&str, &str), (Stamp, Payload)> = HashMap::new();
        for (collection, id, lamport, node, deleted, doc) in rows {
            let Some(&key) = keys.iter().find(|k| k.0 == collection && k.1 == id) else { continue };
            let payload = match (deleted, doc) {
                (false, Some(doc)) => Payload::Put(
                    serde_json::from_str(&doc).map_err(|e| BackendError::Internal(format!("stored document: {e}")))?,
                ),
                _ => Payload::Delete,
            };
            current.insert(key, (Stamp::new(to_u64(lamport), node), payload));
        }
        let (results, written, seq) = decide_all(req, &keys, current, seq);
        upsert(&mut tx, ns, req, &written).await?;
        let op_max = req.ops.iter().map(|o| o.stamp.lamport).max().unwrap_or(0);
        sqlx::query(
            "UPDATE tide_namespaces SET seq = $2, lamport_max = GREATEST(lamport_max, $3) WHERE namespace = $1",
        )
        .bind(ns.as_str())
        .bind(to_i64(seq))
        .bind(to_i64(op_max))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if results.iter().any(|r| matches!(r, OpResult::Applied { .. })) {
            // Delivered to every listening server when the transaction commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(COMMITS_CHANNEL)
                .bind(ns.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(results)
    }

    async fn page(
        &self,
        ns: &Namespace,
        req: &SyncRequest,
    ) -> Result<(String, usize, Cursor, bool, bool), BackendError> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let ns_seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM tide_namespaces WHERE namespace = $1")
            .bind(ns.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?;
        let (mut page, skip_own, reset) = page_start(req, to_u64(ns_seq.unwrap_or(0)), &self.limits);
        loop {
            let rows: Vec<StoredRow> = sqlx::query_as(
                "SELECT seq, collection, id, doc, lamport, node_id, deleted FROM tide_rows \
                 WHERE namespace = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(ns.as_str())
            .bind(to_i64(page.after()))
            .bind(i64::try_from(page.window()).expect("a window is small"))
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?;
            let rows = rows
                .into_iter()
                .map(|(seq, collection, id, doc, lamport, node_id, deleted)| {
                    let seq = to_u64(seq);
                    let own = skip_own && node_id == req.node_id;
                    let doc = if deleted { None } else { doc };
                    // Own rows are only skipped: no need to render them.
                    let json = if own {
                        String::new()
                    } else {
                        render_change(&collection, &id, doc.as_deref(), to_u64(lamport), &node_id, seq)
                    };
                    PageRow { seq, own, json }
                })
                .collect();
            if page.feed(rows) {
                break;
            }
        }
        let (json, count, cursor, has_more) = page.finish();
        Ok((json, count, cursor, has_more, reset))
    }
}

/// Stores the last applied op of each key written by a request.
async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    ns: &Namespace,
    req: &SyncRequest,
    written: &Written<'_>,
) -> Result<(), BackendError> {
    if written.is_empty() {
        return Ok(());
    }
    let mut order: Vec<(usize, u64)> = written.values().copied().collect();
    order.sort_by_key(|&(_, seq)| seq);
    let ops: Vec<_> = order.iter().map(|&(i, _)| &req.ops[i]).collect();
    let collections: Vec<&str> = ops.iter().map(|o| o.collection.as_str()).collect();
    let ids: Vec<&str> = ops.iter().map(|o| o.id.as_str()).collect();
    let docs: Vec<Option<String>> =
        ops.iter().map(|o| o.payload.doc().map(|d| serde_json::to_string(d).expect("documents serialize"))).collect();
    let lamports: Vec<i64> = ops.iter().map(|o| to_i64(o.stamp.lamport)).collect();
    let nodes: Vec<&str> = ops.iter().map(|o| o.stamp.node_id.as_str()).collect();
    let deleted: Vec<bool> = docs.iter().map(Option::is_none).collect();
    let seqs: Vec<i64> = order.iter().map(|&(_, seq)| to_i64(seq)).collect();
    sqlx::query(
        "INSERT INTO tide_rows (namespace, collection, id, doc, lamport, node_id, deleted, seq) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bool[], $8::bigint[]) \
         ON CONFLICT (namespace, collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, \
         node_id = excluded.node_id, deleted = excluded.deleted, seq = excluded.seq",
    )
    .bind(ns.as_str())
    .bind(&collections)
    .bind(&ids)
    .bind(&docs)
    .bind(&lamports)
    .bind(&nodes)
    .bind(&deleted)
    .bind(&seqs)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn exchange(&self, namespace: &Namespace, request: Arc<SyncRequest>) -> Result<Reply, BackendError> {
        let results = if request.ops.is_empty() { Vec::new() } else { self.apply(namespace, &request).await? };
        let (changes_json, change_count, cursor, has_more, reset) = self.page(namespace, &request).await?;
        Ok(Reply { results, cursor, changes_json, change_count, has_more, reset })
    }

    async fn ready(&self) -> Result<(), BackendError> {
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn listen(&self, on_commit: CommitCallback) -> Result<(), BackendError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.map_err(unavailable)?;
        listener.listen(COMMITS_CHANNEL).await.map_err(unavailable)?;
        tokio::spawn(async move {
            loop {
                let keep = match listener.recv().await {
                    Ok(n) => on_commit(n.payload()),
                    Err(e) => {
                        // The listener reconnects; what was sent meanwhile is lost,
                        // so wake everyone to look.
                        tracing::warn!(error = %e, "commit notifications interrupted");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        on_commit("")
                    }
                };
                if !keep {
                    return;
                }
            }
        });
        Ok(())
    }
}
