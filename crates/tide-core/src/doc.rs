//! A document held as the one JSON text every tide store keeps, hashes and sends.
//!
//! A [`Doc`] is a JSON object in its *canonical* text: compact, as
//! `serde_json` writes a map parsed from it (keys in the writer's order, no
//! duplicate keys, `serde_json`'s escapes and number forms). That text is what
//! a version hash covers (PROTOCOL.md §12), so two replicas holding one
//! version hold the same bytes. Text that arrives canonical — everything a
//! tide peer sends — is checked in one pass and kept as it arrived, never
//! decoded into a map and encoded again; other text (the original client's
//! `{"a": 1}` with spaces, `\u00e9` escapes, duplicate keys) is re-encoded
//! once, on the way in.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::limits::JSON_DEPTH_MAX;

/// The deepest a document may nest, the object itself counting as one
/// level: every message carries a document three containers deep (request,
/// `ops`, op), so a document within this limit keeps its message within
/// [`JSON_DEPTH_MAX`].
pub const DOC_DEPTH_MAX: usize = JSON_DEPTH_MAX - 4;

/// A document: a JSON object, as canonical text. Cloning is cheap (the text
/// is shared). Two documents are equal when their texts are, so key order
/// counts, as it does in the version hash.
#[derive(Clone)]
pub struct Doc(Arc<RawValue>);

/// Why some JSON is not a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// The text is not JSON.
    #[error("a document must be JSON: {0}")]
    Json(String),
    /// The JSON is not an object.
    #[error("a document must be a JSON object, found {found}")]
    NotObject {
        /// What was found instead, with its article ("an array").
        found: &'static str,
    },
    /// The object nests deeper than [`DOC_DEPTH_MAX`].
    #[error("a document must not nest deeper than {DOC_DEPTH_MAX} levels")]
    TooDeep,
}

impl Doc {
    /// A document from JSON text, which is checked (JSON, an object, at most
    /// [`DOC_DEPTH_MAX`] deep) and kept as it is when canonical.
    ///
    /// # Errors
    /// [`DocError`] when the text is not such an object.
    pub fn parse(text: &str) -> Result<Self, DocError> {
        Self::from_raw(serde_json::from_str(text).map_err(json)?)
    }

    /// A document from any value that serializes to a JSON object.
    ///
    /// # Errors
    /// [`DocError`] when `value` does not serialize to such an object.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, DocError> {
        let text = serde_json::to_string(value).map_err(json)?;
        Self::from_raw(RawValue::from_string(text).map_err(json)?)
    }

    /// The document of a map; its encoding is canonical by construction.
    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> Self {
        let text = serde_json::to_string(map).expect("maps serialize");
        Self(RawValue::from_string(text).expect("serde_json writes JSON").into())
    }

    /// A document from text a tide store wrote: canonical already, so only
    /// its JSON is checked (a store's file can be damaged).
    ///
    /// # Errors
    /// [`DocError`] when the text is not a JSON object.
    pub fn from_stored(text: String) -> Result<Self, DocError> {
        let raw = RawValue::from_string(text).map_err(json)?;
        if !raw.get().starts_with('{') {
            return Err(DocError::NotObject { found: found(raw.get()) });
        }
        Ok(Self(raw.into()))
    }

    /// Checks valid JSON text (`RawValue`'s: trimmed, syntax checked) and
    /// keeps it when canonical.
    pub(crate) fn from_raw(raw: Box<RawValue>) -> Result<Self, DocError> {
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(DocError::NotObject { found: found(text) });
        }
        if examine(text.as_bytes())? {
            return Ok(Self(raw.into()));
        }
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).map_err(json)?;
        Ok(Self::from_map(&map))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The length of the canonical text, in bytes: the size the limits count.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    /// Always false: a document is at least `{}`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The document decoded into a map.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(self.as_str()).expect("a document is a JSON object")
    }

    /// The document decoded into any type.
    ///
    /// # Errors
    /// The `serde_json` error when the document does not fit `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.as_str())
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for Doc {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        Self::from_map(&map)
    }
}

