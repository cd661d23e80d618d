//! The HTTP side: routing, the `/sync` handler's checks in order, and the
//! accept loop with its bounds and graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tide_core::{ErrorBody, ErrorCode, Limits, SyncRequest, Violation};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::auth::{AuthError, Authenticator, Principal};
use crate::backend::{Backend, BackendError, Collected, Reply};
use crate::hub::{HELD_PER_NAMESPACE_MAX_DEFAULT, HELD_REQUESTS_MAX_DEFAULT, Hub};
use crate::metrics::Metrics;

/// Default for [`ServerConfig::header_read_timeout`]: a client that has not
/// sent its headers by then is cut off (and an idle keep-alive connection closed).
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default for [`ServerConfig::body_read_timeout`].
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default for [`ServerConfig::connections_max`].
pub const CONNECTIONS_MAX_DEFAULT: usize = 1_024;
/// Default for [`ServerConfig::shutdown_grace`]: how long in-flight
/// exchanges may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE_DEFAULT: Duration = Duration::from_secs(30);
/// Default for [`ServerConfig::request_bytes_in_flight_max`]: 256 MiB of
/// request bodies held at once across all connections.
pub const REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT: usize = 256 << 20;
/// Default for [`ServerConfig::principal_requests_per_second_max`]: 1,000
/// requests a second per principal, in bursts of as many.
pub const PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT: u32 = 1_000;
/// Request bodies at least this large, and every gzip body, are inflated
/// and decoded on a blocking thread, not on the runtime's workers.
pub const DECODE_INLINE_BYTES_MAX: usize = 64 * 1024;
/// Most principals whose request rate is tracked at once; past it the
/// buckets of principals that were idle for a second are dropped.
const RATE_BUCKETS_MAX: usize = 10_000;
/// The largest `Authorization` header read.
pub const AUTHORIZATION_BYTES_MAX: usize = 4_096;
/// Responses at least this large are gzip-compressed for clients that accept it.
const GZIP_RESPONSE_BYTES_MIN: usize = 1_024;
/// Default for [`ServerConfig::tombstone_horizon_seqs`]: a tombstone is
/// kept until a million changes have been written after it in its
/// namespace; a client that was away longer starts again from the
/// beginning (PROTOCOL.md §14).
pub const TOMBSTONE_HORIZON_SEQS_DEFAULT: u64 = 1_000_000;
/// Default for [`ServerConfig::collect_interval`].
pub const COLLECT_INTERVAL_DEFAULT: Duration = Duration::from_mins(1);

/// hyper's read buffer: bounds the size of the request head.
const READ_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// How a [`Server`] runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The protocol limits (body size, ops, documents, pages, counters).
    pub limits: Limits,
    /// The sync endpoint's path (default `/sync`).
    pub path: String,
    /// See [`HEADER_READ_TIMEOUT_DEFAULT`].
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive (408 after).
    pub body_read_timeout: Duration,
    /// Most connections open at once; further clients wait to be accepted.
    pub connections_max: usize,
    /// See [`SHUTDOWN_GRACE_DEFAULT`].
    pub shutdown_grace: Duration,
    /// Most long-polls held at once; past it a waiting request is answered
    /// at once (default 10,000).
    pub held_requests_max: usize,
    /// Most long-polls held at once in one namespace (default 1,000).
    pub held_per_namespace_max: usize,
    /// Most bytes of request bodies held at once across all connections
    /// (declared lengths, or the body limit for a body without one, plus
    /// what gzip bodies inflate to); past it a request is answered 503 with
    /// `Retry-After` before its body is read. See
    /// [`REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT`].
    pub request_bytes_in_flight_max: usize,
    /// Most requests a second from one principal (a token bucket holding a
    /// second's worth); past it 429 with `Retry-After`. 0: no limit. See
    /// [`PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT`].
    pub principal_requests_per_second_max: u32,
    /// Tombstones more than this many changes behind their namespace's
    /// head are collected; 0 keeps every tombstone. See
    /// [`TOMBSTONE_HORIZON_SEQS_DEFAULT`].
    pub tombstone_horizon_seqs: u64,
    /// How often the server collects tombstones in the background. See
    /// [`COLLECT_INTERVAL_DEFAULT`].
    pub collect_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            path: "/sync".into(),
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
            body_read_timeout: BODY_READ_TIMEOUT_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            shutdown_grace: SHUTDOWN_GRACE_DEFAULT,
            held_requests_max: HELD_REQUESTS_MAX_DEFAULT,
            held_per_namespace_max: HELD_PER_NAMESPACE_MAX_DEFAULT,
            request_bytes_in_flight_max: REQUEST_BYTES_IN_FLIGHT_MAX_DEFAULT,
            principal_requests_per_second_max: PRINCIPAL_REQUESTS_PER_SECOND_MAX_DEFAULT,
            tombstone_horizon_seqs: TOMBSTONE_HORIZON_SEQS_DEFAULT,
            collect_interval: COLLECT_INTERVAL_DEFAULT,
        }
    }
}

