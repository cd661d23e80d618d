//! tide-testkit's integration tests, one binary: the layering rule, the
//! seeded simulator, and network faults over real hyper code.

mod layering;
mod network;
mod simulation;
