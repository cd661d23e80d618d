//! Access rules (PROTOCOL.md §15): two principals in one namespace never
//! read each other's private collections, whatever they ask for (pages,
//! subscriptions, roots, digest levels, fetches, repairs), and each write
//! outside their rules comes back `forbidden` per op while the rest of its
//! request is applied. On both backends, and through the binary's `--rules`.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Arc;

use serde_json::json;
use tide_core::{Cursor, DocKey, ErrorCode, Op, OpResult, Payload, Stamp, SyncRequest, SyncResponse, Verify};
use tide_server::{Backend, BackendError, Durability, Namespace, Principal, RulesFile};
use tide_transport::{HttpTransport, Transport};

const RULES: &str = r#"
[[rule]]
principal = "*"
read = ["public", "private-{principal}"]
write = ["public", "private-{principal}"]

[[rule]]
principal = "*"
read = ["posts"]
write = ["posts"]
id_prefix = "{principal}/"
"#;

fn who(id: &str) -> Principal {
    Principal { id: id.into(), namespace: Namespace::new("shared") }
}

fn put(collection: &str, id: &str, lamport: u64, node: &str) -> Op {
    let doc = tide_core::Doc::from_value(&json!({ "by": node, "n": lamport })).unwrap();
    Op {
        collection: collection.into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(doc),
        op_id: None,
    }
}

fn writes(node: &str, ops: Vec<Op>) -> Arc<SyncRequest> {
    let mut req = SyncRequest::new(node, None);
    req.ops = ops;
    Arc::new(req)
}

/// Every change `principal` can page through from the start with `collections`, `limit` at a time.
async fn everything(
    backend: &Arc<dyn Backend>,
    principal: &Principal,
    collections: Option<&[&str]>,
) -> BTreeSet<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let mut req = SyncRequest::new(format!("{}-reader", principal.id), cursor);
        req.limit = Some(1);
        req.collections = collections.map(|c| c.iter().map(|s| (*s).to_owned()).collect());
        let page = backend.exchange(principal, Arc::new(req)).await.unwrap().to_response();
        seen.extend(page.changes.into_iter().map(|c| (c.collection, c.id)));
        cursor = Some(page.cursor);
        if !page.has_more {
            return seen;
        }
    }
}

fn keys(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter().map(|(c, i)| ((*c).to_owned(), (*i).to_owned())).collect()
}

