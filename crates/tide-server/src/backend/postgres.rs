//! The PostgreSQL backend: several `tide-server` processes on one database.
//!
//! **The cursor problem and how it is solved.** Sequence numbers taken in
//! one order can commit in another: with a plain sequence, a pull between
//! two commits could move a client's cursor past a change that commits
//! later, and the client would never see it. Here every write of a
//! namespace updates that namespace's row, which holds the seq counter, and
//! holds the row's lock until it commits: a group reads the counters (and
//! the row's version, its `xmin`) and writes its versions in one statement
//! that first updates the row *only if it is still that version*. So within
//! a namespace, seqs are assigned and committed in the same order: any
//! snapshot sees a prefix of the seqs, and a pull never skips or repeats a
//! change, whatever the number of writers or server processes. A group that
//! finds the row changed (another process wrote in between) writes nothing
//! and is applied again under the row's lock (`SELECT … FOR UPDATE`), which
//! cannot conflict. Writes to one namespace are serialized (as SQLite
//! serializes all writes); different namespaces write in parallel.
//! Same-key conflicts are decided by `tide_core::decide` against versions
//! read after the last write to the namespace, so there are no lost
//! updates, and one row lock per transaction means no deadlocks.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use tide_core::digest::Hash64;
use tide_core::{Horizon, Limits, OpResult, Stamp, SyncRequest, Verify};

use futures_util::FutureExt as _;
use tokio::sync::{mpsc, oneshot};

use super::sqlite::Durability;
use super::{
    Backend, BackendError, Bindings, COLLECT_NAMESPACES_PER_STEP, Collected, CommitCallback, Current, GroupKey,
    Incoming, Node, Page, PageQuery, PageRead, Pending, Policy, Reply, SELECT_SCHEMA_VERSION, SmallPage, SmallPageRow,
    StoredVersion, Validator, VerifyReply, WRITE_GROUP_REQUESTS_MAX, WRITE_QUEUE_REQUESTS_MAX, admit,
    check_schema_version, decide_request,
};
use crate::access::{AccessRules, Scope};
use crate::auth::{Namespace, Principal};

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

/// Version 2 to 3: each version stored rendered (the wire JSON up to
/// `"seq":`), with its length once completed and its version hash, in
/// place of the document; filled by [`backfill`].
const MIGRATE_V3: &[&str] = &[
    "ALTER TABLE tide_rows ADD COLUMN vhash BIGINT NOT NULL DEFAULT 0, ADD COLUMN size BIGINT NOT NULL DEFAULT 0, \
     ADD COLUMN wire TEXT NOT NULL DEFAULT ''",
    // The largest rendering a namespace ever stored: pages of small changes sum no sizes.
    "ALTER TABLE tide_namespaces ADD COLUMN size_max BIGINT NOT NULL DEFAULT 0",
];

/// Version 3 to 4: each namespace's tombstone horizon (PROTOCOL.md §14).
const MIGRATE_V4: &[&str] = &[
    r#"ALTER TABLE tide_namespaces ADD COLUMN horizon BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN horizon_lamport BIGINT, ADD COLUMN horizon_node TEXT COLLATE "C""#,
    "ALTER TABLE tide_rows ADD COLUMN born BIGINT NOT NULL DEFAULT 0",
    "UPDATE tide_server_meta SET value = '4' WHERE key = 'schema_version'",
];

/// Version 1 to 2: each row's digest bucket, the digest table (filled from
/// the rows), and the principal each node id is bound to.
const MIGRATE_V2: &[&str] = &[
    "ALTER TABLE tide_rows ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0",
    r#"CREATE TABLE tide_digest (
        namespace  TEXT COLLATE "C" NOT NULL,
        level      SMALLINT NOT NULL,
        collection TEXT COLLATE "C" NOT NULL,
        ix         INTEGER NOT NULL,
        hash       BIGINT NOT NULL,
        PRIMARY KEY (namespace, level, collection, ix))"#,
    r#"CREATE TABLE tide_digest_log (
        id         BIGSERIAL PRIMARY KEY,
        namespace  TEXT COLLATE "C" NOT NULL,
        collection TEXT COLLATE "C" NOT NULL,
        bucket     INTEGER NOT NULL,
        delta      BIGINT NOT NULL)"#,
    r#"CREATE TABLE tide_nodes (
        namespace    TEXT COLLATE "C" NOT NULL,
        node_id      TEXT COLLATE "C" NOT NULL,
        principal    TEXT COLLATE "C" NOT NULL,
        chain_last   TEXT COLLATE "C",
        chain_before TEXT COLLATE "C",
        chain_height BIGINT,
        PRIMARY KEY (namespace, node_id))"#,
    "UPDATE tide_server_meta SET value = '2' WHERE key = 'schema_version'",
];

/// XORs rows of `(namespace, level, collection, ix, hash)` into the digest table.
const UPSERT_DIGEST: &str = "INSERT INTO tide_digest (namespace, level, collection, ix, hash) \
     SELECT * FROM UNNEST($1::text[], $2::smallint[], $3::text[], $4::int[], $5::bigint[]) \
     ON CONFLICT (namespace, level, collection, ix) DO UPDATE SET hash = tide_digest.hash # excluded.hash";

/// The PostgreSQL backend.
pub struct PostgresBackend {
    pool: PgPool,
    limits: Limits,
    bindings: Arc<Bindings>,
    digest_log_rows_max: Arc<std::sync::atomic::AtomicI64>,
    writers: Arc<Writers>,
    /// Told of every commit of this process that applied ops (see [`Backend::listen`]).
    on_commit: Arc<std::sync::OnceLock<CommitCallback>>,
    /// The embedding application's access rules and validator, if set.
    policy: Arc<Policy>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend").finish_non_exhaustive()
    }
}

/// Longest any statement of the server may wait for a lock
/// (`lock_timeout`): a transaction stuck holding a namespace's row makes
/// that namespace's writes answer 503 after this, not hang.
pub const POSTGRES_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest any statement of the server may run (`statement_timeout`).
pub const POSTGRES_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a session of the server may sit idle inside a transaction
/// (`idle_in_transaction_session_timeout`): PostgreSQL ends the session of a
/// server process that stopped mid-transaction, and with it its locks.
pub const POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[expect(clippy::needless_pass_by_value, reason = "the shape `map_err` wants")]
fn unavailable(e: sqlx::Error) -> BackendError {
    // A lock or statement that ran out of time (`lock_not_available`,
    // `query_canceled`): retrying later can succeed.
    let timed_out =
        e.as_database_error().and_then(sqlx::error::DatabaseError::code).is_some_and(|c| c == "55P03" || c == "57014");
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            BackendError::Unavailable(e.to_string())
        }
        _ if timed_out => BackendError::Unavailable(e.to_string()),
        _ => BackendError::Internal(e.to_string()),
    }
}

