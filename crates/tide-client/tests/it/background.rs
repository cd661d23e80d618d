//! The background sync: at once on local writes (even mid-exchange),
//! backoff with jitter honouring Retry-After, status, and stopping.

use std::sync::Arc;
use std::time::Duration;

use tide_client::SyncStatus;
use tide_transport::{FakeServer, Fault};

use crate::{Note, client, interval_client, note};

/// Waits (bounded) until the status satisfies `f`.
async fn until(t: &tide_client::Tide, f: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
    let mut statuses = t.watch_status();
    tokio::time::timeout(Duration::from_secs(30), statuses.wait_for(f))
        .await
        .expect("the status reached the expected state in time")
        .expect("the Tide is still open")
}

/// Waits (bounded) until the fake has seen `n` exchanges. The fake tells
/// nobody about an exchange, so this looks at its log every 10 ms.
async fn until_exchanges(server: &FakeServer, n: usize) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while server.traffic().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the loop made {n} exchanges in time"));
}

// These run in real time: the store's SQLite works on threads of its own,
// which tokio's paused clock cannot see, so it would skip ahead of them.

#[tokio::test]
async fn a_local_write_syncs_at_once_even_during_an_exchange() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    // An hour between timed syncs: only writes can trigger them.
    let _sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    until(&a, |s| s.last_success.is_some()).await;
    // The next exchange is slow; a second write lands while it is in flight.
    server.script("a", [Fault::Delay(Duration::from_millis(500))]);
    a.collection::<Note>("n").put("first", &note("1")).await.unwrap();
    until(&a, |s| s.syncing).await;
    a.collection::<Note>("n").put("second", &note("2")).await.unwrap();
    until(&a, |s| s.pending == 0 && !s.syncing).await;
    assert_eq!(server.model().rows().count(), 2, "not an hour later (quirk 6)");
}

#[tokio::test]
async fn failures_back_off_and_honour_retry_after() {
    let server = FakeServer::new();
    let a = interval_client(&server, "a").await;
    a.collection::<Note>("n").put("k", &note("x")).await.unwrap();
    server.script("a", [Fault::Status { status: 503, retry_after: Some(Duration::from_secs(1)) }]);
    let start = std::time::Instant::now();
    let _sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    let failed = until(&a, |s| s.last_error.is_some()).await;
    assert!(failed.last_error.unwrap().contains("503"));
    assert_eq!(failed.reachable, Some(true), "a 503 came from the server");
    until(&a, |s| s.pending == 0 && s.last_error.is_none()).await;
    assert!(start.elapsed() >= Duration::from_secs(1), "the retry waited for Retry-After");
    let pushes = server.traffic().iter().filter(|e| !e.request.ops.is_empty()).count();
    assert_eq!(pushes, 2, "one failure, one retry: no hot loop");
}

#[tokio::test]
async fn an_outage_is_retried_with_growing_delays_then_recovers() {
    let server = FakeServer::new();
    let a = interval_client(&server, "a").await;
    a.collection::<Note>("n").put("k", &note("x")).await.unwrap();
    server.partition("a");
    let start = std::time::Instant::now();
    let _sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    // The retries before the fourth attempt wait at least 250, 500 and 1,000 ms (the
    // lower edges of the backoff's jitter bands; a timer never fires early):
    // growing delays, no hot loop. The bands themselves are unit-tested.
    until_exchanges(&server, 4).await;
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1_750), "three retries with growing delays took only {took:?}");
    assert_eq!(a.status().reachable, Some(false));
    server.heal("a");
    until(&a, |s| s.pending == 0).await;
}

#[tokio::test]
async fn dropping_the_handle_or_closing_stops_the_loop() {
    let server = FakeServer::new();
    let a = interval_client(&server, "a").await;
    let handle = a.sync_forever(Duration::from_millis(100)).await.unwrap();
    until_exchanges(&server, 3).await;
    let before = server.traffic().len();
    drop(handle);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.traffic().len();
    assert!(after <= before + 1, "stopped (one exchange may have been in flight): {before} then {after}");
    let _again = a.sync_forever(Duration::from_millis(100)).await.unwrap();
    a.close().await;
    let closed = server.traffic().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.traffic().len(), closed, "close stops it for good");
    assert!(matches!(a.sync_once().await, Err(tide_client::Error::Closed)));
}

