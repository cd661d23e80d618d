//! Differential test (reliability.md V9): random request sequences give
//! byte-identical answers (results, pages, errors) from `tide_core::Model`,
//! the SQLite backend and the PostgreSQL backend (with
//! `TIDE_TEST_POSTGRES_URL`), behind the real handler, across two namespaces.
//!
//! `TIDE_SEED=n` replays one seed; `TIDE_SEEDS=n` runs n seeds (default 40).

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
    req
}

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

async fn run(seed: u64, postgres: Option<&str>) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let limits =
        Limits { changes_per_response_max: 4, response_bytes_max: 400, lamport_lead_max: 1_000, ..Limits::default() };
    let mut backends: Vec<(&str, Arc<dyn Backend>)> = vec![(
        "sqlite",
        SqliteBackend::open(&dir.path().join("s.db"), Durability::Normal, limits.clone()).await.unwrap(),
    )];
    if let Some(url) = postgres {
        let url = crate::postgres::fresh_schema(url).await;
        backends.push((
            "postgres",
            PostgresBackend::open(&url, tide_server::Durability::Full, limits.clone()).await.unwrap(),
        ));
    }
    let servers: Vec<(&str, Server)> = backends
        .into_iter()
        .map(|(name, backend)| {
            let tokens = StaticTokens::new([("t1", "one"), ("t2", "two")]);
            (
                name,
                Server::new(
                    backend,
                    Arc::new(tokens),
                    ServerConfig { limits: limits.clone(), ..ServerConfig::default() },
                ),
            )
        })
        .collect();
    let mut models = [Model::new(limits.clone()), Model::new(limits)];
    let mut cursors = Vec::new();
    let mut rng = SplitMix64::new(seed);
    for step in 0..120 {
        let ns = rng.below(2) as usize;
        let req = random_request(&mut rng, &cursors);
        let body = serde_json::to_vec(&req).unwrap();
        let expected = match models[ns].exchange(&req) {
            Ok(resp) => (200, serde_json::to_string(&resp).unwrap()),
            Err(v) => (v.status(), serde_json::to_string(&v.to_body()).unwrap()),
        };
        for (name, server) in &servers {
            let got = call(server, ["t1", "t2"][ns], body.clone()).await;
            if got != expected {
                return Err(format!(
                    "step {step}, namespace {ns}, request {}\n {name} {got:?}\n model  {expected:?}",
                    serde_json::to_string(&req).unwrap()
                ));
            }
        }
        if let Ok(resp) = serde_json::from_str::<tide_core::SyncResponse>(&expected.1) {
            cursors.push(resp.cursor.seq());
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
    for &seed in &seeds {
        if let Err(e) = run(seed, postgres.as_deref()).await {
            panic!("seed {seed}: {e}\nreplay: TIDE_SEED={seed} cargo test -p tide-server --test it differential");
        }
    }
    let backends = if postgres.is_some() { "SQLite and PostgreSQL" } else { "SQLite" };
    println!("differential: {} seeds × 120 requests; {backends} matched the model", seeds.len());
}
