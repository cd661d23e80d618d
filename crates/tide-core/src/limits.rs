//! Every protocol limit, named in one place with its default, and the
//! validation of requests against them.

use std::io;
use std::time::Duration;

use crate::wire::{ErrorCode, Op, Payload, SyncRequest, Verify, Violation};
use crate::{LAMPORT_MAX, PROTOCOL_VERSION};

/// Default for [`Limits::request_bytes_max`]: 32 MiB.
pub const REQUEST_BYTES_MAX: usize = 32 << 20;
/// Default for [`Limits::ops_per_request_max`]: 1,000 (the original client sends at most 500).
pub const OPS_PER_REQUEST_MAX: usize = 1_000;
/// Default for [`Limits::doc_bytes_max`]: 1 MiB of JSON.
pub const DOC_BYTES_MAX: usize = 1 << 20;
/// Default for [`Limits::id_bytes_max`]: 512 bytes.
pub const ID_BYTES_MAX: usize = 512;
/// Default for [`Limits::collection_bytes_max`]: 128 bytes.
pub const COLLECTION_BYTES_MAX: usize = 128;
/// Default for [`Limits::node_id_bytes_max`]: 128 bytes.
pub const NODE_ID_BYTES_MAX: usize = 128;
/// Default for [`Limits::changes_per_response_max`]: 1,000 changes.
pub const CHANGES_PER_RESPONSE_MAX: usize = 1_000;
/// Default for [`Limits::response_bytes_max`]: 4 MiB of changes.
pub const RESPONSE_BYTES_MAX: usize = 4 << 20;
/// Default for [`Limits::lamport_lead_max`]: how far an op's counter may run
/// ahead of the highest counter the server has seen, 10^9.
pub const LAMPORT_LEAD_MAX: u64 = 1_000_000_000;
/// Default for [`Limits::wait_max`]: the longest a server holds a long-poll.
pub const WAIT_MAX: Duration = Duration::from_secs(30);
/// Most groups one bucket request may expand (PROTOCOL.md §12): all 256.
pub const VERIFY_GROUPS_MAX: usize = 256;
/// Most buckets one key comparison may name (PROTOCOL.md §12): 4,096. A
/// comparison reads the collection once, so fewer, larger ones are cheaper.
pub const VERIFY_BUCKETS_MAX: usize = 4_096;
/// Most keys one request may `fetch` (PROTOCOL.md §12): 1,000.
pub const FETCH_KEYS_MAX: usize = 1_000;
/// Most collections one request's subscription (`collections`, PROTOCOL.md
/// §15) may name: 1,024.
pub const SUBSCRIBED_COLLECTIONS_MAX: usize = 1_024;
/// The deepest JSON nesting any message may have (`serde_json`'s fixed limit).
pub const JSON_DEPTH_MAX: usize = 128;

/// The limits one server enforces. [`Limits::default`] never refuses what
/// the original 0.2.1 client sends in ordinary use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub request_bytes_max: usize,
    /// Most ops in one request.
    pub ops_per_request_max: usize,
    /// Largest document, as compact JSON, in bytes.
    pub doc_bytes_max: usize,
    /// Longest document id, in bytes.
    pub id_bytes_max: usize,
    /// Longest collection name, in bytes.
    pub collection_bytes_max: usize,
    /// Longest node id, in bytes.
    pub node_id_bytes_max: usize,
    /// Most changes in one response.
    pub changes_per_response_max: usize,
    /// Most bytes of changes in one response (a single larger change is
    /// still sent alone, so every exchange makes progress).
    pub response_bytes_max: usize,
    /// How far an op's counter may run ahead of the highest seen.
    pub lamport_lead_max: u64,
    /// The longest a request may be held waiting for changes.
    pub wait_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: REQUEST_BYTES_MAX,
            ops_per_request_max: OPS_PER_REQUEST_MAX,
            doc_bytes_max: DOC_BYTES_MAX,
            id_bytes_max: ID_BYTES_MAX,
            collection_bytes_max: COLLECTION_BYTES_MAX,
            node_id_bytes_max: NODE_ID_BYTES_MAX,
            changes_per_response_max: CHANGES_PER_RESPONSE_MAX,
            response_bytes_max: RESPONSE_BYTES_MAX,
            lamport_lead_max: LAMPORT_LEAD_MAX,
            wait_max: WAIT_MAX,
        }
    }
}

