//! tide-store: the client's durable local store and outbox on sqlx SQLite.
//!
//! A shell for now: issue #3 fills it. Layer rule: depends only on
//! tide-core; `sqlx` never appears in its public signatures.
