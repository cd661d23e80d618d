//! `Tide`: the handle an application holds, and how it is opened.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tide_core::{Doc, Payload, Stamp};
use tide_store::{Durability, OpenOptions, PendingOp, RejectedOp, Store, Write};
use tide_transport::{Headers, Transport};
use tokio::sync::{Mutex, Notify, watch};

use crate::collection::Collection;
use crate::error::{Error, Result};
use crate::inner::Inner;
use crate::status::SyncStatus;
use crate::subscription::{Set, Subscription};
use crate::sync::{SyncReport, run_forever};
use crate::watch::{ChangeEvent, Filter, Hub, Source, Watch};

/// How many changes a watcher may fall behind before it is told it lagged.
pub const WATCH_BUFFER_CHANGES: usize = 1_024;
/// Default for [`TideBuilder::long_poll`]: below the server's 30 s cap and
/// the HTTP transport's 60 s exchange timeout.
pub const LONG_POLL_WAIT_DEFAULT: Duration = Duration::from_secs(25);

/// Stops the background syncs when the application drops its last handle.
struct LastHandle(Arc<Inner>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        let _ = self.0.stop.send(true);
    }
}

/// A local-first store that syncs: typed collections, watch streams, and
/// sync with a server. Cheap to clone; clones share everything. Dropping
/// the last clone stops its background syncs; [`Tide::close`] also waits
/// for them and closes the store.
#[derive(Clone)]
pub struct Tide {
    inner: Arc<Inner>,
    _last: Arc<LastHandle>,
}

impl std::fmt::Debug for Tide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tide").field("node_id", &self.node_id()).finish_non_exhaustive()
    }
}

/// How to open a [`Tide`].
#[must_use]
pub struct TideBuilder {
    path: Option<PathBuf>,
    endpoint: Option<String>,
    transport: Option<Arc<dyn Transport>>,
    headers: Headers,
    store: OpenOptions,
    long_poll: Option<Duration>,
    exchange_timeout: Duration,
    connect_timeout: Duration,
    push_batch_ops: usize,
    collections: Option<Set>,
}

