//! The wire types of `POST /sync`, section by section as in PROTOCOL.md.
//!
//! Changing a type here means changing PROTOCOL.md in the same commit.
//! Every message the original Python tide 0.2.1 produces decodes, and the
//! messages it produces re-encode to the same bytes (see the golden tests).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::Stamp;
use crate::digest::Hash64;

/// The protocol version this crate speaks (PROTOCOL.md §1). A request
/// without a `protocol` field is version 0, the original 0.2.1 protocol.
pub const PROTOCOL_VERSION: u32 = 1;

pub use crate::doc::Doc;

// ---------------------------------------------------------------------------
// §2 Request

/// One sync exchange from a client: its pending ops and where it is in the
/// server's change stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The sending node's id. Every op must carry it.
    pub node_id: String,
    /// The cursor from the last response; `None` (null, missing or `""` on
    /// the wire) asks for everything.
    #[serde(default, deserialize_with = "de_optional_cursor")]
    pub cursor: Option<Cursor>,
    /// Pending writes, oldest first.
    #[serde(default)]
    pub ops: Vec<Op>,
    /// Extension: the protocol version the client speaks; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// Extension: the most changes the client wants in the response; the
    /// server may send fewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Extension: how long the server may hold the request when it has
    /// nothing to send (long-poll), on the wire as `wait_ms`.
    #[serde(default, rename = "wait_ms", skip_serializing_if = "Option::is_none", with = "duration_ms")]
    pub wait: Option<Duration>,
    /// Extension: an id for this exchange that the server echoes in its
    /// response, so a replayed response cannot settle ops it does not
    /// describe (§4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Extension: the ops are a repair (§12): versions this client holds
    /// with their original stamps, which may name other nodes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub repair: bool,
    /// Extension: the digests the client asks for (§12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Extension: keys whose stored versions the client asks for (§12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetch: Vec<DocKey>,
    /// Extension: the link of this write exchange in the node's chain of
    /// exchanges, by which the server tells two copies of one store apart (§13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// Extension: tombstones at or below this seq may be left out of the
    /// page: the client held nothing when its sync began at that head of
    /// the namespace (§4.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_below: Option<u64>,
    /// Extension: per op, in order, the seq of the stored version its
    /// document was edited from (`null` for a new document or a delete);
    /// empty, or as long as `ops` (§14). A request-level list, not an op
    /// field, because the original server refuses unknown op fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<Option<u64>>,
    /// Extension: the namespace's head when the client last began from the
    /// beginning after a `resync` (§14): the horizon passing its cursor
    /// matters only once it passes this too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_head: Option<u64>,
    /// Extension: the collections this request's page and digests cover
    /// (the client's subscription, §15); absent for every collection the
    /// principal may read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<Vec<String>>,
}

/// A write exchange's link in its node's chain (§13): the token of the
/// node's last successful write exchange, a fresh one for this, and this
/// exchange's height in the chain (the first is 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The token sent with the node's last write exchange that succeeded;
    /// `None` before the first.
    pub prev: Option<String>,
    /// A fresh token for this exchange.
    pub next: String,
    /// How many write exchanges of this node succeeded before, plus one.
    pub height: u64,
}

/// A node's chain as the server keeps it (§13).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The token of the last accepted link.
    pub last: String,
    /// The `prev` that link was accepted from (`""` for none).
    pub before: String,
    /// The height of the last accepted link.
    pub height: u64,
}

impl Lineage {
    /// Whether this link may follow `chain`: it continues from the last
    /// link, or again from the one before (a retry after a lost response),
    /// or it comes from at least as high as the server's chain (the server
    /// went back to a backup, which may even hold a link whose response was
    /// lost). Only a store that is behind its node's chain is refused: a
    /// copy that another copy has overtaken. A node with no chain yet may
    /// start anywhere.
    pub fn continues(&self, chain: Option<&Chain>) -> bool {
        let prev = self.prev.as_deref().unwrap_or("");
        chain.is_none_or(|c| prev == c.last || prev == c.before || self.height.saturating_sub(1) >= c.height)
    }

