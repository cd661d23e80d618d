//! Local queries on a collection, and live queries that follow them.

use std::collections::HashSet;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use tide_core::Doc;
pub use tide_store::{Field, Filter, QueryCursor, field};

use crate::collection::Collection;
use crate::error::{Error, Result};
use crate::tide::store;
use crate::watch::{Watch, WatchEvent};

/// A query on a collection's documents (see [`Collection::query`]): a
/// filter on their fields, an order, a limit and a keyset cursor. What a
/// filter and an order mean is in [`tide_store::Filter`]'s module: values
/// compare within one kind, ties go by id.
pub struct Query<T> {
    collection: Collection<T>,
    query: tide_store::Query,
}

impl<T> Clone for Query<T> {
    fn clone(&self) -> Self {
        Self { collection: self.collection.clone(), query: self.query.clone() }
    }
}

impl<T> std::fmt::Debug for Query<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.query.fmt(f)
    }
}

/// A page of a query: documents read as `T`, in order, and where the next
/// page starts when this one is full.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage<T> {
    /// The documents with their ids.
    pub docs: Vec<(String, T)>,
    /// The cursor of the next page (`None`: this was the last).
    pub next: Option<QueryCursor>,
}

impl<T> Query<T> {
    pub(crate) fn new(collection: Collection<T>) -> Self {
        let query = tide_store::Query::new(collection.name());
        Self { collection, query }
    }

    /// Only documents matching `filter` (with any filter given before).
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.query = self.query.filter(filter);
        self
    }

    /// Then ordered by `field`, ascending.
    #[must_use]
    pub fn order_by(mut self, field: Field) -> Self {
        self.query = self.query.order_by(field);
        self
    }

    /// Then ordered by `field`, descending.
    #[must_use]
    pub fn order_by_desc(mut self, field: Field) -> Self {
        self.query = self.query.order_by_desc(field);
        self
    }

    /// At most `n` documents (default `tide_store::QUERY_LIMIT_DEFAULT`,
    /// capped at `tide_store::QUERY_LIMIT_MAX`).
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.query = self.query.limit(n);
        self
    }

    /// The page after `cursor`, from a [`QueryPage::next`] of this query.
    #[must_use]
    pub fn after(mut self, cursor: QueryCursor) -> Self {
        self.query = self.query.after(cursor);
        self
    }

    /// How many documents match (order, limit and cursor aside).
    ///
    /// # Errors
    /// A query that cannot run ([`tide_store::Error::InvalidQuery`]), or a store failure.
    pub async fn count(&self) -> Result<u64> {
        Ok(store(self.collection.tide()).query_count(&self.query).await?)
    }

    /// SQLite's plan for it, to check that an index serves it.
    ///
    /// # Errors
    /// As [`Query::count`].
    pub async fn plan(&self) -> Result<Vec<String>> {
        Ok(store(self.collection.tide()).query_plan(&self.query).await?)
    }
}

impl<T: DeserializeOwned> Query<T> {
    /// The matching documents, in order, read in one snapshot of the store.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tide_client::Error> {
    /// use tide_client::{Tide, field};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Task { title: String, status: String, due: u32 }
    ///
    /// let tide = Tide::builder().open().await?;
    /// let tasks = tide.collection::<Task>("tasks");
    /// tasks.create_index([field("status"), field("due")]).await?;
    /// for (id, status, due) in [("a", "open", 3), ("b", "done", 1), ("c", "open", 2)] {
    ///     tasks.put(id, &Task { title: id.into(), status: status.into(), due }).await?;
    /// }
    /// let open = tasks.query().filter(field("status").eq("open")).order_by(field("due"));
    /// let page = open.fetch().await?;
    /// assert_eq!(page.docs.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["c", "a"]);
    /// assert_eq!(open.count().await?, 2);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Query::count`], or [`Error::Decode`] for a document that is not a `T`.
    pub async fn fetch(&self) -> Result<QueryPage<T>> {
        let page = store(self.collection.tide()).query(&self.query).await?;
        Ok(QueryPage { docs: self.collection.decode_all(&page.docs)?, next: page.next })
    }

    /// The query's result now and again whenever a change alters it (see
    /// [`LiveQuery`]).
    ///
    /// # Errors
    /// As [`Query::count`], for the first result.
    pub async fn watch(&self) -> Result<LiveQuery<T>> {
        let tide = self.collection.tide().clone();
        // Registered before the first read: no change after it is missed.
        let changes = tide.watch_filtered(crate::watch::Filter::Collection(self.collection.name().to_owned()));
        let first = store(&tide).query(&self.query).await?.docs;
        let (tx, mut rx) = tokio::sync::watch::channel((1u64, Arc::new(first)));
        rx.mark_changed();
        let follower = Follower { store: store(&tide).clone(), query: self.query.clone().from_start(), changes, tx };
        let task = tokio::spawn(follower.run());
        Ok(LiveQuery { collection: self.collection.clone(), rx, seen: 0, task })
    }
}

/// One result of a [`LiveQuery`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueryUpdate<T> {
    /// The documents now matching, in order.
    pub docs: Vec<(String, T)>,
    /// How many results were replaced by a newer one before this was read
    /// (a consumer slower than the changes sees only the latest).
    pub missed: u64,
}

