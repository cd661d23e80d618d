//! Connections: how they are opened, the settings read back from each, and
//! the pool of readers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, SqliteConnection};
use std::ops::{Deref, DerefMut};

use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result, db};

/// The writer connection's page cache: 16 MiB (`cache_size` takes negative KiB).
const WRITER_CACHE_KIB_PRAGMA: &str = "-16384";

/// How hard a commit works to survive power loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: the WAL is synced at every commit, so a write that
    /// returned `Ok` survives power loss. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster commits; a write that returned `Ok`
    /// survives a crash of the process, but the last commits may roll back
    /// on power loss or an OS crash (the database stays consistent).
    Normal,
}

/// The settings read back from one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// `PRAGMA journal_mode`: `wal` for a file, `memory` in memory.
    pub journal_mode: String,
    /// `PRAGMA synchronous`: 2 for FULL, 1 for NORMAL.
    pub synchronous: i64,
    /// `PRAGMA foreign_keys`: 1.
    pub foreign_keys: i64,
    /// `PRAGMA busy_timeout`.
    pub busy_timeout: Duration,
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    File(PathBuf),
    Memory,
}

pub(crate) struct Settings {
    pub(crate) location: Location,
    pub(crate) durability: Durability,
    pub(crate) busy_timeout: Duration,
}

impl Settings {
    fn options(&self) -> SqliteConnectOptions {
        let base = SqliteConnectOptions::new()
            // Freed pages go back to the file system a step at a time
            // (`State::vacuum_now_and_then`), never in one long stall.
            .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
            .foreign_keys(true)
            .busy_timeout(self.busy_timeout)
            .synchronous(match self.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            // Statements are the unit of cost (one worker round trip each);
            // keep every statement the store uses prepared.
            .statement_cache_capacity(128);
        match &self.location {
            Location::File(path) => base.filename(path).create_if_missing(true),
            Location::Memory => base.in_memory(true),
        }
    }

    /// The writer connection: creates the file, switches it to WAL.
    pub(crate) async fn connect_writer(&self) -> Result<SqliteConnection> {
        // A page of changes dirties a few MiB; a cache that holds it avoids
        // spilling to the WAL in the middle of the transaction.
        let mut options = self.options().pragma("cache_size", WRITER_CACHE_KIB_PRAGMA);
        if let Location::File(_) = self.location {
            // The writer checkpoints between batches (`writer::CHECKPOINT_OPS`),
            // not inside whichever commit crosses SQLite's line.
            options = options.journal_mode(SqliteJournalMode::Wal).pragma("wal_autocheckpoint", "0");
        }
        options.connect().await.map_err(db)
    }

    /// A reader connection: WAL is already set in the file; `query_only`
    /// makes a stray write an error.
    pub(crate) async fn connect_reader(&self) -> Result<SqliteConnection> {
        self.options().pragma("query_only", "ON").connect().await.map_err(db)
    }

    fn expected_journal_mode(&self) -> &'static str {
        match self.location {
            Location::File(_) => "wal",
            Location::Memory => "memory",
        }
    }

    /// Reads the settings back and refuses a connection where one did not
    /// take effect.
    pub(crate) async fn verify(&self, conn: &mut SqliteConnection) -> Result<ConnectionSettings> {
        let found = read_settings(conn).await?;
        let expected_sync = match self.durability {
            Durability::Full => 2,
            Durability::Normal => 1,
        };
        let checks = [
            ("journal_mode", self.expected_journal_mode().to_owned(), found.journal_mode.clone()),
            ("synchronous", expected_sync.to_string(), found.synchronous.to_string()),
            ("foreign_keys", "1".to_owned(), found.foreign_keys.to_string()),
            ("busy_timeout", self.busy_timeout.as_millis().to_string(), found.busy_timeout.as_millis().to_string()),
        ];
        for (name, expected, found) in checks {
            if expected != found {
                return Err(Error::Setting { name, expected, found });
            }
        }
        Ok(found)
    }
}

pub(crate) async fn read_settings(conn: &mut SqliteConnection) -> Result<ConnectionSettings> {
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *conn).await.map_err(db)?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.map_err(db)?;
    let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut *conn).await.map_err(db)?;
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut *conn).await.map_err(db)?;
    Ok(ConnectionSettings {
        journal_mode: journal_mode.to_ascii_lowercase(),
        synchronous,
        foreign_keys,
        busy_timeout: Duration::from_millis(u64::try_from(busy).unwrap_or(0)),
    })
}

/// A connection shared between the writer task and readers; `None` once
/// the store is closed.
pub(crate) type Shared = Arc<Mutex<Option<SqliteConnection>>>;

/// A locked, open connection.
pub(crate) struct Held(OwnedMutexGuard<Option<SqliteConnection>>);

impl Held {
    fn new(guard: OwnedMutexGuard<Option<SqliteConnection>>) -> Result<Self> {
        if guard.is_none() {
            return Err(Error::Closed);
        }
        Ok(Self(guard))
    }
}

impl Deref for Held {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.0.as_ref().expect("checked open when locked")
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0.as_mut().expect("checked open when locked")
    }
}

/// Locks a shared connection, failing with [`Error::Closed`] once closed.
pub(crate) async fn lock(shared: &Shared) -> Result<Held> {
    Held::new(Arc::clone(shared).lock_owned().await)
}

/// Closes a shared connection for good (a no-op if already closed).
pub(crate) async fn close(shared: &Shared) {
    if let Some(conn) = shared.lock().await.take() {
        let _ = sqlx::Connection::close(conn).await;
    }
}

/// A fixed set of reader connections; a read takes any free one, so a slow
/// read never holds up another that could run elsewhere.
pub(crate) struct Readers {
    conns: Vec<Shared>,
    free: Arc<Semaphore>,
}

/// A borrowed reader connection, returned to the set on drop.
pub(crate) struct Reader {
    conn: Held,
    _permit: OwnedSemaphorePermit,
}

impl Deref for Reader {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl DerefMut for Reader {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Readers {
    pub(crate) fn new(conns: Vec<Shared>) -> Self {
        let free = Arc::new(Semaphore::new(conns.len()));
        Self { conns, free }
    }

    pub(crate) fn all(&self) -> &[Shared] {
        &self.conns
    }

    /// Closes every reader; later reads fail with [`Error::Closed`].
    pub(crate) async fn close_all(&self) {
        self.free.close();
        for conn in &self.conns {
            close(conn).await;
        }
    }

    /// Borrows a free connection, waiting for one if all are busy.
    pub(crate) async fn get(&self) -> Result<Reader> {
        let permit = Arc::clone(&self.free).acquire_owned().await.map_err(|_| Error::Closed)?;
        for conn in &self.conns {
            if let Ok(guard) = Arc::clone(conn).try_lock_owned() {
                return Ok(Reader { conn: Held::new(guard)?, _permit: permit });
            }
        }
        // In memory the one connection is shared with the writer, which may
        // hold it without a permit: wait for it.
        Ok(Reader { conn: lock(&self.conns[0]).await?, _permit: permit })
    }
}
