//! Syncing: one exchange loop (`sync_once`) and the background task that
//! runs it on local writes, on a timer, and with backoff after failures.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::collections::BTreeMap;

use tide_core::digest::{self, Hash64};
use tide_core::{Cursor, DocKey, Lineage, OpResult, SyncRequest, SyncResponse, Verify};
use tide_store::{Ack, Acked, PendingOp, Refused, Rejection};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::inner::Inner;
use crate::subscription::CatchUp;

/// Most ops pushed in one exchange: the protocol's default cap (the
/// original pushed at most 500). A server with a lower cap refuses with
/// `too_many_ops`, and the client should be configured to match it.
pub const PUSH_BATCH_OPS_MAX: usize = tide_core::limits::OPS_PER_REQUEST_MAX;
/// Most changes asked for in one exchange (the server may send fewer).
pub const PULL_PAGE_CHANGES_MAX: u32 = 1_000;
/// Most exchanges one `sync_once` makes before returning (it resumes on
/// the next call); bounds a sync against a server that always has more.
pub const SYNC_EXCHANGES_MAX: usize = 10_000;
/// First delay after a failed background sync; it doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// A long-poll answered sooner than this with nothing in it was not held
/// (caps reached, a server shutting down, or one that never holds): the
/// background sync backs off, at most to its interval, and polls again.
pub const LONG_POLL_HOLD_MIN: Duration = Duration::from_millis(500);
/// Most re-keys in one `sync_once`: a server that keeps answering
/// `node_id_conflict` is misbehaving, and the sync fails instead.
pub const REKEYS_PER_SYNC_MAX: usize = 2;
/// Most times one sync retries at once after the server said its token
/// expired (`token_expired`): the transport's header provider is asked
/// again, and a provider that refreshes tokens gives a fresh one.
pub const TOKEN_REFRESHES_PER_SYNC_MAX: usize = 1;
/// Most exchanges one digest repair makes within a `sync_once` (it goes
/// on in the next).
pub const VERIFY_EXCHANGES_MAX: usize = 64;
/// Longest delay between background retries.
pub const BACKOFF_MAX: Duration = Duration::from_mins(1);

/// What one [`crate::Tide::sync_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Exchanges made.
    pub exchanges: usize,
    /// Ops sent.
    pub pushed: usize,
    /// Ops the server acknowledged (applied, duplicate or superseded).
    pub acknowledged: usize,
    /// Ops the server rejected, now in the rejected set.
    pub rejected: usize,
    /// Changes received.
    pub pulled: usize,
    /// Changes that replaced local state (and were sent to watchers).
    pub applied: usize,
    /// Whether the last exchange proved the store equal to the server
    /// (their digests matched; PROTOCOL.md §12).
    pub verified: bool,
    /// Versions a repair took from the server or gave back to it.
    pub repaired: usize,
    /// Documents of rejected ops put back to the server's version.
    pub reverted: usize,
    /// Times the store took a new node id because a copy of it writes
    /// under the same one (PROTOCOL.md §13).
    pub rekeyed: usize,
    /// Whether the store was away past the server's tombstone horizon and
    /// began again from the start (PROTOCOL.md §14).
    pub resynced: bool,
}

impl Inner {
    /// Pushes the outbox in batches and pulls until caught up.
    pub(crate) async fn sync_once(&self) -> Result<SyncReport> {
        self.sync(SYNC_EXCHANGES_MAX).await
    }

