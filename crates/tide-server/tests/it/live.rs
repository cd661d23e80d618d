//! Long-poll (live sync): held until a commit, expiry, caps, shutdown, a
//! vanished client, many idle clients, and two servers on PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tide_core::{Cursor, Op, Payload, Stamp, SyncRequest, SyncResponse};
use tide_server::{NoAuth, ServerConfig};
use tide_transport::{HttpTransport, Transport};
use tokio::io::AsyncWriteExt;

use crate::support::{self, Storage};

fn poll(node: &str, cursor: Option<Cursor>, wait: Duration) -> SyncRequest {
    let mut r = SyncRequest::new(node, cursor);
    r.wait = Some(wait);
    r
}

fn push(node: &str, id: &str, lamport: u64) -> SyncRequest {
    let mut r = SyncRequest::new(node, None);
    r.ops = vec![Op {
        collection: "c".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(json!({"v": lamport}).as_object().cloned().unwrap().into()),
        op_id: None,
    }];
    r
}

async fn held(addr: std::net::SocketAddr) -> usize {
    let get = b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let (_, body) = support::raw(addr, get).await;
    body.lines().find_map(|l| l.strip_prefix("tide_held_requests ")).and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

async fn until_held(addr: std::net::SocketAddr, n: usize) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while held(addr).await != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never {n} held requests"));
}

#[tokio::test]
async fn a_held_poll_wakes_on_a_commit() {
    let running = support::start_on(Storage::Sqlite).await;
    let (a, b) = (HttpTransport::new(&running.endpoint()).unwrap(), HttpTransport::new(&running.endpoint()).unwrap());
    let first = b.exchange(&SyncRequest::new("b", None)).await.unwrap();
    let waiting =
        tokio::spawn(async move { b.exchange(&poll("b", Some(first.cursor), Duration::from_secs(20))).await });
    until_held(running.addr, 1).await;
    let start = Instant::now();
    a.exchange(&push("a", "k", 1)).await.unwrap();
    let woken: SyncResponse = waiting.await.unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10), "woken by the commit, not the 20 s wait");
    assert_eq!(woken.changes.len(), 1);
    assert_eq!(held(running.addr).await, 0);
}

#[tokio::test]
async fn a_poll_expires_and_old_clients_are_answered_at_once() {
    let running = support::start_on(Storage::Sqlite).await;
    let b = HttpTransport::new(&running.endpoint()).unwrap();
    let start = Instant::now();
    let r = b.exchange(&poll("b", None, Duration::from_millis(300))).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300) && r.changes.is_empty());
    // No wait_ms, or ops in the request: answered at once even with nothing to send.
    let start = Instant::now();
    b.exchange(&SyncRequest::new("b", None)).await.unwrap();
    let mut with_ops = push("b", "x", 1);
    with_ops.wait = Some(Duration::from_secs(20));
    b.exchange(&with_ops).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn holds_are_capped_per_namespace() {
    let config = ServerConfig { held_per_namespace_max: 2, ..ServerConfig::default() };
    let running = support::start_on_with(Storage::Sqlite, config, Arc::new(NoAuth::new("n"))).await;
    let endpoint = running.endpoint();
    let holders: Vec<_> = (0..2)
        .map(|i| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                HttpTransport::new(&endpoint)
                    .unwrap()
                    .exchange(&poll(&format!("h{i}"), None, Duration::from_secs(20)))
                    .await
            })
        })
        .collect();
    until_held(running.addr, 2).await;
    let start = Instant::now();
    let third =
        HttpTransport::new(&endpoint).unwrap().exchange(&poll("h3", None, Duration::from_secs(20))).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(10) && third.changes.is_empty(), "answered at once past the cap");
    for h in holders {
        h.abort();
    }
}

