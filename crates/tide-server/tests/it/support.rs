//! Running a server in-process for tests: SQLite in a temp dir, a real
//! loopback port, and a handle to stop it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tide_core::Limits;
use tide_server::{Authenticator, Backend, Durability, NoAuth, PostgresBackend, Server, ServerConfig, SqliteBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}/sync", self.addr)
    }

    /// Signals shutdown and waits for the server to return.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// Which backend a test server stores in.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// SQLite at the default durability, `synchronous=FULL`.
    Sqlite,
    /// SQLite at `synchronous=NORMAL`.
    SqliteNormal,
    /// A URL whose connections use a fresh schema.
    Postgres(String),
}

impl Storage {
    /// PostgreSQL in a fresh schema, or `None` (said loudly) without a database.
    pub(crate) async fn postgres() -> Option<Self> {
        let url = crate::postgres::url()?;
        Some(Self::Postgres(crate::postgres::fresh_schema(&url).await))
    }
}

pub(crate) async fn start_on_with(storage: Storage, config: ServerConfig, auth: Arc<dyn Authenticator>) -> Running {
    start_with_digest_log(storage, config, auth, None).await
}

/// As [`start_on_with`], folding logged digest deltas past `digest_log_rows` if given.
pub(crate) async fn start_with_digest_log(
    storage: Storage,
    config: ServerConfig,
    auth: Arc<dyn Authenticator>,
    digest_log_rows: Option<usize>,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = match storage {
        Storage::Sqlite | Storage::SqliteNormal => {
            let durability = if matches!(storage, Storage::Sqlite) { Durability::Full } else { Durability::Normal };
            let b =
                SqliteBackend::open(&dir.path().join("server.db"), durability, config.limits.clone()).await.unwrap();
            if let Some(rows) = digest_log_rows {
                b.set_digest_log_rows_max(rows);
            }
            b
        }
        Storage::Postgres(url) => {
            let b = PostgresBackend::open(&url, tide_server::Durability::Full, config.limits.clone()).await.unwrap();
            if let Some(rows) = digest_log_rows {
                b.set_digest_log_rows_max(rows);
            }
            b
        }
    };
    let server = Server::new(backend, auth, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    Running { addr, stop: Some(stop), task: Some(task), _dir: dir }
}

/// The reference model holding exactly `changes`, each written by its own
/// node: what a server holding them should answer.
pub(crate) fn model_of(changes: &[tide_core::Change]) -> tide_core::Model {
    let mut model = tide_core::Model::new(Limits::default());
    for c in changes {
        let op = tide_core::Op {
            collection: c.collection.clone(),
            id: c.id.clone(),
            stamp: c.stamp.clone(),
            payload: c.payload.clone(),
            op_id: None,
        };
        let mut req = tide_core::SyncRequest::new(c.stamp.node_id.clone(), None);
        req.ops.push(op);
        model.exchange(&req).expect("a stored version is a valid write");
    }
    model
}

pub(crate) async fn start_on(storage: Storage) -> Running {
    start_on_with(storage, ServerConfig::default(), Arc::new(NoAuth::new("default"))).await
}

/// Runs each listed `async fn(Storage)` as a test on SQLite (at `FULL`,
/// the default, and at `NORMAL`) and on PostgreSQL: one behavioural suite,
/// two backends.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[tokio::test] async fn $test() { super::$test(crate::support::Storage::Sqlite).await } )*
        }
        mod on_sqlite_normal {
            $( #[tokio::test] async fn $test() { super::$test(crate::support::Storage::SqliteNormal).await } )*
        }
        mod on_postgres {
            $( #[tokio::test] async fn $test() {
                let Some(storage) = crate::support::Storage::postgres().await else { return };
                super::$test(storage).await
            } )*
        }
    };
}
pub(crate) use on_both_backends;

pub(crate) fn config(limits: Limits) -> ServerConfig {
    ServerConfig { limits, ..ServerConfig::default() }
}

/// Sends raw bytes on a fresh connection and reads the whole response
/// (the request should say `connection: close`). Returns status and body.
pub(crate) async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .expect("a response in time")
        .unwrap();
    parse(&out)
}

pub(crate) fn parse(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A `POST /sync` with a JSON body, closing the connection after.
pub(crate) fn post(body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST /sync HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}