    /// At most `max` exchanges of pushing and pulling (1: one exchange and
    /// nothing else: no catch-ups, put-backs or digest check).
    pub(crate) async fn sync(&self, max: usize) -> Result<SyncReport> {
        let transport = self.transport.as_ref().ok_or(Error::NoTransport)?;
        let _one_at_a_time = self.sync_lock.lock().await;
        self.status.send_modify(|s| s.syncing = true);
        let result = self.exchanges(transport.as_ref(), max.clamp(1, SYNC_EXCHANGES_MAX)).await;
        // A sync the Tide's closing cut short (its store closed under it, or
        // its exchange cancelled) says so plainly.
        let result = if result.is_err() && self.closed() { Err(Error::Closed) } else { result };
        let (pending, rejected) = (self.store.pending_count().await, self.store.rejected().await);
        self.status.send_modify(|s| {
            s.syncing = false;
            if let Ok(n) = pending {
                s.pending = n;
            }
            if let Ok(r) = &rejected {
                s.rejected = r.len() as u64;
            }
            match &result {
                Ok(_) => {
                    s.last_success = Some(SystemTime::now());
                    s.last_error = None;
                    s.reachable = Some(true);
                }
                Err(e) => {
                    s.last_error = Some(e.to_string());
                    if let Error::Transport(t) = e {
                        s.reachable = Some(matches!(t, tide_transport::Error::Status { .. }));
                    }
                }
            }
        });
        result
    }

