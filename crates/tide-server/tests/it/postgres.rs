//! PostgreSQL: the cursor under concurrent writers (reliability.md V8),
//! same-key conflicts from two server processes' worth of connections,
//! randomized concurrent convergence, and two `tide-server` processes on one
//! database. Needs `TIDE_TEST_POSTGRES_URL` (set by `.ci/run`); without it
//! each test says so loudly and does not pretend to pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tide_core::{Cursor, Decision, Op, OpResult, Payload, Stamp, SyncRequest, decide};
use tide_server::{NoAuth, PostgresBackend, Server, ServerConfig};
use tide_transport::{HttpTransport, Transport};

pub(crate) fn url() -> Option<String> {
    crate::service("TIDE_TEST_POSTGRES_URL", "the PostgreSQL backend")
}

pub(crate) use crate::common::fresh_schema;

async fn serve(url: &str) -> String {
    let backend =
        PostgresBackend::open(url, tide_server::Durability::Full, tide_core::Limits::default()).await.unwrap();
    let server = Server::new(backend, Arc::new(NoAuth::new("pg")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    endpoint
}

fn put(node: &str, id: &str, lamport: u64, v: u64) -> Op {
    Op {
        collection: "c".into(),
        id: id.into(),
        stamp: Stamp::new(lamport, node),
        payload: Payload::Put(json!({"v": v}).as_object().cloned().unwrap().into()),
        op_id: None,
    }
}

fn req(node: &str, cursor: Option<Cursor>, ops: Vec<Op>) -> SyncRequest {
    let mut r = SyncRequest::new(node, cursor);
    r.ops = ops;
    r
}

#[tokio::test]
async fn v8_a_late_commit_is_not_skipped_by_a_pull() {
    use sqlx::{ConnectOptions, Connection};
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    let endpoint = serve(&url).await;
    let (a, b, reader) = (
        HttpTransport::new(&endpoint).unwrap(),
        HttpTransport::new(&endpoint).unwrap(),
        HttpTransport::new(&endpoint).unwrap(),
    );
    a.exchange(&req("a", None, vec![put("a", "first", 1, 1)])).await.unwrap();

    // Writer A's transaction holds the namespace open, as a slow server
    // process would in the middle of applying a request.
    let mut held: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    sqlx::query("BEGIN").execute(&mut held).await.unwrap();
    sqlx::query("SELECT seq FROM tide_namespaces WHERE namespace = 'pg' FOR UPDATE").execute(&mut held).await.unwrap();
    sqlx::query("UPDATE tide_namespaces SET seq = seq + 1 WHERE namespace = 'pg'").execute(&mut held).await.unwrap();
    let wire = r#"{"collection":"c","id":"late","kind":"put","doc":{"v":2},"lamport":2,"node_id":"slow","seq":"#;
    sqlx::query(
        "INSERT INTO tide_rows (namespace, collection, id, lamport, node_id, deleted, seq, bucket, vhash, size, wire) \
         VALUES ('pg', 'c', 'late', 2, 'slow', false, 2, 0, 0, length($1) + 2, $1)",
    )
    .bind(wire)
    .execute(&mut held)
    .await
    .unwrap();

    // Writer B commits meanwhile: it must wait for A, not take seq 3 and commit first.
    let mut b_write = tokio::spawn(async move { b.exchange(&req("b", None, vec![put("b", "other", 5, 3)])).await });
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut b_write).await.is_err(), "B waits for the namespace");
    // A pull now sees only what is committed, and its cursor stays below A's seq.
    let pulled = reader.exchange(&req("r", None, vec![])).await.unwrap();
    assert_eq!((pulled.cursor, pulled.changes.len()), (Cursor(1), 1));
    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    held.close().await.unwrap();
    let b_resp = b_write.await.unwrap().unwrap();
    assert_eq!(b_resp.results, [OpResult::Applied { seq: 3 }], "B's seq follows A's commit");
    // From the old cursor the reader gets A's late change, then B's: nothing skipped.
    let next = reader.exchange(&req("r", Some(pulled.cursor), vec![])).await.unwrap();
    assert_eq!(next.changes.iter().map(|c| (c.id.as_str(), c.seq)).collect::<Vec<_>>(), [("late", 2), ("other", 3)]);
}