async fn refused(backend: &Arc<dyn Backend>, principal: &Principal, req: SyncRequest) -> tide_core::Violation {
    match backend.exchange(principal, Arc::new(req)).await {
        Err(BackendError::Refused(v)) => v,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn private_collections_stay_private(backend: Arc<dyn Backend>) {
    each_writes_within_its_rules(&backend).await;
    reads_stay_within_the_rules(&backend).await;
}

/// Ann and bob write their own; ann's writes to bob's collection and
/// prefix come back `forbidden`, per op.
async fn each_writes_within_its_rules(backend: &Arc<dyn Backend>) {
    let (ann, bob) = (who("ann"), who("bob"));
    // Each writes its own; ann also tries bob's private collection and post.
    let ann_results = backend
        .exchange(
            &ann,
            writes(
                "ann-phone",
                vec![
                    put("public", "a", 1, "ann-phone"),
                    put("private-bob", "planted", 2, "ann-phone"),
                    put("private-ann", "x", 3, "ann-phone"),
                    put("posts", "bob/2", 4, "ann-phone"),
                    put("posts", "ann/1", 5, "ann-phone"),
                ],
            ),
        )
        .await
        .unwrap()
        .results;
    assert!(matches!(ann_results[0], OpResult::Applied { .. }), "{ann_results:?}");
    assert_eq!(
        ann_results[1],
        OpResult::Rejected {
            code: ErrorCode::Forbidden,
            message: r#"principal "ann" may not write collection "private-bob""#.into()
        }
    );
    assert!(matches!(ann_results[2], OpResult::Applied { .. }), "{ann_results:?}");
    assert_eq!(
        ann_results[3],
        OpResult::Rejected {
            code: ErrorCode::Forbidden,
            message: r#"principal "ann" may write in collection "posts" only ids starting with "ann/""#.into()
        }
    );
    assert!(matches!(ann_results[4], OpResult::Applied { .. }), "{ann_results:?}");
    let bob_results = backend
        .exchange(
            &bob,
            writes(
                "bob-phone",
                vec![
                    put("public", "b", 1, "bob-phone"),
                    put("private-bob", "y", 2, "bob-phone"),
                    put("posts", "bob/1", 3, "bob-phone"),
                ],
            ),
        )
        .await
        .unwrap()
        .results;
    assert!(bob_results.iter().all(|r| matches!(r, OpResult::Applied { .. })), "{bob_results:?}");
}

async fn reads_stay_within_the_rules(backend: &Arc<dyn Backend>) {
    let (ann, bob) = (who("ann"), who("bob"));

    // Pages: whatever ann subscribes to, bob's private collection is not in them.
    let ann_sees =
        keys(&[("public", "a"), ("public", "b"), ("private-ann", "x"), ("posts", "ann/1"), ("posts", "bob/1")]);
    assert_eq!(everything(backend, &ann, None).await, ann_sees);
    assert_eq!(everything(backend, &ann, Some(&["private-bob"])).await, keys(&[]));
    assert_eq!(
        everything(backend, &ann, Some(&["private-bob", "public"])).await,
        keys(&[("public", "a"), ("public", "b")])
    );
    let bob_sees =
        keys(&[("public", "a"), ("public", "b"), ("private-bob", "y"), ("posts", "ann/1"), ("posts", "bob/1")]);
    assert_eq!(everything(backend, &bob, None).await, bob_sees, "ann's planted note was never stored");

    // The response says what ann may read.
    let first = backend.exchange(&ann, Arc::new(SyncRequest::new("ann-phone", None))).await.unwrap().to_response();
    assert_eq!(first.readable, Some(vec!["posts".into(), "private-ann".into(), "public".into()]));

    // Roots: readable collections only, narrowed by the subscription.
    let roots = |collections: Option<Vec<String>>| {
        let backend = Arc::clone(backend);
        let ann = ann.clone();
        async move {
            let mut req = SyncRequest::new("ann-phone", Some(first.cursor));
            req.verify = Some(Verify::Roots);
            req.collections = collections;
            let resp: SyncResponse = backend.exchange(&ann, Arc::new(req)).await.unwrap().to_response();
            resp.roots.expect("roots of a settled exchange").into_keys().collect::<Vec<_>>()
        }
    };
    assert_eq!(roots(None).await, ["posts", "private-ann", "public"]);
    assert_eq!(roots(Some(vec!["public".into(), "private-bob".into()])).await, ["public"]);

    // Digest levels, key comparisons, fetches and repairs of bob's collection: refused.
    let mut groups = SyncRequest::new("ann-phone", Some(first.cursor));
    groups.verify = Some(Verify::Groups { collection: "private-bob".into() });
    let mut buckets = SyncRequest::new("ann-phone", Some(first.cursor));
    buckets.verify = Some(Verify::Buckets { collection: "private-bob".into(), groups: vec![0, 1] });
    let mut compare = SyncRequest::new("ann-phone", Some(first.cursor));
    compare.verify =
        Some(Verify::Keys { collection: "private-bob".into(), buckets: (0..4096).collect(), have: vec![] });
    let mut fetch = SyncRequest::new("ann-phone", Some(first.cursor));
    fetch.fetch = vec![DocKey("public".into(), "a".into()), DocKey("private-bob".into(), "y".into())];
    // A refused read applies nothing of its request.
    fetch.ops = vec![put("public", "sneaked", 9, "ann-phone")];
    for req in [groups, buckets, compare, fetch] {
        let violation = refused(backend, &ann, req).await;
        assert_eq!(violation.code, ErrorCode::Forbidden);
        assert_eq!(violation.message, r#"collection "private-bob" is not readable here"#);
    }
    let mut repair = SyncRequest::new("ann-phone", Some(first.cursor));
    repair.repair = true;
    repair.ops = vec![put("private-bob", "y", 99, "bob-phone")];
    let results = backend.exchange(&ann, Arc::new(repair)).await.unwrap().results;
    assert!(matches!(&results[0], OpResult::Rejected { code: ErrorCode::Forbidden, .. }), "{results:?}");

    // Nothing of bob's changed, and the sneaked write was never applied.
    let mut fetch = SyncRequest::new("bob-phone", Some(first.cursor));
    fetch.fetch = vec![DocKey("private-bob".into(), "y".into()), DocKey("public".into(), "sneaked".into())];
    let fetched = backend.exchange(&bob, Arc::new(fetch)).await.unwrap().to_response().fetched;
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].stamp, Stamp::new(2, "bob-phone"));
}

async fn sqlite_with_rules() -> (Arc<dyn Backend>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        tide_server::SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, tide_core::Limits::default())
            .await
            .unwrap();
    assert!(backend.set_access_rules(Arc::new(RulesFile::parse(RULES).unwrap())));
    (backend, dir)
}

