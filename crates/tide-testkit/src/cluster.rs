//! A server and its clients in one process.

use std::collections::BTreeMap;
use std::sync::Arc;

use tide_client::{Error, Tide};
use tide_core::{Model, Payload, Stamp};
use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};
use tide_transport::FakeServer;

/// Every document of a replica, tombstones included: `(collection, id)` to
/// stamp and payload.
pub type Snapshot = BTreeMap<(String, String), (Stamp, Payload)>;

/// A [`FakeServer`] and clients named `c0`, `c1`, … on files in a temp dir.
pub struct Cluster {
    server: FakeServer,
    dir: tempfile::TempDir,
    clients: Vec<Tide>,
    /// Clients below this were opened under their names as node ids; the
    /// others are copies of a store file and keep the node id they found.
    originals: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("clients", &self.clients.len()).finish_non_exhaustive()
    }
}

impl Cluster {
    /// A server and `n` clients.
    ///
    /// # Errors
    /// A store that cannot be opened.
    pub async fn new(server: FakeServer, n: usize) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Encode {
            collection: String::new(),
            id: String::new(),
            message: e.to_string(),
        })?;
        let mut cluster = Self { server, dir, clients: Vec::with_capacity(n), originals: n };
        for i in 0..n {
            let tide = cluster.open(i).await?;
            cluster.clients.push(tide);
        }
        Ok(cluster)
    }

    fn name(i: usize) -> String {
        format!("c{i}")
    }

    async fn open(&self, i: usize) -> Result<Tide, Error> {
        let name = Self::name(i);
        let mut builder = Tide::builder().path(self.dir.path().join(format!("{name}.db")));
        if i < self.originals {
            builder = builder.node_id(name.clone());
        }
        builder.transport(Arc::new(self.server.connect(&name))).open().await
    }

    /// Copies client `i`'s store file (closed for the copy, as a backup or
    /// a copied profile is taken) into a new client, which it returns: both
    /// go on under one node id until one of them re-keys.
    ///
    /// # Errors
    /// The file cannot be copied or a store cannot be reopened.
    pub async fn copy(&mut self, i: usize) -> Result<usize, Error> {
        let n = self.clients.len();
        self.clients[i].close().await;
        for suffix in ["", "-wal"] {
            let from = self.dir.path().join(format!("{}.db{suffix}", Self::name(i)));
            if from.exists() {
                std::fs::copy(&from, self.dir.path().join(format!("{}.db{suffix}", Self::name(n)))).map_err(|e| {
                    Error::Encode { collection: String::new(), id: String::new(), message: e.to_string() }
                })?;
            }
        }
        self.clients[i] = self.open(i).await?;
        let copy = self.open(n).await?;
        self.clients.push(copy);
        Ok(n)
    }

    /// The server.
    pub fn server(&self) -> &FakeServer {
        &self.server
    }

    /// Client `i`.
    pub fn client(&self, i: usize) -> &Tide {
        &self.clients[i]
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether there are no clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Cuts client `i` off the server until [`Cluster::heal`].
    pub fn partition(&self, i: usize) {
        self.server.partition(&Self::name(i));
    }

    /// Reconnects client `i`.
    pub fn heal(&self, i: usize) {
        self.server.heal(&Self::name(i));
    }

    /// Closes client `i` and opens it again on its file, as after a crash
    /// or an app restart (everything committed survives).
    ///
    /// # Errors
    /// The store cannot be reopened.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.clients[i].close().await;
        self.clients[i] = self.open(i).await?;
        Ok(())
    }

    /// Heals everyone and syncs every client until a whole round moves
    /// nothing; returns the rounds it took, or `None` if it did not settle
    /// within `rounds_max` (a liveness failure).
    pub async fn settle(&self, rounds_max: usize) -> Option<usize> {
        for i in 0..self.clients.len() {
            self.heal(i);
        }
        self.server.chaos(None);
        for round in 1..=rounds_max {
            let mut moved = false;
            for tide in &self.clients {
                match tide.sync_once().await {
                    Ok(r) => {
                        moved |= r.pushed > 0 || r.applied > 0 || r.rejected > 0 || r.repaired > 0 || r.reverted > 0;
                    }
                    Err(_) => moved = true,
                }
                moved |= tide.pending_count().await.map_or(true, |n| n > 0);
            }
            if !moved {
                return Some(round);
            }
        }
        None
    }

    /// Client `i`'s documents: every key the server knows (tombstones
    /// included) and every live document in those collections.
    ///
    /// # Errors
    /// A store failure.
    pub async fn snapshot(&self, i: usize) -> Result<Snapshot, Error> {
        snapshot_of(&self.clients[i], &self.server.model()).await
    }

    /// Client `i`'s versions of exactly `keys`, tombstones included.
    ///
    /// # Errors
    /// A store failure.
    pub async fn snapshot_keys(&self, i: usize, keys: &[(String, String)]) -> Result<Snapshot, Error> {
        let mut out = Snapshot::new();
        for (collection, id) in keys {
            if let Some(v) = self.clients[i].version(collection, id).await? {
                out.insert((collection.clone(), id.clone()), (v.stamp, v.payload));
            }
        }
        Ok(out)
    }

    /// Checks that every client holds exactly the server's live documents
    /// (which are the reference model's), with the same stamps, and nothing
    /// pending; the error says who differs and how. Tombstones are not
    /// compared: they only keep older versions out, and either side may
    /// have collected one (PROTOCOL.md §12).
    pub async fn check_converged(&self) -> Result<(), String> {
        let model = self.server.model();
        let expected: Snapshot = model
            .rows()
            .filter(|(_, r)| matches!(r.payload, Payload::Put(_)))
            .map(|(k, r)| (k.clone(), (r.stamp.clone(), r.payload.clone())))
            .collect();
        for i in 0..self.clients.len() {
            let mut got = self.snapshot(i).await.map_err(|e| e.to_string())?;
            got.retain(|_, (_, payload)| matches!(payload, Payload::Put(_)));
            if got != expected {
                let diff: Vec<_> = expected
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k:?}: server {v:?}, c{i} {:?}", got.get(k)))
                    .chain(got.keys().filter(|k| !expected.contains_key(*k)).map(|k| format!("{k:?}: only on c{i}")))
                    .take(5)
                    .collect();
                return Err(format!("c{i} differs from the server: {}", diff.join("; ")));
            }
            let pending = self.clients[i].pending_count().await.map_err(|e| e.to_string())?;
            if pending > 0 {
                return Err(format!("c{i} still has {pending} pending ops"));
            }
        }
        Ok(())
    }

    /// Closes every client.
    pub async fn close(&self) {
        for tide in &self.clients {
            tide.close().await;
        }
    }
}

