//! tide-transport's integration tests, one binary.

mod contract;
mod decode;
mod fake;
mod http;
mod original;
mod server;

pub(crate) fn doc(v: serde_json::Value) -> tide_core::Doc {
    match v {
        serde_json::Value::Object(map) => map.into(),
        other => panic!("not an object: {other}"),
    }
}

/// The value of `var`, which points a test at a service it needs (`what`
/// names what it tests). Without it the test is skipped loudly: the line is
/// written to the terminal itself, past libtest's capture, and `.ci/run`
/// counts it as skipped. In CI (`CI` set) a missing service fails instead.
pub(crate) fn service(var: &str, what: &str) -> Option<String> {
    use std::io::Write as _;
    if let Ok(value) = std::env::var(var) {
        return Some(value);
    }
    assert!(std::env::var_os("CI").is_none(), "{var} is not set in CI: {what} must be tested there");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {var} is not set; {what} was NOT tested");
    None
}