/// The settings of every session of the server: its timeouts, and
/// `synchronous_commit` off for [`Durability::Normal`] (the last commits may
/// be lost if PostgreSQL's machine loses power; never a torn one).
fn session_settings(durability: Durability) -> Vec<(&'static str, String)> {
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    let mut settings = vec![
        ("lock_timeout", ms(POSTGRES_LOCK_TIMEOUT)),
        ("statement_timeout", ms(POSTGRES_STATEMENT_TIMEOUT)),
        ("idle_in_transaction_session_timeout", ms(POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT)),
    ];
    if durability == Durability::Normal {
        settings.push(("synchronous_commit", "off".to_owned()));
    }
    settings
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
    /// Every session runs with the timeouts above and, for
    /// [`Durability::Normal`], `synchronous_commit = off`.
    pub async fn open(url: &str, durability: Durability, limits: Limits) -> Result<Arc<Self>, BackendError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| BackendError::Internal(format!("database url: {e}")))?
            .options(session_settings(durability));
        let pool =
            PgPoolOptions::new().max_connections(POSTGRES_POOL_MAX).connect_with(options).await.map_err(unavailable)?;
        let mut tx = pool.begin().await.map_err(unavailable)?;
        // A migration may take long, and so may waiting for another
        // server's: no session timeout applies to it.
        sqlx::raw_sql("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
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
        let version = check_schema_version(&version)?;
        if version < 2 {
            for statement in MIGRATE_V2 {
                sqlx::query(*statement).execute(&mut *tx).await.map_err(unavailable)?;
            }
        }
        if version < 3 {
            for statement in MIGRATE_V3 {
                sqlx::query(*statement).execute(&mut *tx).await.map_err(unavailable)?;
            }
            backfill(&mut tx).await?;
        }
        if version < 4 {
            for statement in MIGRATE_V4 {
                sqlx::query(*statement).execute(&mut *tx).await.map_err(unavailable)?;
            }
        }
        tx.commit().await.map_err(unavailable)?;
        let digest_log_rows_max = Arc::new(std::sync::atomic::AtomicI64::new(super::DIGEST_LOG_ROWS_MAX));
        let (bindings, writers) = (Arc::default(), Arc::default());
        let (on_commit, policy) = (Arc::default(), Arc::default());
        Ok(Arc::new(Self { pool, limits, bindings, digest_log_rows_max, writers, on_commit, policy }))
    }

    /// Applies a request's ops in its namespace's next write group.
    async fn apply(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Vec<OpResult>, BackendError> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { principal: principal.clone(), request, reply };
        loop {
            let queue = {
                let mut writers = self.writers.lock();
                let ns = principal.namespace.as_str();
                writers
                    .entry(ns.to_owned())
                    .or_insert_with(|| {
                        let (queue, work) = mpsc::channel(WRITE_QUEUE_REQUESTS_MAX);
                        let writer = NamespaceWriter {
                            pool: self.pool.clone(),
                            namespace: ns.to_owned(),
                            limits: self.limits.clone(),
                            bindings: Arc::clone(&self.bindings),
                            digest_log_rows_max: Arc::clone(&self.digest_log_rows_max),
                            contended: std::sync::Mutex::new(None),
                            on_commit: Arc::clone(&self.on_commit),
                            policy: Arc::clone(&self.policy),
                        };
                        tokio::spawn(writer.run(work, Arc::downgrade(&self.writers)));
                        queue
                    })
                    .clone()
            };
            // A writer that just went idle refuses: queue to a new one.
            match queue.send(pending).await {
                Ok(()) => break,
                // (It left the map before it stopped taking requests.)
                Err(mpsc::error::SendError(back)) => pending = back,
            }
        }
        answer.await.map_err(|_| BackendError::Internal("the write group was abandoned".into()))?
    }

    /// Folds logged bucket deltas once more than `rows` wait (default
    /// [`super::DIGEST_LOG_ROWS_MAX`]).
    pub fn set_digest_log_rows_max(&self, rows: usize) {
        self.digest_log_rows_max.store(i64::try_from(rows).unwrap_or(i64::MAX), std::sync::atomic::Ordering::Relaxed);
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

    /// The page after the request's cursor and the answers to its digest
    /// and fetch extensions, read in one snapshot when there are any.
    async fn read(
        &self,
        principal: &Principal,
        req: &SyncRequest,
        scope: Scope,
    ) -> Result<(Page, VerifyReply), BackendError> {
        let ns = &principal.namespace;
        if self.bindings.get(ns.as_str(), &req.node_id).is_none() {
            let owner: Option<String> =
                sqlx::query_scalar("SELECT principal FROM tide_nodes WHERE namespace = $1 AND node_id = $2")
                    .bind(ns.as_str())
                    .bind(&req.node_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(unavailable)?;
            self.bindings.remember(owner.map(|o| (ns.as_str().to_owned(), req.node_id.clone(), o)));
        }
        self.bindings.check(principal, &req.node_id)?;
        if req.verify.is_none() && req.fetch.is_empty() {
            // Mostly one statement: a snapshot of its own.
            let mut conn = self.pool.acquire().await.map_err(unavailable)?;
            if let Some(page) = self.page(&mut conn, ns, req, scope.clone(), false).await? {
                return Ok((page, VerifyReply::default()));
            }
        }
        let mut tx =
            self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(unavailable)?;
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
        conn: &mut PgConnection,
        ns: &Namespace,
        req: &SyncRequest,
        scope: Scope,
        whole: bool,
    ) -> Result<Option<Page>, BackendError> {
        let mut query = PageQuery::new(req, &self.limits, scope);
        loop {
            // Most namespaces hold small changes: their pages need no sizes summed.
            let small: Option<SmallPageRow> = bind_page(sqlx::query_as(SMALL_PAGE), ns, &query)
                .bind(i64::try_from(query.bytes_max).unwrap_or(i64::MAX))
                .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            match query.small(small) {
                SmallPage::Again => continue,
                SmallPage::Done(page) => return Ok(Some(page)),
                SmallPage::SumSizes if !whole => return Ok(None),
                SmallPage::SumSizes => {}
            }
            let (ns_seq, horizon, total, n, text, last): PageRow = bind_page(sqlx::query_as(PAGE), ns, &query)
                .bind(i64::try_from(query.bytes_max).unwrap_or(i64::MAX))
                .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
                .fetch_one(&mut *conn)
                .await
                .map_err(unavailable)?;
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
        tx: &mut Transaction<'_, Postgres>,
        ns: &Namespace,
        req: &SyncRequest,
        settled: bool,
    ) -> Result<VerifyReply, BackendError> {
        let mut reply = VerifyReply::default();
        let bytes_max = self.limits.response_bytes_max;
        if !req.fetch.is_empty() {
            let collections: Vec<&str> = req.fetch.iter().map(|k| k.0.as_str()).collect();
            let ids: Vec<&str> = req.fetch.iter().map(|k| k.1.as_str()).collect();
            let rows: Vec<VersionRow> = sqlx::query_as(
                "SELECT r.id, r.lamport, r.node_id, r.deleted, r.vhash, r.wire, r.seq FROM tide_rows r \
                 JOIN UNNEST($2::text[], $3::text[]) AS k(collection, id) ON r.collection = k.collection AND r.id = k.id \
                 WHERE r.namespace = $1 ORDER BY r.collection, r.id",
            )
            .bind(ns.as_str())
            .bind(&collections)
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
            super::push_fetched(&mut reply, &to_versions(rows), bytes_max);
        }
        match &req.verify {
            // Digests are only comparable when nothing is in flight either way.
            None | Some(Verify::Roots) if !settled => {}
            None => {}
            Some(Verify::Roots) => {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT collection, hash FROM tide_digest \
                     WHERE namespace = $1 AND level = 0 AND hash <> 0 ORDER BY collection",
                )
                .bind(ns.as_str())
                .fetch_all(&mut **tx)
                .await
                .map_err(unavailable)?;
                reply.roots = Some(rows.into_iter().map(|(c, h)| (c, Hash64::from_i64(h))).collect());
            }
            Some(Verify::Groups { collection }) => reply.groups = Some(level(tx, ns, collection, 1, None).await?),
            Some(Verify::Buckets { collection, groups }) => {
                reply.buckets = Some(level(tx, ns, collection, 2, Some(groups)).await?);
            }
            Some(Verify::Keys { collection, buckets: wire_buckets, have }) => {
                let buckets: Vec<i32> = wire_buckets.iter().map(|b| i32::from(*b)).collect();
                let rows: Vec<VersionRow> = sqlx::query_as(
                    "SELECT id, lamport, node_id, deleted, vhash, wire, seq FROM tide_rows \
                     WHERE namespace = $1 AND collection = $2 AND bucket = ANY($3)",
                )
                .bind(ns.as_str())
                .bind(collection)
                .bind(&buckets)
                .fetch_all(&mut **tx)
                .await
                .map_err(unavailable)?;
                // Sorted here, so the planner picks the bucket index, not an id-ordered walk.
                let mut rows = to_versions(rows);
                rows.sort_unstable_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
                super::compare_keys(&mut reply, &rows, (collection, wire_buckets, have), bytes_max);
            }
        }
        Ok(reply)
    }
}

/// The page statement: the namespace's seq, the byte total and count of the
/// first `$7 + 1` changes (read from `size`, not from the renderings), and,
/// only if that total fits the budget `$6`, the first `$7` renderings
/// joined and the seq of the last. `$5` names the collections in scope
/// (NULL: every one).
///
/// Every page statement joins renderings in the order its subquery reads
/// them (`ORDER BY seq LIMIT`), as the SQLite backend does: a plain
/// aggregate consumes its one input in order. Before PostgreSQL 16,
/// `string_agg(… ORDER BY seq)` sorted the rows again inside the aggregate,
/// which cost a quarter of the page statement (BENCHMARKS.md).
const PAGE: &str = "WITH g AS MATERIALIZED (SELECT coalesce(sum(size + 1), 0)::bigint AS total, count(*) AS n \
       FROM (SELECT size FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5)) \
       ORDER BY seq LIMIT $7 + 1) s) \
     SELECT ns.seq, ns.horizon, g.total, g.n, p.text, p.last \
     FROM g LEFT JOIN tide_namespaces AS ns ON ns.namespace = $1, (SELECT string_agg(wire || seq || '}', ',') AS text, max(seq) AS last \
       FROM (SELECT seq, wire FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5)) \
       ORDER BY seq LIMIT $7) w WHERE (SELECT total FROM g) <= $6) p";

/// The page statement for a namespace whose largest rendering ever stored
/// (`size_max`) times the limit fits the budget: no sizes summed; the
/// namespace's seq and `size_max`, the first `$7` renderings joined (only if
/// they are sure to fit), their count, the last seq, and whether a change
/// follows. No row without the namespace.
const SMALL_PAGE: &str = "SELECT ns.seq, ns.horizon, ns.size_max, p.text, p.n, p.last, p.n = $7 AND EXISTS (SELECT 1 FROM tide_rows \
       WHERE namespace = $1 AND seq > p.last AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5))) \
     FROM tide_namespaces AS ns, (SELECT string_agg(wire || seq || '}', ',') AS text, count(*) AS n, \
       max(seq) AS last FROM (SELECT seq, wire FROM tide_rows WHERE namespace = $1 AND seq > $2 \
       AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5)) ORDER BY seq LIMIT $7) w \
       WHERE (SELECT (size_max + 1) * $7 FROM tide_namespaces WHERE namespace = $1) <= $6) AS p \
     WHERE ns.namespace = $1";

/// What the page statement returns: the namespace's seq and horizon, the
/// byte total and count of the first changes, their renderings (if they
/// fit) and the last seq.
type PageRow = (Option<i64>, Option<i64>, i64, i64, Option<String>, Option<i64>);

/// A page whose first changes run past the byte budget: their sizes, then
/// as many renderings as fit (at least one), in one snapshot.
async fn over_budget(conn: &mut PgConnection, ns: &Namespace, query: &PageQuery<'_>) -> Result<PageRead, BackendError> {
    if conn.is_in_transaction() {
        return over_budget_in(conn, ns, query).await;
    }
    let mut tx = conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(unavailable)?;
    let read = over_budget_in(&mut tx, ns, query).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(read)
}

async fn over_budget_in(
    tx: &mut PgConnection,
    ns: &Namespace,
    query: &PageQuery<'_>,
) -> Result<PageRead, BackendError> {
    let sizes: Vec<(i64,)> = bind_page(
        sqlx::query_as(
            "SELECT size FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5)) ORDER BY seq LIMIT $6",
        ),
        ns,
        query,
    )
    .bind(i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(unavailable)?;
    let sizes: Vec<u64> = sizes.into_iter().map(|(size,)| to_u64(size)).collect();
    let count = query.fitting(&sizes);
    let (text, last): (Option<String>, Option<i64>) = bind_page(
        sqlx::query_as(
            "SELECT string_agg(wire || seq || '}', ','), max(seq) FROM (SELECT seq, wire FROM tide_rows \
         WHERE namespace = $1 AND seq > $2 AND (($4 & 1) = 0 OR node_id <> $3) AND (NOT deleted OR seq > ($4 >> 1)) AND ($5::text[] IS NULL OR collection = ANY($5)) ORDER BY seq LIMIT $6) w",
        ),
        ns,
        query,
    )
    .bind(i64::try_from(count).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await
    .map_err(unavailable)?;
    Ok(PageRead {
        json: text.unwrap_or_default(),
        count,
        last: to_u64(last.unwrap_or(0)),
        has_more: count < sizes.len(),
    })
}

/// The write groups of one namespace in this process: requests that
/// arrive while a group commits go into the next. Namespaces write in
/// parallel, each on a connection of the pool; across processes the
/// namespace row's lock orders them.
struct NamespaceWriter {
    pool: PgPool,
    namespace: String,
    limits: Limits,
    bindings: Arc<Bindings>,
    digest_log_rows_max: Arc<std::sync::atomic::AtomicI64>,
    /// Until when the namespace's groups take the lock first.
    contended: std::sync::Mutex<Option<std::time::Instant>>,
    on_commit: Arc<std::sync::OnceLock<CommitCallback>>,
    policy: Arc<Policy>,
}

/// How long a namespace's write groups take its row lock from the start
/// after one found that another process wrote in between.
const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a namespace's writer task waits for work before it ends.
const WRITER_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

impl NamespaceWriter {
    /// Applies groups until the queue is idle for [`WRITER_IDLE`], then
    /// leaves the map (after which no request can be queued to it) and
    /// applies what was queued meanwhile; or until the backend is dropped
    /// (the queue closes, and the pool goes with the task).
    async fn run(self, mut queue: mpsc::Receiver<Pending>, writers: std::sync::Weak<Writers>) {
        let mut batch = Vec::with_capacity(WRITE_GROUP_REQUESTS_MAX);
        loop {
            let received =
                tokio::time::timeout(WRITER_IDLE, queue.recv_many(&mut batch, WRITE_GROUP_REQUESTS_MAX)).await;
            match received {
                Ok(0) => return,
                Ok(_) => self.apply(&mut batch).await,
                Err(_) => {
                    if let Some(writers) = writers.upgrade() {
                        writers.lock().remove(&self.namespace);
                    }
                    queue.close();
                    while queue.recv_many(&mut batch, WRITE_GROUP_REQUESTS_MAX).await > 0 {
                        self.apply(&mut batch).await;
                    }
                    return;
                }
            }
        }
    }

    async fn apply(&self, batch: &mut Vec<Pending>) {
        let outcome = std::panic::AssertUnwindSafe(self.run_group(batch)).catch_unwind().await;
        match outcome.unwrap_or_else(|_| Err(BackendError::Internal("the write group panicked".into()))) {
            Ok(outcomes) => {
                for (p, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = p.reply.send(outcome);
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.duplicate()));
                }
            }
        }
    }

    /// Applies a group of the namespace's requests. First in two round
    /// trips and no transaction held open: one statement reads the
    /// namespace's counters, the group's nodes and the stored versions of
    /// its keys; one writes everything, on condition that the namespace's
    /// row is still the version read (else it writes nothing). Only when
    /// another process wrote the namespace in between is the group applied
    /// again under the namespace's row lock, which cannot conflict.
    ///
    /// After a conflict the namespace's groups take the lock from the start
    /// for [`CONTENDED_FOR`]: another process is writing it too, and a
    /// group that conflicts pays both ways.
    async fn run_group(&self, batch: &[Pending]) -> Result<Vec<Result<Vec<OpResult>, BackendError>>, BackendError> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let contended = self
            .contended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| std::time::Instant::now() < until);
        if !contended {
            if let Some((outcomes, applied)) = self.try_group(&mut conn, batch, false).await? {
                // The write statement committed by itself.
                if applied {
                    self.committed();
                }
                return Ok(outcomes);
            }
            *self.contended.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now() + CONTENDED_FOR);
        }
        let mut tx = conn.begin().await.map_err(unavailable)?;
        lock_namespace(&mut tx, &self.namespace).await?;
        let (outcomes, applied) = self
            .try_group(&mut tx, batch, true)
            .await?
            .ok_or_else(|| BackendError::Internal("a write group conflicted under its namespace's lock".into()))?;
        tx.commit().await.map_err(unavailable)?;
        if applied {
            self.committed();
        }
        Ok(outcomes)
    }

    /// Tells this process's listener that the namespace committed a change
    /// (other processes hear of it by the notification).
    fn committed(&self) {
        if let Some(on_commit) = self.on_commit.get() {
            on_commit(&self.namespace);
        }
    }

    /// One attempt at a group, with whether it applied any op: `None` when
    /// the namespace changed between its read and its write, which then
    /// wrote nothing, or (unless `locked`) its read missed what another
    /// process made meanwhile.
    async fn try_group(
        &self,
        conn: &mut PgConnection,
        batch: &[Pending],
        locked: bool,
    ) -> Result<Option<(Vec<Result<Vec<OpResult>, BackendError>>, bool)>, BackendError> {
        let ns = self.namespace.as_str();
        let incoming: Vec<Vec<Incoming<'_>>> = batch.iter().map(|p| Incoming::of_request(p, &self.policy)).collect();
        let (counters, mut nodes, stored) = read_group(conn, ns, batch).await?;
        // A namespace another process made after this read's snapshot began.
        let Some(counters) = counters else { return Ok(None) };
        if !locked && batch.iter().any(|p| !nodes.contains_key(p.request.node_id.as_str())) {
            return Ok(None);
        }
        let (mut seq, mut lamport_max) = (to_u64(counters.seq), to_u64(counters.lamport_max));
        let mut current: HashMap<GroupKey<'_>, Current<'_>> = HashMap::with_capacity(stored.len());
        for (key, (stamp, hash, doc, born)) in &stored {
            let doc = doc.as_deref().map(Into::into);
            current.insert(*key, Current { stamp: stamp.clone(), hash: *hash, doc, born: *born });
        }
        let before: HashMap<GroupKey<'_>, Hash64> = current.iter().filter_map(|(k, c)| Some((*k, c.hash?))).collect();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut written = HashMap::new();
        let mut first = 0;
        for (p, incoming) in batch.iter().zip(&incoming) {
            let Some(node) = nodes.get_mut(p.request.node_id.as_str()) else {
                // Bound by another process in the same instant: retry.
                outcomes.push(Err(BackendError::Unavailable("a node id was bound concurrently; retry".into())));
                first += incoming.len();
                continue;
            };
            let outcome = admit(p, node, lamport_max, self.limits.lamport_lead_max).map(|()| {
                lamport_max = lamport_max.max(p.request.ops.iter().map(|o| o.stamp.lamport).max().unwrap_or(0));
                decide_request((ns, &counters.horizon), incoming, &mut current, &mut written, first, &mut seq)
            });
            outcomes.push(outcome);
            first += incoming.len();
        }
        let flat: Vec<&Incoming<'_>> = incoming.iter().flatten().collect();
        let deltas = super::digest_deltas(
            written.iter().map(|(&(n, c, id), &(i, ..))| (n, c, id, before.get(&(n, c, id)).copied(), flat[i].hash)),
        );
        let applied = !written.is_empty();
        let counters = Counters { seq: to_i64(seq), lamport_max: to_i64(lamport_max), ..counters };
        let Some(logged) = write_group(conn, ns, (&written, &flat), &deltas, &nodes, (&counters, applied)).await?
        else {
            return Ok(None);
        };
        self.bindings.remember(nodes.into_iter().map(|(node, n)| (ns.to_owned(), node.to_owned(), n.principal)));
        if logged > self.digest_log_rows_max.load(std::sync::atomic::Ordering::Relaxed) {
            let mut tx = conn.begin().await.map_err(unavailable)?;
            fold_digests(&mut tx).await?;
            tx.commit().await.map_err(unavailable)?;
        }
        Ok(Some((outcomes, applied)))
    }
}