    /// The chain after this link is accepted.
    pub fn advance(&self, chain: Option<&Chain>) -> Chain {
        let prev = self.prev.as_deref().unwrap_or("");
        let before = match chain {
            Some(c) if prev != c.last && prev == c.before => c.before.clone(),
            _ => prev.to_owned(),
        };
        Chain { last: self.next.clone(), before, height: self.height }
    }

    /// The refusal of a link that does not continue `node_id`'s chain.
    pub fn conflict(node_id: &str) -> Violation {
        Violation::new(
            ErrorCode::NodeIdConflict,
            format!("node id {node_id:?} is written by two stores; re-key and retry"),
        )
    }
}

/// A document's key on the wire: `[collection, id]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocKey(pub String, pub String);

/// One version a client holds, as it reports it when comparing keys
/// (§12): `[id, lamport, node_id, live, hash]`, `hash` its version hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVersion(pub String, pub u64, pub String, pub bool, pub Hash64);

/// Which digests a client asks for (§12), one level at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verify {
    /// The root digest of every collection; answered only when the
    /// response has no changes, no more to come and no reset, so the
    /// client holds everything the server does.
    Roots,
    /// The group digests of one collection.
    Groups {
        /// The collection.
        collection: String,
    },
    /// The bucket digests of one collection within some groups.
    Buckets {
        /// The collection.
        collection: String,
        /// The groups to expand.
        groups: Vec<u16>,
    },
    /// Compare the versions of every key in some buckets: the client says
    /// what it holds; the server sends what the client lacks or holds
    /// older (`fetched`) and names what it wants back (`wanted`).
    Keys {
        /// The collection.
        collection: String,
        /// The buckets compared.
        buckets: Vec<u16>,
        /// Every version the client holds in those buckets, tombstones included.
        have: Vec<HeldVersion>,
    },
}

impl SyncRequest {
    /// A version-1 request with no ops, no limit and no wait.
    pub fn new(node_id: impl Into<String>, cursor: Option<Cursor>) -> Self {
        Self {
            node_id: node_id.into(),
            cursor,
            ops: Vec::new(),
            protocol: Some(PROTOCOL_VERSION),
            limit: None,
            wait: None,
            request_id: None,
            repair: false,
            verify: None,
            fetch: Vec::new(),
            lineage: None,
            live_below: None,
            bases: Vec::new(),
            from_head: None,
            collections: None,
        }
    }

    /// Whether a server may read this request's page while it applies its
    /// ops (PROTOCOL.md §4.2): it has ops, its cursor is past the start (so
    /// its own writes are never echoed to it), and it asks nothing whose
    /// answer must count them: no `verify` or `fetch`, no namespace head
    /// (`live_below`, `from_head`, sent only while a client has no op).
    pub fn page_beside_ops(&self) -> bool {
        !self.ops.is_empty()
            && self.cursor.unwrap_or_default() > Cursor::START
            && self.verify.is_none()
            && self.fetch.is_empty()
            && self.live_below.is_none()
            && self.from_head.is_none()
    }

    /// The cursor of a page read beside this request's ops that ended the
    /// log at `cursor` (PROTOCOL.md §4.2), given the ops' `results`: past
    /// the request's own writes when they are all that came after it, as
    /// a page read after them would say; else `cursor`, and the next page
    /// passes over them.
    pub fn cursor_past_own(&self, cursor: Cursor, results: &[OpResult]) -> Cursor {
        let mut last = cursor.seq();
        for (op, result) in self.ops.iter().zip(results) {
            if let OpResult::Applied { seq } = *result {
                if seq != last + 1 || op.stamp.node_id != self.node_id {
                    return cursor;
                }
                last = seq;
            }
        }
        Cursor(last)
    }

