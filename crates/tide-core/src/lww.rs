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

/// How far a namespace has collected its tombstones (PROTOCOL.md §14):
/// every tombstone with a seq at or below `seq` may be gone, and `stamp` is
/// the highest stamp among those removed.
///
/// A gone tombstone leaves one question only a rule can answer: a put for a
/// key with no stored version may be a new document, or an edit of a
/// document deleted and collected since. An op says which by its `base`,
/// the seq of the stored version its document was edited from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Horizon {
    /// Every tombstone at or below this seq may have been removed.
    pub seq: u64,
    /// The highest stamp among the tombstones removed; `None` before any.
    pub stamp: Option<Stamp>,
}

impl Horizon {
    /// Whether a put stamped `stamp`, edited from the version stored under
    /// `base`, lost to a delete that has been collected. `born` is `None`
    /// when the key has no stored version, else the horizon when its
    /// current incarnation was created on an empty key (0 for one never
    /// emptied). The base is from a gone incarnation when it is at or below
    /// the horizon for an absent key (the key held it and has since lost
    /// every trace of it), or at or below `born` for a key made again since
    /// (a known seq: 0 is one the client does not know). And the stamp is
    /// not above every collected tombstone (above them all, it would have
    /// beaten the delete by [`decide`]).
    pub fn deleted(&self, base: Option<u64>, stamp: &Stamp, born: Option<u64>) -> bool {
        let gone = match born {
            None => base.is_some_and(|b| b <= self.seq),
            Some(born) => base.is_some_and(|b| b > 0 && b <= born),
        };
        gone && self.stamp.as_ref().is_some_and(|h| stamp <= h)
    }

    /// Whether a client at `cursor` may hold a version whose deletion is
    /// gone: the horizon is past its cursor and past `fresh_at`, the head
    /// at which it last began from the start (`live_below` or `from_head`,
    /// 0 for neither). It must then start again from the beginning (`resync`).
    pub fn stale(&self, cursor: u64, fresh_at: u64) -> bool {
        self.seq > cursor.max(fresh_at)
    }

    /// The horizon after removing tombstones up to `seq`, the highest of
    /// them stamped `removed`.
    #[must_use]
    pub fn raised(&self, seq: u64, removed: Option<&Stamp>) -> Self {
        let stamp = match (&self.stamp, removed) {
            (Some(a), Some(b)) => Some(a.max(b).clone()),
            (a, b) => a.clone().or_else(|| b.cloned()),
        };
        Self { seq: self.seq.max(seq), stamp }
    }
}
