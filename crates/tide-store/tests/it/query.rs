//! Local queries against a reference model: random documents (fields of
//! mixed kinds, missing ones, nested ones, arrays) and random queries give
//! the same documents in the same order as filtering and sorting in memory,
//! with and without indexes; keyset pages concatenate to the whole result;
//! an index serves each kind of filter it should (by the query plan) and
//! survives a restart.

use proptest::prelude::*;
use serde_json::{Value, json};
use tide_store::{Field, Filter, OpenOptions, Query, Store, field};

const PATHS: [&str; 6] = ["n", "s", "b", "tags", "o.k", "missing"];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(Value::from),
        prop_oneof![Just(1.5), Just(-0.5), Just(2.0)].prop_map(Value::from),
        prop_oneof![Just(""), Just("a"), Just("ab"), Just("b"), Just("é"), Just("a\u{10FFFF}"), Just("[1]"), Just("[")]
            .prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn document() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(scalar()),
        proptest::option::of(scalar()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::collection::vec(scalar(), 0..3)),
        proptest::option::of(scalar()),
    )
        .prop_map(|(n, s, b, tags, k)| {
            let mut doc = serde_json::Map::new();
            if let Some(n) = n {
                doc.insert("n".into(), n);
            }
            if let Some(s) = s {
                doc.insert("s".into(), s);
            }
            if let Some(b) = b {
                doc.insert("b".into(), b.into());
            }
            if let Some(tags) = tags {
                doc.insert("tags".into(), tags.into());
            }
            if let Some(k) = k {
                doc.insert("o".into(), json!({ "k": k }));
            }
            Value::Object(doc)
        })
}

fn atom() -> impl Strategy<Value = Filter> {
    let path = proptest::sample::select(PATHS.to_vec()).prop_map(field);
    (path, scalar(), 0..10u8).prop_map(|(f, v, op): (Field, Value, u8)| match (op, &v) {
        (1, Value::Null) | (0, _) => f.eq(v),
        (1, _) => f.lt(v),
        (2, Value::Null) | (9, _) => f.exists(),
        (2, _) => f.ge(v),
        (3, _) => f.ne(v),
        (4, Value::String(s)) => f.starts_with(s.clone()),
        (4 | 7, Value::Null) | (4, _) => f.is_null(),
        (5, _) => f.contains(v),
        (6, _) => f.is_in([v, Value::from(1), Value::from("a")]),
        (7, _) => f.gt(v),
        (_, Value::Null) => f.exists(),
        (_, _) => f.le(v),
    })
}

fn filter() -> impl Strategy<Value = Filter> {
    atom().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Filter::And),
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Filter::Or),
            inner.prop_map(|f| !f),
        ]
    })
}

fn order() -> impl Strategy<Value = Vec<(&'static str, bool)>> {
    proptest::collection::vec((proptest::sample::select(vec!["n", "s", "o.k", "b"]), any::<bool>()), 0..3)
}