/// Runs [`App::collect`] every [`ServerConfig::collect_interval`] for as
/// long as the server lives.
async fn collect_now_and_then(app: std::sync::Weak<App>) {
    let Some(interval) = app.upgrade().map(|a| a.config.collect_interval) else { return };
    let interval = interval.max(Duration::from_millis(1));
    // An interval past any instant: never.
    let Some(first) = tokio::time::Instant::now().checked_add(interval) else { return };
    let mut ticks = tokio::time::interval_at(first, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(app) = app.upgrade() else { return };
        if *app.stopping.borrow() {
            return;
        }
        match app.collect().await {
            Ok(done) if done.tombstones > 0 => {
                tracing::info!(
                    tombstones = done.tombstones,
                    bytes = done.bytes,
                    "collected tombstones past the horizon"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "tombstone collection failed; retrying at the next interval"),
        }
    }
}

impl App {
    /// Steps of tombstone collection until none is left, each counted.
    async fn collect(&self) -> Result<Collected, BackendError> {
        let mut done = Collected::default();
        if self.config.tombstone_horizon_seqs == 0 {
            return Ok(done);
        }
        loop {
            let step = self.backend.collect(self.config.tombstone_horizon_seqs).await?;
            self.metrics.collected(step);
            done += step;
            if !step.more {
                return Ok(done);
            }
            // Writes go on between steps.
            tokio::task::yield_now().await;
        }
    }
}

struct App {
    backend: Arc<dyn Backend>,
    auth: Arc<dyn Authenticator>,
    config: ServerConfig,
    metrics: Metrics,
    hub: Arc<Hub>,
    /// Set when shutdown begins: held long-polls answer at once.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Pages being read for long-polls woken by the same commit.
    wakes: SharedReads,
    /// Bytes of request bodies in flight, one permit a byte.
    body_bytes: Arc<Semaphore>,
    /// Each principal's request bucket.
    rates: Rates,
}

/// Per-principal token buckets: each holds up to a second's worth of
/// requests and refills continuously.
struct Rates {
    per_second: u32,
    buckets: std::sync::Mutex<HashMap<String, (f64, Instant)>>,
}

impl Rates {
    /// Takes one request from `principal`'s bucket, or says how long until
    /// one is there.
    fn take(&self, principal: &str) -> Result<(), Duration> {
        if self.per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_second);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= RATE_BUCKETS_MAX && !buckets.contains_key(principal) {
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
        }
        let (tokens, at) = buckets.entry(principal.to_owned()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// Long-polls woken by one commit at the same cursor want the same page,
/// and so do the polls that follow them: it is read once and shared
/// (PROTOCOL.md's own-change rule permitting), so a write to a namespace
/// with a thousand held polls costs a read or two, not two thousand. A
/// page is only shared among polls that took their place (or woke) after
/// the same commit (counted over all namespaces, and before any later
/// one), so none gets a page older than its hold: a commit it could miss
/// is notified after its hold, and wakes it.
#[derive(Default)]
struct SharedReads(std::sync::Mutex<HashMap<PageKey, (u64, SharedPage)>>);

/// Which page a poll wants: namespace, principal (whose access rules
/// shape the page), subscription, cursor, most changes, the head it last
/// began from the start at (`from_head`, for the resync rule), and whether
/// it asks for the roots.
type PageKey = (String, String, Option<Vec<String>>, u64, u32, Option<u64>, bool);

/// A page read once for every poll that wants it.
type SharedPage = Arc<tokio::sync::OnceCell<Option<Reply>>>;

/// Most pages kept for sharing; past this many they are all forgotten
/// (the next polls read anew).
const SHARED_PAGES_MAX: usize = 4_096;

impl SharedReads {
    /// The page for `request`, for a poll that holds its place since the
    /// commit counted `version` (or was woken by it): read once by the
    /// first poll to ask after that commit and shared with every later one
    /// until the next; `None` when this poll must read its own (it asked
    /// for more than a page, or the page holds its own writes).
    async fn page(
        &self,
        backend: &Arc<dyn Backend>,
        principal: &Principal,
        request: &SyncRequest,
        version: u64,
        limits: &tide_core::Limits,
    ) -> Option<Reply> {
        let roots = match &request.verify {
            None => false,
            Some(tide_core::Verify::Roots) => true,
            Some(_) => return None,
        };
        if !request.fetch.is_empty()
            || request.repair
            || request.live_below.is_some()
            || request.cursor.is_none_or(|c| c == tide_core::Cursor::START)
        {
            return None;
        }
        let cursor = request.cursor.unwrap_or_default();
        // Polls asking for no limit, or for one at or above the server's,
        // want the same page (tide's client asks for 1,000 changes, the
        // original for no limit): at most the server's limit, which never
        // gives a poll more than it asked for.
        let most = u32::try_from(limits.changes_per_response_max).unwrap_or(u32::MAX);
        let most = request.limit.map_or(most, |l| l.min(most));
        let key = (
            principal.namespace.as_str().to_owned(),
            principal.id.clone(),
            request.collections.clone(),
            cursor.seq(),
            most,
            request.from_head,
            roots,
        );
        let cell = {
            let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() >= SHARED_PAGES_MAX {
                map.clear();
            }
            match map.get(&key) {
                Some((read_after, cell)) if *read_after == version => Arc::clone(cell),
                // Read after a later commit than this poll has seen: it reads its own.
                Some((read_after, _)) if *read_after > version => return None,
                _ => {
                    let cell = SharedPage::default();
                    map.insert(key, (version, Arc::clone(&cell)));
                    cell
                }
            }
        };
        let shared = cell
            .get_or_init(|| async {
                // No node's changes are skipped: each poll checks its own below.
                let mut pull = SyncRequest::new(SHARED_READER, Some(cursor));
                pull.limit = Some(most);
                pull.from_head = request.from_head;
                pull.verify = request.verify.clone();
                pull.collections = request.collections.clone();
                backend.exchange(principal, Arc::new(pull)).await.ok()
            })
            .await
            .clone()?;
        let own = format!(r#""node_id":{}"#, serde_json::to_string(&request.node_id).expect("strings serialize"));
        if shared.changes_json.contains(&own) {
            return None;
        }
        Some(Reply { request_id: request.request_id.clone(), ..shared })
    }
}

/// The response header naming an exchange (its `request_id`, or one the
/// server made), as its log lines do.
const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The node id of a shared read: empty, which no client's is, so no
/// change is skipped as its own.
const SHARED_READER: &str = "";

/// The sync server: a service to embed in any hyper (or axum) app with
/// [`Server::handle`], or to run on a listener with [`Server::serve`].
/// Cheap to clone.
#[derive(Clone)]
pub struct Server {
    app: Arc<App>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("config", &self.app.config).finish_non_exhaustive()
    }
}

type Response = http::Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: u16, body: &ErrorBody) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, serde_json::to_vec(body).expect("error bodies serialize"))
}

