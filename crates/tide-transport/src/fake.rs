//! The in-memory fake: a sync server on `tide_core::Model` that any number
//! of clients in one process share, with scripted or seeded faults and a
//! record of everything that crossed it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tide_core::{Limits, Model, SplitMix64, SyncRequest, SyncResponse};

use crate::{Error, Transport};

/// A fault applied to one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The request is lost on the way: the server sees nothing, the client
    /// gets a network error.
    Drop,
    /// The server commits the request, then the response is lost: the
    /// client gets a network error (an ambiguous commit).
    LoseResponse,
    /// The request arrives twice; the client gets the second response.
    Duplicate,
    /// The exchange waits this long before going ahead normally.
    Delay(Duration),
    /// The server answers this status without touching its state, with a
    /// `Retry-After` if given (for 429 and 503).
    Status {
        /// The HTTP status.
        status: u16,
        /// The `Retry-After` the server sends.
        retry_after: Option<Duration>,
    },
    /// The server commits the request, then the response arrives garbled.
    Garbage,
}

/// Percent chances of each fault for seeded chaos; the rest go through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultRates {
    /// Chance of [`Fault::Drop`].
    pub drop: u8,
    /// Chance of [`Fault::LoseResponse`].
    pub lose_response: u8,
    /// Chance of [`Fault::Duplicate`].
    pub duplicate: u8,
    /// Chance of a 503 with `Retry-After: 1`.
    pub unavailable: u8,
    /// Chance of a 429 with `Retry-After: 1`.
    pub rate_limited: u8,
    /// Chance of [`Fault::Garbage`].
    pub garbage: u8,
}

/// What became of one exchange.
#[derive(Debug, Clone, PartialEq)]
#[expect(clippy::large_enum_variant, reason = "a log entry of a test server, read by matching; most are responses")]
pub enum Outcome {
    /// The client got this response.
    Response(SyncResponse),
    /// The client got an error with this text.
    Failed(String),
}

/// One exchange as it crossed the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The client's name (from [`FakeServer::connect`]).
    pub client: String,
    /// The request as the server decoded it.
    pub request: SyncRequest,
    /// The fault applied, if any (a partition counts as [`Fault::Drop`]).
    pub fault: Option<Fault>,
    /// Whether the server applied the request to its state.
    pub committed: bool,
    /// What the client got.
    pub outcome: Outcome,
}

#[derive(Default)]
struct Client {
    script: VecDeque<Fault>,
    partitioned: bool,
}

struct State {
    model: Model,
    clients: HashMap<String, Client>,
    traffic: Vec<Exchange>,
    chaos: Option<(SplitMix64, FaultRates)>,
}

/// An in-memory sync server. Cheap to clone; clones share one server.
///
/// It holds long-polls like a real server: a request with `wait` and no
/// ops whose page is empty waits for the next commit (or the wait).
#[derive(Clone)]
pub struct FakeServer {
    state: Arc<Mutex<State>>,
    commits: Arc<tokio::sync::watch::Sender<u64>>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Default for FakeServer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer").finish_non_exhaustive()
    }
}