impl std::fmt::Debug for TideBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TideBuilder")
            .field("path", &self.path)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TideBuilder {
    /// The SQLite file to keep the data in (created if missing). Without
    /// it the data lives in memory and is gone when the Tide closes.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sync with the server at `endpoint` (for example
    /// `https://example.com/sync`) over HTTP(S).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sync through any transport (the fake, or your own) instead of an endpoint.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Headers for every request to the endpoint: static, or a provider
    /// asked before every exchange (for short-lived tokens).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// The node id for a new store (default: a fresh ULID). A store keeps
    /// its node id; opening it with another is an error.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.store = self.store.node_id(node_id);
        self
    }

    /// Commit durability (default [`Durability::Full`]: a write that
    /// returned survives power loss).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.store = self.store.durability(durability);
        self
    }

    /// How long the background sync asks the server to hold a request
    /// while caught up (long-poll), so a remote change arrives as soon as it
    /// commits; `None` polls every interval instead. Default
    /// [`LONG_POLL_WAIT_DEFAULT`]; the transport's timeout must be longer.
    pub fn long_poll(mut self, wait: Option<Duration>) -> Self {
        self.long_poll = wait;
        self
    }

    /// How long one exchange with the endpoint may take, long-polls
    /// included (default `tide_transport::EXCHANGE_TIMEOUT_DEFAULT`); it
    /// must be longer than the long-poll wait.
    pub fn exchange_timeout(mut self, timeout: Duration) -> Self {
        self.exchange_timeout = timeout;
        self
    }

    /// How long connecting to the endpoint may take (default
    /// `tide_transport::CONNECT_TIMEOUT_DEFAULT`).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most ops pushed in one exchange (default [`crate::PUSH_BATCH_OPS_MAX`],
    /// at least 1); a server that takes fewer makes the client halve it.
    pub fn push_batch_ops(mut self, ops: usize) -> Self {
        self.push_batch_ops = ops.max(1);
        self
    }

    /// Sync only these collections (partial sync, PROTOCOL.md §15) rather
    /// than every collection the server lets this user read. A store that
    /// synced others keeps their documents (see [`Tide::unsubscribe`] to
    /// free them); one added later is pulled from the beginning without
    /// pulling the rest again. Change it at run time with
    /// [`Tide::subscribe`], [`Tide::unsubscribe`] and
    /// [`Tide::set_collections`]. Writes to any collection still sync.
    pub fn collections<I, S>(mut self, collections: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.collections = Some(Some(collections.into_iter().map(Into::into).collect()));
        self
    }

    /// Opens the store and, if a transport or endpoint was given, readies
    /// sync. No background sync runs until [`Tide::sync_forever`].
    ///
    /// # Errors
    /// The store's errors (a newer schema, a damaged file, another node id),
    /// or a transport configuration error for a bad endpoint or a long-poll
    /// wait not shorter than the exchange timeout (every poll would time out).
    pub async fn open(self) -> Result<Tide> {
        let transport = match (self.transport, self.endpoint) {
            (Some(t), _) => Some(t),
            (None, Some(endpoint)) => {
                if let Some(wait) = self.long_poll.filter(|w| *w >= self.exchange_timeout) {
                    return Err(tide_transport::Error::Config {
                        message: format!(
                            "the long-poll wait ({wait:?}) must be shorter than the exchange timeout ({:?})",
                            self.exchange_timeout
                        ),
                    }
                    .into());
                }
                Some(http_transport(&endpoint, self.headers, self.exchange_timeout, self.connect_timeout)?)
            }
            (None, None) => None,
        };
        // Every committed change reaches the watchers from the store's
        // writer, in commit order: local and remote events for one key can
        // never overtake each other.
        let hub = Arc::new(Hub::default());
        let to_watchers = Arc::clone(&hub);
        let options = self.store.on_commit(Arc::new(move |changes: Vec<tide_store::Committed>| {
            for c in changes {
                let source = match c.origin {
                    tide_store::Origin::Local => Source::Local,
                    tide_store::Origin::Remote => Source::Remote,
                    tide_store::Origin::Reverted => Source::Reverted,
                };
                to_watchers.emit(&ChangeEvent {
                    collection: c.collection,
                    id: c.id,
                    doc: c.doc,
                    source,
                    stamp: c.stamp,
                });
            }
        }));
        let store = match &self.path {
            Some(path) => options.open(path).await?,
            None => options.open_in_memory().await?,
        };
        let subscription = load_subscription(&store, self.collections).await?;
        let status = SyncStatus {
            pending: store.pending_count().await?,
            rejected: store.rejected().await?.len() as u64,
            ..SyncStatus::default()
        };
        let inner = Arc::new(Inner {
            store,
            transport,
            long_poll: self.long_poll,
            push_batch_ops: self.push_batch_ops,
            hub,
            status: watch::channel(status).0,
            wake: Notify::new(),
            sync_lock: Mutex::new(()),
            horizon: std::sync::atomic::AtomicU64::new(0),
            subscription: Mutex::new(subscription),
            closed: AtomicBool::new(false),
            stop: watch::channel(false).0,
            loops: Mutex::new(Vec::new()),
        });
        Ok(Tide { _last: Arc::new(LastHandle(Arc::clone(&inner))), inner })
    }
}

/// The HTTP(S) transport to `endpoint`.
#[cfg(feature = "http")]
fn http_transport(
    endpoint: &str,
    headers: Headers,
    exchange_timeout: Duration,
    connect_timeout: Duration,
) -> Result<Arc<dyn Transport>> {
    let http = tide_transport::HttpTransport::builder(endpoint)
        .headers(headers)
        .exchange_timeout(exchange_timeout)
        .connect_timeout(connect_timeout)
        .build()?;
    Ok(Arc::new(http))
}