fn refuse(v: &Violation) -> Response {
    error(v.status(), &v.to_body())
}

fn plain(code: ErrorCode, message: impl Into<String>) -> Response {
    error(code.status(), &ErrorBody { error: message.into(), code: Some(code), op: None })
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    if value.len() > AUTHORIZATION_BYTES_MAX {
        return Err(AuthError::Invalid);
    }
    let value = value.to_str().map_err(|_| AuthError::Invalid)?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(AuthError::Invalid),
    }
}

/// Whether the client takes a gzipped response: `gzip` listed in
/// `Accept-Encoding` without `q=0`, or `*` without `q=0` and gzip not
/// refused by name (RFC 9110 §12.5.3).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for value in headers.get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()) {
        for entry in value.split(',') {
            let mut parts = entry.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                let q = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="));
                q.is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            if coding.eq_ignore_ascii_case("gzip") {
                gzip = Some(!refused);
            } else if coding == "*" {
                any = Some(!refused);
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

impl Server {
    /// A server over `backend`, authenticating with `auth`. Called within a
    /// tokio runtime, it also starts listening for commits made by other
    /// processes on the same storage (PostgreSQL), to wake long-polls.
    pub fn new(backend: Arc<dyn Backend>, auth: Arc<dyn Authenticator>, config: ServerConfig) -> Self {
        let hub = Arc::new(Hub::new(config.held_requests_max, config.held_per_namespace_max));
        let stopping = tokio::sync::watch::channel(false).0;
        let wakes = SharedReads::default();
        let body_bytes = Arc::new(Semaphore::new(config.request_bytes_in_flight_max.min(Semaphore::MAX_PERMITS)));
        let rates =
            Rates { per_second: config.principal_requests_per_second_max, buckets: std::sync::Mutex::default() };
        let app = Arc::new(App {
            backend,
            auth,
            config,
            metrics: Metrics::default(),
            hub,
            stopping,
            wakes,
            body_bytes,
            rates,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&app.hub);
            let on_commit: crate::backend::CommitCallback = Arc::new(move |namespace: &str| {
                let Some(hub) = weak.upgrade() else { return false };
                if namespace.is_empty() {
                    hub.notify_all();
                } else {
                    hub.notify(namespace);
                }
                true
            });
            let backend = Arc::clone(&app.backend);
            tokio::spawn(async move {
                if let Err(e) = backend.listen(on_commit).await {
                    tracing::warn!(error = %e, "not listening for other servers' commits; long-polls wake on this server's only");
                }
            });
            if app.config.tombstone_horizon_seqs > 0 {
                tokio::spawn(collect_now_and_then(Arc::downgrade(&app)));
            }
        }
        Self { app }
    }

    /// Collects tombstones past the horizon in every namespace now, a step
    /// at a time, until none is left (PROTOCOL.md §14); the background task
    /// does the same every [`ServerConfig::collect_interval`]. With
    /// `tombstone_horizon_seqs` 0 it does nothing.
    ///
    /// # Errors
    /// The backend's, from the step that failed (earlier steps stay done).
    pub async fn collect(&self) -> Result<Collected, crate::BackendError> {
        self.app.collect().await
    }

    /// Runs one exchange in a task of its own, abandoned if its client
    /// hangs up first: a write that reached its write group is applied
    /// whole all the same (the group is the writer's, not this task's), and
    /// held polls hear of it from the backend; what is left (queueing the
    /// write, reading the page) is not done for nobody.
    async fn run_exchange(
        &self,
        principal: &crate::auth::Principal,
        request: &Arc<SyncRequest>,
        span: &tracing::Span,
    ) -> Result<Reply, BackendError> {
        let backend = Arc::clone(&self.app.backend);
        let (principal, request) = (principal.clone(), Arc::clone(request));
        let task = async move { backend.exchange(&principal, request).await };
        let mut task = Abandoned { task: tokio::spawn(task.instrument(span.clone())), metrics: &self.app.metrics };
        let result = (&mut task.task).await;
        result.unwrap_or_else(|e| Err(BackendError::Internal(format!("exchange task failed: {e}"))))
    }

    /// Answers one request: `POST` to the sync path, `GET /healthz`,
    /// `GET /readyz` (checks the database) and `GET /metrics`.
    ///
    /// Mounted in an application that authenticates requests itself, put
    /// the [`Principal`] in the request's extensions: the server takes it
    /// as given and does not look at the bearer token (see the `axum`
    /// example).
    pub async fn handle<B>(&self, req: http::Request<B>) -> Response
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let start = Instant::now();
        let app = &self.app;
        let path = req.uri().path();
        let (route, resp) = if path == app.config.path {
            if req.method() == Method::POST {
                ("sync", self.sync(req).await)
            } else {
                let mut resp = plain(ErrorCode::MethodNotAllowed, format!("{} is not allowed; use POST", req.method()));
                resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("POST"));
                ("sync", resp)
            }
        } else if req.method() == Method::GET && path == "/healthz" {
            let body = format!(
                r#"{{"status":"ok","version":"{}","protocol":{}}}"#,
                env!("CARGO_PKG_VERSION"),
                tide_core::PROTOCOL_VERSION
            );
            ("healthz", json_response(StatusCode::OK, body.into_bytes()))
        } else if req.method() == Method::GET && path == "/readyz" {
            let resp = match app.backend.ready().await {
                Ok(()) => json_response(StatusCode::OK, br#"{"status":"ready"}"#.to_vec()),
                Err(e) => plain(ErrorCode::Unavailable, format!("not ready: {e}")),
            };
            ("readyz", resp)
        } else if req.method() == Method::GET && path == "/metrics" {
            let mut resp = http::Response::new(Full::new(Bytes::from(app.metrics.render(app.hub.held()))));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            ("metrics", resp)
        } else {
            ("other", plain(ErrorCode::NotFound, format!("no route for {path}")))
        };
        app.metrics.request(route, resp.status().as_u16(), start.elapsed());
        let mut resp = resp;
        if route == "sync" && !resp.headers().contains_key(REQUEST_ID) {
            // Refused before its body was read: an id all the same.
            let id = HeaderValue::from_str(&ulid::Ulid::generate().to_string()).expect("a ULID is a header value");
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        resp
    }

    /// Steps 2 to 4 of an exchange: within the principal's rate, and a
    /// declared length within the limit and within the server's room for
    /// bodies (else refused unread); the body, bounded in size and time; its
    /// shape, then every limit. Large and gzip bodies are decoded off the
    /// runtime's workers. Returns the request, whether the reply may be
    /// gzipped, and the room its body takes until the exchange ends.
    async fn receive<B>(
        &self,
        principal: &Principal,
        req: http::Request<B>,
    ) -> Result<(SyncRequest, bool, tokio::sync::OwnedSemaphorePermit), Box<Response>>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let app = &self.app;
        let limits = &app.config.limits;
        if let Err(wait) = app.rates.take(&principal.id) {
            return Err(Box::new(with_retry_after(
                plain(ErrorCode::RateLimited, "too many requests; retry later"),
                wait,
            )));
        }
        let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.request_bytes_max as u64) {
            return Err(Box::new(too_large(limits.request_bytes_max)));
        }
        let reserved = declared.map_or(limits.request_bytes_max, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let mut room = take_room(&app.body_bytes, reserved).ok_or_else(|| Box::new(server_full()))?;
        let gzipped = match req.headers().get(CONTENT_ENCODING).map(HeaderValue::as_bytes) {
            None | Some(b"identity") => false,
            Some(b"gzip") => true,
            Some(other) => {
                let v = Violation::new(
                    ErrorCode::InvalidRequest,
                    format!("content-encoding {:?} is not supported; use gzip", String::from_utf8_lossy(other)),
                );
                return Err(Box::new(refuse(&v)));
            }
        };
        let gzip_reply = accepts_gzip(req.headers());
        let body = read_body(req.into_body(), limits.request_bytes_max, app.config.body_read_timeout).await?;
        let (request, inflated) = if gzipped || body.len() >= DECODE_INLINE_BYTES_MAX {
            let (bytes, limit) = (Arc::clone(&app.body_bytes), limits.request_bytes_max);
            tokio::task::spawn_blocking(move || decode(&body, gzipped, limit, &bytes))
                .await
                .map_err(|e| Box::new(plain(ErrorCode::Internal, format!("decoding task failed: {e}"))))??
        } else {
            decode(&body, false, limits.request_bytes_max, &app.body_bytes)?
        };
        if let Some(inflated) = inflated {
            room.merge(inflated);
        }
        limits.check_request(&request).map_err(|v| Box::new(refuse(&v)))?;
        Ok((request, gzip_reply, room))
    }

    async fn sync<B>(&self, req: http::Request<B>) -> Response
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let app = &self.app;
        let limits = &app.config.limits;
        // 1. Who is asking, before reading a byte of the body: the
        // embedding application's own authentication put it in the
        // request's extensions, or the bearer token says.
        let principal = match req.extensions().get::<Principal>() {
            Some(principal) => principal.clone(),
            None => match self.authenticate(req.headers()).await {
                Ok(p) => p,
                Err(resp) => return resp,
            },
        };
        // 2–4. Rate, room, body, shape and limits: all before anything is applied.
        let (request, gzip_reply, _room) = match self.receive(&principal, req).await {
            Ok(received) => received,
            Err(resp) => return *resp,
        };
        // 5. Apply and read the page; a caught-up long-poll waits for a commit.
        // The exchange's id: the client's `request_id`, else a fresh one;
        // in every log line of the exchange and in `x-request-id`.
        let request_id = request.request_id.clone().unwrap_or_else(|| ulid::Ulid::generate().to_string());
        let span = tracing::info_span!(
            "sync",
            request_id = %request_id,
            namespace = %principal.namespace,
            principal = %principal.id,
            node_id = %request.node_id,
            ops = request.ops.len(),
            changes = tracing::field::Empty,
        );
        let started = Instant::now();
        let wait = request.wait.filter(|w| request.ops.is_empty() && !w.is_zero()).map(|w| w.min(limits.wait_max));
        // Taken before the first read, so a commit in between is not missed.
        let mut held = wait.and_then(|_| app.hub.hold(principal.namespace.as_str()));
        let request = Arc::new(request);
        // A poll's first read is shared too: polls that took their place
        // after the same commit, at the same cursor, want the same page.
        let version = held.as_ref().map(|place| *place.commits.borrow());
        let shared = match version {
            Some(version) => app.wakes.page(&app.backend, &principal, &request, version, limits).await,
            None => None,
        };
        let mut result = match shared {
            Some(reply) => Ok(reply),
            None => self.run_exchange(&principal, &request, &span).await,
        };
        if let (Some(wait), Some(hold)) = (wait, held.as_mut()) {
            let holding = tokio::time::Instant::now();
            let deadline = holding + wait;
            let mut stopping = app.stopping.subscribe();
            // Held until a commit brings something this poll may see: a
            // commit to collections outside its scope (PROTOCOL.md §15)
            // leaves it waiting.
            while let Ok(reply) = &result
                && reply.change_count == 0
                && !reply.has_more
                && !reply.reset
                && !reply.resync
            {
                let woken = tokio::select! {
                    changed = hold.commits.changed() => changed.is_ok(),
                    () = tokio::time::sleep_until(deadline) => false,
                    _ = stopping.wait_for(|s| *s) => false,
                };
                if !woken {
                    break;
                }
                let version = *hold.commits.borrow_and_update();
                result = match app.wakes.page(&app.backend, &principal, &request, version, limits).await {
                    Some(reply) => Ok(reply),
                    None => self.run_exchange(&principal, &request, &span).await,
                };
            }
            app.metrics.held_for(holding.elapsed());
        }
        drop(held);
        let resp = match result {
            Ok(reply) => {
                app.metrics.exchange(principal.namespace.as_str());
                app.metrics.results(&reply.results);
                app.metrics.changes(reply.change_count);
                span.record("changes", reply.change_count);
                reply_response(&reply, gzip_reply)
            }
            Err(BackendError::Refused(v)) => refuse(&v),
            Err(BackendError::Unavailable(why)) => {
                tracing::warn!(parent: &span, %why, "storage unavailable");
                plain(ErrorCode::Unavailable, "storage unavailable; retry later")
            }
            Err(BackendError::Internal(why)) => {
                tracing::error!(parent: &span, %why, "storage failure");
                plain(ErrorCode::Internal, "internal error")
            }
        };
        tracing::info!(parent: &span, status = resp.status().as_u16(), micros = started.elapsed().as_micros(), "exchange");
        let mut resp = resp;
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        resp
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<crate::auth::Principal, Response> {
        let principal = match bearer(headers) {
            Ok(token) => self.app.auth.authenticate(token).await,
            Err(e) => Err(e),
        };
        principal.map_err(|e| match e {
            AuthError::Unavailable(why) => plain(ErrorCode::Unavailable, format!("authentication unavailable: {why}")),
            e => {
                let code = if e == AuthError::Expired { ErrorCode::TokenExpired } else { ErrorCode::Unauthorized };
                let mut resp = plain(code, e.to_string());
                let challenge = HeaderValue::from_static("Bearer error=\"invalid_token\"");
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, challenge);
                resp
            }
        })
    }

    /// Serves connections from `listener` until `shutdown` completes, then
    /// stops accepting, lets in-flight exchanges finish (up to
    /// [`ServerConfig::shutdown_grace`]) and returns.
    ///
    /// # Errors
    /// Never for accept failures (they are logged and retried); the result
    /// is for future use.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        self.serve_on(listener, None, shutdown).await
    }

    /// [`Server::serve`] over HTTPS with `tls`'s certificate (which
    /// [`crate::Tls::reload`] can replace while serving). A client gets
    /// [`ServerConfig::header_read_timeout`] for its handshake.
    ///
    /// # Errors
    /// As [`Server::serve`].
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: &crate::Tls,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_on(listener, Some(tls.acceptor()), shutdown).await
    }

    async fn serve_on(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let config = &self.app.config;
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(config.connections_max));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .keep_alive(true)
            .max_buf_size(READ_BUFFER_BYTES_MAX);
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
                () = &mut shutdown => break,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let app = Arc::clone(&self.app);
            app.metrics.connection_opened();
            let Some(tls) = &tls else {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                    app.metrics.connection_closed();
                    drop(permit);
                });
                continue;
            };
            // The handshake runs in the connection's task, bounded like headers.
            let (watcher, builder, handshake) = (graceful.watcher(), builder.clone(), tls.accept(stream));
            let timeout = config.header_read_timeout;
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(stream)) => {
                        let _ = watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
                app.metrics.connection_closed();
                drop(permit);
            });
        }
        drop(listener);
        self.app.stopping.send_replace(true);
        tracing::info!("shutting down: answering held long-polls, finishing in-flight exchanges");
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(config.shutdown_grace) => tracing::warn!("shutdown grace ran out with connections open"),
        }
        Ok(())
    }
}

