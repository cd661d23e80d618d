//! The reference model of one namespace on a sync server: the oracle that
//! the fake transport serves from and every convergence test checks against.
//!
//! It is the semantics of PROTOCOL.md in a few lines of plain Rust, with no
//! storage, no time and no I/O; real servers must agree with it on every
//! per-op result and every page.

use std::collections::BTreeMap;

use crate::digest::{self, DigestTree};
use crate::limits::json_len;
use crate::lww::{Decision, Horizon, decide};
use crate::wire::{Change, Cursor, ErrorCode, Op, OpResult, Payload, SyncRequest, SyncResponse, Verify, Violation};
use crate::{Limits, Stamp};

/// What a server answers for `op` once `decide` has said `decision`:
/// `seq` is the seq it was stored under (for [`Decision::Apply`]) and
/// `winner` the stamp now stored (for [`Decision::Superseded`]). Every
/// backend answers through this one function.
pub fn op_result(decision: Decision, op: &Op, winner: Option<&Stamp>, seq: u64) -> OpResult {
    match decision {
        Decision::Apply => OpResult::Applied { seq },
        Decision::Duplicate => OpResult::Duplicate,
        Decision::Superseded => {
            let winner = winner.expect("superseded implies a stored version");
            OpResult::Superseded { lamport: winner.lamport, node_id: winner.node_id.clone() }
        }
        Decision::Collision => OpResult::Rejected {
            code: ErrorCode::StampCollision,
            message: format!(
                "stamp ({}, {:?}) is already stored with a different payload; two writers share node id {:?}",
                op.stamp.lamport, op.stamp.node_id, op.stamp.node_id
            ),
        },
    }
}

/// A document's key: `(collection, id)`.
pub type Key = (String, String);

/// The stored version of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The stamp of the write that won.
    pub stamp: Stamp,
    /// The document, or a tombstone.
    pub payload: Payload,
    /// The seq this version was stored under.
    pub seq: u64,
    /// The horizon when this key was last written while it had no stored
    /// version (its incarnation's start; 0 if never, PROTOCOL.md §14).
    pub born: u64,
}

/// One page of changes after a cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The changes, in ascending seq.
    pub changes: Vec<Change>,
    /// Every seq at or below it has been examined.
    pub cursor: Cursor,
    /// Whether changes remain after `cursor`.
    pub has_more: bool,
}

/// The server's state for one namespace: one row per key, and a global seq
/// that moves only when an op is applied.
#[derive(Debug, Clone, Default)]
pub struct Model {
    limits: Limits,
    rows: BTreeMap<Key, Row>,
    by_seq: BTreeMap<u64, Key>,
    seq: u64,
    lamport_max: u64,
    digest: DigestTree,
    /// Per node id: its chain of write exchanges (§13).
    chains: BTreeMap<String, crate::Chain>,
    /// How far tombstones have been collected (§14).
    horizon: Horizon,
}

impl Model {
    /// An empty namespace enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// The limits this model enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The highest seq issued so far (0 before the first applied op).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The highest counter seen in any valid op.
    pub fn lamport_max(&self) -> u64 {
        self.lamport_max
    }

    /// The stored version of a key, tombstones included.
    pub fn row(&self, collection: &str, id: &str) -> Option<&Row> {
        self.rows.get(&(collection.to_owned(), id.to_owned()))
    }

    /// How far tombstones have been collected.
    pub fn horizon(&self) -> &Horizon {
        &self.horizon
    }

