//! `GET /metrics` in the `OpenMetrics` text format, through `prometheus-client`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tide_core::OpResult;

/// Upper bounds of the request latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Upper bounds of the long-poll hold histogram's buckets, in seconds.
const HOLD_BUCKETS: [f64; 9] = [0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];
/// The most namespaces `/metrics` names one by one; the exchanges of any
/// later one count under `namespace="other"`, so a server with many
/// tenants keeps a bounded number of series.
pub const METRICS_NAMESPACES_MAX: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ops: Family<ResultLabels, Counter>,
    namespaces: Family<NamespaceLabels, Counter>,
    /// The namespaces named so far (at most [`METRICS_NAMESPACES_MAX`]).
    named: Mutex<std::collections::HashSet<String>>,
    changes: Counter,
    abandoned: Counter,
    collect_steps: Counter,
    collected_tombstones: Counter,
    collected_bytes: Counter,
    open_connections: Gauge,
    held: Gauge,
    latency: Histogram,
    holds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("tide_requests", "HTTP requests by route and status", requests.clone());
        let ops = Family::<ResultLabels, Counter>::default();
        registry.register("tide_ops", "Ops received, by result", ops.clone());
        let namespaces = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "tide_namespace_exchanges",
            "Sync exchanges by namespace (the first 64 by name, then \"other\")",
            namespaces.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::<u64, AtomicU64>::default();
            registry.register(name, help, c.clone());
            c
        };
        let changes = counter(&mut registry, "tide_changes_served", "Changes sent to clients");
        let abandoned =
            counter(&mut registry, "tide_exchanges_abandoned", "Exchanges whose client hung up before the answer");
        let collect_steps = counter(&mut registry, "tide_collect_steps", "Steps of tombstone collection run");
        let collected_tombstones =
            counter(&mut registry, "tide_tombstones_collected", "Tombstones removed past the horizon");
        let collected_bytes =
            counter(&mut registry, "tide_collected_bytes", "Bytes of stored changes removed with collected tombstones");
        let open_connections = Gauge::default();
        registry.register("tide_open_connections", "Open client connections", open_connections.clone());
        let held = Gauge::default();
        registry.register("tide_held_requests", "Long-polls waiting for a commit", held.clone());
        let latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "tide_request_duration_seconds",
            "Time to answer a request (a long-poll's includes its hold, also in tide_long_poll_hold_seconds)",
            latency.clone(),
        );
        let holds = Histogram::new(HOLD_BUCKETS);
        registry.register("tide_long_poll_hold_seconds", "How long long-polls were held", holds.clone());
        Self {
            registry,
            requests,
            ops,
            namespaces,
            named: Mutex::default(),
            changes,
            abandoned,
            collect_steps,
            collected_tombstones,
            collected_bytes,
            open_connections,
            held,
            latency,
            holds,
        }
    }
}

impl Metrics {
    pub(crate) fn request(&self, route: &'static str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// A long-poll that was held `held` before it was answered.
    pub(crate) fn held_for(&self, held: Duration) {
        self.holds.observe(held.as_secs_f64());
    }

    /// An exchange of `namespace`.
    pub(crate) fn exchange(&self, namespace: &str) {
        let label = {
            let mut named = self.named.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if named.contains(namespace) || (named.len() < METRICS_NAMESPACES_MAX && named.insert(namespace.to_owned()))
            {
                namespace.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.namespaces.get_or_create(&NamespaceLabels { namespace: label }).inc();
    }

    pub(crate) fn results(&self, results: &[OpResult]) {
        for r in results {
            let result = match r {
                OpResult::Applied { .. } => "applied",
                OpResult::Duplicate => "duplicate",
                OpResult::Superseded { .. } => "superseded",
                OpResult::Rejected { .. } | OpResult::Unknown => "rejected",
                OpResult::Deleted => "deleted",
            };
            self.ops.get_or_create(&ResultLabels { result }).inc();
        }
    }

    /// One step of tombstone collection.
    pub(crate) fn collected(&self, step: crate::Collected) {
        self.collect_steps.inc();
        self.collected_tombstones.inc_by(step.tombstones);
        self.collected_bytes.inc_by(step.bytes);
    }

    pub(crate) fn changes(&self, n: usize) {
        self.changes.inc_by(n as u64);
    }

    pub(crate) fn abandoned(&self) {
        self.abandoned.inc();
    }

    pub(crate) fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub(crate) fn render(&self, held: usize) -> String {
        self.held.set(i64::try_from(held).unwrap_or(i64::MAX));
        // Every op result, counted or not, so dashboards see zeros.
        for result in ["applied", "duplicate", "superseded", "rejected", "deleted"] {
            let _ = self.ops.get_or_create(&ResultLabels { result });
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
