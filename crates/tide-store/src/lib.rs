//! tide-store: the client's durable local store and outbox on sqlx SQLite.
//!
//! A [`Store`] is one SQLite file (or an in-memory database) holding the
//! documents and tombstones, the outbox of ops not yet acknowledged by the
//! server, the ops the server rejected, the cursor, the Lamport clock and
//! the node id. Its promise: a write that returned `Ok` is durable (under
//! the chosen [`Durability`]) and will be delivered, exactly once in effect.
//!
//! - Writes go through one writer connection owned by a task, which commits
//!   concurrent writes together (group commit) and issues their stamps.
//! - Reads use a small set of reader connections and never wait for the
//!   writer (WAL).
//! - A page of remote changes, its cursor and the observed clock commit in
//!   one transaction, decided by [`tide_core::wins`].
//!
//! Layer rule: depends only on tide-core among tide crates; `sqlx` never
//! appears in its public API. It needs a tokio runtime.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = tide_store::Store::open_in_memory().await?;
//! let doc = tide_core::Doc::parse(r#"{"title": "Hello"}"#)?;
//! let stamp = store.put("notes", "n1", doc.clone()).await?;
//! assert_eq!(store.get("notes", "n1").await?, Some(doc));
//! assert_eq!(store.pending(10).await?[0].op.stamp, stamp);
//! # Ok(()) }
//! ```

mod conn;
mod error;
mod query;
mod schema;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use std::collections::BTreeMap;

use tide_core::digest::Hash64;
use tide_core::{Change, Cursor, Doc, DocKey, ErrorCode, HeldVersion, Limits, Op, Payload, Stamp};
use tokio::sync::{Mutex, oneshot};

pub use conn::{ConnectionSettings, Durability};
pub use error::{Error, Result};
pub use query::{
    Field, Filter, PATH_SEGMENT_BYTES_MAX, PATH_SEGMENTS_MAX, QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX,
    QUERY_ORDER_FIELDS_MAX, QUERY_TERMS_MAX, Query, QueryCursor, QueryPage, field,
};
pub use schema::SCHEMA_VERSION;
pub use writer::{
    Ack, Acked, CHECKPOINT_OPS, DIGEST_LOG_ROWS_MAX, GROUP_OPS_MAX, Rejection, VACUUM_CHECK_BATCHES,
    VACUUM_FREE_PAGES_MIN, VACUUM_PAGES_PER_STEP,
};

use conn::{Location, Readers, Settings};
use error::db;
use writer::{Command, Writer};

/// Default for [`OpenOptions::readers`]: reader connections of a file store.
pub const READERS_DEFAULT: usize = 4;
/// Default for [`OpenOptions::busy_timeout`]: how long to wait for a lock
/// held by another process.
pub const BUSY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// The most rows one read ([`Store::list`], [`Store::pending`], [`Store::rejected`]) returns.
pub const READ_ROWS_MAX: usize = 10_000;
/// The oldest SQLite this store accepts: 3.51.3 fixes a WAL-reset corruption.
pub const SQLITE_VERSION_MIN: (u32, u32, u32) = (3, 51, 3);

/// One local write, for [`Store::write`].
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The new document, or its deletion.
    pub payload: Payload,
}

/// An op waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingOp {
    /// Its place in the outbox: increasing with every local write.
    pub seq: u64,
    /// The op as it is sent.
    pub op: Op,
    /// The server's seq of the version its document was edited from
    /// (PROTOCOL.md §14): `None` for a new document or a delete.
    pub base: Option<u64>,
}

/// An op the server rejected, set aside with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedOp {
    /// Its former outbox seq.
    pub seq: u64,
    /// The op.
    pub op: Op,
    /// Why, for machines.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
}

/// The stored version of a document, tombstones included.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// The stamp of the write that produced it.
    pub stamp: Stamp,
    /// The document or its deletion.
    pub payload: Payload,
}

/// Where a committed change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A local write.
    Local,
    /// A version from the server (a page, a repair, a fetch).
    Remote,
    /// A refused local write put back to the server's version.
    Reverted,
}

/// One change to one document, as committed (see [`OpenOptions::on_commit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The new document, or `None` when deleted or removed.
    pub doc: Option<Doc>,
    /// The stamp of the version now stored (for a removal, of the one removed).
    pub stamp: Stamp,
    /// Where it came from.
    pub origin: Origin,
}

/// Called with the changes of every write transaction, right after it
/// commits and before the next one starts, so the calls follow commit
/// order. It runs on the writer's path: it must be quick and never block.
pub type CommitListener = Arc<dyn Fn(Vec<Committed>) + Send + Sync>;

/// How to open a [`Store`].
#[derive(Clone)]
pub struct OpenOptions {
    durability: Durability,
    node_id: Option<String>,
    readers: usize,
    busy_timeout: Duration,
    verify: bool,
    on_commit: Option<CommitListener>,
    digest_log_rows_max: i64,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("durability", &self.durability)
            .field("node_id", &self.node_id)
            .field("readers", &self.readers)
            .finish_non_exhaustive()
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            node_id: None,
            readers: READERS_DEFAULT,
            busy_timeout: BUSY_TIMEOUT_DEFAULT,
            verify: true,
            on_commit: None,
            digest_log_rows_max: DIGEST_LOG_ROWS_MAX,
        }
    }
}

impl OpenOptions {
    /// The defaults: FULL durability, a generated node id, 4 readers, 5 s
    /// busy timeout, integrity verified on open.
    pub fn new() -> Self {
        Self::default()
    }