    /// Decodes a request body, mapping every failure to a [`Violation`] with
    /// the right code.
    pub fn from_json(body: &[u8]) -> Result<Self, Violation> {
        serde_json::from_slice(body).map_err(|e| {
            // A shape error may hide a syntax error later in the body, or
            // nesting past the limit inside a document (which is kept as
            // text, so only this full parse sees its depth); the caller
            // deserves to hear that the body is not JSON at all.
            match serde_json::from_slice::<serde_json::Value>(body) {
                Err(syntax) => Violation::from_json_error(&syntax),
                Ok(_) => Violation::from_json_error(&e),
            }
        })
    }
}

// ---------------------------------------------------------------------------
// §3 Op

/// What a write does to its document.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Insert or replace the whole document (`kind: "put"`).
    Put(Doc),
    /// Delete the document, leaving a tombstone (`kind: "delete"`, `doc: null`).
    Delete,
}

impl Payload {
    /// The document, unless this is a delete.
    pub fn doc(&self) -> Option<&Doc> {
        match self {
            Self::Put(doc) => Some(doc),
            Self::Delete => None,
        }
    }

    /// The wire `kind`.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Put(_) => Kind::Put,
            Self::Delete => Kind::Delete,
        }
    }
}

/// The wire `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `"put"`
    Put,
    /// `"delete"`
    Delete,
}

/// A client's write, sent to the server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "OpWire")]
pub struct Op {
    /// The collection the document belongs to.
    pub collection: String,
    /// The document id, unique within its collection.
    pub id: String,
    /// The write's stamp; `stamp.node_id` must equal the request's `node_id`.
    pub stamp: Stamp,
    /// What the write does.
    pub payload: Payload,
    /// An optional client-chosen id for diagnostics; empty is the same as absent.
    pub op_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpWire {
    collection: String,
    id: String,
    kind: Kind,
    #[serde(default)]
    doc: Option<Box<serde_json::value::RawValue>>,
    lamport: u64,
    node_id: String,
    #[serde(default)]
    op_id: Option<String>,
}

impl TryFrom<OpWire> for Op {
    type Error = String;

    fn try_from(w: OpWire) -> Result<Self, String> {
        Ok(Self {
            payload: payload_from_wire(w.kind, w.doc)?,
            collection: w.collection,
            id: w.id,
            stamp: Stamp::new(w.lamport, w.node_id),
            op_id: w.op_id.filter(|s| !s.is_empty()),
        })
    }
}

fn payload_from_wire(kind: Kind, doc: Option<Box<serde_json::value::RawValue>>) -> Result<Payload, String> {
    match (kind, doc) {
        (Kind::Put, Some(doc)) if doc.get().starts_with('{') => {
            Doc::from_raw(doc).map(Payload::Put).map_err(|e| e.to_string())
        }
        (Kind::Put, None) => Err("a put must carry a JSON object `doc`, found null".into()),
        (Kind::Put, Some(other)) => {
            Err(format!("a put must carry a JSON object `doc`, found {}", crate::doc::found(other.get())))
        }
        (Kind::Delete, None) => Ok(Payload::Delete),
        (Kind::Delete, Some(_)) => Err("a delete must carry `doc: null`".into()),
    }
}

/// Writes the flat fields shared by ops and changes, in the original's order.
fn serialize_write<S: Serializer>(
    s: S,
    name: &'static str,
    fields: usize,
    collection: &str,
    id: &str,
    stamp: &Stamp,
    payload: &Payload,
) -> Result<S::SerializeStruct, S::Error> {
    let mut st = s.serialize_struct(name, fields)?;
    st.serialize_field("collection", collection)?;
    st.serialize_field("id", id)?;
    st.serialize_field("kind", &payload.kind())?;
    st.serialize_field("doc", &payload.doc())?;
    st.serialize_field("lamport", &stamp.lamport)?;
    st.serialize_field("node_id", &stamp.node_id)?;
    Ok(st)
}

impl Serialize for Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = 6 + usize::from(self.op_id.is_some());
        let mut st = serialize_write(s, "Op", fields, &self.collection, &self.id, &self.stamp, &self.payload)?;
        if let Some(op_id) = &self.op_id {
            st.serialize_field("op_id", op_id)?;
        }
        st.end()
    }
}