/// Built without HTTP: an endpoint cannot be reached.
#[cfg(not(feature = "http"))]
fn http_transport(endpoint: &str, _: Headers, _: Duration, _: Duration) -> Result<Arc<dyn Transport>> {
    Err(tide_transport::Error::Config {
        message: format!("tide-client was built without its `http` feature: cannot reach {endpoint}; give a transport"),
    }
    .into())
}

/// The subscription saved in `store`, changed to `wanted` if the builder
/// named one. A store that has pulled nothing yet covers `wanted` from the
/// start; one with no saved subscription has synced every collection.
async fn load_subscription(store: &Store, wanted: Option<Set>) -> Result<Subscription> {
    if let Some(Some(names)) = &wanted {
        check_names(names.iter())?;
    }
    let saved = match store.subscription().await? {
        Some(text) => Some(
            serde_json::from_str::<Subscription>(&text)
                .map_err(|e| tide_store::Error::Corrupt { detail: format!("saved subscription: {e}") })?,
        ),
        None => None,
    };
    let fresh = store.cursor().await?.is_none();
    let subscription = match (saved, wanted) {
        (Some(saved), None) => return Ok(saved),
        (_, Some(wanted)) if fresh => Subscription::new(wanted),
        (saved, Some(wanted)) => {
            let mut subscription = saved.unwrap_or_default();
            subscription.set_wanted(wanted);
            subscription
        }
        (None, None) => return Ok(Subscription::default()),
    };
    store.set_subscription(subscription.to_text()).await?;
    Ok(subscription)
}

/// Checks collection names given for a subscription.
fn check_names<'a>(names: impl Iterator<Item = &'a String>) -> Result<()> {
    let limits = tide_core::Limits::default();
    for name in names {
        limits.check_collection(name).map_err(|v| Error::Subscription { message: v.message })?;
    }
    Ok(())
}

/// Runs background syncs until dropped (or until the Tide closes): keep it
/// for as long as the app should sync. Dropping it at once (`let _ =`, or
/// not binding it) stops the background sync right away.
#[derive(Debug)]
#[must_use = "background sync stops when the handle is dropped; keep it"]
pub struct SyncHandle {
    stop: watch::Sender<bool>,
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Several writes to commit atomically: all or none, in order.
#[derive(Debug, Default)]
#[must_use]
pub struct Batch {
    writes: Vec<Write>,
}

impl Batch {
    /// Adds a put of `value` (which must serialize to a JSON object).
    ///
    /// # Errors
    /// [`Error::Encode`] if `value` is not a JSON object.
    pub fn put<T: serde::Serialize + ?Sized>(self, collection: &str, id: &str, value: &T) -> Result<Self> {
        let doc = to_doc(collection, id, value)?;
        Ok(self.put_doc(collection, id, doc))
    }

    /// Adds a put of a document already held as one (no encoding).
    pub fn put_doc(mut self, collection: &str, id: &str, doc: Doc) -> Self {
        self.writes.push(Write { collection: collection.into(), id: id.into(), payload: Payload::Put(doc) });
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, collection: &str, id: &str) -> Self {
        self.writes.push(Write { collection: collection.into(), id: id.into(), payload: Payload::Delete });
        self
    }
}

pub(crate) fn to_doc<T: serde::Serialize + ?Sized>(collection: &str, id: &str, value: &T) -> Result<Doc> {
    Doc::from_value(value).map_err(|e| Error::Encode {
        collection: collection.into(),
        id: id.into(),
        message: e.to_string(),
    })
}

impl Tide {
    /// Starts configuring a Tide.
    pub fn builder() -> TideBuilder {
        TideBuilder {
            path: None,
            endpoint: None,
            transport: None,
            headers: Headers::None,
            store: OpenOptions::new(),
            long_poll: Some(LONG_POLL_WAIT_DEFAULT),
            exchange_timeout: tide_transport::EXCHANGE_TIMEOUT_DEFAULT,
            connect_timeout: tide_transport::CONNECT_TIMEOUT_DEFAULT,
            push_batch_ops: crate::PUSH_BATCH_OPS_MAX,
            collections: None,
        }
    }

