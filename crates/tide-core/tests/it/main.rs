//! tide-core's integration tests, one binary.

mod clock;
mod golden;
mod limits;
mod lww;
mod model;
mod simulation;
mod wire;

/// A document from a `json!` object literal.
pub(crate) fn doc(v: serde_json::Value) -> tide_core::Doc {
    match v {
        serde_json::Value::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}
