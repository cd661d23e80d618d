//! The SQLite backend (the default): sqlx, WAL, one writer connection and
//! a few readers.
//!
//! Seqs are per namespace, like `tide_core::Model`'s: a namespace row holds
//! its counter and the highest counter seen, and every stored version has
//! the seq it was written under. SQLite has one writer, so seq order is
//! commit order and a page read after a commit never skips a change.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tide_core::digest::Hash64;
use tide_core::model::op_result;
use tide_core::{Cursor, Decision, Limits, OpResult, Payload, Stamp, SyncRequest, Verify, decide};
use tokio::sync::{Mutex, Semaphore, oneshot};

use super::Bindings;
use super::{
    Backend, BackendError, PageRow, Reply, SELECT_SCHEMA_VERSION, StoredVersion, VerifyReply, check_lead,
    check_schema_version, page_start,
};
use crate::auth::{Namespace, Principal};

/// Reader connections of the SQLite backend.
pub const SQLITE_READERS: usize = 4;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS tide_server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO tide_server_meta (key, value) VALUES ('schema_version', '1');
CREATE TABLE IF NOT EXISTS tide_namespaces (
    namespace   TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    lamport_max INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tide_rows (
    namespace  TEXT NOT NULL,
    collection TEXT NOT NULL,
    id         TEXT NOT NULL,
    doc        TEXT,
    lamport    INTEGER NOT NULL,
    node_id    TEXT NOT NULL,
    deleted    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (namespace, collection, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS tide_rows_by_seq ON tide_rows (namespace, seq);
";

/// Version 1 to 2: each row's digest bucket, the digest table (filled from
/// the rows by [`SqliteBackend::open`]), and the principal each node id is bound to.
const MIGRATE_V2: &str = r"
ALTER TABLE tide_rows ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
CREATE TABLE tide_digest (
    namespace  TEXT NOT NULL,
    level      INTEGER NOT NULL,
    collection TEXT NOT NULL,
    ix         INTEGER NOT NULL,
    hash       INTEGER NOT NULL,
    PRIMARY KEY (namespace, level, collection, ix)
) WITHOUT ROWID;
CREATE TABLE tide_digest_log (
    namespace  TEXT NOT NULL,
    collection TEXT NOT NULL,
    bucket     INTEGER NOT NULL,
    delta      INTEGER NOT NULL
);
CREATE TABLE tide_nodes (
    namespace    TEXT NOT NULL,
    node_id      TEXT NOT NULL,
    principal    TEXT NOT NULL,
    chain_last   TEXT,
    chain_before TEXT,
    chain_height INTEGER,
    PRIMARY KEY (namespace, node_id)
) WITHOUT ROWID;
UPDATE tide_server_meta SET value = '2' WHERE key = 'schema_version';
";

/// XORs rows of `(namespace, level, collection, ix, hash)` into the digest
/// table; SQLite has no XOR operator, so it is spelled `(a | b) & ~(a & b)`.
const UPSERT_DIGEST: &str = "INSERT INTO tide_digest (namespace, level, collection, ix, hash) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each(?1) WHERE true \
     ON CONFLICT (namespace, level, collection, ix) DO UPDATE SET \
     hash = (hash | excluded.hash) & ~(hash & excluded.hash)";
/// Durability of the server's commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: an acknowledged op survives power loss. The
    /// default: the client deletes an op from its outbox once acknowledged.
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster; the last commits may roll back on power loss.
    Normal,
}

/// The SQLite backend.
pub struct SqliteBackend {
    writer: Mutex<SqliteConnection>,
    readers: Vec<Mutex<SqliteConnection>>,
    free: Semaphore,
    limits: Limits,
    /// Requests waiting to be applied together (group commit).
    queue: std::sync::Mutex<Vec<Pending>>,
    draining: AtomicBool,
    bindings: Bindings,
    digest_log_rows_max: std::sync::atomic::AtomicI64,
}

/// A request waiting for the next group transaction.
struct Pending {
    principal: Principal,
    request: Arc<SyncRequest>,
    reply: oneshot::Sender<Result<Vec<OpResult>, BackendError>>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend").finish_non_exhaustive()
    }
}

#[expect(clippy::needless_pass_by_value, reason = "the shape `map_err` wants")]
fn unavailable(e: sqlx::Error) -> BackendError {
    if let sqlx::Error::Database(d) = &e {
        let code: i32 = d.code().and_then(|c| c.parse().ok()).unwrap_or(0);
        if matches!(code & 0xff, 5 | 6 | 13) {
            return BackendError::Unavailable(e.to_string());
        }
    }
    BackendError::Internal(e.to_string())
}

impl SqliteBackend {
    /// Opens (or creates) the server database at `path`.
    pub async fn open(path: &Path, durability: Durability, limits: Limits) -> Result<Arc<Self>, BackendError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            });
        let mut writer = options.clone().journal_mode(SqliteJournalMode::Wal).connect().await.map_err(unavailable)?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await.map_err(unavailable)?;
        let version: String =
            sqlx::query_scalar(SELECT_SCHEMA_VERSION).fetch_one(&mut *tx).await.map_err(unavailable)?;
        if check_schema_version(&version)? {
            sqlx::raw_sql(MIGRATE_V2).execute(&mut *tx).await.map_err(unavailable)?;
            backfill_digests(&mut tx).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        let mut readers = Vec::with_capacity(SQLITE_READERS);
        for _ in 0..SQLITE_READERS {
            let conn = options.clone().pragma("query_only", "ON").connect().await.map_err(unavailable)?;
            readers.push(Mutex::new(conn));
        }
        Ok(Arc::new(Self {
            writer: Mutex::new(writer),
            readers,
            free: Semaphore::new(SQLITE_READERS),
            limits,
            queue: std::sync::Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            bindings: Bindings::default(),
            digest_log_rows_max: std::sync::atomic::AtomicI64::new(super::DIGEST_LOG_ROWS_MAX),
        }))
    }

    /// Applies a request's ops, together with whatever other requests
    /// arrive meanwhile: one transaction and one sync for the whole group.
    /// The first caller to find no group running drains the queue (it runs
    /// in the handler's own task, which a hang-up does not cancel).
    async fn apply(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Vec<OpResult>, BackendError> {
        let (reply, answer) = oneshot::channel();
        self.lock_queue().push(Pending { principal: principal.clone(), request, reply });
        if !self.draining.swap(true, Ordering::AcqRel) {
            loop {
                let batch = std::mem::take(&mut *self.lock_queue());
                if batch.is_empty() {
                    self.draining.store(false, Ordering::Release);
                    // A request queued between the take and the store is ours to run.
                    if self.lock_queue().is_empty() || self.draining.swap(true, Ordering::AcqRel) {
                        break;
                    }
                    continue;
                }
                let mut conn = self.writer.lock().await;
                self.apply_group(&mut conn, batch).await;
            }
        }
        answer.await.map_err(|_| BackendError::Internal("the group transaction was abandoned".into()))?
    }

    async fn apply_group(&self, conn: &mut SqliteConnection, batch: Vec<Pending>) {
        match self.run_group(conn, &batch).await {
            Ok(outcomes) => {
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = p.reply.send(outcome);
                }
            }
            Err(e) => {
                let message = e.to_string();
                let shared = |_: &Pending| match &e {
                    BackendError::Unavailable(_) => BackendError::Unavailable(message.clone()),
                    _ => BackendError::Internal(message.clone()),
                };
                for p in batch {
                    let err = shared(&p);
                    let _ = p.reply.send(Err(err));
                }
            }
        }
    }

    /// One transaction for a group: every request decided in order by the
    /// one LWW rule against what is stored and what earlier requests of the
    /// group wrote. A request refused by the counter lead is answered alone;
    /// the others go on.
    async fn run_group(
        &self,
        conn: &mut SqliteConnection,
        batch: &[Pending],
    ) -> Result<Vec<Result<Vec<OpResult>, BackendError>>, BackendError> {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let mut names: Vec<&str> = batch.iter().map(|p| p.principal.namespace.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let names_json = serde_json::to_string(&names).expect("names serialize");
        sqlx::query(
            "INSERT OR IGNORE INTO tide_namespaces (namespace, seq, lamport_max) SELECT value, 0, 0 FROM json_each(?1)",
        )
        .bind(&names_json)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let counters: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(namespace, seq, lamport_max)) FROM tide_namespaces \
             WHERE namespace IN (SELECT value FROM json_each(?1))",
        )
        .bind(&names_json)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let counters: Vec<(String, u64, u64)> =
            serde_json::from_str(&counters).map_err(|e| BackendError::Internal(format!("namespaces: {e}")))?;
        let mut counters: HashMap<String, (u64, u64)> = counters.into_iter().map(|(n, s, l)| (n, (s, l))).collect();

        let bound = self.bind_nodes(&mut tx, batch).await?;
        let keys: Vec<(&str, &str, &str)> = batch
            .iter()
            .flat_map(|p| {
                p.request.ops.iter().map(|o| (p.principal.namespace.as_str(), o.collection.as_str(), o.id.as_str()))
            })
            .collect();
        let mut current = stored_versions(&mut tx, &keys).await?;
        let before: HashMap<GroupKey<'_>, tide_core::digest::Hash64> = current
            .iter()
            .filter(|(_, (_, p))| matches!(p, Payload::Put(_)))
            .map(|(k, (s, p))| (*k, tide_core::digest::payload_hash(k.1, k.2, s, p)))
            .collect();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut written: HashMap<GroupKey<'_>, (&tide_core::Op, u64)> = HashMap::new();
        for p in batch {
            let ns = p.principal.namespace.as_str();
            let (seq, lamport_max) = counters.get_mut(ns).expect("every namespace of the group was read");
            let owner = bound.get(&(ns, p.request.node_id.as_str())).map(String::as_str);
            if owner.is_some_and(|o| o != p.principal.id) {
                outcomes.push(Err(super::foreign_node(&p.request.node_id)));
                continue;
            }
            if let Err(e) = check_lead(&p.request, *lamport_max, self.limits.lamport_lead_max) {
                outcomes.push(Err(e));
                continue;
            }
            if let Err(e) = continue_chain(&mut tx, ns, &p.request).await? {
                outcomes.push(Err(e));
                continue;
            }
            let mut results = Vec::with_capacity(p.request.ops.len());
            for op in &p.request.ops {
                let key = (ns, op.collection.as_str(), op.id.as_str());
                let decision = decide(current.get(&key).map(|(s, p)| (s, p)), &op.stamp, &op.payload);
                if decision == Decision::Apply {
                    *seq += 1;
                    current.insert(key, (op.stamp.clone(), op.payload.clone()));
                    written.insert(key, (op, *seq));
                }
                results.push(op_result(decision, op, current.get(&key).map(|(s, _)| s), *seq));
            }
            *lamport_max = (*lamport_max).max(p.request.ops.iter().map(|o| o.stamp.lamport).max().unwrap_or(0));
            outcomes.push(Ok(results));
        }

        store_rows(&mut tx, &written).await?;
        let deltas = super::digest_deltas(written.iter().map(|(&(ns, c, id), (op, _))| {
            let new =
                op.payload.doc().is_some().then(|| tide_core::digest::payload_hash(c, id, &op.stamp, &op.payload));
            (ns, c, id, before.get(&(ns, c, id)).copied(), new)
        }));
        add_digests(&mut tx, &deltas, self.digest_log_rows_max.load(Ordering::Relaxed)).await?;
        let updated: Vec<(&str, u64, u64)> = counters.iter().map(|(n, &(s, l))| (n.as_str(), s, l)).collect();
        sqlx::query(
            "UPDATE tide_namespaces SET seq = j.value->>1, lamport_max = j.value->>2 \
             FROM json_each(?1) AS j WHERE tide_namespaces.namespace = j.value->>0",
        )
        .bind(serde_json::to_string(&updated).expect("counters serialize"))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.bindings.remember(bound.into_iter().map(|((n, node), p)| (n.to_owned(), node.to_owned(), p)));
        Ok(outcomes)
    }

    /// Binds each request's node id to its principal where it is not bound
    /// yet, and returns the binding of every node id of the group.
    async fn bind_nodes<'a>(
        &self,
        conn: &mut SqliteConnection,
        batch: &'a [Pending],
    ) -> Result<HashMap<(&'a str, &'a str), String>, BackendError> {
        let mut bound = HashMap::new();
        let mut unknown = Vec::new();
        for p in batch {
            let key = (p.principal.namespace.as_str(), p.request.node_id.as_str());
            match self.bindings.get(key.0, key.1) {
                Some(owner) => {
                    bound.insert(key, owner);
                }
                None => unknown.push((key.0, key.1, p.principal.id.as_str())),
            }
        }
        if unknown.is_empty() {
            return Ok(bound);
        }
        let unknown_json = serde_json::to_string(&unknown).expect("bindings serialize");
        sqlx::query(
            "INSERT INTO tide_nodes (namespace, node_id, principal) \
             SELECT value->>0, value->>1, value->>2 FROM json_each(?1) WHERE true ON CONFLICT DO NOTHING",
        )
        .bind(&unknown_json)
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
        let owners: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(j.key, n.principal)) FROM json_each(?1) AS j \
             CROSS JOIN tide_nodes AS n ON n.namespace = j.value->>0 AND n.node_id = j.value->>1",
        )
        .bind(&unknown_json)
        .fetch_one(&mut *conn)
        .await
        .map_err(unavailable)?;
        let owners: Vec<(usize, String)> =
            serde_json::from_str(&owners).map_err(|e| BackendError::Internal(format!("node bindings: {e}")))?;
        for (i, owner) in owners {
            bound.insert((unknown[i].0, unknown[i].1), owner);
        }
        Ok(bound)
    }

    /// Folds logged bucket deltas once more than `rows` wait (default
    /// [`super::DIGEST_LOG_ROWS_MAX`]).
    pub fn set_digest_log_rows_max(&self, rows: usize) {
        self.digest_log_rows_max.store(i64::try_from(rows).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The page after the request's cursor and the answers to its digest
    /// and fetch extensions, read in one snapshot.
    async fn read(&self, principal: &Principal, req: &SyncRequest) -> Result<Read, BackendError> {
        let ns = &principal.namespace;
        let _permit = self.free.acquire().await.map_err(|e| BackendError::Internal(e.to_string()))?;
        let reader = self.readers.iter().find_map(|r| r.try_lock().ok());
        let mut conn = match reader {
            Some(conn) => conn,
            None => self.readers[0].lock().await,
        };
        let mut tx = conn.begin().await.map_err(unavailable)?;
        if self.bindings.get(ns.as_str(), &req.node_id).is_none() {
            let owner: Option<String> =
                sqlx::query_scalar("SELECT principal FROM tide_nodes WHERE namespace = ?1 AND node_id = ?2")
                    .bind(ns.as_str())
                    .bind(&req.node_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            self.bindings.remember(owner.map(|o| (ns.as_str().to_owned(), req.node_id.clone(), o)));
        }
        self.bindings.check(principal, &req.node_id)?;
        let ns_seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM tide_namespaces WHERE namespace = ?1")
            .bind(ns.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        let (mut page, skip_own, reset) = page_start(req, to_u64(ns_seq.unwrap_or(0)), &self.limits);
        loop {
            let rows = window(&mut tx, ns, &req.node_id, skip_own, page.after(), page.window()).await?;
            if page.feed(rows) {
                break;
            }
        }
        let (json, count, cursor, has_more) = page.finish();
        let settled = count == 0 && !has_more && !reset;
        let verify = self.verify(&mut tx, ns, req, settled).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok((json, count, cursor, has_more, reset, verify))
    }

    async fn verify(
        &self,
        conn: &mut SqliteConnection,
        ns: &Namespace,
        req: &SyncRequest,
        settled: bool,
    ) -> Result<VerifyReply, BackendError> {
        let mut reply = VerifyReply::default();
        let bytes_max = self.limits.response_bytes_max;
        if !req.fetch.is_empty() {
            let keys: Vec<(&str, &str)> = req.fetch.iter().map(|k| (k.0.as_str(), k.1.as_str())).collect();
            let rows = versions(
                conn,
                "SELECT r.collection, r.id, r.doc, r.lamport, r.node_id, r.seq FROM json_each(?2) AS j \
                 CROSS JOIN tide_rows AS r ON r.namespace = ?1 AND r.collection = j.value->>0 AND r.id = j.value->>1 \
                 ORDER BY r.collection, r.id",
                ns,
                serde_json::to_string(&keys).expect("keys serialize"),
                "",
            )
            .await?;
            super::push_fetched(&mut reply, &rows, bytes_max);
        }
        match &req.verify {
            // Digests are only comparable when nothing is in flight either way.
            None | Some(Verify::Roots) if !settled => {}
            None => {}
            Some(Verify::Roots) => {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT collection, hash FROM tide_digest \
                     WHERE namespace = ?1 AND level = 0 AND hash <> 0 ORDER BY collection",
                )
                .bind(ns.as_str())
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?;
                reply.roots = Some(rows.into_iter().map(|(c, h)| (c, Hash64::from_i64(h))).collect());
            }
            Some(Verify::Groups { collection }) => {
                reply.groups = Some(level(conn, ns, collection, 1, None).await?);
            }
            Some(Verify::Buckets { collection, groups }) => {
                reply.buckets = Some(level(conn, ns, collection, 2, Some(groups)).await?);
            }
            Some(Verify::Keys { collection, buckets, have }) => {
                let rows = versions(
                    conn,
                    "SELECT collection, id, doc, lamport, node_id, seq FROM tide_rows \
                     WHERE namespace = ?1 AND collection = ?3 AND bucket IN (SELECT value FROM json_each(?2))",
                    ns,
                    serde_json::to_string(buckets).expect("buckets serialize"),
                    collection,
                )
                .await?;
                // Sorted here: an ORDER BY would make SQLite walk the whole
                // collection in id order instead of using the bucket index.
                let mut rows = rows;
                rows.sort_unstable_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
                super::compare_keys(&mut reply, &rows, (collection, buckets, have), bytes_max);
            }
        }
        Ok(reply)
    }
}

/// Moves the request's node along its chain of write exchanges (PROTOCOL.md
/// §13); the inner error refuses a link that does not continue it.
async fn continue_chain(
    conn: &mut SqliteConnection,
    ns: &str,
    req: &SyncRequest,
) -> Result<Result<(), BackendError>, BackendError> {
    let Some(lineage) = &req.lineage else { return Ok(Ok(())) };
    let moved: Option<i64> = sqlx::query_scalar(
        "UPDATE tide_nodes SET chain_last = ?4, chain_height = ?5, \
                 chain_before = CASE WHEN chain_last IS NOT NULL AND ?3 <> chain_last AND ?3 = chain_before \
                 THEN chain_before ELSE ?3 END \
                 WHERE namespace = ?1 AND node_id = ?2 AND (chain_last IS NULL OR ?3 = chain_last \
                 OR ?3 = chain_before OR ?6 >= chain_height) RETURNING 1",
    )
    .bind(ns)
    .bind(&req.node_id)
    .bind(lineage.prev.as_deref().unwrap_or(""))
    .bind(&lineage.next)
    .bind(i64::try_from(lineage.height).unwrap_or(i64::MAX))
    .bind(i64::try_from(lineage.height.saturating_sub(1)).unwrap_or(i64::MAX))
    .fetch_optional(conn)
    .await
    .map_err(unavailable)?;
    Ok(if moved.is_some() { Ok(()) } else { Err(tide_core::Lineage::conflict(&req.node_id).into()) })
}

/// A page (changes, count, cursor, `has_more`, `reset`) and the digest answers.
type Read = (String, usize, Cursor, bool, bool, VerifyReply);

/// The non-zero entries of one digest level of a collection, in order
/// (buckets only within `groups`).
async fn level(
    conn: &mut SqliteConnection,
    ns: &Namespace,
    collection: &str,
    level: u8,
    groups: Option<&Vec<u16>>,
) -> Result<Vec<(u16, Hash64)>, BackendError> {
    // The folded rows and the logged deltas, in one statement (one snapshot).
    let text: String = sqlx::query_scalar(
        "SELECT json_array( \
           (SELECT json_group_array(json_array(ix, hash)) FROM tide_digest \
            WHERE namespace = ?1 AND level = ?3 AND collection = ?2 AND hash <> 0 \
            AND (?4 IS NULL OR ix / 256 IN (SELECT value FROM json_each(?4)))), \
           (SELECT json_group_array(json_array(bucket, delta)) FROM tide_digest_log \
            WHERE namespace = ?1 AND collection = ?2))",
    )
    .bind(ns.as_str())
    .bind(collection)
    .bind(i64::from(level))
    .bind(groups.map(|g| serde_json::to_string(g).expect("groups serialize")))
    .fetch_one(conn)
    .await
    .map_err(unavailable)?;
    let (folded, logged): DigestEntries =
        serde_json::from_str(&text).map_err(|e| BackendError::Internal(format!("digests: {e}")))?;
    Ok(super::combine(level, folded, logged, groups))
}

/// Stored versions selected by `sql` (binding the namespace, a JSON list and a collection).
async fn versions(
    conn: &mut SqliteConnection,
    sql: &'static str,
    ns: &Namespace,
    list: String,
    collection: &str,
) -> Result<Vec<StoredVersion>, BackendError> {
    let rows: Vec<(String, String, Option<String>, i64, String, i64)> =
        sqlx::query_as(sql).bind(ns.as_str()).bind(list).bind(collection).fetch_all(conn).await.map_err(unavailable)?;
    Ok(rows
        .into_iter()
        .map(|(collection, id, doc, lamport, node_id, seq)| StoredVersion {
            collection,
            id,
            doc,
            lamport: to_u64(lamport),
            node_id,
            seq: to_u64(seq),
        })
        .collect())
}

/// Fills the digest table and each row's bucket from the stored rows (the
/// version-2 migration of a database written by an earlier build).
async fn backfill_digests(conn: &mut SqliteConnection) -> Result<(), BackendError> {
    let rows: Vec<BackfillRow> =
        sqlx::query_as("SELECT namespace, collection, id, lamport, node_id, deleted, doc FROM tide_rows")
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?;
    let stamps: Vec<Stamp> = rows.iter().map(|r| Stamp::new(to_u64(r.3), r.4.clone())).collect();
    let buckets: Vec<(&str, &str, &str, u16)> = rows
        .iter()
        .map(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str(), tide_core::digest::bucket(&r.1, &r.2)))
        .collect();
    sqlx::query(
        "UPDATE tide_rows SET bucket = j.value->>3 FROM json_each(?1) AS j \
         WHERE tide_rows.namespace = j.value->>0 AND tide_rows.collection = j.value->>1 \
         AND tide_rows.id = j.value->>2",
    )
    .bind(serde_json::to_string(&buckets).expect("buckets serialize"))
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    let deltas = super::digest_deltas(rows.iter().zip(&stamps).filter(|(r, _)| !r.5).map(|(r, s)| {
        let hash = tide_core::digest::version_hash(&r.1, &r.2, s, r.6.as_deref());
        (r.0.as_str(), r.1.as_str(), r.2.as_str(), None, Some(hash))
    }));
    add_digests(conn, &deltas, super::DIGEST_LOG_ROWS_MAX).await
}

/// Applies a write group's digest deltas: the roots at once, the buckets to
/// the log, which is folded into the group and bucket rows once it holds
/// [`super::DIGEST_LOG_ROWS_MAX`] rows.
async fn add_digests(
    conn: &mut SqliteConnection,
    deltas: &super::DigestDeltas<'_>,
    fold_over: i64,
) -> Result<(), BackendError> {
    if !deltas.roots.is_empty() {
        let roots: Vec<(&str, u8, &str, u8, i64)> = deltas.roots.iter().map(|&(n, c, h)| (n, 0, c, 0, h)).collect();
        sqlx::query(UPSERT_DIGEST)
            .bind(serde_json::to_string(&roots).expect("deltas serialize"))
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
    }
    if deltas.buckets.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO tide_digest_log (namespace, collection, bucket, delta) \
         SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)",
    )
    .bind(serde_json::to_string(&deltas.buckets).expect("deltas serialize"))
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    let logged: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT max(rowid) FROM tide_digest_log) - (SELECT min(rowid) FROM tide_digest_log) + 1, 0)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(unavailable)?;
    if logged > fold_over {
        let logged: Vec<(String, String, i64, i64)> =
            sqlx::query_as("DELETE FROM tide_digest_log RETURNING namespace, collection, bucket, delta")
                .fetch_all(&mut *conn)
                .await
                .map_err(unavailable)?;
        sqlx::query(UPSERT_DIGEST)
            .bind(serde_json::to_string(&super::fold_logged(&logged)).expect("deltas serialize"))
            .execute(conn)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Up to `n` rows after seq `after`, each rendered exactly as `serde_json`
/// renders a `tide_core::Change` (except the caller's own, which are only
/// skipped and so not rendered), joined by control characters that JSON
/// text never holds raw.
async fn window(
    conn: &mut SqliteConnection,
    ns: &Namespace,
    node_id: &str,
    skip_own: bool,
    after: u64,
    n: usize,
) -> Result<Vec<PageRow>, BackendError> {
    let text: Option<String> = sqlx::query_scalar(
        "SELECT group_concat(seq || char(31) || (?3 AND node_id = ?4) || char(31) || \
           CASE WHEN ?3 AND node_id = ?4 THEN '' ELSE \
           '{\"collection\":' || json_quote(collection) || ',\"id\":' || json_quote(id) || \
           ',\"kind\":' || CASE deleted WHEN 1 THEN '\"delete\"' ELSE '\"put\"' END || \
           ',\"doc\":' || coalesce(doc, 'null') || ',\"lamport\":' || lamport || \
           ',\"node_id\":' || json_quote(node_id) || ',\"seq\":' || seq || '}' END, char(30)) \
         FROM (SELECT * FROM tide_rows WHERE namespace = ?1 AND seq > ?2 ORDER BY seq LIMIT ?5)",
    )
    .bind(ns.as_str())
    .bind(to_i64(after))
    .bind(skip_own)
    .bind(node_id)
    .bind(to_i64(n as u64))
    .fetch_one(conn)
    .await
    .map_err(unavailable)?;
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    text.split('\u{1e}')
        .map(|row| {
            let mut parts = row.splitn(3, '\u{1f}');
            let (Some(seq), Some(own), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(BackendError::Internal(format!("unreadable page row {row:?}")));
            };
            let seq = seq.parse().map_err(|_| BackendError::Internal(format!("unreadable seq {seq:?}")))?;
            Ok(PageRow { seq, own: own == "1", json: json.to_owned() })
        })
        .collect()
}

/// A key of a group: namespace, collection, id.
type GroupKey<'a> = (&'a str, &'a str, &'a str);

