//! Convergence as a user meets it, through the real client and a real
//! `tide-server` process, on SQLite and on PostgreSQL: a server database
//! restored from a backup, a copied store file, a server limit lower than
//! the client's (PROTOCOL.md §12, §13).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tide_client::Tide;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    title: String,
}

fn note(title: &str) -> Note {
    Note { title: title.into() }
}

/// Where the server keeps its data, and how a backup of it is taken.
enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Db {
    fn args(&self) -> Vec<String> {
        match self {
            Db::Sqlite(path) => vec!["--db".into(), path.display().to_string()],
            Db::Postgres(url) => vec!["--database-url".into(), url.clone()],
        }
    }

    /// Takes a backup of the (stopped) server's data.
    async fn backup(&self) {
        match self {
            Db::Sqlite(path) => {
                for suffix in ["", "-wal"] {
                    let from = PathBuf::from(format!("{}{suffix}", path.display()));
                    if from.exists() {
                        std::fs::copy(&from, format!("{}.backup{suffix}", path.display())).unwrap();
                    }
                }
            }
            Db::Postgres(url) => {
                for table in TABLES {
                    pg(url, &format!("DROP TABLE IF EXISTS backup_{table}")).await;
                    pg(url, &format!("CREATE TABLE backup_{table} AS SELECT * FROM {table}")).await;
                }
            }
        }
    }

    /// Puts the backup back in place of the (stopped) server's data.
    async fn restore(&self) {
        match self {
            Db::Sqlite(path) => {
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                for suffix in ["", "-wal"] {
                    let from = PathBuf::from(format!("{}.backup{suffix}", path.display()));
                    if from.exists() {
                        std::fs::copy(&from, format!("{}{suffix}", path.display())).unwrap();
                    }
                }
            }
            Db::Postgres(url) => {
                for table in TABLES {
                    pg(url, &format!("TRUNCATE {table}")).await;
                    pg(url, &format!("INSERT INTO {table} SELECT * FROM backup_{table}")).await;
                }
            }
        }
    }
}

const TABLES: [&str; 5] = ["tide_namespaces", "tide_rows", "tide_digest", "tide_digest_log", "tide_nodes"];

async fn pg(url: &str, sql: &str) {
    use sqlx::{ConnectOptions, Connection};
    let mut conn: sqlx::PgConnection =
        url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().connect().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

fn sqlite(dir: &Path) -> Db {
    Db::Sqlite(dir.join("server.db"))
}

async fn postgres() -> Option<Db> {
    let url = crate::postgres::url()?;
    Some(Db::Postgres(crate::postgres::fresh_schema(&url).await))
}

/// A running `tide-server` process.
struct Running {
    child: Child,
    endpoint: String,
}

fn start(db: &Db, extra: &[&str]) -> Running {
    let mut args: Vec<String> = vec!["--no-auth".into(), "--durability".into(), "normal".into()];
    args.extend(db.args());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, endpoint) = crate::binary::spawn(&args);
    Running { child, endpoint }
}

async fn stop(mut running: Running) {
    std::process::Command::new("kill").args(["-TERM", &running.child.id().to_string()]).status().unwrap();
    tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || running.child.wait()))
        .await
        .expect("the server stops on SIGTERM")
        .unwrap()
        .unwrap();
}

async fn open(dir: &Path, name: &str, endpoint: &str) -> Tide {
    Tide::builder().path(dir.join(format!("{name}.db"))).endpoint(endpoint).long_poll(None).open().await.unwrap()
}

async fn docs(t: &Tide) -> Vec<(String, Note)> {
    t.collection::<Note>("notes").list(None, 1_000).await.unwrap()
}