#[tokio::test]
async fn private_collections_stay_private_on_sqlite() {
    let (backend, _dir) = sqlite_with_rules().await;
    private_collections_stay_private(backend).await;
}

#[tokio::test]
async fn private_collections_stay_private_on_postgres() {
    let Some(url) = crate::postgres::url() else { return };
    let url = crate::postgres::fresh_schema(&url).await;
    let backend =
        tide_server::PostgresBackend::open(&url, Durability::Full, tide_core::Limits::default()).await.unwrap();
    assert!(backend.set_access_rules(Arc::new(RulesFile::parse(RULES).unwrap())));
    private_collections_stay_private(backend).await;
}

/// The binary takes its rules from `--rules`; a write outside them comes
/// back `forbidden` over HTTP, and a rules file with a mistake stops it
/// with a message naming the rule.
#[tokio::test]
async fn the_binary_enforces_its_rules_file() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::File::create(&rules).unwrap().write_all(RULES.as_bytes()).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ann-token shared ann\nbob-token shared bob\n").unwrap();
    let db = dir.path().join("s.db");
    let (mut child, endpoint) = crate::binary::spawn(&[
        "--db",
        db.to_str().unwrap(),
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    let as_user = |token: &str| {
        HttpTransport::builder(&endpoint).header("authorization", format!("Bearer {token}")).build().unwrap()
    };
    let mut req = SyncRequest::new("bob-phone", None);
    req.ops = vec![put("private-bob", "y", 1, "bob-phone")];
    as_user("bob-token").exchange(&req).await.unwrap();
    let mut req = SyncRequest::new("ann-phone", None);
    req.ops = vec![put("private-bob", "z", 1, "ann-phone"), put("private-ann", "x", 2, "ann-phone")];
    let resp = as_user("ann-token").exchange(&req).await.unwrap();
    assert!(matches!(&resp.results[0], OpResult::Rejected { code: ErrorCode::Forbidden, .. }), "{:?}", resp.results);
    assert!(matches!(resp.results[1], OpResult::Applied { .. }));
    assert_eq!(resp.changes.iter().map(|c| c.collection.as_str()).collect::<Vec<_>>(), ["private-ann"]);
    let mut fetch = SyncRequest::new("ann-phone", Some(resp.cursor));
    fetch.fetch = vec![DocKey("private-bob".into(), "y".into())];
    match as_user("ann-token").exchange(&fetch).await {
        Err(tide_transport::Error::Status { status: 403, code: Some(ErrorCode::Forbidden), .. }) => {}
        other => panic!("expected 403 forbidden, got {other:?}"),
    }
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::write(&rules, "[[rule]]\nprincipal = \"*\"\nread = [\"bad/name\"]\n").unwrap();
    let out = std::process::Command::new(crate::binary::BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-auth",
            "--db",
            db.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rules.toml") && stderr.contains("rule 1"), "{stderr}");
}

/// Rules the test changes while the server runs.
struct Switchable(std::sync::Mutex<RulesFile>);

impl Switchable {
    fn set(&self, text: &str) {
        *self.0.lock().unwrap() = RulesFile::parse(text).unwrap();
    }
}

impl tide_server::AccessRules for Switchable {
    fn readable(&self, principal: &Principal) -> tide_server::Readable {
        self.0.lock().unwrap().readable(principal)
    }

    fn may_write(&self, principal: &Principal, op: &Op) -> Result<(), String> {
        self.0.lock().unwrap().may_write(principal, op)
    }
}

/// The bearer token is the principal's id, in one shared namespace.
struct TokenIsPrincipal;

#[async_trait::async_trait]
impl tide_server::Authenticator for TokenIsPrincipal {
    async fn authenticate(&self, token: Option<&str>) -> Result<Principal, tide_server::AuthError> {
        token.map(who).ok_or(tide_server::AuthError::Missing)
    }
}

const WIDE: &str = r#"
[[rule]]
principal = "admin"
read = ["*"]
write = ["*"]
"#;

/// The tide client under changing rules: a write it may not make lands in
/// its rejected list and is taken back; a collection it may read from now
/// on is pulled from the beginning; one it may no longer read stops
/// syncing; and its digest checks pass throughout.
#[tokio::test]
async fn a_client_follows_its_rules_as_they_change() {
    use tide_client::Tide;
    let dir = tempfile::tempdir().unwrap();
    let backend =
        tide_server::SqliteBackend::open(&dir.path().join("s.db"), Durability::Full, tide_core::Limits::default())
            .await
            .unwrap();
    let rules = Arc::new(Switchable(std::sync::Mutex::new(RulesFile::parse(&format!("{RULES}{WIDE}")).unwrap())));
    backend.set_access_rules(Arc::clone(&rules) as Arc<dyn tide_server::AccessRules>);
    let server = tide_server::Server::new(backend, Arc::new(TokenIsPrincipal), tide_server::ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    let open = |user: &str| {
        Tide::builder()
            .endpoint(&endpoint)
            .node_id(format!("{user}-phone"))
            .headers(tide_client::Headers::Static(vec![("authorization".into(), format!("Bearer {user}"))]))
            .open()
    };
    let admin = open("admin").await.unwrap();
    for (c, id) in [("reports", "r1"), ("reports", "r2"), ("public", "p1"), ("private-bob", "y")] {
        admin.collection::<serde_json::Value>(c).put(id, &json!({ "by": "admin" })).await.unwrap();
    }
    admin.sync_once().await.unwrap();

    let ann = open("ann").await.unwrap();
    ann.collection::<serde_json::Value>("private-bob").put("planted", &json!({})).await.unwrap();
    let report = ann.sync_once().await.unwrap();
    assert!(report.verified, "{report:?}");
    assert_eq!(report.rejected, 1);
    let rejected = ann.rejected().await.unwrap();
    assert_eq!((rejected[0].op.collection.as_str(), rejected[0].code), ("private-bob", ErrorCode::Forbidden));
    assert_eq!(ann.collection::<serde_json::Value>("private-bob").count().await.unwrap(), 0, "taken back");
    assert_eq!(ann.collection::<serde_json::Value>("public").count().await.unwrap(), 1);
    assert_eq!(ann.collection::<serde_json::Value>("reports").count().await.unwrap(), 0);

    // Ann may read the reports from now on: they arrive from the beginning.
    rules.set(&format!("{RULES}{WIDE}[[rule]]\nprincipal = \"ann\"\nread = [\"reports\"]\n"));
    let report = ann.sync_once().await.unwrap();
    assert_eq!(report.pulled, 2, "the reports, and nothing it held: {report:?}");
    assert_eq!(ann.collection::<serde_json::Value>("reports").count().await.unwrap(), 2);
    assert!(ann.sync_once().await.unwrap().verified);

    // And no longer the public collection: its new changes stop coming.
    rules.set(&format!("{WIDE}[[rule]]\nprincipal = \"ann\"\nread = [\"reports\", \"private-ann\"]\n"));
    admin.collection::<serde_json::Value>("public").put("p2", &json!({})).await.unwrap();
    admin.collection::<serde_json::Value>("reports").put("r3", &json!({})).await.unwrap();
    admin.sync_once().await.unwrap();
    let report = ann.sync_once().await.unwrap();
    assert!(report.verified, "{report:?}");
    assert_eq!(ann.collection::<serde_json::Value>("reports").count().await.unwrap(), 3);
    assert_eq!(ann.collection::<serde_json::Value>("public").get("p2").await.unwrap(), None);
    ann.close().await;
    admin.close().await;
}

/// The rules file README.md shows means what README.md says of it.
#[test]
fn the_readme_rules_mean_what_the_readme_says() {
    use tide_server::{AccessRules, Readable};
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let toml = readme.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a toml block");
    let rules = RulesFile::parse(toml).unwrap();
    let names = |list: &[&str]| Readable::Only(list.iter().map(|s| (*s).to_owned()).collect());
    assert_eq!(rules.readable(&who("ann")), names(&["board", "notes-ann", "posts"]));
    let write = |c: &str, id: &str| rules.may_write(&who("ann"), &put(c, id, 1, "n"));
    assert_eq!(write("board", "x"), Ok(()));
    assert_eq!(write("notes-ann", "x"), Ok(()));
    assert_eq!(write("posts", "ann/1"), Ok(()));
    assert!(write("posts", "bob/1").is_err());
    assert!(write("notes-bob", "x").is_err());
}
