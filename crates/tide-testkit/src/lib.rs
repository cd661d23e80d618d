//! tide-testkit: the harness that runs tide's clients and servers together
//! under faults, for tide's own tests and for its users'.
//!
//! A shell for now: issue #8 fills it. Layer rule: may depend on every tide
//! crate, and is itself only ever a dev-dependency.
