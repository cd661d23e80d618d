//! The store's one error type: variants a caller can act on, never a bare
//! sqlx error.

use tide_core::Violation;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database stayed locked by another process for longer than the
    /// busy timeout. Nothing was written; retrying later can succeed.
    #[error("database is busy: locked by another connection beyond the busy timeout")]
    Busy,
    /// The disk, or the store's configured maximum size, is full. Nothing was
    /// written; the store works again once space returns.
    #[error("database or disk is full")]
    Full,
    /// The file is not a SQLite database, or its contents are damaged. The
    /// store refuses it rather than reset it, so nothing is lost silently.
    #[error("database file is corrupt or not a SQLite database: {detail}")]
    Corrupt {
        /// What SQLite reported.
        detail: String,
    },
    /// The file was written by a newer tide; this build cannot read it.
    #[error("store schema v{found} is newer than this build supports (up to v{supported}); upgrade tide")]
    SchemaTooNew {
        /// The schema version in the file.
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },
    /// The file belongs to one node id and another was asked for. A store's
    /// node id never changes.
    #[error("store belongs to node id {stored:?}, not {requested:?}")]
    NodeIdMismatch {
        /// The node id persisted in the store.
        stored: String,
        /// The node id the caller asked for.
        requested: String,
    },
    /// A collection, id, document or change breaks the protocol's rules.
    #[error("invalid input: {0}")]
    Invalid(#[from] Violation),
    /// A query or index that cannot run: a bad field path, a comparison
    /// with an array, too many terms, a cursor of another query.
    #[error("invalid query: {message}")]
    InvalidQuery {
        /// What is wrong.
        message: String,
    },
    /// A connection setting did not take effect (read back after connecting).
    #[error("connection setting {name} is {found}, expected {expected}")]
    Setting {
        /// The pragma.
        name: &'static str,
        /// What the store asked for.
        expected: String,
        /// What SQLite reports.
        found: String,
    },
    /// The Lamport clock cannot go on (exhausted, or offered a counter beyond
    /// 2^53 − 1).
    #[error(transparent)]
    Clock(#[from] tide_core::Error),
    /// The store was closed.
    #[error("store is closed")]
    Closed,
    /// Any other database failure.
    #[error("database error: {message}")]
    Database {
        /// What went wrong.
        message: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Maps a sqlx error onto [`Error`] by SQLite's primary result code.
pub(crate) fn db(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(d) = &e {
        let code: i32 = d.code().and_then(|c| c.parse().ok()).unwrap_or(0);
        match code & 0xff {
            5 | 6 => return Error::Busy, // SQLITE_BUSY, SQLITE_LOCKED
            13 => return Error::Full,    // SQLITE_FULL
            11 | 26 => {
                return Error::Corrupt { detail: d.message().to_owned() };
            } // CORRUPT, NOTADB
            _ => {}
        }
    }
    Error::Database { message: e.to_string(), source: Box::new(e) }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A copy for the other callers of a failed group commit, which share
    /// one underlying failure.
    pub(crate) fn replicate(&self) -> Self {
        match self {
            Self::Busy => Self::Busy,
            Self::Full => Self::Full,
            Self::Corrupt { detail } => Self::Corrupt { detail: detail.clone() },
            Self::Closed => Self::Closed,
            Self::Clock(e) => Self::Clock(e.clone()),
            Self::Invalid(v) => Self::Invalid(v.clone()),
            other => Self::Database { message: other.to_string(), source: other.to_string().into() },
        }
    }
}
