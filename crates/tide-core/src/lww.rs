//! The last-writer-wins rule: one total, deterministic decision used by the
//! client, the server and the reference model alike.

use crate::{Payload, Stamp};

/// What to do with an incoming write, given what is stored for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The incoming stamp beats the stored one (or nothing is stored): store it.
    Apply,
    /// The same stamp with the same payload is already stored: an
    /// acknowledgement, nothing to change.
    Duplicate,
    /// A higher stamp is already stored: the incoming write lost, and that is
    /// not an error.
    Superseded,
    /// The same stamp with a different payload is stored: two writers share a
    /// node id. Never dropped silently; the write is rejected.
    Collision,
}

impl Decision {
    /// Whether a server that reaches this decision acknowledges the op, so
    /// the client may remove it from its outbox.
    pub fn is_ack(self) -> bool {
        !matches!(self, Self::Collision)
    }
}

/// Decides an incoming write `(stamp, payload)` against the stored version
/// of the same key, if any.
///
/// Total and deterministic: it depends on nothing but its arguments.
pub fn decide(stored: Option<(&Stamp, &Payload)>, stamp: &Stamp, payload: &Payload) -> Decision {
    let Some((stored_stamp, stored_payload)) = stored else {
        return Decision::Apply;
    };
    if wins(stamp, Some(stored_stamp)) {
        return Decision::Apply;
    }
    match stamp.cmp(stored_stamp) {
        std::cmp::Ordering::Greater => unreachable!("a greater stamp wins"),
        std::cmp::Ordering::Less => Decision::Superseded,
        // The same version exactly: the same document text, keys in the same order.
        std::cmp::Ordering::Equal if payload == stored_payload => Decision::Duplicate,
        std::cmp::Ordering::Equal => Decision::Collision,
    }
}

/// Whether a write stamped `stamp` replaces the stored version stamped
/// `stored`: exactly when [`decide`] says [`Decision::Apply`]. It needs no
/// payloads, so a replica can decide from stamps alone.
pub fn wins(stamp: &Stamp, stored: Option<&Stamp>) -> bool {
    stored.is_none_or(|stored| stamp > stored)
}
