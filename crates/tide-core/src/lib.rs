//! tide-core: the pure heart of tide's sync protocol.
//!
//! Everything here is a plain function of its arguments: no I/O, no async
//! runtime, no clock, no randomness. Time, ids, counters and seeds come in
//! as arguments, so the same code runs in the client, the server, the fake
//! transport and the tests.
//!
//! - [`wire`]: the messages of `POST /sync`, mirroring PROTOCOL.md.
//! - [`Stamp`] and [`LamportClock`]: the version of a write and the clock
//!   that issues it, bounded by [`LAMPORT_MAX`].
//! - [`decide`]: the last-writer-wins rule, one total function.
//! - [`Limits`]: every protocol limit, named, with its default and checks.
//! - [`Model`]: the reference semantics of a server namespace, the oracle.
//! - [`SplitMix64`]: the seeded generator of simulations and seeded faults.
//!
//! Layer rule: this crate depends on no other tide crate and on no tokio,
//! hyper or sqlx (ARCHITECTURE.md; a test enforces it).
//!
//! ```
//! use tide_core::{Doc, LamportClock, Limits, Model, Op, Payload, Stamp, SyncRequest, OpResult};
//!
//! let mut server = Model::new(Limits::default());
//! let mut clock = LamportClock::new(0)?;
//! let doc = Doc::parse(r#"{"title":"Hello"}"#)?;
//! let mut req = SyncRequest::new("node-a", None);
//! req.ops.push(Op {
//!     collection: "notes".into(),
//!     id: "n1".into(),
//!     stamp: Stamp::new(clock.tick()?, "node-a"),
//!     payload: Payload::Put(doc),
//!     op_id: None,
//! });
//! let resp = server.exchange(&req)?;
//! assert_eq!(resp.results, vec![OpResult::Applied { seq: 1 }]);
//! // A fresh client (no cursor) gets everything, its own writes included.
//! assert_eq!(resp.changes.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod digest;
mod doc;
pub mod limits;
mod lww;
pub mod model;
mod seeded;
mod stamp;
pub mod wire;

pub use doc::{DOC_DEPTH_MAX, DocError};
pub use limits::Limits;
pub use lww::{Decision, Horizon, decide, wins};
pub use model::Model;
pub use seeded::SplitMix64;
pub use stamp::{LAMPORT_MAX, LamportClock, Stamp};
pub use wire::{
    Chain, Change, Cursor, Doc, DocKey, ErrorBody, ErrorCode, HeldVersion, Kind, Lineage, Op, OpResult,
    PROTOCOL_VERSION, Payload, SyncRequest, SyncResponse, Verify, Violation,
};

/// The errors of tide-core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The clock reached [`LAMPORT_MAX`] and cannot issue another counter.
    #[error("lamport counter exhausted at {LAMPORT_MAX}")]
    LamportExhausted,
    /// A counter above [`LAMPORT_MAX`] was offered to the clock.
    #[error("lamport counter {lamport} is above the maximum {LAMPORT_MAX}")]
    LamportOutOfRange {
        /// The offending counter.
        lamport: u64,
    },
    /// A message breaks the protocol's rules.
    #[error(transparent)]
    Invalid(#[from] Violation),
}
