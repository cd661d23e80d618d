//! Differential test (reliability.md V9): random request sequences give
//! byte-identical answers (results, pages, errors) from `tide_core::Model`,
//! the SQLite backend and the PostgreSQL backend (with
//! `TIDE_TEST_POSTGRES_URL`), behind the real handler, across two namespaces.
//!
//! The same under concurrency: batches of requests sent at once, so write
//! groups commit several together, matched against the model in some order
//! of each batch.
//!
//! `TIDE_SEED=n` replays one seed; `TIDE_SEEDS=n` runs n seeds (default 40,
//! and 10 of the concurrent batches).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tide_core::digest;
use tide_core::{
    Cursor, DocKey, HeldVersion, Limits, Lineage, Model, Op, Payload, SplitMix64, Stamp, SyncRequest, Verify,
};
use tide_server::{Backend, Durability, PostgresBackend, Server, ServerConfig, SqliteBackend, StaticTokens};

fn random_request(rng: &mut SplitMix64, cursors: &[u64]) -> SyncRequest {
    // Node ids that sort differently by locale and by bytes: the tie-break must be bytewise everywhere.
    let node = ["a", "B", "\u{e9}"][rng.below(3) as usize];
    let cursor = match rng.below(4) {
        0 => None,
        1 => Some(Cursor(rng.below(40))),
        _ => cursors.get(rng.below(cursors.len().max(1) as u64) as usize).map(|c| Cursor(*c)),
    };
    let mut req = SyncRequest::new(node, cursor);
    req.limit = (rng.below(3) > 0).then(|| 1 + rng.below(6) as u32);
    let n = rng.below(5);
    req.ops = (0..n)
        .map(|_| {
            let payload = match rng.below(4) {
                0 => Payload::Delete,
                _ => Payload::Put(json!({"v": rng.below(3), "s": "é\"\\"}).as_object().cloned().unwrap().into()),
            };
            let lamport = if rng.below(30) == 0 { 2_000_000_000 } else { 1 + rng.below(8) };
            let author = if rng.below(40) == 0 { "intruder" } else { node };
            Op {
                collection: format!("c{}", rng.below(2)),
                id: format!("k{}", rng.below(4)),
                stamp: Stamp::new(lamport, author),
                payload,
                op_id: None,
            }
        })
        .collect();
    extensions(rng, &mut req);
    req.live_below = (rng.below(6) == 0).then(|| rng.below(40));
    // Bases (PROTOCOL.md §14): some ops edit versions at or below a horizon.
    if rng.below(3) == 0 {
        req.bases = req.ops.iter().map(|_| (rng.below(2) == 0).then(|| rng.below(30))).collect();
    }
    req.from_head = (rng.below(6) == 0).then(|| rng.below(40));
    // A subscription (PROTOCOL.md §15): one collection, both, a stranger, or none.
    req.collections = match rng.below(6) {
        0 => Some(vec!["c0".into()]),
        1 => Some(vec!["c1".into(), "c9".into()]),
        2 => Some(Vec::new()),
        _ => None,
    };
    req
}

/// The horizon distance of the differential runs: short, so collection
/// meets every request shape.
const HORIZON_SEQS: u64 = 3;