#[tokio::test]
async fn shutdown_answers_held_polls() {
    let running = support::start_on(Storage::Sqlite).await;
    let b = HttpTransport::new(&running.endpoint()).unwrap();
    let waiting = tokio::spawn(async move { b.exchange(&poll("b", None, Duration::from_secs(25))).await });
    until_held(running.addr, 1).await;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running.stop())
        .await
        .expect("the server stops without waiting out the poll");
    let answered = waiting.await.unwrap().unwrap();
    assert!(answered.changes.is_empty());
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_vanished_client_releases_its_hold() {
    let running = support::start_on(Storage::Sqlite).await;
    let body = serde_json::to_string(&poll("gone", None, Duration::from_secs(25))).unwrap();
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let request = format!("POST /sync HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    until_held(running.addr, 1).await;
    drop(stream);
    until_held(running.addr, 0).await;
}

#[tokio::test]
async fn many_idle_clients_are_all_woken_by_one_commit() {
    let running = support::start_on(Storage::Sqlite).await;
    let n = 200;
    let endpoint = running.endpoint();
    let waiting: Vec<_> = (0..n)
        .map(|i| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                HttpTransport::new(&endpoint)
                    .unwrap()
                    .exchange(&poll(&format!("idle{i}"), None, Duration::from_secs(25)))
                    .await
            })
        })
        .collect();
    until_held(running.addr, n).await;
    HttpTransport::new(&endpoint).unwrap().exchange(&push("writer", "k", 1)).await.unwrap();
    for w in waiting {
        let r = tokio::time::timeout(Duration::from_secs(20), w).await.expect("woken").unwrap().unwrap();
        assert_eq!(r.changes.len(), 1);
    }
    assert_eq!(held(running.addr).await, 0);
}

#[tokio::test]
async fn a_commit_on_one_postgres_server_process_wakes_a_poll_on_another() {
    let Some(Storage::Postgres(url)) = Storage::postgres().await else { return };
    let spawn = || crate::binary::spawn(&["--no-auth", "--namespace", "pg", "--database-url", &url]);
    let ((mut one, e1), (mut two, e2)) = (spawn(), spawn());
    let addr: std::net::SocketAddr = e1.trim_start_matches("http://").trim_end_matches("/sync").parse().unwrap();
    let b = HttpTransport::new(&e1).unwrap();
    let waiting = tokio::spawn(async move { b.exchange(&poll("b", None, Duration::from_secs(20))).await });
    until_held(addr, 1).await;
    let start = Instant::now();
    HttpTransport::new(&e2).unwrap().exchange(&push("a", "k", 1)).await.unwrap();
    let woken = waiting.await.unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10), "LISTEN/NOTIFY woke it, not the wait");
    assert_eq!(woken.changes.len(), 1);
    for child in [&mut one, &mut two] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A backend that counts the exchanges it is asked for.
struct Counting(Arc<dyn tide_server::Backend>, Arc<std::sync::atomic::AtomicUsize>);

#[async_trait::async_trait]
impl tide_server::Backend for Counting {
    async fn exchange(
        &self,
        principal: &tide_server::Principal,
        request: Arc<SyncRequest>,
    ) -> Result<tide_server::Reply, tide_server::BackendError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.exchange(principal, request).await
    }

    async fn ready(&self) -> Result<(), tide_server::BackendError> {
        self.0.ready().await
    }

    async fn listen(&self, on_commit: tide_server::CommitCallback) -> Result<(), tide_server::BackendError> {
        self.0.listen(on_commit).await
    }

    async fn collect(&self, horizon_seqs: u64) -> Result<tide_server::Collected, tide_server::BackendError> {
        self.0.collect(horizon_seqs).await
    }
}

/// Polls woken by one commit at the same cursor share one read of the
/// page; a poll whose own write is on it reads its own (no echo).
#[tokio::test]
async fn polls_woken_by_one_commit_share_one_read() {
    let (addr, count) = counting_server().await;
    let endpoint = format!("http://{addr}/sync");

    let writer = HttpTransport::new(&endpoint).unwrap();
    let start = writer.exchange(&push("w", "first", 1)).await.unwrap().cursor;
    let polls = 40;
    // The last poll is the writer's own.
    let waiting = polls_at(&endpoint, start, (0..polls).map(|i| format!("p{i}")).chain(["w".to_owned()]));
    until_held(addr, polls + 1).await;
    let before = count.load(std::sync::atomic::Ordering::SeqCst);
    let mut write = push("w", "second", 2);
    write.cursor = Some(start);
    writer.exchange(&write).await.unwrap();
    for (i, w) in waiting.into_iter().enumerate() {
        let r = w.await.unwrap().unwrap();
        let ids: Vec<&str> = r.changes.iter().map(|c| c.id.as_str()).collect();
        if i == polls {
            assert!(ids.is_empty(), "the writer's own poll does not get its write back: {ids:?}");
        } else {
            assert_eq!(ids, ["second"], "poll {i}");
        }
    }
    let reads = count.load(std::sync::atomic::Ordering::SeqCst) - before - 1;
    // One shared read, and the writer's poll's own (a poll woken before the
    // shared read began may read it anew; never one per poll).
    assert!(reads <= 4, "{reads} reads for {} woken polls", polls + 1);
}

