//! The seeded simulator (reliability.md V1 and C10): random clients through
//! a faulty network, then heal, then check safety and liveness.

use std::collections::BTreeMap;

use serde_json::json;
use tide_core::{Limits, Payload, SplitMix64, Stamp};
use tide_transport::{FakeServer, FaultRates};

use crate::cluster::{Cluster, Snapshot};

/// The shape of one simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Clients, each with its own store file.
    pub clients: usize,
    /// Random steps before healing.
    pub steps: usize,
    /// Collections × ids: a tiny key space, so conflicts are common.
    pub collections: usize,
    /// Ids per collection.
    pub ids: usize,
    /// Faults drawn for every exchange.
    pub rates: FaultRates,
    /// The server's page size (small pages exercise pagination, V7).
    pub page_changes_max: usize,
    /// Sync rounds allowed to settle after healing (liveness bound).
    pub settle_rounds_max: usize,
    /// Per mille of steps that restore the server to an earlier snapshot
    /// (a database restored from a backup); as many again take snapshots.
    pub restore_per_mille: u64,
    /// A document limit on the server lower than the clients': when set,
    /// one put in ten is larger than it and is rejected.
    pub doc_bytes_max: Option<usize>,
    /// Per mille of steps that copy a client's store file into a new client
    /// (a restored phone backup, a copied profile), at most `copies_max`.
    pub copy_per_mille: u64,
    /// Most copies in one run.
    pub copies_max: usize,
    /// Per mille of steps that collect the server's tombstones more than
    /// `horizon_seqs` changes behind its head (PROTOCOL.md §14); 0 never.
    pub collect_per_mille: u64,
    /// The tombstone horizon distance when collecting.
    pub horizon_seqs: u64,
}

