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
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use tide_core::digest::Hash64;
use tide_core::{Limits, OpResult, Stamp, SyncRequest, Verify};

use super::{
    Backend, BackendError, Bindings, CommitCallback, Current, GroupKey, Incoming, Page, PageQuery, PageRead, Reply,
    SELECT_SCHEMA_VERSION, StoredVersion, VerifyReply, check_lead, check_schema_version, decide_request,
};
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
const MIGRATE_V3: &[&str] =
    &["ALTER TABLE tide_rows ADD COLUMN vhash BIGINT NOT NULL DEFAULT 0, ADD COLUMN size BIGINT NOT NULL DEFAULT 0, \
     ADD COLUMN wire TEXT NOT NULL DEFAULT ''"];

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
    bindings: Bindings,
    digest_log_rows_max: std::sync::atomic::AtomicI64,
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
        tx.commit().await.map_err(unavailable)?;
        let digest_log_rows_max = std::sync::atomic::AtomicI64::new(super::DIGEST_LOG_ROWS_MAX);
        Ok(Arc::new(Self { pool, limits, bindings: Bindings::default(), digest_log_rows_max }))
    }

    async fn apply(&self, principal: &Principal, req: &SyncRequest) -> Result<Vec<OpResult>, BackendError> {
        let ns = principal.namespace.as_str();
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // The namespace lock, taken by the upsert and held to commit: it
        // makes seq order commit order.
        let (seq, lamport_max): (i64, i64) = sqlx::query_as(
            "INSERT INTO tide_namespaces (namespace, seq, lamport_max) VALUES ($1, 0, 0) \
             ON CONFLICT (namespace) DO UPDATE SET seq = tide_namespaces.seq RETURNING seq, lamport_max",
        )
        .bind(ns)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let (mut seq, lamport_max) = (to_u64(seq), to_u64(lamport_max));
        let bound = self.bind_node(&mut tx, principal, &req.node_id).await?;
        check_lead(req, lamport_max, self.limits.lamport_lead_max)?;
        continue_chain(&mut tx, &principal.namespace, req).await?;

        let incoming: Vec<Incoming<'_>> = req.ops.iter().map(Incoming::new).collect();
        let stored = stored_versions(&mut tx, ns, req).await?;
        let mut current: HashMap<GroupKey<'_>, Current<'_>> = HashMap::with_capacity(stored.len());
        for (collection, id, lamport, node, deleted, hash, wire) in &stored {
            let Some(op) = req.ops.iter().find(|o| o.collection == *collection && o.id == *id) else { continue };
            let doc = match wire {
                Some(wire) if !deleted => super::prefix_doc(wire)?.map(Into::into),
                _ => None,
            };
            let entry = current.entry((ns, op.collection.as_str(), op.id.as_str())).or_insert_with(|| Current {
                stamp: Stamp::new(to_u64(*lamport), node.clone()),
                hash: (!deleted).then(|| Hash64::from_i64(*hash)),
                doc: None,
            });
            if doc.is_some() {
                entry.doc = doc;
            }
        }
        let before: HashMap<GroupKey<'_>, Hash64> = current.iter().filter_map(|(k, c)| Some((*k, c.hash?))).collect();
        let mut written = HashMap::new();
        let results = decide_request(ns, &incoming, &mut current, &mut written, 0, &mut seq);
        upsert(&mut tx, ns, &written, &incoming).await?;
        let deltas = super::digest_deltas(
            written.iter().map(|(&(n, c, id), &(i, _))| (n, c, id, before.get(&(n, c, id)).copied(), incoming[i].hash)),
        );
        let fold_over = self.digest_log_rows_max.load(std::sync::atomic::Ordering::Relaxed);
        add_digests(&mut tx, &deltas, fold_over).await?;
        let op_max = req.ops.iter().map(|o| o.stamp.lamport).max().unwrap_or(0);
        // Delivered to every listening server when the transaction commits.
        let applied = results.iter().any(|r| matches!(r, OpResult::Applied { .. }));
        sqlx::query(
            "UPDATE tide_namespaces SET seq = $2, lamport_max = GREATEST(lamport_max, $3) WHERE namespace = $1 \
             RETURNING CASE WHEN $4 THEN pg_notify($5, $1) END",
        )
        .bind(ns)
        .bind(to_i64(seq))
        .bind(to_i64(op_max))
        .bind(applied)
        .bind(COMMITS_CHANNEL)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.bindings.remember(bound.map(|owner| (ns.to_owned(), req.node_id.clone(), owner)));
        Ok(results)
    }

    /// Folds logged bucket deltas once more than `rows` wait (default
    /// [`super::DIGEST_LOG_ROWS_MAX`]).
    pub fn set_digest_log_rows_max(&self, rows: usize) {
        self.digest_log_rows_max.store(i64::try_from(rows).unwrap_or(i64::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    /// Binds `node_id` to `principal` unless it is bound already (then it
    /// must be to the same); returns a binding read from the database.
    async fn bind_node(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        principal: &Principal,
        node_id: &str,
    ) -> Result<Option<String>, BackendError> {
        let ns = principal.namespace.as_str();
        if self.bindings.get(ns, node_id).is_some() {
            return self.bindings.check(principal, node_id).map(|()| None);
        }
        sqlx::query(
            "INSERT INTO tide_nodes (namespace, node_id, principal) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(ns)
        .bind(node_id)
        .bind(&principal.id)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        let owner: String =
            sqlx::query_scalar("SELECT principal FROM tide_nodes WHERE namespace = $1 AND node_id = $2")
                .bind(ns)
                .bind(node_id)
                .fetch_one(&mut **tx)
                .await
                .map_err(unavailable)?;
        if owner != principal.id {
            return Err(super::foreign_node(node_id));
        }
        Ok(Some(owner))
    }

    /// The page after the request's cursor and the answers to its digest
    /// and fetch extensions, read in one snapshot when there are any.
    async fn read(&self, principal: &Principal, req: &SyncRequest) -> Result<(Page, VerifyReply), BackendError> {
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
            // One statement: a snapshot of its own.
            let mut conn = self.pool.acquire().await.map_err(unavailable)?;
            return Ok((self.page(&mut conn, ns, req).await?, VerifyReply::default()));
        }
        let mut tx =
            self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(unavailable)?;
        let page = self.page(&mut tx, ns, req).await?;
        let verify = self.verify(&mut tx, ns, req, page.settled()).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok((page, verify))
    }

    /// The page a request asks for: one statement, unless the cursor is
    /// ahead of the namespace or the changes run past the byte budget.
    async fn page(&self, conn: &mut PgConnection, ns: &Namespace, req: &SyncRequest) -> Result<Page, BackendError> {
        let mut query = PageQuery::new(req, &self.limits);
        loop {
            let (ns_seq, total, n, text, last): PageRow = sqlx::query_as(PAGE)
                .bind(ns.as_str())
                .bind(to_i64(query.from))
                .bind(query.skip_node.unwrap_or(""))
                .bind(query.skip_node.is_some())
                .bind(i64::try_from(query.bytes_max).unwrap_or(i64::MAX))
                .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
                .fetch_one(&mut *conn)
                .await
                .map_err(unavailable)?;
            let ns_seq = to_u64(ns_seq.unwrap_or(0));
            if query.ahead_of(ns_seq) {
                continue;
            }
            let read = if to_u64(total) <= query.bytes_max as u64 {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                PageRead {
                    json: text.unwrap_or_default(),
                    count: n.min(query.limit),
                    last: to_u64(last.unwrap_or(0)),
                    has_more: n > query.limit,
                }
            } else {
                over_budget(conn, ns, &query).await?
            };
            return Ok(query.finish(read, ns_seq));
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
/// first `$6 + 1` changes (read from `size`, not from the renderings), and,
/// only if that total fits the budget `$5`, the first `$6` renderings
/// joined and the seq of the last.
const PAGE: &str = "WITH g AS MATERIALIZED (SELECT coalesce(sum(size + 1), 0)::bigint AS total, count(*) AS n \
       FROM (SELECT size FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (NOT $4 OR node_id <> $3) \
       ORDER BY seq LIMIT $6 + 1) s) \
     SELECT (SELECT seq FROM tide_namespaces WHERE namespace = $1), g.total, g.n, p.text, p.last \
     FROM g, (SELECT string_agg(wire || seq || '}', ',' ORDER BY seq) AS text, max(seq) AS last \
       FROM (SELECT seq, wire FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (NOT $4 OR node_id <> $3) \
       ORDER BY seq LIMIT $6) w WHERE (SELECT total FROM g) <= $5) p";

/// What the page statement returns: the namespace's seq, the byte total and
/// count of the first changes, their renderings (if they fit) and the last seq.
type PageRow = (Option<i64>, i64, i64, Option<String>, Option<i64>);

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
    let sizes: Vec<i64> = sqlx::query_scalar(
        "SELECT size FROM tide_rows WHERE namespace = $1 AND seq > $2 AND (NOT $4 OR node_id <> $3) ORDER BY seq LIMIT $5",
    )
    .bind(ns.as_str())
    .bind(to_i64(query.from))
    .bind(query.skip_node.unwrap_or(""))
    .bind(query.skip_node.is_some())
    .bind(i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(unavailable)?;
    let sizes: Vec<u64> = sizes.into_iter().map(to_u64).collect();
    let count = query.fitting(&sizes);
    let (text, last): (Option<String>, Option<i64>) = sqlx::query_as(
        "SELECT string_agg(wire || seq || '}', ',' ORDER BY seq), max(seq) FROM (SELECT seq, wire FROM tide_rows \
         WHERE namespace = $1 AND seq > $2 AND (NOT $4 OR node_id <> $3) ORDER BY seq LIMIT $5) w",
    )
    .bind(ns.as_str())
    .bind(to_i64(query.from))
    .bind(query.skip_node.unwrap_or(""))
    .bind(query.skip_node.is_some())
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

/// A stored version as a write reads it: collection, id, lamport, node id,
/// deleted, hash, and its rendering when the write carries its stamp.
type StoredRow = (String, String, i64, String, bool, i64, Option<String>);

/// What is stored for the keys a request writes, in one statement; the
/// rendering of a stored version is read only for an op with its stamp.
async fn stored_versions(
    tx: &mut Transaction<'_, Postgres>,
    ns: &str,
    req: &SyncRequest,
) -> Result<Vec<StoredRow>, BackendError> {
    let collections: Vec<&str> = req.ops.iter().map(|o| o.collection.as_str()).collect();
    let ids: Vec<&str> = req.ops.iter().map(|o| o.id.as_str()).collect();
    let lamports: Vec<i64> = req.ops.iter().map(|o| i64::try_from(o.stamp.lamport).unwrap_or(i64::MAX)).collect();
    let nodes: Vec<&str> = req.ops.iter().map(|o| o.stamp.node_id.as_str()).collect();
    sqlx::query_as(
        "SELECT r.collection, r.id, r.lamport, r.node_id, r.deleted, r.vhash, \
           CASE WHEN r.lamport = k.lamport AND r.node_id = k.node_id THEN r.wire END \
         FROM tide_rows r JOIN UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[]) \
           AS k(collection, id, lamport, node_id) ON r.collection = k.collection AND r.id = k.id \
         WHERE r.namespace = $1",
    )
    .bind(ns)
    .bind(&collections)
    .bind(&ids)
    .bind(&lamports)
    .bind(&nodes)
    .fetch_all(&mut **tx)
    .await
    .map_err(unavailable)
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

/// Moves the request's node along its chain of write exchanges (PROTOCOL.md
/// §13), refusing a link that does not continue it.
async fn continue_chain(
    tx: &mut Transaction<'_, Postgres>,
    ns: &Namespace,
    req: &SyncRequest,
) -> Result<(), BackendError> {
    let Some(lineage) = &req.lineage else { return Ok(()) };
    // The node's chain of write exchanges (PROTOCOL.md §13).
    let moved: Option<i32> = sqlx::query_scalar(
        "UPDATE tide_nodes SET chain_last = $4, chain_height = $5, \
             chain_before = CASE WHEN chain_last IS NOT NULL AND $3 <> chain_last AND $3 = chain_before \
             THEN chain_before ELSE $3 END \
             WHERE namespace = $1 AND node_id = $2 AND (chain_last IS NULL OR $3 = chain_last \
             OR $3 = chain_before OR $6 >= chain_height) RETURNING 1",
    )
    .bind(ns.as_str())
    .bind(&req.node_id)
    .bind(lineage.prev.as_deref().unwrap_or(""))
    .bind(&lineage.next)
    .bind(i64::try_from(lineage.height).unwrap_or(i64::MAX))
    .bind(i64::try_from(lineage.height.saturating_sub(1)).unwrap_or(i64::MAX))
    .fetch_optional(&mut **tx)
    .await
    .map_err(unavailable)?;
    if moved.is_none() {
        return Err(tide_core::Lineage::conflict(&req.node_id).into());
    }
    Ok(())
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
        let taken: Vec<(String, String, i32, i64)> =
            sqlx::query_as("DELETE FROM tide_digest_log RETURNING namespace, collection, bucket, delta")
                .fetch_all(&mut **tx)
                .await
                .map_err(unavailable)?;
        let taken: Vec<(String, String, i64, i64)> =
            taken.into_iter().map(|(n, c, b, d)| (n, c, i64::from(b), d)).collect();
        let folded: Vec<(&str, i16, &str, i32, i64)> = super::fold_logged(&taken);
        upsert_digest(tx, &folded).await?;
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
        "DELETE FROM tide_digest",
        "DELETE FROM tide_digest_log",
        "UPDATE tide_server_meta SET value = '3' WHERE key = 'schema_version'",
    ] {
        sqlx::query(statement).execute(&mut **tx).await.map_err(unavailable)?;
    }
    add_digests(tx, &super::digest_deltas(hashes), super::DIGEST_LOG_ROWS_MAX).await
}

/// Stores the last applied op of each key written by a request.
async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    ns: &str,
    written: &HashMap<GroupKey<'_>, (usize, u64)>,
    incoming: &[Incoming<'_>],
) -> Result<(), BackendError> {
    if written.is_empty() {
        return Ok(());
    }
    let mut order: Vec<(usize, u64)> = written.values().copied().collect();
    order.sort_by_key(|&(_, seq)| seq);
    let ops: Vec<&Incoming<'_>> = order.iter().map(|&(i, _)| &incoming[i]).collect();
    let prefixes: Vec<String> = ops.iter().map(|i| i.prefix()).collect();
    let sizes: Vec<i64> = prefixes
        .iter()
        .zip(&order)
        .map(|(p, &(_, seq))| i64::try_from(super::rendered_len(p, seq)).unwrap_or(i64::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO tide_rows (namespace, collection, id, lamport, node_id, deleted, seq, bucket, vhash, size, wire) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[], $6::bool[], $7::bigint[], \
         $8::int[], $9::bigint[], $10::bigint[], $11::text[]) \
         ON CONFLICT (namespace, collection, id) DO UPDATE SET lamport = excluded.lamport, \
         node_id = excluded.node_id, deleted = excluded.deleted, seq = excluded.seq, vhash = excluded.vhash, \
         size = excluded.size, wire = excluded.wire",
    )
    .bind(ns)
    .bind(ops.iter().map(|i| i.op.collection.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.op.id.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| to_i64(i.op.stamp.lamport)).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.op.stamp.node_id.as_str()).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.doc.is_none()).collect::<Vec<_>>())
    .bind(order.iter().map(|&(_, seq)| to_i64(seq)).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i32::from(tide_core::digest::bucket(&i.op.collection, &i.op.id))).collect::<Vec<_>>())
    .bind(ops.iter().map(|i| i.stored_hash()).collect::<Vec<_>>())
    .bind(&sizes)
    .bind(&prefixes)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn exchange(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Reply, BackendError> {
        let results = if request.ops.is_empty() { Vec::new() } else { self.apply(principal, &request).await? };
        let (page, verify) = self.read(principal, &request).await?;
        Ok(Reply::new(results, page, request.request_id.clone(), verify))
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

/// A stored row as the version-3 migration reads it.
type BackfillRow = (String, String, String, i64, String, bool, Option<String>, i64);