/// A namespace's counters as a write group reads them, and the version of
/// its row they were read from (its `xmin`: every write group updates the
/// row, so another version means another process wrote in between).
struct Counters {
    seq: i64,
    lamport_max: i64,
    version: String,
    horizon: Horizon,
}

/// Locks the namespace's row (making it first if it is new) until the
/// transaction ends.
async fn lock_namespace(tx: &mut Transaction<'_, Postgres>, ns: &str) -> Result<(), BackendError> {
    const LOCK: &str = "SELECT seq FROM tide_namespaces WHERE namespace = $1 FOR UPDATE";
    let locked: Option<i64> = sqlx::query_scalar(LOCK).bind(ns).fetch_optional(&mut **tx).await.map_err(unavailable)?;
    if locked.is_some() {
        return Ok(());
    }
    sqlx::query("INSERT INTO tide_namespaces (namespace, seq, lamport_max) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING")
        .bind(ns)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    sqlx::query(LOCK).bind(ns).execute(&mut **tx).await.map_err(unavailable)?;
    Ok(())
}

/// Binds the arguments every page statement begins with: `$1` the
/// namespace, `$2` the cursor, `$3` the node whose changes are skipped,
/// `$4` what is skipped (`PageQuery::skips`) and `$5` the collections in scope.
fn bind_page<'q, O>(
    statement: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ns: &'q Namespace,
    query: &'q PageQuery<'q>,
) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    statement
        .bind(ns.as_str())
        .bind(to_i64(query.from))
        .bind(query.skip_node.unwrap_or(""))
        .bind(query.skips())
        .bind(query.scope.collections.as_deref())
}

