//! Watch streams: every local write and every applied remote change, to
//! the watchers whose filter matches, through bounded per-watcher queues.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tide_core::{Doc, Stamp};
use tokio::sync::mpsc;

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A write made through this Tide.
    Local,
    /// A change pulled from the server that replaced the local version.
    Remote,
    /// A local write the server rejected, put back to the server's version
    /// (`doc: None` when the server has none; the stamp is then the
    /// rejected write's).
    Reverted,
}

/// One change to one document.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// The collection.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The new document, or `None` for a deletion.
    pub doc: Option<Doc>,
    /// Local or remote.
    pub source: Source,
    /// The stamp of the write.
    pub stamp: Stamp,
}

impl ChangeEvent {
    /// The document as `T`, or `None` for a deletion.
    ///
    /// # Errors
    /// The serde error if the document does not fit `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, serde_json::Error> {
        self.doc.as_ref().map(tide_core::Doc::decode).transpose()
    }
}

/// An item of a [`Watch`] stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A change.
    Change(ChangeEvent),
    /// The watcher fell behind and this many changes were dropped; re-read
    /// what it shows to catch up.
    Lagged {
        /// How many changes were not delivered.
        missed: u64,
    },
}

/// What a watcher wants to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    All,
    Collection(String),
    Document(String, String),
}

impl Filter {
    fn matches(&self, e: &ChangeEvent) -> bool {
        match self {
            Self::All => true,
            Self::Collection(c) => *c == e.collection,
            Self::Document(c, id) => *c == e.collection && *id == e.id,
        }
    }
}

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<ChangeEvent>,
    missed: Arc<AtomicU64>,
}

/// The set of watchers; emitting never blocks and never grows memory.
#[derive(Default)]
pub(crate) struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl Hub {
    pub(crate) fn subscribe(&self, filter: Filter, capacity: usize) -> Watch {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let missed = Arc::new(AtomicU64::new(0));
        self.lock().push(Subscriber { filter, tx, missed: Arc::clone(&missed) });
        Watch { rx, missed }
    }

    pub(crate) fn emit(&self, event: &ChangeEvent) {
        self.lock().retain(|s| {
            if !s.filter.matches(event) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.missed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Ends every watch stream (after what is queued).
    pub(crate) fn close(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A stream of [`WatchEvent`]s, registered when it was created: no change
/// made after that is missed, except those reported as
/// [`WatchEvent::Lagged`] when the consumer falls more than the buffer
/// behind. It ends when the Tide is closed.
pub struct Watch {
    rx: mpsc::Receiver<ChangeEvent>,
    missed: Arc<AtomicU64>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// The next event, or `None` once the Tide is closed and the queue is
    /// drained.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next event if one is queued now.
    pub(crate) fn try_next(&mut self) -> Option<WatchEvent> {
        let missed = self.missed.swap(0, Ordering::Relaxed);
        if missed > 0 {
            return Some(WatchEvent::Lagged { missed });
        }
        self.rx.try_recv().ok().map(WatchEvent::Change)
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let missed = self.missed.swap(0, Ordering::Relaxed);
        if missed > 0 {
            return Poll::Ready(Some(WatchEvent::Lagged { missed }));
        }
        self.rx.poll_recv(cx).map(|e| e.map(WatchEvent::Change))
    }
}

impl futures_core::Stream for Watch {
    type Item = WatchEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.get_mut().poll_event(cx)
    }
}

/// One change to a document of a typed collection, its document read as `T`.
#[derive(Debug)]
pub struct Changed<T> {
    /// The document id.
    pub id: String,
    /// The new document as `T`, `None` for a deletion, or the error of a
    /// document that is not a `T` (reported here, per change; the stream
    /// goes on).
    pub value: Result<Option<T>, crate::Error>,
    /// Local or remote.
    pub source: Source,
    /// The stamp of the write.
    pub stamp: Stamp,
}

/// An item of a [`TypedWatch`] stream.
#[derive(Debug)]
pub enum TypedEvent<T> {
    /// A change.
    Change(Changed<T>),
    /// The watcher fell behind and this many changes were dropped; re-read
    /// the collection to catch up.
    Lagged {
        /// How many changes were not delivered.
        missed: u64,
    },
}

/// A [`Watch`] of one typed collection (`Collection::watch`), whose events
/// carry the documents read as `T`.
pub struct TypedWatch<T> {
    inner: Watch,
    _of: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedWatch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedWatch").finish_non_exhaustive()
    }
}

impl<T: serde::de::DeserializeOwned> TypedWatch<T> {
    pub(crate) fn new(inner: Watch) -> Self {
        Self { inner, _of: std::marker::PhantomData }
    }

    /// The next event, or `None` once the Tide is closed and the queue is
    /// drained.
    pub async fn next(&mut self) -> Option<TypedEvent<T>> {
        std::future::poll_fn(|cx| self.poll_typed(cx)).await
    }

    fn poll_typed(&mut self, cx: &mut Context<'_>) -> Poll<Option<TypedEvent<T>>> {
        self.inner.poll_event(cx).map(|event| {
            event.map(|event| match event {
                WatchEvent::Lagged { missed } => TypedEvent::Lagged { missed },
                WatchEvent::Change(c) => {
                    let value = c.decode::<T>().map_err(|source| crate::Error::Decode {
                        collection: c.collection.clone(),
                        id: c.id.clone(),
                        source,
                    });
                    TypedEvent::Change(Changed { id: c.id, value, source: c.source, stamp: c.stamp })
                }
            })
        })
    }
}

impl<T: serde::de::DeserializeOwned> futures_core::Stream for TypedWatch<T> {
    type Item = TypedEvent<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TypedEvent<T>>> {
        self.get_mut().poll_typed(cx)
    }
}
