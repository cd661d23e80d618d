//! The original's behaviours, re-tested through this API, and its quirks
//! fixed (original-tide-0.2.1.md §6).

use std::collections::BTreeSet;

use serde_json::json;
use tide_client::{Batch, Error, Tide};
use tide_transport::{FakeServer, Fault};

use crate::{Note, client, file_client, note};

#[tokio::test]
async fn two_clients_converge() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    a.collection::<Note>("notes").put("n1", &note("from a")).await.unwrap();
    b.collection::<Note>("notes").put("n2", &note("from b")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    a.sync_once().await.unwrap();
    for t in [&a, &b] {
        let all = t.collection::<Note>("notes").list(None, 10).await.unwrap();
        assert_eq!(all, [("n1".into(), note("from a")), ("n2".into(), note("from b"))]);
    }
}

#[tokio::test]
async fn conflicts_resolve_by_lamport_then_node_id() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    // Both write k at counter 1 offline: the tie goes to node id "b".
    a.collection::<Note>("n").put("k", &note("a")).await.unwrap();
    b.collection::<Note>("n").put("k", &note("b")).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.acknowledged, 1);
    b.sync_once().await.unwrap();
    a.sync_once().await.unwrap();
    assert_eq!(a.collection::<Note>("n").get("k").await.unwrap(), Some(note("b")));
    // A write made after seeing b's wins everywhere, whatever the node ids.
    a.collection::<Note>("n").put("k", &note("a, later")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    assert_eq!(b.collection::<Note>("n").get("k").await.unwrap(), Some(note("a, later")));
}

#[tokio::test]
async fn deletes_sync_and_re_create_works() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    let (na, nb) = (a.collection::<Note>("n"), b.collection::<Note>("n"));
    na.put("k", &note("v1")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    nb.delete("k").await.unwrap();
    b.sync_once().await.unwrap();
    a.sync_once().await.unwrap();
    assert_eq!(na.get("k").await.unwrap(), None);
    assert_eq!(na.count().await.unwrap(), 0);
    na.put("k", &note("v2")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    assert_eq!(nb.get("k").await.unwrap(), Some(note("v2")));
}

#[tokio::test]
async fn offline_writes_sync_later_and_transient_failures_keep_the_outbox() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    for i in 0..5 {
        a.collection::<Note>("n").put(&format!("k{i}"), &note("offline")).await.unwrap();
    }
    server.fail_next("a", 2);
    for _ in 0..2 {
        let err = a.sync_once().await.unwrap_err();
        assert!(matches!(&err, Error::Transport(t) if t.is_retryable()), "{err}");
        assert_eq!(a.pending_count().await.unwrap(), 5, "the outbox is kept");
    }
    assert!(a.status().last_error.is_some());
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.pushed, report.acknowledged), (5, 5));
    assert_eq!(a.pending_count().await.unwrap(), 0);
    assert_eq!(server.model().rows().count(), 5);
    assert!(a.status().last_error.is_none() && a.status().last_success.is_some());
}

#[tokio::test]
async fn more_than_one_batch_goes_out_in_one_sync() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let mut batch = Batch::default();
    for i in 0..2_345 {
        batch = batch.put("n", &format!("k{i:04}"), &note("bulk")).unwrap();
    }
    a.commit(batch).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.pushed, 2_345, "the original pushed only 500 per sync");
    assert!(report.exchanges >= 3);
    let b = client(&server, "b").await;
    let report = b.sync_once().await.unwrap();
    assert_eq!(report.applied, 2_345, "and pulls follow has_more to the end");
}

#[tokio::test]
async fn the_outbox_and_the_clock_survive_a_restart() {
    let server = FakeServer::new();
    let dir = tempfile::tempdir().unwrap();
    let a = file_client(&server, dir.path(), "a").await;
    let last = a.collection::<Note>("n").put("k", &note("before restart")).await.unwrap();
    a.close().await;
    drop(a);
    let a = file_client(&server, dir.path(), "a").await;
    assert_eq!(a.pending_count().await.unwrap(), 1);
    let next = a.collection::<Note>("n").put("k2", &note("after")).await.unwrap();
    assert!(next > last, "no counter is reused");
    a.sync_once().await.unwrap();
    assert_eq!(server.model().rows().count(), 2);
}