    async fn exchanges(&self, transport: &dyn tide_transport::Transport, max: usize) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        // Halved when a server takes fewer ops or bytes per request than we send.
        let mut batch = self.push_batch_ops;
        let mut last = None;
        let mut settle_tries = 2;
        let mut refreshes = 0;
        // A store that held nothing when its first sync began needs none of
        // the tombstones written before it began (PROTOCOL.md §4.1): the
        // first request leaves out those at or below the head its page is
        // read at, which the server says, and later ones those at or below
        // that head; until the store has an op of its own to push.
        // (The cursor read for this serves the first request too.)
        let single = max == 1;
        if !single {
            self.catch_up(transport, &mut report).await?;
        }
        let mut first_cursor = Some(self.store.cursor().await?);
        let mut live_below =
            (first_cursor.is_some_and(|c| c.is_none()) && self.store.is_empty().await?).then_some(u64::MAX);
        while report.exchanges < max {
            let pending = self.store.pending(batch).await?;
            let cursor = match first_cursor.take() {
                Some(cursor) => cursor,
                None => self.store.cursor().await?,
            };
            live_below = live_below.filter(|_| pending.is_empty());
            let req = self.push_request(cursor, &pending, live_below).await?;
            let lineage = req.lineage.clone();
            let pulled_before = report.pulled;
            let resp = match self.round(transport, req, &mut report).await {
                Ok(resp) => {
                    if let Some(l) = lineage {
                        self.store.set_lineage(l.height, &l.next).await?;
                    }
                    resp
                }
                // Another copy of this store writes under our node id: take
                // a new one (pending ops are stamped anew) and go on.
                Err(Error::Transport(tide_transport::Error::Status {
                    code: Some(tide_core::ErrorCode::NodeIdConflict),
                    ..
                })) if report.rekeyed < REKEYS_PER_SYNC_MAX => {
                    let node_id = self.store.rekey().await?;
                    tracing::warn!(%node_id, "another store writes under this node id; re-keyed");
                    report.rekeyed += 1;
                    continue;
                }
                // The token expired: at once again, with whatever token the
                // transport's header provider gives now.
                Err(Error::Transport(tide_transport::Error::Status {
                    code: Some(tide_core::ErrorCode::TokenExpired),
                    ..
                })) if refreshes < TOKEN_REFRESHES_PER_SYNC_MAX => {
                    refreshes += 1;
                    continue;
                }
                // The server refused the request because of one op: set that
                // op aside, so it never blocks the queue, and go on.
                Err(Error::Transport(tide_transport::Error::Status {
                    code: Some(code), message, op: Some(i), ..
                })) if !code.is_retryable() && i < pending.len() => {
                    self.store.settle(Vec::new(), vec![Rejection { seq: pending[i].seq, code, message }]).await?;
                    report.rejected += 1;
                    continue;
                }
                Err(Error::Transport(tide_transport::Error::Status {
                    code: Some(tide_core::ErrorCode::TooManyOps | tide_core::ErrorCode::BodyTooLarge),
                    ..
                })) if pending.len() > 1 => {
                    batch = pending.len() / 2;
                    tracing::info!(batch, "the server takes fewer ops per request; pushing smaller batches");
                    continue;
                }
                Err(e) => return Err(e),
            };
            report.pushed += pending.len();
            // The head the first page was read at bounds the rest; a server
            // that does not say it sends tombstones.
            live_below = live_below.and(resp.head).map(|head| live_below.map_or(head, |b| b.min(head)));
            self.follow_horizon(&resp).await?;
            let collided = self.settle(&pending, &resp.results, &mut report).await?;
            if collided {
                let node_id = self.store.rekey().await?;
                tracing::warn!(%node_id, "another store wrote under this node id; re-keyed");
                report.rekeyed += 1;
                continue;
            }
            let mut done = pending.len() < batch && !resp.has_more;
            // A v1 server that sent changes could not answer with its
            // digests: ask once more so this sync ends verified.
            if done
                && resp.protocol.is_some()
                && resp.roots.is_none()
                && report.pulled > pulled_before
                && settle_tries > 0
            {
                settle_tries -= 1;
                done = false;
            }
            last = Some(resp);
            // A short batch was the whole outbox as it stood; writes made
            // since then wake the next sync.
            if done {
                break;
            }
        }
        let Some(last) = last.filter(|r| r.protocol.is_some() && !single) else { return Ok(report) };
        // Collections the server let it read since this sync began.
        self.catch_up(transport, &mut report).await?;
        self.revert_rejected(transport, &mut report).await?;
        if let Some(roots) = last.roots {
            self.verify(transport, &roots, &mut report).await?;
        }
        Ok(report)
    }

    /// A request pushing `pending` (with their bases and a lineage link)
    /// and pulling after `cursor`.
    async fn push_request(
        &self,
        cursor: Option<Cursor>,
        pending: &[PendingOp],
        live_below: Option<u64>,
    ) -> Result<SyncRequest> {
        let mut req = SyncRequest::new(self.store.node_id(), cursor);
        req.live_below = live_below;
        req.from_head = self.store.from_head();
        req.collections = self.subscription.lock().await.main();
        req.ops = pending.iter().map(|p| p.op.clone()).collect();
        if pending.iter().any(|p| p.base.is_some()) {
            req.bases = pending.iter().map(|p| p.base).collect();
        }
        req.limit = Some(PULL_PAGE_CHANGES_MAX);
        // The server's digests, which it sends only when it has nothing
        // more for us: compared once our outbox is empty too.
        req.verify = Some(Verify::Roots);
        if !req.ops.is_empty() {
            let (height, prev) = self.store.lineage().await?.unzip();
            let next = ulid::Ulid::generate().to_string();
            req.lineage = Some(Lineage { prev, next, height: height.unwrap_or(0) + 1 });
        }
        Ok(req)
    }

    /// Settles a push by its per-op results; returns whether one of them
    /// collided with another store's write of the same stamp (a copy).
    async fn settle(&self, pending: &[PendingOp], results: &[OpResult], report: &mut SyncReport) -> Result<bool> {
        let (mut acks, mut rejected) = (Vec::new(), Vec::new());
        if results.is_empty() {
            // A version-0 server: a 200 acknowledges every op (PROTOCOL.md §9).
            acks.extend(pending.iter().map(|p| Ack { seq: p.seq, acked: Acked::Kept }));
        }
        let mut collided = false;
        for (p, result) in pending.iter().zip(results) {
            let acked = match result {
                OpResult::Applied { seq } => Acked::Applied(*seq),
                OpResult::Deleted => Acked::Deleted,
                _ => Acked::Kept,
            };
            match result {
                // Another store wrote this very stamp: a copy of this one.
                // The op stays pending and is stamped anew.
                OpResult::Rejected { code: tide_core::ErrorCode::StampCollision, .. }
                    if report.rekeyed < REKEYS_PER_SYNC_MAX =>
                {
                    collided = true;
                }
                OpResult::Rejected { code, message } => {
                    tracing::warn!(collection = %p.op.collection, id = %p.op.id, %code, "op rejected by the server");
                    rejected.push(Rejection { seq: p.seq, code: *code, message: message.clone() });
                }
                // Not acknowledged: it stays in the outbox (PROTOCOL.md §6).
                OpResult::Unknown => {}
                _ => acks.push(Ack { seq: p.seq, acked }),
            }
        }
        report.acknowledged += acks.len();
        report.rejected += rejected.len();
        self.store.settle_acks(acks, rejected).await?;
        Ok(collided)
    }

    /// One exchange: sends `req`, checks that the response answers it,
    /// applies its page with the cursor and tells the watchers. Ops are the
    /// caller's to settle.
    async fn round(
        &self,
        transport: &dyn tide_transport::Transport,
        req: SyncRequest,
        report: &mut SyncReport,
    ) -> Result<SyncResponse> {
        let cursor = req.cursor;
        let mut resp = self.send(transport, req, report).await?;
        let restarted = resp.reset || resp.resync;
        let cursor = resp.cursor.max(if restarted { Cursor::START } else { cursor.unwrap_or_default() });
        // The page goes to the store; the response keeps the rest.
        let applied = self.store.apply_page(std::mem::take(&mut resp.changes), cursor).await?;
        report.applied += applied.len();
        if resp.resync {
            // Deletes past the server's horizon are gone: this store begins
            // again from the start, keeping what it holds; what the server
            // no longer has, the digest check that ends the sync finds, and
            // the server answers it `deleted` (PROTOCOL.md §14).
            let head = resp.head.unwrap_or(resp.cursor.seq());
            tracing::info!(head, "away past the server's tombstone horizon; pulling everything again");
            self.store.set_from_head(head).await?;
            report.resynced = true;
        }
        self.observe_readable(&resp).await?;
        Ok(resp)
    }

    /// What the server says the principal may read: collections it may no
    /// longer read leave the subscription, and ones it may read again are
    /// caught up (PROTOCOL.md §15).
    async fn observe_readable(&self, resp: &SyncResponse) -> Result<()> {
        let mut subscription = self.subscription.lock().await;
        if !subscription.readable_differs(resp.readable.as_deref()) {
            // Every answer says it; only a change costs anything.
            return Ok(());
        }
        let mut changed = subscription.clone();
        changed.observe_readable(resp.readable.as_deref());
        if changed != *subscription {
            self.store.set_subscription(changed.to_text()).await?;
            *subscription = changed;
        }
        Ok(())
    }

    /// Pulls the collections added to the subscription from the beginning,
    /// each catch-up on its own cursor, until it reaches the main cursor
    /// and joins it (PROTOCOL.md §15). Each page is saved with the
    /// catch-up's new cursor in one transaction.
    async fn catch_up(&self, transport: &dyn tide_transport::Transport, report: &mut SyncReport) -> Result<()> {
        while report.exchanges < SYNC_EXCHANGES_MAX {
            let Some((collections, cursor, live_below, mut held)) =
                self.subscription.lock().await.catching_up().map(|c| (c.names(), c.cursor, c.live_below, c.held))
            else {
                return Ok(());
            };
            if cursor.is_none() {
                // Documents kept from an earlier subscription need the
                // deletes made since: no tombstone may be left out.
                let holding = self.store.collections().await?;
                held = holding.iter().any(|(c, _)| collections.as_ref().is_none_or(|names| names.contains(c)));
            }
            let mut req = SyncRequest::new(self.store.node_id(), cursor.map(Cursor));
            req.limit = Some(PULL_PAGE_CHANGES_MAX);
            req.collections.clone_from(&collections);
            // Holding nothing of these, it needs no tombstone up to the head
            // its first page was read at (PROTOCOL.md §4.1).
            req.live_below = (!held).then(|| live_below.unwrap_or(u64::MAX));
            let resp = self.send(transport, req, report).await?;
            let main = self.store.cursor().await?.unwrap_or_default().seq();
            let mut subscription = self.subscription.lock().await;
            if subscription.catching_up().map(CatchUp::names) != Some(collections.clone()) {
                // The application changed the subscription meanwhile.
                continue;
            }
            let mut next = subscription.clone();
            if let Some(first) = next.catch_ups.first_mut() {
                first.held = held;
            }
            next.advance(resp.cursor.seq(), resp.head.filter(|_| !held), !resp.has_more, main);
            next.observe_readable(resp.readable.as_deref());
            let applied = self.store.apply_catch_up(resp.changes, next.to_text()).await?;
            report.applied += applied.len();
            let stalled = !resp.has_more && next.catching_up().map(CatchUp::names) == Some(collections);
            *subscription = next;
            if stalled {
                // At the server's head yet behind the main cursor (a server
                // that began again): the main pass moves first; next sync.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Sends `req` and checks that the response answers it.
    async fn send(
        &self,
        transport: &dyn tide_transport::Transport,
        mut req: SyncRequest,
        report: &mut SyncReport,
    ) -> Result<SyncResponse> {
        req.request_id = Some(ulid::Ulid::generate().to_string());
        report.exchanges += 1;
        // Closing the Tide cancels an exchange in flight: nothing is settled
        // or applied without a whole answer, so the outbox keeps its ops and
        // the next sync sends them again (a server that committed them
        // answers `duplicate`).
        let mut closing = self.stop.subscribe();
        let resp = tokio::select! {
            resp = transport.exchange(&req) => resp?,
            _ = closing.wait_for(|closed| *closed) => return Err(Error::Closed),
        };
        if resp.request_id.is_some() && resp.request_id != req.request_id {
            // A replayed or misrouted response: its results describe other ops.
            return Err(tide_transport::Error::MalformedResponse {
                message: format!(
                    "the response answers request {:?}, not {:?}",
                    resp.request_id.as_deref().unwrap_or_default(),
                    req.request_id.as_deref().unwrap_or_default()
                ),
            }
            .into());
        }
        report.pulled += resp.changes.len();
        Ok(resp)
    }

    /// Removes the tombstones the server's horizon has passed, when it moved.
    async fn follow_horizon(&self, resp: &SyncResponse) -> Result<()> {
        let Some(horizon) = resp.horizon else { return Ok(()) };
        if horizon > self.horizon.fetch_max(horizon, std::sync::atomic::Ordering::Relaxed) {
            self.store.collect_tombstones(horizon).await?;
        }
        Ok(())
    }

    /// Puts the documents of rejected ops back to the server's versions.
    async fn revert_rejected(&self, transport: &dyn tide_transport::Transport, report: &mut SyncReport) -> Result<()> {
        let targets = self.store.unreverted().await?;
        if targets.is_empty() {
            return Ok(());
        }
        self.revert(transport, targets, report).await
    }

    /// Fetches the server's versions of refused writes' keys and puts the
    /// local documents back to them, telling the watchers.
    async fn revert(
        &self,
        transport: &dyn tide_transport::Transport,
        targets: Vec<Refused>,
        report: &mut SyncReport,
    ) -> Result<()> {
        // A write to a collection it may not read (refused `forbidden`) has
        // no server version to see: it is taken back to what was there.
        let (readable, unreadable): (Vec<Refused>, Vec<Refused>) = {
            let subscription = self.subscription.lock().await;
            targets.into_iter().partition(|t| subscription.may_read(&t.key.0))
        };
        if !unreadable.is_empty() {
            report.reverted += self.store.revert(unreadable, Vec::new()).await?.len();
        }
        if readable.is_empty() {
            return Ok(());
        }
        let mut req = self.request().await?;
        req.fetch = readable.iter().map(|t| t.key.clone()).collect();
        let resp = self.round(transport, req, report).await?;
        // The store tells the watchers what it put back.
        report.reverted += self.store.revert(readable, resp.fetched).await?.len();
        Ok(())
    }

    /// Compares the store's digests with the server's `roots`; where they
    /// differ, narrows down to the differing keys and repairs them both
    /// ways by the LWW rule (PROTOCOL.md §12).
    async fn verify(
        &self,
        transport: &dyn tide_transport::Transport,
        server: &BTreeMap<String, Hash64>,
        report: &mut SyncReport,
    ) -> Result<()> {
        let Some(local) = self.store.settled_roots().await? else { return Ok(()) };
        // Only what the main cursor covers: a collection being caught up,
        // unsubscribed or unreadable is not the server's answer to compare.
        let subscription = self.subscription.lock().await.clone();
        let mut collections: Vec<&String> =
            local.keys().chain(server.keys()).filter(|c| subscription.covers(c)).collect();
        collections.sort_unstable();
        collections.dedup();
        let differing: Vec<&String> = collections.into_iter().filter(|c| local.get(*c) != server.get(*c)).collect();
        report.verified = differing.is_empty();
        let budget = report.exchanges + VERIFY_EXCHANGES_MAX;
        for collection in differing {
            tracing::info!(%collection, "digests differ from the server's; repairing");
            let mut req = self.request().await?;
            req.verify = Some(Verify::Groups { collection: collection.clone() });
            let theirs = self.round(transport, req, report).await?.groups.unwrap_or_default();
            let groups = digest::differing(&self.store.digest_groups(collection).await?, &theirs);
            let mut buckets = Vec::new();
            for chunk in groups.chunks(tide_core::limits::VERIFY_GROUPS_MAX) {
                let mut req = self.request().await?;
                req.verify = Some(Verify::Buckets { collection: collection.clone(), groups: chunk.to_vec() });
                let theirs = self.round(transport, req, report).await?.buckets.unwrap_or_default();
                buckets.extend(digest::differing(&self.store.digest_buckets(collection, chunk).await?, &theirs));
            }
            for chunk in buckets.chunks(tide_core::limits::VERIFY_BUCKETS_MAX) {
                if report.exchanges >= budget {
                    tracing::info!("repair continues in the next sync");
                    return Ok(());
                }
                let have = self.store.held_versions(collection, chunk).await?;
                let mut req = self.request().await?;
                req.verify = Some(Verify::Keys { collection: collection.clone(), buckets: chunk.to_vec(), have });
                let resp = self.round(transport, req, report).await?;
                let applied = self.store.apply_fetched(resp.fetched).await?;
                report.repaired += applied.len();
                self.push_repair(transport, collection, &resp.wanted, report).await?;
            }
        }
        Ok(())
    }

    /// A request from this node at the current cursor, with no ops.
    async fn request(&self) -> Result<SyncRequest> {
        let mut req = SyncRequest::new(self.store.node_id(), self.store.cursor().await?);
        req.limit = Some(PULL_PAGE_CHANGES_MAX);
        req.from_head = self.store.from_head();
        req.collections = self.subscription.lock().await.main();
        Ok(req)
    }

    /// Pushes back the versions the server asked for, with their original
    /// stamps. A version the server refuses is put back to the server's.
    async fn push_repair(
        &self,
        transport: &dyn tide_transport::Transport,
        collection: &str,
        wanted: &[String],
        report: &mut SyncReport,
    ) -> Result<()> {
        for ids in wanted.chunks(PUSH_BATCH_OPS_MAX) {
            let mut ops = self.store.versions_as_ops(collection, ids).await?;
            while !ops.is_empty() {
                let mut req = self.request().await?;
                req.repair = true;
                req.ops = ops.iter().map(|(o, _)| o.clone()).collect();
                if ops.iter().any(|(_, base)| base.is_some()) {
                    req.bases = ops.iter().map(|(_, base)| *base).collect();
                }
                // The ops the server refused for good, and whether the rest are settled.
                let (refused, settled): (Vec<usize>, bool) = match self.round(transport, req, report).await {
                    Ok(resp) => {
                        report.repaired += resp.results.iter().filter(|r| r.is_ack()).count();
                        // Versions whose deletes the server collected: gone here too.
                        let gone = ops.iter().zip(&resp.results).filter(|(_, r)| **r == OpResult::Deleted);
                        let gone: Vec<(DocKey, tide_core::Stamp)> = gone
                            .map(|((o, _), _)| (DocKey(o.collection.clone(), o.id.clone()), o.stamp.clone()))
                            .collect();
                        if !gone.is_empty() {
                            self.store.forget_deleted(gone).await?;
                        }
                        let refused = resp.results.iter().enumerate();
                        (
                            refused.filter(|(_, r)| matches!(r, OpResult::Rejected { .. })).map(|(i, _)| i).collect(),
                            true,
                        )
                    }
                    Err(Error::Transport(tide_transport::Error::Status { code: Some(code), op: Some(i), .. }))
                        if !code.is_retryable() && i < ops.len() =>
                    {
                        (vec![i], false)
                    }
                    Err(e) => return Err(e),
                };
                let targets: Vec<Refused> = refused
                    .iter()
                    .filter_map(|&i| ops.get(i))
                    .map(|(o, _)| Refused {
                        key: DocKey(o.collection.clone(), o.id.clone()),
                        stamp: o.stamp.clone(),
                        hash: Some(tide_core::digest::payload_hash(&o.collection, &o.id, &o.stamp, &o.payload)),
                        before: None,
                    })
                    .collect();
                if settled {
                    ops.clear();
                } else {
                    ops = ops.into_iter().enumerate().filter(|(i, _)| !refused.contains(i)).map(|(_, o)| o).collect();
                }
                if !targets.is_empty() {
                    self.revert(transport, targets, report).await?;
                }
            }
        }
        Ok(())
    }
}

/// The delay before the next retry after `failures` failures in a row:
/// exponential from [`BACKOFF_BASE`] up to [`BACKOFF_MAX`], with full
/// jitter in its upper half, and never shorter than the server's
/// `Retry-After`.
pub(crate) fn backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(16)).min(BACKOFF_MAX);
    let jitter = exp / 2 * fastrand::u32(0..1_000) / 1_000;
    (exp / 2 + jitter).max(retry_after.unwrap_or_default())
}