/// The server's database is restored from a backup: writes it acknowledged
/// after the backup come back from the client that holds them; another
/// client that wrote past the old cursors meanwhile loses nothing either.
async fn a_restored_server_database_converges(db: Option<Db>, dir: &Path) {
    let Some(db) = db else { return };
    let server = start(&db, &[]);
    let a = open(dir, "a", &server.endpoint).await;
    let notes = a.collection::<Note>("notes");
    for i in 0..3 {
        notes.put(&format!("k{i}"), &note("before the backup")).await.unwrap();
    }
    a.sync_once().await.unwrap();
    a.close().await;
    stop(server).await;
    db.backup().await;

    let server = start(&db, &[]);
    let a = open(dir, "a", &server.endpoint).await;
    let notes = a.collection::<Note>("notes");
    for i in 3..8 {
        notes.put(&format!("k{i}"), &note("after the backup")).await.unwrap();
    }
    notes.delete("k0").await.unwrap();
    a.sync_once().await.unwrap();
    a.all_acknowledged(Duration::from_secs(10)).await.unwrap();
    a.close().await;
    stop(server).await;
    db.restore().await;

    let server = start(&db, &[]);
    let b = open(dir, "b", &server.endpoint).await;
    for i in 0..10 {
        b.collection::<Note>("notes").put(&format!("b{i}"), &note("after the restore")).await.unwrap();
    }
    b.sync_once().await.unwrap();
    let a = open(dir, "a", &server.endpoint).await;
    let report = a.sync_once().await.unwrap();
    assert!(report.repaired >= 6, "a gave back what the server lost: {report:?}");
    assert!(a.sync_once().await.unwrap().verified);
    assert!(b.sync_once().await.unwrap().verified);
    let fresh = open(dir, "fresh", &server.endpoint).await;
    fresh.sync_once().await.unwrap();
    let expected = docs(&fresh).await;
    let ids: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let mut want: Vec<String> = (0..10).map(|i| format!("b{i}")).chain((1..8).map(|i| format!("k{i}"))).collect();
    want.sort();
    assert_eq!(ids, want, "every acknowledged write is on the server, and the delete held");
    assert_eq!(docs(&a).await, expected);
    assert_eq!(docs(&b).await, expected);
    stop(server).await;
}

/// A store file copied while its app was closed: both copies write; one
/// re-keys; everyone converges with nothing refused.
async fn a_copied_store_file_converges(db: Option<Db>, dir: &Path) {
    let Some(db) = db else { return };
    let server = start(&db, &[]);
    let original = open(dir, "phone", &server.endpoint).await;
    original.collection::<Note>("notes").put("shared", &note("before the copy")).await.unwrap();
    original.sync_once().await.unwrap();
    original.close().await;
    std::fs::copy(dir.join("phone.db"), dir.join("laptop.db")).unwrap();
    let (a, b) = (open(dir, "phone", &server.endpoint).await, open(dir, "laptop", &server.endpoint).await);
    let mut rekeyed = 0;
    for round in 0..2 {
        for (t, who) in [(&a, "phone"), (&b, "laptop")] {
            let notes = t.collection::<Note>("notes");
            notes.put("shared", &note(&format!("{who} {round}"))).await.unwrap();
            notes.put(&format!("{who}{round}"), &note(who)).await.unwrap();
            rekeyed += t.sync_once().await.unwrap().rekeyed;
        }
    }
    assert!(rekeyed >= 1);
    assert_ne!(a.node_id(), b.node_id());
    let fresh = open(dir, "fresh", &server.endpoint).await;
    for _ in 0..2 {
        for t in [&a, &b, &fresh] {
            t.sync_once().await.unwrap();
        }
    }
    let expected = docs(&fresh).await;
    assert_eq!(expected.len(), 5, "{expected:?}");
    for t in [&a, &b] {
        assert_eq!(docs(t).await, expected);
        assert!(t.rejected().await.unwrap().is_empty());
    }
    stop(server).await;
}