    /// The durability of every commit (default [`Durability::Full`]).
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The node id for a new store. A store keeps the node id it was
    /// created with; opening it with another is an error.
    #[must_use]
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = Some(node_id.into());
        self
    }

    /// Tells `listener` every change, in commit order (see [`CommitListener`]).
    #[must_use]
    pub fn on_commit(mut self, listener: CommitListener) -> Self {
        self.on_commit = Some(listener);
        self
    }

    /// Most bucket deltas logged before they are folded into the digests'
    /// bucket rows (default [`DIGEST_LOG_ROWS_MAX`]): larger is cheaper for
    /// bulk writes, smaller for reading bucket digests during a repair.
    #[must_use]
    pub fn digest_log_rows_max(mut self, rows: usize) -> Self {
        self.digest_log_rows_max = i64::try_from(rows).unwrap_or(i64::MAX);
        self
    }

    /// How many reader connections a file store opens (at least 1).
    #[must_use]
    pub fn readers(mut self, readers: usize) -> Self {
        self.readers = readers.max(1);
        self
    }

    /// How long to wait for a lock held by another process before failing
    /// with [`Error::Busy`].
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Whether to run SQLite's `quick_check` on open (default on): a damaged
    /// file is refused at once instead of failing later.
    #[must_use]
    pub fn verify_integrity(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Opens (or creates) the store file at `path`.
    pub async fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        self.open_at(Location::File(path.as_ref().to_owned())).await
    }

    /// Opens a store that lives in memory and vanishes when closed.
    pub async fn open_in_memory(self) -> Result<Store> {
        self.open_at(Location::Memory).await
    }

    async fn open_at(self, location: Location) -> Result<Store> {
        let memory = matches!(location, Location::Memory);
        let settings = Settings { location, durability: self.durability, busy_timeout: self.busy_timeout };
        let mut conn = settings.connect_writer().await?;
        settings.verify(&mut conn).await?;
        check_sqlite_version(&mut conn).await?;
        if self.verify {
            let report: Vec<String> =
                sqlx::query_scalar("PRAGMA quick_check").fetch_all(&mut conn).await.map_err(db)?;
            if report.first().map(String::as_str) != Some("ok") {
                return Err(Error::Corrupt { detail: report.join("; ") });
            }
        }
        schema::migrate(&mut conn).await?;
        if !memory {
            writer::incremental_vacuum_on(&mut conn).await?;
        }
        let node_id = node_id(&mut conn, self.node_id).await?;
        let from_head: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'from_head'")
            .fetch_optional(&mut conn)
            .await
            .map_err(db)?;
        let from_head = from_head
            .map(|v| v.parse::<u64>().map_err(|_| Error::Corrupt { detail: format!("stored from_head {v:?}") }))
            .transpose()?;
        let indexed = IndexedState::read(&mut conn).await?;
        let seed: i64 =
            sqlx::query_scalar("SELECT lamport FROM tide_clock WHERE id = 1").fetch_one(&mut conn).await.map_err(db)?;
        let clock = tide_core::LamportClock::new(u64::try_from(seed).unwrap_or(0))?;

        let writer_conn = Arc::new(Mutex::new(Some(conn)));
        let readers = if memory {
            vec![Arc::clone(&writer_conn)]
        } else {
            let mut readers = Vec::with_capacity(self.readers);
            for _ in 0..self.readers {
                let mut reader = settings.connect_reader().await?;
                settings.verify(&mut reader).await?;
                readers.push(Arc::new(Mutex::new(Some(reader))));
            }
            readers
        };
        let writer =
            Writer::new(writer_conn, clock, node_id.clone(), self.on_commit, self.digest_log_rows_max, !memory);
        Ok(Store {
            inner: Arc::new(Inner {
                writer,
                readers: Readers::new(readers),
                node_id: std::sync::RwLock::new(node_id),
                from_head: std::sync::atomic::AtomicU64::new(from_head.unwrap_or(0)),
                limits: Limits::default(),
                indexed: std::sync::RwLock::new(indexed),
            }),
        })
    }
}

async fn check_sqlite_version(conn: &mut sqlx::SqliteConnection) -> Result<()> {
    let version: String = sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&mut *conn).await.map_err(db)?;
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    let found =
        (parts.first().copied().unwrap_or(0), parts.get(1).copied().unwrap_or(0), parts.get(2).copied().unwrap_or(0));
    if found < SQLITE_VERSION_MIN {
        let (a, b, c) = SQLITE_VERSION_MIN;
        return Err(Error::Setting { name: "sqlite_version", expected: format!(">= {a}.{b}.{c}"), found: version });
    }
    Ok(())
}

/// Reads the persisted node id, or persists the requested or a new one.
async fn node_id(conn: &mut sqlx::SqliteConnection, requested: Option<String>) -> Result<String> {
    let stored: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'node_id'")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    // A store that re-keyed (a copy) still opens under the id it was asked for first.
    let origin: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'node_id_origin'")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    match (stored, requested) {
        (Some(stored), Some(requested)) if stored != requested && origin.as_deref() != Some(requested.as_str()) => {
            Err(Error::NodeIdMismatch { stored, requested })
        }
        (Some(stored), _) => Ok(stored),
        (None, requested) => {
            let id = requested.unwrap_or_else(|| ulid::Ulid::generate().to_string());
            let mut probe = tide_core::SyncRequest::new(id.clone(), None);
            probe.protocol = None;
            Limits::default().check_request(&probe)?;
            sqlx::query("INSERT INTO tide_meta (key, value) VALUES ('node_id', ?1)")
                .bind(&id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            Ok(id)
        }
    }
}

/// What the file holds of local queries' indexes (schema v5), as queries need it.
#[derive(Debug, Default)]
pub(crate) struct IndexedState {
    /// Each indexed field path's generated column.
    columns: std::collections::HashMap<String, String>,
    /// Per collection, its declared indexes: name and paths.
    indexes: std::collections::HashMap<String, Vec<(String, Vec<String>)>>,
}

impl IndexedState {
    pub(crate) async fn read(conn: &mut sqlx::SqliteConnection) -> Result<Self> {
        let columns: Vec<(String, String)> =
            sqlx::query_as("SELECT path, col FROM tide_fields").fetch_all(&mut *conn).await.map_err(db)?;
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT collection, paths, name FROM tide_indexes ORDER BY collection, paths")
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
        let mut indexes: std::collections::HashMap<String, Vec<(String, Vec<String>)>> =
            std::collections::HashMap::default();
        for (collection, paths, name) in rows {
            indexes.entry(collection).or_default().push((name, parse_json(&paths)?));
        }
        Ok(Self { columns: columns.into_iter().collect(), indexes })
    }
}

