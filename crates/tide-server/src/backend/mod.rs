//! Storage behind the handler: one trait, one call per exchange.

pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tide_core::digest::{self, Hash64};
use tide_core::{
    Cursor, Decision, ErrorCode, HeldVersion, OpResult, PROTOCOL_VERSION, Payload, Stamp, SyncRequest, SyncResponse,
    Violation, decide,
};

use crate::auth::Principal;

/// Why a backend could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The request breaks a rule that needs stored state to check (a counter
    /// too far ahead of the namespace's highest). Nothing was applied.
    #[error(transparent)]
    Refused(#[from] Violation),
    /// The database cannot be reached or is busy; retrying can succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else; a bug or a damaged database.
    #[error("storage failure: {0}")]
    Internal(String),
}

/// Told the namespace of every commit another process made; returns
/// whether to keep listening (false once the server is gone).
pub type CommitCallback = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The answer to one exchange, with the page already rendered as JSON so
/// the server never re-parses stored documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// One result per op.
    pub results: Vec<OpResult>,
    /// The cursor to return.
    pub cursor: Cursor,
    /// The changes as JSON objects joined by commas (no brackets).
    pub changes_json: String,
    /// How many changes `changes_json` holds.
    pub change_count: usize,
    /// Whether more changes wait after `cursor`.
    pub has_more: bool,
    /// Whether the request's cursor was ahead of the namespace's state.
    pub reset: bool,
    /// The request's `request_id`, echoed.
    pub request_id: Option<String>,
    /// The answers to the digest and fetch extensions (PROTOCOL.md §12).
    pub verify: VerifyReply,
}

/// The digest and fetch answers of one exchange (PROTOCOL.md §12).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReply {
    /// The root digest per collection, when asked and the page was empty.
    pub roots: Option<BTreeMap<String, Hash64>>,
    /// The non-zero group digests asked for.
    pub groups: Option<Vec<(u16, Hash64)>>,
    /// The non-zero bucket digests asked for.
    pub buckets: Option<Vec<(u16, Hash64)>>,
    /// Stored versions sent back, rendered as changes joined by commas.
    pub fetched_json: String,
    /// How many changes `fetched_json` holds.
    pub fetched_count: usize,
    /// Ids whose versions the client should push back as a repair.
    pub wanted: Vec<String>,
    /// Whether `fetched_json` reached the response byte budget.
    pub(crate) fetched_full: bool,
}

