//! Digests of the live documents a replica holds, for proving that two
//! replicas agree and narrowing down to the keys where they do not
//! (PROTOCOL.md §12).
//!
//! Every live version contributes one 64-bit hash of its key and stamp. A
//! key hashes to one of [`BUCKETS`] buckets; 256 buckets make a group, and
//! the groups of a collection make its root. Each level is the XOR of the
//! hashes below it, so a write changes exactly one bucket, one group and one
//! root by the same delta, and a store keeps all three levels up to date
//! with three small updates instead of ever scanning. Tombstones contribute
//! nothing: two replicas agree when they hold the same live versions, so
//! collecting a tombstone on either side never shows up as a difference.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::Stamp;

/// Buckets per collection (`2^16`): a key's bucket is the top 16 bits of
/// its key hash. At a million documents a bucket holds about 15 keys.
pub const BUCKETS: u32 = 1 << 16;
/// Buckets per group; groups per collection is the same number.
pub const GROUP_BUCKETS: u32 = 256;

/// A 64-bit digest, on the wire as 16 lowercase hex digits (JSON numbers
/// lose precision above 2^53 in many languages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash64(pub u64);

impl Hash64 {
    /// Whether this is the digest of nothing.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The value as stored in a signed 64-bit database column.
    #[expect(clippy::cast_possible_wrap, reason = "a bit-for-bit reinterpretation")]
    pub fn to_i64(self) -> i64 {
        self.0 as i64
    }

    /// The value read back from a signed 64-bit database column.
    #[expect(clippy::cast_sign_loss, reason = "a bit-for-bit reinterpretation")]
    pub fn from_i64(v: i64) -> Self {
        Self(v as u64)
    }
}

impl std::ops::BitXor for Hash64 {
    type Output = Self;
    fn bitxor(self, rhs: Self) -> Self {
        Self(self.0 ^ rhs.0)
    }
}

impl std::ops::BitXorAssign for Hash64 {
    fn bitxor_assign(&mut self, rhs: Self) {
        self.0 ^= rhs.0;
    }
}

impl fmt::Display for Hash64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Hash64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() != 16 {
            return Err(de::Error::custom(format_args!("digest {s:?}: expected 16 hex digits")));
        }
        u64::from_str_radix(&s, 16)
            .map(Self)
            .map_err(|_| de::Error::custom(format_args!("digest {s:?}: expected 16 hex digits")))
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// splitmix64's finalizer: spreads FNV's weak high bits over the word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hash of a key; `0xff` never occurs in UTF-8, so it separates the parts.
fn key_state(collection: &str, id: &str) -> u64 {
    let h = fnv(FNV_OFFSET, collection.as_bytes());
    fnv(fnv(h, &[0xff]), id.as_bytes())
}

/// The bucket of a key: the same on every replica and every platform.
pub fn bucket(collection: &str, id: &str) -> u16 {
    (mix(key_state(collection, id)) >> 48) as u16
}

/// The group of a bucket.
pub fn group(bucket: u16) -> u8 {
    (bucket >> 8) as u8
}

/// The hash of one version: its key, its stamp and its payload (`doc` is
/// the document's compact JSON text, `None` for a tombstone). A live
/// version contributes it to its bucket, group and root. The payload is in
/// it because two copies of one store can give one stamp two payloads: the
/// digests then still differ, and the comparison of keys finds them.
pub fn version_hash(collection: &str, id: &str, stamp: &Stamp, doc: Option<&str>) -> Hash64 {
    let h = fnv(key_state(collection, id), &[0xff]);
    let h = fnv(h, &stamp.lamport.to_le_bytes());
    let h = fnv(fnv(h, stamp.node_id.as_bytes()), &[0xff]);
    let h = match doc {
        Some(text) => fnv(fnv(h, b"p"), text.as_bytes()),
        None => fnv(h, b"d"),
    };
    Hash64(mix(h))
}

/// A payload's document as the compact JSON text its version hash covers
/// (`None` for a delete): the text every tide store keeps.
pub fn doc_text(payload: &crate::Payload) -> Option<&str> {
    payload.doc().map(crate::Doc::as_str)
}

/// [`version_hash`] of a payload.
pub fn payload_hash(collection: &str, id: &str, stamp: &Stamp, payload: &crate::Payload) -> Hash64 {
    version_hash(collection, id, stamp, doc_text(payload))
}

