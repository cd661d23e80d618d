//! Helpers shared by the server's test binaries (`it` and `statements`).

use std::sync::atomic::{AtomicU64, Ordering};

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

/// A new empty schema; returns a URL whose connections use it.
pub(crate) async fn fresh_schema(url: &str) -> String {
    use sqlx::{ConnectOptions, Connection};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let schema = format!("tide_test_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let mut conn: sqlx::PgConnection = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .connect()
        .await
        .expect("TIDE_TEST_POSTGRES_URL connects");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={schema}")
}