// ---------------------------------------------------------------------------
// §4 Response

/// The server's answer to one exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The cursor to send next time.
    #[serde(deserialize_with = "de_cursor")]
    pub cursor: Cursor,
    /// Changes after the request's cursor, in ascending `seq`.
    #[serde(default)]
    pub changes: Vec<Change>,
    /// Extension: the protocol version the server speaks; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// Extension: one result per op of the request, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<OpResult>,
    /// Extension: more changes are waiting after `cursor`; ask again at once.
    #[serde(default, skip_serializing_if = "is_false")]
    pub has_more: bool,
    /// Extension: the request's cursor was ahead of anything this server has
    /// issued (its state was lost or replaced), so `changes` start from the
    /// beginning.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset: bool,
    /// Extension: the namespace's head (its highest seq) when the page was
    /// read, answered to a request with `live_below` (§4.1) and with `resync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// Extension: the namespace's tombstone horizon (§14): tombstones at or
    /// below it may be gone. Absent before any was collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<u64>,
    /// Extension: the request's cursor is below the horizon, so it may have
    /// missed deletes the server no longer remembers: `changes` start from
    /// the beginning, and the client begins again from there (§14).
    #[serde(default, skip_serializing_if = "is_false")]
    pub resync: bool,
    /// Extension: the collections the principal may read, when its access
    /// rules limit them (§15); absent when it may read every collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readable: Option<Vec<String>>,
    /// Extension: the request's `request_id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Extension: the root digest of every collection with live documents,
    /// when asked for and the response is otherwise empty (§12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots: Option<BTreeMap<String, Hash64>>,
    /// Extension: the non-zero group digests asked for, in order (§12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<(u16, Hash64)>>,
    /// Extension: the non-zero bucket digests asked for, in order (§12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<(u16, Hash64)>>,
    /// Extension: stored versions the client asked for or lacks (§12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetched: Vec<Change>,
    /// Extension: ids of the compared collection whose versions the client
    /// holds newer, or the server lacks: push them back as a repair (§12).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wanted: Vec<String>,
}

impl SyncResponse {
    /// A version-1 response with only a cursor.
    pub fn new(cursor: Cursor) -> Self {
        Self {
            cursor,
            changes: Vec::new(),
            protocol: Some(PROTOCOL_VERSION),
            results: Vec::new(),
            has_more: false,
            reset: false,
            head: None,
            horizon: None,
            resync: false,
            readable: None,
            request_id: None,
            roots: None,
            groups: None,
            buckets: None,
            fetched: Vec::new(),
            wanted: Vec::new(),
        }
    }
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------
// §5 Change

/// A stored version of a document, sent from the server to clients.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "ChangeWire")]
pub struct Change {
    /// The collection the document belongs to.
    pub collection: String,
    /// The document id.
    pub id: String,
    /// The stamp of the write that produced this version.
    pub stamp: Stamp,
    /// The document, or its deletion.
    pub payload: Payload,
    /// The server's sequence number for this version.
    pub seq: u64,
}

#[derive(Deserialize)]
struct ChangeWire {
    collection: String,
    id: String,
    kind: Kind,
    #[serde(default)]
    doc: Option<Box<serde_json::value::RawValue>>,
    lamport: u64,
    node_id: String,
    seq: u64,
}

impl TryFrom<ChangeWire> for Change {
    type Error = String;

