//! Running the binary in production: every setting from a configuration
//! file (below the environment and the flags), a backup taken under write
//! load and restored without losing an acknowledged write, and HTTPS whose
//! certificate is reloaded on SIGHUP while a long-poll is held.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tide_core::SyncRequest;
use tide_transport::{HttpTransport, Transport};

use crate::binary::{BIN, spawn};

/// A value for every setting, unlike its default. A setting added without
/// one here fails `every_setting_can_come_from_the_file`.
const SAMPLES: [(&str, &str); 43] = [
    ("tls-cert", "\"/etc/tide/cert.pem\""),
    ("tls-key", "\"/etc/tide/key.pem\""),
    ("listen", "\"0.0.0.0:8443\""),
    ("db", "\"/var/lib/tide/server.db\""),
    ("database-url", "\"postgres://tide:secret@db/tide\""),
    ("path", "\"/api/sync\""),
    ("no-auth", "true"),
    ("namespace", "\"team\""),
    ("tokens-file", "\"/etc/tide/tokens\""),
    ("rules", "\"/etc/tide/rules.toml\""),
    ("tokens", "\"t1=a,t2=b\""),
    ("jwt-secret", "\"s3cret\""),
    ("jwks-file", "\"/etc/tide/jwks.json\""),
    ("jwks-url", "\"https://id.example/jwks.json\""),
    ("jwt-audience", "\"my-app\""),
    ("jwt-issuer", "\"https://id.example/\""),
    ("jwt-leeway", "5"),
    ("jwt-namespace-claim", "\"tenant\""),
    ("jwt-default-namespace", "\"main\""),
    ("jwt-principal-claim", "\"email\""),
    ("durability", "\"normal\""),
    ("request-bytes-max", "1000000"),
    ("ops-per-request-max", "100"),
    ("doc-bytes-max", "10000"),
    ("id-bytes-max", "64"),
    ("collection-bytes-max", "32"),
    ("changes-per-response-max", "50"),
    ("response-bytes-max", "100000"),
    ("lamport-lead-max", "1000"),
    ("header-read-timeout", "2.5"),
    ("body-read-timeout", "7.5"),
    ("connections-max", "64"),
    ("held-requests-max", "100"),
    ("held-per-namespace-max", "10"),
    ("wait-max", "12.5"),
    ("request-bytes-in-flight-max", "5000000"),
    ("principal-requests-per-second-max", "50"),
    ("tombstone-horizon-seqs", "1234"),
    ("collect-interval", "90.5"),
    ("shutdown-grace", "3.5"),
    ("log", "\"debug\""),
    ("otlp-endpoint", "\"http://127.0.0.1:4318/v1/traces\""),
    ("log-format", "\"json\""),
];

