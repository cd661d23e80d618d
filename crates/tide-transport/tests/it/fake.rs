//! The fake's faults, each one, and its record of the traffic.

use std::time::Duration;

use serde_json::json;
use tide_core::{Cursor, Op, OpResult, Payload, Stamp, SyncRequest};
use tide_transport::{Error, FakeServer, Fault, FaultRates, Outcome, Transport};

use crate::doc;

fn push(node: &str, id: &str, lamport: u64) -> SyncRequest {
    let mut req = SyncRequest::new(node, None);
    req.ops = vec![Op {
        collection: "c".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc(json!({"v": lamport}))),
        op_id: None,
    }];
    req
}

#[tokio::test]
async fn fail_next_n_then_recover() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.fail_next("a", 2);
    for _ in 0..2 {
        let err = a.exchange(&push("a", "x", 1)).await.unwrap_err();
        assert!(matches!(err, Error::Network { .. }) && err.is_retryable(), "{err}");
    }
    assert_eq!(server.model().seq(), 0, "dropped requests never reach the server");
    assert_eq!(a.exchange(&push("a", "x", 1)).await.unwrap().results, [OpResult::Applied { seq: 1 }]);
}

#[tokio::test]
async fn a_response_lost_after_commit_makes_the_retry_a_duplicate() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.script("a", [Fault::LoseResponse]);
    assert!(a.exchange(&push("a", "x", 1)).await.unwrap_err().is_retryable());
    assert_eq!(server.model().seq(), 1, "the server committed");
    assert_eq!(a.exchange(&push("a", "x", 1)).await.unwrap().results, [OpResult::Duplicate]);
    assert_eq!(server.model().seq(), 1, "and nothing twice");
}

#[tokio::test]
async fn a_duplicated_request_applies_once() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.script("a", [Fault::Duplicate]);
    let resp = a.exchange(&push("a", "x", 1)).await.unwrap();
    assert_eq!(resp.results, [OpResult::Duplicate], "the client sees the second delivery's answer");
    assert_eq!(server.model().seq(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_delay_holds_the_exchange() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.script("a", [Fault::Delay(Duration::from_secs(30))]);
    let start = tokio::time::Instant::now();
    a.exchange(&push("a", "x", 1)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

#[tokio::test]
async fn a_partition_cuts_one_client_until_healed() {
    let server = FakeServer::new();
    let (a, b) = (server.connect("a"), server.connect("b"));
    server.partition("a");
    for _ in 0..3 {
        assert!(matches!(a.exchange(&push("a", "x", 1)).await, Err(Error::Network { .. })));
    }
    b.exchange(&push("b", "y", 1)).await.unwrap();
    server.heal("a");
    let resp = a.exchange(&push("a", "x", 1)).await.unwrap();
    assert_eq!(resp.results, [OpResult::Applied { seq: 2 }]);
}

#[tokio::test]
async fn chosen_statuses_with_retry_after() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.script(
        "a",
        [
            Fault::Status { status: 500, retry_after: None },
            Fault::Status { status: 503, retry_after: Some(Duration::from_secs(3)) },
            Fault::Status { status: 429, retry_after: Some(Duration::from_secs(9)) },
        ],
    );
    for (status, retry_after) in [(500, None), (503, Some(3)), (429, Some(9))] {
        let err = a.exchange(&push("a", "x", 1)).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: s, .. } if s == status), "{err}");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), retry_after.map(Duration::from_secs));
    }
    assert_eq!(server.model().seq(), 0, "an injected status touches nothing");
}

#[tokio::test]
async fn a_garbled_body_is_malformed_after_the_commit() {
    let server = FakeServer::new();
    let a = server.connect("a");
    server.script("a", [Fault::Garbage]);
    let err = a.exchange(&push("a", "x", 1)).await.unwrap_err();
    assert!(matches!(err, Error::MalformedResponse { .. }), "{err}");
    assert_eq!(server.model().seq(), 1);
}

#[tokio::test]
async fn traffic_is_recorded() {
    let server = FakeServer::new();
    let (a, b) = (server.connect("a"), server.connect("b"));
    server.script("a", [Fault::LoseResponse]);
    let _ = a.exchange(&push("a", "x", 1)).await;
    b.exchange(&SyncRequest::new("b", Some(Cursor(0)))).await.unwrap();
    let traffic = server.traffic();
    assert_eq!(traffic.len(), 2);
    assert_eq!(
        (traffic[0].client.as_str(), &traffic[0].fault, traffic[0].committed),
        ("a", &Some(Fault::LoseResponse), true)
    );
    assert_eq!(traffic[0].request.ops[0].id, "x");
    assert!(matches!(&traffic[0].outcome, Outcome::Failed(m) if m.contains("lost")));
    assert!(matches!(&traffic[1].outcome, Outcome::Response(r) if r.changes.len() == 1));
    server.clear_traffic();
    assert!(server.traffic().is_empty());
}

#[tokio::test]
async fn seeded_chaos_is_reproducible() {
    let rates =
        FaultRates { drop: 20, lose_response: 20, duplicate: 10, unavailable: 10, rate_limited: 10, garbage: 10 };
    let run = |seed| async move {
        let server = FakeServer::new();
        server.chaos(Some((seed, rates)));
        let a = server.connect("a");
        for i in 1..=40 {
            let _ = a.exchange(&push("a", &format!("k{i}"), i)).await;
        }
        server.traffic().into_iter().map(|e| e.fault).collect::<Vec<_>>()
    };
    let first = run(42).await;
    assert_eq!(first, run(42).await, "the same seed gives the same faults");
    assert_ne!(first, run(43).await);
    let faulted = first.iter().filter(|f| f.is_some()).count();
    assert!((10..=40).contains(&faulted), "about 80% of 40 exchanges are faulted: {faulted}");
}
