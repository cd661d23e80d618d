//! tide-transport: how a client's sync exchange reaches a server.
//!
//! - [`Transport`]: one object-safe trait, one method: a request in, a
//!   response or an [`Error`] out. Errors say whether a retry can help.
//! - `HttpTransport` (cargo feature `http`, on by default): `POST` over hyper, HTTP/1.1 with connection reuse,
//!   HTTPS through rustls (no OpenSSL), static or provided headers, gzip both
//!   ways, and every wait and size bounded.
//! - [`FakeServer`] and [`FakeTransport`]: an in-memory sync server built on
//!   `tide_core::Model`, shared by any number of clients in one process,
//!   with scripted or seeded faults and a record of the traffic. Always
//!   compiled, so applications can test their own sync without a network.
//!
//! Layer rule: depends only on tide-core among tide crates; `hyper` and
//! `rustls` never appear in its public API.
//!
//! # Cancel safety
//!
//! Dropping an exchange future abandons the exchange, not its effect: the
//! request may already have reached the server, which may have committed
//! its ops. The protocol makes that harmless: the client keeps the ops in
//! its outbox and resends them, and the server answers `duplicate` or
//! `superseded` for what it already holds (PROTOCOL.md §9). The same holds
//! for a timeout, which is a drop with an error.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tide_transport::Error> {
//! use tide_transport::{FakeServer, Transport};
//! let server = FakeServer::new();
//! let client = server.connect("phone");
//! let response = client.exchange(&tide_core::SyncRequest::new("phone", None)).await?;
//! assert!(response.changes.is_empty());
//! # Ok(()) }
//! ```

mod error;
mod fake;
mod headers;
#[cfg(feature = "http")]
mod http;

pub use error::Error;
pub use fake::{Exchange, FakeServer, FakeTransport, Fault, FaultRates, Outcome};
pub use headers::{BoxError, HeaderProvider, Headers};
#[cfg(feature = "http")]
pub use http::{
    GZIP_REQUEST_BYTES_MIN, HttpTransport, HttpTransportBuilder, RESPONSE_BYTES_MAX_DEFAULT, decode_response,
};

use tide_core::{SyncRequest, SyncResponse};

/// Default for `HttpTransportBuilder::connect_timeout`.
pub const CONNECT_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default for `HttpTransportBuilder::exchange_timeout`: longer than the
/// protocol's longest long-poll (`tide_core::limits::WAIT_MAX`, 30 s).
pub const EXCHANGE_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_mins(1);

/// Carries one sync exchange to a server.
///
/// Implementations must be cheap to share (`Send + Sync`); a client holds
/// one as `Arc<dyn Transport>`. See the crate docs for cancel safety.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Sends `request` and returns the server's response.
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error>;
}

#[async_trait::async_trait]
impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error> {
        (**self).exchange(request).await
    }
}
