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
//!   out; [`NoAuth`] and [`StaticTokens`] ship with it.
//!
//! Layer rule: depends on tide-core only among tide crates.

mod auth;
pub mod backend;
mod http;
mod hub;
mod metrics;

pub use auth::{AuthError, Authenticator, Namespace, NoAuth, Principal, StaticTokens, TokensError, token_principal};
pub use backend::postgres::{POSTGRES_POOL_MAX, PostgresBackend};
pub use backend::sqlite::{Durability, SqliteBackend};
pub use backend::{Backend, BackendError, CommitCallback, Reply};
pub use http::{
    AUTHORIZATION_BYTES_MAX, BODY_READ_TIMEOUT_DEFAULT, CONNECTIONS_MAX_DEFAULT, HEADER_READ_TIMEOUT_DEFAULT,
    SHUTDOWN_GRACE_DEFAULT, Server, ServerConfig,
};
pub use hub::{HELD_PER_NAMESPACE_MAX_DEFAULT, HELD_REQUESTS_MAX_DEFAULT};
