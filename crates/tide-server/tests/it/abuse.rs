//! A battery of bad requests (reliability.md §5, "Protocol abuse"): each
//! gets its status and code, and the stored state does not change.

use std::time::{Duration, Instant};

use tide_core::Limits;
use tide_server::{NoAuth, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Storage, on_both_backends, raw};

/// What a fresh client pulls: the whole stored state of the namespace.
async fn state(addr: std::net::SocketAddr) -> String {
    let (status, body) = raw(addr, &support::post(r#"{"node_id":"observer"}"#, "")).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn op(node: &str, lamport: &str) -> String {
    format!(r#"{{"collection":"c","id":"i","kind":"put","doc":{{"v":1}},"lamport":{lamport},"node_id":"{node}"}}"#)
}

async fn bad_requests_get_their_status_and_code_and_change_nothing(storage: Storage) {
    let limits = Limits { ops_per_request_max: 3, request_bytes_max: 64 * 1024, ..Limits::default() };
    let running =
        support::start_on_with(storage, support::config(limits), std::sync::Arc::new(NoAuth::new("default"))).await;
    let seeded = raw(running.addr, &support::post(&format!(r#"{{"node_id":"a","ops":[{}]}}"#, op("a", "1")), "")).await;
    assert_eq!(seeded.0, 200);
    let before = state(running.addr).await;

    let deep = format!(
        r#"{{"node_id":"a","ops":[{{"collection":"c","id":"i","kind":"put","lamport":2,"node_id":"a","doc":{{"x":{}{}}}}}]}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not JSON", "{not json".into(), 400, "invalid_json"),
        ("a top-level array", "[]".into(), 400, "invalid_request"),
        ("a numeric node id", r#"{"node_id":7}"#.into(), 400, "invalid_request"),
        ("a missing node id", r#"{"cursor":null}"#.into(), 400, "invalid_request"),
        ("an unknown kind", op("a", "2").replace(r#""put""#, r#""bogus""#), 400, "invalid_request"),
        ("a put without a doc", op("a", "2").replace(r#""doc":{"v":1},"#, ""), 400, "invalid_request"),
        ("a missing lamport", op("a", "2").replace(r#","lamport":2"#, ""), 400, "invalid_request"),
        ("a fractional lamport", op("a", "2.5"), 400, "invalid_request"),
        ("a non-numeric cursor", r#"{"node_id":"a","cursor":"abc"}"#.into(), 400, "invalid_request"),
        ("a lamport above 2^53", op("a", "9007199254740992"), 400, "lamport_out_of_range"),
        ("a lamport far ahead", op("a", "5000000000"), 400, "lamport_out_of_range"),
        ("a foreign node id", op("mallory", "2"), 400, "foreign_node_id"),
        (
            "a server field in an op",
            op("a", "2").replace(r#""node_id":"a"}"#, r#""node_id":"a","seq":9}"#),
            400,
            "invalid_request",
        ),
        ("too many ops", [op("a", "2"), op("a", "3"), op("a", "4"), op("a", "5")].join(","), 413, "too_many_ops"),
        ("deep JSON", deep, 400, "invalid_json"),
        (
            "an empty collection",
            op("a", "2").replace(r#""collection":"c""#, r#""collection":"""#),
            400,
            "invalid_collection",
        ),
        ("a newer protocol", r#"{"node_id":"a","protocol":99}"#.into(), 400, "unsupported_protocol"),
        ("a subscription that is not a list", r#"{"node_id":"a","collections":"c"}"#.into(), 400, "invalid_request"),
        ("a subscription to a bad name", r#"{"node_id":"a","collections":["a/b"]}"#.into(), 400, "invalid_collection"),
        (
            "a subscription past its limit",
            format!(
                r#"{{"node_id":"a","collections":[{}]}}"#,
                (0..=tide_core::limits::SUBSCRIBED_COLLECTIONS_MAX)
                    .map(|i| format!(r#""c{i}""#))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            400,
            "invalid_request",
        ),
    ];
    for (name, body, status, code) in cases {
        // Ops go inside a request; whole requests go as they are.
        let body =
            if body.starts_with(r#"{"collection""#) { format!(r#"{{"node_id":"a","ops":[{body}]}}"#) } else { body };
        let (got, text) = raw(running.addr, &support::post(&body, "")).await;
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(&format!(r#""code":"{code}""#)), "{name}: {text}");
        let error = serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"].as_str().unwrap().to_owned();
        assert!(error.starts_with("bad request: ") || error.starts_with("invalid JSON"), "{name}: {error}");
        assert_eq!(state(running.addr).await, before, "{name} changed the stored state");
    }
}

async fn oversize_bodies_are_refused_declared_or_chunked(storage: Storage) {
    let limits = Limits { request_bytes_max: 1024, ..Limits::default() };
    let running =
        support::start_on_with(storage, support::config(limits), std::sync::Arc::new(NoAuth::new("default"))).await;
    let before = state(running.addr).await;
    let big = format!(r#"{{"node_id":"a","pad":"{}"}}"#, "x".repeat(4096));
    let (status, body) = raw(running.addr, &support::post(&big, "")).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"));
    // Chunked, with no Content-Length: counted as it arrives.
    let mut chunked =
        b"POST /sync HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(500) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = raw(running.addr, &chunked).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(state(running.addr).await, before);
}

async fn slow_clients_are_cut_off(storage: Storage) {
    let config = ServerConfig {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let running = support::start_on_with(storage, config, std::sync::Arc::new(NoAuth::new("default"))).await;
    let before = state(running.addr).await;

    // Headers that never finish: the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    slow.write_all(b"POST /sync HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out)).await.expect("closed in time").unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250), "not before the timeout");
    assert!(!String::from_utf8_lossy(&out).contains(" 200 "));

    // A body that never finishes: 408, nothing applied.
    let mut slow = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    slow.write_all(b"POST /sync HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\nconnection: close\r\n\r\n{\"node_id\":")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out)).await.expect("answered in time").unwrap();
    let (status, body) = support::parse(&out);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains(r#""code":"timeout""#));
    assert_eq!(state(running.addr).await, before);
}

async fn connections_beyond_the_cap_wait_their_turn(storage: Storage) {
    let config = ServerConfig { connections_max: 2, ..ServerConfig::default() };
    let running = support::start_on_with(storage, config, std::sync::Arc::new(NoAuth::new("default"))).await;
    // Two idle keep-alive connections fill the cap.
    let idle1 = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let idle2 = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let addr = running.addr;
    let mut waiting = tokio::spawn(async move { raw(addr, &support::post(r#"{"node_id":"a"}"#, "")).await });
    // Served at once if the cap did not hold; it must still be waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(),
        "a third client waits while the cap is reached"
    );
    drop(idle1);
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a slot frees").unwrap();
    assert_eq!(status, 200);
    drop(idle2);
}

/// Sends raw bytes and returns the whole response text, head included.
async fn raw_text(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await.expect("answered").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn retry_after(response: &str) -> Option<u64> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after: ")?.trim().parse().ok())
}

async fn a_principal_past_its_rate_gets_429_with_retry_after_and_nothing_applied(storage: Storage) {
    let config = ServerConfig { principal_requests_per_second_max: 3, ..ServerConfig::default() };
    let running = support::start_on_with(storage, config, std::sync::Arc::new(NoAuth::new("default"))).await;
    let mut applied = Vec::new();
    let mut limited = 0;
    for i in 1..=8 {
        let body = format!(
            r#"{{"node_id":"a","ops":[{}]}}"#,
            op("a", &i.to_string()).replace(r#""id":"i""#, &format!(r#""id":"i{i}""#))
        );
        let response = raw_text(running.addr, &support::post(&body, "")).await;
        let (status, text) = support::parse(response.as_bytes());
        match status {
            200 => applied.push(format!("i{i}")),
            429 => {
                assert!(text.contains(r#""code":"rate_limited""#), "{text}");
                assert_eq!(retry_after(&response), Some(1), "{response}");
                limited += 1;
            }
            other => panic!("status {other}: {text}"),
        }
    }
    assert!(applied.len() <= 3 && limited >= 5, "a bucket of three: {applied:?}, {limited} limited");
    // Honouring Retry-After, the principal is served again, and exactly the
    // accepted writes were applied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = raw(running.addr, &support::post(r#"{"node_id":"observer"}"#, "")).await;
    assert_eq!(status, 200, "{body}");
    let pulled: tide_core::SyncResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(pulled.changes.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), applied);
}

async fn bodies_past_the_servers_room_get_503_unread(storage: Storage) {
    let config = ServerConfig { request_bytes_in_flight_max: 2_000, ..ServerConfig::default() };
    let running = support::start_on_with(storage, config, std::sync::Arc::new(NoAuth::new("default"))).await;
    let before = state(running.addr).await;
    // A client sends the head of a 1,500-byte body and stalls: its room is held.
    let mut first = format!(r#"{{"node_id":"a","ops":[{}],"pad":""#, op("a", "1"));
    let pad = 1_500 - first.len() - 2;
    first.push_str(&"x".repeat(pad));
    first.push_str(r#""}"#);
    let request = support::post(&first, "");
    let (head, rest) = request.split_at(request.len() - 100);
    let mut slow = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    slow.write_all(head).await.unwrap();
    // A pull of 600 bytes fits the per-request limit, not the room left,
    // once the server holds the stalled body's room (polled: that happens
    // on the server's side of the socket).
    let probe = format!(r#"{{"node_id":"p","pad":"{}"}}"#, "y".repeat(600));
    let mut refused = None;
    for _ in 0..200 {
        let response = raw_text(running.addr, &support::post(&probe, "")).await;
        if support::parse(response.as_bytes()).0 == 503 {
            refused = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("the stalled body takes its room");
    assert_eq!(retry_after(&refused), Some(1), "{refused}");
    let big_second = format!(r#"{{"node_id":"b","ops":[{}],"pad":"{}"}}"#, op("b", "2"), "y".repeat(600));
    let response = raw_text(running.addr, &support::post(&big_second, "")).await;
    let (status, text) = support::parse(response.as_bytes());
    assert_eq!(status, 503, "{text}");
    assert!(text.contains(r#""code":"unavailable""#), "{text}");
    assert_eq!(retry_after(&response), Some(1), "{response}");
    assert_eq!(state(running.addr).await, before, "nothing of it was applied");
    // The stalled body arrives; its room is freed, and the other fits again.
    slow.write_all(rest).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out)).await.expect("answered").unwrap();
    assert_eq!(support::parse(&out).0, 200);
    let (status, text) = raw(running.addr, &support::post(&big_second, "")).await;
    assert_eq!(status, 200, "{text}");
}

on_both_backends!(
    bad_requests_get_their_status_and_code_and_change_nothing,
    oversize_bodies_are_refused_declared_or_chunked,
    slow_clients_are_cut_off,
    connections_beyond_the_cap_wait_their_turn,
    a_principal_past_its_rate_gets_429_with_retry_after_and_nothing_applied,
    bodies_past_the_servers_room_get_503_unread,
);