/// The digest, fetch, repair and request-id extensions (PROTOCOL.md §12), at random.
fn extensions(rng: &mut SplitMix64, req: &mut SyncRequest) {
    let collection = format!("c{}", rng.below(2));
    let buckets: Vec<u16> = (0..4).map(|k| digest::bucket(&collection, &format!("k{k}"))).collect();
    req.verify = match rng.below(8) {
        0 | 1 => Some(Verify::Roots),
        2 => Some(Verify::Groups { collection }),
        3 => Some(Verify::Buckets {
            collection,
            groups: buckets.iter().map(|b| u16::from(digest::group(*b))).filter(|_| rng.below(2) == 0).collect(),
        }),
        4 => {
            let mut have = Vec::new();
            for k in 0..4 {
                if rng.below(2) == 0 {
                    let node = ["a", "B"][rng.below(2) as usize];
                    let hash = digest::Hash64(rng.below(3));
                    have.push(HeldVersion(format!("k{k}"), rng.below(9), node.into(), rng.below(3) > 0, hash));
                }
            }
            let buckets = buckets.into_iter().filter(|_| rng.below(3) > 0).collect();
            Some(Verify::Keys { collection, buckets, have })
        }
        _ => None,
    };
    if rng.below(4) == 0 {
        req.fetch =
            (0..rng.below(4)).map(|_| DocKey(format!("c{}", rng.below(2)), format!("k{}", rng.below(5)))).collect();
    }
    if rng.below(8) == 0 {
        // A repair: versions of other nodes, with their own stamps.
        req.repair = true;
        for op in &mut req.ops {
            op.stamp.node_id = ["a", "B", "\u{e9}", "d"][rng.below(4) as usize].into();
        }
    }
    if rng.below(2) == 0 {
        req.request_id = Some(format!("r{}", rng.below(1000)));
    }
    if rng.below(2) == 0 {
        // Links from a few tokens, so chains continue, retry and conflict.
        let token = |rng: &mut SplitMix64| format!("t{}", rng.below(3));
        let prev = (rng.below(4) > 0).then(|| token(rng));
        req.lineage = Some(Lineage { prev, next: token(rng), height: rng.below(4) });
    }
}