/// An exchange's task, aborted (and counted) if its handler is dropped
/// before it ends: the client hung up.
struct Abandoned<'a, T> {
    task: tokio::task::JoinHandle<T>,
    metrics: &'a Metrics,
}

impl<T> Drop for Abandoned<'_, T> {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            self.task.abort();
            self.metrics.abandoned();
        }
    }
}

/// Takes room for `bytes` of request bodies, if there is that much.
fn take_room(room: &Arc<Semaphore>, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
    // Permits count bytes; a body is at most `REQUEST_BYTES_MAX`-sized.
    Arc::clone(room).try_acquire_many_owned(u32::try_from(bytes).unwrap_or(u32::MAX)).ok()
}

/// 503 for a request that finds no room for its body: nothing was read.
fn server_full() -> Response {
    let resp = plain(ErrorCode::Unavailable, "the server holds as many request bodies as it may; retry later");
    with_retry_after(resp, Duration::from_secs(1))
}

/// `resp` with a `Retry-After` of `wait`, in whole seconds (at least one).
fn with_retry_after(mut resp: Response, wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

/// Inflates a gzip body (taking room for what it inflates to) and decodes
/// the request; the error is the response to send.
fn decode(
    body: &[u8],
    gzipped: bool,
    limit: usize,
    room: &Arc<Semaphore>,
) -> Result<(SyncRequest, Option<tokio::sync::OwnedSemaphorePermit>), Box<Response>> {
    let mut inflated = None;
    let mut out = Vec::new();
    let text = if gzipped {
        match flate2::read::GzDecoder::new(body).take(limit as u64 + 1).read_to_end(&mut out) {
            Err(e) => {
                let v = Violation::new(ErrorCode::InvalidRequest, format!("gzip body: {e}"));
                return Err(Box::new(refuse(&v)));
            }
            Ok(_) if out.len() > limit => return Err(Box::new(too_large(limit))),
            Ok(_) => {}
        }
        inflated = Some(take_room(room, out.len()).ok_or_else(|| Box::new(server_full()))?);
        &out[..]
    } else {
        body
    };
    let request = SyncRequest::from_json(text).map_err(|v| Box::new(refuse(&v)))?;
    Ok((request, inflated))
}

/// Reads a request body within `limit` bytes and `timeout`; the error is
/// the response to send.
async fn read_body<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, Box<Response>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(Box::new(plain(ErrorCode::Timeout, "request body not received in time"))),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Box::new(too_large(limit))),
        Ok(Err(e)) => Err(Box::new(refuse(&Violation::new(ErrorCode::InvalidRequest, format!("request body: {e}"))))),
        Ok(Ok(body)) => Ok(body.to_bytes()),
    }
}