/// A stored version as a write group reads it: stamp, hash if live,
/// document if a write carries its stamp, its key's incarnation start.
type Stored = (Stamp, Option<Hash64>, Option<String>, u64);

/// Reads the namespace's counters (`None` for a namespace made by another
/// process after the statement's snapshot), binds the group's new node ids
/// and reads its nodes (with their chains) and the stored versions of its
/// keys, in one statement.
async fn read_group<'a>(
    conn: &mut PgConnection,
    ns: &str,
    batch: &'a [Pending],
) -> Result<(Option<Counters>, HashMap<&'a str, Node>, HashMap<GroupKey<'a>, Stored>), BackendError> {
    let mut node_ids: Vec<&str> = Vec::new();
    let mut principals: Vec<&str> = Vec::new();
    for p in batch {
        if !node_ids.contains(&p.request.node_id.as_str()) {
            node_ids.push(&p.request.node_id);
            principals.push(&p.principal.id);
        }
    }
    let keys: Vec<GroupKey<'a>> = batch
        .iter()
        .flat_map(|p| p.request.ops.iter().map(move |o| (ns_of(p), o.collection.as_str(), o.id.as_str())))
        .collect();
    let ops: Vec<&tide_core::Op> = batch.iter().flat_map(|p| &p.request.ops).collect();
    let (seq, lamport_max, version, horizon_json, nodes_json, stored_json): GroupRead = sqlx::query_as(
        "WITH made AS (INSERT INTO tide_namespaces (namespace, seq, lamport_max) VALUES ($1, 0, 0) \
           ON CONFLICT DO NOTHING RETURNING seq, lamport_max, xmin::text AS version), \
         ns AS (SELECT seq, lamport_max, xmin::text AS version, horizon, horizon_lamport, horizon_node \
           FROM tide_namespaces WHERE namespace = $1 \
           UNION ALL SELECT *, 0::bigint, NULL::bigint, NULL::text COLLATE \"C\" FROM made), \
         bound AS (INSERT INTO tide_nodes (namespace, node_id, principal) \
           SELECT $1, n, p FROM UNNEST($2::text[], $3::text[]) AS u(n, p) ON CONFLICT DO NOTHING \
           RETURNING node_id, principal, chain_last, chain_before, chain_height), \
         known AS (SELECT node_id, principal, chain_last, chain_before, chain_height FROM tide_nodes \
           WHERE namespace = $1 AND node_id = ANY($2)) \
         SELECT (SELECT seq FROM ns LIMIT 1), (SELECT lamport_max FROM ns LIMIT 1), (SELECT version FROM ns LIMIT 1), \
           (SELECT json_build_array(horizon, horizon_lamport, horizon_node) FROM ns LIMIT 1)::text, \
           (SELECT coalesce(json_agg(json_build_array(node_id, principal, chain_last, chain_before, chain_height)), '[]') \
            FROM (SELECT * FROM bound UNION ALL SELECT * FROM known) b)::text, \
           (SELECT coalesce(json_agg(json_build_array(k.i - 1, r.lamport, r.node_id, r.deleted, r.vhash, \
              CASE WHEN r.lamport = k.lamport AND r.node_id = k.node_id THEN r.wire END, r.born)), '[]') \
            FROM UNNEST($4::text[], $5::text[], $6::bigint[], $7::text[]) WITH ORDINALITY AS k(collection, id, lamport, node_id, i) \
            JOIN tide_rows r ON r.namespace = $1 AND r.collection = k.collection AND r.id = k.id)::text",
    )
    .bind(ns)
    .bind(&node_ids)
    .bind(&principals)
    .bind(ops.iter().map(|o| o.collection.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|o| o.id.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|o| to_i64(o.stamp.lamport)).collect::<Vec<_>>())
    .bind(ops.iter().map(|o| o.stamp.node_id.as_str()).collect::<Vec<_>>())
    .fetch_one(&mut *conn)
    .await
    .map_err(unavailable)?;
    let bad = |what: &str, e: serde_json::Error| BackendError::Internal(format!("write group {what}: {e}"));
    let read: Vec<BoundNode> = serde_json::from_str(&nodes_json).map_err(|e| bad("nodes", e))?;
    let mut nodes = HashMap::with_capacity(read.len());
    for (node_id, principal, last, before, height) in read {
        let Some(&node) = node_ids.iter().find(|n| **n == node_id) else { continue };
        let chain =
            last.map(|last| tide_core::Chain { last, before: before.unwrap_or_default(), height: height.unwrap_or(0) });
        nodes.insert(node, Node { principal, chain, moved: false });
    }
    let read: Vec<super::StoredRow<bool>> =
        serde_json::from_str(&stored_json).map_err(|e| bad("stored versions", e))?;
    let mut stored: HashMap<GroupKey<'a>, Stored> = HashMap::with_capacity(read.len());
    for (i, lamport, node, deleted, hash, wire, born) in read {
        let doc = match wire {
            Some(wire) if !deleted => super::prefix_doc(&wire)?,
            _ => None,
        };
        let entry = stored
            .entry(keys[i])
            .or_insert_with(|| (Stamp::new(lamport, node), (!deleted).then(|| Hash64::from_i64(hash)), None, born));
        entry.2 = entry.2.take().or(doc);
    }
    let counters = match (seq, lamport_max, version, horizon_json) {
        (Some(seq), Some(lamport_max), Some(version), Some(horizon)) => {
            let (seq_h, lamport, node): (u64, Option<u64>, Option<String>) =
                serde_json::from_str(&horizon).map_err(|e| bad("horizon", e))?;
            let horizon = Horizon { seq: seq_h, stamp: lamport.zip(node).map(|(l, n)| Stamp::new(l, n)) };
            Some(Counters { seq, lamport_max, version, horizon })
        }
        _ => None,
    };
    Ok((counters, nodes, stored))
}