/// How a long-poll ended.
enum Poll {
    /// A remote change is waiting (or may be): sync now.
    Changed,
    /// A local write: push now.
    LocalWrite,
    /// The server answered at once with nothing: it does not hold polls.
    NotHeld,
    /// The hold ran out with nothing new: poll again.
    Expired,
    /// It brought a change and applied it: poll again.
    Applied,
    Stop,
    Failed(Error),
}

impl Inner {
    /// One long-poll: a request with no ops that the server holds until a
    /// change commits. Dropped on a local write or stop (the server lets go
    /// of a request whose client hung up).
    async fn poll(&self, wait: Duration, stop: &mut watch::Receiver<bool>) -> Poll {
        let Some(transport) = &self.transport else { return Poll::Stop };
        let cursor = match self.store.cursor().await {
            Ok(c) => c,
            Err(e) => return Poll::Failed(e.into()),
        };
        let mut req = SyncRequest::new(self.store.node_id(), cursor);
        req.limit = Some(PULL_PAGE_CHANGES_MAX);
        req.wait = Some(wait);
        req.from_head = self.store.from_head();
        req.collections = self.subscription.lock().await.main();
        let started = std::time::Instant::now();
        let resp = tokio::select! {
            biased;
            _ = stop.changed() => return Poll::Stop,
            () = self.wake.notified() => return Poll::LocalWrite,
            resp = transport.exchange(&req) => resp,
        };
        match resp {
            Ok(r) if !r.changes.is_empty() && !r.has_more && !r.reset && !r.resync => {
                match self.apply_polled(cursor, r).await {
                    Ok(true) => Poll::Applied,
                    Ok(false) => Poll::Changed,
                    Err(e) => Poll::Failed(e),
                }
            }
            Ok(r) if !r.changes.is_empty() || r.has_more || r.reset || r.resync => Poll::Changed,
            Ok(_) if started.elapsed() < LONG_POLL_HOLD_MIN => Poll::NotHeld,
            Ok(_) => Poll::Expired,
            Err(e) => Poll::Failed(e.into()),
        }
    }

