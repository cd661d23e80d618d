//! Convergence outside the network model: a server that goes back in time,
//! a server that rejects a write, and replies that do not answer the
//! request (PROTOCOL.md §12, §4).

use serde_json::json;
use tide_client::{Source, Tide, TypedEvent};
use tide_core::Limits;
use tide_transport::FakeServer;

use crate::{Note, client, note};

/// Every live document of `collection`, in id order.
async fn docs(t: &tide_client::Tide, collection: &str) -> Vec<(String, Note)> {
    t.collection::<Note>(collection).list(None, 1_000).await.unwrap()
}

#[tokio::test]
async fn a_server_restored_from_a_backup_gets_its_lost_writes_back_from_the_clients() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    let notes = a.collection::<Note>("notes");
    notes.put("kept", &note("before the backup")).await.unwrap();
    notes.put("deleted later", &note("before the backup")).await.unwrap();
    a.sync_once().await.unwrap();
    let backup = server.model();

    // Acknowledged by the server, then lost when it is restored.
    for i in 0..5 {
        notes.put(&format!("lost{i}"), &note("after the backup")).await.unwrap();
    }
    notes.delete("deleted later").await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.acknowledged, a.pending_count().await.unwrap()), (6, 0));
    server.restore(backup);

    // Another client writes past a's old cursor on the restored server.
    let nb = b.collection::<Note>("notes");
    for i in 0..8 {
        nb.put(&format!("b{i}"), &note("after the restore")).await.unwrap();
    }
    b.sync_once().await.unwrap();

    // a finds the difference by digest and gives back what the server lost.
    let report = a.sync_once().await.unwrap();
    assert!(report.repaired >= 6, "{report:?}");
    let report = a.sync_once().await.unwrap();
    assert!(report.verified, "a second sync proves a equal to the server: {report:?}");
    let report = b.sync_once().await.unwrap();
    assert!(report.verified, "{report:?}");
    let expected = docs(&a, "notes").await;
    assert_eq!(expected.len(), 1 + 5 + 8, "{expected:?}");
    assert!(!expected.iter().any(|(id, _)| id == "deleted later"), "a delete the server lost comes back too");
    assert_eq!(docs(&b, "notes").await, expected);
    let on_server: Vec<String> = server
        .model()
        .rows()
        .filter(|(_, r)| matches!(r.payload, tide_core::Payload::Put(_)))
        .map(|(k, _)| k.1.clone())
        .collect();
    assert_eq!(on_server, expected.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_caught_up_client_proves_it_agrees_and_a_diverged_one_repairs_only_what_differs() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    let batch = (0..300).fold(tide_client::Batch::default(), |batch, i| {
        batch.put("notes", &format!("n{i:03}"), &note("same")).unwrap()
    });
    a.commit(batch).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    assert!(b.sync_once().await.unwrap().verified);

    // Three versions vanish from the server (a restore), nothing else.
    let backup = server.model();
    let na = a.collection::<Note>("notes");
    for id in ["n007", "n150", "n299"] {
        na.put(id, &note("newer")).await.unwrap();
    }
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    server.restore(backup);
    server.clear_traffic();
    let report = b.sync_once().await.unwrap();
    assert_eq!(report.repaired, 3, "only the three differing keys travel: {report:?}");
    let fetched_or_sent: usize = server.traffic().iter().map(|e| e.request.ops.len()).sum();
    assert_eq!(fetched_or_sent, 3, "the repair pushed exactly the three versions");
    a.sync_once().await.unwrap();
    assert!(a.sync_once().await.unwrap().verified);
    assert_eq!(docs(&a, "notes").await, docs(&b, "notes").await);
}

