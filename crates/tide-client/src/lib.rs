//! tide-client: collections, watch streams and the sync loop, composed from
//! tide-store and tide-transport.
//!
//! A shell for now: issue #6 fills it. Layer rule: depends on tide-core,
//! tide-store and tide-transport only.