impl SimConfig {
    /// The default run with tombstone collection: a short horizon, so
    /// clients that go offline often come back past it. Without server
    /// restores: a backup restored while collection runs renumbers seqs the
    /// clients collect by, and may give back versions whose deletes everyone
    /// collected (PROTOCOL.md §14 says so); the default run covers restores.
    pub fn collecting() -> Self {
        Self { collect_per_mille: 60, horizon_seqs: 3, restore_per_mille: 0, ..Self::default() }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            clients: 3,
            steps: 150,
            collections: 2,
            ids: 3,
            rates: FaultRates { drop: 8, lose_response: 8, duplicate: 8, unavailable: 5, rate_limited: 5, garbage: 4 },
            page_changes_max: 2,
            settle_rounds_max: 40,
            restore_per_mille: 20,
            doc_bytes_max: Some(120),
            copy_per_mille: 10,
            copies_max: 2,
            collect_per_mille: 0,
            horizon_seqs: 0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Local writes committed.
    pub writes: usize,
    /// Exchanges that crossed the fake server.
    pub exchanges: usize,
    /// Exchanges that met a fault.
    pub faulted: usize,
    /// Client restarts.
    pub restarts: usize,
    /// Sync rounds it took to settle after healing.
    pub settle_rounds: usize,
    /// Times the server was restored to an earlier snapshot.
    pub restores: usize,
    /// Writes the server rejected (larger than its limit).
    pub rejected: usize,
    /// Store files copied into new clients.
    pub copies: usize,
    /// Re-keys the clients made (copies found out), before healing.
    pub rekeyed: usize,
    /// Tombstones the server collected.
    pub collected: usize,
    /// Syncs that began again from the start (past the horizon).
    pub resyncs: usize,
    /// Writes the server dropped because their document's delete was
    /// collected (PROTOCOL.md §14).
    pub deleted: usize,
}

/// Runs one simulation. `Err` says what broke; the caller prints the seed.
///
/// Checked along the way: reads never go back (a replica's stamp for a key
/// never decreases, P7), except from a rejected write to the server's
/// version. Checked at the end, after healing: every outbox drains within
/// `settle_rounds_max` rounds (liveness, P8); every replica holds the
/// server's live documents, and the server holds, for every key, the
/// highest write ever made locally that it does not reject: its document
/// for a put, no live document for a delete. So no acknowledged write is
/// lost, even across restores of the server, and no deleted document comes
/// back (P1, P4, P5).
///
/// With collection (`collect_per_mille`), "the highest write" is no longer
/// the rule once a tombstone is gone (a new document may follow a deletion
/// the server forgot, PROTOCOL.md §14), so the end state is checked against
/// what the rule promises instead: no version the server replaced by a
/// deletion is live again (no resurrection), and no write is lost: the
/// server holds it or something at least as new, or a deletion above it was
/// written, or the server answered it `deleted`.
pub async fn simulate(seed: u64, config: &SimConfig) -> Result<SimReport, String> {
    let mut rng = SplitMix64::new(seed);
    let mut limits = Limits { changes_per_response_max: config.page_changes_max, ..Limits::default() };
    if let Some(max) = config.doc_bytes_max {
        limits.doc_bytes_max = max;
    }
    let server = FakeServer::with_limits(limits);
    server.chaos(Some((seed, config.rates)));
    let mut backups = Vec::new();
    let mut cluster = Cluster::new(server, config.clients).await.map_err(|e| e.to_string())?;
    let mut report = SimReport::default();
    let mut writes = Writes::default();
    let mut last_read: Vec<Snapshot> = vec![Snapshot::new(); config.clients];
    let mut offline = vec![false; config.clients];
    // A watcher per client, checked against its store.
    let mut watches: Vec<tide_client::Watch> = (0..config.clients).map(|c| cluster.client(c).watch()).collect();
    let keys: Vec<(String, String)> = (0..config.collections)
        .flat_map(|c| (0..config.ids).map(move |i| (format!("col{c}"), format!("k{i}"))))
        .collect();

    let mut history = ServerHistory { before: cluster.server().model(), ..ServerHistory::default() };
    for step in 0..config.steps {
        let restored = backup_or_restore(&mut rng, config, cluster.server(), &mut backups);
        report.restores += restored;
        if restored == 0 && config.collect_per_mille > 0 && rng.below(1_000) < config.collect_per_mille {
            report.collected += cluster.server().collect(config.horizon_seqs);
        }
        if rng.below(1_000) < config.copy_per_mille && report.copies < config.copies_max {
            let from = rng.index(cluster.len());
            let to = copy_store(&mut cluster, from, &mut watches, &history.forgotten)
                .await
                .map_err(|e| format!("step {step}: {e}"))?;
            last_read.push(last_read[from].clone());
            offline.push(false);
            writes.copied(from, to);
            report.copies += 1;
        }
        let c = rng.index(cluster.len());
        let collection = format!("col{}", rng.below(config.collections as u64));
        let id = format!("k{}", rng.below(config.ids as u64));
        match rng.below(100) {
            0..=39 => {
                let big = config.doc_bytes_max.is_some() && rng.below(10) == 0;
                let mut doc = json!({"v": rng.below(1000), "by": c});
                if big {
                    doc["big"] = json!("x".repeat(config.doc_bytes_max.unwrap_or(0)));
                }
                let payload = Payload::Put(doc.as_object().cloned().unwrap_or_default().into());
                let stamp =
                    write(&cluster, c, &collection, &id, &payload).await.map_err(|e| format!("step {step}: {e}"))?;
                if big {
                    report.rejected += 1;
                } else {
                    writes.record(c, (collection, id), stamp, payload);
                }
                report.writes += 1;
            }
            40..=51 => {
                let stamp = write(&cluster, c, &collection, &id, &Payload::Delete)
                    .await
                    .map_err(|e| format!("step {step}: {e}"))?;
                writes.record(c, (collection, id), stamp, Payload::Delete);
                report.writes += 1;
            }
            52..=84 => {
                // Errors are expected under faults: the outbox keeps the ops.
                if let Ok(r) = cluster.client(c).sync_once().await {
                    report.rekeyed += r.rekeyed;
                    report.resyncs += usize::from(r.resynced);
                }
            }
            85..=93 => {
                offline[c] = !offline[c];
                if offline[c] {
                    cluster.partition(c);
                } else {
                    cluster.heal(c);
                }
            }
            _ => {
                check_watch(&mut watches[c], &cluster, c, &history.forgotten)
                    .await
                    .map_err(|e| format!("step {step}: {e}"))?;
                cluster.restart(c).await.map_err(|e| format!("step {step}: restart failed: {e}"))?;
                watches[c] = cluster.client(c).watch();
                report.restarts += 1;
            }
        }
        let deleted = deleted_as_read(&cluster, c, &last_read[c]).await?;
        let now = cluster.snapshot_keys(c, &keys).await.map_err(|e| e.to_string())?;
        trace(&cluster, step, c).await?;
        history.observe(cluster.server().model(), restored > 0);
        never_back(&last_read[c], &now, (&deleted, &history.forgotten))
            .map_err(|e| format!("step {step}: c{c} {e}"))?;
        last_read[c] = now;
    }

    heal_and_check(&cluster, config, (&writes, &history), &mut watches, &mut report).await?;
    cluster.close().await;
    Ok(report)
}

/// After the random steps: every outbox drains (liveness), every replica
/// holds the server's documents, the server the writes (see [`simulate`]),
/// and every watcher its store.
async fn heal_and_check(
    cluster: &Cluster,
    config: &SimConfig,
    (writes, history): (&Writes, &ServerHistory),
    watches: &mut [tide_client::Watch],
    report: &mut SimReport,
) -> Result<(), String> {
    report.settle_rounds = cluster
        .settle(config.settle_rounds_max)
        .await
        .ok_or_else(|| format!("liveness: outboxes did not drain within {} rounds", config.settle_rounds_max))?;
    let traffic = cluster.server().traffic();
    report.exchanges = traffic.len();
    report.faulted = traffic.iter().filter(|e| e.fault.is_some()).count();
    cluster.check_converged().await?;
    let deleted = cluster.server().deleted_writes();
    report.deleted = deleted.len();
    if config.collect_per_mille == 0 {
        let oracle = writes.highest(cluster).await?;
        check_highest_writes(&cluster.server().model(), &oracle)?;
    } else {
        let ends = Ends { dead: &history.dead, forgotten: &history.forgotten, deleted: &deleted };
        check_after_collection(&cluster.server().model(), &writes.current(cluster).await?, &ends)?;
    }
    for (c, watch) in watches.iter_mut().enumerate() {
        check_watch(watch, cluster, c, &history.forgotten).await?;
    }
    Ok(())
}

/// The writes the server answered `deleted`, also under the stamps client
/// `c` read them with before a re-key gave them new ones.
async fn deleted_as_read(cluster: &Cluster, c: usize, read: &Snapshot) -> Result<DeletedWrites, String> {
    let mut deleted = cluster.server().deleted_writes();
    for (key, (stamp, _)) in read {
        let current = cluster.client(c).current_stamp(stamp).await.map_err(|e| e.to_string())?;
        if current != *stamp && deleted.contains(&(key.clone(), current)) {
            deleted.insert((key.clone(), stamp.clone()));
        }
    }
    Ok(deleted)
}

/// With `TIDE_SIM_TRACE=collection/id`, prints after every step the
/// server's and every client's version of that key, the horizon, and the
/// step's exchanges that carried it: for replaying a failed seed.
async fn trace(cluster: &Cluster, step: usize, c: usize) -> Result<(), String> {
    let Ok(traced) = std::env::var("TIDE_SIM_TRACE") else { return Ok(()) };
    let (collection, id) = traced.split_once('/').unwrap_or((traced.as_str(), ""));
    let model = cluster.server().model();
    let mut held = Vec::new();
    for i in 0..cluster.len() {
        let v = cluster.client(i).version(collection, id).await.map_err(|e| e.to_string())?;
        held.push(v.map(|v| (v.stamp.lamport, v.stamp.node_id, v.payload.doc().is_some())));
    }
    let row = model.row(collection, id).map(|r| (r.stamp.clone(), r.payload.doc().is_some(), r.seq));
    eprintln!("step {step} c{c}: horizon {:?}, server {row:?}, clients {held:?}", model.horizon());
    let traffic = cluster.server().traffic();
    for e in traffic.iter().rev().take(8).rev() {
        if e.request.ops.iter().any(|o| o.collection == collection && o.id == id) {
            let ops: Vec<_> = e.request.ops.iter().map(|o| (&o.id, &o.stamp, o.payload.doc().is_some())).collect();
            eprintln!("  {} repair={} fault={:?} ops={ops:?} -> {:?}", e.client, e.request.repair, e.fault, e.outcome);
        }
    }
    Ok(())
}

/// A local write by client `c` through its collection API.
async fn write(cluster: &Cluster, c: usize, collection: &str, id: &str, payload: &Payload) -> Result<Stamp, String> {
    let docs = cluster.client(c).collection::<serde_json::Value>(collection);
    let written = match payload {
        Payload::Put(doc) => docs.put(id, &serde_json::Value::Object(doc.to_map())).await,
        Payload::Delete => docs.delete(id).await,
    };
    written.map_err(|e| format!("a local write failed: {e}"))
}

/// Copies client `from`'s store file into a new client, checking and
/// renewing the watchers of both.
async fn copy_store(
    cluster: &mut Cluster,
    from: usize,
    watches: &mut Vec<tide_client::Watch>,
    forgotten: &DeletedWrites,
) -> Result<usize, String> {
    check_watch(&mut watches[from], cluster, from, forgotten).await?;
    let to = cluster.copy(from).await.map_err(|e| format!("copy failed: {e}"))?;
    watches[from] = cluster.client(from).watch();
    watches.push(cluster.client(to).watch());
    Ok(to)
}

/// Now and then a snapshot of the server's state, or the server put back to
/// an earlier one (a database restored from a backup); returns 1 for a restore.
fn backup_or_restore(
    rng: &mut SplitMix64,
    config: &SimConfig,
    server: &FakeServer,
    backups: &mut Vec<tide_core::Model>,
) -> usize {
    let fault = rng.below(1_000);
    if fault < config.restore_per_mille {
        backups.push(server.model());
    } else if fault < 2 * config.restore_per_mille && !backups.is_empty() {
        server.restore(backups[rng.index(backups.len())].clone());
        return 1;
    }
    0
}

/// A client's watch stream, drained: for each key, stamps never go back
/// except when a refused write is put back, and the last event is the
/// version the store holds.
async fn check_watch(
    watch: &mut tide_client::Watch,
    cluster: &Cluster,
    c: usize,
    forgotten: &DeletedWrites,
) -> Result<(), String> {
    use tide_client::{Source, WatchEvent};
    // Per key: the last event's stamp and document, and whether it removed a
    // refused write (it then carries the refused stamp, and anything may follow).
    let mut last: BTreeMap<(String, String), (Stamp, Option<tide_core::Doc>, bool)> = BTreeMap::new();
    while let Ok(Some(event)) = tokio::time::timeout(std::time::Duration::from_millis(5), watch.next()).await {
        let WatchEvent::Change(e) = event else { return Err(format!("c{c}'s watcher lagged: {event:?}")) };
        let key = (e.collection.clone(), e.id.clone());
        // The same stamp again is a collision settled by the server's payload.
        // A deletion the server collected may be followed by an older new document.
        if let Some((prev, doc, false)) = last.get(&key)
            && e.stamp < *prev
            && e.source != Source::Reverted
            && !(doc.is_none() && forgot_since(forgotten, &key, prev))
        {
            return Err(format!("c{c}'s watcher saw {key:?} go from {prev:?} back to {:?} ({:?})", e.stamp, e.source));
        }
        let removed = e.source == Source::Reverted && e.doc.is_none();
        last.insert(key, (e.stamp, e.doc, removed));
    }
    for ((collection, id), (stamp, doc, removed)) in last {
        let stored = cluster.client(c).version(&collection, &id).await.map_err(|e| e.to_string())?;
        let matches = match &stored {
            Some(v) if removed => v.payload.doc().is_none(),
            Some(v) => v.stamp == stamp && v.payload.doc() == doc.as_ref(),
            None => doc.is_none(),
        };
        if !matches {
            return Err(format!("c{c}'s watcher ended {collection}/{id} on {stamp:?}, the store holds {stored:?}"));
        }
    }
    Ok(())
}

/// P7: no replica's stamp for a key ever goes back, except from a write
/// the server refused (too large) to the server's version. A tombstone may
/// go (collected), and so may a write the server dropped as `deleted`.
fn never_back(before: &Snapshot, now: &Snapshot, ends: (&DeletedWrites, &DeletedWrites)) -> Result<(), String> {
    let (deleted, forgotten) = ends;
    for (key, (stamp, payload)) in before {
        let refused = payload.doc().is_some_and(|d| d.to_map().contains_key("big"));
        let version = (key.clone(), stamp.clone());
        // A collected deletion may be followed by an older new document;
        // a version dropped as deleted by anything.
        let collected = payload.doc().is_none() && forgot_since(forgotten, key, stamp);
        let dropped = deleted.contains(&version);
        match now.get(key) {
            Some((s, _)) if s >= stamp => {}
            _ if collected || dropped => {}
            None if payload.doc().is_none() => {}
            _ if refused => {}
            other => return Err(format!("went back on {key:?}: had {stamp:?}, now {other:?}")),
        }
    }
    Ok(())
}

/// Whether the server collected a tombstone of `key` at least as new as
/// `stamp` (a replica that held a deletion up to there may then take an
/// older new document, PROTOCOL.md §14).
fn forgot_since(forgotten: &DeletedWrites, key: &(String, String), stamp: &Stamp) -> bool {
    forgotten.iter().any(|(k, s)| k == key && s >= stamp)
}

/// The server's live documents are exactly the highest write of every key
/// that is a put (a delete leaves nothing live).
fn check_highest_writes(model: &tide_core::Model, oracle: &Oracle) -> Result<(), String> {
    // Live documents only: a tombstone the server lost is as good as none.
    let server: BTreeMap<&(String, String), (&Stamp, &Payload)> =
        model.rows().filter(|(_, r)| r.payload.doc().is_some()).map(|(k, r)| (k, (&r.stamp, &r.payload))).collect();
    for (key, (stamp, payloads)) in oracle {
        let ok = match server.get(key) {
            Some((s, p)) => *s == stamp && payloads.contains(p),
            None => payloads.contains(&Payload::Delete),
        };
        if !ok {
            return Err(format!(
                "the server is not the highest write of {key:?}: highest {stamp:?} with {payloads:?}, server {:?}",
                server.get(key)
            ));
        }
    }
    if let Some(key) = server.keys().find(|k| !oracle.contains_key(**k)) {
        return Err(format!("the server holds {key:?}, which nobody wrote"));
    }
    Ok(())
}

/// What the server did to versions over a run, history step by step.
#[derive(Default)]
struct ServerHistory {
    /// The server's state after the last step.
    before: tide_core::Model,
    /// Live versions it replaced by a deletion: never live again.
    dead: DeletedWrites,
    /// Tombstones it collected.
    forgotten: DeletedWrites,
}

impl ServerHistory {
    /// Takes in the server's state after a step (`restored`: the step put
    /// it back to a backup, which is no history of its own).
    fn observe(&mut self, now: tide_core::Model, restored: bool) {
        if !restored {
            for (key, row) in self.before.rows() {
                let after = now.row(&key.0, &key.1);
                if row.payload.doc().is_some() && after.is_none_or(|r| r.payload.doc().is_none()) {
                    self.dead.insert((key.clone(), row.stamp.clone()));
                }
                // Collected (and perhaps written again in the same step).
                let collected = row.seq <= now.horizon().seq && after.is_none_or(|a| a.seq != row.seq);
                if row.payload.doc().is_none() && collected {
                    self.forgotten.insert((key.clone(), row.stamp.clone()));
                }
            }
        }
        self.before = now;
    }
}

/// What ended how on the server, by key and stamp.
struct Ends<'a> {
    /// Live versions a deletion replaced.
    dead: &'a DeletedWrites,
    /// Tombstones collected.
    forgotten: &'a DeletedWrites,
    /// Writes answered `deleted`.
    deleted: &'a DeletedWrites,
}

