//! The raw limit of a sync server on this machine: the least an exchange
//! of the load must cost, built from the fastest parts measured for a
//! hyper and SQLite sync server, with none of tide's protocol around them.
//!
//! - HTTP/1.1 keep-alive through hyper, as tide-server;
//! - the request parsed with tide-core's types (the same parse as tide's);
//! - one writer thread calling SQLite itself (rusqlite, no hand-off per
//!   statement): a group of every request waiting, one upsert per op under
//!   the last-writer-wins rule, the seq counter in memory, one commit at
//!   `synchronous=FULL`;
//! - each change rendered once when written; a page is one statement,
//!   `group_concat(wire || seq || '}')` over a table whose rowid is the
//!   seq, read on the serving thread's own connection;
//! - a poll with nothing to read held until the next commit, and the polls
//!   at one cursor sharing one read of their page; `GET /metrics` answers
//!   how many are held, as tide-server's gauge does.
//!
//! Left out, and each a cost tide pays: tokens, access rules, digests and
//! their roots, node chains, tombstone horizons, byte budgets, limits,
//! metrics. So tide-server cannot reach this; how near it comes, and how
//! far this is from the original, is what the limit tells.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use http_body_util::{BodyExt, Full};
use tide_core::{Payload, SyncRequest};

/// A page's most changes (tide's default page), written in [`PAGE`] as a literal.
const PAGE_LIMIT: i64 = 1_000;

const SCHEMA: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
    CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY, collection TEXT NOT NULL, id TEXT NOT NULL,
        lamport INTEGER NOT NULL, node_id TEXT NOT NULL, wire TEXT NOT NULL,
        UNIQUE (collection, id));";

/// One op's version, written unless a higher stamp is stored.
const UPSERT: &str = "INSERT INTO changes (seq, collection, id, lamport, node_id, wire) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (collection, id) DO UPDATE SET seq = excluded.seq, lamport = excluded.lamport, \
     node_id = excluded.node_id, wire = excluded.wire \
     WHERE (excluded.lamport, excluded.node_id) > (changes.lamport, changes.node_id)";

/// The changes after `?1` not written by `?2`, their count and last seq,
/// and the head, in one snapshot.
const PAGE: &str = "SELECT group_concat(wire || seq || '}', ','), max(seq), count(*), (SELECT max(seq) FROM changes) \
     FROM (SELECT wire, seq FROM changes WHERE seq > ?1 AND node_id <> ?2 ORDER BY seq LIMIT 1000)";

/// One request's writes for the writer thread, and where to answer: per
/// op, the seq it was stored under, or `None` when it lost.
struct Write {
    node: String,
    ops: Vec<(String, String, i64, String)>,
    answer: tokio::sync::oneshot::Sender<Vec<Option<i64>>>,
}

/// A page: the changes joined, the last seq read, how many, and the head.
type PageRead = (String, i64, i64, i64);

/// What every connection shares.
struct State {
    writes: mpsc::Sender<Write>,
    path: PathBuf,
    /// The head after each commit, for held polls.
    heads: tokio::sync::watch::Receiver<i64>,
    /// The last page read for polls: its cursor, and the page with every
    /// node's changes (a poll that finds its own in it reads its own).
    shared: std::sync::Mutex<Option<(i64, Arc<PageRead>)>>,
    /// Polls waiting for a commit, answered to `GET /metrics` as
    /// tide-server's `tide_held_requests` gauge is.
    held: AtomicUsize,
}

/// A poll's place among the held ones, given back when dropped.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn take(held: &'a AtomicUsize) -> Self {
        held.fetch_add(1, Ordering::SeqCst);
        Self(held)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves on a new loopback port; returns the endpoint.
