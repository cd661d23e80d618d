//! Storage behind the handler: one trait, one call per exchange.

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tide_core::digest::{self, Hash64};
use tide_core::{
    Cursor, Decision, ErrorCode, HeldVersion, Horizon, OpResult, PROTOCOL_VERSION, Payload, Stamp, SyncRequest,
    SyncResponse, Violation,
};

use crate::access::{AccessRules, Scope};
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

impl BackendError {
    /// The same error again, for each caller of a failed write group.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Refused(v) => Self::Refused(v.clone()),
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
        }
    }
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
    /// The namespace's head, for a request with `live_below` and a resync.
    pub head: Option<u64>,
    /// The namespace's tombstone horizon, once it has one (PROTOCOL.md §14).
    pub horizon: Option<u64>,
    /// Whether the request's cursor was below the horizon, so the page
    /// starts from the beginning (PROTOCOL.md §14).
    pub resync: bool,
    /// The collections the principal may read, when its access rules limit
    /// them (PROTOCOL.md §15).
    pub readable: Option<Vec<String>>,
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
    pub(crate) fn new(results: Vec<OpResult>, page: Page, request_id: Option<String>, verify: VerifyReply) -> Self {
        Self {
            results,
            cursor: page.cursor,
            changes_json: page.json,
            change_count: page.count,
            has_more: page.has_more,
            reset: page.reset,
            head: page.head,
            horizon: page.horizon,
            resync: page.resync,
            readable: page.readable,
            request_id,
            verify,
        }
    }

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
        if let Some(head) = self.head {
            out.extend_from_slice(br#","head":"#);
            out.extend_from_slice(head.to_string().as_bytes());
        }
        if let Some(horizon) = self.horizon {
            out.extend_from_slice(br#","horizon":"#);
            out.extend_from_slice(horizon.to_string().as_bytes());
        }
        if self.resync {
            out.extend_from_slice(br#","resync":true"#);
        }
        let mut field = |name: &[u8], value: &dyn erased::Value| {
            out.extend_from_slice(name);
            value.write(&mut out);
        };
        if let Some(readable) = &self.readable {
            field(br#","readable":"#, readable);
        }
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

    /// Reports commits that applied ops, for as long as the backend lives:
    /// `on_commit(namespace)` from the write group that committed (so a
    /// held poll wakes even when the exchange that wrote was abandoned by
    /// its client), and for commits made by other processes sharing this
    /// storage; `on_commit("")` when some may have been missed. Held
    /// long-polls wake only by this, so a backend that wraps another must
    /// pass it on.
    async fn listen(&self, on_commit: CommitCallback) -> Result<(), BackendError> {
        let _ = on_commit;
        Ok(())
    }

    /// One step of tombstone collection (PROTOCOL.md §14): in each namespace
    /// whose horizon is more than `horizon_seqs` changes behind its head,
    /// removes the tombstones of at most [`COLLECT_SEQS_PER_STEP`] seqs
    /// above the horizon (but none of the last `horizon_seqs`), and raises
    /// the horizon over them. A short write, so writes go on between steps;
    /// call again while [`Collected::more`] says so. A backend that wraps
    /// another must pass it on (the default collects nothing).
    async fn collect(&self, horizon_seqs: u64) -> Result<Collected, BackendError> {
        let _ = horizon_seqs;
        Ok(Collected::default())
    }
}

/// Seqs one collection step looks through per namespace: bounds the
/// rows one step reads and the time it holds the writer.
pub const COLLECT_SEQS_PER_STEP: u64 = 16_384;

/// Namespaces one collection step takes on.
pub const COLLECT_NAMESPACES_PER_STEP: usize = 64;

/// What one step of tombstone collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Namespaces whose horizon moved.
    pub namespaces: u64,
    /// Tombstones removed.
    pub tombstones: u64,
    /// Bytes of their stored renderings.
    pub bytes: u64,
    /// Whether some namespace is still more than the horizon behind.
    pub more: bool,
}

impl std::ops::AddAssign for Collected {
    fn add_assign(&mut self, other: Self) {
        self.namespaces += other.namespaces;
        self.tombstones += other.tombstones;
        self.bytes += other.bytes;
        self.more |= other.more;
    }
}

/// A namespace's horizon after a collection step removed the tombstones up
/// to `upto`: `before` as stored (seq, stamp's counter and node id), `top`
/// the highest removed stamp as a JSON `[lamport, node_id]`.
pub(crate) fn horizon_after(
    (seq, lamport, node): (u64, Option<i64>, Option<String>),
    upto: u64,
    top: Option<&str>,
) -> Result<Horizon, BackendError> {
    let top: Option<(u64, String)> =
        top.map(serde_json::from_str).transpose().map_err(|e| BackendError::Internal(format!("horizon: {e}")))?;
    let stamp = lamport.zip(node).map(|(l, n)| Stamp::new(u64::try_from(l).unwrap_or(0), n));
    Ok(Horizon { seq, stamp }.raised(upto, top.map(|(l, n)| Stamp::new(l, n)).as_ref()))
}

/// Where one namespace's collection step stops: `COLLECT_SEQS_PER_STEP`
/// above its horizon, and never within `horizon_seqs` of its head.
pub(crate) fn collect_upto(head: u64, horizon: u64, horizon_seqs: u64) -> Option<u64> {
    let limit = head.checked_sub(horizon_seqs)?;
    (limit > horizon).then(|| limit.min(horizon + COLLECT_SEQS_PER_STEP))
}

/// The highest `live_below` a page statement takes as given (above it, as
/// this: far past any seq a namespace reaches).
const LIVE_BELOW_MAX: u64 = 1 << 61;

/// How a backend reads a page (PROTOCOL.md §5): the changes after `from`,
/// skipping `skip_node`'s own when it is set and tombstones at or below
/// `live_below`, at most `limit` of them and at most `bytes_max` bytes of
/// them.
#[derive(Debug, Clone)]
pub(crate) struct PageQuery<'a> {
    pub(crate) from: u64,
    pub(crate) skip_node: Option<&'a str>,
    pub(crate) live_below: Option<u64>,
    pub(crate) limit: usize,
    pub(crate) bytes_max: usize,
    pub(crate) reset: bool,
    /// The head at which the client last began from the start (its
    /// `live_below` or `from_head`; 0 for neither), for the resync rule.
    pub(crate) fresh_at: u64,
    pub(crate) resync: bool,
    /// The namespace's horizon as the page statement read it.
    pub(crate) horizon: u64,
    /// The collections the page covers and the principal may read.
    pub(crate) scope: Scope,
}

impl<'a> PageQuery<'a> {
    /// The page a request asks for: after its cursor, in its scope,
    /// skipping its own changes unless it starts from the beginning.
    pub(crate) fn new(req: &'a SyncRequest, limits: &tide_core::Limits, scope: Scope) -> Self {
        let from = req.cursor.unwrap_or_default();
        let skip_node = (from > Cursor::START).then_some(req.node_id.as_str());
        let limit = req.limit.map_or(usize::MAX, |l| l as usize).clamp(1, limits.changes_per_response_max);
        let bytes_max = limits.response_bytes_max;
        let fresh_at = req.live_below.max(req.from_head).unwrap_or(0);
        Self {
            from: from.seq(),
            skip_node,
            live_below: req.live_below,
            limit,
            bytes_max,
            reset: false,
            fresh_at,
            resync: false,
            horizon: 0,
            scope,
        }
    }

    /// What a page statement passes over, in one argument: bit 0, the
    /// caller's own changes; the bits above, the seq at or below which
    /// tombstones are left out (0: none is).
    pub(crate) fn skips(&self) -> i64 {
        let below = self.live_below.map_or(0, |b| b.min(LIVE_BELOW_MAX));
        i64::from(self.skip_node.is_some()) | (i64::try_from(below).expect("bounded") << 1)
    }

    /// Whether the cursor is ahead of the namespace, whose highest seq is
    /// `namespace_seq`; the page then starts over from the beginning (`reset`).
    fn ahead_of(&mut self, namespace_seq: u64) -> bool {
        if self.from <= namespace_seq {
            return false;
        }
        *self = Self { from: 0, skip_node: None, reset: true, ..self.clone() };
        true
    }

    /// Whether the page must be read again from the beginning, given the
    /// namespace's head and horizon as a page statement read them: the
    /// cursor is ahead of the head (`reset`) or below the horizon (`resync`).
    pub(crate) fn starts_over(&mut self, namespace_seq: u64, horizon: u64) -> bool {
        self.horizon = horizon;
        self.ahead_of(namespace_seq) || self.below(horizon)
    }

    /// Whether the cursor is below the namespace's tombstone horizon (and
    /// the client did not begin from the start since it passed), so the
    /// client may hold versions whose deletes are gone: the page starts over
    /// from the beginning, still without its own changes (`resync`).
    fn below(&mut self, horizon: u64) -> bool {
        let stale = Horizon { seq: horizon, stamp: None }.stale(self.from, self.fresh_at);
        if self.reset || self.resync || !stale {
            return false;
        }
        *self = Self { from: 0, resync: true, ..self.clone() };
        true
    }

    /// Given the rendered sizes of the first `limit + 1` changes of the
    /// page, how many fit the byte budget (at least one).
    pub(crate) fn fitting(&self, sizes: &[u64]) -> usize {
        let mut bytes = 0u64;
        for (n, size) in sizes.iter().take(self.limit).enumerate() {
            bytes += size + 1;
            if n > 0 && bytes > self.bytes_max as u64 {
                return n;
            }
        }
        sizes.len().min(self.limit)
    }

    /// Whether `limit` changes of at most `size_max` bytes each always fit
    /// the byte budget (then a page needs no sizes summed).
    fn fits_all(&self, size_max: u64) -> bool {
        (size_max + 1).checked_mul(self.limit as u64).is_some_and(|total| total <= self.bytes_max as u64)
    }

    /// What the small-page statement's answer means for this page: ask
    /// again (the cursor was ahead: the page starts over), the page itself,
    /// or read it summing sizes (the namespace's changes may not fit).
    pub(crate) fn small(&mut self, row: Option<SmallPageRow>) -> SmallPage {
        let Some((namespace_seq, horizon, size_max, text, n, last, more)) = row else {
            // No namespace yet: nothing to send, and any cursor is ahead.
            if self.ahead_of(0) {
                return SmallPage::Again;
            }
            return SmallPage::Done(self.finish(PageRead::default(), 0));
        };
        let namespace_seq = u64::try_from(namespace_seq).unwrap_or(0);
        if self.starts_over(namespace_seq, u64::try_from(horizon).unwrap_or(0)) {
            return SmallPage::Again;
        }
        if !self.fits_all(u64::try_from(size_max).unwrap_or(u64::MAX)) {
            return SmallPage::SumSizes;
        }
        let read = PageRead {
            json: text.unwrap_or_default(),
            count: usize::try_from(n).unwrap_or(0),
            last: last.and_then(|l| u64::try_from(l).ok()).unwrap_or(0),
            has_more: more,
        };
        SmallPage::Done(self.finish(read, namespace_seq))
    }

    /// The page from the page statement's answer (the byte total and count
    /// of the first `limit + 1` changes, the first `limit` joined, the seq
    /// of the last), or `None` when they run past the byte budget and the
    /// page must be cut by size.
    pub(crate) fn fitted(&self, total: i64, n: i64, text: Option<String>, last: Option<i64>) -> Option<PageRead> {
        if u64::try_from(total).unwrap_or(u64::MAX) > self.bytes_max as u64 {
            return None;
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        Some(PageRead {
            json: text.unwrap_or_default(),
            count: n.min(self.limit),
            last: last.and_then(|l| u64::try_from(l).ok()).unwrap_or(0),
            has_more: n > self.limit,
        })
    }

    /// The page from what was read: the changes (joined by commas) and
    /// their count, the seq of the last, whether more wait, and the
    /// namespace's highest seq (where a page that ends the log leaves the
    /// cursor, past the caller's own changes too).
    pub(crate) fn finish(&self, read: PageRead, namespace_seq: u64) -> Page {
        let end = namespace_seq.max(self.from).max(read.last);
        let cursor = if read.has_more { Cursor(read.last) } else { Cursor(end) };
        let head = (self.live_below.is_some() || self.resync).then_some(namespace_seq);
        Page {
            json: read.json,
            count: read.count,
            cursor,
            has_more: read.has_more,
            reset: self.reset,
            head,
            horizon: (self.horizon > 0).then_some(self.horizon),
            resync: self.resync,
            readable: self.scope.readable.to_wire(),
        }
    }
}

/// What a backend's small-page statement returns: the namespace's seq,
/// horizon and largest rendering, the renderings joined, their count, the
/// last seq, and whether a change follows; no row when the namespace has none.
pub(crate) type SmallPageRow = (i64, i64, i64, Option<String>, i64, Option<i64>, bool);

/// The next step of a page read after the small-page statement.
pub(crate) enum SmallPage {
    /// The cursor was ahead of the namespace: read again from the start.
    Again,
    /// The page.
    Done(Page),
    /// The namespace's changes may not fit: read with their sizes summed.
    SumSizes,
}

/// The changes of a page as a backend's statement returns them.
#[derive(Debug, Default)]
pub(crate) struct PageRead {
    pub(crate) json: String,
    pub(crate) count: usize,
    pub(crate) last: u64,
    pub(crate) has_more: bool,
}

/// A page ready for the reply.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) json: String,
    pub(crate) count: usize,
    pub(crate) cursor: Cursor,
    pub(crate) has_more: bool,
    pub(crate) reset: bool,
    /// The namespace's head, for a request with `live_below` and a resync.
    pub(crate) head: Option<u64>,
    pub(crate) horizon: Option<u64>,
    pub(crate) resync: bool,
    /// The collections the principal may read, when rules limit them.
    pub(crate) readable: Option<Vec<String>>,
}

impl Page {
    /// Whether the exchange saw everything: nothing to send, nothing
    /// more, and the cursor was the namespace's own (digests compare only then).
    pub(crate) fn settled(&self) -> bool {
        self.count == 0 && !self.has_more && !self.reset && !self.resync
    }
}

/// An embedding application's last word on each op before it is stored:
/// a schema check, an ownership rule, a field the server fills in. It runs
/// inside the write group (after the request's own checks, before the
/// last-writer-wins decision), once per op, so it must be quick and must not
/// block. A rewrite must be a function of the op and the principal alone: a
/// client that retries an op must get the same document, which is then a
/// duplicate, not a conflict. The writer's replica learns a rewritten
/// document through the digest check that ends its sync (same stamp, the
/// server's text settles it, PROTOCOL.md §12).
pub trait Validator: Send + Sync + 'static {
    /// What becomes of `op`, written by `principal`.
    fn validate(&self, principal: &Principal, op: &tide_core::Op) -> Verdict;
}

