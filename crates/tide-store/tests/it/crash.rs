//! Crash tests: see below.