/// With collection: no version the server replaced by a deletion is live
/// on it again, and every write is on the server, or beaten by something
/// as new, or under a deletion written above it, or dropped as `deleted`;
/// a deletion may also be followed by a new document written after the
/// server collected it (or a later deletion of its key).
fn check_after_collection(
    model: &tide_core::Model,
    writes: &[((String, String), Stamp, Payload)],
    ends: &Ends<'_>,
) -> Result<(), String> {
    for (key, row) in model.rows() {
        if row.payload.doc().is_some() && ends.dead.contains(&(key.clone(), row.stamp.clone())) {
            return Err(format!(
                "resurrection: the server holds {key:?} at {:?}, which a deletion replaced",
                row.stamp
            ));
        }
    }
    for (key, stamp, payload) in writes {
        let held = model.row(&key.0, &key.1).map(|r| &r.stamp);
        let covered = held.is_some_and(|s| s >= stamp)
            || writes.iter().any(|(k, s, p)| k == key && s > stamp && p.doc().is_none())
            || ends.deleted.contains(&(key.clone(), stamp.clone()))
            || (payload.doc().is_none() && ends.forgotten.iter().any(|(k, s)| k == key && s >= stamp))
            || payload.doc().is_some_and(|d| d.to_map().contains_key("big"));
        if !(covered || payload.doc().is_none() && held.is_none()) {
            return Err(format!("lost write: {key:?} at {stamp:?} ({payload:?}); the server holds {held:?}"));
        }
    }
    Ok(())
}

