//! tide-transport's integration tests, one binary.

mod contract;
mod fake;
mod http;
mod original;
mod server;

pub(crate) fn doc(v: serde_json::Value) -> tide_core::Doc {
    match v {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}
