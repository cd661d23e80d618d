//! tide-server: the sync server, as a library and as the `tide-server`
//! binary.
//!
//! - [`Server`]: the hyper service. [`Server::handle`] answers one request
//!   (embed it in any hyper or axum app, or call it in tests);
//!   [`Server::serve`] runs it on a listener with connection limits,
//!   timeouts and graceful shutdown.
//! - [`Backend`]: where namespaces are stored; [`SqliteBackend`] is the
//!   default, [`PostgresBackend`] runs several servers on one database.
//!   Every backend gives `tide_core::Model`'s exact results.
//! - [`Authenticator`]: a token in, a [`Principal`] and its [`Namespace`]
//!   out; [`NoAuth`], [`StaticTokens`] and [`JwtAuthenticator`] (HS256, or
//!   RS256, ES256 and `EdDSA` keys from a JWKS) ship with it.
//!
//! Layer rule: depends on tide-core only among tide crates.

mod access;
mod auth;
pub mod backend;
mod http;
mod hub;
mod jwt;
mod metrics;
mod tls;

pub use access::{AccessRules, Readable, RulesError, RulesFile};
pub use auth::{AuthError, Authenticator, Namespace, NoAuth, Principal, StaticTokens, TokensError, token_principal};
#[cfg(feature = "postgres")]
pub use backend::postgres::{
    POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT, POSTGRES_LOCK_TIMEOUT, POSTGRES_POOL_MAX, POSTGRES_STATEMENT_TIMEOUT,
    PostgresBackend,
};
pub use backend::sqlite::{
    COLLECT_VACUUM_STEPS, Durability, SqliteBackend, VACUUM_CHECK_GROUPS, VACUUM_FREE_PAGES_MIN, VACUUM_PAGES_PER_STEP,
    backup_sqlite,
};
pub use backend::{Backend, BackendError, COLLECT_SEQS_PER_STEP, Collected, CommitCallback, Reply, Validator, Verdict};
pub use http::{
    AUTHORIZATION_BYTES_MAX, BODY_READ_TIMEOUT_DEFAULT, COLLECT_INTERVAL_DEFAULT, CONNECTIONS_MAX_DEFAULT,
    DECODE_INLINE_BYTES_MAX, HEADER_READ_TIMEOUT_DEFAULT, PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT,
    REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT, SHUTDOWN_GRACE_DEFAULT, Server, ServerConfig, TOMBSTONE_HORIZON_SEQS_DEFAULT,
};
pub use hub::{HELD_PER_NAMESPACE_MAX_DEFAULT, HELD_REQUESTS_MAX_DEFAULT};
pub use jwt::{
    JWKS_BYTES_MAX, JWKS_FETCH_TIMEOUT, JWKS_REFETCH_MIN_DEFAULT, JWT_LEEWAY_DEFAULT, JWT_NAMESPACE_CLAIM_DEFAULT,
    JWT_PRINCIPAL_CLAIM_DEFAULT, JwksError, JwtAuthenticator, JwtConfig,
};
pub use metrics::METRICS_NAMESPACES_MAX;
pub use tls::{Tls, TlsError};

/// glibc allocator settings for a server's large short-lived buffers, as
/// a `GLIBC_TUNABLES` value.
///
/// A page of changes is built in buffers of a few hundred KiB (SQLite's
/// aggregate, its copy, the response). With glibc's default dynamic mmap
/// and trim thresholds each such buffer can become fresh pages from the
/// kernel, and page faults then take up to a tenth of the server's CPU.
/// These keep them on the heap instead (mmap threshold 64 MiB, trim
/// threshold 256 MiB, top pad 16 MiB); the resident size stays about the
/// same. `tide-server` starts itself again with them when the variable is
/// not set; an application embedding the server can set it for its process.
pub const GLIBC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456:glibc.malloc.top_pad=16777216";