/// What is stored for `keys`, read in one statement.
async fn stored_versions<'a>(
    conn: &mut SqliteConnection,
    keys: &[GroupKey<'a>],
) -> Result<HashMap<GroupKey<'a>, (Stamp, Payload)>, BackendError> {
    let stored: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(j.key, r.lamport, r.node_id, r.deleted, r.doc)) \
         FROM json_each(?1) AS j CROSS JOIN tide_rows AS r \
         ON r.namespace = j.value->>0 AND r.collection = j.value->>1 AND r.id = j.value->>2",
    )
    .bind(serde_json::to_string(keys).expect("keys serialize"))
    .fetch_one(&mut *conn)
    .await
    .map_err(unavailable)?;
    let stored: Vec<(usize, u64, String, u8, Option<String>)> =
        serde_json::from_str(&stored).map_err(|e| BackendError::Internal(format!("stored rows: {e}")))?;
    let mut current = HashMap::new();
    for (i, lamport, node, deleted, doc) in stored {
        let payload = match (deleted, doc) {
            (0, Some(doc)) => Payload::Put(
                serde_json::from_str(&doc).map_err(|e| BackendError::Internal(format!("stored document: {e}")))?,
            ),
            _ => Payload::Delete,
        };
        current.insert(keys[i], (Stamp::new(lamport, node), payload));
    }
    Ok(current)
}