fn check(dir: &std::path::Path, config: &str, env: &[(&str, &str)], flags: &[&str]) -> Value {
    let file = dir.join("tide.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .args(flags)
        .args(["config", "check", "--json"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_setting_can_come_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let all = check(dir.path(), "", &[], &[]);
    let keys: Vec<&String> = all["settings"].as_object().unwrap().keys().collect();
    for key in &keys {
        assert!(SAMPLES.iter().any(|(k, _)| k == key), "setting {key} has no sample in this test");
    }
    for (key, sample) in SAMPLES {
        // A certificate needs its key and a key its certificate.
        let pair = match key {
            "tls-cert" => "tls-key = \"/k.pem\"\n",
            "tls-key" => "tls-cert = \"/c.pem\"\n",
            _ => "",
        };
        let got = check(dir.path(), &format!("{key} = {sample}\n{pair}"), &[], &[]);
        let setting = &got["settings"][key];
        assert_eq!(setting["from"], "file", "{key}: {got}");
        let shown = setting["value"].as_str().unwrap();
        let expected = sample.trim_matches('"');
        match key {
            "jwt-secret" | "tokens" => assert_eq!(shown, "***", "{key} is masked"),
            "database-url" => assert_eq!(shown, "postgres://tide:***@db/tide"),
            _ => assert_eq!(shown, expected, "{key}"),
        }
    }
    // The environment wins over the file, a flag over both.
    let file = "tombstone-horizon-seqs = 5\nlisten = \"127.0.0.1:1\"\n";
    let got = check(dir.path(), file, &[("TIDE_SERVER_TOMBSTONE_HORIZON_SEQS", "6")], &["--listen", "127.0.0.1:2"]);
    assert_eq!(got["settings"]["tombstone-horizon-seqs"], json!({"value": "6", "from": "environment"}));
    assert_eq!(got["settings"]["listen"], json!({"value": "127.0.0.1:2", "from": "flag"}));
    // Mistakes are named: an unknown key, a bad value, a missing rules file.
    std::fs::write(dir.path().join("tide.toml"), "listn = \"x\"\n").unwrap();
    let out =
        Command::new(BIN).arg("--config").arg(dir.path().join("tide.toml")).args(["config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting \"listn\""));
    let got = check(dir.path(), "rules = \"/nonexistent/rules.toml\"\n", &[], &[]);
    assert_eq!(got["ok"], false);
    assert!(got["problems"][0].as_str().unwrap().contains("/nonexistent/rules.toml"), "{got}");
}

/// Writes documents through real clients while `backup` runs, restores the
/// snapshot under a stopped server, and checks that the clients converge
/// with the server holding every write they saw acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_and_the_clients_converge() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let db_arg = db.to_str().unwrap().to_owned();
    let (mut child, endpoint) = spawn(&["--no-auth", "--db", &db_arg]);
    let port = endpoint.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
    let clients: Vec<tide_client::Tide> =
        futures_util::future::join_all((0..3).map(|i| {
            tide_client::Tide::builder().path(dir.path().join(format!("c{i}.db"))).endpoint(&endpoint).open()
        }))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, tide)| {
            let (tide, writing, acknowledged) = (tide.clone(), Arc::clone(&writing), Arc::clone(&acknowledged));
            tokio::spawn(async move {
                let mut n = 0;
                while writing.load(std::sync::atomic::Ordering::SeqCst) {
                    tide.collection::<Value>("notes").put(&format!("c{i}-{n}"), &json!({ "n": n })).await.unwrap();
                    tide.sync_once().await.unwrap();
                    acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Until this many more writes were acknowledged.
    let after = |more: usize| {
        let acknowledged = Arc::clone(&acknowledged);
        async move {
            let target = acknowledged.load(std::sync::atomic::Ordering::SeqCst) + more;
            while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    after(30).await;
    let backup = dir.path().join("backup.db");
    let out = Command::new(BIN).args(["--db", &db_arg, "backup"]).arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    after(30).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let written: Vec<usize> = futures_util::future::join_all(writers).await.into_iter().map(Result::unwrap).collect();

    // The snapshot is a whole database.
    let mut conn =
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{}", backup.display())).await.unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut conn).await.unwrap();
    assert_eq!(check, "ok");
    let in_backup: i64 = sqlx::query_scalar("SELECT count(*) FROM tide_changes").fetch_one(&mut conn).await.unwrap();
    drop(conn);
    let total: usize = written.iter().sum();
    let in_backup = usize::try_from(in_backup).unwrap();
    assert!(in_backup > 0 && in_backup < total, "a snapshot from the middle: {in_backup} of {total}");

    // Restore: the server stopped, the snapshot in its place, started again on its port.
    child.kill().unwrap();
    child.wait().unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db_arg}{suffix}"));
    }
    std::fs::copy(&backup, &db).unwrap();
    let (mut child, _) = crate::binary::spawn_on(&format!("127.0.0.1:{port}"), &["--no-auth", "--db", &db_arg]);
    for _ in 0..3 {
        for tide in &clients {
            tide.sync_once().await.unwrap();
        }
    }
    let reader = tide_client::Tide::builder().endpoint(&endpoint).open().await.unwrap();
    reader.sync_once().await.unwrap();
    let notes = reader.collection::<Value>("notes");
    assert_eq!(notes.count().await.unwrap() as usize, total, "every acknowledged write is back");
    for (i, n) in written.iter().enumerate() {
        assert_eq!(notes.get(&format!("c{i}-{}", n - 1)).await.unwrap(), Some(json!({ "n": n - 1 })));
    }
    for tide in &clients {
        assert!(tide.sync_once().await.unwrap().verified);
        tide.close().await;
    }
    reader.close().await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A certificate authority and a certificate it signed for 127.0.0.1, by
/// openssl: (the authority's certificate, the certificate, its key).
fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let path = |file: &str| dir.join(format!("{name}-{file}"));
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .expect("openssl makes the test certificates");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca, ca_key, csr, key, cert) =
        (path("ca.pem"), path("ca-key.pem"), path("req.pem"), path("key.pem"), path("cert.pem"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    openssl(
        &[
            &["req", "-x509", "-days", "1", "-subj", "/CN=tide test CA"][..],
            &ec,
            &["-keyout", &s(&ca_key), "-out", &s(&ca)],
        ]
        .concat(),
    );
    openssl(&[&["req", "-subj", "/CN=127.0.0.1"][..], &ec, &["-keyout", &s(&key), "-out", &s(&csr)]].concat());
    let ext = path("ext.cnf");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

fn trusting(endpoint: &str, cert: &std::path::Path) -> HttpTransport {
    HttpTransport::builder(endpoint)
        .add_root_certificates_pem(&std::fs::read(cert).unwrap())
        .exchange_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `tide_held_requests` from `/metrics` at `addr`, over TLS trusting `ca`.
async fn held_requests(addr: &str, ca: &std::path::Path) -> u64 {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    let _ = tls.read_to_string(&mut body).await;
    body.lines().find_map(|l| l.strip_prefix("tide_held_requests ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_and_reloads_its_certificate_on_sighup_while_a_poll_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, old_cert, old_key) = certificate(dir.path(), "old");
    let (new_ca, new_cert, new_key) = certificate(dir.path(), "new");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    let db = dir.path().join("s.db");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--no-auth", "--db", db.to_str().unwrap()])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let endpoint = line.trim().strip_prefix("tide-server listening on ").unwrap().to_owned();
    assert!(endpoint.starts_with("https://"), "{endpoint}");

    let old = trusting(&endpoint, &old_ca);
    let first = old.exchange(&SyncRequest::new("a", None)).await.unwrap();
    // A long-poll held on a connection made with the old certificate.
    let mut poll = SyncRequest::new("poller", Some(first.cursor));
    poll.wait = Some(Duration::from_secs(10));
    let held = tokio::spawn(async move { old.exchange(&poll).await });
    let addr = endpoint.trim_start_matches("https://").trim_end_matches("/sync").to_owned();
    while held_requests(&addr, &old_ca).await != 1 {
        tokio::task::yield_now().await;
    }

    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let kill = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut reloaded = String::new();
    stdout.read_line(&mut reloaded).unwrap();
    assert_eq!(reloaded.trim(), "tide-server: TLS certificate reloaded");

    // New connections get the new certificate: trusted with it, not with the old.
    let fresh = trusting(&endpoint, &new_ca);
    let mut write = SyncRequest::new("writer", None);
    write.ops = vec![tide_core::Op {
        collection: "c".into(),
        id: "x".into(),
        stamp: tide_core::Stamp::new(1, "writer"),
        payload: tide_core::Payload::Put(tide_core::Doc::from_value(&json!({})).unwrap()),
        op_id: None,
    }];
    fresh.exchange(&write).await.unwrap();
    let stale = trusting(&endpoint, &old_ca).exchange(&SyncRequest::new("a", None)).await;
    assert!(stale.is_err(), "the old certificate is no longer served");
    // The held poll, on its old connection, was not dropped: the write woke it.
    let woken = held.await.unwrap().expect("the held poll is answered");
    assert_eq!(woken.changes.len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `/metrics` is `OpenMetrics`: per-namespace counters stop naming new
/// namespaces past `METRICS_NAMESPACES_MAX` (the rest count as "other"),
/// and long-poll holds have their own histogram.
#[tokio::test]
async fn metrics_bound_their_namespaces_and_time_long_poll_holds() {
    let n = tide_server::METRICS_NAMESPACES_MAX + 6;
    let tokens: Vec<(String, String)> = (0..n).map(|i| (format!("token-{i}"), format!("ns-{i}"))).collect();
    let auth = Arc::new(tide_server::StaticTokens::new(tokens.clone()));
    let running =
        crate::support::start_on_with(crate::support::Storage::Sqlite, tide_server::ServerConfig::default(), auth)
            .await;
    let endpoint = running.endpoint();
    for (token, _) in &tokens {
        let t = HttpTransport::builder(&endpoint).header("authorization", format!("Bearer {token}")).build().unwrap();
        let first = t.exchange(&SyncRequest::new("n", None)).await.unwrap();
        if token == "token-0" {
            let mut poll = SyncRequest::new("n", Some(first.cursor));
            poll.wait = Some(Duration::from_millis(50));
            t.exchange(&poll).await.unwrap();
        }
    }
    let (status, body) =
        crate::support::raw(running.addr, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    let series = body.lines().filter(|l| l.starts_with("tide_namespace_exchanges_total{")).count();
    assert_eq!(series, tide_server::METRICS_NAMESPACES_MAX + 1, "64 named and one \"other\"");
    assert!(body.contains(r#"tide_namespace_exchanges_total{namespace="ns-0"} 2"#), "{body}");
    assert!(body.contains(r#"tide_namespace_exchanges_total{namespace="other"} 6"#), "{body}");
    assert!(body.contains("tide_long_poll_hold_seconds_count 1"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"));
}

/// Every exchange has an id, in its response (`x-request-id`) and in its
/// log lines, which `--log-format json` writes as JSON objects.
#[tokio::test]
async fn an_exchange_id_is_in_the_response_and_in_the_json_logs() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let args = ["--no-auth", "--log-format", "json", "--db", db.to_str().unwrap()];
    let (mut child, endpoint) = crate::binary::spawn_with("127.0.0.1:0", &args, Stdio::piped());
    let addr = endpoint.strip_prefix("http://").unwrap().trim_end_matches("/sync").to_owned();
    let exchange = |body: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!(
                "POST /sync HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.lines()
                .find_map(|l| l.strip_prefix("x-request-id: ").map(str::to_owned))
                .expect("an x-request-id header")
        }
    };
    assert_eq!(exchange(r#"{"node_id":"a","request_id":"abc-123"}"#).await, "abc-123");
    let made = exchange(r#"{"node_id":"a"}"#).await;
    assert_eq!(made.len(), 26, "a ULID: {made}");
    let refused = exchange("{not json").await;
    assert_eq!(refused.len(), 26, "a refused request has one too");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let logged = loop {
        let mut l = String::new();
        assert!(stderr.read_line(&mut l).unwrap() > 0, "the exchange is logged");
        let entry: Value = serde_json::from_str(&l).expect("every log line is JSON");
        if entry["span"]["request_id"] == "abc-123" {
            break entry;
        }
    };
    assert_eq!(logged["fields"]["message"], "exchange", "{logged}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// With the `otel` feature, `--otlp-endpoint` sends each exchange's span,
/// with its id, to an OpenTelemetry collector (here a stand-in that keeps
/// what is posted to it); the last spans are flushed on shutdown.
#[cfg(feature = "otel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_an_opentelemetry_collector() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", collector.local_addr().unwrap());
    let received = tokio::spawn(async move {
        let mut posted = Vec::new();
        loop {
            let (mut s, _) = collector.accept().await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            // Headers, then as many body bytes as content-length says.
            loop {
                n += s.read(&mut buf[n..]).await.unwrap();
                let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    if n >= end + 4 + length {
                        break;
                    }
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            posted.extend_from_slice(&buf[..n]);
            if posted.windows(7).any(|w| w == b"otel-42") {
                return String::from_utf8_lossy(&posted).into_owned();
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let (mut child, sync) = spawn(&["--no-auth", "--db", db.to_str().unwrap(), "--otlp-endpoint", &endpoint]);
    let mut req = SyncRequest::new("a", None);
    req.request_id = Some("otel-42".into());
    HttpTransport::new(&sync).unwrap().exchange(&req).await.unwrap();
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let posted = tokio::time::timeout(Duration::from_secs(30), received).await.expect("spans arrive").unwrap();
    assert!(posted.starts_with("POST /v1/traces"), "{posted}");
    assert!(posted.contains("sync"), "the exchange's span");
    child.wait().unwrap();
}