/// What a write group's read returns: the namespace's counters and row
/// version (absent when the statement could not see the row), its nodes
/// and its stored versions (as JSON).
type GroupRead = (Option<i64>, Option<i64>, Option<String>, Option<String>, String, String);

/// A node as a write group reads it: id, principal, chain (last, before, height).
type BoundNode = (String, String, Option<String>, Option<String>, Option<u64>);

fn ns_of(p: &Pending) -> &str {
    p.principal.namespace.as_str()
}

/// Writes a group in one statement, if the namespace's row is still the
/// version its counters were read from: the counters, the versions, the
/// roots' deltas, the bucket deltas logged, the chains moved on, and (when
/// anything was applied) the notification other servers listen for.
/// Returns how many rows the digest log holds, or `None` when the row had
/// changed and nothing was written. Outside a transaction the statement is
/// one of its own, so it commits in the same round trip.
async fn write_group(
    conn: &mut PgConnection,
    ns: &str,
    (written, incoming): (&HashMap<GroupKey<'_>, super::Written>, &[&Incoming<'_>]),
    deltas: &super::DigestDeltas<'_>,
    nodes: &HashMap<&str, Node>,
    (counters, applied): (&Counters, bool),
) -> Result<Option<i64>, BackendError> {
    let mut order: Vec<super::Written> = written.values().copied().collect();
    order.sort_by_key(|&(_, seq, _)| seq);
    let ops: Vec<&Incoming<'_>> = order.iter().map(|&(i, ..)| incoming[i]).collect();
    let prefixes: Vec<String> = ops.iter().map(|i| i.prefix()).collect();
    let sizes: Vec<i64> = prefixes
        .iter()
        .zip(&order)
        .map(|(p, &(_, seq, _))| i64::try_from(super::rendered_len(p, seq)).unwrap_or(i64::MAX))
        .collect();
    let moved: Vec<(&str, &tide_core::Chain)> =
        nodes.iter().filter(|(_, n)| n.moved).filter_map(|(node, n)| Some((*node, n.chain.as_ref()?))).collect();
    // Every part waits for `n`, the conditional update of the namespace's
    // row, and writes nothing without it.
    let (done, logged): (bool, Option<i64>) = sqlx::query_as(
        "WITH n AS (UPDATE tide_namespaces SET seq = $21, lamport_max = $22, size_max = GREATEST(size_max, $25) \
           WHERE namespace = $1 AND xmin::text = $26 RETURNING 1), \
         r AS (INSERT INTO tide_rows (namespace, collection, id, lamport, node_id, deleted, seq, bucket, vhash, size, wire, born) \
           SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[], $6::bool[], $7::bigint[], \
           $8::int[], $9::bigint[], $10::bigint[], $11::text[], $27::bigint[]) WHERE EXISTS (SELECT 1 FROM n) \
           ON CONFLICT (namespace, collection, id) DO UPDATE SET lamport = excluded.lamport, \
           node_id = excluded.node_id, deleted = excluded.deleted, seq = excluded.seq, vhash = excluded.vhash, \
           size = excluded.size, wire = excluded.wire, born = excluded.born), \
         d AS (INSERT INTO tide_digest (namespace, level, collection, ix, hash) \
           SELECT $1, 0, c, 0, h FROM UNNEST($12::text[], $13::bigint[]) AS u(c, h) WHERE EXISTS (SELECT 1 FROM n) \
           ON CONFLICT (namespace, level, collection, ix) DO UPDATE SET hash = tide_digest.hash # excluded.hash), \
         l AS (INSERT INTO tide_digest_log (namespace, collection, bucket, delta) \
           SELECT $1, * FROM UNNEST($14::text[], $15::int[], $16::bigint[]) WHERE EXISTS (SELECT 1 FROM n) RETURNING id), \
         c AS (UPDATE tide_nodes SET chain_last = u.last, chain_before = u.before, chain_height = u.height \
           FROM UNNEST($17::text[], $18::text[], $19::text[], $20::bigint[]) AS u(node, last, before, height) \
           WHERE tide_nodes.namespace = $1 AND tide_nodes.node_id = u.node AND EXISTS (SELECT 1 FROM n)) \
         SELECT EXISTS (SELECT 1 FROM n), (SELECT max(id) FROM l) - (SELECT min(id) FROM tide_digest_log) + 1 \
         FROM (SELECT CASE WHEN $23 AND EXISTS (SELECT 1 FROM n) THEN pg_notify($24, $1) END) AS notified",
    )
    .bind(ns)
    .bind(ops.iter().map(|i| i.op.collection.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.op.id.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| to_i64(i.op.stamp.lamport)).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.op.stamp.node_id.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.doc.is_none()).collect::<Vec<_>>())
    .bind(order.iter().map(|&(_, seq, _)| to_i64(seq)).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i32::from(tide_core::digest::bucket(&i.op.collection, &i.op.id))).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.stored_hash()).collect::<Vec<_>>())
    .bind(&sizes)
    .bind(&prefixes)
    .bind(deltas.roots.iter().map(|r| r.1).collect::<Vec<_>>())
    .bind(deltas.roots.iter().map(|r| r.2).collect::<Vec<_>>())
    .bind(deltas.buckets.iter().map(|b| b.1).collect::<Vec<_>>())
    .bind(deltas.buckets.iter().map(|b| i32::from(b.2)).collect::<Vec<_>>())
    .bind(deltas.buckets.iter().map(|b| b.3).collect::<Vec<_>>())
    .bind(moved.iter().map(|m| m.0).collect::<Vec<_>>())
    .bind(moved.iter().map(|m| m.1.last.as_str()).collect::<Vec<_>>())
    .bind(moved.iter().map(|m| m.1.before.as_str()).collect::<Vec<_>>())
    .bind(moved.iter().map(|m| i64::try_from(m.1.height).unwrap_or(i64::MAX)).collect::<Vec<_>>())
    .bind(counters.seq)
    .bind(counters.lamport_max)
    .bind(applied)
    .bind(COMMITS_CHANNEL)
    .bind(sizes.iter().copied().max().unwrap_or(0))
    .bind(&counters.version)
    .bind(order.iter().map(|&(.., born)| to_i64(born)).collect::<Vec<_>>())
    .fetch_one(&mut *conn)
    .await
    .map_err(unavailable)?;
    Ok(done.then_some(logged.unwrap_or(0)))
}

