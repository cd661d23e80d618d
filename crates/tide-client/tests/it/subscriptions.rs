//! Partial sync (PROTOCOL.md §15): a client syncs the collections it
//! subscribes to; one added later is pulled from the beginning without the
//! others being pulled again; one removed stops syncing and, if asked, its
//! documents are freed; and changing the subscription mid-run, while other
//! writers commit between every exchange, loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};
use tide_client::Tide;
use tide_core::{Limits, Op, Payload, SplitMix64, Stamp, SyncRequest, SyncResponse};
use tide_transport::{FakeServer, FakeTransport, Transport};

/// Writes `n` documents to `collection` on `server` as node `writer`.
async fn seed(server: &FakeServer, collection: &str, n: usize) {
    let writer = server.connect("seeder");
    let mut req = SyncRequest::new("seeder", None);
    req.ops = (0..n)
        .map(|i| Op {
            collection: collection.into(),
            id: format!("{collection}-{i}"),
            stamp: Stamp::new(i as u64 + 1, "seeder"),
            payload: Payload::Put(tide_core::Doc::from_value(&json!({ "i": i })).unwrap()),
            op_id: None,
        })
        .collect();
    writer.exchange(&req).await.unwrap();
}

fn subscriber(server: &FakeServer, name: &str, collections: &[&str]) -> tide_client::TideBuilder {
    Tide::builder().node_id(name).transport(Arc::new(server.connect(name))).collections(collections.iter().copied())
}

#[tokio::test]
async fn an_added_collection_is_pulled_without_pulling_the_others_again() {
    let server = FakeServer::new();
    seed(&server, "a", 10).await;
    seed(&server, "b", 5).await;
    seed(&server, "c", 7).await;
    let phone = subscriber(&server, "phone", &["a"]).open().await.unwrap();
    let first = phone.sync_once().await.unwrap();
    assert_eq!(first.pulled, 10, "only the subscribed collection");
    assert!(first.verified, "its digests compare in scope");
    assert_eq!(phone.collection::<Value>("b").count().await.unwrap(), 0);

    phone.subscribe("b").await.unwrap();
    let second = phone.sync_once().await.unwrap();
    assert_eq!(second.pulled, 5, "b from the beginning, a not again");
    assert_eq!(phone.collection::<Value>("b").count().await.unwrap(), 5);
    assert_eq!(phone.collections().await, Some(vec!["a".to_owned(), "b".to_owned()]));

    // Removed and freed: gone locally, and no longer synced.
    assert_eq!(phone.unsubscribe("a", true).await.unwrap(), 10);
    assert_eq!(phone.collection::<Value>("a").count().await.unwrap(), 0);
    seed(&server, "a", 12).await;
    let third = phone.sync_once().await.unwrap();
    assert_eq!(third.pulled, 0);
    assert!(third.verified);
    assert_eq!(phone.collection::<Value>("a").count().await.unwrap(), 0);
    phone.close().await;
}

