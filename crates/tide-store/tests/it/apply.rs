//! Applying remote pages: LWW per change, cursor and clock in the same transaction.

use serde_json::json;
use tide_core::{Change, Cursor, Payload, Stamp};
use tide_store::{Error, OpenOptions, Store};

use crate::{doc, temp_store};

fn change(id: &str, lamport: u64, node: &str, payload: Payload, seq: u64) -> Change {
    Change { collection: "c".into(), id: id.into(), stamp: Stamp::new(lamport, node), payload, seq }
}

fn put(n: i64) -> Payload {
    Payload::Put(doc(json!({ "n": n })))
}

#[tokio::test]
async fn a_page_applies_only_winning_changes_and_reports_them() {
    let store = OpenOptions::new().node_id("me").open_in_memory().await.unwrap();
    let local = store.put("c", "mine", doc(json!({"n": 0}))).await.unwrap(); // (1, me)
    assert_eq!(local, Stamp::new(1, "me"));
    let page = vec![
        change("new", 5, "b", put(1), 1),           // absent locally: applied
        change("mine", 1, "a", put(2), 2),          // (1,a) < (1,me): loses
        change("new", 4, "z", put(3), 3),           // older than (5,b) just applied: loses
        change("mine", 1, "me", put(0), 4),         // own echo, equal stamp: not applied
        change("tomb", 2, "b", Payload::Delete, 5), // the deletion of a document never held: not stored
        change("new", 6, "a", Payload::Delete, 6),  // newer delete: applied
    ];
    let applied = store.apply_page(page, Cursor(6)).await.unwrap();
    assert_eq!(applied.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 6]);
    assert_eq!(store.get("c", "mine").await.unwrap(), Some(doc(json!({"n": 0}))));
    assert_eq!(store.get("c", "new").await.unwrap(), None);
    assert_eq!(store.version("c", "new").await.unwrap().unwrap().stamp, Stamp::new(6, "a"));
    assert_eq!(store.version("c", "tomb").await.unwrap(), None, "no tombstone for what was never here");
    assert_eq!(store.cursor().await.unwrap(), Some(Cursor(6)));
    assert_eq!(store.lamport().await.unwrap(), 6, "the clock observed the page");
    let next = store.put("c", "after", doc(json!({}))).await.unwrap();
    assert_eq!(next.lamport, 7, "the next local write beats everything seen");
    assert_eq!(store.pending_count().await.unwrap(), 2, "applying a page never touches the outbox");
}

#[tokio::test]
async fn a_page_is_idempotent() {
    let store = Store::open_in_memory().await.unwrap();
    let page = vec![change("a", 3, "x", put(1), 1), change("a", 4, "x", Payload::Delete, 2)];
    assert_eq!(store.apply_page(page.clone(), Cursor(2)).await.unwrap().len(), 2);
    assert!(store.apply_page(page, Cursor(2)).await.unwrap().is_empty(), "replaying changes nothing");
    assert_eq!(store.version("c", "a").await.unwrap().unwrap().stamp, Stamp::new(4, "x"));
}

#[tokio::test]
async fn a_wiped_store_takes_back_its_own_old_writes() {
    // The original client skipped every change with its own node id, so a
    // reinstalled device never got its data back (quirk 1).
    let store = OpenOptions::new().node_id("me").open_in_memory().await.unwrap();
    let applied = store.apply_page(vec![change("old", 9, "me", put(1), 1)], Cursor(1)).await.unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(store.get("c", "old").await.unwrap(), Some(doc(json!({"n": 1}))));
    assert!(store.put("c", "new", doc(json!({}))).await.unwrap().lamport > 9);
}

#[tokio::test]
async fn a_bad_page_changes_nothing() {
    let store = Store::open_in_memory().await.unwrap();
    store.apply_page(vec![change("a", 1, "x", put(1), 1)], Cursor(1)).await.unwrap();
    let poisoned = vec![change("a", 2, "x", put(2), 2), change("b", tide_core::LAMPORT_MAX + 1, "x", put(3), 3)];
    assert!(matches!(store.apply_page(poisoned, Cursor(3)).await, Err(Error::Clock(_))));
    let bad_name =
        vec![change("a", 2, "x", put(2), 2), Change { collection: "a/b".into(), ..change("b", 3, "x", put(3), 3) }];
    assert!(matches!(store.apply_page(bad_name, Cursor(3)).await, Err(Error::Invalid(_))));
    assert_eq!(store.get("c", "a").await.unwrap(), Some(doc(json!({"n": 1}))));
    assert_eq!((store.cursor().await.unwrap(), store.lamport().await.unwrap()), (Some(Cursor(1)), 1));
}

#[tokio::test]
async fn cursor_and_documents_survive_a_reopen_together() {
    let (_dir, path, store) = temp_store(OpenOptions::new()).await;
    assert_eq!(store.cursor().await.unwrap(), None);
    let page: Vec<_> =
        (0..500).map(|i| change(&format!("k{i}"), i + 1, "x", put(i64::try_from(i).unwrap()), i + 1)).collect();
    store.apply_page(page, Cursor(500)).await.unwrap();
    store.close().await;
    drop(store);
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.cursor().await.unwrap(), Some(Cursor(500)));
    assert_eq!(store.count("c").await.unwrap(), 500);
    assert_eq!(store.lamport().await.unwrap(), 500);
}