#[tokio::test]
async fn a_lost_response_or_a_duplicate_is_harmless() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    a.collection::<Note>("n").put("k", &note("once")).await.unwrap();
    server.script("a", [Fault::LoseResponse]);
    assert!(a.sync_once().await.is_err());
    assert_eq!(a.pending_count().await.unwrap(), 1);
    server.script("a", [Fault::Duplicate]);
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.acknowledged, 1, "the duplicate is an acknowledgement");
    assert_eq!((a.pending_count().await.unwrap(), server.model().seq()), (0, 1), "applied exactly once");
}

#[tokio::test]
async fn a_wiped_replica_recovers_its_data_with_its_old_node_id() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    a.collection::<Note>("n").put("mine", &note("precious")).await.unwrap();
    a.sync_once().await.unwrap();
    a.close().await;
    // Reinstalled: an empty store, the same node id (quirk 1 lost this data).
    let again = client(&server, "a").await;
    again.sync_once().await.unwrap();
    assert_eq!(again.collection::<Note>("n").get("mine").await.unwrap(), Some(note("precious")));
}

#[tokio::test]
async fn concurrent_writes_get_unique_increasing_stamps() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let notes = a.collection::<Note>("n");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let notes = notes.clone();
            tokio::spawn(async move { notes.put(&format!("k{i}"), &note("x")).await.unwrap() })
        })
        .collect();
    let mut stamps = BTreeSet::new();
    for t in tasks {
        assert!(stamps.insert(t.await.unwrap().lamport), "a counter was issued twice");
    }
    assert_eq!(stamps.len(), 50);
}

#[tokio::test]
async fn batches_commit_atomically_across_collections() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let batch =
        Batch::default().put("notes", "n1", &note("a")).unwrap().put("todos", "t1", &json!({"text": "b"})).unwrap();
    let stamps = a.commit(batch).await.unwrap();
    assert_eq!(stamps.len(), 2);
    // One bad write refuses the whole batch.
    let bad = Batch::default().put("notes", "n2", &note("ok")).unwrap().delete("bad/name", "x");
    assert!(a.commit(bad).await.is_err());
    assert_eq!(a.collection::<Note>("notes").get("n2").await.unwrap(), None);
    assert_eq!(a.pending_count().await.unwrap(), 2);
    assert!(matches!(Batch::default().put("n", "x", &json!([1, 2])), Err(Error::Encode { .. })));
}

#[tokio::test]
async fn untyped_documents_and_decode_errors() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let raw = a.collection::<serde_json::Value>("n");
    raw.put("k", &json!({"title": 5})).await.unwrap();
    assert_eq!(raw.get("k").await.unwrap(), Some(json!({"title": 5})));
    assert!(matches!(a.collection::<Note>("n").get("k").await, Err(Error::Decode { .. })));
}

#[tokio::test]
async fn a_newer_schema_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let t = Tide::builder().path(&path).open().await.unwrap();
    t.close().await;
    drop(t);
    {
        // As another program would: a plain connection to the file.
        use sqlx::{ConnectOptions, Connection};
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await.unwrap();
        sqlx::query("UPDATE tide_meta SET value = '99' WHERE key = 'schema_version'").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
    let err = Tide::builder().path(&path).open().await.unwrap_err();
    assert!(err.to_string().contains("schema v99"), "{err}");
}

#[tokio::test]
async fn offline_only_tides_refuse_to_sync() {
    let t = Tide::builder().open().await.unwrap();
    assert!(matches!(t.sync_once().await, Err(Error::NoTransport)));
    assert!(matches!(t.sync_forever(std::time::Duration::from_secs(1)).await, Err(Error::NoTransport)));
    t.collection::<Note>("n").put("k", &note("local only")).await.unwrap();
    assert_eq!(t.pending_count().await.unwrap(), 1);
}

#[tokio::test]
async fn a_server_that_takes_fewer_ops_gets_smaller_batches() {
    let server =
        FakeServer::with_limits(tide_core::Limits { ops_per_request_max: 300, ..tide_core::Limits::default() });
    let a = client(&server, "a").await;
    let mut batch = Batch::default();
    for i in 0..1_000 {
        batch = batch.put("n", &format!("k{i:04}"), &note("x")).unwrap();
    }
    a.commit(batch).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.acknowledged, a.pending_count().await.unwrap()), (1_000, 0), "no outbox stuck on too_many_ops");
    assert_eq!(server.model().rows().count(), 1_000);
}