impl FromIterator<(String, serde_json::Value)> for Doc {
    fn from_iter<I: IntoIterator<Item = (String, serde_json::Value)>>(iter: I) -> Self {
        Self::from_map(&iter.into_iter().collect())
    }
}

impl PartialEq for Doc {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Doc {}

impl std::hash::Hash for Doc {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Doc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // `serde_json` writes the text as it is.
        RawValue::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_raw(Box::<RawValue>::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[expect(clippy::needless_pass_by_value, reason = "used as a map_err function")]
fn json(e: serde_json::Error) -> DocError {
    DocError::Json(e.to_string())
}

/// What a JSON text that is not an object holds, for error messages.
pub(crate) fn found(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// One pass over valid JSON text: whether it nests at most [`DOC_DEPTH_MAX`]
/// deep (else the error) and whether it is canonical.
fn examine(text: &[u8]) -> Result<bool, DocError> {
    // Per open container: whether it is an object whose next string is a
    // key, and where its keys start in `keys`.
    struct Open {
        object: bool,
        key_next: bool,
        keys_from: usize,
    }
    let mut open: Vec<Open> = Vec::new();
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut canonical = true;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'{' | b'[' => {
                if open.len() == DOC_DEPTH_MAX {
                    return Err(DocError::TooDeep);
                }
                let object = text[i] == b'{';
                open.push(Open { object, key_next: object, keys_from: keys.len() });
                i += 1;
            }
            b'}' | b']' => {
                if let Some(o) = open.pop() {
                    canonical &= !o.object || distinct(&mut keys[o.keys_from..]);
                    keys.truncate(o.keys_from);
                }
                i += 1;
            }
            b',' => {
                if let Some(o) = open.last_mut() {
                    o.key_next = o.object;
                }
                i += 1;
            }
            b'"' => {
                let end = string_end(text, i + 1, &mut canonical);
                if let Some(o) = open.last_mut().filter(|o| o.key_next) {
                    o.key_next = false;
                    keys.push(&text[i + 1..end]);
                }
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = text[i..].iter().position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'));
                let end = end.map_or(text.len(), |n| i + n);
                canonical &= number_canonical(&text[i..end])?;
                i = end;
            }
            b't' | b'n' => i += 4,
            b'f' => i += 5,
            b':' => i += 1,
            // Whitespace: valid, never canonical.
            _ => {
                canonical = false;
                i += 1;
            }
        }
    }
    Ok(canonical)
}

/// The index of the quote closing the string whose text starts at `i`;
/// clears `canonical` at an escape `serde_json` would not write.
fn string_end(text: &[u8], mut i: usize, canonical: &mut bool) -> usize {
    while i < text.len() {
        match text[i] {
            b'"' => return i,
            b'\\' => {
                match text.get(i + 1) {
                    Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u') => {
                        // serde_json writes `\u00XX`, lowercase, only for the
                        // control characters without a short escape.
                        let hex = text.get(i + 2..i + 6).unwrap_or_default();
                        let code = std::str::from_utf8(hex).ok().and_then(|h| u32::from_str_radix(h, 16).ok());
                        let lower = hex.iter().all(|b| !b.is_ascii_uppercase());
                        *canonical &=
                            lower && code.is_some_and(|c| c < 0x20 && !matches!(c, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d));
                        i += 6;
                    }
                    _ => {
                        *canonical = false;
                        i += 2;
                    }
                }
            }
            _ => i += 1,
        }
    }
    text.len()
}

/// Whether a number token is as `serde_json` writes the number it parses
/// to; an error when it parses to no number (out of range).
fn number_canonical(token: &[u8]) -> Result<bool, DocError> {
    let integer = !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if integer {
        // Integers within i64/u64 are written back digit for digit; larger
        // ones become floats.
        let (digits, fits) = match token.strip_prefix(b"-") {
            Some(d) => (d, parse_u64(d).is_some_and(|n| n <= 1 << 63)),
            None => (token, parse_u64(token).is_some()),
        };
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        let minus_zero = token == b"-0";
        if fits && !leading_zero && !minus_zero {
            return Ok(true);
        }
    }
    let text = std::str::from_utf8(token).map_err(|e| DocError::Json(e.to_string()))?;
    let number: serde_json::Number = serde_json::from_str(text).map_err(json)?;
    Ok(serde_json::to_string(&number).expect("numbers serialize") == text)
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d.wrapping_sub(b'0'))))
}

