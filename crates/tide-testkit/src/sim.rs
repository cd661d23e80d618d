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
}

/// Runs one simulation. `Err` says what broke; the caller prints the seed.
///
/// Checked along the way: reads never go back (a replica's stamp for a key
/// never decreases, P7). Checked at the end, after healing: every outbox
/// drains within `settle_rounds_max` rounds (liveness, P8); every replica
/// equals the server, and the server holds, for every key, the highest
/// stamp ever written locally with its payload: so no acknowledged write
/// is lost and no deleted document comes back (P1, P4, P5).
pub async fn simulate(seed: u64, config: &SimConfig) -> Result<SimReport, String> {
    let mut rng = SplitMix64::new(seed);
    let server =
        FakeServer::with_limits(Limits { changes_per_response_max: config.page_changes_max, ..Limits::default() });
    server.chaos(Some((seed, config.rates)));
    let mut cluster = Cluster::new(server, config.clients).await.map_err(|e| e.to_string())?;
    let mut report = SimReport::default();
    let mut oracle: BTreeMap<(String, String), (Stamp, Payload)> = BTreeMap::new();
    let mut last_read: Vec<Snapshot> = vec![Snapshot::new(); config.clients];
    let mut offline = vec![false; config.clients];
    let keys: Vec<(String, String)> = (0..config.collections)
        .flat_map(|c| (0..config.ids).map(move |i| (format!("col{c}"), format!("k{i}"))))
        .collect();

    for step in 0..config.steps {
        let c = rng.index(config.clients);
        let collection = format!("col{}", rng.below(config.collections as u64));
        let id = format!("k{}", rng.below(config.ids as u64));
        match rng.below(100) {
            0..=39 => {
                let payload =
                    Payload::Put(json!({"v": rng.below(1000), "by": c}).as_object().cloned().unwrap_or_default());
                let tide = cluster.client(c);
                let stamp = match &payload {
                    Payload::Put(doc) => {
                        tide.collection::<serde_json::Value>(&collection)
                            .put(&id, &serde_json::Value::Object(doc.clone()))
                            .await
                    }
                    Payload::Delete => unreachable!(),
                }
                .map_err(|e| format!("step {step}: a local write failed: {e}"))?;
                record(&mut oracle, collection, id, stamp, payload);
                report.writes += 1;
            }
            40..=51 => {
                let stamp = cluster
                    .client(c)
                    .collection::<serde_json::Value>(&collection)
                    .delete(&id)
                    .await
                    .map_err(|e| format!("step {step}: a local delete failed: {e}"))?;
                record(&mut oracle, collection, id, stamp, Payload::Delete);
                report.writes += 1;
            }
            52..=84 => {
                // Errors are expected under faults: the outbox keeps the ops.
                let _ = cluster.client(c).sync_once().await;
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
                cluster.restart(c).await.map_err(|e| format!("step {step}: restart failed: {e}"))?;
                report.restarts += 1;
            }
        }
        // P7: no replica's stamp for a key ever goes back.
        let now = cluster.snapshot_keys(c, &keys).await.map_err(|e| e.to_string())?;
        for (key, (stamp, _)) in &last_read[c] {
            match now.get(key) {
                Some((s, _)) if s >= stamp => {}
                other => return Err(format!("step {step}: c{c} went back on {key:?}: had {stamp:?}, now {other:?}")),
            }
        }
        last_read[c] = now;
    }

    report.settle_rounds = cluster
        .settle(config.settle_rounds_max)
        .await
        .ok_or_else(|| format!("liveness: outboxes did not drain within {} rounds", config.settle_rounds_max))?;
    let traffic = cluster.server().traffic();
    report.exchanges = traffic.len();
    report.faulted = traffic.iter().filter(|e| e.fault.is_some()).count();
    cluster.check_converged().await?;
    let server: BTreeMap<(String, String), (Stamp, Payload)> =
        cluster.server().model().rows().map(|(k, r)| (k.clone(), (r.stamp.clone(), r.payload.clone()))).collect();
    if server != oracle {
        let key = oracle.iter().find(|(k, v)| server.get(*k) != Some(*v)).map(|(k, _)| k.clone());
        return Err(format!("the server is not the highest write of every key; first difference at {key:?}"));
    }
    cluster.close().await;
    Ok(report)
}

fn record(
    oracle: &mut BTreeMap<(String, String), (Stamp, Payload)>,
    collection: String,
    id: String,
    stamp: Stamp,
    payload: Payload,
) {
    let entry = oracle.entry((collection, id)).or_insert_with(|| (stamp.clone(), payload.clone()));
    if stamp > entry.0 {
        *entry = (stamp, payload);
    }
}