#[tokio::test]
async fn twins_sharing_a_node_id_re_key_instead_of_rejecting() {
    // Two replicas share a node id (a copied store): the same stamp with
    // different payloads is a collision, never dropped silently. The twin
    // that meets it takes a new node id and its write goes through.
    let server = FakeServer::new();
    let (a, b) = (client(&server, "twin").await, client(&server, "twin").await);
    a.collection::<Note>("n").put("k", &note("a's")).await.unwrap();
    b.collection::<Note>("n").put("k", &note("b's")).await.unwrap();
    a.sync_once().await.unwrap();
    let report = b.sync_once().await.unwrap();
    assert_eq!((report.rekeyed, report.rejected), (1, 0), "{report:?}");
    assert_ne!(b.node_id(), "twin");
    assert_eq!(b.pending_count().await.unwrap(), 0);
    let other = client(&server, "other").await;
    other.sync_once().await.unwrap();
    assert_eq!(
        other.collection::<Note>("n").get("k").await.unwrap(),
        Some(note("b's")),
        "re-stamped, b's write (the later one) wins everywhere"
    );
    a.sync_once().await.unwrap();
    assert_eq!(a.collection::<Note>("n").get("k").await.unwrap(), Some(note("b's")));
}

#[tokio::test]
async fn rejected_ops_can_be_listed_retried_and_discarded() {
    let server = FakeServer::with_limits(tide_core::Limits { doc_bytes_max: 64, ..tide_core::Limits::default() });
    let a = client(&server, "a").await;
    let big = note(&"x".repeat(100));
    a.collection::<Note>("n").put("k", &big).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.rejected, 1);
    let rejected = a.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].code, tide_core::ErrorCode::DocTooLarge);
    assert_eq!(a.status().rejected, 1);
    assert_eq!(a.pending_count().await.unwrap(), 0, "the bad op does not block the queue");
    // Retry: written again with a fresh stamp; this server still refuses it.
    let stamp = a.retry_rejected(rejected[0].seq).await.unwrap().unwrap();
    assert!(stamp > rejected[0].op.stamp);
    assert_eq!(a.rejected().await.unwrap().len(), 0, "the old rejection is forgotten");
    a.sync_once().await.unwrap();
    let again = a.rejected().await.unwrap();
    assert_eq!((again.len(), &again[0].op.stamp), (1, &stamp));
    // Discarding a seq that is no rejection changes nothing; discarding
    // the rejection forgets it.
    let before = a.status().rejected;
    a.discard_rejected(again[0].seq + 1_000).await.unwrap();
    assert_eq!(a.status().rejected, before);
    a.discard_rejected(again[0].seq).await.unwrap();
    assert!(a.rejected().await.unwrap().is_empty());
    assert_eq!(a.status().rejected, 0);
    assert_eq!(a.collection::<Note>("n").get("k").await.unwrap(), None, "the refused write was put back");
}

#[tokio::test]
async fn a_remote_write_reaches_a_live_client_at_once() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    // An hour between timed syncs: only the long-poll can bring b the change.
    let _sync = b.sync_forever(Duration::from_hours(1)).await.unwrap();
    until(&b, |s| s.last_success.is_some()).await;
    let mut watch = b.watch();
    a.collection::<Note>("n").put("k", &note("live")).await.unwrap();
    a.sync_once().await.unwrap();
    let event =
        tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("arrives without waiting an interval");
    let Some(tide_client::WatchEvent::Change(change)) = event else { panic!("{event:?}") };
    assert_eq!((change.id.as_str(), change.source), ("k", tide_client::Source::Remote));
}

#[tokio::test]
async fn a_local_write_during_a_held_poll_is_pushed_at_once() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let _sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    until(&a, |s| s.last_success.is_some()).await;
    // Wait until the server holds a poll (25 s long by default).
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.held_polls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a poll is held");
    a.collection::<Note>("n").put("k", &note("now")).await.unwrap();
    // Far sooner than the poll would return by itself.
    tokio::time::timeout(Duration::from_secs(5), until(&a, |s| s.pending == 0)).await.expect("pushed at once");
    assert_eq!(server.model().rows().count(), 1);
    // The dropped poll was let go, and the client holds a new one: never two.
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.held_polls() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("one poll held again");
}