#[tokio::test]
async fn a_rejected_write_goes_back_to_the_servers_version_and_stays_inspectable() {
    let server = FakeServer::with_limits(Limits { doc_bytes_max: 64, ..Limits::default() });
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    let na = a.collection::<Note>("notes");
    na.put("k", &note("small")).await.unwrap();
    na.put("new", &note("small")).await.unwrap();
    a.sync_once().await.unwrap();
    let mut watch = na.watch();

    let big = note(&"x".repeat(200));
    na.put("k", &big).await.unwrap();
    na.put("new", &big).await.unwrap();
    na.put("never", &big).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.rejected, 3, "{report:?}");
    assert_eq!(report.reverted, 3, "{report:?}");

    // Back to what the server holds: the old version, or nothing.
    assert_eq!(na.get("k").await.unwrap(), Some(note("small")));
    assert_eq!(na.get("never").await.unwrap(), None);
    let rejected = a.rejected().await.unwrap();
    assert_eq!(rejected.len(), 3);
    assert!(rejected.iter().all(|r| r.code == tide_core::ErrorCode::DocTooLarge), "{rejected:?}");
    assert_eq!(rejected[0].op.payload.doc().unwrap().to_map()["title"], json!("x".repeat(200)));

    // Watchers see the writes and then their reversal, ending on the stored version.
    let mut last = std::collections::BTreeMap::new();
    while let Ok(Some(TypedEvent::Change(e))) =
        tokio::time::timeout(std::time::Duration::from_millis(200), watch.next()).await
    {
        last.insert(e.id.clone(), (e.source, e.value.unwrap()));
    }
    assert_eq!(last["k"].0, Source::Reverted);
    assert_eq!(last["never"], (Source::Reverted, None));

    // Every replica agrees.
    b.sync_once().await.unwrap();
    assert!(a.sync_once().await.unwrap().verified);
    assert!(b.sync_once().await.unwrap().verified);
    assert_eq!(docs(&a, "notes").await, docs(&b, "notes").await);
}

/// A transport that tampers with what the fake answers.
struct Tamper {
    inner: tide_transport::FakeTransport,
    mode: Mode,
    last: std::sync::Mutex<Option<tide_core::SyncResponse>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Every result becomes a status this client does not know.
    UnknownStatus,
    /// The response to the first push is replayed for every later push.
    Replay,
}

#[async_trait::async_trait]
impl tide_transport::Transport for Tamper {
    async fn exchange(&self, req: &tide_core::SyncRequest) -> Result<tide_core::SyncResponse, tide_transport::Error> {
        let mut resp = self.inner.exchange(req).await?;
        match self.mode {
            Mode::UnknownStatus => resp.results.iter_mut().for_each(|r| *r = tide_core::OpResult::Unknown),
            Mode::Replay if !req.ops.is_empty() => {
                let mut last = self.last.lock().unwrap();
                match &*last {
                    Some(old) => resp = old.clone(),
                    None => *last = Some(resp.clone()),
                }
            }
            Mode::Replay => {}
        }
        Ok(resp)
    }
}

async fn tampered(server: &FakeServer, name: &str, mode: Mode) -> tide_client::Tide {
    let transport = Tamper { inner: server.connect(name), mode, last: std::sync::Mutex::new(None) };
    tide_client::Tide::builder().node_id(name).transport(std::sync::Arc::new(transport)).open().await.unwrap()
}