/// The server takes smaller documents than the client: the refused writes
/// go back to the server's versions, stay inspectable, and everyone agrees.
async fn a_lower_server_limit_converges(db: Option<Db>, dir: &Path) {
    let Some(db) = db else { return };
    let server = start(&db, &["--doc-bytes-max", "64"]);
    let a = open(dir, "a", &server.endpoint).await;
    let notes = a.collection::<Note>("notes");
    notes.put("k", &note("small")).await.unwrap();
    a.sync_once().await.unwrap();
    let big = note(&"x".repeat(200));
    notes.put("k", &big).await.unwrap();
    notes.put("new", &big).await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!((report.rejected, report.reverted), (2, 2), "{report:?}");
    assert_eq!(notes.get("k").await.unwrap(), Some(note("small")));
    assert_eq!(notes.get("new").await.unwrap(), None);
    assert_eq!(a.rejected().await.unwrap().len(), 2);
    let b = open(dir, "b", &server.endpoint).await;
    b.sync_once().await.unwrap();
    assert!(a.sync_once().await.unwrap().verified);
    assert_eq!(docs(&a).await, docs(&b).await);
    stop(server).await;
}

/// A client of another principal using someone's node id is refused with
/// 403 and changes nothing; the owner goes on (PROTOCOL.md §7).
async fn another_principals_node_id_is_forbidden(db: Option<Db>, dir: &Path) {
    use tide_transport::Headers;
    let Some(db) = db else { return };
    let server = start_with_tokens(&db, "tok-alice=shared,tok-mallory=shared");
    let as_token = |name: &str, token: &str, node: &str| {
        Tide::builder()
            .path(dir.join(format!("{name}.db")))
            .endpoint(&server.endpoint)
            .headers(Headers::Static(vec![("authorization".into(), format!("Bearer {token}"))]))
            .node_id(node)
            .long_poll(None)
            .open()
    };
    let alice = as_token("alice", "tok-alice", "alice-phone").await.unwrap();
    alice.collection::<Note>("notes").put("k", &note("alice's")).await.unwrap();
    alice.sync_once().await.unwrap();
    let mallory = as_token("mallory", "tok-mallory", "alice-phone").await.unwrap();
    mallory.collection::<Note>("notes").put("k", &note("forged")).await.unwrap();
    let err = mallory.sync_once().await.unwrap_err();
    assert!(
        matches!(&err, tide_client::Error::Transport(t) if t.code() == Some(tide_core::ErrorCode::Forbidden)),
        "{err}"
    );
    let fresh = as_token("fresh", "tok-mallory", "mallory-laptop").await.unwrap();
    fresh.sync_once().await.unwrap();
    assert_eq!(docs(&fresh).await, vec![("k".to_owned(), note("alice's"))], "the forged write never landed");
    assert!(alice.sync_once().await.unwrap().verified);
    stop(server).await;
}

/// Runs `tide-server --collect` on the database (beside the running
/// server); returns how many tombstones it says it removed.
fn collect_now(db: &Db, horizon_seqs: u64) -> u64 {
    let horizon = horizon_seqs.to_string();
    let mut args = vec!["--collect".to_owned(), "--tombstone-horizon-seqs".to_owned(), horizon];
    args.extend(db.args());
    let out = std::process::Command::new(crate::binary::BIN).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let removed = text.strip_prefix("tide-server: removed ").and_then(|t| t.split(' ').next());
    removed.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("unexpected output {text:?}"))
}

