//! The seeded simulator over many seeds (reliability.md V1, N1–N4, N6, N10,
//! N11, C10, V3, V7).
//!
//! `TIDE_SIM_SEED=n` replays one seed; `TIDE_SIM_SEEDS=n` runs n seeds
//! (default 24 in CI; thousands for a soak), `TIDE_SIM_SEEDS=a..b` seeds a
//! to b (to split a soak over processes).

use tide_testkit::{SimConfig, SimReport, simulate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_clients_converge_under_faults_and_restarts() {
    run(&SimConfig::default(), "random_clients_converge_under_faults").await;
}

/// The same with tombstones collected behind a short horizon, so clients
/// that go offline come back past it (PROTOCOL.md §14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_clients_converge_with_tombstones_collected() {
    let total = run(&SimConfig::collecting(), "random_clients_converge_with_tombstones").await;
    let many = std::env::var("TIDE_SIM_SEED").is_err();
    assert!(!many || (total.collected > 0 && total.resyncs > 0), "the runs collected and resynced: {total:?}");
}

async fn run(config: &SimConfig, name: &str) -> SimReport {
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("TIDE_SIM_SEED") {
        vec![s.parse().expect("TIDE_SIM_SEED is a number")]
    } else {
        // `TIDE_SIM_SEEDS=n` runs seeds 0..n; `TIDE_SIM_SEEDS=a..b` runs a..b (to split a soak).
        let spec = std::env::var("TIDE_SIM_SEEDS").unwrap_or_else(|_| "24".into());
        let (from, to) = match spec.split_once("..") {
            Some((a, b)) => (a.parse().expect("TIDE_SIM_SEEDS is a..b"), b.parse().expect("TIDE_SIM_SEEDS is a..b")),
            None => (0, spec.parse().expect("TIDE_SIM_SEEDS is a number")),
        };
        (from..to).collect()
    };
    let mut total = SimReport::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        match simulate(seed, config).await {
            Ok(r) => {
                total.writes += r.writes;
                total.exchanges += r.exchanges;
                total.faulted += r.faulted;
                total.restarts += r.restarts;
                total.settle_rounds = total.settle_rounds.max(r.settle_rounds);
                total.restores += r.restores;
                total.rejected += r.rejected;
                total.copies += r.copies;
                total.rekeyed += r.rekeyed;
                total.collected += r.collected;
                total.resyncs += r.resyncs;
                total.deleted += r.deleted;
            }
            // Every seed runs, so a soak reports all that fail, not the first.
            Err(e) => {
                eprintln!("seed {seed} failed: {e}");
                failed.push(seed);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {failed:?}\nreplay one: TIDE_SIM_SEED={} cargo test -p tide-testkit --test it {name}",
        failed.len(),
        seeds.len(),
        failed[0]
    );
    // Over many seeds every kind of fault happens; one replayed seed may miss some.
    let many = seeds.len() >= 10;
    assert!(!many || (total.faulted > 0 && total.restarts > 0), "the runs met faults and restarts: {total:?}");
    assert!(
        !many || ((total.restores > 0 || config.restore_per_mille == 0) && total.rejected > 0 && total.copies > 0),
        "the runs met server restores, rejections and copied stores: {total:?}"
    );
    println!(
        "{name}: {} seeds, {} writes ({} rejected), {} exchanges ({} faulted), {} restarts, {} server restores, \
         {} copied stores ({} re-keys), {} tombstones collected, {} resyncs, {} writes dropped as deleted; \
         settled within {} rounds at most",
        seeds.len(),
        total.writes,
        total.rejected,
        total.exchanges,
        total.faulted,
        total.restarts,
        total.restores,
        total.copies,
        total.rekeyed,
        total.collected,
        total.resyncs,
        total.deleted,
        total.settle_rounds
    );
    total
}