    /// Opens the store at `path`, syncing with `endpoint`.
    ///
    /// # Errors
    /// See [`TideBuilder::open`].
    pub async fn open(path: impl Into<PathBuf>, endpoint: &str) -> Result<Self> {
        Self::builder().path(path).endpoint(endpoint).open().await
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// This replica's node id.
    ///
    /// It changes if the store finds that a copy of it writes under the same
    /// id (a restored backup, a copied profile) and re-keys itself.
    pub fn node_id(&self) -> String {
        self.inner.store.node_id()
    }

    /// A collection of documents of type `T` (use `serde_json::Value` for
    /// untyped documents). Nothing is checked or created until it is used.
    pub fn collection<T>(&self, name: &str) -> Collection<T> {
        Collection::new(self.clone(), name)
    }

    /// Commits a batch of writes atomically; returns their stamps in order.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tide_client::Error> {
    /// use tide_client::{Batch, Tide};
    /// let tide = Tide::builder().open().await?; // in memory, offline
    /// let batch = Batch::default()
    ///     .put("lists", "groceries", &serde_json::json!({"title": "Groceries"}))?
    ///     .put("items", "bread", &serde_json::json!({"list": "groceries"}))?
    ///     .delete("items", "old");
    /// let stamps = tide.commit(batch).await?;
    /// assert!(stamps[0] < stamps[1]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Invalid names or documents, or a store failure; nothing is written.
    pub async fn commit(&self, batch: Batch) -> Result<Vec<Stamp>> {
        self.inner.write(batch.writes).await
    }

    /// [`Tide::commit`], but only if no other write or page of remote
    /// changes is being committed or waiting to be: then the batch commits
    /// on the calling task without waiting behind anything, else `Ok(None)`
    /// comes back at once and nothing is written (commit it with
    /// [`Tide::commit`] instead). For a caller that must not wait behind
    /// the sync, such as a thread driving a UI.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tide_client::Error> {
    /// use tide_client::{Batch, Tide};
    /// let tide = Tide::builder().open().await?;
    /// let batch = Batch::default().put("notes", "n1", &serde_json::json!({"title": "Hi"}))?;
    /// match tide.try_commit(&batch).await? {
    ///     Some(stamps) => assert_eq!(stamps.len(), 1),
    ///     None => { tide.commit(batch).await?; } // busy: wait after all
    /// }
    /// assert_eq!(tide.status().pending, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Tide::commit`].
    pub async fn try_commit(&self, batch: &Batch) -> Result<Option<Vec<Stamp>>> {
        self.inner.write_if_idle(batch.writes.clone()).await
    }

    /// Every change from now on, local and remote.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tide_client::Error> {
    /// use tide_client::{Source, Tide, WatchEvent};
    /// let tide = Tide::builder().open().await?;
    /// let mut changes = tide.watch(); // registered now: nothing after this is missed
    /// tide.collection::<serde_json::Value>("notes").put("n1", &serde_json::json!({"t": 1})).await?;
    /// let Some(WatchEvent::Change(change)) = changes.next().await else { panic!() };
    /// assert_eq!((change.id.as_str(), change.source), ("n1", Source::Local));
    /// # Ok(()) }
    /// ```
    pub fn watch(&self) -> Watch {
        self.inner.hub.subscribe(Filter::All, WATCH_BUFFER_CHANGES)
    }

    pub(crate) fn watch_filtered(&self, filter: Filter) -> Watch {
        self.inner.hub.subscribe(filter, WATCH_BUFFER_CHANGES)
    }

    /// Pushes the whole outbox in batches and pulls until caught up.
    ///
    /// Cancel safety: dropping the future may leave an exchange's effect on
    /// the server without its answer here; the next sync settles it (the
    /// server answers `duplicate`). Nothing local is half-applied.
    ///
    /// # Errors
    /// [`Error::NoTransport`] offline, [`Error::Transport`] if an exchange
    /// failed (the outbox is kept), or a store error.
    pub async fn sync_once(&self) -> Result<SyncReport> {
        if self.inner.closed() {
            return Err(Error::Closed);
        }
        self.inner.sync_once().await
    }

    /// The collections this store syncs (`None`: every one the server lets
    /// it read; PROTOCOL.md §15).
    pub async fn collections(&self) -> Option<Vec<String>> {
        self.inner.subscription.lock().await.wanted.as_ref().map(|s| s.iter().cloned().collect())
    }

    /// Syncs `collections` from now on (`None`: every readable one). Added
    /// collections are pulled from the beginning by the next sync, without
    /// pulling the others again; removed ones stop syncing and keep their
    /// local documents. Saved in the store.
    ///
    /// # Errors
    /// [`Error::Subscription`] for an invalid collection name, or a store error.
    pub async fn set_collections<I, S>(&self, collections: Option<I>) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let wanted: Set = collections.map(|c| c.into_iter().map(Into::into).collect());
        self.change_subscription(|_| Ok(wanted)).await
    }