#[tokio::test]
async fn an_unknown_status_keeps_the_op_pending() {
    let server = FakeServer::new();
    let a = tampered(&server, "a", Mode::UnknownStatus).await;
    a.collection::<Note>("notes").put("k", &note("v")).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.acknowledged, report.rejected), (0, 0), "{report:?}");
    assert_eq!(a.pending_count().await.unwrap(), 1, "neither acknowledged nor rejected: still pending");
    assert!(a.rejected().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_replayed_response_cannot_settle_ops_it_does_not_describe() {
    let server = FakeServer::new();
    let a = tampered(&server, "a", Mode::Replay).await;
    let notes = a.collection::<Note>("notes");
    notes.put("first", &note("v")).await.unwrap();
    a.sync_once().await.unwrap();
    // The next push gets the first exchange's response again: its results
    // would acknowledge an op it never saw.
    notes.put("second", &note("v")).await.unwrap();
    let err = a.sync_once().await.unwrap_err();
    assert!(err.to_string().contains("answers request"), "{err}");
    assert_eq!(a.pending_count().await.unwrap(), 1, "the second op stays in the outbox");
}

/// A write made after a rejected one keeps its version, even when the
/// server has meanwhile gone back to an older one: only the refused
/// version itself is ever put back (found by the seeded simulator).
#[tokio::test]
async fn a_write_made_after_a_rejection_is_never_reverted() {
    use std::time::Duration;
    use tide_transport::Fault;

    let server = FakeServer::with_limits(Limits { doc_bytes_max: 64, ..Limits::default() });
    let a = client(&server, "a").await;
    let na = a.collection::<Note>("notes");
    na.put("k", &note("v1")).await.unwrap();
    a.sync_once().await.unwrap();
    let backup = server.model();

    // Refused; the exchange that would put it back is lost.
    na.put("k", &note(&"x".repeat(200))).await.unwrap();
    server.script("a", [Fault::Delay(Duration::ZERO), Fault::Drop]);
    a.sync_once().await.unwrap_err();
    // A newer write is acknowledged; the put-back is lost again.
    na.put("k", &note("v2")).await.unwrap();
    server.script("a", [Fault::Delay(Duration::ZERO), Fault::Drop]);
    a.sync_once().await.unwrap_err();
    assert_eq!(a.pending_count().await.unwrap(), 0, "v2 was acknowledged");

    // The server goes back to v1; the put-back now sees v1 there.
    server.restore(backup);
    a.sync_once().await.unwrap();
    assert_eq!(na.get("k").await.unwrap(), Some(note("v2")), "v2 is not the refused write");
    assert!(a.sync_once().await.unwrap().verified);
    let row = server.model().row("notes", "k").cloned().unwrap();
    assert_eq!(row.payload.doc().unwrap().to_map()["title"], json!("v2"), "and the server got v2 back by repair");
}

/// A client whose server took `v1` then `v2` of `notes/k` and was then
/// restored to a backup that holds only `v1`.
async fn server_lost_v2(server: &FakeServer) -> Tide {
    let a = client(server, "a").await;
    let na = a.collection::<Note>("notes");
    na.put("k", &note("v1")).await.unwrap();
    a.sync_once().await.unwrap();
    let backup = server.model();
    na.put("k", &note("v2")).await.unwrap();
    a.sync_once().await.unwrap();
    server.restore(backup);
    a
}

/// A refused write goes back to the last version the server took, even
/// when the server has since lost it: that version is then repaired back
/// (found by the seeded simulator, seed 130).
#[tokio::test]
async fn a_refused_write_goes_back_to_an_acknowledged_version_the_server_lost() {
    let server = FakeServer::with_limits(Limits { doc_bytes_max: 64, ..Limits::default() });
    let a = server_lost_v2(&server).await;
    let na = a.collection::<Note>("notes");

    na.put("k", &note(&"x".repeat(200))).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.rejected, report.reverted), (1, 1), "{report:?}");
    assert_eq!(na.get("k").await.unwrap(), Some(note("v2")), "back to v2, not the server's older v1");
    a.sync_once().await.unwrap();
    let row = server.model().row("notes", "k").cloned().unwrap();
    assert_eq!(row.payload.doc().unwrap().to_map()["title"], json!("v2"), "v2 was repaired back to the server");
}

/// Write checkpoints: wait until a write (or every write so far) is safe
/// on the server, with a timeout; ask whether a document has pending writes.
#[tokio::test]
async fn an_app_can_wait_until_its_writes_are_safe_on_the_server() {
    use std::time::Duration;

    let server = FakeServer::with_limits(Limits { doc_bytes_max: 64, ..Limits::default() });
    let a = client(&server, "a").await;
    let na = a.collection::<Note>("notes");
    let stamp = na.put("k", &note("v")).await.unwrap();
    assert!(na.has_pending("k").await.unwrap());
    // Nothing syncs: the wait runs out, and the write stays pending.
    let err = a.acknowledged(&stamp, Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, tide_client::Error::Timeout { .. }), "{err}");
    assert!(na.has_pending("k").await.unwrap());

    let _sync = a.sync_forever(Duration::from_hours(1)).await.unwrap();
    a.acknowledged(&stamp, Duration::from_secs(20)).await.unwrap();
    assert!(!na.has_pending("k").await.unwrap());
    assert!(server.model().row("notes", "k").is_some(), "acknowledged means stored on the server");

    na.put("a", &note("fits")).await.unwrap();
    let refused = na.put("b", &note(&"x".repeat(200))).await.unwrap();
    let err = a.all_acknowledged(Duration::from_secs(20)).await.unwrap_err();
    assert!(matches!(err, tide_client::Error::Rejected { count: 1 }), "{err}");
    let err = a.acknowledged(&refused, Duration::from_secs(20)).await.unwrap_err();
    assert!(matches!(err, tide_client::Error::Rejected { count: 1 }), "{err}");
    assert!(server.model().row("notes", "a").is_some());
    a.all_acknowledged(Duration::from_secs(1)).await.unwrap();
}