#[tokio::test]
async fn a_subscription_survives_a_restart_and_the_original_default_syncs_everything() {
    let server = FakeServer::new();
    seed(&server, "a", 3).await;
    seed(&server, "b", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let open = |collections: Option<&[&str]>| {
        let mut builder =
            Tide::builder().path(dir.path().join("s.db")).node_id("phone").transport(Arc::new(server.connect("phone")));
        if let Some(c) = collections {
            builder = builder.collections(c.iter().copied());
        }
        builder.open()
    };
    let phone = open(Some(&["a"])).await.unwrap();
    phone.sync_once().await.unwrap();
    phone.close().await;
    // Reopened without naming collections: the saved subscription holds.
    let phone = open(None).await.unwrap();
    assert_eq!(phone.collections().await, Some(vec!["a".to_owned()]));
    assert_eq!(phone.sync_once().await.unwrap().pulled, 0);
    // Back to every collection: b is caught up.
    phone.set_collections(None::<Vec<String>>).await.unwrap();
    phone.sync_once().await.unwrap();
    assert_eq!(phone.collection::<Value>("b").count().await.unwrap(), 4);
    let err = phone.unsubscribe("a", false).await.unwrap_err();
    assert!(matches!(err, tide_client::Error::Subscription { .. }), "{err}");
    let bad = phone.subscribe("no/slashes").await;
    assert!(matches!(bad, Err(tide_client::Error::Subscription { .. })), "{bad:?}");
    phone.close().await;
}

/// A transport that lets another writer commit before each exchange it
/// forwards (unless quiet), so a catch-up's pages interleave with writes.
struct Interleaved {
    inner: FakeTransport,
    writer: FakeTransport,
    rng: std::sync::Mutex<SplitMix64>,
    lamport: AtomicU64,
    quiet: AtomicBool,
}

const COLLECTIONS: [&str; 4] = ["c0", "c1", "c2", "c3"];

#[async_trait::async_trait]
impl Transport for Interleaved {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, tide_transport::Error> {
        if !self.quiet.load(Ordering::SeqCst) {
            let ops: Vec<Op> = {
                let mut rng = self.rng.lock().unwrap();
                (0..=rng.below(3))
                    .map(|_| {
                        let lamport = self.lamport.fetch_add(1, Ordering::SeqCst);
                        let payload = if rng.below(4) == 0 {
                            Payload::Delete
                        } else {
                            Payload::Put(tide_core::Doc::from_value(&json!({ "v": lamport })).unwrap())
                        };
                        Op {
                            collection: COLLECTIONS[rng.below(4) as usize].into(),
                            id: format!("k{}", rng.below(6)),
                            stamp: Stamp::new(lamport, "writer"),
                            payload,
                            op_id: None,
                        }
                    })
                    .collect()
            };
            let mut req = SyncRequest::new("writer", None);
            req.ops = ops;
            self.writer.exchange(&req).await?;
        }
        self.inner.exchange(request).await
    }
}

/// The server's live documents of `collection`.
fn server_docs(server: &FakeServer, collection: &str) -> BTreeMap<String, String> {
    server
        .model()
        .rows()
        .filter(|(k, r)| k.0 == collection && r.payload.doc().is_some())
        .map(|(k, r)| (k.1.clone(), r.payload.doc().unwrap().as_str().to_owned()))
        .collect()
}

async fn client_docs(tide: &Tide, collection: &str) -> BTreeMap<String, String> {
    let docs = tide.collection::<Value>(collection).list(None, 1_000).await.unwrap();
    docs.into_iter().map(|(id, v)| (id, tide_core::Doc::from_value(&v).unwrap().as_str().to_owned())).collect()
}

fn interleaved(server: &FakeServer, seed: u64) -> Arc<Interleaved> {
    Arc::new(Interleaved {
        inner: server.connect("reader"),
        writer: server.connect("writer"),
        rng: std::sync::Mutex::new(SplitMix64::new(seed)),
        lamport: AtomicU64::new(1),
        quiet: AtomicBool::new(false),
    })
}

/// A sync with no other writer and no fault ends where the server stands:
/// its digest check passes, and every subscribed collection equals the
/// server's, whatever was written or failed before.
async fn ends_where_the_server_stands(
    reader: &Tide,
    transport: &Interleaved,
    server: &FakeServer,
    wanted: &BTreeSet<&str>,
    what: &str,
) {
    transport.quiet.store(true, Ordering::SeqCst);
    let report = reader.sync_once().await.unwrap();
    assert!(report.verified, "{what}: digests in scope match: {report:?}");
    for c in wanted {
        assert_eq!(client_docs(reader, c).await, server_docs(server, c), "{what}: collection {c} of {wanted:?}");
    }
    transport.quiet.store(false, Ordering::SeqCst);
}

#[tokio::test]
async fn subscriptions_changed_mid_run_lose_nothing() {
    let seeds: Vec<u64> = match std::env::var("TIDE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..std::env::var("TIDE_SEEDS").map_or(12, |s| s.parse().unwrap())).collect(),
    };
    for seed in seeds {
        println!("seed {seed} (replay: TIDE_SEED={seed} cargo test -p tide-client --test it subscriptions_changed)");
        one_run(seed).await;
    }
}

async fn one_run(seed: u64) {
    // Small pages, so a catch-up takes several exchanges with writes between.
    let server = FakeServer::with_limits(Limits { changes_per_response_max: 3, ..Limits::default() });
    let transport = interleaved(&server, seed);
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    let reader = Tide::builder()
        .node_id("reader")
        .transport(Arc::clone(&transport) as Arc<dyn Transport>)
        .collections(["c0"])
        .open()
        .await
        .unwrap();
    let mut wanted: BTreeSet<&str> = BTreeSet::from(["c0"]);
    for round in 0..12 {
        let c = COLLECTIONS[rng.below(4) as usize];
        match rng.below(4) {
            0 | 1 => {
                reader.subscribe(c).await.unwrap();
                wanted.insert(c);
            }
            2 => {
                let free = rng.below(2) == 0;
                reader.unsubscribe(c, free).await.unwrap();
                wanted.remove(c);
                if free {
                    assert!(client_docs(&reader, c).await.is_empty(), "seed {seed} round {round}: {c} freed");
                }
            }
            _ => {}
        }
        reader.sync_once().await.unwrap();
        ends_where_the_server_stands(&reader, &transport, &server, &wanted, &format!("seed {seed} round {round}"))
            .await;
    }
    reader.close().await;
}

/// The same under faults (dropped requests, lost responses, duplicates,
/// 503s, garbage) and restarts: syncs may fail, but once the faults stop,
/// a sync ends where the server stands, for every collection subscribed to.
#[tokio::test]
async fn subscriptions_changed_under_faults_and_restarts_lose_nothing() {
    let seeds: Vec<u64> = match std::env::var("TIDE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..std::env::var("TIDE_SEEDS").map_or(8, |s| s.parse().unwrap())).collect(),
    };
    for seed in seeds {
        println!(
            "seed {seed} (replay: TIDE_SEED={seed} cargo test -p tide-client --test it subscriptions_changed_under)"
        );
        faulty_run(seed).await;
    }
}

async fn faulty_run(seed: u64) {
    let server = FakeServer::with_limits(Limits { changes_per_response_max: 3, ..Limits::default() });
    let rates = tide_transport::FaultRates {
        drop: 6,
        lose_response: 6,
        duplicate: 6,
        unavailable: 4,
        rate_limited: 0,
        garbage: 3,
    };
    let transport = interleaved(&server, seed);
    let dir = tempfile::tempdir().unwrap();
    let open = |first: bool| {
        let mut builder = Tide::builder()
            .path(dir.path().join("reader.db"))
            .node_id("reader")
            .transport(Arc::clone(&transport) as Arc<dyn Transport>);
        if first {
            builder = builder.collections(["c0"]);
        }
        builder.open()
    };
    let mut rng = SplitMix64::new(seed ^ 0xfa17);
    let mut reader = open(true).await.unwrap();
    let mut wanted: BTreeSet<&str> = BTreeSet::from(["c0"]);
    for round in 0..10 {
        server.chaos(Some((seed + round, rates)));
        for _ in 0..4 {
            let c = COLLECTIONS[rng.below(4) as usize];
            match rng.below(6) {
                0 | 1 => {
                    reader.subscribe(c).await.unwrap();
                    wanted.insert(c);
                }
                2 => {
                    reader.unsubscribe(c, rng.below(2) == 0).await.unwrap();
                    wanted.remove(c);
                }
                3 => {
                    reader.close().await;
                    reader = open(false).await.unwrap();
                    assert_eq!(reader.collections().await.map(|c| c.len()), Some(wanted.len()), "seed {seed}: saved");
                }
                _ => {}
            }
            // Errors are expected under faults: what a sync did is kept.
            let _ = reader.sync_once().await;
        }
        server.chaos(None);
        ends_where_the_server_stands(&reader, &transport, &server, &wanted, &format!("seed {seed} round {round}"))
            .await;
    }
    reader.close().await;
}