/// Folds the logged bucket deltas into the group and bucket rows (each
/// row exactly once, even with several servers: a fold takes the rows it
/// deletes).
async fn fold_digests(tx: &mut Transaction<'_, Postgres>) -> Result<(), BackendError> {
    // A collection at a time (not a row per delta); each row taken once,
    // even with several servers: a fold takes the rows it deletes.
    let taken: Vec<(String, String, Vec<i32>, Vec<i64>)> = sqlx::query_as(
        "WITH taken AS (DELETE FROM tide_digest_log RETURNING namespace, collection, bucket, delta) \
         SELECT namespace, collection, array_agg(bucket), array_agg(delta) FROM taken GROUP BY namespace, collection",
    )
    .fetch_all(&mut **tx)
    .await
    .map_err(unavailable)?;
    let mut rows: Vec<(&str, i16, &str, i32, i64)> = Vec::new();
    for (ns, collection, buckets, deltas) in &taken {
        let logged = buckets.iter().map(|b| i64::from(*b)).zip(deltas.iter().copied());
        let folded = super::fold_collection(logged);
        rows.extend(folded.into_iter().map(|(l, i, h)| (ns.as_str(), l, collection.as_str(), i, h)));
    }
    upsert_digest(tx, &rows).await
}

/// The writers of the namespaces this process is writing to.
#[derive(Default)]
struct Writers(std::sync::Mutex<HashMap<String, mpsc::Sender<Pending>>>);