/// A [`Validator`]'s answer for one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store it as sent.
    Accept,
    /// Refuse it: the client gets `rejected` with `validation_failed` and
    /// this message, and the op goes to its rejected list.
    Reject(String),
    /// Store this document instead (a put only; a delete is kept as it is).
    Rewrite(tide_core::Doc),
}

/// What an embedding application decides about requests, set once before
/// serving: its access rules and its validator (each optional).
#[derive(Default)]
pub(crate) struct Policy {
    pub(crate) validator: std::sync::OnceLock<Arc<dyn Validator>>,
    pub(crate) rules: std::sync::OnceLock<Arc<dyn AccessRules>>,
}

impl Policy {
    /// The access rules, if set.
    pub(crate) fn rules(&self) -> Option<&dyn AccessRules> {
        self.rules.get().map(|r| &**r)
    }

    /// What a request from `principal` may read.
    pub(crate) fn scope(&self, principal: &Principal, req: &SyncRequest) -> Scope {
        Scope::of(self.rules(), principal, req.collections.as_deref())
    }
}

/// One exchange from its two parts: `apply`, the request's ops in a write
/// group, and `read`, which reads its page (and digest and fetch answers).
/// Neither future runs before it is awaited here.
///
/// The page is read after the ops are applied, so that it reflects them
/// (PROTOCOL.md §4.2), unless [`SyncRequest::page_beside_ops`] says they
/// cannot show in it: then both run at once, and the exchange waits for
/// the slower (usually the write group's `fsync`), not for the two in turn.
pub(crate) async fn exchange<R>(
    request: &SyncRequest,
    apply: impl std::future::Future<Output = Result<Vec<OpResult>, BackendError>>,
    read: impl Fn() -> R,
) -> Result<Reply, BackendError>
where
    R: std::future::Future<Output = Result<(Page, VerifyReply), BackendError>>,
{
    let (results, (page, verify)) = if request.ops.is_empty() {
        (Vec::new(), read().await?)
    } else if request.page_beside_ops() {
        let (results, beside) = tokio::join!(apply, read());
        let results = results?;
        let (mut page, verify) = beside?;
        if page.reset || page.resync {
            // It started over from the beginning, where a page holds the
            // request's own writes: read it again, after them.
            (results, read().await?)
        } else {
            if !page.has_more {
                page.cursor = request.cursor_past_own(page.cursor, &results);
            }
            (results, (page, verify))
        }
    } else {
        let results = apply.await?;
        (results, read().await?)
    };
    Ok(Reply::new(results, page, request.request_id.clone(), verify))
}

