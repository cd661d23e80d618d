//! Network faults over real hyper code (reliability.md §5, Network): a
//! fault-injecting TCP proxy between real clients and a real server.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tide_client::Tide;
use tide_testkit::{FaultyProxy, LoopbackServer, ProxyMode};
use tide_transport::HttpTransport;

/// A client through `proxy`, giving up on an exchange after 300 ms.
async fn client(proxy: &FaultyProxy, dir: &std::path::Path, name: &str) -> Tide {
    let transport =
        HttpTransport::builder(&proxy.endpoint()).exchange_timeout(Duration::from_millis(300)).build().unwrap();
    Tide::builder()
        .path(dir.join(format!("{name}.db")))
        .node_id(name)
        .transport(Arc::new(transport))
        .open()
        .await
        .unwrap()
}

/// What the server holds, read directly (not through the proxy).
async fn server_state(server: &LoopbackServer) -> tide_core::SyncResponse {
    use tide_transport::Transport;
    let mut req = tide_core::SyncRequest::new("observer", None);
    req.limit = Some(1000);
    HttpTransport::new(server.endpoint()).unwrap().exchange(&req).await.unwrap()
}

async fn setup() -> (LoopbackServer, FaultyProxy, tempfile::TempDir) {
    let server = LoopbackServer::start().await;
    let proxy = FaultyProxy::start(server.addr()).await;
    (server, proxy, tempfile::tempdir().unwrap())
}

#[tokio::test]
async fn n1_a_lost_request_keeps_the_outbox_and_applies_once_later() {
    let (server, proxy, dir) = setup().await;
    let a = client(&proxy, dir.path(), "a").await;
    a.collection::<serde_json::Value>("n").put("k", &json!({"v": 1})).await.unwrap();
    proxy.set(ProxyMode::Blackhole);
    let err = a.sync_once().await.unwrap_err();
    assert!(err.to_string().contains("no response"), "{err}");
    assert_eq!(a.pending_count().await.unwrap(), 1);
    assert!(server_state(&server).await.changes.is_empty(), "nothing reached the server");
    proxy.set(ProxyMode::Pass);
    a.sync_once().await.unwrap();
    assert_eq!((a.pending_count().await.unwrap(), server_state(&server).await.changes.len()), (0, 1));
}

#[tokio::test]
async fn n2_c8_a_response_lost_after_commit_is_settled_by_the_retry() {
    let (server, proxy, dir) = setup().await;
    let a = client(&proxy, dir.path(), "a").await;
    a.collection::<serde_json::Value>("n").put("k", &json!({"v": 1})).await.unwrap();
    proxy.set(ProxyMode::DropResponses);
    assert!(a.sync_once().await.is_err());
    let committed = server_state(&server).await;
    assert_eq!(committed.changes.len(), 1, "the server committed");
    assert_eq!(a.pending_count().await.unwrap(), 1, "the client could not know");
    proxy.set(ProxyMode::Pass);
    let report = a.sync_once().await.unwrap();
    assert_eq!(
        (report.acknowledged, a.pending_count().await.unwrap()),
        (1, 0),
        "the retry is a duplicate, acknowledged"
    );
    assert_eq!(server_state(&server).await.cursor, committed.cursor, "no second entry in the change log");
}

#[tokio::test]
async fn n7_a_one_way_partition_is_retried_with_backoff_then_converges() {
    let (server, proxy, dir) = setup().await;
    let a = client(&proxy, dir.path(), "a").await;
    let b = client(&proxy, dir.path(), "b").await;
    proxy.set(ProxyMode::DropResponses);
    a.collection::<serde_json::Value>("n").put("k", &json!({"by": "a"})).await.unwrap();
    let sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    // Each attempt costs the 300 ms timeout; the op stays pending though the
    // server committed it, because no answer came back.
    let mut statuses = a.watch_status();
    tokio::time::timeout(Duration::from_secs(30), statuses.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the lost answer is reported")
        .unwrap();
    let status = a.status();
    assert!(status.last_error.is_some() && status.pending == 1, "{status:?}");
    proxy.set(ProxyMode::Pass);
    tokio::time::timeout(Duration::from_secs(30), statuses.wait_for(|s| s.pending == 0 && s.last_error.is_none()))
        .await
        .expect("converges after the repair")
        .unwrap();
    drop(sync);
    b.sync_once().await.unwrap();
    assert_eq!(b.collection::<serde_json::Value>("n").get("k").await.unwrap(), Some(json!({"by": "a"})));
    assert_eq!(server_state(&server).await.changes.len(), 1);
}

#[tokio::test]
async fn n8_latency_above_the_timeout_is_handled_like_a_lost_response() {
    let (server, proxy, dir) = setup().await;
    let a = client(&proxy, dir.path(), "a").await;
    for i in 0..3 {
        a.collection::<serde_json::Value>("n").put(&format!("k{i}"), &json!({"i": i})).await.unwrap();
    }
    proxy.set(ProxyMode::Delay(Duration::from_millis(500)));
    assert!(a.sync_once().await.is_err(), "times out");
    proxy.set(ProxyMode::Pass);
    a.sync_once().await.unwrap();
    let state = server_state(&server).await;
    assert_eq!((state.changes.len(), a.pending_count().await.unwrap()), (3, 0), "each write once");
}

#[tokio::test]
async fn n9_a_connection_reset_mid_body_applies_nothing() {
    let (server, proxy, dir) = setup().await;
    let a = client(&proxy, dir.path(), "a").await;
    let mut batch = tide_client::Batch::default();
    for i in 0..50 {
        batch = batch
            .put("n", &format!("k{i:02}"), &json!({"text": "a body long enough to be cut in the middle"}))
            .unwrap();
    }
    a.commit(batch).await.unwrap();
    proxy.set(ProxyMode::ResetAfter(1_000));
    assert!(a.sync_once().await.is_err());
    assert!(server_state(&server).await.changes.is_empty(), "a partial batch is never applied");
    proxy.set(ProxyMode::Pass);
    a.sync_once().await.unwrap();
    assert_eq!(server_state(&server).await.changes.len(), 50);
}

#[tokio::test]
async fn n6_both_sides_write_through_a_long_partition_then_converge() {
    let (_server, proxy, dir) = setup().await;
    let (a, b) = (client(&proxy, dir.path(), "a").await, client(&proxy, dir.path(), "b").await);
    proxy.set(ProxyMode::Blackhole);
    for i in 0..5 {
        a.collection::<serde_json::Value>("n").put(&format!("k{i}"), &json!({"by": "a"})).await.unwrap();
        b.collection::<serde_json::Value>("n").put(&format!("k{}", i + 2), &json!({"by": "b"})).await.unwrap();
    }
    assert!(a.sync_once().await.is_err() && b.sync_once().await.is_err());
    proxy.set(ProxyMode::Pass);
    for _ in 0..2 {
        a.sync_once().await.unwrap();
        b.sync_once().await.unwrap();
    }
    let (la, lb) = (
        a.collection::<serde_json::Value>("n").list(None, 100).await.unwrap(),
        b.collection::<serde_json::Value>("n").list(None, 100).await.unwrap(),
    );
    assert_eq!(la, lb);
    assert_eq!(la.len(), 7);
}
