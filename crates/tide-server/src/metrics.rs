//! Counters for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tide_core::OpResult;

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    ops: [AtomicU64; 5],
    collect_steps: AtomicU64,
    collected_tombstones: AtomicU64,
    collected_bytes: AtomicU64,
    changes: AtomicU64,
    abandoned: AtomicU64,
    open_connections: AtomicI64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    pub(crate) fn request(&self, route: &'static str, status: u16, took: Duration) {
        *self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry((route, status)).or_default() +=
            1;
        let secs = took.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn results(&self, results: &[OpResult]) {
        for r in results {
            let i = match r {
                OpResult::Applied { .. } => 0,
                OpResult::Duplicate => 1,
                OpResult::Superseded { .. } => 2,
                OpResult::Rejected { .. } | OpResult::Unknown => 3,
                OpResult::Deleted => 4,
            };
            self.ops[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One step of tombstone collection.
    pub(crate) fn collected(&self, step: crate::Collected) {
        self.collect_steps.fetch_add(1, Ordering::Relaxed);
        self.collected_tombstones.fetch_add(step.tombstones, Ordering::Relaxed);
        self.collected_bytes.fetch_add(step.bytes, Ordering::Relaxed);
    }

    pub(crate) fn changes(&self, n: usize) {
        self.changes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, held: usize) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP tide_requests_total HTTP requests by route and status.\n# TYPE tide_requests_total counter\n",
        );
        for ((route, status), n) in self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            let _ = writeln!(out, "tide_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP tide_ops_total Ops received, by result.\n# TYPE tide_ops_total counter\n");
        for (i, name) in ["applied", "duplicate", "superseded", "rejected", "deleted"].iter().enumerate() {
            let _ = writeln!(out, "tide_ops_total{{result=\"{name}\"}} {}", self.ops[i].load(Ordering::Relaxed));
        }
        out.push_str(
            "# HELP tide_changes_served_total Changes sent to clients.\n# TYPE tide_changes_served_total counter\n",
        );
        let _ = writeln!(out, "tide_changes_served_total {}", self.changes.load(Ordering::Relaxed));
        out.push_str(
            "# HELP tide_exchanges_abandoned_total Exchanges whose client hung up before the answer.\n# TYPE tide_exchanges_abandoned_total counter\n",
        );
        let _ = writeln!(out, "tide_exchanges_abandoned_total {}", self.abandoned.load(Ordering::Relaxed));
        for (name, help, value) in [
            ("tide_collect_steps_total", "Steps of tombstone collection run.", &self.collect_steps),
            ("tide_tombstones_collected_total", "Tombstones removed past the horizon.", &self.collected_tombstones),
            (
                "tide_collected_bytes_total",
                "Bytes of stored changes removed with collected tombstones.",
                &self.collected_bytes,
            ),
        ] {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        }
        out.push_str("# HELP tide_open_connections Open client connections.\n# TYPE tide_open_connections gauge\n");
        let _ = writeln!(out, "tide_open_connections {}", self.open_connections.load(Ordering::Relaxed));
        out.push_str("# HELP tide_held_requests Long-polls waiting for a commit.\n# TYPE tide_held_requests gauge\n");
        let _ = writeln!(out, "tide_held_requests {held}");
        out.push_str(
            "# HELP tide_request_duration_seconds Time to answer a sync request.\n# TYPE tide_request_duration_seconds histogram\n",
        );
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "tide_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "tide_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        #[expect(clippy::cast_precision_loss, reason = "a sum of microseconds is shown to a few digits")]
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "tide_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "tide_request_duration_seconds_count {count}");
        out
    }
}
