//! tide-client's integration tests, one binary.

mod background;
mod behaviour;
mod convergence;
mod crash;
mod interop;
mod queries;
mod subscriptions;
mod watching;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tide_client::Tide;
use tide_transport::FakeServer;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct Note {
    pub(crate) title: String,
    #[serde(default)]
    pub(crate) done: bool,
}

pub(crate) fn note(title: &str) -> Note {
    Note { title: title.into(), done: false }
}

/// A Tide in memory on `server`, as client `name`.
pub(crate) async fn client(server: &FakeServer, name: &str) -> Tide {
    Tide::builder().node_id(name).transport(Arc::new(server.connect(name))).open().await.unwrap()
}

/// A Tide in memory that syncs every interval, without long-polls, so
/// tests can count its exchanges.
pub(crate) async fn interval_client(server: &FakeServer, name: &str) -> Tide {
    Tide::builder().node_id(name).long_poll(None).transport(Arc::new(server.connect(name))).open().await.unwrap()
}

/// A Tide on a file in `dir`, as client `name`.
pub(crate) async fn file_client(server: &FakeServer, dir: &std::path::Path, name: &str) -> Tide {
    Tide::builder()
        .path(dir.join(format!("{name}.db")))
        .node_id(name)
        .transport(Arc::new(server.connect(name)))
        .open()
        .await
        .unwrap()
}

/// The value of `var`, which points a test at a service it needs (`what`
/// names what it tests). Without it the test is skipped loudly: the line is
/// written to the terminal itself, past libtest's capture, and `.ci/run`
/// counts it as skipped. In CI (`CI` set) a missing service fails instead.
pub(crate) fn service(var: &str, what: &str) -> Option<String> {
    use std::io::Write as _;
    if let Ok(value) = std::env::var(var) {
        return Some(value);
    }
    assert!(std::env::var_os("CI").is_none(), "{var} is not set in CI: {what} must be tested there");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {var} is not set; {what} was NOT tested");
    None
}