fn query_of(filter: Option<Filter>, order: &[(&'static str, bool)], limit: usize) -> Query {
    let mut q = Query::new("c").limit(limit);
    if let Some(f) = filter {
        q = q.filter(f);
    }
    for (path, desc) in order {
        q = if *desc { q.order_by_desc(field(*path)) } else { q.order_by(field(*path)) };
    }
    q
}

/// What the query should find: the matching documents, sorted, limited.
fn expected(q: &Query, docs: &[(String, Value)], limit: usize) -> Vec<(String, Value)> {
    let mut found: Vec<(String, Value)> = docs.iter().filter(|(_, d)| q.matches(d)).cloned().collect();
    q.sort(&mut found);
    found.truncate(limit);
    found
}

async fn stored(store: &Store, q: &Query) -> Vec<(String, Value)> {
    let page = store.query(q).await.unwrap();
    page.docs.into_iter().map(|(id, d)| (id, serde_json::from_str(d.as_str()).unwrap())).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("TIDE_QUERY_CASES").map_or(96, |s| s.parse().unwrap()), ..ProptestConfig::default() })]

    /// The store finds what the model finds, in the same order, with or
    /// without indexes; pages of `page` concatenate to the whole result.
    #[test]
    fn queries_match_the_model(
        docs in proptest::collection::vec(document(), 0..40),
        filter in proptest::option::of(filter()),
        order in order(),
        page in 1usize..7,
        indexed in any::<bool>(),
    ) {
        runtime().block_on(async {
            let store = OpenOptions::new().open_in_memory().await.unwrap();
            if indexed {
                store.create_index("c", &[field("n"), field("s")]).await.unwrap();
                store.create_index("c", &[field("o.k")]).await.unwrap();
            }
            let docs: Vec<(String, Value)> = docs.into_iter().enumerate().map(|(i, d)| (format!("d{i:02}"), d)).collect();
            for (id, d) in &docs {
                store.put("c", id, tide_core::Doc::from_value(d).unwrap()).await.unwrap();
            }
            // Another collection's documents are never found.
            store.put("other", "d00", tide_core::Doc::from_value(&json!({"n": 1, "s": "a"})).unwrap()).await.unwrap();
            let whole = query_of(filter.clone(), &order, 1_000);
            let want = expected(&whole, &docs, 1_000);
            prop_assert_eq!(&stored(&store, &whole).await, &want, "query {:?}", whole);
            prop_assert_eq!(store.query_count(&whole).await.unwrap(), want.len() as u64);
            // Keyset pages, `page` at a time.
            let mut paged = Vec::new();
            let mut q = query_of(filter, &order, page);
            loop {
                let p = store.query(&q).await.unwrap();
                paged.extend(p.docs.into_iter().map(|(id, d)| (id, serde_json::from_str::<Value>(d.as_str()).unwrap())));
                match p.next {
                    Some(next) => q = q.after(next),
                    None => break,
                }
                prop_assert!(paged.len() <= want.len(), "pages run past the result");
            }
            prop_assert_eq!(paged, want);
            Ok(())
        })?;
    }
}

/// 1,000 documents, an index on `status, due`, and the plans of the
/// filters it should serve.
#[tokio::test]
async fn an_index_serves_equality_ranges_lists_prefixes_and_order() {
    let store = OpenOptions::new().open_in_memory().await.unwrap();
    for i in 0..1_000 {
        let status = ["open", "done", "late"][i % 3];
        let doc = json!({"status": status, "due": i % 97, "title": format!("t{i}")});
        store.put("tasks", &format!("{i:04}"), tide_core::Doc::from_value(&doc).unwrap()).await.unwrap();
    }
    let unindexed = store.query_plan(&Query::new("tasks").filter(field("status").eq("open"))).await.unwrap();
    assert!(!unindexed.iter().any(|l| l.contains("tide_ix_")), "{unindexed:?}");
    store.create_index("tasks", &[field("status"), field("due")]).await.unwrap();
    store.create_index("tasks", &[field("title")]).await.unwrap();
    store.create_index("tasks", &[field("due")]).await.unwrap();
    // (what, query, whether the index also gives the order)
    let cases = [
        ("equality", Query::new("tasks").filter(field("due").eq(5)), true),
        ("equality on a leading field", Query::new("tasks").filter(field("status").eq("open")), false),
        (
            "equality and a range",
            Query::new("tasks").filter(field("status").eq("late").and(field("due").lt(10))),
            false,
        ),
        ("a list", Query::new("tasks").filter(field("status").is_in(["open", "late"])), false),
        ("a prefix", Query::new("tasks").filter(field("title").starts_with("t1")), false),
        ("a range", Query::new("tasks").filter(field("title").gt("t5")), false),
        ("order by an indexed field", Query::new("tasks").order_by(field("title")).limit(10), true),
        (
            "equality, ordered by the next field",
            Query::new("tasks").filter(field("status").eq("open")).order_by(field("due")),
            true,
        ),
    ];
    for (what, q, ordered) in cases {
        let plan = store.query_plan(&q).await.unwrap();
        assert!(plan.iter().any(|l| l.contains("USING INDEX tide_ix_")), "{what}: {plan:?}");
        if ordered {
            assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{what} sorts without the index: {plan:?}");
        }
    }
    let open = Query::new("tasks").filter(field("status").eq("open")).order_by(field("due"));
    assert_eq!(store.query_count(&open).await.unwrap(), 334);
}