#[tokio::test]
async fn a_transaction_stuck_on_a_namespace_makes_its_writes_answer_503_not_hang() {
    use sqlx::{ConnectOptions, Connection};
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    let endpoint = serve(&url).await;
    let client = HttpTransport::new(&endpoint).unwrap();
    client.exchange(&req("a", None, vec![put("a", "first", 1, 1)])).await.unwrap();

    // Another session holds the namespace's row, as a stuck server would.
    let mut stuck: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    sqlx::query("BEGIN").execute(&mut stuck).await.unwrap();
    sqlx::query("SELECT seq FROM tide_namespaces WHERE namespace = 'pg' FOR UPDATE").execute(&mut stuck).await.unwrap();

    let second = req("a", None, vec![put("a", "second", 2, 2)]);
    let err = tokio::time::timeout(tide_server::POSTGRES_LOCK_TIMEOUT * 4, client.exchange(&second))
        .await
        .expect("the write gives up after the lock timeout")
        .unwrap_err();
    assert_eq!(err.code(), Some(tide_core::ErrorCode::Unavailable), "{err}");
    // Reads go on meanwhile, and nothing was written.
    let pulled = client.exchange(&req("r", None, vec![])).await.unwrap();
    assert_eq!(pulled.changes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["first"]);

    sqlx::query("ROLLBACK").execute(&mut stuck).await.unwrap();
    stuck.close().await.unwrap();
    let retried = client.exchange(&second).await.unwrap();
    assert_eq!(retried.results, [OpResult::Applied { seq: 2 }]);
}

#[tokio::test]
async fn an_exchange_whose_client_hung_up_is_abandoned_and_its_queued_write_still_wakes_polls() {
    use sqlx::{ConnectOptions, Connection};
    use tokio::io::AsyncWriteExt;
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    let endpoint = serve(&url).await;
    let addr = endpoint.trim_start_matches("http://").trim_end_matches("/sync").to_owned();
    let client = HttpTransport::new(&endpoint).unwrap();
    let first = client.exchange(&req("a", None, vec![put("a", "first", 1, 1)])).await.unwrap();
    let abandoned = || async {
        let (status, body) = crate::support::raw(
            addr.parse().unwrap(),
            b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        body.lines().find_map(|l| l.strip_prefix("tide_exchanges_abandoned_total ")?.parse::<u64>().ok()).unwrap()
    };
    assert_eq!(abandoned().await, 0);

    // A poll holds at the namespace's head.
    let mut poll = req("watcher", Some(first.cursor), vec![]);
    poll.wait = Some(Duration::from_secs(20));
    let watcher = HttpTransport::new(&endpoint).unwrap();
    let held = tokio::spawn(async move { watcher.exchange(&poll).await });

    // The namespace is stuck, so a write waits in its group; its client hangs up.
    let mut stuck: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    sqlx::query("BEGIN").execute(&mut stuck).await.unwrap();
    sqlx::query("SELECT seq FROM tide_namespaces WHERE namespace = 'pg' FOR UPDATE").execute(&mut stuck).await.unwrap();
    let body = serde_json::to_string(&req("a", Some(first.cursor), vec![put("a", "left", 2, 2)])).unwrap();
    let mut hung_up = tokio::net::TcpStream::connect(&addr).await.unwrap();
    hung_up.write_all(&crate::support::post(&body, "")).await.unwrap();
    // Once the namespace's writer waits on the row with the write, the client
    // goes (watched from a session outside any transaction, whose view of
    // the activity is fresh at each statement).
    let mut watch: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'WITH n AS (UPDATE tide_namespaces%'",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the write reaches its group");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(hung_up);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while abandoned().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the server noticed the client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Unstuck: the write that reached its group is applied whole, and the
    // held poll hears of it although nobody waits for the write's answer.
    sqlx::query("ROLLBACK").execute(&mut stuck).await.unwrap();
    stuck.close().await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), held).await.expect("the poll wakes").unwrap().unwrap();
    assert_eq!(woken.changes.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["left"]);
}