/// One level's entry that a write changes, and by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// 0 for the collection's root, 1 for a group, 2 for a bucket.
    pub level: u8,
    /// The group or bucket number (0 for the root).
    pub index: u16,
    /// What to XOR into the stored hash.
    pub hash: Hash64,
}

/// What replacing the live version hashed `old` of a key by `new` (either
/// `None` for absent or a tombstone) does to the three levels: nothing when
/// both are the same.
pub fn deltas(collection: &str, id: &str, old: Option<Hash64>, new: Option<Hash64>) -> Option<[Delta; 3]> {
    if old == new {
        return None;
    }
    let h = old.unwrap_or_default() ^ new.unwrap_or_default();
    let b = bucket(collection, id);
    Some([
        Delta { level: 0, index: 0, hash: h },
        Delta { level: 1, index: u16::from(group(b)), hash: h },
        Delta { level: 2, index: b, hash: h },
    ])
}

/// The digests of a set of live versions, kept in memory: what the
/// reference model and tests use, and what a database table mirrors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestTree {
    entries: std::collections::BTreeMap<(String, u8, u16), Hash64>,
}

impl DigestTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the live version of `(collection, id)` went from the one
    /// hashed `old` to `new` (`None` for absent or deleted).
    pub fn replace(&mut self, collection: &str, id: &str, old: Option<Hash64>, new: Option<Hash64>) {
        for d in deltas(collection, id, old, new).into_iter().flatten() {
            let entry = self.entries.entry((collection.to_owned(), d.level, d.index)).or_default();
            *entry ^= d.hash;
            if entry.is_zero() {
                self.entries.remove(&(collection.to_owned(), d.level, d.index));
            }
        }
    }

    /// The root of every collection with live documents.
    pub fn roots(&self) -> std::collections::BTreeMap<String, Hash64> {
        self.entries.iter().filter(|((_, level, _), _)| *level == 0).map(|((c, _, _), h)| (c.clone(), *h)).collect()
    }

    /// The non-zero groups of `collection`, in order.
    pub fn groups(&self, collection: &str) -> Vec<(u16, Hash64)> {
        self.level(collection, 1, |_| true)
    }

    /// The non-zero buckets of `collection` within `groups`, in order.
    pub fn buckets(&self, collection: &str, groups: &[u16]) -> Vec<(u16, Hash64)> {
        self.level(collection, 2, |b| groups.contains(&u16::from(group(b))))
    }

    fn level(&self, collection: &str, level: u8, keep: impl Fn(u16) -> bool) -> Vec<(u16, Hash64)> {
        let from = (collection.to_owned(), level, 0);
        self.entries
            .range(from..)
            .take_while(|((c, l, _), _)| c == collection && *l == level)
            .filter(|((_, _, i), _)| keep(*i))
            .map(|((_, _, i), h)| (*i, *h))
            .collect()
    }
}

/// One level's digests (1 for groups, 2 for buckets) from the stored rows
/// (`folded`, as `(index, hash)`) and bucket deltas not yet folded into them
/// (`logged`, as `(bucket, delta)`), restricted to `groups` if given: the
/// non-zero entries in order. Stores that append bucket deltas to a log
/// instead of updating random rows read their digests through this.
pub fn with_logged(
    level: u8,
    folded: impl IntoIterator<Item = (u16, i64)>,
    logged: impl IntoIterator<Item = (u16, i64)>,
    groups: Option<&[u16]>,
) -> Vec<(u16, Hash64)> {
    let mut sum: std::collections::BTreeMap<u16, i64> = folded.into_iter().collect();
    for (bucket, delta) in logged {
        let g = u16::from(group(bucket));
        if groups.is_none_or(|gs| gs.contains(&g)) {
            *sum.entry(if level == 1 { g } else { bucket }).or_default() ^= delta;
        }
    }
    sum.into_iter().filter(|(_, h)| *h != 0).map(|(i, h)| (i, Hash64::from_i64(h))).collect()
}