/// Refuses (`forbidden`, before anything is applied) a request that
/// compares digests of, or fetches, a collection its principal may not
/// read (PROTOCOL.md §15). Unsubscribed but readable collections may be
/// compared: a subscription narrows pages and roots only.
pub(crate) fn check_readable(scope: &Scope, req: &SyncRequest) -> Result<(), Violation> {
    let compared = match &req.verify {
        None | Some(tide_core::Verify::Roots) => None,
        Some(
            tide_core::Verify::Groups { collection }
            | tide_core::Verify::Buckets { collection, .. }
            | tide_core::Verify::Keys { collection, .. },
        ) => Some(collection),
    };
    let fetched = req.fetch.iter().map(|k| &k.0);
    match compared.into_iter().chain(fetched).find(|c| !scope.readable.contains(c)) {
        None => Ok(()),
        Some(c) => Err(Violation::new(ErrorCode::Forbidden, format!("collection {c:?} is not readable here"))),
    }
}

/// Leaves out of `verify`'s roots the collections outside `scope` (`None`: all).
pub(crate) fn roots_in_scope(verify: &mut VerifyReply, scope: Option<&[String]>) {
    if let (Some(roots), Some(scope)) = (&mut verify.roots, scope) {
        roots.retain(|c, _| scope.contains(c));
    }
}