    /// Applies the page a woken long-poll brought, if nothing synced since
    /// the poll was sent (then its cursor still follows ours); returns
    /// whether it did. Saves the pull a woken client would otherwise make.
    async fn apply_polled(&self, sent: Option<Cursor>, resp: tide_core::SyncResponse) -> Result<bool> {
        let _one_at_a_time = self.sync_lock.lock().await;
        if self.store.cursor().await? != sent || resp.cursor < sent.unwrap_or_default() {
            return Ok(false);
        }
        self.store.apply_page(resp.changes, resp.cursor).await?;
        self.status.send_modify(|s| {
            s.last_success = Some(SystemTime::now());
            s.last_error = None;
            s.reachable = Some(true);
        });
        Ok(true)
    }
}

/// Runs background syncs until `stop` says so: at once, then on every local
/// write, on every remote change (long-poll) or every `interval`, and after
/// failures by [`backoff`].
pub(crate) async fn run_forever(inner: Arc<Inner>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    let mut delay = Duration::ZERO;
    let live = inner.long_poll;
    // Long-polls answered at once in a row.
    let mut not_held = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            // After a failure only the backoff timer retries: local writes
            // queue up without hammering a server that is down.
            () = inner.wake.notified(), if failures == 0 => {}
            () = tokio::time::sleep(delay) => {}
        }
        if *stop.borrow() || inner.closed() {
            return;
        }
        if let Err(e) = inner.sync_once().await {
            failures = failures.saturating_add(1);
            let retry_after = match &e {
                Error::Transport(t) => t.retry_after(),
                _ => None,
            };
            delay = backoff(failures, retry_after);
            tracing::warn!(error = %e, failures, retry_in = ?delay, "background sync failed");
            continue;
        }
        failures = 0;
        delay = interval;
        // Caught up: hold a long-poll until something changes.
        while let Some(wait) = live {
            match inner.poll(wait, &mut stop).await {
                Poll::Expired | Poll::Applied => not_held = 0,
                Poll::Changed | Poll::LocalWrite => {
                    delay = Duration::ZERO;
                    break;
                }
                Poll::NotHeld => {
                    // Caps reached, a server shutting down, or an old server
                    // that never holds: back off, then try live sync again.
                    not_held = not_held.saturating_add(1);
                    delay = backoff(not_held, None).min(interval);
                    tracing::debug!(retry_in = ?delay, "the server answered a long-poll at once; polling again later");
                    break;
                }
                Poll::Stop => return,
                Poll::Failed(e) => {
                    failures = 1;
                    delay = backoff(failures, None);
                    tracing::warn!(error = %e, retry_in = ?delay, "long-poll failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BACKOFF_BASE, BACKOFF_MAX, backoff};

    #[test]
    fn backoff_doubles_within_its_jitter_band_up_to_the_cap() {
        for failures in 1..=40u32 {
            let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(16)).min(BACKOFF_MAX);
            for _ in 0..20 {
                let d = backoff(failures, None);
                assert!(exp / 2 <= d && d <= exp, "failure {failures}: {d:?} outside {:?}..={exp:?}", exp / 2);
            }
        }
    }

    #[test]
    fn backoff_never_undercuts_retry_after() {
        let long = Duration::from_secs(90);
        assert_eq!(backoff(1, Some(long)), long, "a Retry-After longer than the backoff wins");
        let short = Duration::from_millis(1);
        assert!(backoff(3, Some(short)) >= BACKOFF_BASE * 4, "a shorter Retry-After does not shorten the backoff");
    }
}