/// Writes the server answered `deleted`, by key and stamp.
type DeletedWrites = std::collections::BTreeSet<((String, String), Stamp)>;

/// The highest stamp written locally to each key, and its payloads: one,
/// or several when copies of one store gave that stamp several (the server
/// keeps the first it accepts).
type Oracle = BTreeMap<(String, String), (Stamp, Vec<Payload>)>;

/// Every write made locally, which client made it, and the copies of store
/// files made since, so that the stamps a re-key gave writes can be found
/// in the stores that hold them.
#[derive(Default)]
struct Writes {
    /// Key, stamp as issued, payload, writer.
    all: Vec<((String, String), Stamp, Payload, usize)>,
    /// `(from, to, writes made before the copy)`.
    copies: Vec<(usize, usize, usize)>,
}

impl Writes {
    fn record(&mut self, client: usize, key: (String, String), stamp: Stamp, payload: Payload) {
        self.all.push((key, stamp, payload, client));
    }

    fn copied(&mut self, from: usize, to: usize) {
        self.copies.push((from, to, self.all.len()));
    }

    /// The stores that hold write `w`: its writer and every copy made of
    /// one of them after it.
    fn holders(&self, w: usize) -> Vec<usize> {
        let mut holders = vec![self.all[w].3];
        for &(from, to, before) in &self.copies {
            if before > w && holders.contains(&from) {
                holders.push(to);
            }
        }
        holders
    }