    /// Adds `collection` to what this store syncs (nothing changes when it
    /// syncs every collection): the next sync pulls it from the beginning.
    ///
    /// # Errors
    /// [`Error::Subscription`] for an invalid name, or a store error.
    pub async fn subscribe(&self, collection: &str) -> Result<()> {
        check_names(std::iter::once(&collection.to_owned()))?;
        self.change_subscription(|wanted| {
            Ok(wanted.clone().map(|mut set| {
                set.insert(collection.to_owned());
                set
            }))
        })
        .await
    }

    /// Stops syncing `collection`. With `free`, its local documents go too
    /// (without ops: the server keeps them; documents with writes still
    /// pending stay, and watchers are not told); returns how many went.
    ///
    /// # Errors
    /// [`Error::Subscription`] while subscribed to every collection (name
    /// the ones to keep with [`Tide::set_collections`]), or a store error.
    pub async fn unsubscribe(&self, collection: &str, free: bool) -> Result<u64> {
        self.change_subscription(|wanted| match wanted {
            None => Err(Error::Subscription {
                message: format!(
                    "cannot unsubscribe from {collection:?} while syncing every collection; name the ones to keep                      with set_collections"
                ),
            }),
            Some(set) => {
                let mut set = set.clone();
                set.remove(collection);
                Ok(Some(set))
            }
        })
        .await?;
        if free { Ok(self.inner.store.free_collection(collection).await?) } else { Ok(0) }
    }

    /// Changes what is wanted to `change(wanted)`, saves it and wakes the
    /// background sync.
    async fn change_subscription(&self, change: impl FnOnce(&Set) -> Result<Set>) -> Result<()> {
        if self.inner.closed() {
            return Err(Error::Closed);
        }
        let mut subscription = self.inner.subscription.lock().await;
        let wanted = change(&subscription.wanted)?;
        if let Some(names) = &wanted {
            check_names(names.iter())?;
        }
        let mut changed = subscription.clone();
        changed.set_wanted(wanted);
        if changed != *subscription {
            self.inner.store.set_subscription(changed.to_text()).await?;
            *subscription = changed;
            self.inner.wake.notify_one();
        }
        Ok(())
    }

    /// Exactly one exchange: pushes a batch of the outbox and pulls one
    /// page (no catch-ups, put-backs or digest check); the report says
    /// what it did. For stepping through a sync by hand (`tide sync --once`).
    ///
    /// # Errors
    /// As [`Tide::sync_once`].
    pub async fn sync_one_exchange(&self) -> Result<SyncReport> {
        if self.inner.closed() {
            return Err(Error::Closed);
        }
        self.inner.sync(1).await
    }