struct Inner {
    writer: Writer,
    readers: Readers,
    /// Changes only when the store re-keys.
    node_id: std::sync::RwLock<String>,
    /// The stored `from_head` (0: none; a resync's head is never 0), kept
    /// here so a request does not read it from the file.
    from_head: std::sync::atomic::AtomicU64,
    limits: Limits,
    /// Each indexed field path's generated column, and each collection's
    /// declared indexes (name, paths).
    indexed: std::sync::RwLock<IndexedState>,
}

/// The durable local store. Cheap to clone; all clones share one store.
///
/// Every async method is cancel safe in this sense: dropping its future
/// before it completes either leaves the store as it was or lets the
/// operation finish in the background; it never leaves half a write.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("node_id", &self.node_id()).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store file at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        OpenOptions::new().open(path).await
    }

    /// Opens an in-memory store with default options.
    pub async fn open_in_memory() -> Result<Self> {
        OpenOptions::new().open_in_memory().await
    }

    /// This store's node id: the second half of every stamp it issues. It
    /// changes only when the store re-keys ([`Store::rekey`]).
    pub fn node_id(&self) -> String {
        self.inner.node_id.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes a new node id, because another copy of this store writes under
    /// the current one (PROTOCOL.md §13): every pending op is stamped anew
    /// (so it still wins over what it overwrote), and so is its document
    /// where the op's version is the stored one; the chain of write
    /// exchanges starts over. One transaction. Returns the new node id.
    pub async fn rekey(&self) -> Result<String> {
        let node_id = ulid::Ulid::generate().to_string();
        self.call(|reply| Command::Rekey { node_id: node_id.clone(), reply }).await?;
        self.inner.node_id.write().unwrap_or_else(std::sync::PoisonError::into_inner).clone_from(&node_id);
        Ok(node_id)
    }

    /// The height and token of this node's last successful write exchange
    /// (PROTOCOL.md §13); `None` before the first.
    pub async fn lineage(&self) -> Result<Option<(u64, String)>> {
        let mut conn = self.inner.readers.get().await?;
        let value: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'lineage'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
        value
            .map(|v| {
                let (height, token) = v.split_once(' ').unwrap_or(("0", v.as_str()));
                let height = height.parse().map_err(|_| Error::Corrupt { detail: format!("lineage {v:?}") })?;
                Ok((height, token.to_owned()))
            })
            .transpose()
    }

    /// Saves the height and token of a write exchange that succeeded.
    pub async fn set_lineage(&self, height: u64, token: &str) -> Result<()> {
        let token = format!("{height} {token}");
        self.call(|reply| Command::Lineage { token, reply }).await
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        self.inner.writer.call(make).await
    }

    /// Puts a whole document; returns the write's stamp.
    pub async fn put(&self, collection: &str, id: &str, doc: Doc) -> Result<Stamp> {
        let write = Write { collection: collection.into(), id: id.into(), payload: Payload::Put(doc) };
        Ok(self.write(vec![write]).await?.remove(0))
    }

    /// Deletes a document, leaving a tombstone; returns the write's stamp.
    pub async fn delete(&self, collection: &str, id: &str) -> Result<Stamp> {
        let write = Write { collection: collection.into(), id: id.into(), payload: Payload::Delete };
        Ok(self.write(vec![write]).await?.remove(0))
    }

    /// Commits several writes atomically: all or none. Each gets its own
    /// stamp, strictly increasing in the order given; the stamps are returned
    /// in that order. The documents, outbox entries and clock commit in one
    /// transaction.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Vec<Stamp>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.check_writes(&writes)?;
        self.call(|reply| Command::Write { writes, reply }).await
    }

    /// [`Store::write`], but only when no other write or page apply is
    /// queued or running: the writes commit on the calling task, never
    /// waiting behind another command, or `None` comes back and nothing was
    /// written. For a caller that must not wait long, such as an event
    /// loop's thread (tide for Python runs its writes so).
    pub async fn write_if_idle(&self, writes: Vec<Write>) -> Option<Result<Vec<Stamp>>> {
        if writes.is_empty() {
            return Some(Ok(Vec::new()));
        }
        if let Err(e) = self.check_writes(&writes) {
            return Some(Err(e));
        }
        self.inner.writer.call_if_idle(|reply| Command::Write { writes, reply }).await
    }

    /// The limits every batch of writes meets.
    fn check_writes(&self, writes: &[Write]) -> Result<()> {
        if writes.len() > GROUP_OPS_MAX {
            return Err(tide_core::Violation::new(
                ErrorCode::TooManyOps,
                format!("{} writes in one batch; the limit is {GROUP_OPS_MAX}", writes.len()),
            )
            .into());
        }
        for w in writes {
            self.inner.limits.check_collection(&w.collection)?;
            self.inner.limits.check_id(&w.id)?;
            self.inner.limits.check_payload(&w.payload)?;
        }
        Ok(())
    }

    /// The live document under `(collection, id)`, if any.
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<Doc>> {
        let mut conn = self.inner.readers.get().await?;
        let doc: Option<Option<String>> =
            sqlx::query_scalar("SELECT doc FROM tide_docs WHERE collection = ?1 AND id = ?2 AND deleted = 0")
                .bind(collection)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        doc.flatten().map(parse_doc).transpose()
    }

    /// The stored version under `(collection, id)`, tombstone or not.
    pub async fn version(&self, collection: &str, id: &str) -> Result<Option<Version>> {
        let mut conn = self.inner.readers.get().await?;
        let row: Option<(Option<String>, i64, String, bool)> =
            sqlx::query_as("SELECT doc, lamport, node_id, deleted FROM tide_docs WHERE collection = ?1 AND id = ?2")
                .bind(collection)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        row.map(|(doc, lamport, node, deleted)| {
            let payload = match (deleted, doc) {
                (false, Some(doc)) => Payload::Put(parse_doc(doc)?),
                _ => Payload::Delete,
            };
            Ok(Version { stamp: Stamp::new(u64::try_from(lamport).unwrap_or(0), node), payload })
        })
        .transpose()
    }

    /// Live documents of a collection ordered by id, at most `limit` (capped
    /// at [`READ_ROWS_MAX`]), starting after the id `after` if given: pass the
    /// last id of one page to get the next.
    pub async fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Doc)>> {
        let limit = i64::try_from(limit.min(READ_ROWS_MAX)).expect("bounded");
        let mut conn = self.inner.readers.get().await?;
        let rows: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(id, doc) ORDER BY id) FROM \
             (SELECT id, doc FROM tide_docs WHERE collection = ?1 AND deleted = 0 AND id > ?2 ORDER BY id LIMIT ?3)",
        )
        .bind(collection)
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<(String, String)> = parse_json(&rows)?;
        rows.into_iter().map(|(id, doc)| Ok((id, parse_doc(doc)?))).collect()
    }

    /// The documents `query` finds, in its order, with the cursor of the
    /// next page when this one is full; read in one snapshot (a page of
    /// remote changes is seen whole or not at all).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tide_store::{Query, field};
    /// let store = tide_store::Store::open_in_memory().await?;
    /// for (id, status, due) in [("a", "open", 3), ("b", "done", 1), ("c", "open", 2)] {
    ///     let doc = tide_core::Doc::from_value(&serde_json::json!({"status": status, "due": due}))?;
    ///     store.put("tasks", id, doc).await?;
    /// }
    /// let open = Query::new("tasks").filter(field("status").eq("open")).order_by(field("due"));
    /// let page = store.query(&open).await?;
    /// let ids: Vec<&str> = page.docs.iter().map(|(id, _)| id.as_str()).collect();
    /// assert_eq!(ids, ["c", "a"]);
    /// assert_eq!(store.query_count(&open).await?, 2);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQuery`] for a query that cannot run (checked before
    /// anything is read), or a database error.
    pub async fn query(&self, query: &Query) -> Result<QueryPage<Doc>> {
        use sqlx::{Row as _, TypeInfo as _, ValueRef as _};
        let rows = self.run(query, str::to_owned).await?;
        let full = rows.len() >= query.limit_of();
        let mut docs = Vec::with_capacity(rows.len());
        let mut last = None;
        for (n, row) in rows.iter().enumerate() {
            let id: String = row.try_get(0).map_err(db)?;
            let doc: String = row.try_get(1).map_err(db)?;
            if full && n + 1 == rows.len() {
                let mut values = Vec::new();
                for i in 2..row.len() {
                    let raw = row.try_get_raw(i).map_err(db)?;
                    let value = if raw.is_null() {
                        query::SqlValue::Null
                    } else {
                        match raw.type_info().name() {
                            "INTEGER" => query::SqlValue::Int(row.try_get(i).map_err(db)?),
                            "REAL" => query::SqlValue::Real(row.try_get(i).map_err(db)?),
                            _ => query::SqlValue::Text(row.try_get(i).map_err(db)?),
                        }
                    };
                    values.push(value);
                }
                last = Some(query::encode_cursor(values, id.clone()));
            }
            docs.push((id, parse_doc(doc)?));
        }
        Ok(QueryPage { docs, next: last })
    }

    /// How many live documents match `query`'s filter (its order, limit and
    /// cursor aside).
    ///
    /// # Errors
    ///
    /// As [`Store::query`].
    pub async fn query_count(&self, query: &Query) -> Result<u64> {
        use sqlx::Row as _;
        let rows = self.run_with(query, true, str::to_owned).await?;
        let n: i64 = rows.first().map_or(Ok(0), |r| r.try_get(0)).map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// SQLite's plan for `query` (`EXPLAIN QUERY PLAN`, one line per step),
    /// to see whether an index serves it.
    ///
    /// # Errors
    ///
    /// As [`Store::query`].
    pub async fn query_plan(&self, query: &Query) -> Result<Vec<String>> {
        use sqlx::Row as _;
        let rows = self.run(query, |sql| format!("EXPLAIN QUERY PLAN {sql}")).await?;
        rows.iter().map(|r| r.try_get::<String, _>(3).map_err(db)).collect()
    }

    /// Declares an index on `fields` of `collection`, so queries filtering
    /// on them (equal, ranges, `is_in`, `starts_with`) or ordering by them
    /// read the index instead of every document. Kept in the file across
    /// restarts; declaring one again is harmless. Building it reads the
    /// whole table once, during which local writes and page applies wait:
    /// about 1.7 ms per 1,000 documents on the reference machines (168 ms
    /// for 100,000; BENCHMARKS.md).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQuery`] for a bad path or more than
    /// [`QUERY_ORDER_FIELDS_MAX`] fields, or a database error.
    pub async fn create_index(&self, collection: &str, fields: &[Field]) -> Result<()> {
        self.index(collection, fields, true).await
    }

    /// Drops the index declared on `fields` of `collection`, if any.
    ///
    /// # Errors
    ///
    /// As [`Store::create_index`].
    pub async fn drop_index(&self, collection: &str, fields: &[Field]) -> Result<()> {
        self.index(collection, fields, false).await
    }

    /// The declared indexes: collection and field paths.
    pub async fn indexes(&self) -> Result<Vec<(String, Vec<String>)>> {
        let mut conn = self.inner.readers.get().await?;
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT collection, paths FROM tide_indexes ORDER BY 1, 2")
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        rows.into_iter()
            .map(|(c, paths)| {
                let paths: Vec<String> = parse_json(&paths)?;
                // Shown as the app wrote them: `$."a"."b"` is `a.b`.
                Ok((c, paths.iter().map(|p| query::field_name(p)).collect()))
            })
            .collect()
    }

    async fn index(&self, collection: &str, fields: &[Field], create: bool) -> Result<()> {
        self.inner.limits.check_collection(collection)?;
        if fields.is_empty() || fields.len() > QUERY_ORDER_FIELDS_MAX {
            return Err(Error::InvalidQuery {
                message: format!("an index names 1 to {QUERY_ORDER_FIELDS_MAX} fields, not {}", fields.len()),
            });
        }
        let paths = fields.iter().map(query::json_path).collect::<Result<Vec<_>>>()?;
        let collection = collection.to_owned();
        let indexed = self.call(|reply| Command::Index { collection, paths, create, reply }).await?;
        *self.inner.indexed.write().unwrap_or_else(std::sync::PoisonError::into_inner) = indexed;
        Ok(())
    }

    fn compile(&self, query: &Query, count: bool, hint: bool) -> Result<query::Sql> {
        let state = self.inner.indexed.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let indexes = state.indexes.get(query.collection()).map_or(&[][..], Vec::as_slice);
        query::select(query, &query::Indexed { columns: &state.columns, indexes }, count, hint)
    }

    async fn run(&self, query: &Query, wrap: impl Fn(&str) -> String) -> Result<Vec<sqlx::sqlite::SqliteRow>> {
        self.run_with(query, false, wrap).await
    }

    /// Runs `query` compiled (and `wrap`ped) in one statement on a reader.
    /// An index hint SQLite cannot follow (a filter it folds to a constant)
    /// is dropped and the statement run again.
    async fn run_with(
        &self,
        query: &Query,
        count: bool,
        wrap: impl Fn(&str) -> String,
    ) -> Result<Vec<sqlx::sqlite::SqliteRow>> {
        let mut conn = self.inner.readers.get().await?;
        for hint in [true, false] {
            let sql = self.compile(query, count, hint)?;
            match bind_all(sqlx::query(sqlx::AssertSqlSafe(wrap(&sql.text))), sql.binds).fetch_all(&mut *conn).await {
                Err(sqlx::Error::Database(e)) if hint && e.message().contains("no query solution") => {}
                rows => return rows.map_err(db),
            }
        }
        unreachable!("the second run has no hint")
    }

    /// How many live documents a collection holds.
    pub async fn count(&self, collection: &str) -> Result<u64> {
        let mut conn = self.inner.readers.get().await?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tide_docs WHERE collection = ?1 AND deleted = 0")
            .bind(collection)
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The oldest pending ops, oldest first, at most `limit` (capped at
    /// [`READ_ROWS_MAX`]).
    pub async fn pending(&self, limit: usize) -> Result<Vec<PendingOp>> {
        let limit = i64::try_from(limit.min(READ_ROWS_MAX)).expect("bounded");
        let mut conn = self.inner.readers.get().await?;
        let rows: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(json_array(seq, collection, id, kind, doc, lamport, node_id), \
             iif(kind = 'delete', NULL, base)) ORDER BY seq) FROM (SELECT * FROM tide_outbox ORDER BY seq LIMIT ?1)",
        )
        .bind(limit)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<(OpRow, Option<u64>)> = parse_json(&rows)?;
        rows.into_iter().map(|(r, base)| Ok(PendingOp { seq: r.0, op: r.into_op()?, base })).collect()
    }

    /// What became of the local write with `stamp` (PROTOCOL.md §6): still
    /// in the outbox, acknowledged by the server, or rejected.
    pub async fn write_state(&self, stamp: &Stamp) -> Result<WriteState> {
        let stamp = &self.current_stamp(stamp).await?;
        let mut conn = self.inner.readers.get().await?;
        let lamport =
            i64::try_from(stamp.lamport).map_err(|_| tide_core::Error::LamportOutOfRange { lamport: stamp.lamport })?;
        let (pending, rejected): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM tide_outbox WHERE lamport = ?1 AND node_id = ?2), \
             EXISTS (SELECT 1 FROM tide_rejected WHERE lamport = ?1 AND node_id = ?2)",
        )
        .bind(lamport)
        .bind(&stamp.node_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        Ok(match (pending, rejected) {
            (true, _) => WriteState::Pending,
            (false, true) => WriteState::Rejected,
            (false, false) => WriteState::Acknowledged,
        })
    }

    /// The stamp a local write first stamped `stamp` carries now: itself,
    /// unless the store re-keyed while the write was pending and stamped it
    /// anew ([`Store::rekey`]).
    pub async fn current_stamp(&self, stamp: &Stamp) -> Result<Stamp> {
        let mut conn = self.inner.readers.get().await?;
        let lamport =
            i64::try_from(stamp.lamport).map_err(|_| tide_core::Error::LamportOutOfRange { lamport: stamp.lamport })?;
        let now: Option<(i64, String)> =
            sqlx::query_as("SELECT new_lamport, new_node_id FROM tide_restamped WHERE lamport = ?1 AND node_id = ?2")
                .bind(lamport)
                .bind(&stamp.node_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        Ok(now.map_or_else(|| stamp.clone(), |(l, n)| Stamp::new(u64::try_from(l).unwrap_or(0), n)))
    }

    /// The outbox seqs of the oldest and newest pending ops, if any.
    pub async fn pending_range(&self) -> Result<Option<(u64, u64)>> {
        let mut conn = self.inner.readers.get().await?;
        let range: (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT min(seq), max(seq) FROM tide_outbox").fetch_one(&mut *conn).await.map_err(db)?;
        Ok(match range {
            (Some(a), Some(b)) => Some((u64::try_from(a).unwrap_or(0), u64::try_from(b).unwrap_or(0))),
            _ => None,
        })
    }

    /// Of the ops with outbox seqs in `from..=to`: how many are still
    /// pending, and how many the server rejected.
    pub async fn settled_in(&self, from: u64, to: u64) -> Result<(u64, u64)> {
        let mut conn = self.inner.readers.get().await?;
        let (pending, rejected): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM tide_outbox WHERE seq BETWEEN ?1 AND ?2), \
             (SELECT count(*) FROM tide_rejected WHERE seq BETWEEN ?1 AND ?2)",
        )
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .bind(i64::try_from(to).unwrap_or(i64::MAX))
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        Ok((u64::try_from(pending).unwrap_or(0), u64::try_from(rejected).unwrap_or(0)))
    }

    /// Whether a document has local writes the server has not acknowledged.
    pub async fn has_pending(&self, collection: &str, id: &str) -> Result<bool> {
        let mut conn = self.inner.readers.get().await?;
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tide_outbox WHERE collection = ?1 AND id = ?2)")
            .bind(collection)
            .bind(id)
            .fetch_one(&mut *conn)
            .await
            .map_err(db)
    }

    /// Whether the store holds nothing: no version of any document (live or
    /// deleted) and no op in the outbox. Such a store needs no tombstones
    /// from the server (PROTOCOL.md §4.1, `live_only`).
    ///
    /// # Errors
    /// A store failure.
    pub async fn is_empty(&self) -> Result<bool> {
        let mut conn = self.inner.readers.get().await?;
        let held: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tide_docs) OR EXISTS (SELECT 1 FROM tide_outbox)")
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
        Ok(!held)
    }

    /// How many ops wait in the outbox.
    pub async fn pending_count(&self) -> Result<u64> {
        let mut conn = self.inner.readers.get().await?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tide_outbox").fetch_one(&mut *conn).await.map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Removes the acknowledged ops from the outbox and moves the rejected
    /// ones to the rejected set, in one transaction. Seqs no longer in the
    /// outbox are ignored, so settling twice is harmless.
    pub async fn settle(&self, acked: Vec<u64>, rejected: Vec<Rejection>) -> Result<()> {
        let acked = acked.into_iter().map(|seq| Ack { seq, acked: Acked::Kept }).collect();
        self.settle_acks(acked, rejected).await
    }

    /// [`Store::settle`], knowing how each op was acknowledged: a version
    /// the server stored learns its seq, and one it dropped because its
    /// document was deleted (PROTOCOL.md §14) is removed, and the watchers
    /// told, if it is still the key's version.
    pub async fn settle_acks(&self, acked: Vec<Ack>, rejected: Vec<Rejection>) -> Result<()> {
        self.call(|reply| Command::Settle { acked, rejected, reply }).await
    }

    /// Removes versions a server dropped as deleted (a repair's, PROTOCOL.md
    /// §14), each only while it is still its key's version, telling the
    /// watchers.
    pub async fn forget_deleted(&self, versions: Vec<(DocKey, Stamp)>) -> Result<()> {
        self.call(|reply| Command::Forget { versions, reply }).await
    }

    /// Removes the tombstones at or below the server's `horizon` (which
    /// removed them too, PROTOCOL.md §14) whose key no pending op refers
    /// to; returns how many went.
    pub async fn collect_tombstones(&self, horizon: u64) -> Result<u64> {
        self.call(|reply| Command::Collect { horizon, reply }).await
    }

    /// Records that the store began again from the start of the server's
    /// change stream when its head was `head` (after a `resync`,
    /// PROTOCOL.md §14); sent as `from_head` from then on.
    pub async fn set_from_head(&self, head: u64) -> Result<()> {
        self.call(|reply| Command::FromHead { head, reply }).await?;
        self.inner.from_head.store(head, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The head recorded by [`Store::set_from_head`], if any.
    pub fn from_head(&self) -> Option<u64> {
        Some(self.inner.from_head.load(std::sync::atomic::Ordering::Relaxed)).filter(|h| *h > 0)
    }

    /// The ops the server rejected, oldest first, at most [`READ_ROWS_MAX`].
    pub async fn rejected(&self) -> Result<Vec<RejectedOp>> {
        let mut conn = self.inner.readers.get().await?;
        let rows: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(seq, collection, id, kind, doc, lamport, node_id, code, message) \
             ORDER BY seq) FROM (SELECT * FROM tide_rejected ORDER BY seq LIMIT 10000)",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<RejectedRow> = parse_json(&rows)?;
        rows.into_iter()
            .map(|RejectedRow(seq, collection, id, kind, doc, lamport, node, code, message)| {
                let op = OpRow(seq, collection, id, kind, doc, lamport, node).into_op()?;
                let code = serde_json::from_value(serde_json::Value::String(code)).unwrap_or(ErrorCode::Unknown);
                Ok(RejectedOp { seq, op, code, message })
            })
            .collect()
    }

    /// Forgets rejected ops; returns how many were removed.
    pub async fn discard_rejected(&self, seqs: Vec<u64>) -> Result<u64> {
        self.call(|reply| Command::Discard { seqs, reply }).await
    }

    /// Writes the rejected op `seq` again with a fresh stamp (which beats
    /// what the server holds) and forgets the rejection, in one transaction;
    /// `None` if `seq` is not a rejected op.
    pub async fn retry_rejected(&self, seq: u64) -> Result<Option<Stamp>> {
        self.call(|reply| Command::Retry { seq, reply }).await
    }

    /// The cursor saved with the last applied page, if any.
    pub async fn cursor(&self) -> Result<Option<Cursor>> {
        let mut conn = self.inner.readers.get().await?;
        let value: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'cursor'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
        match value.as_deref() {
            None | Some("") => Ok(None),
            Some(v) => u64::from_str(v)
                .map(|v| Some(Cursor(v)))
                .map_err(|_| Error::Corrupt { detail: format!("stored cursor {v:?} is not a decimal integer") }),
        }
    }

    /// When a page from the server was last applied (any answer to a
    /// main-cursor request), if ever.
    pub async fn synced_at(&self) -> Result<Option<std::time::SystemTime>> {
        let mut conn = self.inner.readers.get().await?;
        let value: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'synced_at'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
        Ok(value.and_then(|v| v.parse::<u64>().ok()).map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms)))
    }

    /// Every collection holding live documents, with how many.
    pub async fn collections(&self) -> Result<Vec<(String, u64)>> {
        let mut conn = self.inner.readers.get().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT collection, count(*) FROM tide_docs WHERE deleted = 0 GROUP BY collection ORDER BY collection",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(|(c, n)| (c, u64::try_from(n).unwrap_or(0))).collect())
    }

    /// The persisted Lamport counter: the largest issued or observed.
    pub async fn lamport(&self) -> Result<u64> {
        let mut conn = self.inner.readers.get().await?;
        let n: i64 = sqlx::query_scalar("SELECT lamport FROM tide_clock WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Applies a page of remote changes, saves `cursor` and observes their
    /// counters, in one transaction. Each change replaces the local version
    /// only if its stamp wins ([`tide_core::wins`]). Returns the changes that
    /// altered local state, in page order, for watch events.
    pub async fn apply_page(&self, changes: Vec<Change>, cursor: Cursor) -> Result<Vec<Change>> {
        for c in &changes {
            self.inner.limits.check_collection(&c.collection)?;
            self.inner.limits.check_id(&c.id)?;
        }
        self.call(|reply| Command::Apply { changes, save: ("cursor", cursor.to_string()), reply }).await
    }

    /// Applies a page of remote changes read outside the main change
    /// stream (a subscription's catch-up, PROTOCOL.md §15) and saves
    /// `subscription` (the client's record of it, with the catch-up's new
    /// cursor) in the same transaction; the main cursor stays.
    pub async fn apply_catch_up(&self, changes: Vec<Change>, subscription: String) -> Result<Vec<Change>> {
        for c in &changes {
            self.inner.limits.check_collection(&c.collection)?;
            self.inner.limits.check_id(&c.id)?;
        }
        self.call(|reply| Command::Apply { changes, save: ("subscription", subscription), reply }).await
    }

    /// Saves the client's record of what it subscribes to (opaque text to
    /// the store; see [`Store::apply_catch_up`]).
    pub async fn set_subscription(&self, subscription: String) -> Result<()> {
        self.call(|reply| Command::Subscription { text: subscription, reply }).await
    }

    /// The text saved by [`Store::set_subscription`] or
    /// [`Store::apply_catch_up`], if any.
    pub async fn subscription(&self) -> Result<Option<String>> {
        let mut conn = self.inner.readers.get().await?;
        sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'subscription'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)
    }

    /// Removes a collection's local documents and tombstones without
    /// writing ops (an unsubscribed collection's data, freed), except keys
    /// with pending ops; returns how many versions went. Watchers are not
    /// told.
    pub async fn free_collection(&self, collection: &str) -> Result<u64> {
        self.inner.limits.check_collection(collection)?;
        let collection = collection.to_owned();
        self.call(|reply| Command::Free { collection, reply }).await
    }

    /// Applies versions fetched outside the change stream (a repair or a
    /// fetch, PROTOCOL.md §12) by the LWW rule, without touching the cursor;
    /// returns those that altered local state.
    pub async fn apply_fetched(&self, changes: Vec<Change>) -> Result<Vec<Change>> {
        for c in &changes {
            self.inner.limits.check_collection(&c.collection)?;
            self.inner.limits.check_id(&c.id)?;
        }
        self.call(|reply| Command::Fetched { changes, reply }).await
    }

    /// The root digest of every collection with live documents, read in one
    /// snapshot with the outbox; `None` while ops are pending (the store is
    /// then ahead of the server by design).
    pub async fn settled_roots(&self) -> Result<Option<BTreeMap<String, Hash64>>> {
        let mut conn = self.inner.readers.get().await?;
        let text: Option<String> = sqlx::query_scalar(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM tide_outbox) THEN NULL ELSE \
             (SELECT json_group_array(json_array(collection, hash)) FROM tide_digest WHERE level = 0 AND hash <> 0) END",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let Some(text) = text else { return Ok(None) };
        let rows: Vec<(String, i64)> = parse_json(&text)?;
        Ok(Some(rows.into_iter().map(|(c, h)| (c, Hash64::from_i64(h))).collect()))
    }

    /// The non-zero group digests of a collection, in order.
    pub async fn digest_groups(&self, collection: &str) -> Result<Vec<(u16, Hash64)>> {
        self.digest_level(collection, 1, None).await
    }

    /// The non-zero bucket digests of a collection within `groups`, in order.
    pub async fn digest_buckets(&self, collection: &str, groups: &[u16]) -> Result<Vec<(u16, Hash64)>> {
        self.digest_level(collection, 2, Some(groups)).await
    }

    async fn digest_level(&self, collection: &str, level: u8, groups: Option<&[u16]>) -> Result<Vec<(u16, Hash64)>> {
        // The folded rows and the logged deltas, in one statement (one snapshot).
        let mut conn = self.inner.readers.get().await?;
        let text: String = sqlx::query_scalar(
            "SELECT json_array( \
               (SELECT json_group_array(json_array(ix, hash)) FROM tide_digest \
                WHERE level = ?2 AND collection = ?1 AND hash <> 0 \
                AND (?3 IS NULL OR ix / 256 IN (SELECT value FROM json_each(?3)))), \
               (SELECT json_group_array(json_array(bucket, delta)) FROM tide_digest_log WHERE collection = ?1))",
        )
        .bind(collection)
        .bind(i64::from(level))
        .bind(groups.map(|g| serde_json::to_string(g).expect("groups serialize")))
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let (folded, logged): DigestEntries = parse_json(&text)?;
        Ok(tide_core::digest::with_logged(level, folded, logged, groups))
    }

    /// Every version of a collection in `buckets`, tombstones included, as
    /// a key comparison reports them (PROTOCOL.md §12).
    pub async fn held_versions(&self, collection: &str, buckets: &[u16]) -> Result<Vec<HeldVersion>> {
        let mut conn = self.inner.readers.get().await?;
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(id, lamport, node_id, deleted = 0, vhash)) FROM tide_docs \
             WHERE collection = ?1 AND bucket IN (SELECT value FROM json_each(?2))",
        )
        .bind(collection)
        .bind(serde_json::to_string(buckets).expect("buckets serialize"))
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<(String, u64, String, u8, i64)> = parse_json(&text)?;
        Ok(rows.into_iter().map(|(id, l, n, live, h)| HeldVersion(id, l, n, live == 1, Hash64::from_i64(h))).collect())
    }

    /// The stored versions of `ids` in a collection as ops with their
    /// original stamps: what a repair pushes back (PROTOCOL.md §12), each
    /// with its base (PROTOCOL.md §14): the server's seq of a live version
    /// it stored (0 where not known), so a server that collected its
    /// delete does not take it back.
    pub async fn versions_as_ops(&self, collection: &str, ids: &[String]) -> Result<Vec<(Op, Option<u64>)>> {
        let mut conn = self.inner.readers.get().await?;
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(json_array(0, collection, id, iif(deleted, 'delete', 'put'), doc, \
             lamport, node_id), iif(deleted, NULL, coalesce(seq, base)))) \
             FROM tide_docs WHERE collection = ?1 AND id IN (SELECT value FROM json_each(?2))",
        )
        .bind(collection)
        .bind(serde_json::to_string(ids).expect("ids serialize"))
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<(OpRow, Option<u64>)> = parse_json(&text)?;
        rows.into_iter().map(|(r, base)| Ok((r.into_op()?, base))).collect()
    }

    /// The rejected ops whose documents have not been put back to the
    /// server's version yet, oldest first (at most 1,000).
    pub async fn unreverted(&self) -> Result<Vec<Refused>> {
        type Row = (String, String, u64, String, Option<String>, Option<u64>, Option<String>, Option<u8>, i64);
        let mut conn = self.inner.readers.get().await?;
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(collection, id, lamport, node_id, \
             prev_doc, prev_lamport, prev_node_id, prev_deleted, vhash)) FROM \
             (SELECT * FROM tide_rejected WHERE reverted = 0 ORDER BY seq LIMIT 1000)",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let rows: Vec<Row> = parse_json(&text)?;
        rows.into_iter()
            .map(|(c, id, l, n, prev_doc, prev_lamport, prev_node, prev_deleted, hash)| {
                let before = match (prev_lamport, prev_node) {
                    (Some(lamport), Some(node)) => {
                        let payload = match (prev_deleted, prev_doc) {
                            (Some(0), Some(doc)) => Payload::Put(parse_doc(doc)?),
                            _ => Payload::Delete,
                        };
                        Some(Version { stamp: Stamp::new(lamport, node), payload })
                    }
                    _ => None,
                };
                let hash = (hash != 0).then(|| Hash64::from_i64(hash));
                Ok(Refused { key: DocKey(c, id), stamp: Stamp::new(l, n), hash, before })
            })
            .collect()
    }

    /// Puts the documents of refused writes back to the last version the
    /// server took: the server's (`server`; a key missing from it is
    /// removed), or the version the refused write replaced when that is
    /// newer (the server lost it) and was not refused itself. Only where
    /// the local version is still the refused one: a key written again
    /// since keeps its newer version. Marks those rejections reverted, all
    /// in one transaction.
    /// Returns each key whose local state changed, with its new version.
    pub async fn revert(&self, targets: Vec<Refused>, server: Vec<Change>) -> Result<Vec<Reverted>> {
        self.call(|reply| Command::Revert { targets, server, reply }).await
    }

    /// Caps the database at `pages` pages (SQLite's `max_page_count`); a
    /// write that needs more fails with [`Error::Full`]. Returns the cap in
    /// force, which is never below the current size.
    pub async fn set_max_page_count(&self, pages: u64) -> Result<u64> {
        self.call(|reply| Command::MaxPages { pages, reply }).await
    }

    /// The settings read back from every connection, the writer's first.
    pub async fn connection_settings(&self) -> Result<Vec<ConnectionSettings>> {
        let mut all = vec![self.call(|reply| Command::Settings { reply }).await?];
        for conn in self.inner.readers.all() {
            all.push(conn::read_settings(&mut *conn::lock(conn).await?).await?);
        }
        Ok(all)
    }

    /// The version of the SQLite library in use.
    pub async fn sqlite_version(&self) -> Result<String> {
        let mut conn = self.inner.readers.get().await?;
        sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&mut *conn).await.map_err(db)
    }

    /// Runs SQLite's full `integrity_check`.
    pub async fn check_integrity(&self) -> Result<()> {
        let mut conn = self.inner.readers.get().await?;
        let report: Vec<String> =
            sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&mut *conn).await.map_err(db)?;
        if report.first().map(String::as_str) == Some("ok") {
            Ok(())
        } else {
            Err(Error::Corrupt { detail: report.join("; ") })
        }
    }

    /// Finishes queued writes, then closes every connection; when it
    /// returns the file is consistent and complete on disk. Every clone of
    /// this store then fails with [`Error::Closed`].
    pub async fn close(&self) {
        let _ = self.call(|reply| Command::Close { reply }).await;
        self.inner.readers.close_all().await;
    }
}