/// A replica's documents for every key the model knows, plus any others it
/// holds (found through the collections the model knows).
async fn snapshot_of(tide: &Tide, model: &Model) -> Result<Snapshot, Error> {
    let mut collections: Vec<String> = model.rows().map(|((c, _), _)| c.clone()).collect();
    collections.dedup();
    let mut out = Snapshot::new();
    for ((collection, id), _) in model.rows() {
        if let Some(v) = tide.version(collection, id).await? {
            out.insert((collection.clone(), id.clone()), (v.stamp, v.payload));
        }
    }
    for collection in collections {
        for (id, _) in tide.collection::<serde_json::Value>(&collection).list(None, 10_000).await? {
            let key = (collection.clone(), id.clone());
            if !out.contains_key(&key)
                && let Some(v) = tide.version(&collection, &id).await?
            {
                out.insert(key, (v.stamp, v.payload));
            }
        }
    }
    Ok(out)
}

/// A real `tide-server` on a loopback port, storing in SQLite in a temp dir.
pub struct LoopbackServer {
    endpoint: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for LoopbackServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackServer").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LoopbackServer {
    /// Starts a server without authentication in namespace `test`.
    ///
    /// # Panics
    /// If the temp dir, the database or the port cannot be had (a broken
    /// test machine).
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default()).await
    }

    /// Starts a server with `config`.
    ///
    /// # Panics
    /// As [`LoopbackServer::start`].
    pub async fn start_with(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let backend = SqliteBackend::open(&dir.path().join("server.db"), Durability::Normal, config.limits.clone())
            .await
            .expect("the server database opens");
        let server = Server::new(backend, Arc::new(NoAuth::new("test")), config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let endpoint = format!("http://{}/sync", listener.local_addr().expect("bound"));
        let task = tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
        Self { endpoint, task, _dir: dir }
    }

    /// `http://127.0.0.1:PORT/sync`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `host:port` it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint.trim_start_matches("http://").trim_end_matches("/sync").parse().expect("an address")
    }
}
