//! The client's one error type.

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The local store failed (see [`tide_store::Error`] for what to do).
    #[error(transparent)]
    Store(#[from] tide_store::Error),
    /// An exchange with the server failed; the outbox is kept.
    /// [`tide_transport::Error::is_retryable`] says whether to try again.
    #[error(transparent)]
    Transport(#[from] tide_transport::Error),
    /// A value to write did not serialize to a JSON object (documents are
    /// JSON objects).
    #[error("cannot store {collection}/{id}: {message}")]
    Encode {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// Why.
        message: String,
    },
    /// A stored document does not deserialize into the collection's type.
    #[error("cannot read {collection}/{id} as the collection's type: {source}")]
    Decode {
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The Tide has no transport: it was opened offline-only.
    #[error("no transport configured: open with an endpoint or a transport to sync")]
    NoTransport,
    /// The Tide was closed.
    #[error("tide is closed")]
    Closed,
    /// A wait for the server's acknowledgement ran out of time; the writes
    /// stay pending and will still be sent.
    #[error("not acknowledged by the server within {waited:?}")]
    Timeout {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// A subscription the client cannot take: an invalid collection name,
    /// or unsubscribing from one collection while subscribed to every one.
    #[error("subscription: {message}")]
    Subscription {
        /// Why.
        message: String,
    },
    /// The server refused writes that were waited for; they are in
    /// [`crate::Tide::rejected`] and their documents were put back.
    #[error("{count} write(s) rejected by the server")]
    Rejected {
        /// How many of the writes waited for were rejected.
        count: u64,
    },
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