/// `tasks` clients, spread over `endpoints`, write the same few keys for
/// `rounds` rounds; afterwards every key holds its highest stamp.
async fn same_key_writes(endpoints: &[String], tasks: u64, rounds: u64) {
    let best: Arc<std::sync::Mutex<BTreeMap<String, Stamp>>> = Arc::default();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let endpoint = endpoints[usize::try_from(t).unwrap() % endpoints.len()].clone();
            let best = Arc::clone(&best);
            tokio::spawn(async move {
                let client = HttpTransport::new(&endpoint).unwrap();
                let node = format!("n{t}");
                for round in 1..=rounds {
                    let ops: Vec<Op> =
                        (0..4).map(|k| put(&node, &format!("k{k}"), round * 3 + (t + k) % 3, t)).collect();
                    client.exchange(&req(&node, None, ops.clone())).await.unwrap();
                    let mut best = best.lock().unwrap();
                    for op in ops {
                        let e = best.entry(op.id.clone()).or_insert_with(|| op.stamp.clone());
                        if op.stamp > *e {
                            *e = op.stamp;
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        tokio::time::timeout(Duration::from_mins(1), h).await.expect("no deadlock").unwrap();
    }
    let all = HttpTransport::new(&endpoints[0]).unwrap().exchange(&req("r", None, vec![])).await.unwrap();
    let stored: BTreeMap<String, Stamp> = all.changes.into_iter().map(|c| (c.id, c.stamp)).collect();
    assert_eq!(stored, *best.lock().unwrap(), "every key holds its highest stamp: no lost update");
}

#[tokio::test]
async fn same_key_writes_through_two_servers_resolve_by_lww_without_deadlock() {
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    // Two backends with their own pools: two server processes' worth.
    same_key_writes(&[serve(&url).await, serve(&url).await], 8, 25).await;
}

/// A client that pushes random writes and pulls pages, keeping its state
/// by the LWW rule; `sync` runs until caught up.
struct Replica {
    node: String,
    lamport: u64,
    cursor: Option<Cursor>,
    state: BTreeMap<String, (Stamp, Payload)>,
    written: Vec<Op>,
}

impl Replica {
    async fn exchange(&mut self, t: &HttpTransport, ops: Vec<Op>) -> bool {
        let mut r = req(&self.node, self.cursor, ops);
        r.limit = Some(7);
        let resp = t.exchange(&r).await.unwrap();
        for c in resp.changes {
            self.lamport = self.lamport.max(c.stamp.lamport);
            let stored = self.state.get(&c.id).map(|(s, p)| (s, p));
            if decide(stored, &c.stamp, &c.payload) == Decision::Apply {
                self.state.insert(c.id, (c.stamp, c.payload));
            }
        }
        assert!(resp.cursor >= self.cursor.unwrap_or_default(), "the cursor never goes back");
        self.cursor = Some(resp.cursor);
        resp.has_more
    }

    fn write(&mut self, rng: &mut u64) -> Op {
        *rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.lamport += 1;
        let id = format!("k{}", (*rng >> 33) % 6);
        let op = put(&self.node, &id, self.lamport, *rng >> 40);
        self.state.insert(id, (op.stamp.clone(), op.payload.clone()));
        self.written.push(op.clone());
        op
    }
}

async fn converge(endpoints: &[String], seed: u64) {
    let tasks: Vec<_> = (0..6u64)
        .map(|c| {
            let endpoint = endpoints[(c as usize) % endpoints.len()].clone();
            tokio::spawn(async move {
                let t = HttpTransport::new(&endpoint).unwrap();
                let mut rng = seed.wrapping_add(c);
                let mut r = Replica {
                    node: format!("client{c}"),
                    lamport: 0,
                    cursor: None,
                    state: BTreeMap::new(),
                    written: Vec::new(),
                };
                for _ in 0..30 {
                    let ops = (0..3).map(|_| r.write(&mut rng)).collect();
                    r.exchange(&t, ops).await;
                }
                r
            })
        })
        .collect();
    let mut replicas = Vec::new();
    for t in tasks {
        replicas.push(t.await.unwrap());
    }
    // Heal: everyone pulls to the end, after all writes committed.
    let mut oracle: BTreeMap<String, (Stamp, Payload)> = BTreeMap::new();
    for op in replicas.iter().flat_map(|r| &r.written) {
        let e = oracle.entry(op.id.clone()).or_insert_with(|| (op.stamp.clone(), op.payload.clone()));
        if op.stamp > e.0 {
            *e = (op.stamp.clone(), op.payload.clone());
        }
    }
    for (i, r) in replicas.iter_mut().enumerate() {
        let t = HttpTransport::new(&endpoints[i % endpoints.len()]).unwrap();
        while r.exchange(&t, Vec::new()).await {}
        assert_eq!(r.state, oracle, "seed {seed}: {} converged on the highest stamp of every key", r.node);
    }
}

#[tokio::test]
async fn same_key_writes_on_sqlite_resolve_by_lww_through_group_commits() {
    // Many concurrent requests are committed together in groups.
    let running = crate::support::start_on(crate::support::Storage::Sqlite).await;
    same_key_writes(&[running.endpoint()], 16, 20).await;
    let fresh = crate::support::start_on(crate::support::Storage::Sqlite).await;
    converge(&[fresh.endpoint()], 11).await;
}

#[tokio::test]
async fn concurrent_random_clients_converge_with_nothing_skipped() {
    let Some(url) = url() else { return };
    for seed in 0..3 {
        let url = fresh_schema(&url).await;
        let endpoints = [serve(&url).await, serve(&url).await];
        converge(&endpoints, seed).await;
    }
}

#[tokio::test]
async fn two_server_processes_on_one_database() {
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    let spawn = || crate::binary::spawn(&["--no-auth", "--namespace", "pg", "--database-url", &url]);
    let ((mut one, e1), (mut two, e2)) = (spawn(), spawn());
    converge(&[e1, e2], 7).await;
    for child in [&mut one, &mut two] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[tokio::test]
async fn servers_starting_together_migrate_safely() {
    let Some(url) = url() else { return };
    let url = fresh_schema(&url).await;
    let opening: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                PostgresBackend::open(&url, tide_server::Durability::Full, tide_core::Limits::default())
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for o in opening {
        o.await.unwrap().expect("every server starts on the shared schema");
    }
}

/// A schema-3 database (before horizons) opens, writes go on, and it
/// collects.
#[tokio::test]
async fn a_schema_3_database_is_migrated_and_collects() {
    use sqlx::{ConnectOptions, Connection};
    use tide_server::{Backend, Namespace, Principal};
    let Some(base) = url() else { return };
    let url = fresh_schema(&base).await;
    let principal = Principal { id: "alice".into(), namespace: Namespace::new("pg") };
    let open = || PostgresBackend::open(&url, tide_server::Durability::Full, tide_core::Limits::default());
    let backend = open().await.unwrap();
    let ops = vec![put("n1", "a", 1, 1), Op { payload: Payload::Delete, ..put("n1", "a", 2, 0) }, put("n1", "b", 3, 1)];
    backend.exchange(&principal, Arc::new(req("n1", None, ops))).await.unwrap();
    drop(backend);
    let mut conn: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    for statement in [
        "ALTER TABLE tide_namespaces DROP COLUMN horizon, DROP COLUMN horizon_lamport, DROP COLUMN horizon_node",
        "ALTER TABLE tide_rows DROP COLUMN born",
        "UPDATE tide_server_meta SET value = '3' WHERE key = 'schema_version'",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let backend = open().await.unwrap();
    let page = backend.exchange(&principal, Arc::new(req("r", None, vec![]))).await.unwrap().to_response();
    assert_eq!(page.changes.iter().map(|c| (c.id.as_str(), c.seq)).collect::<Vec<_>>(), [("a", 2), ("b", 3)]);
    let collected = backend.collect(1).await.unwrap();
    assert_eq!(collected.tombstones, 1, "a's tombstone is more than one change behind");
    let page = backend.exchange(&principal, Arc::new(req("r", None, vec![]))).await.unwrap().to_response();
    assert_eq!((page.changes.len(), page.horizon), (1, Some(2)));
}

/// A database written by tide 0.1 before digests (schema 1, frozen here)
/// opens with every version served exactly as before, its digests computed
/// from the versions, and writes going on from its seqs.
#[tokio::test]
async fn a_schema_1_database_is_migrated_with_nothing_lost() {
    use sqlx::{ConnectOptions, Connection};
    use tide_server::{Backend, Namespace, Principal};
    let Some(base) = url() else { return };
    let url = fresh_schema(&base).await;
    let mut conn: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    for statement in [
        "CREATE TABLE tide_server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO tide_server_meta (key, value) VALUES ('schema_version', '1')",
        r#"CREATE TABLE tide_namespaces (namespace TEXT COLLATE "C" PRIMARY KEY, seq BIGINT NOT NULL,
            lamport_max BIGINT NOT NULL)"#,
        r#"CREATE TABLE tide_rows (namespace TEXT COLLATE "C" NOT NULL, collection TEXT COLLATE "C" NOT NULL,
            id TEXT COLLATE "C" NOT NULL, doc TEXT, lamport BIGINT NOT NULL, node_id TEXT COLLATE "C" NOT NULL,
            deleted BOOLEAN NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (namespace, collection, id))"#,
        "CREATE UNIQUE INDEX tide_rows_by_seq ON tide_rows (namespace, seq)",
        "INSERT INTO tide_namespaces VALUES ('pg', 3, 7)",
        r#"INSERT INTO tide_rows VALUES ('pg', 'notes', 'a', '{"t":"é\"\\","n":1.5}', 5, 'n1', false, 1),
            ('pg', 'notes', 'gone', NULL, 6, 'n2', true, 2), ('pg', 'todo', 'b', '{"done":false}', 7, 'n1', false, 3)"#,
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let backend =
        PostgresBackend::open(&url, tide_server::Durability::Full, tide_core::Limits::default()).await.unwrap();
    let principal = Principal { id: "alice".into(), namespace: Namespace::new("pg") };
    let page = backend.exchange(&principal, Arc::new(req("r", None, vec![]))).await.unwrap().to_response();
    let expected = json!([
        {"collection": "notes", "id": "a", "kind": "put", "doc": {"t": "é\"\\", "n": 1.5}, "lamport": 5, "node_id": "n1", "seq": 1},
        {"collection": "notes", "id": "gone", "kind": "delete", "doc": null, "lamport": 6, "node_id": "n2", "seq": 2},
        {"collection": "todo", "id": "b", "kind": "put", "doc": {"done": false}, "lamport": 7, "node_id": "n1", "seq": 3},
    ]);
    assert_eq!(serde_json::to_value(&page.changes).unwrap(), expected);

    // The roots are the digests of the live versions.
    let mut model = crate::support::model_of(&page.changes);
    let mut ask = req("r", Some(Cursor(3)), vec![]);
    ask.verify = Some(tide_core::Verify::Roots);
    let roots = backend.exchange(&principal, Arc::new(ask.clone())).await.unwrap().to_response().roots;
    assert!(roots.as_ref().is_some_and(|r| r.len() == 2), "{roots:?}");
    assert_eq!(roots, model.exchange(&ask).unwrap().roots);

    let written =
        backend.exchange(&principal, Arc::new(req("n1", Some(Cursor(3)), vec![put("n1", "new", 8, 1)]))).await;
    assert_eq!(written.unwrap().results, [OpResult::Applied { seq: 4 }]);
}

/// Collection running beside concurrent write groups (lock-free ones
/// conflict with it and go again under the row lock): every request is
/// answered, the end state is each key's last applied op, and no tombstone
/// at or below the horizon is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_beside_concurrent_writers_loses_nothing() {
    use tide_server::{Backend, Namespace, Principal};
    let Some(base) = url() else { return };
    let url = fresh_schema(&base).await;
    let backend =
        PostgresBackend::open(&url, tide_server::Durability::Normal, tide_core::Limits::default()).await.unwrap();
    let principal = Principal { id: "p".into(), namespace: Namespace::new("pg") };
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (backend, principal) = (Arc::clone(&backend), principal.clone());
        writers.push(tokio::spawn(async move {
            let node = format!("w{w}");
            let mut applied = Vec::new();
            for i in 0..40u64 {
                let id = format!("k{}", (i * 7 + w) % 10);
                let lamport = 1 + i * 4 + w;
                let op = if i % 3 == 0 {
                    Op { payload: Payload::Delete, ..put(&node, &id, lamport, 0) }
                } else {
                    put(&node, &id, lamport, i)
                };
                let reply = backend.exchange(&principal, Arc::new(req(&node, None, vec![op.clone()]))).await.unwrap();
                if let OpResult::Applied { seq } = reply.results[0] {
                    applied.push((seq, op));
                }
            }
            applied
        }));
    }
    let collecting = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            let mut removed = 0;
            for _ in 0..60 {
                removed += backend.collect(5).await.unwrap().tombstones;
                tokio::task::yield_now().await;
            }
            removed
        })
    };
    let mut last: BTreeMap<String, (u64, Op)> = BTreeMap::new();
    for w in writers {
        for (seq, op) in w.await.unwrap() {
            if last.get(&op.id).is_none_or(|(s, _)| *s < seq) {
                last.insert(op.id.clone(), (seq, op));
            }
        }
    }
    // However the steps above interleaved with the writers (they may all
    // run before any write), one tombstone is sure to fall behind the
    // horizon: a delete followed by more than five writes.
    let mut after = vec![Op { payload: Payload::Delete, ..put("w9", "gone", 1_000, 0) }];
    after.extend((0..6).map(|i| put("w9", &format!("x{i}"), 1_001 + i, i)));
    for op in after {
        let reply = backend.exchange(&principal, Arc::new(req("w9", None, vec![op.clone()]))).await.unwrap();
        let OpResult::Applied { seq } = reply.results[0] else { panic!("{:?}", reply.results) };
        last.insert(op.id.clone(), (seq, op));
    }
    let removed = collecting.await.unwrap() + backend.collect(5).await.unwrap().tombstones;
    let mut read = req("reader", None, vec![]);
    read.limit = Some(1_000);
    let page = backend.exchange(&principal, Arc::new(read)).await.unwrap().to_response();
    let horizon = page.horizon.unwrap_or(0);
    for change in &page.changes {
        assert!(change.payload.doc().is_some() || change.seq > horizon, "a tombstone below the horizon: {change:?}");
        let (seq, op) = &last[&change.id];
        assert_eq!((change.seq, &change.stamp), (*seq, &op.stamp), "the last applied op of {}", change.id);
    }
    for (id, (seq, op)) in &last {
        let on_page = page.changes.iter().any(|c| &c.id == id);
        assert!(on_page || (op.payload.doc().is_none() && *seq <= horizon), "{id} went missing");
    }
    assert!(removed > 0 && horizon > 0, "collection ran: {removed} removed, horizon {horizon}");
}