/// What became of one local write (see [`Store::write_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    /// In the outbox, not acknowledged yet.
    Pending,
    /// Acknowledged by the server (applied, a duplicate, or superseded).
    Acknowledged,
    /// Refused by the server; in the rejected set.
    Rejected,
}

/// A write the server refused, to put back (see [`Store::revert`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The document's key.
    pub key: DocKey,
    /// The refused write's stamp.
    pub stamp: Stamp,
    /// The refused write's version hash, when known: only that version is
    /// put back (a collision can give its stamp another payload).
    pub hash: Option<Hash64>,
    /// The version it replaced locally, if any.
    pub before: Option<Version>,
}

/// A document put back to the server's version after a rejection.
#[derive(Debug, Clone, PartialEq)]
pub struct Reverted {
    /// The document's collection.
    pub collection: String,
    /// The document's id.
    pub id: String,
    /// The version now stored; `None` when the server had none.
    pub version: Option<Version>,
    /// The stamp of the local version it replaced.
    pub previous: Stamp,
}

/// An outbox or rejected row as read back in one JSON array.
#[derive(Deserialize)]
struct OpRow(u64, String, String, String, Option<String>, u64, String);

/// A rejected row: an [`OpRow`] with its code and message.
#[derive(Deserialize)]
struct RejectedRow(u64, String, String, String, Option<String>, u64, String, String, String);