/// A store file copied (a restored phone backup, a copied profile): both
/// copies write under one node id. One of them finds out by its second
/// write exchange at the latest, takes a new node id, and every replica
/// converges with nothing lost (PROTOCOL.md §13).
#[tokio::test]
async fn a_copied_store_re_keys_itself_and_everyone_converges() {
    let server = FakeServer::new();
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        tide_client::Tide::builder()
            .path(dir.path().join(format!("{name}.db")))
            .transport(std::sync::Arc::new(server.connect(name)))
            .open()
    };
    let original = open("phone").await.unwrap();
    original.collection::<Note>("notes").put("shared", &note("before the copy")).await.unwrap();
    original.sync_once().await.unwrap();
    original.close().await;
    std::fs::copy(dir.path().join("phone.db"), dir.path().join("restored.db")).unwrap();
    let (a, b) = (open("phone").await.unwrap(), open("restored").await.unwrap());
    assert_eq!(a.node_id(), b.node_id(), "a copy carries the node id");
    let other = client(&server, "other").await;

    // Both copies write, with the same counters: same stamps, other payloads.
    let mut rekeyed = 0;
    let mut first = None;
    for round in 0..2 {
        for (t, who) in [(&a, "a"), (&b, "b")] {
            let notes = t.collection::<Note>("notes");
            let stamp = notes.put("shared", &note(&format!("{who} {round}"))).await.unwrap();
            if who == "b" && round == 0 {
                first = Some(stamp);
            }
            notes.put(&format!("{who}{round}"), &note(who)).await.unwrap();
            rekeyed += t.sync_once().await.unwrap().rekeyed;
        }
    }
    assert!(rekeyed >= 1, "a copy re-keyed");
    assert_ne!(a.node_id(), b.node_id());
    // b met the collision and re-keyed: its first write carries a new stamp,
    // and a checkpoint on the old one follows it.
    let first = first.unwrap();
    let now = b.current_stamp(&first).await.unwrap();
    assert!(now > first && now.node_id == b.node_id(), "{first:?} became {now:?}");
    b.acknowledged(&first, std::time::Duration::from_secs(1)).await.unwrap();
    for _ in 0..2 {
        for t in [&a, &b, &other] {
            t.sync_once().await.unwrap();
        }
    }
    let expected = docs(&other, "notes").await;
    assert_eq!(expected.len(), 5, "every write of both copies arrived: {expected:?}");
    for t in [&a, &b] {
        assert_eq!(docs(t, "notes").await, expected);
        assert!(t.sync_once().await.unwrap().verified);
        assert!(t.rejected().await.unwrap().is_empty(), "no write was refused as a stamp collision");
    }
    // The re-keyed copy still opens under the name it was opened with.
    b.close().await;
    let b = open("restored").await.unwrap();
    assert_eq!(docs(&b, "notes").await, expected);
}

/// Several refused writes in a row: the document goes back past all of them
/// to the last version the server took (found by the soak, seed 1688).
#[tokio::test]
async fn a_chain_of_refused_writes_goes_back_to_the_last_version_taken() {
    let server = FakeServer::with_limits(Limits { doc_bytes_max: 64, ..Limits::default() });
    let a = server_lost_v2(&server).await;
    let na = a.collection::<Note>("notes");

    na.put("k", &note(&"x".repeat(200))).await.unwrap();
    na.put("k", &note(&"y".repeat(200))).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.rejected, 2, "{report:?}");
    assert_eq!(na.get("k").await.unwrap(), Some(note("v2")), "past both refused writes, to v2");
    a.sync_once().await.unwrap();
    let row = server.model().row("notes", "k").cloned().unwrap();
    assert_eq!(row.payload.doc().unwrap().to_map()["title"], json!("v2"), "v2 was repaired back to the server");
}

/// A transport that, after its first exchange, has another client delete
/// a document: a delete made while a fresh client's initial sync runs.
struct DeleteAfterFirst {
    inner: tide_transport::FakeTransport,
    deleter: tide_transport::FakeTransport,
    done: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl tide_transport::Transport for DeleteAfterFirst {
    async fn exchange(
        &self,
        request: &tide_core::SyncRequest,
    ) -> Result<tide_core::SyncResponse, tide_transport::Error> {
        let resp = self.inner.exchange(request).await?;
        if !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut delete = tide_core::SyncRequest::new("a", None);
            delete.ops.push(tide_core::Op {
                collection: "notes".into(),
                id: "n00".into(),
                stamp: tide_core::Stamp::new(1_000, "a"),
                payload: tide_core::Payload::Delete,
                op_id: None,
            });
            self.deleter.exchange(&delete).await?;
        }
        Ok(resp)
    }
}