/// A client offline while documents it holds are deleted and their
/// tombstones collected (PROTOCOL.md §14): it comes back, starts again from
/// the beginning, and none of them comes back to life, neither the ones it
/// merely held nor the one it edited offline; its other offline writes land.
async fn a_client_away_past_the_horizon_brings_no_deleted_document_back(db: Option<Db>, dir: &Path) {
    let Some(db) = db else { return };
    let server = start(&db, &["--tombstone-horizon-seqs", "5", "--collect-interval", "3600"]);
    let a = open(dir, "a", &server.endpoint).await;
    let notes = a.collection::<Note>("notes");
    for i in 0..6 {
        notes.put(&format!("k{i}"), &note("shared")).await.unwrap();
    }
    a.sync_once().await.unwrap();
    let b = open(dir, "b", &server.endpoint).await;
    b.sync_once().await.unwrap();
    assert_eq!(docs(&b).await.len(), 6);
    // b goes offline with an edit of k1 and a new document.
    b.close().await;
    let b = Tide::builder().path(dir.join("b.db")).long_poll(None).open().await.unwrap();
    b.collection::<Note>("notes").put("k1", &note("edited offline")).await.unwrap();
    b.collection::<Note>("notes").put("b-new", &note("written offline")).await.unwrap();
    b.close().await;

    // Meanwhile k0..k2 are deleted, and enough is written after that the
    // horizon passes the deletes; the collector removes their tombstones.
    for i in 0..3 {
        notes.delete(&format!("k{i}")).await.unwrap();
    }
    for i in 0..8 {
        notes.put(&format!("later{i}"), &note("after")).await.unwrap();
    }
    a.sync_once().await.unwrap();
    assert_eq!(collect_now(&db, 5), 3, "the three tombstones went");

    let b = open(dir, "b", &server.endpoint).await;
    let first = b.sync_once().await.unwrap();
    assert!(first.resynced, "b was away past the horizon: {first:?}");
    let settled = b.sync_once().await.unwrap();
    assert!(settled.verified, "b proves itself equal to the server: {settled:?}");
    let fresh = open(dir, "fresh", &server.endpoint).await;
    fresh.sync_once().await.unwrap();
    let expected = docs(&fresh).await;
    let ids: Vec<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let mut want: Vec<String> =
        (3..6).map(|i| format!("k{i}")).chain((0..8).map(|i| format!("later{i}"))).chain(["b-new".into()]).collect();
    want.sort();
    assert_eq!(ids, want, "no deleted document came back; b's new one landed");
    assert_eq!(docs(&b).await, expected);
    assert_eq!(b.pending_count().await.unwrap(), 0);
    assert!(a.sync_once().await.unwrap().verified);
    assert_eq!(docs(&a).await, expected);
    stop(server).await;
}

/// The server collects on its own every interval, and says so in
/// `/metrics`.
async fn the_server_collects_in_the_background_and_counts_it(db: Option<Db>, dir: &Path) {
    let Some(db) = db else { return };
    let server = start(&db, &["--tombstone-horizon-seqs", "2", "--collect-interval", "0.05"]);
    let a = open(dir, "a", &server.endpoint).await;
    let notes = a.collection::<Note>("notes");
    for i in 0..4 {
        notes.put(&format!("k{i}"), &note("x")).await.unwrap();
        notes.delete(&format!("k{i}")).await.unwrap();
        a.sync_once().await.unwrap();
    }
    notes.put("last", &note("x")).await.unwrap();
    notes.put("last2", &note("x")).await.unwrap();
    a.sync_once().await.unwrap();
    let addr: std::net::SocketAddr =
        server.endpoint.trim_start_matches("http://").trim_end_matches("/sync").parse().unwrap();
    let get = b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let collected = loop {
        let (_, text) = crate::support::raw(addr, get).await;
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tide_tombstones_collected_total "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n >= 4 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(collected, 4, "every tombstone more than 2 changes behind went");
    let fresh = open(dir, "fresh", &server.endpoint).await;
    fresh.sync_once().await.unwrap();
    assert_eq!(docs(&fresh).await.len(), 2);
    stop(server).await;
}

fn start_with_tokens(db: &Db, tokens: &str) -> Running {
    let mut args: Vec<String> = vec!["--tokens".into(), tokens.into()];
    args.extend(db.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, endpoint) = crate::binary::spawn(&args);
    Running { child, endpoint }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(Some(super::sqlite(dir.path())), dir.path()).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(super::postgres().await, dir.path()).await;
            })*
        }
    };
}

on_both!(
    a_restored_server_database_converges,
    a_copied_store_file_converges,
    a_lower_server_limit_converges,
    another_principals_node_id_is_forbidden,
    a_client_away_past_the_horizon_brings_no_deleted_document_back,
    the_server_collects_in_the_background_and_counts_it,
);
