//! Watch streams: local and remote changes, registered at the call, no
//! echo duplicates, bounded with lag reported, filtered.

use serde_json::json;
use tide_client::{Changed, Source, TypedEvent, WatchEvent};
use tide_transport::FakeServer;

use crate::{Note, client, note};

fn change(e: Option<WatchEvent>) -> tide_client::ChangeEvent {
    match e {
        Some(WatchEvent::Change(c)) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn typed<T: std::fmt::Debug>(e: Option<TypedEvent<T>>) -> Changed<T> {
    match e {
        Some(TypedEvent::Change(c)) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

#[tokio::test]
async fn local_and_remote_changes_without_echo_duplicates() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    // Registered now: the write below, made before the first poll, is seen.
    let mut wa = a.watch();
    let mut wb = b.collection::<Note>("notes").watch();
    let stamp = a.collection::<Note>("notes").put("n1", &note("hello")).await.unwrap();
    let e = change(wa.next().await);
    assert_eq!((e.source, e.id.as_str(), &e.stamp), (Source::Local, "n1", &stamp));
    assert_eq!(e.decode::<Note>().unwrap(), Some(note("hello")));
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    let e = typed(wb.next().await);
    assert_eq!((e.source, e.id.as_str()), (Source::Remote, "n1"));
    assert_eq!(e.value.unwrap(), Some(note("hello")), "read as the collection's type");
    // a syncs again: its own write must not come back as a remote change.
    b.collection::<Note>("notes").delete("n1").await.unwrap();
    b.sync_once().await.unwrap();
    a.sync_once().await.unwrap();
    let e = change(wa.next().await);
    assert_eq!((e.source, e.doc.is_none()), (Source::Remote, true), "only b's delete, no echo of a's put");
    a.close().await;
    assert_eq!(wa.next().await, None, "closing ends the stream");
}

#[tokio::test]
async fn watchers_see_only_what_they_asked_for() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let notes = a.collection::<serde_json::Value>("notes");
    let mut one = notes.watch_doc("n2");
    let mut todos = a.collection::<serde_json::Value>("todos").watch();
    notes.put("n1", &json!({})).await.unwrap();
    notes.put("n2", &json!({"x": 1})).await.unwrap();
    a.collection::<serde_json::Value>("todos").put("t1", &json!({})).await.unwrap();
    assert_eq!(typed(one.next().await).id, "n2");
    assert_eq!(typed(todos.next().await).id, "t1");
    a.close().await;
    assert!(one.next().await.is_none(), "n1 never reached the n2 watcher");
}

#[tokio::test]
async fn a_slow_watcher_learns_it_lagged() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let mut w = a.watch();
    let n = tide_client::WATCH_BUFFER_CHANGES + 10;
    let mut batch = tide_client::Batch::default();
    for i in 0..n {
        batch = batch.put("n", &format!("k{i:05}"), &json!({"i": i})).unwrap();
    }
    a.commit(batch).await.unwrap();
    assert_eq!(w.next().await, Some(WatchEvent::Lagged { missed: 10 }));
    let mut delivered = 0;
    a.close().await;
    while let Some(WatchEvent::Change(_)) = w.next().await {
        delivered += 1;
    }
    assert_eq!(delivered, tide_client::WATCH_BUFFER_CHANGES, "the buffer holds what it can, no more");
}

/// Local writes and remote pages racing on one key: every watcher sees the
/// key's versions in commit order (stamps never go back within a source of
/// truth, and the last event is the stored version), whatever the timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_one_key_follow_commit_order_and_end_on_the_stored_version() {
    let server = FakeServer::new();
    let (a, b) = (client(&server, "a").await, client(&server, "b").await);
    let mut watchers = [a.collection::<Note>("n").watch_doc("k"), a.collection::<Note>("n").watch_doc("k")];
    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                a.collection::<Note>("n").put("k", &note(&format!("a{i}"))).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let syncer = {
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..60 {
                b.collection::<Note>("n").put("k", &note(&format!("b{i}"))).await.unwrap();
                b.sync_once().await.unwrap();
                a.sync_once().await.unwrap();
            }
        })
    };
    writer.await.unwrap();
    syncer.await.unwrap();
    let stored = a.version("n", "k").await.unwrap().unwrap();
    for w in &mut watchers {
        let mut last = None;
        while let Ok(Some(e)) = tokio::time::timeout(std::time::Duration::from_millis(100), w.next()).await {
            let TypedEvent::Change(e) = e else { panic!("no lag expected: {e:?}") };
            if let Some(prev) = &last {
                assert!(&e.stamp > prev, "a watcher saw {:?} after {prev:?}", e.stamp);
            }
            last = Some(e.stamp);
        }
        assert_eq!(last.as_ref(), Some(&stored.stamp), "the stream ends on the stored version");
    }
}

#[tokio::test]
async fn a_typed_watch_reports_a_document_that_is_not_its_type_and_goes_on() {
    let server = FakeServer::new();
    let a = client(&server, "a").await;
    let mut notes = a.collection::<Note>("notes").watch();
    a.collection::<serde_json::Value>("notes").put("odd", &json!({"title": 3})).await.unwrap();
    a.collection::<Note>("notes").put("fine", &note("readable")).await.unwrap();
    let odd = typed(notes.next().await);
    assert_eq!(odd.id, "odd");
    assert!(matches!(odd.value, Err(tide_client::Error::Decode { ref id, .. }) if id == "odd"), "{:?}", odd.value);
    let fine = typed(notes.next().await);
    assert_eq!(fine.value.unwrap(), Some(note("readable")));
    a.close().await;
}