    /// Removes every tombstone with a seq at or below `upto` (at most the
    /// head) and raises the horizon to it; returns how many were removed.
    pub fn collect(&mut self, upto: u64) -> usize {
        let upto = upto.min(self.seq);
        if upto <= self.horizon.seq {
            return 0;
        }
        let gone: Vec<u64> = self
            .by_seq
            .range(self.horizon.seq + 1..=upto)
            .filter(|(_, key)| self.rows[*key].payload.doc().is_none())
            .map(|(&seq, _)| seq)
            .collect();
        let mut highest: Option<Stamp> = None;
        for seq in &gone {
            let key = self.by_seq.remove(seq).expect("listed above");
            let row = self.rows.remove(&key).expect("every seq has its row");
            highest = Some(highest.map_or(row.stamp.clone(), |h| h.max(row.stamp)));
        }
        self.horizon = self.horizon.raised(upto, highest.as_ref());
        gone.len()
    }

    /// Every stored row in key order, tombstones included.
    pub fn rows(&self) -> impl Iterator<Item = (&Key, &Row)> {
        self.rows.iter()
    }

    /// One sync exchange: validate every op (all or nothing), apply them in
    /// order, then answer with a page of changes after the request's cursor.
    ///
    /// The model never waits: a `wait` in the request is ignored.
    pub fn exchange(&mut self, req: &SyncRequest) -> Result<SyncResponse, Violation> {
        self.limits.check_request(req)?;
        let lead_bound = self.lamport_max.saturating_add(self.limits.lamport_lead_max);
        if let Some(i) = req.ops.iter().position(|op| op.stamp.lamport > lead_bound) {
            return Err(Violation::new(
                ErrorCode::LamportOutOfRange,
                format!(
                    "lamport {} is more than {} ahead of the highest counter seen ({})",
                    req.ops[i].stamp.lamport, self.limits.lamport_lead_max, self.lamport_max
                ),
            )
            .at_op(i));
        }
        if let (Some(lineage), false) = (&req.lineage, req.ops.is_empty()) {
            let chain = self.chains.get(&req.node_id);
            if !lineage.continues(chain) {
                return Err(crate::Lineage::conflict(&req.node_id));
            }
            let next = lineage.advance(chain);
            self.chains.insert(req.node_id.clone(), next);
        }
        let results = req
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| self.apply_based(op, req.bases.get(i).copied().flatten()))
            .collect();

