//! tide-testkit: run tide's clients and servers together under faults, for
//! tide's own tests and for applications' tests.
//!
//! - [`Cluster`]: a [`tide_transport::FakeServer`] and any number of
//!   [`tide_client::Tide`] clients on store files in a temp dir, with helpers
//!   to sync, partition, restart clients on their files, and check that every
//!   replica equals the server and the reference model.
//! - [`LoopbackServer`]: a real `tide-server` on a loopback port, SQLite in
//!   a temp dir.
//! - [`FaultyProxy`]: a TCP proxy on loopback that partitions (both ways or
//!   one way), resets connections mid-body, or delays, in front of a real
//!   server.
//! - [`simulate`]: the seeded simulator: random clients writing, deleting and
//!   re-creating on a tiny key space, offline and online, through drops,
//!   duplicates, lost responses, 5xx and 429, stale pages and restarts; then
//!   heal and check safety and liveness.
//!
//! Layer rule: may depend on every tide crate, and is only ever a
//! dev-dependency.

mod cluster;
mod proxy;
mod sim;

pub use cluster::{Cluster, LoopbackServer, Snapshot};
pub use proxy::{FaultyProxy, ProxyMode};
pub use sim::{SimConfig, SimReport, simulate};