/// What is stored for a key, as deciding a write needs it.
#[derive(Debug, Clone)]
pub(crate) struct Current<'a> {
    pub(crate) stamp: Stamp,
    /// The version hash of a live version; `None` for a tombstone.
    pub(crate) hash: Option<Hash64>,
    /// The document text, when read (a stored version's is read only for
    /// a write that carries its stamp).
    pub(crate) doc: Option<Cow<'a, str>>,
    /// The horizon when the key's incarnation began (PROTOCOL.md §14).
    pub(crate) born: u64,
}

/// One op of a group as the backends decide it: its document's text (the
/// canonical text every tide replica stores and hashes, kept as it arrived,
/// or as a [`Validator`] rewrote it), its version hash, and a validator's
/// refusal.
pub(crate) struct Incoming<'a> {
    pub(crate) op: &'a tide_core::Op,
    pub(crate) doc: Option<Cow<'a, str>>,
    pub(crate) hash: Option<Hash64>,
    pub(crate) refused: Option<(ErrorCode, String)>,
    /// The seq of the version the op was edited from (PROTOCOL.md §14).
    pub(crate) base: Option<u64>,
}

impl<'a> Incoming<'a> {
    fn new(op: &'a tide_core::Op) -> Self {
        Self::with_doc(op, digest::doc_text(&op.payload).map(Cow::Borrowed), None)
    }

