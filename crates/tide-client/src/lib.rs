//! tide-client: local-first documents that sync.
//!
//! A [`Tide`] keeps an application's documents in a local SQLite file,
//! queues every write in a durable outbox, and syncs with a tide server
//! (or the original Python one) so every replica converges: per document,
//! last writer wins by Lamport stamp.
//!
//! - [`Tide::collection`]: typed [`Collection`]s over serde types (or
//!   `serde_json::Value`): `get`, `put`, `delete`, `list`, `count`.
//! - [`Collection::query`]: find documents by their fields (filters,
//!   order, limit, keyset pages, count), served by indexes the app declares
//!   ([`Collection::create_index`]); [`Query::watch`] follows the result.
//! - [`Tide::commit`]: several writes atomically, as a [`Batch`].
//! - [`Tide::watch`], [`Collection::watch`], [`Collection::watch_doc`]:
//!   streams of local and remote changes, bounded, with lag reported.
//! - [`Tide::sync_once`] and [`Tide::sync_forever`]: push and pull, once or
//!   in the background with backoff; [`Tide::status`] says how it goes.
//!
//! Layer rule: composes tide-core, tide-store and tide-transport, nothing else.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tide_client::Error> {
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use tide_client::Tide;
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Note { title: String, done: bool }
//!
//! // Two replicas and a server, all in memory.
//! let server = tide_transport::FakeServer::new();
//! let phone = Tide::builder().transport(Arc::new(server.connect("phone"))).open().await?;
//! let laptop = Tide::builder().transport(Arc::new(server.connect("laptop"))).open().await?;
//!
//! let notes = phone.collection::<Note>("notes");
//! notes.put("n1", &Note { title: "buy bread".into(), done: false }).await?;
//! phone.sync_once().await?;
//! laptop.sync_once().await?;
//! assert_eq!(laptop.collection::<Note>("notes").get("n1").await?.unwrap().title, "buy bread");
//! # Ok(()) }
//! ```

mod collection;
mod error;
mod inner;
mod query;
mod status;
mod subscription;
mod sync;
mod tide;
mod watch;

pub use collection::{Collection, LIST_LIMIT_DEFAULT};
pub use error::{Error, Result};
pub use query::{Field, Filter, LiveQuery, Query, QueryCursor, QueryPage, QueryUpdate, field};
pub use status::SyncStatus;
pub use sync::{
    BACKOFF_BASE, BACKOFF_MAX, LONG_POLL_HOLD_MIN, PULL_PAGE_CHANGES_MAX, PUSH_BATCH_OPS_MAX, REKEYS_PER_SYNC_MAX,
    SYNC_EXCHANGES_MAX, SyncReport, TOKEN_REFRESHES_PER_SYNC_MAX, VERIFY_EXCHANGES_MAX,
};
pub use tide::{Batch, LONG_POLL_WAIT_DEFAULT, StatusWatch, SyncHandle, Tide, TideBuilder, WATCH_BUFFER_CHANGES};
pub use tide_store::{Durability, PendingOp, RejectedOp, Version};
pub use tide_transport::{HeaderProvider, Headers};
pub use watch::{ChangeEvent, Changed, Source, TypedEvent, TypedWatch, Watch, WatchEvent};
