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
use tide_core::digest::Hash64;
use tide_core::{Cursor, Limits, OpResult, Payload, Stamp, SyncRequest, Verify};

use super::Bindings;
use super::{
    Backend, BackendError, CommitCallback, PageRow, Reply, SELECT_SCHEMA_VERSION, StoredVersion, VerifyReply, Written,
    check_lead, check_schema_version, decide_all, page_start, render_change,
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

/// A stored version as a page reads it: seq, collection, id, doc, lamport, node id, deleted.
type StoredRow = (i64, String, String, Option<String>, i64, String, bool);

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
        if check_schema_version(&version)? {
            for statement in MIGRATE_V2 {
                sqlx::query(*statement).execute(&mut *tx).await.map_err(unavailable)?;
            }
            backfill_digests(&mut tx).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        let digest_log_rows_max = std::sync::atomic::AtomicI64::new(super::DIGEST_LOG_ROWS_MAX);
        Ok(Arc::new(Self { pool, limits, bindings: Bindings::default(), digest_log_rows_max }))
    }

    async fn apply(&self, principal: &Principal, req: &SyncRequest) -> Result<Vec<OpResult>, BackendError> {
        let ns = &principal.namespace;
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
        let bound = self.bind_node(&mut tx, principal, &req.node_id).await?;
        check_lead(req, lamport_max, self.limits.lamport_lead_max)?;
        continue_chain(&mut tx, ns, req).await?;

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
        let before: HashMap<(&str, &str), tide_core::digest::Hash64> = current
            .iter()
            .filter(|(_, (_, p))| matches!(p, Payload::Put(_)))
            .map(|(k, (s, p))| (*k, tide_core::digest::payload_hash(k.0, k.1, s, p)))
            .collect();
        let (results, written, seq) = decide_all(req, &keys, current, seq);
        upsert(&mut tx, ns, req, &written).await?;
        let deltas = super::digest_deltas(written.iter().map(|(&(c, id), &(i, _))| {
            let op = &req.ops[i];
            let new =
                op.payload.doc().is_some().then(|| tide_core::digest::payload_hash(c, id, &op.stamp, &op.payload));
            (ns.as_str(), c, id, before.get(&(c, id)).copied(), new)
        }));
        let fold_over = self.digest_log_rows_max.load(std::sync::atomic::Ordering::Relaxed);
        add_digests(&mut tx, &deltas, fold_over).await?;
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
        self.bindings.remember(bound.map(|owner| (ns.as_str().to_owned(), req.node_id.clone(), owner)));
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
    async fn read(&self, principal: &Principal, req: &SyncRequest) -> Result<Read, BackendError> {
        let ns = &principal.namespace;
        // One snapshot for the page and the digests, begun in one round trip.
        let snapshot = req.verify.is_some() || !req.fetch.is_empty();
        let begin = if snapshot { "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY" } else { "BEGIN READ ONLY" };
        let mut conn = self.pool.begin_with(begin).await.map_err(unavailable)?;
        if self.bindings.get(ns.as_str(), &req.node_id).is_none() {
            let owner: Option<String> =
                sqlx::query_scalar("SELECT principal FROM tide_nodes WHERE namespace = $1 AND node_id = $2")
                    .bind(ns.as_str())
                    .bind(&req.node_id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            self.bindings.remember(owner.map(|o| (ns.as_str().to_owned(), req.node_id.clone(), o)));
        }
        self.bindings.check(principal, &req.node_id)?;
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
        let settled = count == 0 && !has_more && !reset;
        let verify = if snapshot { self.verify(&mut conn, ns, req, settled).await? } else { VerifyReply::default() };
        conn.commit().await.map_err(unavailable)?;
        Ok((json, count, cursor, has_more, reset, verify))
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
                "SELECT r.collection, r.id, r.doc, r.lamport, r.node_id, r.seq, r.deleted FROM tide_rows r \
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
                    "SELECT collection, id, doc, lamport, node_id, seq, deleted FROM tide_rows \
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

/// A page (changes, count, cursor, `has_more`, `reset`) and the digest answers.
type Read = (String, usize, Cursor, bool, bool, VerifyReply);

/// A stored version as the digest answers read it.
type VersionRow = (String, String, Option<String>, i64, String, i64, bool);

fn to_versions(rows: Vec<VersionRow>) -> Vec<StoredVersion> {
    rows.into_iter()
        .map(|(collection, id, doc, lamport, node_id, seq, deleted)| StoredVersion {
            collection,
            id,
            doc: if deleted { None } else { doc },
            lamport: to_u64(lamport),
            node_id,
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

/// Fills the digest table and each row's bucket from the stored rows (the
/// version-2 migration of a database written by an earlier build).
async fn backfill_digests(tx: &mut Transaction<'_, Postgres>) -> Result<(), BackendError> {
    let rows: Vec<BackfillRow> =
        sqlx::query_as("SELECT namespace, collection, id, lamport, node_id, deleted, doc FROM tide_rows")
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
    let namespaces: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let collections: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let buckets: Vec<i32> = rows.iter().map(|r| i32::from(tide_core::digest::bucket(&r.1, &r.2))).collect();
    sqlx::query(
        "UPDATE tide_rows SET bucket = k.bucket FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) \
         AS k(namespace, collection, id, bucket) \
         WHERE tide_rows.namespace = k.namespace AND tide_rows.collection = k.collection AND tide_rows.id = k.id",
    )
    .bind(&namespaces)
    .bind(&collections)
    .bind(&ids)
    .bind(&buckets)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    let stamps: Vec<Stamp> = rows.iter().map(|r| Stamp::new(to_u64(r.3), r.4.clone())).collect();
    let deltas = super::digest_deltas(rows.iter().zip(&stamps).filter(|(r, _)| !r.5).map(|(r, s)| {
        let hash = tide_core::digest::version_hash(&r.1, &r.2, s, r.6.as_deref());
        (r.0.as_str(), r.1.as_str(), r.2.as_str(), None, Some(hash))
    }));
    add_digests(tx, &deltas, super::DIGEST_LOG_ROWS_MAX).await
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
    let buckets: Vec<i32> = ops.iter().map(|o| i32::from(tide_core::digest::bucket(&o.collection, &o.id))).collect();
    sqlx::query(
        "INSERT INTO tide_rows (namespace, collection, id, doc, lamport, node_id, deleted, seq, bucket) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bool[], \
         $8::bigint[], $9::int[]) \
         ON CONFLICT (namespace, collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, \
         node_id = excluded.node_id, deleted = excluded.deleted, seq = excluded.seq, bucket = excluded.bucket",
    )
    .bind(ns.as_str())
    .bind(&collections)
    .bind(&ids)
    .bind(&docs)
    .bind(&lamports)
    .bind(&nodes)
    .bind(&deleted)
    .bind(&seqs)
    .bind(&buckets)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn exchange(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Reply, BackendError> {
        let results = if request.ops.is_empty() { Vec::new() } else { self.apply(principal, &request).await? };
        let (changes_json, change_count, cursor, has_more, reset, verify) = self.read(principal, &request).await?;
        let request_id = request.request_id.clone();
        Ok(Reply { results, cursor, changes_json, change_count, has_more, reset, request_id, verify })
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

/// A stored row as the version-2 migration reads it.
type BackfillRow = (String, String, String, i64, String, bool, Option<String>);
