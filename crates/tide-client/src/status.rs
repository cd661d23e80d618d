//! What an application is shown of the sync.

use std::time::SystemTime;

/// The sync state an application can show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Ops waiting in the outbox.
    pub pending: u64,
    /// Ops the server rejected, waiting for the application to retry or discard them.
    pub rejected: u64,
    /// When the last sync completed.
    pub last_success: Option<SystemTime>,
    /// The last sync error, cleared by the next success.
    pub last_error: Option<String>,
    /// Whether the server answered the last exchange (`None` before any).
    pub reachable: Option<bool>,
    /// Whether an exchange is running now.
    pub syncing: bool,
}