/// Indexes are in the file: a reopened store uses them and lists them; a
/// dropped one is gone.
#[tokio::test]
async fn indexes_survive_a_restart_and_can_be_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&path).await.unwrap();
    store.put("tasks", "a", tide_core::Doc::from_value(&json!({"status": "open"})).unwrap()).await.unwrap();
    store.create_index("tasks", &[field("status")]).await.unwrap();
    store.close().await;
    let store = Store::open(&path).await.unwrap();
    assert_eq!(store.indexes().await.unwrap(), vec![("tasks".to_owned(), vec!["status".to_owned()])]);
    let q = Query::new("tasks").filter(field("status").eq("open"));
    assert!(store.query_plan(&q).await.unwrap().iter().any(|l| l.contains("tide_ix_")));
    assert_eq!(store.query(&q).await.unwrap().docs.len(), 1);
    store.drop_index("tasks", &[field("status")]).await.unwrap();
    assert!(store.indexes().await.unwrap().is_empty());
    assert!(!store.query_plan(&q).await.unwrap().iter().any(|l| l.contains("tide_ix_")));
    assert_eq!(store.query(&q).await.unwrap().docs.len(), 1, "the same answer without it");
}

/// Bad queries are refused with what is wrong, before anything runs; a
/// cursor from another query too.
#[tokio::test]
async fn bad_queries_say_what_is_wrong() {
    let store = OpenOptions::new().open_in_memory().await.unwrap();
    let err = |q: Query| {
        let store = store.clone();
        async move { store.query(&q).await.unwrap_err().to_string() }
    };
    assert!(err(Query::new("c").filter(field("a..b").eq(1))).await.contains("field \"a..b\""));
    assert!(err(Query::new("c").filter(field("a").eq(json!({"x": 1})))).await.contains("compare with a scalar"));
    assert!(err(Query::new("c/d")).await.contains("collection"));
    let many = (0..300).fold(field("a").eq(0), |f, i| f.or(field("a").eq(i)));
    assert!(err(Query::new("c").filter(many)).await.contains("the limit is 256"));
    let forged = Query::new("c").order_by(field("a")).after("[[], \"x\"]".parse().unwrap());
    assert!(err(forged).await.contains("cursor"));
    let index = store.create_index("c", &[field("bad\"name")]).await.unwrap_err();
    assert!(index.to_string().contains("invalid query"), "{index}");
}

/// A query while pages of remote changes apply sees each page whole or not
/// at all: every page sets all 200 documents to its own number, and no
/// query ever finds two numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_sees_a_page_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.db")).await.unwrap();
    let page = |k: u64| -> Vec<tide_core::Change> {
        (0..200u64)
            .map(|i| tide_core::Change {
                collection: "c".into(),
                id: format!("d{i:03}"),
                stamp: tide_core::Stamp::new(k, "server"),
                payload: tide_core::Payload::Put(tide_core::Doc::from_value(&json!({ "v": k })).unwrap()),
                seq: (k - 1) * 200 + i + 1,
            })
            .collect()
    };
    store.apply_page(page(1), tide_core::Cursor(200)).await.unwrap();
    let writer = store.clone();
    let pages = tokio::spawn(async move {
        for k in 2..=60 {
            writer.apply_page(page(k), tide_core::Cursor(k * 200)).await.unwrap();
        }
    });
    let all = Query::new("c").limit(1_000);
    let mut reads = 0;
    while !pages.is_finished() || reads == 0 {
        let found = store.query(&all).await.unwrap().docs;
        assert_eq!(found.len(), 200);
        let numbers: std::collections::BTreeSet<String> =
            found.iter().map(|(_, d)| serde_json::from_str::<Value>(d.as_str()).unwrap()["v"].to_string()).collect();
        assert_eq!(numbers.len(), 1, "a query saw part of a page: {numbers:?}");
        reads += 1;
    }
    pages.await.unwrap();
    assert_eq!(store.query_count(&Query::new("c").filter(field("v").eq(60))).await.unwrap(), 200);
}
