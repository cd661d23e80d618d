//! The SQLite backend (the default): sqlx, WAL, one writer task and a pool
//! of readers.
//!
//! Seqs are per namespace, like `tide_core::Model`'s: a namespace row holds
//! its counter and the highest counter seen, and every stored version has
//! the seq it was written under. SQLite has one writer, so seq order is
//! commit order and a page read after a commit never skips a change.
//!
//! **Layout.** `tide_changes` is clustered by `(namespace, seq)`, so a page
//! is one contiguous range, and holds each version rendered once, when it
//! is written, as the wire JSON up to `"seq":` (`wire`), with its length
//! once completed (`size`) and its version hash (`vhash`). A page is one
//! statement that concatenates stored renderings; no document is parsed
//! or rendered on the read path.
//!
//! **Writes** go to one writer task, which takes every request waiting
//! when it starts a transaction (at most [`WRITE_GROUP_REQUESTS_MAX`]) and
//! commits them together; a request that arrives meanwhile goes into the
//! next group, and each caller is answered when its own group commits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, SqliteConnection};
use tide_core::digest::Hash64;
use tide_core::{Chain, Horizon, Limits, OpResult, Stamp, SyncRequest, Verify};
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};

use super::{
    Backend, BackendError, Bindings, COLLECT_NAMESPACES_PER_STEP, Collected, CommitCallback, Current, GroupKey,
    Incoming, Node, NodeRow, Page, PageQuery, PageRead, Pending, Policy, Reply, SELECT_SCHEMA_VERSION, SmallPage,
    SmallPageRow, StoredVersion, Validator, VerifyReply, WRITE_GROUP_REQUESTS_MAX, WRITE_QUEUE_REQUESTS_MAX, admit,
    check_schema_version, decide_request,
};
use crate::access::{AccessRules, Scope};
use crate::auth::{Namespace, Principal};

/// A namespace as collection reads it: name, head, horizon and its stamp.
type NamespaceHorizon = (String, i64, i64, Option<i64>, Option<String>);

/// A collection step for the writer task: the horizon distance, and where
/// to answer.
type CollectStep = (u64, oneshot::Sender<Result<Collected, BackendError>>);

/// Reader connections of the SQLite backend.
pub const SQLITE_READERS: usize = 4;