impl FakeServer {
    /// A server with the default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A server enforcing `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        let state = State { model: Model::new(limits), clients: HashMap::new(), traffic: Vec::new(), chaos: None };
        Self {
            state: Arc::new(Mutex::new(state)),
            commits: Arc::new(tokio::sync::watch::channel(0).0),
            held: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind;
        // the fake keeps serving it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A transport for the client called `name` (names label traffic and
    /// target faults; any number of clients may connect).
    pub fn connect(&self, name: &str) -> FakeTransport {
        self.lock().clients.entry(name.to_owned()).or_default();
        FakeTransport { server: self.clone(), name: name.to_owned() }
    }

    /// A copy of the server's state.
    pub fn model(&self) -> Model {
        self.lock().model.clone()
    }

    /// Replaces the server's state with `model`, as when a server's database
    /// is restored from a backup: every seq and version after it is gone.
    pub fn restore(&self, model: Model) {
        self.lock().model = model;
    }

    /// Collects the tombstones more than `horizon_seqs` changes behind the
    /// head (PROTOCOL.md §14), as a real server's collector does; returns
    /// how many went.
    pub fn collect(&self, horizon_seqs: u64) -> usize {
        let mut state = self.lock();
        let upto = state.model.seq().saturating_sub(horizon_seqs);
        state.model.collect(upto)
    }

    /// The writes the server answered `deleted` in a response that reached
    /// its client (PROTOCOL.md §14), by key and stamp.
    pub fn deleted_writes(&self) -> std::collections::BTreeSet<((String, String), tide_core::Stamp)> {
        let state = self.lock();
        let mut out = std::collections::BTreeSet::new();
        for e in &state.traffic {
            let Outcome::Response(resp) = &e.outcome else { continue };
            for (op, result) in e.request.ops.iter().zip(&resp.results) {
                if *result == tide_core::OpResult::Deleted {
                    out.insert(((op.collection.clone(), op.id.clone()), op.stamp.clone()));
                }
            }
        }
        out
    }

    /// How many long-polls the server is holding now.
    pub fn held_polls(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every exchange so far, in order.
    pub fn traffic(&self) -> Vec<Exchange> {
        self.lock().traffic.clone()
    }

    /// Forgets the recorded traffic.
    pub fn clear_traffic(&self) {
        self.lock().traffic.clear();
    }

    /// Applies `faults` to the client's next exchanges, one each, in order.
    pub fn script(&self, client: &str, faults: impl IntoIterator<Item = Fault>) {
        self.lock().clients.entry(client.to_owned()).or_default().script.extend(faults);
    }

    /// Fails the client's next `n` exchanges with a network error.
    pub fn fail_next(&self, client: &str, n: usize) {
        self.script(client, std::iter::repeat_n(Fault::Drop, n));
    }

    /// Cuts the client off: every exchange fails until [`FakeServer::heal`].
    pub fn partition(&self, client: &str) {
        self.lock().clients.entry(client.to_owned()).or_default().partitioned = true;
    }

    /// Reconnects a partitioned client.
    pub fn heal(&self, client: &str) {
        self.lock().clients.entry(client.to_owned()).or_default().partitioned = false;
    }

    /// Draws a fault for every unscripted exchange from a generator seeded
    /// with `seed`, at `rates`; the same seed and the same exchanges give the
    /// same faults. `None` turns chaos off.
    pub fn chaos(&self, seed_and_rates: Option<(u64, FaultRates)>) {
        self.lock().chaos = seed_and_rates.map(|(seed, rates)| (SplitMix64::new(seed), rates));
    }

    fn fault_for(&self, client: &str) -> Option<Fault> {
        let mut state = self.lock();
        let entry = state.clients.entry(client.to_owned()).or_default();
        if entry.partitioned {
            return Some(Fault::Drop);
        }
        if let Some(fault) = entry.script.pop_front() {
            return Some(fault);
        }
        let (generator, rates) = state.chaos.as_mut()?;
        let roll = generator.below(100);
        let table = [
            (rates.drop, Fault::Drop),
            (rates.lose_response, Fault::LoseResponse),
            (rates.duplicate, Fault::Duplicate),
            (rates.unavailable, Fault::Status { status: 503, retry_after: Some(Duration::from_secs(1)) }),
            (rates.rate_limited, Fault::Status { status: 429, retry_after: Some(Duration::from_secs(1)) }),
            (rates.garbage, Fault::Garbage),
        ];
        let mut edge = 0;
        for (rate, fault) in table {
            edge += u64::from(rate);
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }
}

/// One client's connection to a [`FakeServer`].
#[derive(Clone, Debug)]
pub struct FakeTransport {
    server: FakeServer,
    name: String,
}

impl FakeTransport {
    /// The server this transport talks to.
    pub fn server(&self) -> &FakeServer {
        &self.server
    }
}

#[async_trait::async_trait]
impl Transport for FakeTransport {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error> {
        // Through JSON both ways, as over a wire, so encoding bugs show here too.
        let request =
            SyncRequest::from_json(&serde_json::to_vec(request).expect("requests serialize")).map_err(|v| {
                Error::Status {
                    status: v.status(),
                    code: Some(v.code),
                    message: v.to_body().error,
                    op: v.op,
                    retry_after: None,
                }
            })?;
        let fault = self.server.fault_for(&self.name);
        if let Some(Fault::Delay(d)) = fault {
            tokio::time::sleep(d).await;
        }
        let mut commits = self.server.commits.subscribe();
        if fault.is_none() && request.ops.is_empty() && request.wait.is_some_and(|w| !w.is_zero()) {
            // A long-poll: hold it while there is nothing to send.
            let wait = {
                let state = self.server.lock();
                let limits = state.model.limits();
                let from = request.cursor.unwrap_or_default();
                let empty = from.seq() <= state.model.seq()
                    && state
                        .model
                        .page_of(
                            from,
                            Some(&request.node_id).filter(|_| from.seq() > 0).map(String::as_str),
                            (request.live_below, request.collections.as_deref()),
                            1,
                        )
                        .changes
                        .is_empty();
                empty.then(|| request.wait.unwrap_or_default().min(limits.wait_max))
            };
            if let Some(wait) = wait {
                struct Holding<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for Holding<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                self.server.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _holding = Holding(&self.server.held);
                tokio::select! {
                    _ = commits.changed() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
        let mut state = self.server.lock();
        let (committed, result) = match &fault {
            Some(Fault::Drop) => (false, Err(Error::Network { message: "request lost (fake)".into(), source: None })),
            Some(Fault::Status { status, retry_after }) => {
                let body = format!(r#"{{"error":"injected {status} (fake)"}}"#);
                (false, Err(Error::from_status(*status, body.as_bytes(), *retry_after)))
            }
            Some(Fault::LoseResponse) => {
                let applied = state.model.exchange(&request).is_ok();
                (applied, Err(Error::Network { message: "response lost after commit (fake)".into(), source: None }))
            }
            Some(Fault::Garbage) => {
                let applied = state.model.exchange(&request).is_ok();
                (applied, Err(Error::MalformedResponse { message: "garbled body (fake)".into() }))
            }
            Some(Fault::Duplicate) => {
                let _ = state.model.exchange(&request);
                serve(&mut state.model, &request)
            }
            Some(Fault::Delay(_)) | None => serve(&mut state.model, &request),
        };
        let outcome = match &result {
            Ok(resp) => Outcome::Response(resp.clone()),
            Err(e) => Outcome::Failed(e.to_string()),
        };
        if committed && !request.ops.is_empty() {
            self.server.commits.send_modify(|v| *v += 1);
        }
        state.traffic.push(Exchange { client: self.name.clone(), request, fault, committed, outcome });
        result
    }
}

fn serve(model: &mut Model, request: &SyncRequest) -> (bool, Result<SyncResponse, Error>) {
    match model.exchange(request) {
        Ok(resp) => {
            let text = serde_json::to_vec(&resp).expect("responses serialize");
            let resp = serde_json::from_slice(&text).expect("a response decodes");
            (true, Ok(resp))
        }
        Err(v) => {
            let body = serde_json::to_vec(&v.to_body()).expect("bodies serialize");
            (false, Err(Error::from_status(v.status(), &body, None)))
        }
    }
}