impl Writers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Pending>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A stored version as the digest answers read it.
type VersionRow = (String, i64, String, bool, i64, String, i64);

fn to_versions(rows: Vec<VersionRow>) -> Vec<StoredVersion> {
    rows.into_iter()
        .map(|(id, lamport, node_id, deleted, hash, prefix, seq)| StoredVersion {
            id,
            lamport: to_u64(lamport),
            node_id,
            hash: Hash64::from_i64(hash),
            live: !deleted,
            prefix,
            seq: to_u64(seq),
        })
        .collect()
}

/// The non-zero entries of one digest level of a collection, in order
/// (buckets only within `groups`).
async fn level(
    tx: &mut Transaction<'_, Postgres>,
    ns: &Namespace,
    collection: &str,
    level: i16,
    groups: Option<&Vec<u16>>,
) -> Result<Vec<(u16, Hash64)>, BackendError> {
    let wire_groups = groups;
    let groups: Option<Vec<i32>> = groups.map(|g| g.iter().map(|g| i32::from(*g)).collect());
    let folded: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT ix, hash FROM tide_digest WHERE namespace = $1 AND level = $3 AND collection = $2 AND hash <> 0 \
         AND ($4::int[] IS NULL OR ix / 256 = ANY($4))",
    )
    .bind(ns.as_str())
    .bind(collection)
    .bind(level)
    .bind(groups)
    .fetch_all(&mut **tx)
    .await
    .map_err(unavailable)?;
    let logged: Vec<(i32, i64)> =
        sqlx::query_as("SELECT bucket, delta FROM tide_digest_log WHERE namespace = $1 AND collection = $2")
            .bind(ns.as_str())
            .bind(collection)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
    let widen = |v: Vec<(i32, i64)>| v.into_iter().map(|(i, h)| (i64::from(i), h)).collect();
    Ok(super::combine(u8::try_from(level).unwrap_or(2), widen(folded), widen(logged), wire_groups))
}