    /// The ops of a request as `policy` judges them, with their bases.
    pub(crate) fn of_request(p: &'a Pending, policy: &Policy) -> Vec<Self> {
        let bases = &p.request.bases;
        let ops = p.request.ops.iter().enumerate();
        ops.map(|(i, op)| Self { base: bases.get(i).copied().flatten(), ..Self::judged(op, &p.principal, policy) })
            .collect()
    }

    /// The op as `policy` judges it for `principal`: its access rules
    /// first, then its validator.
    fn judged(op: &'a tide_core::Op, principal: &Principal, policy: &Policy) -> Self {
        if let Some(Err(reason)) = policy.rules().map(|r| r.may_write(principal, op)) {
            return Self::with_doc(op, None, Some((ErrorCode::Forbidden, reason)));
        }
        match policy.validator.get().map(|v| v.validate(principal, op)) {
            None | Some(Verdict::Accept) => Self::new(op),
            Some(Verdict::Reject(message)) => Self::with_doc(op, None, Some((ErrorCode::ValidationFailed, message))),
            Some(Verdict::Rewrite(doc)) => match op.payload {
                Payload::Put(_) => Self::with_doc(op, Some(Cow::Owned(doc.as_str().to_owned())), None),
                // A delete has no document to rewrite.
                Payload::Delete => Self::new(op),
            },
        }
    }

    fn with_doc(op: &'a tide_core::Op, doc: Option<Cow<'a, str>>, refused: Option<(ErrorCode, String)>) -> Self {
        let hash = doc.as_deref().map(|d| digest::version_hash(&op.collection, &op.id, &op.stamp, Some(d)));
        Self { op, doc, hash, refused, base: None }
    }