/// A 200 with the rendered reply, gzipped for clients that take it.
fn reply_response(reply: &crate::backend::Reply, gzip_reply: bool) -> Response {
    let mut body = reply.body();
    let compress = gzip_reply && body.len() >= GZIP_RESPONSE_BYTES_MIN;
    if compress {
        body = gzip(&body);
    }
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut().insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    if compress {
        resp.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

fn too_large(limit: usize) -> Response {
    plain(ErrorCode::BodyTooLarge, format!("bad request: request body larger than {limit} bytes"))
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    enc.write_all(body).expect("writing to memory cannot fail");
    enc.finish().expect("writing to memory cannot fail")
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, header::ACCEPT_ENCODING};

    fn accepts(value: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        super::accepts_gzip(&headers)
    }

    #[test]
    fn gzip_is_sent_only_to_clients_that_take_it() {
        for yes in ["gzip", "deflate, gzip", "gzip;q=0.5", "GZIP", "*", "br, *;q=0.1"] {
            assert!(accepts(yes), "{yes}");
        }
        for no in ["gzip;q=0", "gzip; q=0.0", "identity", "deflate, br", "*;q=0", "gzipped", "gzip;q=0, *"] {
            assert!(!accepts(no), "{no}");
        }
        assert!(!super::accepts_gzip(&HeaderMap::new()));
    }
}