/// XORs `rows` of `(namespace, level, collection, ix, hash)` into the digest table.
async fn upsert_digest(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(&str, i16, &str, i32, i64)],
) -> Result<(), BackendError> {
    if rows.is_empty() {
        return Ok(());
    }
    let namespaces: Vec<&str> = rows.iter().map(|d| d.0).collect();
    let levels: Vec<i16> = rows.iter().map(|d| d.1).collect();
    let collections: Vec<&str> = rows.iter().map(|d| d.2).collect();
    let ixs: Vec<i32> = rows.iter().map(|d| d.3).collect();
    let hashes: Vec<i64> = rows.iter().map(|d| d.4).collect();
    sqlx::query(UPSERT_DIGEST)
        .bind(&namespaces)
        .bind(&levels)
        .bind(&collections)
        .bind(&ixs)
        .bind(&hashes)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Applies a write's digest deltas: the roots at once, the buckets to the
/// log, which is folded into the group and bucket rows once it holds
/// [`super::DIGEST_LOG_ROWS_MAX`] rows (each row folded exactly once, even
/// with several servers: a fold takes the rows it deletes).
async fn add_digests(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &super::DigestDeltas<'_>,
    fold_over: i64,
) -> Result<(), BackendError> {
    let roots: Vec<(&str, i16, &str, i32, i64)> = deltas.roots.iter().map(|&(n, c, h)| (n, 0, c, 0, h)).collect();
    upsert_digest(tx, &roots).await?;
    if deltas.buckets.is_empty() {
        return Ok(());
    }
    let namespaces: Vec<&str> = deltas.buckets.iter().map(|d| d.0).collect();
    let collections: Vec<&str> = deltas.buckets.iter().map(|d| d.1).collect();
    let buckets: Vec<i32> = deltas.buckets.iter().map(|d| i32::from(d.2)).collect();
    let hashes: Vec<i64> = deltas.buckets.iter().map(|d| d.3).collect();
    let logged: i64 = sqlx::query_scalar(
        "WITH added AS (INSERT INTO tide_digest_log (namespace, collection, bucket, delta) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[]) RETURNING id) \
         SELECT coalesce((SELECT max(id) FROM added) - (SELECT min(id) FROM tide_digest_log) + 1, 0)",
    )
    .bind(&namespaces)
    .bind(&collections)
    .bind(&buckets)
    .bind(&hashes)
    .fetch_one(&mut **tx)
    .await
    .map_err(unavailable)?;
    if logged > fold_over {
        fold_digests(tx).await?;
    }
    Ok(())
}

/// Renders every stored version of a version-1 or -2 database, with its
/// hash, size and bucket, drops the document column, and recomputes the
/// digests (the version-3 migration).
async fn backfill(tx: &mut Transaction<'_, Postgres>) -> Result<(), BackendError> {
    let rows: Vec<BackfillRow> =
        sqlx::query_as("SELECT namespace, collection, id, lamport, node_id, deleted, doc, seq FROM tide_rows")
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
    let mut hashes = Vec::with_capacity(rows.len());
    let mut rendered = Vec::with_capacity(rows.len());
    for (ns, collection, id, lamport, node_id, deleted, doc, seq) in &rows {
        let doc = if *deleted { None } else { doc.as_deref() };
        let stamp = Stamp::new(to_u64(*lamport), node_id.clone());
        let hash = doc.map(|d| tide_core::digest::version_hash(collection, id, &stamp, Some(d)));
        let stored_hash = tide_core::digest::version_hash(collection, id, &stamp, doc).to_i64();
        let prefix = super::render_prefix(collection, id, doc, stamp.lamport, node_id);
        let size = i64::try_from(super::rendered_len(&prefix, to_u64(*seq))).unwrap_or(i64::MAX);
        hashes.push((ns.as_str(), collection.as_str(), id.as_str(), None, hash));
        let bucket = i32::from(tide_core::digest::bucket(collection, id));
        rendered.push((ns.as_str(), collection.as_str(), id.as_str(), bucket, stored_hash, size, prefix));
    }
    for chunk in rendered.chunks(10_000) {
        sqlx::query(
            "UPDATE tide_rows SET bucket = k.bucket, vhash = k.vhash, size = k.size, wire = k.wire \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::text[]) \
             AS k(namespace, collection, id, bucket, vhash, size, wire) \
             WHERE tide_rows.namespace = k.namespace AND tide_rows.collection = k.collection AND tide_rows.id = k.id",
        )
        .bind(chunk.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.3).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.4).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.5).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.6.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    for statement in [
        "ALTER TABLE tide_rows DROP COLUMN doc",
        "UPDATE tide_namespaces SET size_max = coalesce((SELECT max(size) FROM tide_rows r \
         WHERE r.namespace = tide_namespaces.namespace), 0)",
        "DELETE FROM tide_digest",
        "DELETE FROM tide_digest_log",
        "UPDATE tide_server_meta SET value = '3' WHERE key = 'schema_version'",
    ] {
        sqlx::query(statement).execute(&mut **tx).await.map_err(unavailable)?;
    }
    add_digests(tx, &super::digest_deltas(hashes), super::DIGEST_LOG_ROWS_MAX).await
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn exchange(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Reply, BackendError> {
        let scope = self.policy.scope(principal, &request);
        super::check_readable(&scope, &request)?;
        let apply = self.apply(principal, Arc::clone(&request));
        super::exchange(&request, apply, || self.read(principal, &request, scope.clone())).await
    }

    async fn collect(&self, horizon_seqs: u64) -> Result<Collected, BackendError> {
        let namespaces: Vec<String> = sqlx::query_scalar(
            "SELECT namespace FROM tide_namespaces WHERE seq - horizon > $1 ORDER BY namespace LIMIT $2",
        )
        .bind(to_i64(horizon_seqs))
        .bind(i64::try_from(COLLECT_NAMESPACES_PER_STEP).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut done = Collected { more: namespaces.len() == COLLECT_NAMESPACES_PER_STEP, ..Collected::default() };
        for ns in namespaces {
            // Under the namespace's row lock: a write group that read the
            // row before this commits sees its version changed and retries.
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let (seq, horizon, lamport, node): (i64, i64, Option<i64>, Option<String>) = sqlx::query_as(
                "SELECT seq, horizon, horizon_lamport, horizon_node FROM tide_namespaces WHERE namespace = $1 FOR UPDATE",
            )
            .bind(&ns)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            let (seq, horizon) = (to_u64(seq), to_u64(horizon));
            let Some(upto) = super::collect_upto(seq, horizon, horizon_seqs) else { continue };
            let (count, bytes, top): (i64, i64, Option<String>) = sqlx::query_as(
                "WITH gone AS (DELETE FROM tide_rows WHERE namespace = $1 AND seq > $2 AND seq <= $3 AND deleted \
                   RETURNING lamport, node_id, size) \
                 SELECT count(*), coalesce(sum(size), 0)::bigint, \
                   (SELECT json_build_array(lamport, node_id) FROM gone ORDER BY lamport DESC, node_id DESC LIMIT 1)::text \
                 FROM gone",
            )
            .bind(&ns)
            .bind(to_i64(horizon))
            .bind(to_i64(upto))
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            let after = super::horizon_after((horizon, lamport, node), upto, top.as_deref())?;
            let stamp = after.stamp.as_ref();
            sqlx::query(
                "UPDATE tide_namespaces SET horizon = $2, horizon_lamport = $3, horizon_node = $4 WHERE namespace = $1",
            )
            .bind(&ns)
            .bind(to_i64(after.seq))
            .bind(stamp.map(|s| to_i64(s.lamport)))
            .bind(stamp.map(|s| s.node_id.as_str()))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            done += Collected {
                namespaces: 1,
                tombstones: to_u64(count),
                bytes: to_u64(bytes),
                more: super::collect_upto(seq, upto, horizon_seqs).is_some(),
            };
        }
        Ok(done)
    }

    async fn ready(&self) -> Result<(), BackendError> {
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn listen(&self, on_commit: CommitCallback) -> Result<(), BackendError> {
        let _ = self.on_commit.set(Arc::clone(&on_commit));
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

/// A stored row as the version-3 migration reads it.
type BackfillRow = (String, String, String, i64, String, bool, Option<String>, i64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_session_has_its_timeouts_and_normal_durability_turns_off_synchronous_commit() {
        let full = session_settings(Durability::Full);
        assert_eq!(
            full,
            [
                ("lock_timeout", "5000ms".to_owned()),
                ("statement_timeout", "30000ms".to_owned()),
                ("idle_in_transaction_session_timeout", "30000ms".to_owned()),
            ]
        );
        let normal = session_settings(Durability::Normal);
        assert_eq!(normal[..3], full[..]);
        assert_eq!(normal[3], ("synchronous_commit", "off".to_owned()));
    }
}
