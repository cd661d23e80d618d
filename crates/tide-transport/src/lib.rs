//! tide-transport: the `Transport` trait, the hyper HTTP(S) transport and
//! the in-memory fake.
//!
//! A shell for now: issue #4 fills it. Layer rule: depends only on
//! tide-core; `hyper` never appears in its public signatures.