    /// Syncs in the background: at once, on every local write (even one
    /// made during an exchange or a long-poll), on every remote change (a
    /// long-poll held by the server answers when one commits; against a
    /// server that does not hold polls, every `interval`), and after a
    /// failure with exponential backoff and jitter that honours `Retry-After`. Errors go
    /// to [`Tide::status`]. It stops when the handle is dropped or the Tide
    /// is closed.
    ///
    /// # Errors
    /// [`Error::NoTransport`] offline; [`Error::Closed`] after `close`.
    pub async fn sync_forever(&self, interval: Duration) -> Result<SyncHandle> {
        if self.inner.transport.is_none() {
            return Err(Error::NoTransport);
        }
        if self.inner.closed() {
            return Err(Error::Closed);
        }
        let (stop, rx) = watch::channel(false);
        let mut all = self.inner.stop.subscribe();
        let mut own = rx;
        let combined = {
            let (tx, combined) = watch::channel(false);
            tokio::spawn(async move {
                tokio::select! {
                    _ = all.changed() => {}
                    _ = own.changed() => {}
                }
                let _ = tx.send(true);
            });
            combined
        };
        let task = tokio::spawn(run_forever(Arc::clone(&self.inner), interval, combined));
        let mut loops = self.inner.loops.lock().await;
        loops.retain(|t| !t.is_finished());
        loops.push(task);
        self.inner.wake.notify_one();
        Ok(SyncHandle { stop })
    }

    /// The current sync status.
    pub fn status(&self) -> SyncStatus {
        self.inner.status.borrow().clone()
    }

    /// The sync status as it changes: the current status first, then each
    /// new one (a consumer that falls behind skips to the latest).
    pub fn watch_status(&self) -> StatusWatch {
        StatusWatch(tokio_stream::wrappers::WatchStream::new(self.inner.status.subscribe()))
    }

    /// The stored version of a document, tombstones included, with its stamp.
    ///
    /// # Errors
    /// A store failure.
    pub async fn version(&self, collection: &str, id: &str) -> Result<Option<tide_store::Version>> {
        Ok(self.inner.store.version(collection, id).await?)
    }

    /// How many ops wait in the outbox.
    ///
    /// # Errors
    /// A store failure.
    pub async fn pending_count(&self) -> Result<u64> {
        Ok(self.inner.store.pending_count().await?)
    }

    /// Waits until the server has acknowledged the local write with
    /// `stamp` (a write checkpoint: for a "saved" indicator, or a test that
    /// must not race the sync). Syncing happens as usual meanwhile (the
    /// background sync, or your own `sync_once`); this only waits.
    ///
    /// Cancel safe: dropping the future stops waiting and changes nothing.
    ///
    /// # Errors
    /// [`Error::Timeout`] if not acknowledged within `timeout` (the write
    /// stays pending); [`Error::Rejected`] if the server refused it; a store failure.
    pub async fn acknowledged(&self, stamp: &Stamp, timeout: Duration) -> Result<()> {
        let store = &self.inner.store;
        self.wait_until(timeout, || async {
            Ok(match store.write_state(stamp).await? {
                tide_store::WriteState::Pending => None,
                tide_store::WriteState::Acknowledged => Some(Ok(())),
                tide_store::WriteState::Rejected => Some(Err(Error::Rejected { count: 1 })),
            })
        })
        .await
    }

    /// The stamp the local write first stamped `stamp` carries now: itself,
    /// unless the store re-keyed (a copy of it was found) while the write was
    /// pending and stamped it anew. [`Tide::acknowledged`] follows it already.
    ///
    /// # Errors
    /// A store failure.
    pub async fn current_stamp(&self, stamp: &Stamp) -> Result<Stamp> {
        Ok(self.inner.store.current_stamp(stamp).await?)
    }

    /// Waits until the server has acknowledged every local write made
    /// before the call (see [`Tide::acknowledged`]).
    ///
    /// # Errors
    /// [`Error::Timeout`], [`Error::Rejected`] (with how many of those
    /// writes were refused; the others are acknowledged), or a store failure.
    pub async fn all_acknowledged(&self, timeout: Duration) -> Result<()> {
        let store = &self.inner.store;
        let Some((from, to)) = store.pending_range().await? else { return Ok(()) };
        self.wait_until(timeout, || async {
            Ok(match store.settled_in(from, to).await? {
                (0, 0) => Some(Ok(())),
                (0, count) => Some(Err(Error::Rejected { count })),
                _ => None,
            })
        })
        .await
    }