/// The tables of a new database (schema version 4).
const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS tide_namespaces (
    namespace       TEXT PRIMARY KEY,
    seq             INTEGER NOT NULL,
    lamport_max     INTEGER NOT NULL,
    size_max        INTEGER NOT NULL DEFAULT 0,
    horizon         INTEGER NOT NULL DEFAULT 0,
    horizon_lamport INTEGER,
    horizon_node    TEXT
);
CREATE TABLE IF NOT EXISTS tide_changes (
    namespace  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    collection TEXT NOT NULL,
    id         TEXT NOT NULL,
    lamport    INTEGER NOT NULL,
    node_id    TEXT NOT NULL,
    deleted    INTEGER NOT NULL,
    bucket     INTEGER NOT NULL,
    vhash      INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    wire       TEXT NOT NULL,
    born       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS tide_changes_by_key ON tide_changes (namespace, collection, id);
CREATE TABLE IF NOT EXISTS tide_digest (
    namespace  TEXT NOT NULL,
    level      INTEGER NOT NULL,
    collection TEXT NOT NULL,
    ix         INTEGER NOT NULL,
    hash       INTEGER NOT NULL,
    PRIMARY KEY (namespace, level, collection, ix)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tide_digest_log (
    namespace  TEXT NOT NULL,
    collection TEXT NOT NULL,
    bucket     INTEGER NOT NULL,
    delta      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tide_nodes (
    namespace    TEXT NOT NULL,
    node_id      TEXT NOT NULL,
    principal    TEXT NOT NULL,
    chain_last   TEXT,
    chain_before TEXT,
    chain_height INTEGER,
    PRIMARY KEY (namespace, node_id)
) WITHOUT ROWID;
";

/// Version 3 to 4: each namespace's tombstone horizon (PROTOCOL.md §14).
/// (`tide_changes`, made by version 3, also gets each key's `born`.)
const MIGRATE_V4: &str = "ALTER TABLE tide_namespaces ADD COLUMN horizon INTEGER NOT NULL DEFAULT 0; \
     ALTER TABLE tide_namespaces ADD COLUMN horizon_lamport INTEGER; \
     ALTER TABLE tide_namespaces ADD COLUMN horizon_node TEXT;";

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

/// The rows a page reads: a namespace's changes after a seq, without the
/// caller's own when asked (`?4 & 1`), without tombstones at or below
/// `?4 >> 1` (`PageQuery::skips`), and only of the collections in `?5` (a
/// JSON array; NULL for every one).
const PAGE_ROWS: &str = "FROM tide_changes WHERE namespace = ?1 AND seq > ?2 AND ((?4 & 1) = 0 OR node_id <> ?3) \
     AND (deleted = 0 OR seq > (?4 >> 1)) AND (?5 IS NULL OR collection IN (SELECT value FROM json_each(?5))) \
     ORDER BY seq";

/// The page statement for a page of `limit` changes (`None`: the limit is
/// bound as `?7`). It returns the namespace's seq, the byte total and count
/// of the first `limit + 1` changes (read from `size`, not from the
/// renderings), and, only if that total fits the budget `?6`, the first
/// `limit` renderings joined and the seq of the last. The limit is a literal
/// where it can be: a bound `LIMIT` makes SQLite re-plan the statement on
/// every run.
fn page_statement(limit: Option<usize>) -> Arc<str> {
    let (n, n1) =
        limit.map_or_else(|| ("?7".to_owned(), "?7 + 1".to_owned()), |l| (l.to_string(), (l + 1).to_string()));
    format!(
        "WITH g(total, n) AS MATERIALIZED (SELECT coalesce(sum(size + 1), 0), count(*) \
           FROM (SELECT size {PAGE_ROWS} LIMIT {n1})) \
         SELECT ns.seq, ns.horizon, g.total, g.n, p.text, p.last \
         FROM g LEFT JOIN tide_namespaces AS ns ON ns.namespace = ?1, \
           (SELECT group_concat(wire || seq || '}}', ',') AS text, max(seq) AS last \
           FROM (SELECT seq, wire {PAGE_ROWS} LIMIT {n}) WHERE (SELECT total FROM g) <= ?6) AS p"
    )
    .into()
}

/// The page statement for a namespace whose changes are all small enough
/// that `limit` of them fit the budget (its `size_max`, the largest
/// rendering it ever stored, says so): no sizes are summed; it returns the
/// namespace's seq and `size_max`, the first `limit` renderings joined (only
/// if they are sure to fit), their count, the seq of the last, and whether a
/// change follows. Without a row for the namespace, it returns none.
fn small_page_statement(limit: Option<usize>) -> Arc<str> {
    let n = limit.map_or_else(|| "?7".to_owned(), |l| l.to_string());
    format!(
        "SELECT ns.seq, ns.horizon, ns.size_max, p.text, p.n, p.last, p.n = {n} AND EXISTS (SELECT 1 FROM tide_changes \
           WHERE namespace = ?1 AND seq > p.last AND ((?4 & 1) = 0 OR node_id <> ?3) AND (deleted = 0 OR seq > (?4 >> 1)) \
           AND (?5 IS NULL OR collection IN (SELECT value FROM json_each(?5)))) \
         FROM tide_namespaces AS ns, (SELECT group_concat(wire || seq || '}}', ',') AS text, count(*) AS n, \
           max(seq) AS last FROM (SELECT seq, wire {PAGE_ROWS} LIMIT {n}) \
           WHERE (SELECT (size_max + 1) * {n} FROM tide_namespaces WHERE namespace = ?1) <= ?6) AS p \
         WHERE ns.namespace = ?1"
    )
    .into()
}

/// Writes a consistent snapshot of the SQLite server database `db` to
/// `dest` (which must not exist) with `VACUUM INTO`, beside a server that
/// may be serving it: the snapshot is one read transaction, and the
/// server's writers go on meanwhile. Returns the snapshot's size in bytes.
///
/// To restore, stop the server and put the snapshot in the database's
/// place (removing its `-wal` and `-shm` files). Clients that synced past
/// the snapshot find their cursors ahead (a `reset`), pull from the
/// beginning, and their digest checks give back what they hold that the
/// snapshot lacks (PROTOCOL.md §8, §12).
///
/// # Errors
/// `dest` exists, `db` cannot be opened, or the copy fails.
pub async fn backup_sqlite(db: &Path, dest: &Path) -> Result<u64, BackendError> {
    if dest.exists() {
        return Err(BackendError::Internal(format!("{} exists; a backup never overwrites", dest.display())));
    }
    let options = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(30))
        .log_statements(tracing::log::LevelFilter::Off);
    let mut conn = options.connect().await.map_err(unavailable)?;
    sqlx::query("VACUUM INTO ?1")
        .bind(dest.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
    conn.close().await.map_err(unavailable)?;
    std::fs::metadata(dest).map(|m| m.len()).map_err(|e| BackendError::Internal(e.to_string()))
}

/// The SQLite backend.
pub struct SqliteBackend {
    writes: mpsc::Sender<Pending>,
    /// Collection steps for the writer task, run between write groups.
    collects: mpsc::Sender<CollectStep>,
    readers: Vec<Mutex<SqliteConnection>>,
    free: Semaphore,
    limits: Limits,
    bindings: Arc<Bindings>,
    digest_log_rows_max: Arc<AtomicI64>,
    /// The page statement with the default limit written in, and with it bound.
    page_default: Arc<str>,
    page_bound: Arc<str>,
    /// The same for namespaces of small changes (no sizes summed).
    small_default: Arc<str>,
    small_bound: Arc<str>,
    /// Told of every commit that applied ops (see [`Backend::listen`]).
    on_commit: Arc<std::sync::OnceLock<CommitCallback>>,
    /// The embedding application's access rules and validator, if set.
    policy: Arc<Policy>,
}

/// The writer task's state: the one connection that writes.
struct Writer {
    conn: SqliteConnection,
    on_commit: Arc<std::sync::OnceLock<CommitCallback>>,
    policy: Arc<Policy>,
    limits: Limits,
    bindings: Arc<Bindings>,
    digest_log_rows_max: Arc<AtomicI64>,
    /// Rows in `tide_digest_log` (only this task writes it).
    logged: i64,
    /// Groups committed since the free pages were last looked at.
    groups_since_vacuum: u32,
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

/// Write groups between two looks at the database's free pages.
pub const VACUUM_CHECK_GROUPS: u32 = 64;
/// Most vacuum steps a collection step runs after removing tombstones
/// (up to 16 MiB given back at once; the rest follows the write groups).
pub const COLLECT_VACUUM_STEPS: u32 = 8;
/// Free pages (4 KiB each) past which the writer gives space back: 4 MiB.
pub const VACUUM_FREE_PAGES_MIN: i64 = 1_024;
/// Most pages one step of `incremental_vacuum` gives back: 2 MiB.
pub const VACUUM_PAGES_PER_STEP: i64 = 512;

/// Makes a database file created before incremental vacuum use it: one
/// `VACUUM`, the first time this build opens it (it rewrites the file, so
/// it takes as long as copying it).
async fn incremental_vacuum_on(conn: &mut SqliteConnection) -> Result<(), BackendError> {
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum").fetch_one(&mut *conn).await.map_err(unavailable)?;
    if mode != 2 {
        let started = std::time::Instant::now();
        sqlx::raw_sql("PRAGMA auto_vacuum = INCREMENTAL; VACUUM").execute(&mut *conn).await.map_err(unavailable)?;
        tracing::info!(took_ms = started.elapsed().as_millis(), "the database now gives freed space back");
    }
    Ok(())
}

impl SqliteBackend {
    /// Opens (or creates) the server database at `path`, migrating one
    /// written by an earlier build.
    pub async fn open(path: &Path, durability: Durability, limits: Limits) -> Result<Arc<Self>, BackendError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            // Freed pages go back to the file system a step at a time (the
            // writer task's `incremental_vacuum`), never in one long stall.
            .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            });
        let mut conn = options.clone().journal_mode(SqliteJournalMode::Wal).connect().await.map_err(unavailable)?;
        migrate(&mut conn).await?;
        incremental_vacuum_on(&mut conn).await?;
        let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM tide_digest_log")
            .fetch_one(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut readers = Vec::with_capacity(SQLITE_READERS);
        for _ in 0..SQLITE_READERS {
            let conn = options.clone().pragma("query_only", "ON").connect().await.map_err(unavailable)?;
            readers.push(Mutex::new(conn));
        }
        let bindings = Arc::new(Bindings::default());
        let digest_log_rows_max = Arc::new(AtomicI64::new(super::DIGEST_LOG_ROWS_MAX));
        let on_commit = Arc::new(std::sync::OnceLock::new());
        let policy = Arc::new(Policy::default());
        let writer = Writer {
            conn,
            on_commit: Arc::clone(&on_commit),
            policy: Arc::clone(&policy),
            limits: limits.clone(),
            bindings: Arc::clone(&bindings),
            digest_log_rows_max: Arc::clone(&digest_log_rows_max),
            logged,
            groups_since_vacuum: 0,
        };
        let (submit, queue) = mpsc::channel(WRITE_QUEUE_REQUESTS_MAX);
        let (collects, steps) = mpsc::channel(1);
        tokio::spawn(writer.run(queue, steps));
        Ok(Arc::new(Self {
            writes: submit,
            collects,
            readers,
            free: Semaphore::new(SQLITE_READERS),
            page_default: page_statement(Some(limits.changes_per_response_max)),
            page_bound: page_statement(None),
            small_default: small_page_statement(Some(limits.changes_per_response_max)),
            small_bound: small_page_statement(None),
            limits,
            bindings,
            digest_log_rows_max,
            on_commit,
            policy,
        }))
    }

    /// Has `validator` judge every op from now on, inside its write group
    /// (see [`Validator`]). Set once, before serving; whether it was set.
    pub fn set_validator(&self, validator: Arc<dyn Validator>) -> bool {
        self.policy.validator.set(validator).is_ok()
    }

    /// Limits what each principal reads and writes by `rules` from now on
    /// (see [`AccessRules`]). Set once, before serving; whether it was set.
    pub fn set_access_rules(&self, rules: Arc<dyn AccessRules>) -> bool {
        self.policy.rules.set(rules).is_ok()
    }

    /// Folds logged bucket deltas once more than `rows` wait (default
    /// [`super::DIGEST_LOG_ROWS_MAX`]).
    pub fn set_digest_log_rows_max(&self, rows: usize) {
        self.digest_log_rows_max.store(i64::try_from(rows).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Applies a request's ops in the next write group.
    async fn apply(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Vec<OpResult>, BackendError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Pending { principal: principal.clone(), request, reply })
            .await
            .map_err(|_| BackendError::Internal("the writer has stopped".into()))?;
        answer.await.map_err(|_| BackendError::Internal("the write group was abandoned".into()))?
    }

    /// The page after the request's cursor and the answers to its digest
    /// and fetch extensions, read in one snapshot.
    async fn read(
        &self,
        principal: &Principal,
        req: &SyncRequest,
        scope: Scope,
    ) -> Result<(Page, VerifyReply), BackendError> {
        let ns = &principal.namespace;
        let _permit = self.free.acquire().await.map_err(|e| BackendError::Internal(e.to_string()))?;
        let reader = self.readers.iter().find_map(|r| r.try_lock().ok());
        let mut conn = match reader {
            Some(conn) => conn,
            None => self.readers[0].lock().await,
        };
        if !self.bindings.known(ns.as_str(), &req.node_id) {
            let owner: Option<String> =
                sqlx::query_scalar("SELECT principal FROM tide_nodes WHERE namespace = ?1 AND node_id = ?2")
                    .bind(ns.as_str())
                    .bind(&req.node_id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            // Only this process binds node ids in this database, so an
            // unbound one stays so until its writer binds it.
            match owner {
                Some(owner) => self.bindings.remember([(ns.as_str().to_owned(), req.node_id.clone(), owner)]),
                None => self.bindings.remember_unbound(ns.as_str(), &req.node_id),
            }
        }
        self.bindings.check(principal, &req.node_id)?;
        if req.verify.is_none() && req.fetch.is_empty() {
            // Mostly one statement: a snapshot of its own.
            if let Some(page) = self.page(&mut conn, ns, req, scope.clone(), false).await? {
                return Ok((page, VerifyReply::default()));
            }
        }
        let mut tx = conn.begin().await.map_err(unavailable)?;
        let roots = scope.collections.clone();
        let page = self.page(&mut tx, ns, req, scope, true).await?.expect("a whole page");
        let mut verify = self.verify(&mut tx, ns, req, page.settled()).await?;
        super::roots_in_scope(&mut verify, roots.as_deref());
        tx.commit().await.map_err(unavailable)?;
        Ok((page, verify))
    }

    /// The page a request asks for: one statement, unless the cursor is
    /// ahead of the namespace or the changes run past the byte budget.
    /// Unless `whole`, `None` instead of a page that needs more than the
    /// small-page statement, whose statements must then share a snapshot
    /// (a transaction) for the page to be one.
    async fn page(
        &self,
        conn: &mut SqliteConnection,
        ns: &Namespace,
        req: &SyncRequest,
        scope: Scope,
        whole: bool,
    ) -> Result<Option<Page>, BackendError> {
        let mut query = PageQuery::new(req, &self.limits, scope);
        loop {
            let default = query.limit == self.limits.changes_per_response_max;
            // Most namespaces hold small changes: their pages need no sizes summed.
            let sql = if default { &self.small_default } else { &self.small_bound };
            let mut statement = bind_page(sqlx::query_as(AssertSqlSafe(Arc::clone(sql))), ns, &query)
                .bind(i64::try_from(query.bytes_max).unwrap_or(i64::MAX));
            if !default {
                statement = statement.bind(i64::try_from(query.limit).unwrap_or(i64::MAX));
            }
            let small: Option<SmallPageRow> = statement.fetch_optional(&mut *conn).await.map_err(unavailable)?;
            match query.small(small) {
                SmallPage::Again => continue,
                SmallPage::Done(page) => return Ok(Some(page)),
                SmallPage::SumSizes if !whole => return Ok(None),
                SmallPage::SumSizes => {}
            }
            let sql = if default { &self.page_default } else { &self.page_bound };
            let mut statement = bind_page(sqlx::query_as(AssertSqlSafe(Arc::clone(sql))), ns, &query)
                .bind(i64::try_from(query.bytes_max).unwrap_or(i64::MAX));
            if !default {
                statement = statement.bind(i64::try_from(query.limit).unwrap_or(i64::MAX));
            }
            let (ns_seq, horizon, total, n, text, last): PageRow =
                statement.fetch_one(&mut *conn).await.map_err(unavailable)?;
            let ns_seq = to_u64(ns_seq.unwrap_or(0));
            if query.starts_over(ns_seq, to_u64(horizon.unwrap_or(0))) {
                continue;
            }
            let read = match query.fitted(total, n, text, last) {
                Some(read) => read,
                None => over_budget(conn, ns, &query).await?,
            };
            return Ok(Some(query.finish(read, ns_seq)));
        }
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
                "SELECT r.id, r.lamport, r.node_id, r.deleted, r.vhash, r.wire, r.seq FROM json_each(?2) AS j \
                 CROSS JOIN tide_changes AS r ON r.namespace = ?1 AND r.collection = j.value->>0 \
                 AND r.id = j.value->>1 ORDER BY r.collection, r.id",
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
                let mut rows = versions(
                    conn,
                    "SELECT id, lamport, node_id, deleted, vhash, wire, seq FROM tide_changes \
                     WHERE namespace = ?1 AND collection = ?3 AND bucket IN (SELECT value FROM json_each(?2))",
                    ns,
                    serde_json::to_string(buckets).expect("buckets serialize"),
                    collection,
                )
                .await?;
                rows.sort_unstable_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
                super::compare_keys(&mut reply, &rows, (collection, buckets, have), bytes_max);
            }
        }
        Ok(reply)
    }
}

/// A page whose first changes run past the byte budget: their sizes, then
/// as many renderings as fit (at least one), in one snapshot.
async fn over_budget(
    conn: &mut SqliteConnection,
    ns: &Namespace,
    query: &PageQuery<'_>,
) -> Result<PageRead, BackendError> {
    let mut tx = conn.begin().await.map_err(unavailable)?;
    let (sizes,): (Option<String>,) = bind_page(
        sqlx::query_as(
            "SELECT group_concat(size) FROM (SELECT size FROM tide_changes \
         WHERE namespace = ?1 AND seq > ?2 AND ((?4 & 1) = 0 OR node_id <> ?3) AND (deleted = 0 OR seq > (?4 >> 1)) \
         AND (?5 IS NULL OR collection IN (SELECT value FROM json_each(?5))) ORDER BY seq LIMIT ?6)",
        ),
        ns,
        query,
    )
    .bind(i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await
    .map_err(unavailable)?;
    let sizes: Vec<u64> = sizes.unwrap_or_default().split(',').filter_map(|s| s.parse().ok()).collect();
    let count = query.fitting(&sizes);
    let (text, last): (Option<String>, Option<i64>) = bind_page(
        sqlx::query_as(
            "SELECT group_concat(wire || seq || '}', ','), max(seq) FROM (SELECT seq, wire FROM tide_changes \
         WHERE namespace = ?1 AND seq > ?2 AND ((?4 & 1) = 0 OR node_id <> ?3) AND (deleted = 0 OR seq > (?4 >> 1)) \
         AND (?5 IS NULL OR collection IN (SELECT value FROM json_each(?5))) ORDER BY seq LIMIT ?6)",
        ),
        ns,
        query,
    )
    .bind(i64::try_from(count).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await
    .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    Ok(PageRead {
        json: text.unwrap_or_default(),
        count,
        last: to_u64(last.unwrap_or(0)),
        has_more: count < sizes.len(),
    })
}

/// What the page statement returns: the namespace's seq and horizon, the
/// byte total and count of the first changes, their renderings (if they
/// fit) and the last seq.
type PageRow = (Option<i64>, Option<i64>, i64, i64, Option<String>, Option<i64>);

impl Writer {
    /// Takes every request waiting, up to [`WRITE_GROUP_REQUESTS_MAX`], and
    /// applies them in one transaction, until the backend is dropped. A
    /// group that fails or panics answers its own callers with the error
    /// (its transaction rolled back); the next group goes on.
    async fn run(mut self, mut queue: mpsc::Receiver<Pending>, mut collects: mpsc::Receiver<CollectStep>) {
        let mut batch = Vec::with_capacity(WRITE_GROUP_REQUESTS_MAX);
        loop {
            let received = tokio::select! {
                biased;
                n = queue.recv_many(&mut batch, WRITE_GROUP_REQUESTS_MAX) => n,
                Some((horizon_seqs, reply)) = collects.recv() => {
                    let step = std::panic::AssertUnwindSafe(self.collect(horizon_seqs)).catch_unwind().await;
                    let step = step.unwrap_or_else(|_| Err(BackendError::Internal("collection panicked".into())));
                    if step.is_err() {
                        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
                    }
                    let _ = reply.send(step);
                    continue;
                }
            };
            if received == 0 {
                return;
            }
            let outcome = std::panic::AssertUnwindSafe(self.run_group(&batch)).catch_unwind().await;
            let outcome = outcome.unwrap_or_else(|_| Err(BackendError::Internal("the write group panicked".into())));
            match outcome {
                Ok(outcomes) => {
                    let mut applied: Vec<Namespace> = Vec::new();
                    for (p, outcome) in batch.drain(..).zip(outcomes) {
                        if outcome.as_ref().is_ok_and(|r| r.iter().any(|r| matches!(r, OpResult::Applied { .. })))
                            && !applied.contains(&p.principal.namespace)
                        {
                            applied.push(p.principal.namespace.clone());
                        }
                        let _ = p.reply.send(outcome);
                    }
                    if let Some(on_commit) = self.on_commit.get() {
                        for ns in &applied {
                            on_commit(ns.as_str());
                        }
                    }
                    let _ = self.vacuum_now_and_then().await;
                }
                Err(e) => {
                    // The group's transaction is the connection's own (not
                    // sqlx's): end it here, whatever state it was left in.
                    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
                    for p in batch.drain(..) {
                        let _ = p.reply.send(Err(e.duplicate()));
                    }
                }
            }
        }
    }

    /// One step of tombstone collection (see [`Backend::collect`]), in one
    /// transaction between write groups.
    async fn collect(&mut self, horizon_seqs: u64) -> Result<Collected, BackendError> {
        let namespaces: Vec<NamespaceHorizon> = sqlx::query_as(
            "SELECT namespace, seq, horizon, horizon_lamport, horizon_node FROM tide_namespaces \
             WHERE seq - horizon > ?1 ORDER BY namespace LIMIT ?2",
        )
        .bind(to_i64(horizon_seqs))
        .bind(i64::try_from(COLLECT_NAMESPACES_PER_STEP).unwrap_or(i64::MAX))
        .fetch_all(&mut self.conn)
        .await
        .map_err(unavailable)?;
        let mut done = Collected { more: namespaces.len() == COLLECT_NAMESPACES_PER_STEP, ..Collected::default() };
        if namespaces.is_empty() {
            return Ok(done);
        }
        sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut self.conn).await.map_err(unavailable)?;
        for (ns, seq, horizon, lamport, node) in namespaces {
            let (seq, horizon) = (to_u64(seq), to_u64(horizon));
            let Some(upto) = super::collect_upto(seq, horizon, horizon_seqs) else { continue };
            let (count, bytes, top): (i64, i64, Option<String>) = sqlx::query_as(
                "SELECT count(*), coalesce(sum(size), 0), (SELECT json_array(lamport, node_id) FROM tide_changes \
                   WHERE namespace = ?1 AND seq > ?2 AND seq <= ?3 AND deleted = 1 \
                   ORDER BY lamport DESC, node_id DESC LIMIT 1) \
                 FROM tide_changes WHERE namespace = ?1 AND seq > ?2 AND seq <= ?3 AND deleted = 1",
            )
            .bind(&ns)
            .bind(to_i64(horizon))
            .bind(to_i64(upto))
            .fetch_one(&mut self.conn)
            .await
            .map_err(unavailable)?;
            sqlx::query("DELETE FROM tide_changes WHERE namespace = ?1 AND seq > ?2 AND seq <= ?3 AND deleted = 1")
                .bind(&ns)
                .bind(to_i64(horizon))
                .bind(to_i64(upto))
                .execute(&mut self.conn)
                .await
                .map_err(unavailable)?;
            let after = super::horizon_after((horizon, lamport, node), upto, top.as_deref())?;
            let stamp = after.stamp.as_ref();
            sqlx::query(
                "UPDATE tide_namespaces SET horizon = ?2, horizon_lamport = ?3, horizon_node = ?4 WHERE namespace = ?1",
            )
            .bind(&ns)
            .bind(to_i64(after.seq))
            .bind(stamp.map(|s| to_i64(s.lamport)))
            .bind(stamp.map(|s| s.node_id.as_str()))
            .execute(&mut self.conn)
            .await
            .map_err(unavailable)?;
            done += Collected {
                namespaces: 1,
                tombstones: to_u64(count),
                bytes: to_u64(bytes),
                more: super::collect_upto(seq, upto, horizon_seqs).is_some(),
            };
        }
        // The digest log is history too: folded with the tombstones.
        if done.tombstones > 0 && self.logged > 0 {
            fold_digests(&mut self.conn).await?;
            self.logged = 0;
        }
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map_err(unavailable)?;
        if done.tombstones > 0 {
            // Give the space back now, a few steps at most, not 64 groups on.
            for _ in 0..COLLECT_VACUUM_STEPS {
                self.groups_since_vacuum = VACUUM_CHECK_GROUPS - 1;
                if !self.vacuum_now_and_then().await {
                    break;
                }
            }
        }
        Ok(done)
    }

    /// Every [`VACUUM_CHECK_GROUPS`] groups, gives up to
    /// [`VACUUM_PAGES_PER_STEP`] free pages back to the file system when
    /// more than [`VACUUM_FREE_PAGES_MIN`] are free: a short step between
    /// groups, never a long stall. A failure only waits for the next check.
    /// Returns whether it gave pages back.
    async fn vacuum_now_and_then(&mut self) -> bool {
        self.groups_since_vacuum += 1;
        if self.groups_since_vacuum < VACUUM_CHECK_GROUPS {
            return false;
        }
        self.groups_since_vacuum = 0;
        let free: Result<i64, _> = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&mut self.conn).await;
        if free.is_ok_and(|free| free > VACUUM_FREE_PAGES_MIN) {
            let step = format!("PRAGMA incremental_vacuum({VACUUM_PAGES_PER_STEP})");
            match sqlx::raw_sql(AssertSqlSafe(step)).execute(&mut self.conn).await {
                Ok(_) => return true,
                Err(e) => tracing::warn!(error = %e, "incremental vacuum"),
            }
        }
        false
    }

    /// One transaction for a group, in two calls to SQLite: one reads what
    /// the group needs (its namespaces' counters, its nodes, the stored
    /// versions of its keys), one writes it all and commits. Every request
    /// is decided in order by the one LWW rule against what is stored and
    /// what earlier requests of the group wrote. A request refused (another
    /// principal's node id, a counter too far ahead, a broken chain) is
    /// answered alone; the others go on.
    async fn run_group(&mut self, batch: &[Pending]) -> Result<Vec<Result<Vec<OpResult>, BackendError>>, BackendError> {
        #[cfg(test)]
        assert!(!batch.iter().any(|p| p.request.node_id == tests::PANIC_NODE), "a write group fails (test)");
        let incoming: Vec<Vec<Incoming<'_>>> = batch.iter().map(|p| Incoming::of_request(p, &self.policy)).collect();
        let read = GroupRead::new(&self.bindings, batch);
        let rows: Vec<String> = sqlx::query_scalar(READ_GROUP)
            .bind(read.names_json())
            .bind(read.bind_json())
            .bind(read.nodes_json())
            .bind(read.keys_json())
            .fetch_all(&mut self.conn)
            .await
            .map_err(unavailable)?;
        let (mut counters, mut nodes, stored) = read.parse(&rows)?;
        let mut current: HashMap<GroupKey<'_>, Current<'_>> = stored
            .iter()
            .map(|(k, s)| {
                let doc = s.doc.as_deref().map(Into::into);
                (*k, Current { stamp: s.stamp.clone(), hash: s.hash, doc, born: s.born })
            })
            .collect();
        let before: HashMap<GroupKey<'_>, Hash64> = current.iter().filter_map(|(k, c)| Some((*k, c.hash?))).collect();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut written = HashMap::new();
        let mut first = 0;
        for (p, incoming) in batch.iter().zip(&incoming) {
            let ns = p.principal.namespace.as_str();
            let (seq, lamport_max, horizon) = counters.get_mut(ns).expect("every namespace of the group was read");
            let node = nodes.get_mut(&(ns, p.request.node_id.as_str())).expect("every node of the group was read");
            let outcome = admit(p, node, *lamport_max, self.limits.lamport_lead_max).map(|()| {
                *lamport_max = (*lamport_max).max(p.request.ops.iter().map(|o| o.stamp.lamport).max().unwrap_or(0));
                decide_request((ns, horizon), incoming, &mut current, &mut written, first, seq)
            });
            outcomes.push(outcome);
            first += incoming.len();
        }
        let flat: Vec<&Incoming<'_>> = incoming.iter().flatten().collect();
        let deltas = super::digest_deltas(
            written.iter().map(|(&(ns, c, id), &(i, ..))| (ns, c, id, before.get(&(ns, c, id)).copied(), flat[i].hash)),
        );
        let logged = self.logged + i64::try_from(deltas.buckets.len()).unwrap_or(i64::MAX);
        let fold = logged > self.digest_log_rows_max.load(Ordering::Relaxed);
        let roots: Vec<(&str, u8, &str, u8, i64)> = deltas.roots.iter().map(|&(n, c, h)| (n, 0, c, 0, h)).collect();
        let moved: Vec<(&str, &str, &str, &str, u64)> = nodes
            .iter()
            .filter(|(_, n)| n.moved)
            .filter_map(|(&(ns, node), n)| {
                n.chain.as_ref().map(|c| (ns, node, c.last.as_str(), c.before.as_str(), c.height))
            })
            .collect();
        let rows = rows_written(&written, &flat);
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        for row in &rows {
            let size = sizes.entry(row.0).or_default();
            *size = (*size).max(row.9);
        }
        let counters: Vec<(&str, u64, u64, u64)> = counters
            .iter()
            .map(|(n, &(s, l, _))| (n.as_str(), s, l, sizes.get(n.as_str()).copied().unwrap_or(0)))
            .collect();
        sqlx::query(if fold { WRITE_GROUP } else { WRITE_GROUP_AND_COMMIT })
            .bind(serde_json::to_string(&rows).expect("rows serialize"))
            .bind(serde_json::to_string(&roots).expect("roots serialize"))
            .bind(serde_json::to_string(&deltas.buckets).expect("deltas serialize"))
            .bind(serde_json::to_string(&moved).expect("chains serialize"))
            .bind(serde_json::to_string(&counters).expect("counters serialize"))
            .execute(&mut self.conn)
            .await
            .map_err(unavailable)?;
        self.logged = logged;
        if fold {
            fold_digests(&mut self.conn).await?;
            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await.map_err(unavailable)?;
            self.logged = 0;
        }
        self.bindings.remember(nodes.into_iter().map(|((n, node), s)| (n.to_owned(), node.to_owned(), s.principal)));
        Ok(outcomes)
    }
}

/// Both calls of a write group bind one unnumbered `?` per statement, in
/// order: sqlx binds the arguments of a text of several statements in
/// sequence (a numbered `?N` that a statement does not follow from its
/// predecessors is left unbound).
///
/// A write group's first call: it begins the transaction, takes (and
/// locks) its namespaces' counters, binds new node ids, and reads its
/// nodes and the stored versions of its keys, each as one JSON text. The
/// document of a stored version is read only for an op with its stamp.
const READ_GROUP: &str = "BEGIN IMMEDIATE; \
     INSERT INTO tide_namespaces (namespace, seq, lamport_max) SELECT value, 0, 0 FROM jsonb_each(?) WHERE true \
     ON CONFLICT (namespace) DO UPDATE SET seq = seq \
     RETURNING json_array(namespace, seq, lamport_max, horizon, horizon_lamport, horizon_node); \
     INSERT INTO tide_nodes (namespace, node_id, principal) \
     SELECT value->>0, value->>1, value->>2 FROM jsonb_each(?) WHERE true ON CONFLICT DO NOTHING; \
     SELECT json_group_array(json_array(j.key, n.principal, n.chain_last, n.chain_before, n.chain_height)) \
     FROM jsonb_each(?) AS j CROSS JOIN tide_nodes AS n ON n.namespace = j.value->>0 AND n.node_id = j.value->>1; \
     SELECT json_group_array(json_array(j.key, r.lamport, r.node_id, r.deleted, r.vhash, \
       CASE WHEN r.lamport = j.value->>3 AND r.node_id = j.value->>4 THEN r.wire END, r.born)) \
     FROM jsonb_each(?) AS j CROSS JOIN tide_changes AS r \
     ON r.namespace = j.value->>0 AND r.collection = j.value->>1 AND r.id = j.value->>2";

/// The text of [`WRITE_GROUP`] (a macro, so `concat!` can extend it).
macro_rules! write_group {
    () => {
        "INSERT INTO tide_changes \
       (namespace, seq, collection, id, lamport, node_id, deleted, bucket, vhash, size, wire, born) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, value->>8, \
       value->>9, value->>10, value->>11 FROM jsonb_each(?) WHERE true \
     ON CONFLICT (namespace, collection, id) DO UPDATE SET seq = excluded.seq, lamport = excluded.lamport, \
       node_id = excluded.node_id, deleted = excluded.deleted, vhash = excluded.vhash, size = excluded.size, \
       wire = excluded.wire, born = excluded.born; \
     INSERT INTO tide_digest (namespace, level, collection, ix, hash) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4 FROM jsonb_each(?) WHERE true \
     ON CONFLICT (namespace, level, collection, ix) DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash); \
     INSERT INTO tide_digest_log (namespace, collection, bucket, delta) \
     SELECT value->>0, value->>1, value->>2, value->>3 FROM jsonb_each(?); \
     UPDATE tide_nodes SET chain_last = j.value->>2, chain_before = j.value->>3, chain_height = j.value->>4 \
     FROM jsonb_each(?) AS j WHERE tide_nodes.namespace = j.value->>0 AND tide_nodes.node_id = j.value->>1; \
     UPDATE tide_namespaces SET seq = j.value->>1, lamport_max = j.value->>2, size_max = max(size_max, j.value->>3) \
     FROM jsonb_each(?) AS j WHERE tide_namespaces.namespace = j.value->>0"
    };
}

/// A write group's second call: the versions written, the roots' deltas,
/// the bucket deltas logged, the chains moved on and the counters, each
/// from one JSON text; then the commit (unless the digest log is folded first).
const WRITE_GROUP: &str = write_group!();

/// [`WRITE_GROUP`], then the commit.
const WRITE_GROUP_AND_COMMIT: &str = concat!(write_group!(), "; COMMIT");

/// What a write group asks of the database in its first call.
struct GroupRead<'a> {
    /// The group's namespaces, each once.
    names: Vec<&'a str>,
    /// Node ids to read (namespace, node id, requesting principal): those
    /// not known to be bound here, and those whose chain a request moves.
    nodes: Vec<(&'a str, &'a str, &'a str)>,
    /// Node ids not known to be bound here, to bind to their principal.
    unbound: Vec<(&'a str, &'a str, &'a str)>,
    /// Nodes whose binding is known and whose chain no request moves.
    known: HashMap<(&'a str, &'a str), Node>,
    /// Every op's key and stamp, in group order.
    keys: Vec<(GroupKey<'a>, u64, &'a str)>,
}

impl<'a> GroupRead<'a> {
    fn new(bindings: &Bindings, batch: &'a [Pending]) -> Self {
        let mut names: Vec<&str> = batch.iter().map(|p| p.principal.namespace.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let (mut nodes, mut unbound, mut known) = (Vec::new(), Vec::new(), HashMap::new());
        for p in batch {
            let key = (p.principal.namespace.as_str(), p.request.node_id.as_str());
            let bound = bindings.get(key.0, key.1);
            if bound.is_none() {
                unbound.push((key.0, key.1, p.principal.id.as_str()));
            }
            match bound {
                Some(principal) if p.request.lineage.is_none() => {
                    known.insert(key, Node { principal, chain: None, moved: false });
                }
                _ => nodes.push((key.0, key.1, p.principal.id.as_str())),
            }
        }
        let keys = batch
            .iter()
            .flat_map(|p| {
                let ns = p.principal.namespace.as_str();
                p.request.ops.iter().map(move |o| {
                    ((ns, o.collection.as_str(), o.id.as_str()), o.stamp.lamport, o.stamp.node_id.as_str())
                })
            })
            .collect();
        Self { names, nodes, unbound, known, keys }
    }

    fn names_json(&self) -> String {
        serde_json::to_string(&self.names).expect("names serialize")
    }

    fn bind_json(&self) -> String {
        serde_json::to_string(&self.unbound).expect("bindings serialize")
    }

    fn nodes_json(&self) -> String {
        serde_json::to_string(&self.nodes).expect("nodes serialize")
    }

    fn keys_json(&self) -> String {
        let keys: Vec<_> = self.keys.iter().map(|((n, c, i), l, node)| (n, c, i, l, node)).collect();
        serde_json::to_string(&keys).expect("keys serialize")
    }

    /// The counters per namespace, the nodes, and the stored versions, from
    /// the rows of [`READ_GROUP`] (one per namespace, then two).
    fn parse(self, rows: &[String]) -> Result<GroupState<'a>, BackendError> {
        let bad = |what: &str, e: serde_json::Error| BackendError::Internal(format!("write group {what}: {e}"));
        let [counters @ .., nodes, stored] = rows else {
            return Err(BackendError::Internal(format!("write group read {} rows", rows.len())));
        };
        let mut by_name = HashMap::with_capacity(counters.len());
        for row in counters {
            let (name, seq, lamport_max, horizon, lamport, node): CounterRow =
                serde_json::from_str(row).map_err(|e| bad("counters", e))?;
            let stamp = lamport.zip(node).map(|(l, n)| Stamp::new(l, n));
            by_name.insert(name, (seq, lamport_max, Horizon { seq: horizon, stamp }));
        }
        let mut known = self.known;
        let read: Vec<NodeRow> = serde_json::from_str(nodes).map_err(|e| bad("nodes", e))?;
        for (i, principal, last, before, height) in read {
            let chain =
                last.map(|last| Chain { last, before: before.unwrap_or_default(), height: height.unwrap_or(0) });
            known.insert((self.nodes[i].0, self.nodes[i].1), Node { principal, chain, moved: false });
        }
        let read: Vec<super::StoredRow<u8>> = serde_json::from_str(stored).map_err(|e| bad("stored versions", e))?;
        let mut versions: HashMap<GroupKey<'a>, Stored> = HashMap::with_capacity(read.len());
        for (i, lamport, node, deleted, hash, wire, born) in read {
            let doc = match wire {
                Some(wire) if deleted == 0 => super::prefix_doc(&wire)?,
                _ => None,
            };
            let entry = versions.entry(self.keys[i].0).or_insert_with(|| Stored {
                stamp: Stamp::new(lamport, node),
                hash: (deleted == 0).then(|| Hash64::from_i64(hash)),
                doc: None,
                born,
            });
            entry.doc = entry.doc.take().or(doc);
        }
        Ok((by_name, known, versions))
    }
}

/// A stored version as a write group reads it: its stamp, its hash if
/// live, and its document if a write carries its stamp.
struct Stored {
    stamp: Stamp,
    hash: Option<Hash64>,
    doc: Option<String>,
    born: u64,
}

/// What a write group read: counters (seq, highest counter, horizon) per
/// namespace, nodes, stored versions.
type GroupState<'a> =
    (HashMap<String, (u64, u64, Horizon)>, HashMap<(&'a str, &'a str), Node>, HashMap<GroupKey<'a>, Stored>);

/// A namespace's row as a write group reads it.
type CounterRow = (String, u64, u64, u64, Option<u64>, Option<String>);

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

/// Stored versions selected by `sql` (binding the namespace, a JSON list and
/// a collection; selecting id, lamport, node id, deleted, hash, rendering, seq).
async fn versions(
    conn: &mut SqliteConnection,
    sql: &'static str,
    ns: &Namespace,
    list: String,
    collection: &str,
) -> Result<Vec<StoredVersion>, BackendError> {
    let rows: Vec<(String, i64, String, bool, i64, String, i64)> =
        sqlx::query_as(sql).bind(ns.as_str()).bind(list).bind(collection).fetch_all(conn).await.map_err(unavailable)?;
    Ok(rows
        .into_iter()
        .map(|(id, lamport, node_id, deleted, hash, prefix, seq)| StoredVersion {
            id,
            lamport: to_u64(lamport),
            node_id,
            hash: Hash64::from_i64(hash),
            live: !deleted,
            prefix,
            seq: to_u64(seq),
        })
        .collect())
}

/// Brings a database to the current schema: creates a new one, or moves
/// one written by an earlier build (its versions re-rendered, their digests
/// recomputed), in one transaction.
async fn migrate(conn: &mut SqliteConnection) -> Result<(), BackendError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS tide_server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let found: Option<String> =
        sqlx::query_scalar(SELECT_SCHEMA_VERSION).fetch_optional(&mut *tx).await.map_err(unavailable)?;
    let version = match found {
        None => None,
        Some(v) => Some(check_schema_version(&v)?),
    };
    if version != Some(4) {
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await.map_err(unavailable)?;
    }
    if version.is_some_and(|v| v < 3) {
        backfill(&mut tx).await?;
    }
    if version.is_some_and(|v| v < 4) {
        sqlx::raw_sql(MIGRATE_V4).execute(&mut *tx).await.map_err(unavailable)?;
    }
    if version == Some(3) {
        sqlx::raw_sql("ALTER TABLE tide_changes ADD COLUMN born INTEGER NOT NULL DEFAULT 0")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    sqlx::query("INSERT OR REPLACE INTO tide_server_meta (key, value) VALUES ('schema_version', ?1)")
        .bind(super::SCHEMA_VERSION)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)
}

/// Moves the versions of a version-1 or -2 database to `tide_changes`,
/// rendered, and recomputes the digests from them.
async fn backfill(conn: &mut SqliteConnection) -> Result<(), BackendError> {
    let rows: Vec<BackfillRow> =
        sqlx::query_as("SELECT namespace, collection, id, lamport, node_id, deleted, doc, seq FROM tide_rows")
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?;
    let mut changes = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    for (ns, collection, id, lamport, node_id, deleted, doc, seq) in &rows {
        let doc = if *deleted { None } else { doc.as_deref() };
        let stamp = Stamp::new(to_u64(*lamport), node_id.clone());
        let hash = doc.map(|d| tide_core::digest::version_hash(collection, id, &stamp, Some(d)));
        let stored_hash = tide_core::digest::version_hash(collection, id, &stamp, doc);
        let prefix = super::render_prefix(collection, id, doc, stamp.lamport, node_id);
        let size = super::rendered_len(&prefix, to_u64(*seq));
        hashes.push((ns.as_str(), collection.as_str(), id.as_str(), None, hash));
        changes.push(Row(
            ns,
            *seq,
            collection,
            id,
            *lamport,
            node_id,
            u8::from(doc.is_none()),
            tide_core::digest::bucket(collection, id),
            stored_hash.to_i64(),
            size,
            prefix,
            0,
        ));
    }
    for chunk in changes.chunks(10_000) {
        insert_changes(conn, chunk).await?;
    }
    sqlx::raw_sql(
        "ALTER TABLE tide_namespaces ADD COLUMN size_max INTEGER NOT NULL DEFAULT 0; \
         UPDATE tide_namespaces SET size_max = coalesce((SELECT max(size) FROM tide_changes \
           WHERE tide_changes.namespace = tide_namespaces.namespace), 0); \
         DROP TABLE tide_rows; DELETE FROM tide_digest; DELETE FROM tide_digest_log;",
    )
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    let deltas = super::digest_deltas(hashes);
    add_digests(conn, &deltas).await?;
    fold_digests(conn).await
}

/// A stored row as the migration reads it.
type BackfillRow = (String, String, String, i64, String, bool, Option<String>, i64);

/// One row of `tide_changes`, in column order.
#[derive(Serialize)]
struct Row<'a>(&'a str, i64, &'a str, &'a str, i64, &'a str, u8, u16, i64, u64, String, u64);

/// Inserts or replaces rows of `tide_changes` (by key), in one statement.
async fn insert_changes(conn: &mut SqliteConnection, rows: &[Row<'_>]) -> Result<(), BackendError> {
    sqlx::query(
        "INSERT INTO tide_changes (namespace, seq, collection, id, lamport, node_id, deleted, bucket, vhash, size, wire) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, value->>8, \
         value->>9, value->>10 FROM json_each(?1) WHERE true \
         ON CONFLICT (namespace, collection, id) DO UPDATE SET seq = excluded.seq, lamport = excluded.lamport, \
         node_id = excluded.node_id, deleted = excluded.deleted, vhash = excluded.vhash, size = excluded.size, \
         wire = excluded.wire",
    )
    .bind(serde_json::to_string(rows).expect("rows serialize"))
    .execute(conn)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// Adds a write group's digest deltas: the roots at once, the buckets to
/// the log; returns how many rows the log grew by.
async fn add_digests(conn: &mut SqliteConnection, deltas: &super::DigestDeltas<'_>) -> Result<i64, BackendError> {
    if !deltas.roots.is_empty() {
        let roots: Vec<(&str, u8, &str, u8, i64)> = deltas.roots.iter().map(|&(n, c, h)| (n, 0, c, 0, h)).collect();
        sqlx::query(UPSERT_DIGEST)
            .bind(serde_json::to_string(&roots).expect("deltas serialize"))
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
    }
    if deltas.buckets.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO tide_digest_log (namespace, collection, bucket, delta) \
         SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)",
    )
    .bind(serde_json::to_string(&deltas.buckets).expect("deltas serialize"))
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    Ok(i64::try_from(deltas.buckets.len()).unwrap_or(i64::MAX))
}

/// Folds the logged bucket deltas into the group and bucket rows: read a
/// collection at a time as one JSON text (not a row per delta), combined
/// in Rust, written in one statement.
async fn fold_digests(conn: &mut SqliteConnection) -> Result<(), BackendError> {
    let logged: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT namespace, collection, json_group_array(json_array(bucket, delta)) FROM tide_digest_log \
         GROUP BY namespace, collection",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(unavailable)?;
    let mut rows: Vec<(&str, i16, &str, i32, i64)> = Vec::new();
    for (ns, collection, deltas) in &logged {
        let deltas: Vec<(i64, i64)> =
            serde_json::from_str(deltas).map_err(|e| BackendError::Internal(format!("digest log: {e}")))?;
        rows.extend(
            super::fold_collection(deltas).into_iter().map(|(l, i, h)| (ns.as_str(), l, collection.as_str(), i, h)),
        );
    }
    sqlx::query("DELETE FROM tide_digest_log").execute(&mut *conn).await.map_err(unavailable)?;
    sqlx::query(UPSERT_DIGEST)
        .bind(serde_json::to_string(&rows).expect("deltas serialize"))
        .execute(conn)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Binds the arguments every page statement begins with: `?1` the
/// namespace, `?2` the cursor, `?3` the node whose changes are skipped,
/// `?4` what is skipped (`PageQuery::skips`) and `?5` the collections in scope.
fn bind_page<'q, O>(
    statement: sqlx::query::QueryAs<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments>,
    ns: &'q Namespace,
    query: &PageQuery<'q>,
) -> sqlx::query::QueryAs<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments> {
    statement
        .bind(ns.as_str())
        .bind(to_i64(query.from))
        .bind(query.skip_node.unwrap_or(""))
        .bind(query.skips())
        .bind(query.scope.json())
}

/// The rows of `tide_changes` a group writes: the last applied op of each key.
fn rows_written<'a>(written: &'a HashMap<GroupKey<'_>, super::Written>, incoming: &[&'a Incoming<'_>]) -> Vec<Row<'a>> {
    let mut rows: Vec<Row<'_>> = written
        .iter()
        .map(|(&(ns, collection, id), &(i, seq, born))| {
            let inc = incoming[i];
            let prefix = inc.prefix();
            let size = super::rendered_len(&prefix, seq);
            let stamp = &inc.op.stamp;
            let bucket = tide_core::digest::bucket(collection, id);
            let deleted = u8::from(inc.doc.is_none());
            Row(
                ns,
                to_i64(seq),
                collection,
                id,
                to_i64(stamp.lamport),
                &stamp.node_id,
                deleted,
                bucket,
                inc.stored_hash(),
                size,
                prefix,
                born,
            )
        })
        .collect();
    rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    rows
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
        let scope = self.policy.scope(principal, &request);
        super::check_readable(&scope, &request)?;
        let apply = self.apply(principal, Arc::clone(&request));
        super::exchange(&request, apply, || self.read(principal, &request, scope.clone())).await
    }

    async fn listen(&self, on_commit: CommitCallback) -> Result<(), BackendError> {
        // Only this process writes the file: its writer reports its commits.
        let _ = self.on_commit.set(on_commit);
        Ok(())
    }

    async fn collect(&self, horizon_seqs: u64) -> Result<Collected, BackendError> {
        let (reply, answer) = oneshot::channel();
        self.collects
            .send((horizon_seqs, reply))
            .await
            .map_err(|_| BackendError::Internal("the writer has stopped".into()))?;
        answer.await.map_err(|_| BackendError::Internal("the collection step was abandoned".into()))?
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tide_core::{Limits, Op, OpResult, Payload, Stamp, SyncRequest};

    use super::{Durability, SqliteBackend};
    use crate::auth::{Namespace, Principal};
    use crate::backend::{Backend, BackendError};

    /// A node id whose write group panics, to prove a failed group cannot
    /// wedge the writer.
    pub(super) const PANIC_NODE: &str = "panic-in-the-writer";

    fn principal(id: &str) -> Principal {
        Principal { namespace: Namespace::new("ns"), id: id.to_owned() }
    }

    fn write(node: &str, id: &str, lamport: u64) -> Arc<SyncRequest> {
        let doc = serde_json::json!({ "n": lamport }).as_object().unwrap().clone().into();
        let op = Op {
            collection: "c".into(),
            id: id.into(),
            stamp: Stamp::new(lamport, node.to_owned()),
            payload: Payload::Put(doc),
            op_id: None,
        };
        let mut req = SyncRequest::new(node, None);
        req.ops.push(op);
        Arc::new(req)
    }

    async fn backend() -> (tempfile::TempDir, Arc<SqliteBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            SqliteBackend::open(&dir.path().join("s.db"), Durability::Normal, Limits::default()).await.unwrap();
        (dir, backend)
    }

    #[tokio::test]
    async fn a_panicking_write_group_answers_its_callers_and_the_next_group_commits() {
        let (_dir, backend) = backend().await;
        let err = backend.exchange(&principal(PANIC_NODE), write(PANIC_NODE, "x", 1)).await.unwrap_err();
        assert!(matches!(&err, BackendError::Internal(m) if m.contains("panicked")), "{err}");

        let reply = backend.exchange(&principal("a"), write("a", "y", 1)).await.unwrap();
        assert_eq!(reply.results, vec![OpResult::Applied { seq: 1 }]);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_hold_up_the_writer() {
        let (_dir, backend) = backend().await;
        // Callers dropped while their group is queued or committing.
        for i in 0..20 {
            let b = Arc::clone(&backend);
            let task = tokio::spawn(async move { b.exchange(&principal("a"), write("a", &format!("k{i}"), 1)).await });
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
            task.abort();
        }
        let b = principal("b");
        let last = backend.exchange(&b, write("b", "last", 1));
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), last)
            .await
            .expect("the writer is not held up")
            .unwrap();
        let OpResult::Applied { seq } = reply.results[0] else { panic!("{:?}", reply.results) };
        // Every write before was either committed whole or not at all: the
        // seqs are exactly the committed writes, one each.
        assert!((1..=21).contains(&seq), "{seq}");
        assert_eq!(reply.to_response().cursor.seq(), seq);
    }
}