/// A client that starts empty gets only live documents in its initial
/// sync (PROTOCOL.md §4.1, `live_below`), and still learns of a delete made
/// while that sync runs.
#[tokio::test]
async fn an_initial_sync_transfers_no_tombstones_yet_learns_of_deletes_made_meanwhile() {
    let server = FakeServer::with_limits(Limits { changes_per_response_max: 10, ..Limits::default() });
    let a = client(&server, "a").await;
    let notes = a.collection::<Note>("notes");
    for i in 0..30 {
        notes.put(&format!("n{i:02}"), &note("kept")).await.unwrap();
    }
    for i in 10..30 {
        notes.delete(&format!("n{i:02}")).await.unwrap();
    }
    a.sync_once().await.unwrap();
    server.clear_traffic();

    let transport = DeleteAfterFirst {
        inner: server.connect("fresh"),
        deleter: server.connect("deleter"),
        done: std::sync::atomic::AtomicBool::new(false),
    };
    let fresh = Tide::builder().node_id("fresh").transport(std::sync::Arc::new(transport)).open().await.unwrap();
    fresh.sync_once().await.unwrap();
    let received: Vec<tide_core::Change> = server
        .traffic()
        .into_iter()
        .filter(|e| e.client == "fresh")
        .flat_map(|e| match e.outcome {
            tide_transport::Outcome::Response(r) => r.changes,
            tide_transport::Outcome::Failed(_) => Vec::new(),
        })
        .collect();
    assert!(received.len() > 10, "several pages: {}", received.len());
    let tombstones: Vec<&str> = received.iter().filter(|c| c.payload.doc().is_none()).map(|c| c.id.as_str()).collect();
    assert_eq!(tombstones, ["n00"], "only the delete made during the sync");
    let live: Vec<String> = (1..10).map(|i| format!("n{i:02}")).collect();
    assert_eq!(docs(&fresh, "notes").await.into_iter().map(|(id, _)| id).collect::<Vec<_>>(), live);
    // Once it holds something, it asks for tombstones like any client.
    a.collection::<Note>("notes").delete("n01").await.unwrap();
    a.sync_once().await.unwrap();
    fresh.sync_once().await.unwrap();
    assert!(fresh.collection::<Note>("notes").get("n01").await.unwrap().is_none());
}

/// A server that says a token expired (`token_expired`) is asked again at
/// once with whatever token the async header provider gives now: a
/// provider that refreshes tokens syncs through the expiry.
#[tokio::test]
async fn an_expired_token_is_refreshed_through_the_header_provider_and_the_sync_goes_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let secret = b"shared by the app's identity provider";
    let config = tide_server::JwtConfig { default_namespace: Some("app".into()), ..tide_server::JwtConfig::default() };
    let auth = std::sync::Arc::new(tide_server::JwtAuthenticator::hs256(secret, config));
    let dir = tempfile::tempdir().unwrap();
    let backend = tide_server::SqliteBackend::open(
        &dir.path().join("server.db"),
        tide_server::Durability::Normal,
        Limits::default(),
    )
    .await
    .unwrap();
    let server = tide_server::Server::new(backend, auth, tide_server::ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });

    // The first token the provider hands out has already expired.
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&asked);
    let headers = tide_transport::Headers::from_async_fn(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let exp = if n == 0 { now - 3_600 } else { now + 3_600 };
            let claims = json!({"sub": "alice", "exp": exp});
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"shared by the app's identity provider"),
            )?;
            Ok(vec![("authorization".to_owned(), format!("Bearer {token}"))])
        }
    });
    let tide = Tide::builder().endpoint(&endpoint).headers(headers).node_id("alice-phone").open().await.unwrap();
    tide.collection::<Note>("notes").put("n1", &note("written offline")).await.unwrap();
    tide.sync_once().await.unwrap();
    assert_eq!(tide.pending_count().await.unwrap(), 0, "pushed with the fresh token");
    assert!(asked.load(Ordering::SeqCst) >= 2, "the provider was asked again");
}