/// A query's result, now and after every change that alters it.
///
/// The first [`LiveQuery::next`] returns the result at once. Later ones wait
/// for a local or remote change that can alter it (a document that matches,
/// or that was in the result), read the query again in one snapshot, and
/// return only if the result differs: a burst of changes (a page of 1,000
/// remote changes) gives one update. It holds one result at a time, so it
/// never grows: a consumer that falls behind gets the latest with
/// [`QueryUpdate::missed`]. It ends when the Tide closes; dropping it stops
/// the work.
pub struct LiveQuery<T> {
    collection: Collection<T>,
    rx: tokio::sync::watch::Receiver<Versioned>,
    seen: u64,
    task: tokio::task::JoinHandle<()>,
}

impl<T> std::fmt::Debug for LiveQuery<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuery").field("collection", &self.collection.name()).finish_non_exhaustive()
    }
}

impl<T> Drop for LiveQuery<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: DeserializeOwned> LiveQuery<T> {
    /// The next result: at once the first time, then when it changes;
    /// `None` once the Tide is closed.
    ///
    /// # Errors
    /// [`Error::Decode`] for a document that is not a `T` (the stream goes on).
    pub async fn next(&mut self) -> Option<Result<QueryUpdate<T>>> {
        self.rx.changed().await.ok()?;
        let (version, docs) = {
            let current = self.rx.borrow_and_update();
            (current.0, Arc::clone(&current.1))
        };
        let missed = version.saturating_sub(self.seen + 1);
        self.seen = version;
        Some(self.collection.decode_all(&docs).map(|docs| QueryUpdate { docs, missed }))
    }
}

/// A live query's result and its version (1 for the first).
type Versioned = (u64, Arc<Vec<(String, Doc)>>);

/// The task behind a [`LiveQuery`].
struct Follower {
    store: tide_store::Store,
    query: tide_store::Query,
    changes: Watch,
    tx: tokio::sync::watch::Sender<Versioned>,
}

impl Follower {
    async fn run(mut self) {
        let (mut version, mut current) = {
            let first = self.tx.borrow();
            (first.0, Arc::clone(&first.1))
        };
        loop {
            let Some(event) = self.changes.next().await else { return };
            let ids: HashSet<&str> = current.iter().map(|(id, _)| id.as_str()).collect();
            let mut relevant = self.alters(&event, &ids);
            // Everything already queued with it (a page, a burst) is one update.
            tokio::task::yield_now().await;
            while let Some(event) = self.changes.try_next() {
                relevant |= self.alters(&event, &ids);
            }
            if !relevant {
                continue;
            }
            let docs = match self.store.query(&self.query).await {
                Ok(page) => page.docs,
                Err(e) => {
                    tracing::warn!(error = %e, "a live query could not be read again; it ends");
                    return;
                }
            };
            if docs != *current {
                version += 1;
                current = Arc::new(docs);
                if self.tx.send((version, Arc::clone(&current))).is_err() {
                    return;
                }
            }
        }
    }

    /// Whether `event` can alter a result holding `ids`.
    fn alters(&self, event: &WatchEvent, ids: &HashSet<&str>) -> bool {
        match event {
            WatchEvent::Lagged { .. } => true,
            WatchEvent::Change(c) => {
                ids.contains(c.id.as_str())
                    || c.doc.as_ref().is_some_and(|d| {
                        serde_json::from_str::<serde_json::Value>(d.as_str()).is_ok_and(|v| self.query.matches(&v))
                    })
            }
        }
    }
}

impl<T: DeserializeOwned> Collection<T> {
    /// A query on this collection: every document in id order until
    /// filtered, ordered or limited.
    pub fn query(&self) -> Query<T> {
        Query::new(self.clone())
    }

    fn decode_all(&self, docs: &[(String, Doc)]) -> Result<Vec<(String, T)>> {
        docs.iter()
            .map(|(id, doc)| {
                let value = doc.decode().map_err(|source| Error::Decode {
                    collection: self.name().to_owned(),
                    id: id.clone(),
                    source,
                })?;
                Ok((id.clone(), value))
            })
            .collect()
    }
}

impl<T> Collection<T> {
    /// Declares an index on `fields` of this collection (kept in the store
    /// across restarts), so queries that filter on its leading fields or
    /// order by them read the index instead of every document. Building it
    /// reads the whole table once; local writes and syncs wait meanwhile.
    ///
    /// # Errors
    /// A bad field path or more than `tide_store::QUERY_ORDER_FIELDS_MAX`
    /// fields ([`tide_store::Error::InvalidQuery`]), or a store failure.
    pub async fn create_index(&self, fields: impl IntoIterator<Item = Field>) -> Result<()> {
        let fields: Vec<Field> = fields.into_iter().collect();
        Ok(store(self.tide()).create_index(self.name(), &fields).await?)
    }

    /// Drops the index declared on `fields`, if any.
    ///
    /// # Errors
    /// As [`Collection::create_index`].
    pub async fn drop_index(&self, fields: impl IntoIterator<Item = Field>) -> Result<()> {
        let fields: Vec<Field> = fields.into_iter().collect();
        Ok(store(self.tide()).drop_index(self.name(), &fields).await?)
    }
}