/// Stores the last applied op of every key a group wrote, in one statement.
async fn store_rows(
    conn: &mut SqliteConnection,
    written: &HashMap<GroupKey<'_>, (&tide_core::Op, u64)>,
) -> Result<(), BackendError> {
    #[derive(Serialize)]
    struct Row<'a>(&'a str, &'a str, &'a str, Option<String>, u64, &'a str, u8, u64, u16);

    if written.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<Row> = written
        .iter()
        .map(|(&(ns, collection, id), &(op, seq))| {
            let doc = op.payload.doc().map(|d| serde_json::to_string(d).expect("documents serialize"));
            let deleted = u8::from(doc.is_none());
            let bucket = tide_core::digest::bucket(collection, id);
            Row(ns, collection, id, doc, op.stamp.lamport, &op.stamp.node_id, deleted, seq, bucket)
        })
        .collect();
    rows.sort_by(|a, b| (a.0, a.7).cmp(&(b.0, b.7)));
    sqlx::query(
        "INSERT INTO tide_rows (namespace, collection, id, doc, lamport, node_id, deleted, seq, bucket) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, value->>8 \
         FROM jsonb_each(?1) WHERE true \
         ON CONFLICT (namespace, collection, id) DO UPDATE SET doc = excluded.doc, \
         lamport = excluded.lamport, node_id = excluded.node_id, deleted = excluded.deleted, seq = excluded.seq",
    )
    .bind(serde_json::to_string(&rows).expect("rows serialize"))
    .execute(conn)
    .await
    .map_err(unavailable)?;
    Ok(())
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).expect("stored counters are never negative")
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("counters stay below 2^53")
}

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    async fn exchange(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Reply, BackendError> {
        let results =
            if request.ops.is_empty() { Vec::new() } else { self.apply(principal, Arc::clone(&request)).await? };
        let (changes_json, change_count, cursor, has_more, reset, verify) = self.read(principal, &request).await?;
        let request_id = request.request_id.clone();
        Ok(Reply { results, cursor, changes_json, change_count, has_more, reset, request_id, verify })
    }

    async fn ready(&self) -> Result<(), BackendError> {
        let mut conn = self.readers[0].lock().await;
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tide_namespaces")
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// Folded digest rows and logged bucket deltas, as read together.
type DigestEntries = (Vec<(i64, i64)>, Vec<(i64, i64)>);

/// A stored row as the version-2 migration reads it.
type BackfillRow = (String, String, String, i64, String, bool, Option<String>);