impl Reply {
    /// The response body, byte for byte what `serde_json` writes for the
    /// equivalent [`SyncResponse`].
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.changes_json.len() + 128);
        out.extend_from_slice(br#"{"cursor":""#);
        out.extend_from_slice(self.cursor.to_string().as_bytes());
        out.extend_from_slice(br#"","changes":["#);
        out.extend_from_slice(self.changes_json.as_bytes());
        out.extend_from_slice(br#"],"protocol":"#);
        out.extend_from_slice(PROTOCOL_VERSION.to_string().as_bytes());
        if !self.results.is_empty() {
            out.extend_from_slice(br#","results":"#);
            serde_json::to_writer(&mut out, &self.results).expect("results serialize");
        }
        if self.has_more {
            out.extend_from_slice(br#","has_more":true"#);
        }
        if self.reset {
            out.extend_from_slice(br#","reset":true"#);
        }
        let mut field = |name: &[u8], value: &dyn erased::Value| {
            out.extend_from_slice(name);
            value.write(&mut out);
        };
        if let Some(id) = &self.request_id {
            field(br#","request_id":"#, id);
        }
        let v = &self.verify;
        if let Some(roots) = &v.roots {
            field(br#","roots":"#, roots);
        }
        if let Some(groups) = &v.groups {
            field(br#","groups":"#, groups);
        }
        if let Some(buckets) = &v.buckets {
            field(br#","buckets":"#, buckets);
        }
        if v.fetched_count > 0 {
            out.extend_from_slice(br#","fetched":["#);
            out.extend_from_slice(v.fetched_json.as_bytes());
            out.push(b']');
        }
        if !v.wanted.is_empty() {
            out.extend_from_slice(br#","wanted":"#);
            serde_json::to_writer(&mut out, &v.wanted).expect("ids serialize");
        }
        out.push(b'}');
        out
    }

    /// The typed response (parses the rendered page; for tests and tools).
    pub fn to_response(&self) -> SyncResponse {
        serde_json::from_slice(&self.body()).expect("a rendered reply parses")
    }
}

/// Where a server keeps its namespaces. Implementations must give exactly
/// the per-op results and pages of `tide_core::Model` (PROTOCOL.md).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Applies a validated request's ops in one transaction (all or
    /// nothing), then reads the page after its cursor.
    ///
    /// The caller has run `Limits::check_request`; the backend checks what
    /// needs stored state (the counter lead) and may refuse with
    /// [`BackendError::Refused`].
    ///
    /// A request whose node id is bound to another principal of the
    /// namespace is refused with `forbidden`; a node id is bound to the
    /// first principal that writes with it.
    async fn exchange(&self, principal: &Principal, request: Arc<SyncRequest>) -> Result<Reply, BackendError>;

    /// Whether the backend can serve now (for readiness checks).
    async fn ready(&self) -> Result<(), BackendError>;

    /// Reports commits made by other processes sharing this storage, for as
    /// long as the backend lives: `on_commit(namespace)`, or
    /// `on_commit("")` when some may have been missed. A backend only this
    /// process writes needs nothing here.
    async fn listen(&self, on_commit: CommitCallback) -> Result<(), BackendError> {
        let _ = on_commit;
        Ok(())
    }
}

/// One row of a page window, as a backend reads it.
pub(crate) struct PageRow {
    pub(crate) seq: u64,
    pub(crate) own: bool,
    pub(crate) json: String,
}

/// Builds a page the way `tide_core::Model::page` does, from windows of
/// rows in seq order that the backend reads one after another.
pub(crate) struct PageBuilder {
    limit: usize,
    bytes_max: usize,
    json: String,
    count: usize,
    bytes: usize,
    last: u64,
    has_more: Option<bool>,
}

impl PageBuilder {
    pub(crate) fn new(from: Cursor, limit: usize, bytes_max: usize) -> Self {
        Self { limit, bytes_max, json: String::new(), count: 0, bytes: 0, last: from.seq(), has_more: None }
    }

    /// How many rows to read next.
    pub(crate) fn window(&self) -> usize {
        self.limit.saturating_add(1).min(PAGE_WINDOW_ROWS_MAX)
    }

    /// The seq to read after.
    pub(crate) fn after(&self) -> u64 {
        self.last
    }

    /// Takes the next window; returns whether the page is complete.
    pub(crate) fn feed(&mut self, rows: Vec<PageRow>) -> bool {
        let full = rows.len() == self.window();
        for row in rows {
            if row.own {
                self.last = row.seq;
                continue;
            }
            let size = row.json.len() + 1;
            if self.count == self.limit || (self.count > 0 && self.bytes + size > self.bytes_max) {
                self.has_more = Some(true);
                return true;
            }
            if self.count > 0 {
                self.json.push(',');
            }
            self.json.push_str(&row.json);
            self.count += 1;
            self.bytes += size;
            self.last = row.seq;
        }
        if full {
            return false;
        }
        self.has_more = Some(false);
        true
    }

    /// The page: changes, their count, the cursor and `has_more`.
    pub(crate) fn finish(self) -> (String, usize, Cursor, bool) {
        (self.json, self.count, Cursor(self.last), self.has_more.unwrap_or(true))
    }
}

/// The most rows one page query reads; a page of many own (skipped) rows
/// takes several queries.
pub const PAGE_WINDOW_ROWS_MAX: usize = 1_001;

/// Per key written by a request: the index of its last applied op and that op's seq.
pub(crate) type Written<'a> = HashMap<(&'a str, &'a str), (usize, u64)>;

/// The ops of a request in order, by the one LWW rule, against what is
/// stored: their results, the last applied op and seq per key, and the new
/// namespace seq.
pub(crate) fn decide_all<'a>(
    req: &'a SyncRequest,
    keys: &[(&'a str, &'a str)],
    mut current: HashMap<(&'a str, &'a str), (Stamp, Payload)>,
    mut seq: u64,
) -> (Vec<OpResult>, Written<'a>, u64) {
    let mut results = Vec::with_capacity(req.ops.len());
    let mut written = HashMap::new();
    for (i, op) in req.ops.iter().enumerate() {
        let stored = current.get(&keys[i]).map(|(s, p)| (s, p));
        let decision = decide(stored, &op.stamp, &op.payload);
        if decision == Decision::Apply {
            seq += 1;
            current.insert(keys[i], (op.stamp.clone(), op.payload.clone()));
            written.insert(keys[i], (i, seq));
        }
        results.push(tide_core::model::op_result(decision, op, current.get(&keys[i]).map(|(s, _)| s), seq));
    }
    (results, written, seq)
}

/// The server database schema this build reads and writes, as stored under
/// `schema_version` in `tide_server_meta` by both backends. Version 2 adds
/// the digest table, each row's bucket, and the node ids' principals.
pub(crate) const SCHEMA_VERSION: &str = "2";

/// The statement that reads the stored schema version, the same on both backends.
pub(crate) const SELECT_SCHEMA_VERSION: &str = "SELECT value FROM tide_server_meta WHERE key = 'schema_version'";

/// Whether a database at schema `found` needs the version-2 migration;
/// refuses one whose schema this build does not know.
pub(crate) fn check_schema_version(found: &str) -> Result<bool, BackendError> {
    if found == SCHEMA_VERSION {
        Ok(false)
    } else if found == "1" {
        Ok(true)
    } else {
        Err(BackendError::Internal(format!(
            "server database schema v{found} is not supported by this build (v{SCHEMA_VERSION})"
        )))
    }
}

/// Refuses ops whose counter runs more than the allowed lead past the
/// namespace's highest, naming the first.
pub(crate) fn check_lead(req: &SyncRequest, lamport_max: u64, lead_max: u64) -> Result<(), BackendError> {
    let bound = lamport_max.saturating_add(lead_max);
    match req.ops.iter().position(|op| op.stamp.lamport > bound) {
        None => Ok(()),
        Some(i) => Err(Violation::new(
            ErrorCode::LamportOutOfRange,
            format!(
                "lamport {} is more than {lead_max} ahead of the highest counter seen ({lamport_max})",
                req.ops[i].stamp.lamport
            ),
        )
        .at_op(i)
        .into()),
    }
}

/// Renders a stored version exactly as `serde_json` renders a `tide_core::Change`.
pub(crate) fn render_change(
    collection: &str,
    id: &str,
    doc: Option<&str>,
    lamport: u64,
    node_id: &str,
    seq: u64,
) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    let kind = if doc.is_some() { "put" } else { "delete" };
    format!(
        r#"{{"collection":{},"id":{},"kind":"{kind}","doc":{},"lamport":{lamport},"node_id":{},"seq":{seq}}}"#,
        quote(collection),
        quote(id),
        doc.unwrap_or("null"),
        quote(node_id)
    )
}

/// Where a page starts and whether it skips the caller's own changes, from
/// the request's cursor and the namespace's highest seq (`reset` when the
/// cursor is ahead of it); and a builder for it.
pub(crate) fn page_start(
    req: &SyncRequest,
    namespace_seq: u64,
    limits: &tide_core::Limits,
) -> (PageBuilder, bool, bool) {
    let requested = req.cursor.unwrap_or_default();
    let reset = requested.seq() > namespace_seq;
    let (from, skip_own) = if reset { (Cursor::START, false) } else { (requested, requested > Cursor::START) };
    let limit = req.limit.map_or(usize::MAX, |l| l as usize).clamp(1, limits.changes_per_response_max);
    (PageBuilder::new(from, limit, limits.response_bytes_max), skip_own, reset)
}

/// Serializing a field value into a body without naming its type.
mod erased {
    pub(super) trait Value {
        fn write(&self, out: &mut Vec<u8>);
    }

    impl<T: serde::Serialize + ?Sized> Value for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("plain data serializes");
        }
    }
}

/// One stored version as the digest and fetch answers read it.
pub(crate) struct StoredVersion {
    pub(crate) collection: String,
    pub(crate) id: String,
    pub(crate) doc: Option<String>,
    pub(crate) lamport: u64,
    pub(crate) node_id: String,
    pub(crate) seq: u64,
}

impl StoredVersion {
    fn render(&self) -> String {
        render_change(&self.collection, &self.id, self.doc.as_deref(), self.lamport, &self.node_id, self.seq)
    }
}

/// Adds rendered versions to `reply.fetched_json` up to the response byte
/// budget (always at least one, so every exchange makes progress).
pub(crate) fn push_fetched<'a>(
    reply: &mut VerifyReply,
    versions: impl IntoIterator<Item = &'a StoredVersion>,
    bytes_max: usize,
) {
    for v in versions {
        if reply.fetched_full {
            return;
        }
        let json = v.render();
        if reply.fetched_count > 0 && reply.fetched_json.len() + json.len() + 1 > bytes_max {
            reply.fetched_full = true;
            return;
        }
        if reply.fetched_count > 0 {
            reply.fetched_json.push(',');
        }
        reply.fetched_json.push_str(&json);
        reply.fetched_count += 1;
    }
}

/// Compares the stored versions of some buckets with what a client holds
/// there (PROTOCOL.md §12): what to send it, and which ids to ask back.
pub(crate) fn compare_keys(
    reply: &mut VerifyReply,
    stored: &[StoredVersion],
    (collection, buckets, have): (&str, &[u16], &[HeldVersion]),
    bytes_max: usize,
) {
    // Versions outside the compared buckets are ignored.
    let held: HashMap<&str, (Stamp, Hash64, bool)> = have
        .iter()
        .filter(|h| buckets.contains(&digest::bucket(collection, &h.0)))
        .map(|h| (h.0.as_str(), (Stamp::new(h.1, h.2.clone()), h.4, h.3)))
        .collect();
    let mut by_id: HashMap<&str, (Stamp, Hash64, bool)> = HashMap::with_capacity(stored.len());
    let mut send = Vec::new();
    for v in stored {
        let stamp = Stamp::new(v.lamport, v.node_id.clone());
        let hash = digest::version_hash(collection, &v.id, &stamp, v.doc.as_deref());
        let server = (stamp, hash, v.doc.is_some());
        if digest::compare(Some(digest::Held::of(&server)), held.get(v.id.as_str()).map(digest::Held::of)).0 {
            send.push(v);
        }
        by_id.insert(v.id.as_str(), server);
    }
    push_fetched(reply, send, bytes_max);
    let mut wanted: Vec<String> = held
        .iter()
        .filter(|(id, client)| digest::compare(by_id.get(*id).map(digest::Held::of), Some(digest::Held::of(client))).1)
        .map(|(id, _)| (*id).to_owned())
        .collect();
    wanted.sort_unstable();
    reply.wanted = wanted;
}

/// Default most bucket deltas a server keeps in `tide_digest_log` before it
/// folds them into the group and bucket rows (262,144; see
/// `set_digest_log_rows_max` on each backend): appending is cheap where
/// updating thousands of random bucket rows per write group is not.
pub const DIGEST_LOG_ROWS_MAX: i64 = 1 << 18;

/// What a group of writes does to the digests, combined per entry and with
/// zero deltas left out: `(namespace, collection, delta)` for the roots, kept
/// up to date at once, and `(namespace, collection, bucket, delta)` for the
/// log of bucket deltas.
#[derive(Debug, Default)]
pub(crate) struct DigestDeltas<'a> {
    pub(crate) roots: Vec<(&'a str, &'a str, i64)>,
    pub(crate) buckets: Vec<(&'a str, &'a str, u16, i64)>,
}

pub(crate) fn digest_deltas<'a>(
    changes: impl IntoIterator<Item = (&'a str, &'a str, &'a str, Option<Hash64>, Option<Hash64>)>,
) -> DigestDeltas<'a> {
    let mut roots: BTreeMap<(&str, &str), Hash64> = BTreeMap::new();
    let mut buckets: BTreeMap<(&str, &str, u16), Hash64> = BTreeMap::new();
    for (ns, collection, id, old, new) in changes {
        for d in digest::deltas(collection, id, old, new).into_iter().flatten() {
            match d.level {
                0 => *roots.entry((ns, collection)).or_default() ^= d.hash,
                2 => *buckets.entry((ns, collection, d.index)).or_default() ^= d.hash,
                _ => {}
            }
        }
    }
    DigestDeltas {
        roots: roots.into_iter().filter(|(_, h)| !h.is_zero()).map(|((n, c), h)| (n, c, h.to_i64())).collect(),
        buckets: buckets
            .into_iter()
            .filter(|(_, h)| !h.is_zero())
            .map(|((n, c, b), h)| (n, c, b, h.to_i64()))
            .collect(),
    }
}

/// Logged bucket deltas, folded into group and bucket rows:
/// `(namespace, level, collection, index, delta)`, combined, non-zero.
pub(crate) fn fold_logged(logged: &[(String, String, i64, i64)]) -> Vec<(&str, i16, &str, i32, i64)> {
    let mut sum: BTreeMap<(&str, i16, &str, i32), i64> = BTreeMap::new();
    for (ns, collection, bucket, delta) in logged {
        let bucket = i32::try_from(*bucket).unwrap_or(0);
        *sum.entry((ns, 1, collection, bucket >> 8)).or_default() ^= delta;
        *sum.entry((ns, 2, collection, bucket)).or_default() ^= delta;
    }
    sum.into_iter().filter(|(_, h)| *h != 0).map(|((n, l, c, i), h)| (n, l, c, i, h)).collect()
}

/// One digest level of a collection from its folded rows and logged deltas.
pub(crate) fn combine(
    level: u8,
    folded: Vec<(i64, i64)>,
    logged: Vec<(i64, i64)>,
    groups: Option<&Vec<u16>>,
) -> Vec<(u16, Hash64)> {
    let index = |i: i64| u16::try_from(i).unwrap_or(u16::MAX);
    digest::with_logged(
        level,
        folded.into_iter().map(|(i, h)| (index(i), h)),
        logged.into_iter().map(|(b, d)| (index(b), d)),
        groups.map(Vec::as_slice),
    )
}

/// Most node-id bindings a backend keeps in memory (a binding never
/// changes once made, so a cached one is never stale; past this many the
/// cache starts over).
pub const NODE_BINDINGS_CACHED_MAX: usize = 100_000;

/// Which principal each node id of a namespace is bound to, as far as this
/// process has read or written it.
#[derive(Default)]
pub(crate) struct Bindings(std::sync::Mutex<HashMap<(String, String), String>>);

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The principal `node_id` is bound to in `namespace`, if known here.
    pub(crate) fn get(&self, namespace: &str, node_id: &str) -> Option<String> {
        self.lock().get(&(namespace.to_owned(), node_id.to_owned())).cloned()
    }

    /// Remembers bindings read from or written to the database.
    pub(crate) fn remember(&self, bound: impl IntoIterator<Item = (String, String, String)>) {
        let mut map = self.lock();
        for (namespace, node_id, principal) in bound {
            if map.len() >= NODE_BINDINGS_CACHED_MAX {
                map.clear();
            }
            map.insert((namespace, node_id), principal);
        }
    }

    /// Refuses `principal`'s use of `node_id` if it is bound to another.
    pub(crate) fn check(&self, principal: &Principal, node_id: &str) -> Result<(), BackendError> {
        match self.get(principal.namespace.as_str(), node_id) {
            Some(owner) if owner != principal.id => Err(foreign_node(node_id)),
            _ => Ok(()),
        }
    }
}

/// The refusal of a request whose node id is another principal's.
pub(crate) fn foreign_node(node_id: &str) -> BackendError {
    Violation::new(ErrorCode::Forbidden, format!("node id {node_id:?} belongs to another principal of this namespace"))
        .into()
}