    /// The version this op writes, to decide later ops of the group against.
    pub(crate) fn current(&self, born: u64) -> Current<'_> {
        Current { stamp: self.op.stamp.clone(), hash: self.hash, doc: self.doc.as_deref().map(Cow::Borrowed), born }
    }

    /// The version hash stored with this op's version: of its document, or
    /// of the tombstone.
    pub(crate) fn stored_hash(&self) -> i64 {
        let op = self.op;
        self.hash.unwrap_or_else(|| digest::version_hash(&op.collection, &op.id, &op.stamp, None)).to_i64()
    }

    /// The stored rendering of this op's version, up to `"seq":`.
    pub(crate) fn prefix(&self) -> String {
        let op = self.op;
        render_prefix(&op.collection, &op.id, self.doc.as_deref(), op.stamp.lamport, &op.stamp.node_id)
    }
}

/// [`tide_core::decide`] against a stored version known by its stamp,
/// hash and (for an equal stamp) document text.
pub(crate) fn decide_current(current: Option<&Current<'_>>, incoming: &Incoming<'_>) -> Decision {
    let Some(stored) = current else { return Decision::Apply };
    match incoming.op.stamp.cmp(&stored.stamp) {
        std::cmp::Ordering::Greater => Decision::Apply,
        std::cmp::Ordering::Less => Decision::Superseded,
        std::cmp::Ordering::Equal => {
            let same = match (&stored.doc, &incoming.doc.as_deref(), stored.hash) {
                (_, None, None) => true,
                (Some(stored), Some(doc), Some(_)) => stored.as_ref() == *doc,
                // A stored document not read: its hash tells.
                (None, Some(_), Some(hash)) => incoming.hash == Some(hash),
                _ => false,
            };
            if same { Decision::Duplicate } else { Decision::Collision }
        }
    }
}

/// Decides a request's ops in order against `current` (updated as ops
/// apply), numbering applied ops from `seq`: the results; per written key
/// the group-wide index (`first` + position) of its last applied op and
/// that op's seq and its key's incarnation start (`born`) go to
/// `written`. A put edited from a version whose key's delete went past
/// `horizon` is answered `deleted` (PROTOCOL.md §14).
pub(crate) fn decide_request<'a>(
    (namespace, horizon): (&'a str, &Horizon),
    incoming: &'a [Incoming<'a>],
    current: &mut HashMap<GroupKey<'a>, Current<'a>>,
    written: &mut HashMap<GroupKey<'a>, Written>,
    first: usize,
    seq: &mut u64,
) -> Vec<OpResult> {
    let mut results = Vec::with_capacity(incoming.len());
    for (i, inc) in incoming.iter().enumerate() {
        if let Some((code, message)) = &inc.refused {
            results.push(OpResult::Rejected { code: *code, message: message.clone() });
            continue;
        }
        let key = (namespace, inc.op.collection.as_str(), inc.op.id.as_str());
        let born = current.get(&key).map(|c| c.born);
        if inc.doc.is_some() && horizon.deleted(inc.base, &inc.op.stamp, born) {
            results.push(OpResult::Deleted);
            continue;
        }
        let decision = decide_current(current.get(&key), inc);
        if decision == Decision::Apply {
            *seq += 1;
            let born = born.unwrap_or(horizon.seq);
            current.insert(key, inc.current(born));
            written.insert(key, (first + i, *seq, born));
        }
        let winner = current.get(&key).map(|c| &c.stamp);
        results.push(tide_core::model::op_result(decision, inc.op, winner, *seq));
    }
    results
}

/// A key a group wrote: the group-wide index of its last applied op, that
/// op's seq, and the key's incarnation start.
pub(crate) type Written = (usize, u64, u64);

/// A stored version as a write group's read returns it: the op's place in
/// the group, lamport, node id, deleted (as each database spells it), hash,
/// rendering (for an op with its stamp), incarnation start.
pub(crate) type StoredRow<D> = (usize, u64, String, D, i64, Option<String>, u64);

/// A request waiting for the next write group.
pub(crate) struct Pending {
    pub(crate) principal: Principal,
    pub(crate) request: Arc<SyncRequest>,
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<Vec<OpResult>, BackendError>>,
}

/// A node id of a write group: its principal and, when a request carries
/// a link, its chain (PROTOCOL.md §13), moved on by accepted links.
pub(crate) struct Node {
    pub(crate) principal: String,
    pub(crate) chain: Option<tide_core::Chain>,
    pub(crate) moved: bool,
}