impl OpRow {
    fn into_op(self) -> Result<Op> {
        let OpRow(_, collection, id, kind, doc, lamport, node_id) = self;
        let payload = match (kind.as_str(), doc) {
            ("delete", _) => Payload::Delete,
            (_, Some(doc)) => Payload::Put(parse_doc(doc)?),
            (kind, None) => {
                return Err(Error::Corrupt { detail: format!("outbox {kind} op without a document") });
            }
        };
        Ok(Op { collection, id, stamp: Stamp::new(lamport, node_id), payload, op_id: None })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt { detail: format!("unreadable row: {e}") })
}

fn parse_doc(text: String) -> Result<Doc> {
    Doc::from_stored(text).map_err(|e| Error::Corrupt { detail: format!("stored document: {e}") })
}

/// Folded digest rows and logged bucket deltas, as read together.
type DigestEntries = (Vec<(u16, i64)>, Vec<(u16, i64)>);

/// Binds a compiled query's values in order.
fn bind_all(
    mut statement: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    binds: Vec<query::Bind>,
) -> sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for b in binds {
        statement = match b {
            query::Bind::Text(t) => statement.bind(t),
            query::Bind::Int(i) => statement.bind(i),
            query::Bind::Real(r) => statement.bind(r),
            query::Bind::Null => statement.bind(None::<i64>),
        };
    }
    statement
}