/// Entries of two sorted `(index, hash)` lists that differ (present on one
/// side only, or with different hashes), in order.
pub fn differing(ours: &[(u16, Hash64)], theirs: &[(u16, Hash64)]) -> Vec<u16> {
    let ours: std::collections::BTreeMap<u16, Hash64> = ours.iter().copied().collect();
    let theirs: std::collections::BTreeMap<u16, Hash64> = theirs.iter().copied().collect();
    let mut out: Vec<u16> = ours
        .iter()
        .filter(|(index, hash)| theirs.get(index) != Some(hash))
        .map(|(index, _)| *index)
        .chain(theirs.keys().filter(|index| !ours.contains_key(index)).copied())
        .collect();
    out.sort_unstable();
    out
}

/// One side's version of a key when two replicas compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    /// Its stamp.
    pub stamp: &'a Stamp,
    /// Its [`version_hash`].
    pub hash: Hash64,
    /// Whether it is a document (not a tombstone).
    pub live: bool,
}

impl<'a> Held<'a> {
    /// A version given as `(stamp, hash, live)`.
    pub fn of((stamp, hash, live): &'a (Stamp, Hash64, bool)) -> Self {
        Self { stamp, hash: *hash, live: *live }
    }
}

/// Which side's version of a key must travel when two replicas compare it:
/// `(send_server_version, want_client_version)`. A version travels when the
/// other side lacks the key and it is live, or when its stamp is greater.
/// One stamp with two payloads (copies of one store) is settled by the
/// server's: it holds the one it accepted.
pub fn compare(server: Option<Held<'_>>, client: Option<Held<'_>>) -> (bool, bool) {
    match (server, client) {
        (None, None) => (false, false),
        (Some(s), None) => (s.live, false),
        (None, Some(c)) => (false, c.live),
        (Some(s), Some(c)) if s.stamp == c.stamp => (s.hash != c.hash, false),
        (Some(s), Some(c)) => (s.stamp > c.stamp, c.stamp > s.stamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed_across_builds() {
        // Pinned: every replica and every backend must compute the same values.
        // These were computed independently from PROTOCOL.md §12's text.
        assert_eq!(bucket("notes", "n1"), 60_077);
        let h = version_hash("notes", "n1", &Stamp::new(7, "A"), Some("{}"));
        assert_eq!(h.to_string(), "cc6a2a4cd89488ab");
        assert_eq!(version_hash("notes", "n1", &Stamp::new(7, "A"), None).to_string(), "8d5e27f56312f84f");
        assert_ne!(h, version_hash("notes", "n1", &Stamp::new(7, "B"), Some("{}")));
        assert_ne!(h, version_hash("notes", "n2", &Stamp::new(7, "A"), Some("{}")));
        assert_ne!(h, version_hash("notes", "n1", &Stamp::new(7, "A"), Some(r#"{"a":1}"#)), "the payload counts");
        assert_ne!(h, version_hash("notes", "n1", &Stamp::new(7, "A"), None), "a tombstone differs");
        let x = Stamp::new(1, "x");
        assert_ne!(version_hash("a", "bc", &x, None), version_hash("ab", "c", &x, None));
    }

    #[test]
    fn a_tree_returns_to_empty_when_every_version_is_removed() {
        let mut t = DigestTree::new();
        let h = |id: &str, l: u64| version_hash("c", id, &Stamp::new(l, "A"), Some("{}"));
        t.replace("c", "k", None, Some(h("k", 1)));
        t.replace("c", "j", None, Some(h("j", 2)));
        t.replace("c", "k", Some(h("k", 1)), Some(h("k", 2)));
        assert_eq!(t.roots().len(), 1);
        t.replace("c", "k", Some(h("k", 2)), None);
        t.replace("c", "j", Some(h("j", 2)), None);
        assert_eq!(t, DigestTree::new());
    }

    #[test]
    fn differing_finds_one_sided_and_changed_entries() {
        let a = [(1, Hash64(1)), (3, Hash64(3)), (5, Hash64(5))];
        let b = [(1, Hash64(1)), (3, Hash64(4)), (7, Hash64(7))];
        assert_eq!(differing(&a, &b), vec![3, 5, 7]);
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_text() {
        let h = Hash64(0x0123_4567_89ab_cdef);
        let s = serde_json::to_string(&h).unwrap();
        assert_eq!(s, "\"0123456789abcdef\"");
        assert_eq!(serde_json::from_str::<Hash64>(&s).unwrap(), h);
        assert!(serde_json::from_str::<Hash64>("\"123\"").is_err());
        assert!(serde_json::from_str::<Hash64>("\"0123456789abcdeg\"").is_err());
    }
}
