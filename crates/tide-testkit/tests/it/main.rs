//! tide-testkit's integration tests, one binary.

mod layering;
