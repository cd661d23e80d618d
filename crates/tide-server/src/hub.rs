//! Long-poll wake-ups: requests held until their namespace commits a change,
//! bounded in total and per namespace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Default for [`crate::ServerConfig::held_requests_max`].
pub const HELD_REQUESTS_MAX_DEFAULT: usize = 10_000;
/// Default for [`crate::ServerConfig::held_per_namespace_max`].
pub const HELD_PER_NAMESPACE_MAX_DEFAULT: usize = 1_000;

struct Entry {
    version: watch::Sender<u64>,
    held: usize,
}

/// One channel per namespace with held requests; a commit bumps it.
pub(crate) struct Hub {
    namespaces: Mutex<HashMap<String, Entry>>,
    held: AtomicUsize,
    /// Commits notified, over all namespaces: a held request's version (a
    /// namespace's channel starts at it), never repeated while the server runs.
    commits: std::sync::atomic::AtomicU64,
    total_max: usize,
    per_namespace_max: usize,
}

/// A held request's place; dropping it (answered, expired, or the client
/// hung up) gives the place back.
pub(crate) struct Held {
    hub: Arc<Hub>,
    namespace: String,
    pub(crate) commits: watch::Receiver<u64>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.hub.held.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.hub.lock();
        if let Some(entry) = map.get_mut(&self.namespace) {
            entry.held -= 1;
            if entry.held == 0 {
                map.remove(&self.namespace);
            }
        }
    }
}

impl Hub {
    pub(crate) fn new(total_max: usize, per_namespace_max: usize) -> Self {
        Self {
            namespaces: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
            commits: std::sync::atomic::AtomicU64::new(0),
            total_max,
            per_namespace_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.namespaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a place to hold a request in `namespace`, or `None` when the
    /// caps are reached (the request is then answered at once).
    pub(crate) fn hold(self: &Arc<Self>, namespace: &str) -> Option<Held> {
        let mut map = self.lock();
        if self.held.load(Ordering::Relaxed) >= self.total_max {
            return None;
        }
        let latest = self.commits.load(Ordering::Acquire);
        let entry =
            map.entry(namespace.to_owned()).or_insert_with(|| Entry { version: watch::channel(latest).0, held: 0 });
        if entry.held >= self.per_namespace_max {
            return None;
        }
        entry.held += 1;
        self.held.fetch_add(1, Ordering::Relaxed);
        Some(Held { hub: Arc::clone(self), namespace: namespace.to_owned(), commits: entry.version.subscribe() })
    }

    /// A change committed in `namespace`: wakes its held requests.
    pub(crate) fn notify(&self, namespace: &str) {
        // Counted even with nothing held: a poll's version then tells
        // whether any commit was notified after a page shared with it was read.
        let map = self.lock();
        let version = self.commits.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(entry) = map.get(namespace) {
            entry.version.send_modify(|v| *v = version);
        }
    }

    /// Wakes every held request (after a lost notification channel).
    pub(crate) fn notify_all(&self) {
        let map = self.lock();
        let version = self.commits.fetch_add(1, Ordering::AcqRel) + 1;
        for entry in map.values() {
            entry.version.send_modify(|v| *v = version);
        }
    }

    /// How many requests are held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}