impl Limits {
    /// Checks everything about a request that does not depend on stored
    /// state: version, node id, op count, and every op's names, size, stamp
    /// range and node id. The first violation found is returned.
    pub fn check_request(&self, req: &SyncRequest) -> Result<(), Violation> {
        if let Some(v) = req.protocol.filter(|v| *v > PROTOCOL_VERSION) {
            return Err(Violation::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {v} is not supported; this server speaks 0..={PROTOCOL_VERSION}"),
            ));
        }
        check_name(&req.node_id, "node id", self.node_id_bytes_max, ErrorCode::InvalidNodeId)?;
        if req.ops.len() > self.ops_per_request_max {
            return Err(Violation::new(
                ErrorCode::TooManyOps,
                format!("{} ops in one request; the limit is {}", req.ops.len(), self.ops_per_request_max),
            ));
        }
        for (i, op) in req.ops.iter().enumerate() {
            // A repair carries versions with their original stamps (§12).
            let node_id = if req.repair { &op.stamp.node_id } else { &req.node_id };
            if req.repair {
                check_name(node_id, "node id", self.node_id_bytes_max, ErrorCode::InvalidNodeId)
                    .map_err(|v| v.at_op(i))?;
            }
            self.check_op(op, node_id).map_err(|v| v.at_op(i))?;
        }
        if !req.bases.is_empty() && req.bases.len() != req.ops.len() {
            return Err(Violation::new(
                ErrorCode::InvalidRequest,
                format!(
                    "{} bases for {} ops: `bases` is empty or has one entry per op",
                    req.bases.len(),
                    req.ops.len()
                ),
            ));
        }
        self.check_verify(req)
    }

    /// Checks the digest and fetch extensions of a request (§12).
    fn check_verify(&self, req: &SyncRequest) -> Result<(), Violation> {
        let too_many = |what: &str, n: usize, max: usize| {
            Violation::new(ErrorCode::InvalidRequest, format!("{n} {what} in one request; the limit is {max}"))
        };
        let subscribed = req.collections.as_deref().unwrap_or_default();
        if subscribed.len() > SUBSCRIBED_COLLECTIONS_MAX {
            return Err(too_many("subscribed collections", subscribed.len(), SUBSCRIBED_COLLECTIONS_MAX));
        }
        for collection in subscribed {
            self.check_collection(collection)?;
        }
        if req.fetch.len() > FETCH_KEYS_MAX {
            return Err(too_many("fetched keys", req.fetch.len(), FETCH_KEYS_MAX));
        }
        for key in &req.fetch {
            self.check_collection(&key.0)?;
            self.check_id(&key.1)?;
        }
        match &req.verify {
            None | Some(Verify::Roots) => Ok(()),
            Some(Verify::Groups { collection }) => self.check_collection(collection),
            Some(Verify::Buckets { collection, groups }) => {
                self.check_collection(collection)?;
                if groups.len() > VERIFY_GROUPS_MAX {
                    return Err(too_many("groups", groups.len(), VERIFY_GROUPS_MAX));
                }
                match groups.iter().find(|g| u32::from(**g) >= crate::digest::GROUP_BUCKETS) {
                    Some(g) => Err(Violation::new(ErrorCode::InvalidRequest, format!("group {g} is out of range"))),
                    None => Ok(()),
                }
            }
            Some(Verify::Keys { collection, buckets, have }) => {
                self.check_collection(collection)?;
                if buckets.len() > VERIFY_BUCKETS_MAX {
                    return Err(too_many("buckets", buckets.len(), VERIFY_BUCKETS_MAX));
                }
                for held in have {
                    self.check_id(&held.0)?;
                    check_name(&held.2, "node id", self.node_id_bytes_max, ErrorCode::InvalidNodeId)?;
                }
                Ok(())
            }
        }
    }

    /// Checks one op on its own (see [`Limits::check_request`]).
    pub fn check_op(&self, op: &Op, node_id: &str) -> Result<(), Violation> {
        self.check_collection(&op.collection)?;
        self.check_id(&op.id)?;
        if op.stamp.node_id != node_id {
            return Err(Violation::new(
                ErrorCode::ForeignNodeId,
                format!("op node id {:?} differs from the request's node id {node_id:?}", op.stamp.node_id),
            ));
        }
        if op.stamp.lamport > LAMPORT_MAX {
            return Err(Violation::new(
                ErrorCode::LamportOutOfRange,
                format!("lamport {} is above the maximum {LAMPORT_MAX}", op.stamp.lamport),
            ));
        }
        self.check_payload(&op.payload)
    }

    /// Checks a collection name: non-empty, at most
    /// [`Limits::collection_bytes_max`] bytes, no `/`, no control character.
    pub fn check_collection(&self, name: &str) -> Result<(), Violation> {
        check_name(name, "collection name", self.collection_bytes_max, ErrorCode::InvalidCollection)?;
        if name.contains('/') {
            return Err(Violation::new(
                ErrorCode::InvalidCollection,
                format!("collection name {name:?} must not contain '/'"),
            ));
        }
        Ok(())
    }

    /// Checks a document id: non-empty, at most [`Limits::id_bytes_max`]
    /// bytes, no control character.
    pub fn check_id(&self, id: &str) -> Result<(), Violation> {
        check_name(id, "document id", self.id_bytes_max, ErrorCode::InvalidId)
    }

    /// Checks a payload: a put's document is at most
    /// [`Limits::doc_bytes_max`] bytes of compact JSON.
    pub fn check_payload(&self, payload: &Payload) -> Result<(), Violation> {
        let Payload::Put(doc) = payload else {
            return Ok(());
        };
        let bytes = doc.len();
        if bytes > self.doc_bytes_max {
            return Err(Violation::new(
                ErrorCode::DocTooLarge,
                format!("document of {bytes} bytes; the limit is {}", self.doc_bytes_max),
            ));
        }
        Ok(())
    }
}

fn check_name(value: &str, what: &str, max: usize, code: ErrorCode) -> Result<(), Violation> {
    if value.is_empty() {
        return Err(Violation::new(code, format!("{what} must not be empty")));
    }
    if value.len() > max {
        return Err(Violation::new(code, format!("{what} of {} bytes; the limit is {max}", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(Violation::new(code, format!("{what} {value:?} must not contain control characters")));
    }
    Ok(())
}

/// The length of `value` encoded as compact JSON, without building the text.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing plain data into a counter cannot fail.
    serde_json::to_writer(&mut count, value).expect("serializing to a counter cannot fail");
    count.0
}