        let requested = req.cursor.unwrap_or_default();
        let reset = requested.seq() > self.seq;
        let fresh_at = req.live_below.max(req.from_head).unwrap_or(0);
        let resync = !reset && self.horizon.stale(requested.seq(), fresh_at);
        let (from, own) = if reset {
            (Cursor::START, None)
        } else if resync {
            // Its own writes it holds (if it had a cursor), whatever else it missed.
            (Cursor::START, (requested > Cursor::START).then_some(req.node_id.as_str()))
        } else {
            // A client past the start already holds its own accepted writes;
            // a fresh one (no cursor) gets them, so a wiped store recovers.
            (requested, (requested > Cursor::START).then_some(req.node_id.as_str()))
        };
        let limit = req.limit.map_or(usize::MAX, |l| l as usize).clamp(1, self.limits.changes_per_response_max);
        let page = self.page_of(from, own, (req.live_below, req.collections.as_deref()), limit);
        let settled = page.changes.is_empty() && !page.has_more && !reset && !resync;
        let mut resp = SyncResponse {
            cursor: page.cursor,
            changes: page.changes,
            results,
            has_more: page.has_more,
            reset,
            head: (req.live_below.is_some() || resync).then_some(self.seq),
            horizon: (self.horizon.seq > 0).then_some(self.horizon.seq),
            resync,
            request_id: req.request_id.clone(),
            ..SyncResponse::new(Cursor::START)
        };
        self.verify(req, settled, &mut resp);
        Ok(resp)
    }

    /// The answer of a server that read the request's page before it
    /// applied the ops, as PROTOCOL.md §4.2 allows for a request where
    /// [`SyncRequest::page_beside_ops`] holds: the page of the state before
    /// them, and, when it ended the log, its cursor moved past the
    /// request's own writes if they are all that came after. A page that
    /// starts over from the beginning is read after them. The state moves
    /// on exactly as with [`Model::exchange`].
    pub fn exchange_beside(&mut self, req: &SyncRequest) -> Result<SyncResponse, Violation> {
        if !req.page_beside_ops() {
            return self.exchange(req);
        }
        let mut before = self.clone();
        let after = self.exchange(req)?;
        let read = SyncRequest { ops: Vec::new(), bases: Vec::new(), ..req.clone() };
        let page = before.exchange(&read)?;
        if page.reset || page.resync {
            return Ok(after);
        }
        let cursor = if page.has_more { page.cursor } else { req.cursor_past_own(page.cursor, &after.results) };
        Ok(SyncResponse { cursor, results: after.results, ..page })
    }

    /// The digest tree of the live documents.
    pub fn digest(&self) -> &DigestTree {
        &self.digest
    }

    /// Answers the digest and fetch extensions of a request (§12).
    fn verify(&self, req: &SyncRequest, settled: bool, resp: &mut SyncResponse) {
        let mut fetched: Vec<Change> = req
            .fetch
            .iter()
            .filter_map(|k| self.rows.get(&(k.0.clone(), k.1.clone())).map(|r| Self::change(&k.0, &k.1, r)))
            .collect();
        fetched.sort_by(|a, b| (&a.collection, &a.id).cmp(&(&b.collection, &b.id)));
        match &req.verify {
            Some(Verify::Roots) if settled => {
                let mut roots = self.digest.roots();
                if let Some(scope) = &req.collections {
                    roots.retain(|c, _| scope.contains(c));
                }
                resp.roots = Some(roots);
            }
            None | Some(Verify::Roots) => {}
            Some(Verify::Groups { collection }) => resp.groups = Some(self.digest.groups(collection)),
            Some(Verify::Buckets { collection, groups }) => {
                resp.buckets = Some(self.digest.buckets(collection, groups));
            }
            Some(Verify::Keys { collection, buckets, have }) => {
                // Versions outside the compared buckets are ignored.
                let held: BTreeMap<&str, (Stamp, digest::Hash64, bool)> = have
                    .iter()
                    .filter(|h| buckets.contains(&digest::bucket(collection, &h.0)))
                    .map(|h| (h.0.as_str(), (Stamp::new(h.1, h.2.clone()), h.4, h.3)))
                    .collect();
                let row_held = |id: &str, r: &Row| {
                    (
                        r.stamp.clone(),
                        digest::payload_hash(collection, id, &r.stamp, &r.payload),
                        r.payload.doc().is_some(),
                    )
                };
                for (key, row) in self.rows.range((collection.clone(), String::new())..) {
                    if &key.0 != collection {
                        break;
                    }
                    if !buckets.contains(&digest::bucket(collection, &key.1)) {
                        continue;
                    }
                    let server = row_held(&key.1, row);
                    if digest::compare(Some(digest::Held::of(&server)), held.get(key.1.as_str()).map(digest::Held::of))
                        .0
                    {
                        fetched.push(Self::change(&key.0, &key.1, row));
                    }
                }
                for (id, client) in &held {
                    let server = self.row(collection, id).map(|r| row_held(id, r));
                    if digest::compare(server.as_ref().map(digest::Held::of), Some(digest::Held::of(client))).1 {
                        resp.wanted.push((*id).to_owned());
                    }
                }
            }
        }
        // Bounded like a page: at least one, then within the byte budget.
        let mut bytes = 0;
        for change in fetched {
            let size = json_len(&change);
            if !resp.fetched.is_empty() && bytes + size + 1 > self.limits.response_bytes_max {
                break;
            }
            bytes += size + usize::from(!resp.fetched.is_empty());
            resp.fetched.push(change);
        }
    }

    fn change(collection: &str, id: &str, row: &Row) -> Change {
        Change {
            collection: collection.to_owned(),
            id: id.to_owned(),
            stamp: row.stamp.clone(),
            payload: row.payload.clone(),
            seq: row.seq,
        }
    }

    /// Applies one already-validated op and says what became of it.
    pub fn apply(&mut self, op: &Op) -> OpResult {
        self.apply_based(op, None)
    }

    /// [`Model::apply`] for an op edited from the version stored under
    /// `base` (§14).
    pub fn apply_based(&mut self, op: &Op, base: Option<u64>) -> OpResult {
        self.lamport_max = self.lamport_max.max(op.stamp.lamport);
        let key = (op.collection.clone(), op.id.clone());
        let stored = self.rows.get(&key);
        if op.payload.doc().is_some() && self.horizon.deleted(base, &op.stamp, stored.map(|r| r.born)) {
            return OpResult::Deleted;
        }
        let decision = decide(stored.map(|r| (&r.stamp, &r.payload)), &op.stamp, &op.payload);
        if decision == Decision::Apply {
            self.seq += 1;
            if let Some(old) = stored {
                self.by_seq.remove(&old.seq);
            }
            self.by_seq.insert(self.seq, key.clone());
            let live_hash = |stamp: &Stamp, payload: &Payload| {
                payload.doc().is_some().then(|| digest::payload_hash(&key.0, &key.1, stamp, payload))
            };
            let old_live = stored.and_then(|r| live_hash(&r.stamp, &r.payload));
            self.digest.replace(&key.0, &key.1, old_live, live_hash(&op.stamp, &op.payload));
            let born = stored.map_or(self.horizon.seq, |r| r.born);
            let row = Row { stamp: op.stamp.clone(), payload: op.payload.clone(), seq: self.seq, born };
            self.rows.insert(key.clone(), row);
        }
        let winner = self.rows.get(&key).map(|r| &r.stamp);
        op_result(decision, op, winner, self.seq)
    }

    /// The changes after `cursor` in seq order, at most `limit` of them and
    /// at most [`Limits::response_bytes_max`] bytes (a first change larger
    /// than that is sent alone). Changes written by `skip_node` are passed
    /// over. A page with more to come ends at its last change; a page that
    /// ends the log moves the cursor past everything, own changes included.
    pub fn page(&self, cursor: Cursor, skip_node: Option<&str>, limit: usize) -> Page {
        self.page_of(cursor, skip_node, (None, None), limit)
    }

    /// [`Model::page`], also passing over tombstones at or below
    /// `live_below` (deleted before a client that held nothing began its
    /// sync, so it cannot hold them, §4.1) and, when `scope` is given,
    /// changes of collections not in it (§15).
    pub fn page_of(
        &self,
        cursor: Cursor,
        skip_node: Option<&str>,
        (live_below, scope): (Option<u64>, Option<&[String]>),
        limit: usize,
    ) -> Page {
        let mut changes: Vec<Change> = Vec::new();
        let mut bytes = 0;
        let mut last = cursor.seq();
        for (&seq, key) in self.by_seq.range(cursor.seq() + 1..) {
            let row = &self.rows[key];
            let gone_before = live_below.is_some_and(|b| seq <= b) && row.payload.doc().is_none();
            let out_of_scope = scope.is_some_and(|s| !s.contains(&key.0));
            if skip_node == Some(row.stamp.node_id.as_str()) || gone_before || out_of_scope {
                last = seq;
                continue;
            }
            let change = Change {
                collection: key.0.clone(),
                id: key.1.clone(),
                stamp: row.stamp.clone(),
                payload: row.payload.clone(),
                seq,
            };
            let size = json_len(&change) + 1;
            if changes.len() == limit || (!changes.is_empty() && bytes + size > self.limits.response_bytes_max) {
                let end = changes.last().map_or(cursor.seq(), |c| c.seq);
                return Page { changes, cursor: Cursor(end), has_more: true };
            }
            bytes += size;
            changes.push(change);
            last = seq;
        }
        Page { changes, cursor: Cursor(last), has_more: false }
    }
}
