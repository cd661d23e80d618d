//! The state a `Tide` and its clones share: the store, the transport, the
//! watchers' hub and the sync's bookkeeping. The handle (`tide.rs`), the
//! sync loop (`sync.rs`) and the collections use it; it uses none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tide_core::Stamp;
use tide_store::{Store, Write};
use tide_transport::Transport;
use tokio::sync::{Mutex, Notify, watch};

use crate::error::{Error, Result};
use crate::status::SyncStatus;
use crate::subscription::Subscription;
use crate::watch::Hub;

/// Everything a `Tide` holds.
pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) transport: Option<Arc<dyn Transport>>,
    pub(crate) long_poll: Option<Duration>,
    pub(crate) push_batch_ops: usize,
    pub(crate) hub: Arc<Hub>,
    pub(crate) status: watch::Sender<SyncStatus>,
    pub(crate) wake: Notify,
    pub(crate) sync_lock: Mutex<()>,
    /// The highest tombstone horizon a server reported (PROTOCOL.md §14).
    pub(crate) horizon: std::sync::atomic::AtomicU64,
    /// What this store syncs (PROTOCOL.md §15), as saved in it.
    pub(crate) subscription: Mutex<Subscription>,
    pub(crate) closed: AtomicBool,
    /// Set when the Tide closes: background loops end, exchanges in flight are cancelled.
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    pub(crate) fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) async fn write(&self, writes: Vec<Write>) -> Result<Vec<Stamp>> {
        if self.closed() {
            return Err(Error::Closed);
        }
        // The store tells the watchers, in commit order (see `open`).
        let stamps = self.store.write(writes).await?;
        Ok(self.written(stamps))
    }

    /// [`Inner::write`] unless another write or page apply is queued or
    /// running: `None` then, with nothing written.
    pub(crate) async fn write_if_idle(&self, writes: Vec<Write>) -> Result<Option<Vec<Stamp>>> {
        if self.closed() {
            return Err(Error::Closed);
        }
        match self.store.write_if_idle(writes).await {
            Some(stamps) => Ok(Some(self.written(stamps?))),
            None => Ok(None),
        }
    }

    /// Counts committed writes as pending and wakes the background sync,
    /// even if it is in the middle of an exchange (the permit is kept until
    /// it next waits).
    fn written(&self, stamps: Vec<Stamp>) -> Vec<Stamp> {
        self.status.send_modify(|s| s.pending += stamps.len() as u64);
        self.wake.notify_one();
        stamps
    }
}