    fn try_from(w: ChangeWire) -> Result<Self, String> {
        Ok(Self {
            payload: payload_from_wire(w.kind, w.doc)?,
            collection: w.collection,
            id: w.id,
            stamp: Stamp::new(w.lamport, w.node_id),
            seq: w.seq,
        })
    }
}

impl Serialize for Change {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = serialize_write(s, "Change", 7, &self.collection, &self.id, &self.stamp, &self.payload)?;
        st.serialize_field("seq", &self.seq)?;
        st.end()
    }
}

// ---------------------------------------------------------------------------
// §6 Per-op results

/// What the server did with one op. Every variant but `Rejected` is an
/// acknowledgement: the client removes the op from its outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OpResult {
    /// Stored, as the version with this `seq`.
    Applied {
        /// The seq the op was stored under.
        seq: u64,
    },
    /// Already stored with the same stamp and payload (a retry).
    Duplicate,
    /// A higher stamp was already stored; the op lost, which is not an error.
    Superseded {
        /// The winning stamp's counter.
        lamport: u64,
        /// The winning stamp's node id.
        node_id: String,
    },
    /// A put edited from a version whose key was since deleted, that
    /// delete collected past the horizon (§14): the document is gone and
    /// the op is dropped, like a superseded one. Only sent for an op with
    /// a `base`.
    Deleted,
    /// Refused for good; retrying the same op cannot help.
    Rejected {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// A status this version does not know: not an acknowledgement (§6).
    #[serde(other)]
    Unknown,
}

impl OpResult {
    /// Whether the op may leave the client's outbox.
    pub fn is_ack(&self) -> bool {
        !matches!(self, Self::Rejected { .. } | Self::Unknown)
    }
}

// ---------------------------------------------------------------------------
// §7 Errors

/// The body of every non-2xx response. `error` is the human text, prefixed
/// as the original server did (`"invalid JSON"`, `"bad request: …"`), so old
/// clients show something sensible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable description.
    pub error: String,
    /// Extension: machine-readable code; absent from the original server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Extension: the index of the offending op in the request, when one op
    /// caused the refusal, so a client can set it aside and retry the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<usize>,
}

/// Machine-readable error codes (PROTOCOL.md §7). A code this version does
/// not know decodes as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not JSON, or nests deeper than 128 levels.
    InvalidJson,
    /// The JSON has the wrong shape: a missing field, a wrong type, an
    /// unknown `kind`, a put without a doc, a non-numeric cursor.
    InvalidRequest,
    /// A collection name is empty, too long, or holds `/` or a control character.
    InvalidCollection,
    /// A document id is empty, too long, or holds a control character.
    InvalidId,
    /// A node id is empty, too long, or holds a control character.
    InvalidNodeId,
    /// An op's `node_id` differs from the request's `node_id`.
    ForeignNodeId,
    /// A counter is above 2^53 − 1 or too far ahead of the highest the server has seen.
    LamportOutOfRange,
    /// A document is larger than the server accepts.
    DocTooLarge,
    /// A request carries more ops than the server accepts.
    TooManyOps,
    /// A request body is larger than the server accepts.
    BodyTooLarge,
    /// The request's `protocol` is newer than the server speaks.
    UnsupportedProtocol,
    /// Per-op: the same stamp is stored with a different payload (two
    /// writers share a node id).
    StampCollision,
    /// The request's lineage does not continue its node's chain: two
    /// copies of one store write under one node id (§13). The client
    /// re-keys (takes a new node id) and retries.
    NodeIdConflict,
    /// Per-op: the server's validation (an embedding application's rule)
    /// refused the op; the message says why.
    ValidationFailed,
    /// No valid credentials.
    Unauthorized,
    /// The credentials have expired: retry at once with fresh ones.
    TokenExpired,
    /// The credentials do not allow this (another namespace, another principal's node id).
    Forbidden,
    /// No such path.
    NotFound,
    /// The method is not POST.
    MethodNotAllowed,
    /// The request was not received in time.
    Timeout,
    /// Too many requests; honour `Retry-After`.
    RateLimited,
    /// The server cannot serve now (shutting down, database unreachable).
    Unavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status a server answers with for this code.
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::InvalidRequest
            | Self::InvalidCollection
            | Self::InvalidId
            | Self::InvalidNodeId
            | Self::ForeignNodeId
            | Self::LamportOutOfRange
            | Self::UnsupportedProtocol
            | Self::StampCollision
            | Self::Unknown => 400,
            Self::Unauthorized | Self::TokenExpired => 401,
            Self::Forbidden => 403,
            Self::NodeIdConflict => 409,
            Self::ValidationFailed => 422,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Timeout => 408,
            Self::DocTooLarge | Self::TooManyOps | Self::BodyTooLarge => 413,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    /// Whether sending the same request again later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Timeout | Self::RateLimited | Self::Unavailable | Self::Internal)
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidCollection => "invalid_collection",
            Self::InvalidId => "invalid_id",
            Self::InvalidNodeId => "invalid_node_id",
            Self::ForeignNodeId => "foreign_node_id",
            Self::LamportOutOfRange => "lamport_out_of_range",
            Self::DocTooLarge => "doc_too_large",
            Self::TooManyOps => "too_many_ops",
            Self::BodyTooLarge => "body_too_large",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::StampCollision => "stamp_collision",
            Self::NodeIdConflict => "node_id_conflict",
            Self::ValidationFailed => "validation_failed",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request is refused: a code, a message, and the offending op if one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Violation {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable detail, naming the field and the limit.
    pub message: String,
    /// The index of the offending op, if one op is to blame.
    pub op: Option<usize>,
}

