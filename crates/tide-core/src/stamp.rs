//! Stamps, their total order, and the Lamport clock that issues them.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The largest counter a stamp may carry: 2^53 − 1, so every JSON client
/// (including JavaScript's doubles) reads every counter exactly.
pub const LAMPORT_MAX: u64 = (1 << 53) - 1;

/// The version of one write: a Lamport counter and the id of the node that
/// wrote it.
///
/// Stamps are totally ordered: the higher `lamport` wins; on a tie the
/// `node_id` that is greater when compared bytewise wins (the derived `Ord`
/// compares the fields in declaration order, and `String` compares bytes).
/// On the wire a stamp is not an object: it is the two flat fields `lamport`
/// and `node_id` of an op or a change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// The Lamport counter, `0..=LAMPORT_MAX`.
    pub lamport: u64,
    /// The writer's node id.
    pub node_id: String,
}

impl Stamp {
    /// A stamp from its two parts.
    pub fn new(lamport: u64, node_id: impl Into<String>) -> Self {
        Self { lamport, node_id: node_id.into() }
    }
}

/// A Lamport clock: ticks on every local write, observes every counter it
/// receives, and never issues the same counter twice.
///
/// It holds no node id and no storage: the caller seeds it from persisted
/// state (the largest counter it has ever issued or seen) and persists each
/// ticked value in the same transaction as the write that carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LamportClock {
    counter: u64,
}

impl LamportClock {
    /// A clock that has issued or seen counters up to `seed`.
    ///
    /// # Errors
    /// [`Error::LamportOutOfRange`] if `seed` is above [`LAMPORT_MAX`].
    pub fn new(seed: u64) -> Result<Self, Error> {
        if seed > LAMPORT_MAX {
            return Err(Error::LamportOutOfRange { lamport: seed });
        }
        Ok(Self { counter: seed })
    }

    /// The largest counter issued or observed so far.
    pub fn value(&self) -> u64 {
        self.counter
    }

    /// Issues the counter for a new local write: one more than anything
    /// issued or observed before.
    ///
    /// # Errors
    /// [`Error::LamportExhausted`] once the counter has reached [`LAMPORT_MAX`].
    pub fn tick(&mut self) -> Result<u64, Error> {
        if self.counter >= LAMPORT_MAX {
            return Err(Error::LamportExhausted);
        }
        self.counter += 1;
        Ok(self.counter)
    }

    /// Takes note of a counter received from elsewhere, so the next local
    /// write beats it.
    ///
    /// # Errors
    /// [`Error::LamportOutOfRange`] if `lamport` is above [`LAMPORT_MAX`];
    /// the clock is left unchanged, so one bad peer cannot exhaust it.
    pub fn observe(&mut self, lamport: u64) -> Result<(), Error> {
        if lamport > LAMPORT_MAX {
            return Err(Error::LamportOutOfRange { lamport });
        }
        self.counter = self.counter.max(lamport);
        Ok(())
    }
}