/// Whether an object's keys (as raw string text) are all different.
fn distinct(keys: &mut [&[u8]]) -> bool {
    if keys.len() <= 16 {
        return keys.iter().enumerate().all(|(i, k)| !keys[..i].contains(k));
    }
    keys.sort_unstable();
    keys.windows(2).all(|w| w[0] != w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap();
        serde_json::to_string(&map).unwrap()
    }

    #[test]
    fn every_text_becomes_what_serde_json_writes_and_canonical_text_is_kept() {
        for text in [
            r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#,
            r#"{"a": 1}"#,
            r#"{"a":1,"a":2,"b":3}"#,
            r#"{"a":"\u00e9\/\u001f\u001F\n\u0008"}"#,
            r#"{"é":"ü\"\\"}"#,
            r#"{"n":[0,-1,1.0,1e5,1E5,-0,-0.0,0.1,1.5e-7,18446744073709551615,18446744073709551616,-9223372036854775808,-9223372036854775809,00]}"#,
            r#"{"n":[1.7976931348623157e308,5e-324,123456789012345678901234567890]}"#,
            r#"{"k":{"x":1,"x":{"y":[]}},"l":[{"p":1},{"p":2}]}"#,
            "{}",
            " {\n} ",
        ] {
            let Ok(doc) = Doc::parse(text) else {
                assert!(serde_json::from_str::<serde_json::Value>(text).is_err(), "{text}");
                continue;
            };
            assert_eq!(doc.as_str(), canonical(text), "{text}");
            let kept = Doc::parse(doc.as_str()).unwrap();
            assert_eq!(kept, doc);
        }
    }

    #[test]
    fn many_keys_are_checked_for_duplicates() {
        let keys: Vec<String> = (0..40).map(|i| format!(r#""k{}":{i}"#, i % 39)).collect();
        let text = format!("{{{}}}", keys.join(","));
        assert_eq!(Doc::parse(&text).unwrap().as_str(), canonical(&text));
        let unique: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let text = format!("{{{}}}", unique.join(","));
        assert_eq!(Doc::parse(&text).unwrap().as_str(), text);
    }

    #[test]
    fn bad_documents_get_a_specific_error() {
        assert_eq!(Doc::parse("[1]"), Err(DocError::NotObject { found: "an array" }));
        assert_eq!(Doc::parse(r#""x""#), Err(DocError::NotObject { found: "a string" }));
        assert!(matches!(Doc::parse("{"), Err(DocError::Json(_))));
        assert!(matches!(Doc::parse(r#"{"a":1e400}"#), Err(DocError::Json(_))));
        let deep = |n: usize| format!("{}{}", "{\"a\":".repeat(n - 1) + "{", "}".repeat(n));
        assert!(Doc::parse(&deep(DOC_DEPTH_MAX)).is_ok());
        assert_eq!(Doc::parse(&deep(DOC_DEPTH_MAX + 1)), Err(DocError::TooDeep));
    }

    #[test]
    fn a_document_serializes_as_its_text_and_decodes() {
        let doc = Doc::parse(r#"{"b":1,"a":[2]}"#).unwrap();
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"b":1,"a":[2]}"#);
        assert_eq!(serde_json::to_value(&doc).unwrap(), serde_json::json!({"b": 1, "a": [2]}));
        let back: Doc = serde_json::from_str(r#" {"b": 1, "a": [2]} "#).unwrap();
        assert_eq!(back, doc);
        assert_eq!(doc.to_map()["a"], serde_json::json!([2]));
        assert_eq!(Doc::from_value(&serde_json::json!({"b": 1, "a": [2]})).unwrap(), doc);
        assert_eq!(Doc::from_value(&3), Err(DocError::NotObject { found: "a number" }));
    }
}
