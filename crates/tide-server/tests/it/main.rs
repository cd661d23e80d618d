//! tide-server's integration tests, one binary.

mod abuse;
mod access;
mod behaviour;
mod binary;
mod crash;
mod differential;
mod fuzz_twin;
mod jwt;
mod live;
mod ops;
mod original_client;
mod postgres;
mod recovery;
mod support;
mod validation;

#[path = "../common/mod.rs"]
mod common;

pub(crate) use common::service;