pub(crate) async fn serve(path: PathBuf) -> String {
    let (writes, rx) = mpsc::channel::<Write>();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let (heads_tx, heads) = tokio::sync::watch::channel(0);
    std::thread::spawn(move || writer(conn, &rx, &heads_tx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    let state = Arc::new(State { writes, path, heads, shared: std::sync::Mutex::new(None), held: AtomicUsize::new(0) });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = Arc::clone(&state);
                    async move {
                        if req.method() == hyper::Method::GET {
                            let gauge = format!("tide_held_requests {}\n", state.held.load(Ordering::SeqCst));
                            return Ok(hyper::Response::new(Full::new(bytes::Bytes::from(gauge))));
                        }
                        let body = req.into_body().collect().await?.to_bytes();
                        let answer = exchange(&body, &state).await;
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(bytes::Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    endpoint
}

/// One exchange: its writes committed, then its page (a poll with nothing
/// to read is held until a commit, up to its `wait_ms`); the response body.
async fn exchange(body: &[u8], state: &State) -> String {
    let request: SyncRequest = serde_json::from_slice(body).expect("a well-formed request");
    let ops = request
        .ops
        .iter()
        .map(|op| (op.collection.clone(), op.id.clone(), i64::try_from(op.stamp.lamport).unwrap(), wire(op)))
        .collect::<Vec<_>>();
    let results = if ops.is_empty() {
        Vec::new()
    } else {
        let (answer, answered) = tokio::sync::oneshot::channel();
        state.writes.send(Write { node: request.node_id.clone(), ops, answer }).unwrap();
        answered.await.unwrap()
    };
    let cursor = request.cursor.map_or(0, |c| i64::try_from(c.0).unwrap());
    let (changes, last, count, head) = match request.wait.filter(|_| results.is_empty()) {
        None => page(&state.path, cursor, &request.node_id),
        Some(wait) => {
            let _held = Held::take(&state.held);
            let mut heads = state.heads.clone();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                heads.borrow_and_update();
                let read = poll_page(state, cursor, &request.node_id);
                if read.2 > 0 {
                    break read;
                }
                let woken = tokio::time::timeout_at(deadline, heads.changed()).await;
                if !matches!(woken, Ok(Ok(()))) {
                    break read;
                }
            }
        }
    };
    let has_more = count == PAGE_LIMIT;
    let next = if has_more { last } else { head.max(cursor) };
    let mut out = String::with_capacity(changes.len() + 64 + 32 * results.len());
    write!(out, r#"{{"cursor":"{next}","changes":[{changes}],"protocol":1,"results":["#).unwrap();
    for (i, result) in results.iter().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        match result {
            Some(seq) => write!(out, r#"{comma}{{"status":"applied","seq":{seq}}}"#).unwrap(),
            None => write!(out, r#"{comma}{{"status":"superseded"}}"#).unwrap(),
        }
    }
    write!(out, r#"],"has_more":{has_more}}}"#).unwrap();
    out
}

/// A poll's page: the shared one when it was read at this cursor and holds
/// none of the poll's own changes; else read (and shared when it is).
fn poll_page(state: &State, cursor: i64, node: &str) -> PageRead {
    let shared = state.shared.lock().unwrap().clone();
    let read = match shared {
        Some((at, read)) if at == cursor && read.3 == *state.heads.borrow() => read,
        _ => {
            let read = Arc::new(page(&state.path, cursor, ""));
            *state.shared.lock().unwrap() = Some((cursor, Arc::clone(&read)));
            read
        }
    };
    if read.0.contains(&format!(r#""node_id":{},"seq""#, quote(node))) {
        page(&state.path, cursor, node)
    } else {
        PageRead::clone(&read)
    }
}

/// `s` as a JSON string.
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// An op as the change it becomes, rendered once, up to its seq.
fn wire(op: &tide_core::Op) -> String {
    let (kind, doc) = match &op.payload {
        Payload::Put(doc) => ("put", doc.as_str()),
        Payload::Delete => ("delete", "null"),
    };
    format!(
        r#"{{"collection":{},"id":{},"kind":"{kind}","doc":{doc},"lamport":{},"node_id":{},"seq":"#,
        quote(&op.collection),
        quote(&op.id),
        op.stamp.lamport,
        quote(&op.stamp.node_id)
    )
}

/// The writer thread: each group of waiting requests in one transaction.
fn writer(mut conn: rusqlite::Connection, writes: &mpsc::Receiver<Write>, heads: &tokio::sync::watch::Sender<i64>) {
    let mut head: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| r.get(0)).unwrap();
    while let Ok(first) = writes.recv() {
        let group: Vec<Write> = std::iter::once(first).chain(writes.try_iter()).collect();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        let answers: Vec<Vec<Option<i64>>> = {
            let mut upsert = tx.prepare_cached(UPSERT).unwrap();
            group
                .iter()
                .map(|w| {
                    w.ops
                        .iter()
                        .map(|(collection, id, lamport, wire)| {
                            let seq = head + 1;
                            let written =
                                upsert.execute(rusqlite::params![seq, collection, id, lamport, w.node, wire]).unwrap();
                            (written == 1).then(|| {
                                head = seq;
                                seq
                            })
                        })
                        .collect()
                })
                .collect()
        };
        tx.commit().unwrap();
        heads.send_replace(head);
        for (w, results) in group.into_iter().zip(answers) {
            let _ = w.answer.send(results);
        }
    }
}

thread_local! {
    /// The serving thread's reader connection.
    static READER: RefCell<Option<rusqlite::Connection>> = const { RefCell::new(None) };
}

/// A page after `cursor` without `node`'s own changes.
fn page(path: &Path, cursor: i64, node: &str) -> PageRead {
    READER.with_borrow_mut(|reader| {
        let conn = reader.get_or_insert_with(|| {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("PRAGMA query_only = true").unwrap();
            conn
        });
        conn.prepare_cached(PAGE)
            .unwrap()
            .query_row(rusqlite::params![cursor, node], |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    row.get::<_, Option<i64>>(1)?.unwrap_or(0),
                    row.get(2)?,
                    row.get::<_, Option<i64>>(3)?.unwrap_or(0),
                ))
            })
            .unwrap()
    })
}

/// The raw limit of a push: `n` new documents in an outbox table (SQLite,
/// `synchronous=NORMAL` as the suite's pushing client), sent to `endpoint`
/// in exchanges of [`crate::PUSH_OPS_PER_EXCHANGE`], each batch deleted
/// once answered; ops per second. The outbox is filled before the clock
/// starts.
pub(crate) async fn push_from_outbox(path: &Path, n: usize, endpoint: &str) -> f64 {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY, collection TEXT, id TEXT, lamport INTEGER, doc TEXT);",
    )
    .unwrap();
    let tx = conn.transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO outbox (collection, id, lamport, doc) VALUES ('c', ?1, ?2, ?3)",
            rusqlite::params![format!("{i:026}"), i64::try_from(i).unwrap() + 1, crate::doc(i).to_string()],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let mut server = crate::LeanClient::connect(endpoint, "bench").await;
    let (start, mut cursor, mut pushed) = (std::time::Instant::now(), String::new(), 0);
    while pushed < n {
        let mut body = format!(r#"{{"node_id":"raw-pusher","cursor":"{cursor}","ops":["#);
        let mut last = 0i64;
        conn.prepare_cached("SELECT seq, collection, id, lamport, doc FROM outbox ORDER BY seq LIMIT ?1")
            .unwrap()
            .query_map([i64::try_from(crate::PUSH_OPS_PER_EXCHANGE).unwrap()], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get::<_, i64>(3)?, row.get::<_, String>(4)?))
            })
            .unwrap()
            .enumerate()
            .for_each(|(i, row)| {
                let (seq, collection, id, lamport, doc) = row.unwrap();
                let comma = if i == 0 { "" } else { "," };
                write!(
                    body,
                    r#"{comma}{{"collection":{},"id":{},"kind":"put","doc":{doc},"lamport":{lamport},"node_id":"raw-pusher"}}"#,
                    quote(&collection),
                    quote(&id)
                )
                .unwrap();
                (last, pushed) = (seq, pushed + 1);
            });
        body.push_str("]}");
        cursor = server.exchange_body(body.into_bytes()).await.expect("the push is answered").0.0.to_string();
        conn.execute("DELETE FROM outbox WHERE seq <= ?1", [last]).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}