/// A poll asking for the server's most changes (tide's client) takes the
/// page shared by polls asking for no limit (the original's): the same
/// page, no read of its own. One that began from the start at a head (its
/// `from_head`, which the resync rule reads) shares only with its likes.
#[tokio::test]
async fn polls_asking_for_the_same_page_in_other_words_share_it() {
    let (addr, count) = counting_server().await;
    let endpoint = format!("http://{addr}/sync");
    let writer = HttpTransport::new(&endpoint).unwrap();
    let start = writer.exchange(&push("w", "first", 1)).await.unwrap().cursor;
    let waiting = polls_at(&endpoint, start, (0..10).map(|i| format!("p{i}")));
    until_held(addr, 10).await;
    let mut write = push("w", "second", 2);
    write.cursor = Some(start);
    writer.exchange(&write).await.unwrap();
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().changes.len(), 1);
    }
    let reads = || count.load(std::sync::atomic::Ordering::SeqCst);
    let ids = |r: &tide_core::SyncResponse| r.changes.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    let before = reads();
    let mut limited = poll("q", Some(start), Duration::from_secs(20));
    limited.limit = Some(u32::try_from(tide_core::Limits::default().changes_per_response_max).unwrap());
    let r = HttpTransport::new(&endpoint).unwrap().exchange(&limited).await.unwrap();
    assert_eq!(ids(&r), ["second"]);
    assert_eq!(reads(), before, "the shared page was taken, not read again");
    let mut fresh = poll("f", Some(start), Duration::from_secs(20));
    fresh.from_head = Some(1);
    let r = HttpTransport::new(&endpoint).unwrap().exchange(&fresh).await.unwrap();
    assert_eq!(ids(&r), ["second"]);
    assert_eq!(reads(), before + 1, "a poll with a from_head reads its page with it");
}

/// A 20 s long-poll at `cursor` by each of `nodes`, each on a connection
/// of its own.
fn polls_at(
    endpoint: &str,
    cursor: Cursor,
    nodes: impl IntoIterator<Item = String>,
) -> Vec<tokio::task::JoinHandle<Result<SyncResponse, tide_transport::Error>>> {
    nodes
        .into_iter()
        .map(|node| {
            let t = HttpTransport::new(endpoint).unwrap();
            tokio::spawn(async move { t.exchange(&poll(&node, Some(cursor), Duration::from_secs(20))).await })
        })
        .collect()
}

/// A SQLite server counting the exchanges its backend is asked for.
async fn counting_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = tide_server::SqliteBackend::open(
        &dir.path().join("s.db"),
        tide_server::Durability::Normal,
        tide_core::Limits::default(),
    )
    .await
    .unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Arc::new(Counting(sqlite, Arc::clone(&count)));
    let server = tide_server::Server::new(backend, Arc::new(NoAuth::new("default")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _dir = dir;
        server.serve(listener, std::future::pending::<()>()).await
    });
    (addr, count)
}

/// A page shared among polls is never given to a poll that took its place
/// after a later commit, even one made while no poll was held.
#[tokio::test]
async fn a_shared_page_is_not_reused_after_a_commit_made_while_none_was_held() {
    let running = support::start_on(Storage::Sqlite).await;
    let t = HttpTransport::new(&running.endpoint()).unwrap();
    let start = t.exchange(&push("w", "first", 1)).await.unwrap().cursor;
    // A poll at `start` reads (and may share) an empty page, then expires.
    let expired = t.exchange(&poll("a", Some(start), Duration::from_millis(200))).await.unwrap();
    assert!(expired.changes.is_empty());
    assert_eq!(held(running.addr).await, 0);
    // A commit with nothing held.
    let mut write = push("w", "second", 2);
    write.cursor = Some(start);
    t.exchange(&write).await.unwrap();
    // A poll at the same cursor gets it at once, not the empty page.
    let begun = Instant::now();
    let r = t.exchange(&poll("b", Some(start), Duration::from_secs(20))).await.unwrap();
    assert_eq!(r.changes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["second"]);
    assert!(begun.elapsed() < Duration::from_secs(10));
}