    /// Checks `done` after every sync until it answers, or `timeout` passes.
    async fn wait_until<F, Fut>(&self, timeout: Duration, done: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Result<()>>>>,
    {
        let mut syncs = self.inner.status.subscribe();
        let wait = async {
            loop {
                // Subscribed before looking, so a sync that ends in between wakes us.
                syncs.borrow_and_update();
                if let Some(outcome) = done().await? {
                    return outcome;
                }
                if syncs.changed().await.is_err() {
                    return Err(Error::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(Err(Error::Timeout { waited: timeout }))
    }

    /// The ops waiting in the outbox, oldest first, at most `limit`
    /// (capped at `tide_store::READ_ROWS_MAX`).
    ///
    /// # Errors
    /// A store failure.
    pub async fn pending(&self, limit: usize) -> Result<Vec<PendingOp>> {
        Ok(self.inner.store.pending(limit).await?)
    }

    /// The ops the server rejected, with why.
    ///
    /// # Errors
    /// A store failure.
    pub async fn rejected(&self) -> Result<Vec<RejectedOp>> {
        Ok(self.inner.store.rejected().await?)
    }

    /// Forgets a rejected op; the local document stays as it is.
    ///
    /// # Errors
    /// A store failure.
    pub async fn discard_rejected(&self, seq: u64) -> Result<()> {
        let removed = self.inner.store.discard_rejected(vec![seq]).await?;
        // Only a rejection that existed lowers the count.
        self.inner.status.send_modify(|s| s.rejected = s.rejected.saturating_sub(removed));
        Ok(())
    }

    /// Writes a rejected op again with a fresh stamp (which beats what the
    /// server holds) and forgets the rejection, in one transaction.
    ///
    /// # Errors
    /// A store failure; nothing changes if the seq is not a rejected op.
    pub async fn retry_rejected(&self, seq: u64) -> Result<Option<Stamp>> {
        // One transaction: a crash cannot leave the op both retried and rejected.
        let Some(stamp) = self.inner.store.retry_rejected(seq).await? else { return Ok(None) };
        self.inner.status.send_modify(|s| {
            s.rejected = s.rejected.saturating_sub(1);
            s.pending += 1;
        });
        self.inner.wake.notify_one();
        Ok(Some(stamp))
    }

    /// Stops background syncs, cancels an exchange in flight (its ops stay
    /// in the outbox: nothing is settled without a whole answer), ends the
    /// watch streams and closes the store.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Stored even with no receiver yet: an exchange about to start sees it.
        self.inner.stop.send_replace(true);
        let loops = std::mem::take(&mut *self.inner.loops.lock().await);
        for task in loops {
            let _ = task.await;
        }
        self.inner.hub.close();
        self.inner.store.close().await;
    }
}

/// Reads go through the store directly.
pub(crate) fn store(tide: &Tide) -> &Store {
    &tide.inner.store
}

/// A stream of [`SyncStatus`]es ([`Tide::watch_status`]): the current one
/// first, then each change, the latest when several came at once. It ends
/// when the Tide is dropped.
pub struct StatusWatch(tokio_stream::wrappers::WatchStream<SyncStatus>);

impl std::fmt::Debug for StatusWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWatch").finish_non_exhaustive()
    }
}

impl StatusWatch {
    /// The next status, or `None` once the Tide is gone.
    pub async fn next(&mut self) -> Option<SyncStatus> {
        use futures_core::Stream as _;
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.0).poll_next(cx)).await
    }

    /// The first status (the current one included) that satisfies `done`,
    /// or `None` if the Tide is gone first.
    pub async fn wait_for(&mut self, done: impl Fn(&SyncStatus) -> bool) -> Option<SyncStatus> {
        loop {
            let status = self.next().await?;
            if done(&status) {
                return Some(status);
            }
        }
    }
}

impl futures_core::Stream for StatusWatch {
    type Item = SyncStatus;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<SyncStatus>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx)
    }
}