impl Violation {
    /// A violation not tied to one op.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), op: None }
    }

    /// A violation caused by the op at `index`.
    #[must_use]
    pub fn at_op(mut self, index: usize) -> Self {
        self.op = Some(index);
        self
    }

    /// Maps a decoding error to `invalid_json` (not JSON, too deep) or
    /// `invalid_request` (JSON of the wrong shape).
    pub fn from_json_error(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Self::new(ErrorCode::InvalidRequest, e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => Self::new(ErrorCode::InvalidJson, e.to_string()),
        }
    }

    /// The response body for this violation.
    pub fn to_body(&self) -> ErrorBody {
        let error = match self.code {
            ErrorCode::InvalidJson => format!("invalid JSON: {}", self.message),
            _ => format!("bad request: {}", self.message),
        };
        ErrorBody { error, code: Some(self.code), op: self.op }
    }

    /// The HTTP status for this violation.
    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

// ---------------------------------------------------------------------------
// §8 Cursor

/// A position in the server's change stream: every change with a `seq` at
/// or below it has been delivered. On the wire a decimal string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(pub u64);

impl Cursor {
    /// The cursor before any change.
    pub const START: Self = Self(0);

    /// The highest seq this cursor covers.
    pub fn seq(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Cursor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

struct CursorVisitor;

impl<'de> Visitor<'de> for CursorVisitor {
    type Value = Option<Cursor>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cursor: a decimal string, a non-negative integer, or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Cursor(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v)
            .map(|v| Some(Cursor(v)))
            .map_err(|_| E::custom(format_args!("invalid cursor {v}: must not be negative")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Ok(None);
        }
        if !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(E::custom(format_args!("invalid cursor {v:?}: expected a decimal string")));
        }
        v.parse().map(|v| Some(Cursor(v))).map_err(|_| E::custom(format_args!("invalid cursor {v:?}: out of range")))
    }
}

fn de_optional_cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cursor>, D::Error> {
    d.deserialize_any(CursorVisitor)
}

fn de_cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Cursor, D::Error> {
    Ok(d.deserialize_any(CursorVisitor)?.unwrap_or(Cursor::START))
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[expect(clippy::ref_option, reason = "serde's `with` passes a reference")]
    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