/// A server that answers long-polls at once (its caps are reached, or it is
/// shutting down) makes live sync back off and poll again, not stop: a
/// remote write still arrives without the hour-long interval.
#[tokio::test]
async fn long_polls_answered_at_once_back_off_and_retry() {
    use std::sync::Arc;
    use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};

    let dir = tempfile::tempdir().unwrap();
    let backend =
        SqliteBackend::open(&dir.path().join("s.db"), Durability::Normal, tide_core::Limits::default()).await.unwrap();
    let config = ServerConfig { held_requests_max: 0, ..ServerConfig::default() };
    let server = Server::new(backend, Arc::new(NoAuth::new("t")), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    let watcher = tide_client::Tide::builder().endpoint(&endpoint).open().await.unwrap();
    let writer = tide_client::Tide::builder().endpoint(&endpoint).long_poll(None).open().await.unwrap();
    let _live = watcher.sync_forever(Duration::from_hours(1)).await.unwrap();
    until(&watcher, |s| s.last_success.is_some()).await;
    let mut arrivals = watcher.collection::<Note>("n").watch();
    writer.collection::<Note>("n").put("k", &note("from the writer")).await.unwrap();
    writer.sync_once().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), arrivals.next())
        .await
        .expect("the write arrives by retried polls, not an hour later");
    assert!(matches!(event, Some(tide_client::TypedEvent::Change(e)) if e.id == "k"));
}

/// A transport whose exchanges never answer (a server that hangs), saying
/// when one has begun.
struct Hangs(Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl tide_transport::Transport for Hangs {
    async fn exchange(&self, _: &tide_core::SyncRequest) -> Result<tide_core::SyncResponse, tide_transport::Error> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// Closing cancels an exchange in flight instead of waiting for it (a
/// server that hangs, a long timeout): the sync returns `Closed`, and the
/// op stays in the outbox for the next time the store opens.
#[tokio::test]
async fn closing_cancels_an_exchange_in_flight_and_keeps_its_ops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let begun = Arc::new(tokio::sync::Notify::new());
    let a = tide_client::Tide::builder()
        .path(&path)
        .node_id("a")
        .transport(Arc::new(Hangs(Arc::clone(&begun))))
        .open()
        .await
        .unwrap();
    a.collection::<Note>("n").put("k", &note("pending")).await.unwrap();
    let syncing = {
        let a = a.clone();
        tokio::spawn(async move { a.sync_once().await })
    };
    tokio::time::timeout(Duration::from_secs(10), begun.notified()).await.expect("the exchange begins");
    tokio::time::timeout(Duration::from_secs(10), a.close()).await.expect("close does not wait for the exchange");
    let result = tokio::time::timeout(Duration::from_secs(10), syncing).await.expect("the sync ends").unwrap();
    assert!(matches!(result, Err(tide_client::Error::Closed)), "{result:?}");
    drop(a);
    let server = FakeServer::new();
    let again = crate::file_client(&server, dir.path(), "a").await;
    assert_eq!(again.pending_count().await.unwrap(), 1, "the op is still queued");
    again.sync_once().await.unwrap();
    assert_eq!(again.pending_count().await.unwrap(), 0);
}

/// The builder's transport settings: a long-poll wait not shorter than the
/// exchange timeout is refused (every poll would time out), the exchange
/// timeout bounds an exchange with a server that never answers, and the
/// push batch size bounds the ops of one exchange.
#[tokio::test]
async fn the_builder_sets_timeouts_and_the_push_batch_and_refuses_a_poll_the_timeout_would_cut() {
    let err = tide_client::Tide::builder()
        .endpoint("http://127.0.0.1:9/sync")
        .long_poll(Some(Duration::from_secs(30)))
        .exchange_timeout(Duration::from_secs(30))
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("long-poll wait"), "{err}");

    // A server that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", silent.local_addr().unwrap());
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let t = tide_client::Tide::builder()
        .endpoint(&endpoint)
        .long_poll(None)
        .exchange_timeout(Duration::from_millis(300))
        .open()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = t.sync_once().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by the exchange timeout: {err}");
    assert!(matches!(err, tide_client::Error::Transport(tide_transport::Error::Timeout { .. })), "{err}");

    let server = FakeServer::new();
    let small = tide_client::Tide::builder()
        .node_id("small")
        .transport(Arc::new(server.connect("small")))
        .push_batch_ops(3)
        .open()
        .await
        .unwrap();
    for i in 0..10 {
        small.collection::<Note>("n").put(&format!("k{i}"), &note("x")).await.unwrap();
    }
    small.sync_once().await.unwrap();
    let pushes: Vec<usize> = server.traffic().iter().map(|e| e.request.ops.len()).filter(|n| *n > 0).collect();
    assert_eq!(pushes, [3, 3, 3, 1]);
    // Every op went once, in outbox order, and none is left.
    let ids: Vec<String> = server.traffic().iter().flat_map(|e| e.request.ops.iter().map(|o| o.id.clone())).collect();
    assert_eq!(ids, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert_eq!(small.status().pending, 0);
}
