//! tide-server: the hyper sync server, its storage backends, and the
//! `tide-server` binary.
//!
//! A shell for now: issue #5 fills it. Layer rule: depends on tide-core
//! only among tide crates.