/// A node binding as read: its place in the list asked for, principal, chain.
pub(crate) type NodeRow = (usize, String, Option<String>, Option<String>, Option<u64>);

/// Whether a request of a group may write: its node id is its principal's,
/// its counters are within the lead, and its link continues the chain
/// (which it then moves on).
pub(crate) fn admit(p: &Pending, node: &mut Node, lamport_max: u64, lead_max: u64) -> Result<(), BackendError> {
    if node.principal != p.principal.id {
        return Err(foreign_node(&p.request.node_id));
    }
    check_lead(&p.request, lamport_max, lead_max)?;
    if let Some(lineage) = &p.request.lineage {
        if !lineage.continues(node.chain.as_ref()) {
            return Err(tide_core::Lineage::conflict(&p.request.node_id).into());
        }
        node.chain = Some(lineage.advance(node.chain.as_ref()));
        node.moved = true;
    }
    Ok(())
}

/// A key of a write group: namespace, collection, id.
pub(crate) type GroupKey<'a> = (&'a str, &'a str, &'a str);

/// Most requests one write transaction takes (group commit): requests that
/// arrive while a group commits wait for the next one.
pub const WRITE_GROUP_REQUESTS_MAX: usize = 64;

/// Most requests waiting for a writer (per namespace on PostgreSQL); past
/// it a request waits to be queued. Each connection has at most one request
/// in flight, so with the default connection cap this is rarely reached.
pub const WRITE_QUEUE_REQUESTS_MAX: usize = 4_096;

/// The server database schema this build reads and writes, as stored under
/// `schema_version` in `tide_server_meta` by both backends. Version 2 adds
/// the digest table, each row's bucket, and the node ids' principals;
/// version 3 stores each version pre-rendered with its hash and size;
/// version 4 gives each namespace its tombstone horizon.
pub(crate) const SCHEMA_VERSION: &str = "4";

/// The statement that reads the stored schema version, the same on both backends.
pub(crate) const SELECT_SCHEMA_VERSION: &str = "SELECT value FROM tide_server_meta WHERE key = 'schema_version'";