/// The digests the store keeps as it writes (local writes, pages, repairs)
/// always equal digests computed from scratch from its live documents.
#[tokio::test]
async fn digests_kept_while_writing_equal_digests_from_scratch() {
    use tide_core::SplitMix64;

    let store = OpenOptions::new().digest_log_rows_max(1_000).open_in_memory().await.unwrap();
    let mut rng = SplitMix64::new(7);
    let mut seq = 0;
    for round in 0..20 {
        for _ in 0..10 {
            let (c, id) = (format!("c{}", rng.below(2)), format!("k{}", rng.below(30)));
            if rng.below(4) == 0 {
                store.delete(&c, &id).await.unwrap();
            } else {
                let doc = serde_json::json!({"v": rng.below(100)}).as_object().cloned().unwrap().into();
                store.put(&c, &id, doc).await.unwrap();
            }
        }
        let changes: Vec<Change> = (0..10)
            .map(|_| {
                seq += 1;
                let payload = if rng.below(4) == 0 {
                    Payload::Delete
                } else {
                    Payload::Put(serde_json::json!({"r": round}).as_object().cloned().unwrap().into())
                };
                Change {
                    collection: format!("c{}", rng.below(2)),
                    id: format!("k{}", rng.below(30)),
                    stamp: Stamp::new(rng.below(40), format!("n{}", rng.below(3))),
                    payload,
                    seq,
                }
            })
            .collect();
        store.apply_fetched(changes.clone()).await.unwrap();
        store.apply_page(changes, Cursor(seq)).await.unwrap();
    }
    let acked = store.pending(10_000).await.unwrap().iter().map(|p| p.seq).collect();
    store.settle(acked, Vec::new()).await.unwrap();
    check_digests(&store).await;
    // Enough changes to fold the digest log into the bucket rows.
    let many: Vec<Change> = (0..1_010)
        .map(|i| Change {
            collection: "c1".into(),
            id: format!("bulk{i}"),
            stamp: Stamp::new(1 + i % 7, "bulk"),
            payload: Payload::Put(serde_json::json!({"i": i}).as_object().cloned().unwrap().into()),
            seq: seq + 1 + i,
        })
        .collect();
    store.apply_page(many, Cursor(seq + 20_000)).await.unwrap();
    check_digests(&store).await;
}

/// The store's digests against digests computed from its live documents.
async fn check_digests(store: &Store) {
    use tide_core::digest::DigestTree;
    let mut expected = DigestTree::new();
    for c in ["c0", "c1"] {
        let mut after: Option<String> = None;
        loop {
            let page = store.list(c, after.as_deref(), 10_000).await.unwrap();
            for (id, _) in &page {
                let v = store.version(c, id).await.unwrap().unwrap();
                expected.replace(c, id, None, Some(tide_core::digest::payload_hash(c, id, &v.stamp, &v.payload)));
            }
            match page.last() {
                Some((id, _)) => after = Some(id.clone()),
                None => break,
            }
        }
    }
    assert_eq!(store.settled_roots().await.unwrap().unwrap(), expected.roots());
    for c in ["c0", "c1"] {
        assert_eq!(store.digest_groups(c).await.unwrap(), expected.groups(c));
        let groups: Vec<u16> = (0..256).collect();
        assert_eq!(store.digest_buckets(c, &groups).await.unwrap(), expected.buckets(c, &groups));
    }
}

/// A page's documents are stored as the very text they arrived as, each
/// its own, whatever bytes they hold: multibyte characters, escapes, a
/// tombstone between them, one document that is a prefix of the next.
#[tokio::test]
async fn a_page_stores_each_document_as_its_exact_text() {
    let store = Store::open_in_memory().await.unwrap();
    let texts = [
        r#"{"s":"héllo wörld ✓ 😀 ĳ"}"#,
        r#"{"q":"a \"quote\", a \\ backslash, a \n newline and \u0001","n":[1,2.5,-3e-7]}"#,
        r#"{"s":"é"}"#,
        r#"{"s":"é","t":{}}"#,
    ];
    let docs: Vec<tide_core::Doc> = texts.iter().map(|t| tide_core::Doc::parse(t).unwrap()).collect();
    let mut page: Vec<Change> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| change(&format!("d{i}"), 1, "x", Payload::Put(d.clone()), i as u64 + 1))
        .collect();
    page.insert(2, change("gone", 1, "x", Payload::Delete, 9));
    store.apply_page(page, Cursor(9)).await.unwrap();
    for (i, d) in docs.iter().enumerate() {
        let stored = store.get("c", &format!("d{i}")).await.unwrap().unwrap();
        assert_eq!(stored.as_str(), d.as_str(), "document {i}");
    }
    assert_eq!(store.get("c", "gone").await.unwrap(), None);
}