    /// Every write with the stamp it now has (as re-stamped by a store
    /// that re-keyed), once per holder.
    async fn current(&self, cluster: &Cluster) -> Result<Vec<((String, String), Stamp, Payload)>, String> {
        let mut out = Vec::new();
        for (w, (key, stamp, payload, _)) in self.all.iter().enumerate() {
            for holder in self.holders(w) {
                let now = cluster.client(holder).current_stamp(stamp).await.map_err(|e| e.to_string())?;
                out.push((key.clone(), now, payload.clone()));
            }
        }
        Ok(out)
    }

    /// The highest version of every key among all the versions the writes
    /// now have: as issued, or as re-stamped by a store that re-keyed.
    async fn highest(&self, cluster: &Cluster) -> Result<Oracle, String> {
        let mut oracle = Oracle::new();
        for (w, (key, stamp, payload, _)) in self.all.iter().enumerate() {
            for holder in self.holders(w) {
                let now = cluster.client(holder).current_stamp(stamp).await.map_err(|e| e.to_string())?;
                let entry = oracle.entry(key.clone()).or_insert_with(|| (now.clone(), Vec::new()));
                if now > entry.0 {
                    *entry = (now, vec![payload.clone()]);
                } else if now == entry.0 && !entry.1.contains(payload) {
                    entry.1.push(payload.clone());
                }
            }
        }
        Ok(oracle)
    }
}