/// The schema version a database is at (1 to [`SCHEMA_VERSION`]);
/// refuses one whose schema this build does not know.
pub(crate) fn check_schema_version(found: &str) -> Result<u8, BackendError> {
    if let Some(v) = ["1", "2", "3", "4"].iter().position(|v| *v == found) {
        Ok(u8::try_from(v + 1).expect("four versions"))
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

/// Renders a version as `serde_json` renders a `tide_core::Change`, up to
/// and including `"seq":`: the stored form, completed at read time by the
/// seq and `}` (so a version's seq can change without re-rendering it).
pub(crate) fn render_prefix(collection: &str, id: &str, doc: Option<&str>, lamport: u64, node_id: &str) -> String {
    let mut out = String::with_capacity(64 + collection.len() + id.len() + doc.map_or(4, str::len) + node_id.len());
    out.push_str(r#"{"collection":"#);
    push_quoted(&mut out, collection);
    out.push_str(r#","id":"#);
    push_quoted(&mut out, id);
    out.push_str(if doc.is_some() { r#","kind":"put","doc":"# } else { r#","kind":"delete","doc":"# });
    out.push_str(doc.unwrap_or("null"));
    out.push_str(r#","lamport":"#);
    out.push_str(itoa::Buffer::new().format(lamport));
    out.push_str(r#","node_id":"#);
    push_quoted(&mut out, node_id);
    out.push_str(r#","seq":"#);
    out
}

/// The length of a stored rendering once its seq and `}` are added.
pub(crate) fn rendered_len(prefix: &str, seq: u64) -> u64 {
    (prefix.len() + itoa::Buffer::new().format(seq).len() + 1) as u64
}

/// Appends `s` as a JSON string, escaped exactly as serde renders it.
fn push_quoted(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("strings serialize"));
}

/// The document text inside a stored rendering (rare: only when a write
/// comes with the stored version's own stamp and must be compared).
pub(crate) fn prefix_doc(prefix: &str) -> Result<Option<String>, BackendError> {
    #[derive(serde::Deserialize)]
    struct Stored<'a> {
        #[serde(borrow)]
        doc: Option<&'a serde_json::value::RawValue>,
    }
    let text = format!("{prefix}0}}");
    let stored: Stored<'_> =
        serde_json::from_str(&text).map_err(|e| BackendError::Internal(format!("stored change: {e}")))?;
    Ok(stored.doc.map(|d| d.get().to_owned()).filter(|d| d != "null"))
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
    pub(crate) id: String,
    pub(crate) lamport: u64,
    pub(crate) node_id: String,
    /// The version hash (of the tombstone for a delete).
    pub(crate) hash: Hash64,
    pub(crate) live: bool,
    /// The stored rendering, up to `"seq":`.
    pub(crate) prefix: String,
    pub(crate) seq: u64,
}

impl StoredVersion {
    fn render(&self) -> String {
        format!("{}{}}}", self.prefix, self.seq)
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
        let server = (stamp, v.hash, v.live);
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

/// One collection's logged bucket deltas, folded into its group and bucket
/// rows: `(level, index, delta)`, combined, non-zero. A fold takes up to
/// [`DIGEST_LOG_ROWS_MAX`] rows, so it XORs into a table of every bucket
/// rather than a map (no key comparisons).
pub(crate) fn fold_collection(logged: impl IntoIterator<Item = (i64, i64)>) -> Vec<(i16, i32, i64)> {
    let mut buckets = vec![0i64; digest::BUCKETS as usize];
    for (bucket, delta) in logged {
        if let Some(slot) = usize::try_from(bucket).ok().and_then(|b| buckets.get_mut(b)) {
            *slot ^= delta;
        }
    }
    let mut groups = vec![0i64; (digest::BUCKETS / digest::GROUP_BUCKETS) as usize];
    let mut folded = Vec::new();
    for ((slot, bucket), delta) in (0usize..).zip(0i32..).zip(&buckets) {
        if *delta != 0 {
            groups[slot >> 8] ^= delta;
            folded.push((2, bucket, *delta));
        }
    }
    folded.extend((0i32..).zip(&groups).filter(|(_, h)| **h != 0).map(|(g, h)| (1, g, *h)));
    folded
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
/// process has read or written it (`None`: known to be unbound, which only
/// a backend that alone binds node ids may remember).
#[derive(Default)]
pub(crate) struct Bindings(std::sync::Mutex<HashMap<(String, String), Option<String>>>);

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Option<String>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The principal `node_id` is bound to in `namespace`, if known here.
    pub(crate) fn get(&self, namespace: &str, node_id: &str) -> Option<String> {
        self.lock().get(&(namespace.to_owned(), node_id.to_owned())).cloned().flatten()
    }

    /// Whether this process knows if `node_id` is bound.
    pub(crate) fn known(&self, namespace: &str, node_id: &str) -> bool {
        self.lock().contains_key(&(namespace.to_owned(), node_id.to_owned()))
    }

    /// Remembers that `node_id` is not bound yet (until a write binds it).
    pub(crate) fn remember_unbound(&self, namespace: &str, node_id: &str) {
        let mut map = self.lock();
        if map.len() >= NODE_BINDINGS_CACHED_MAX {
            map.clear();
        }
        map.entry((namespace.to_owned(), node_id.to_owned())).or_insert(None);
    }

    /// Remembers bindings read from or written to the database.
    pub(crate) fn remember(&self, bound: impl IntoIterator<Item = (String, String, String)>) {
        let mut map = self.lock();
        for (namespace, node_id, principal) in bound {
            if map.len() >= NODE_BINDINGS_CACHED_MAX {
                map.clear();
            }
            map.insert((namespace, node_id), Some(principal));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// The fold of a collection's log is the XOR of its deltas per bucket
    /// and per group, zeros left out.
    #[test]
    fn a_fold_combines_deltas_per_bucket_and_group() {
        let logged = [(5, 0b1010), (5, 0b0110), (300, 7), (301, 1), (65_535, -1), (9, 3), (9, 3)];
        let mut expected = BTreeMap::new();
        for (bucket, delta) in logged {
            *expected.entry((2, i32::try_from(bucket).unwrap())).or_insert(0i64) ^= delta;
            *expected.entry((1, i32::try_from(bucket >> 8).unwrap())).or_insert(0i64) ^= delta;
        }
        expected.retain(|_, h| *h != 0);
        let folded: BTreeMap<(i16, i32), i64> =
            super::fold_collection(logged).into_iter().map(|(l, i, h)| ((l, i), h)).collect();
        assert_eq!(folded, expected);
        assert!(!folded.contains_key(&(2, 9)), "deltas that cancel leave no row");
    }
}
