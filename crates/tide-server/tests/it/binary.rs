//! The `tide-server` binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tide_core::SyncRequest;
use tide_transport::{HttpTransport, Transport};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_tide-server");

/// Starts the binary on a free port; returns the child and its endpoint.
pub(crate) fn spawn(args: &[&str]) -> (std::process::Child, String) {
    spawn_on("127.0.0.1:0", args)
}

/// Starts the binary listening on `listen`; returns the child and its endpoint.
pub(crate) fn spawn_on(listen: &str, args: &[&str]) -> (std::process::Child, String) {
    spawn_with(listen, args, Stdio::null())
}

/// [`spawn_on`] with the child's stderr (its log) going to `stderr`.
pub(crate) fn spawn_with(listen: &str, args: &[&str], stderr: Stdio) -> (std::process::Child, String) {
    let mut child =
        Command::new(BIN).args(["--listen", listen]).args(args).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let endpoint = line.trim().strip_prefix("tide-server listening on ").expect("the ready line").to_owned();
    (child, endpoint)
}

#[tokio::test]
async fn it_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let (mut child, endpoint) = spawn(&["--no-auth", "--db", db.to_str().unwrap()]);
    let t = HttpTransport::new(&endpoint).unwrap();
    let resp = t.exchange(&SyncRequest::new("a", None)).await.unwrap();
    assert_eq!(resp.protocol, Some(1));
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("exits after SIGTERM")
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(db.exists());
}

#[tokio::test]
async fn with_no_set_up_it_runs_behind_a_generated_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let endpoint = line.trim().strip_prefix("tide-server listening on ").unwrap().to_owned();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let token = loop {
        let mut l = String::new();
        assert!(stderr.read_line(&mut l).unwrap() > 0, "the token is printed");
        if let Some(t) = l.trim().strip_prefix("authorization: Bearer ") {
            break t.to_owned();
        }
    };
    let anonymous = HttpTransport::new(&endpoint).unwrap().exchange(&SyncRequest::new("a", None)).await.unwrap_err();
    assert_eq!(anonymous.code(), Some(tide_core::ErrorCode::Unauthorized));
    let authed = HttpTransport::builder(&endpoint).header("authorization", format!("Bearer {token}")).build().unwrap();
    authed.exchange(&SyncRequest::new("a", None)).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bad_token_file_stops_it_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "only-one-word\n").unwrap();
    let out =
        Command::new(BIN).args(["--listen", "127.0.0.1:0", "--tokens-file", file.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("TOKEN NAMESPACE"), "{err}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--db",
        "--no-auth",
        "--tokens-file",
        "--tokens",
        "--durability",
        "--request-bytes-max",
        "--ops-per-request-max",
        "--doc-bytes-max",
        "--changes-per-response-max",
        "--response-bytes-max",
        "--lamport-lead-max",
        "--header-read-timeout",
        "--body-read-timeout",
        "--connections-max",
        "--log",
        "TIDE_SERVER_DB",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
