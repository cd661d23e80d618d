//! Typed collections: documents of one serde type under one name.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tide_core::{Doc, Payload, Stamp};
use tide_store::Write;

use crate::error::{Error, Result};
use crate::tide::{Tide, store, to_doc};
use crate::watch::{Filter, TypedWatch};

/// Default page size of [`Collection::list`].
pub const LIST_LIMIT_DEFAULT: usize = 100;

/// The documents of one collection, as values of `T`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tide_client::Error> {
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Todo { text: String, done: bool }
///
/// let tide = tide_client::Tide::builder().open().await?;
/// let todos = tide.collection::<Todo>("todos");
/// todos.put("t1", &Todo { text: "water the plants".into(), done: false }).await?;
/// todos.put("t2", &Todo { text: "buy bread".into(), done: true }).await?;
/// todos.delete("t2").await?;
/// assert_eq!(todos.count().await?, 1);
/// let first_page = todos.list(None, 50).await?;
/// assert_eq!(first_page[0].1.text, "water the plants");
/// assert_eq!(todos.get("t2").await?, None);
/// # Ok(()) }
/// ```
pub struct Collection<T> {
    tide: Tide,
    name: String,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        Self { tide: self.tide.clone(), name: self.name.clone(), _type: PhantomData }
    }
}

impl<T> std::fmt::Debug for Collection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<T> Collection<T> {
    pub(crate) fn new(tide: Tide, name: &str) -> Self {
        Self { tide, name: name.to_owned(), _type: PhantomData }
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn tide(&self) -> &Tide {
        &self.tide
    }

    /// Deletes a document (a tombstone syncs, so the delete reaches every replica).
    ///
    /// # Errors
    /// An invalid id or a store failure.
    pub async fn delete(&self, id: &str) -> Result<Stamp> {
        let write = Write { collection: self.name.clone(), id: id.into(), payload: Payload::Delete };
        Ok(self.tide.inner().write(vec![write]).await?.remove(0))
    }

    /// Whether the document has local writes the server has not
    /// acknowledged yet (see also [`crate::Tide::acknowledged`]).
    ///
    /// # Errors
    /// A store failure.
    pub async fn has_pending(&self, id: &str) -> Result<bool> {
        Ok(crate::tide::store(&self.tide).has_pending(&self.name, id).await?)
    }

    /// The document `id` as stored (its canonical JSON text), or `None` if
    /// absent or deleted: [`Collection::get`] without decoding it.
    ///
    /// # Errors
    /// A store failure.
    pub async fn get_doc(&self, id: &str) -> Result<Option<Doc>> {
        Ok(store(&self.tide).get(&self.name, id).await?)
    }

    /// Live documents as stored, ordered by id: [`Collection::list`]
    /// without decoding them.
    ///
    /// # Errors
    /// A store failure.
    pub async fn list_docs(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, Doc)>> {
        Ok(store(&self.tide).list(&self.name, after, limit).await?)
    }

    /// How many live documents the collection holds.
    ///
    /// # Errors
    /// A store failure.
    pub async fn count(&self) -> Result<u64> {
        Ok(store(&self.tide).count(&self.name).await?)
    }
}

impl<T: Serialize> Collection<T> {
    /// Puts a whole document (insert or replace).
    ///
    /// # Errors
    /// [`Error::Encode`] if `value` is not a JSON object; an invalid id or
    /// document; a store failure.
    pub async fn put(&self, id: &str, value: &T) -> Result<Stamp> {
        let doc = to_doc(&self.name, id, value)?;
        let write = Write { collection: self.name.clone(), id: id.into(), payload: Payload::Put(doc) };
        Ok(self.tide.inner().write(vec![write]).await?.remove(0))
    }
}

impl<T: DeserializeOwned> Collection<T> {
    /// Changes to this collection from now on, each document read as `T`
    /// (a document that is not a `T` is reported in its own event).
    pub fn watch(&self) -> TypedWatch<T> {
        TypedWatch::new(self.tide.watch_filtered(Filter::Collection(self.name.clone())))
    }

    /// Changes to one document from now on, read as `T`.
    pub fn watch_doc(&self, id: &str) -> TypedWatch<T> {
        TypedWatch::new(self.tide.watch_filtered(Filter::Document(self.name.clone(), id.to_owned())))
    }

    fn decode(&self, id: &str, doc: &tide_core::Doc) -> Result<T> {
        doc.decode().map_err(|source| Error::Decode { collection: self.name.clone(), id: id.into(), source })
    }

    /// The document `id`, or `None` if absent or deleted.
    ///
    /// # Errors
    /// [`Error::Decode`] if it does not fit `T`; a store failure.
    pub async fn get(&self, id: &str) -> Result<Option<T>> {
        match self.get_doc(id).await? {
            Some(doc) => Ok(Some(self.decode(id, &doc)?)),
            None => Ok(None),
        }
    }

    /// Live documents ordered by id: at most `limit` after the id `after`
    /// (pass the last id of one page to get the next).
    ///
    /// # Errors
    /// [`Error::Decode`] if one does not fit `T`; a store failure.
    pub async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, T)>> {
        let rows = self.list_docs(after, limit).await?;
        rows.into_iter().map(|(id, doc)| Ok((id.clone(), self.decode(&id, &doc)?))).collect()
    }
}