async fn call(server: &Server, token: &str, body: Vec<u8>) -> (u16, String) {
    let req = http::Request::post("/sync")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = server.handle(req).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The limits of the differential runs: small pages, a short counter lead.
fn limits() -> Limits {
    Limits { changes_per_response_max: 4, response_bytes_max: 400, lamport_lead_max: 1_000, ..Limits::default() }
}

/// SQLite (at `durability`) in `dir`, and PostgreSQL in a fresh schema when given.
async fn backends(
    dir: &std::path::Path,
    durability: Durability,
    postgres: Option<&str>,
) -> Vec<(&'static str, Arc<dyn Backend>)> {
    let mut backends: Vec<(&str, Arc<dyn Backend>)> =
        vec![("sqlite", SqliteBackend::open(&dir.join("s.db"), durability, limits()).await.unwrap())];
    if let Some(url) = postgres {
        let url = crate::postgres::fresh_schema(url).await;
        backends.push(("postgres", PostgresBackend::open(&url, Durability::Full, limits()).await.unwrap()));
    }
    backends
}

/// How often the collection rules showed in a run's answers: `deleted`
/// results and `resync` pages.
#[derive(Default)]
struct Seen {
    deleted: usize,
    resyncs: usize,
    /// Answers whose page was read before the request's ops (§4.2), told
    /// apart from the one read after them.
    read_before: usize,
}

async fn run(seed: u64, postgres: Option<&str>, met: &mut Seen) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits();
    let backends = backends(dir.path(), Durability::Normal, postgres).await;
    let servers: Vec<(&str, Server)> = backends
        .into_iter()
        .map(|(name, backend)| {
            let tokens = StaticTokens::new([("t1", "one"), ("t2", "two")]);
            (
                name,
                Server::new(
                    backend,
                    Arc::new(tokens),
                    ServerConfig {
                        limits: limits.clone(),
                        tombstone_horizon_seqs: HORIZON_SEQS,
                        ..ServerConfig::default()
                    },
                ),
            )
        })
        .collect();
    let mut models = [Model::new(limits.clone()), Model::new(limits)];
    let mut cursors = Vec::new();
    let mut rng = SplitMix64::new(seed);
    for step in 0..120 {
        if rng.below(10) == 0 {
            // Tombstones collected behind the horizon, in both namespaces.
            for model in &mut models {
                model.collect(model.seq().saturating_sub(HORIZON_SEQS));
            }
            for (name, server) in &servers {
                server.collect().await.map_err(|e| format!("step {step}: {name} collect: {e}"))?;
            }
        }
        let ns = rng.below(2) as usize;
        let req = random_request(&mut rng, &cursors);
        let body = serde_json::to_vec(&req).unwrap();
        let answer = |resp: Result<tide_core::SyncResponse, tide_core::Violation>| match resp {
            Ok(resp) => (200, serde_json::to_string(&resp).unwrap()),
            Err(v) => (v.status(), serde_json::to_string(&v.to_body()).unwrap()),
        };
        // A page read beside the request's ops (§4.2) may have been read
        // before or after them: either answer, byte for byte.
        let beside = answer(models[ns].clone().exchange_beside(&req));
        let expected = answer(models[ns].exchange(&req));
        for (name, server) in &servers {
            let got = call(server, ["t1", "t2"][ns], body.clone()).await;
            met.read_before += usize::from(got == beside && got != expected);
            if got != expected && got != beside {
                return Err(format!(
                    "step {step}, namespace {ns}, request {}\n {name} {got:?}\n model  {expected:?}\n or, read beside its ops {beside:?}",
                    serde_json::to_string(&req).unwrap()
                ));
            }
        }
        if let Ok(resp) = serde_json::from_str::<tide_core::SyncResponse>(&expected.1) {
            cursors.push(resp.cursor.seq());
            met.deleted += resp.results.iter().filter(|r| **r == tide_core::OpResult::Deleted).count();
            met.resyncs += usize::from(resp.resync);
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_backend_answers_exactly_as_the_model() {
    let postgres = crate::postgres::url();
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("TIDE_SEED") {
        vec![s.parse().unwrap()]
    } else {
        (0..std::env::var("TIDE_SEEDS").map_or(40, |s| s.parse().unwrap())).collect()
    };
    let mut seen = Seen::default();
    for &seed in &seeds {
        if let Err(e) = run(seed, postgres.as_deref(), &mut seen).await {
            panic!("seed {seed}: {e}\nreplay: TIDE_SEED={seed} cargo test -p tide-server --test it differential");
        }
    }
    assert!(seeds.len() < 10 || (seen.deleted > 0 && seen.resyncs > 0), "the runs met the collection rules");
    assert!(seeds.len() < 10 || seen.read_before > 0, "the runs met pages read beside their ops");
    let backends = if postgres.is_some() { "SQLite and PostgreSQL" } else { "SQLite" };
    println!(
        "differential: {} seeds × 120 requests ({} deleted results, {} resyncs, {} pages read before their ops); {backends} matched the model",
        seeds.len(),
        seen.deleted,
        seen.resyncs,
        seen.read_before
    );
}

/// The most model states a concurrent run keeps apart at once.
const CANDIDATES_MAX: usize = 64;

/// Every order of `n` items (n ≤ 4 here), by insertion.
fn orders(n: usize) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    for i in 0..n {
        all = all
            .into_iter()
            .flat_map(|order: Vec<usize>| {
                (0..=order.len()).map(move |at| {
                    let mut o = order.clone();
                    o.insert(at, i);
                    o
                })
            })
            .collect();
    }
    all
}

/// What a request's answer must match under concurrency: its status and
/// per-op results when served, the whole refusal otherwise (its page depends
/// on when it was read, which a concurrent batch leaves open).
fn outcome(status: u16, body: &str) -> (u16, String) {
    if status == 200 {
        let resp: tide_core::SyncResponse = serde_json::from_str(body).unwrap();
        (200, serde_json::to_string(&resp.results).unwrap())
    } else {
        (status, body.to_owned())
    }
}

/// The model's outcome for a request.
fn model_outcome(model: &mut Model, req: &SyncRequest) -> (u16, String) {
    match model.exchange(req) {
        Ok(resp) => outcome(200, &serde_json::to_string(&resp).unwrap()),
        Err(v) => (v.status(), serde_json::to_string(&v.to_body()).unwrap()),
    }
}

/// Concurrent batches: each step sends one to four requests at once to a
/// backend, so its write groups commit several together. Every answer
/// (status and per-op results, or the refusal) must be the model's for one
/// order of the batch, and after each batch every page of the namespace, read
/// from the start, is byte-identical to the model's.
async fn run_concurrent(seed: u64, postgres: Option<&str>) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits();
    for (name, backend) in backends(dir.path(), Durability::Full, postgres).await {
        let tokens = StaticTokens::new([("t1", "one"), ("t2", "two")]);
        let config = ServerConfig { limits: limits.clone(), ..ServerConfig::default() };
        let server = Server::new(backend, Arc::new(tokens), config);
        // The states the model may be in: orders that give the same answers
        // can leave different chains (§13) behind, so all are kept until a
        // later answer tells them apart.
        let mut models = [vec![Model::new(limits.clone())], vec![Model::new(limits.clone())]];
        let mut cursors = Vec::new();
        let mut rng = SplitMix64::new(seed);
        for step in 0..60 {
            let ns = rng.below(2) as usize;
            let token = ["t1", "t2"][ns];
            let batch: Vec<SyncRequest> = (0..=rng.below(4)).map(|_| random_request(&mut rng, &cursors)).collect();
            let answers = futures_util::future::join_all(
                batch.iter().map(|req| call(&server, token, serde_json::to_vec(req).unwrap())),
            )
            .await;
            let got: Vec<(u16, String)> = answers.iter().map(|(status, body)| outcome(*status, body)).collect();
            let mut next = Vec::new();
            // Equal states found by several orders are kept once (the model's
            // maps are ordered, so its debug text is a fingerprint).
            let mut fingerprints = std::collections::HashSet::new();
            for candidate in &models[ns] {
                for order in orders(batch.len()) {
                    let mut model = candidate.clone();
                    let mut expected = vec![(0, String::new()); batch.len()];
                    for &i in &order {
                        expected[i] = model_outcome(&mut model, &batch[i]);
                    }
                    if expected == got && fingerprints.insert(format!("{model:?}")) {
                        assert!(next.len() < CANDIDATES_MAX, "more than {CANDIDATES_MAX} model states stay apart");
                        next.push(model);
                    }
                }
            }
            if next.is_empty() {
                let requests: Vec<String> = batch.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
                let mut model = models[ns][0].clone();
                let in_order: Vec<(u16, String)> = batch.iter().map(|r| model_outcome(&mut model, r)).collect();
                return Err(format!(
                    "step {step}, {name}, namespace {ns}: no order of the batch gives its answers\n requests {requests:#?}\n answers {got:#?}\n the model in the batch's order {in_order:#?}"
                ));
            }
            // Every page of the namespace from the start, as a new node reads them.
            let mut cursor = None;
            loop {
                let pull = SyncRequest::new("observer", cursor);
                let got = call(&server, token, serde_json::to_vec(&pull).unwrap()).await;
                next.retain_mut(|model| {
                    model.exchange(&pull).is_ok_and(|expected| got == (200, serde_json::to_string(&expected).unwrap()))
                });
                if next.is_empty() {
                    return Err(format!(
                        "step {step}, {name}, namespace {ns}: pull from {cursor:?}: no model state gives {got:?}"
                    ));
                }
                let page: tide_core::SyncResponse = serde_json::from_str(&got.1).unwrap();
                cursors.push(page.cursor.seq());
                if !page.has_more {
                    break;
                }
                cursor = Some(page.cursor);
            }
            models[ns] = next;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_commit_in_groups_exactly_as_the_model_in_some_order() {
    let postgres = crate::postgres::url();
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("TIDE_SEED") {
        vec![s.parse().unwrap()]
    } else {
        (0..std::env::var("TIDE_SEEDS").map_or(10, |s| s.parse().unwrap())).collect()
    };
    for &seed in &seeds {
        if let Err(e) = run_concurrent(seed, postgres.as_deref()).await {
            panic!(
                "seed {seed}: {e}\nreplay: TIDE_SEED={seed} cargo test -p tide-server --test it concurrent_requests_commit"
            );
        }
    }
}
