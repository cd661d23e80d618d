//! What only the HTTP transport does: connection reuse, headers, bounds,
//! gzip, TLS trust and the mapping of statuses to errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tide_core::{ErrorCode, Limits, Op, Payload, Stamp, SyncRequest};
use tide_transport::{Error, Headers, HttpTransport, Transport};

use crate::doc;
use crate::server::{self, CA_PEM};

fn pull(node: &str) -> SyncRequest {
    SyncRequest::new(node, None)
}

fn big_push(node: &str, n: u64) -> SyncRequest {
    let mut req = SyncRequest::new(node, None);
    req.ops = (1..=n)
        .map(|i| Op {
            collection: "c".into(),
            id: format!("k{i}"),
            stamp: Stamp::new(i, node),
            payload: Payload::Put(doc(json!({"body": "some text that compresses well ".repeat(4)}))),
            op_id: None,
        })
        .collect();
    req
}

#[tokio::test]
async fn connections_are_reused() {
    let server = server::start(false, Limits::default()).await;
    let t = HttpTransport::new(&server.endpoint(false)).unwrap();
    for _ in 0..5 {
        t.exchange(&pull("a")).await.unwrap();
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn static_headers_and_defaults_are_sent() {
    let server = server::start(false, Limits::default()).await;
    let t = HttpTransport::builder(&server.endpoint(false)).header("authorization", "Bearer static").build().unwrap();
    t.exchange(&pull("a")).await.unwrap();
    let headers = server.behaviour.lock().unwrap().last_headers.clone().unwrap();
    assert_eq!(headers["authorization"], "Bearer static");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["accept-encoding"], "gzip");
}

#[tokio::test]
async fn a_provider_is_asked_before_every_exchange() {
    let server = server::start(false, Limits::default()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let headers = Headers::from_fn(move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        Ok(vec![("authorization".into(), format!("Bearer token-{n}"))])
    });
    let t = HttpTransport::builder(&server.endpoint(false)).headers(headers).build().unwrap();
    for n in 0..3 {
        t.exchange(&pull("a")).await.unwrap();
        let seen = server.behaviour.lock().unwrap().last_headers.clone().unwrap();
        assert_eq!(seen["authorization"], format!("Bearer token-{n}").as_str());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let async_headers = Headers::from_async_fn(|| async {
        tokio::task::yield_now().await;
        Ok(vec![("x-tenant".to_owned(), "acme".to_owned())])
    });
    let t = HttpTransport::builder(&server.endpoint(false)).headers(async_headers).build().unwrap();
    t.exchange(&pull("a")).await.unwrap();
    assert_eq!(server.behaviour.lock().unwrap().last_headers.clone().unwrap()["x-tenant"], "acme");
}

#[tokio::test]
async fn a_provider_error_is_reported_and_nothing_is_sent() {
    let server = server::start(false, Limits::default()).await;
    let headers = Headers::from_fn(|| Err("token service down".into()));
    let t = HttpTransport::builder(&server.endpoint(false)).headers(headers).build().unwrap();
    let err = t.exchange(&big_push("a", 1)).await.unwrap_err();
    assert!(matches!(err, Error::Headers { .. }), "{err}");
    assert!(err.to_string().contains("token service down"));
    assert!(err.is_retryable());
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
    assert_eq!(server.model.lock().unwrap().seq(), 0);
}

#[tokio::test]
async fn a_slow_server_times_out_the_exchange() {
    let server = server::start(false, Limits::default()).await;
    server.behave(|b| b.delay = Some(Duration::from_secs(5)));
    let t =
        HttpTransport::builder(&server.endpoint(false)).exchange_timeout(Duration::from_millis(200)).build().unwrap();
    let err = t.exchange(&pull("a")).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { after } if after == Duration::from_millis(200)), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_response_over_the_limit_is_refused() {
    let server = server::start(false, Limits::default()).await;
    HttpTransport::new(&server.endpoint(false)).unwrap().exchange(&big_push("a", 20)).await.unwrap();
    let t = HttpTransport::builder(&server.endpoint(false)).response_bytes_max(512).build().unwrap();
    let err = t.exchange(&pull("b")).await.unwrap_err();
    assert!(matches!(err, Error::ResponseTooLarge { limit: 512 }), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn gzip_both_ways_once_the_server_accepts_it() {
    let server = server::start(false, Limits::default()).await;
    server.behave(|b| b.advertise_gzip = true);
    let t = HttpTransport::new(&server.endpoint(false)).unwrap();
    t.exchange(&big_push("a", 10)).await.unwrap();
    assert!(!server.behaviour.lock().unwrap().last_gzipped, "not before the server said it accepts gzip");
    let resp = t.exchange(&big_push("a", 20)).await.unwrap();
    assert!(server.behaviour.lock().unwrap().last_gzipped, "a large request is compressed");
    assert_eq!(resp.results.len(), 20);
    let resp = t.exchange(&pull("b")).await.unwrap();
    assert!(server.behaviour.lock().unwrap().last_response_gzipped);
    assert_eq!(resp.changes.len(), 20, "a compressed response decodes");
}

#[tokio::test]
async fn statuses_map_to_errors_that_say_whether_to_retry() {
    let server = server::start(false, Limits::default()).await;
    let t = HttpTransport::new(&server.endpoint(false)).unwrap();
    let cases = [
        (503, Some(7), r#"{"error":"shutting down","code":"unavailable"}"#, true, Some(ErrorCode::Unavailable)),
        (429, Some(2), r#"{"error":"slow down","code":"rate_limited"}"#, true, Some(ErrorCode::RateLimited)),
        (500, None, "Internal Server Error", true, None),
        (401, None, r#"{"error":"bad token","code":"unauthorized"}"#, false, Some(ErrorCode::Unauthorized)),
        (400, None, r#"{"error":"invalid JSON"}"#, false, None),
    ];
    for (status, retry_after, body, retryable, code) in cases {
        server.behave(|b| b.status = Some((status, retry_after, body.into())));
        let err = t.exchange(&pull("a")).await.unwrap_err();
        let Error::Status { status: got, message, .. } = &err else { panic!("{err}") };
        assert_eq!(*got, status);
        assert!(body.contains(message.as_str()), "{message:?} comes from the body");
        assert_eq!(err.is_retryable(), retryable, "{status}");
        assert_eq!(err.code(), code);
        assert_eq!(err.retry_after(), retry_after.map(Duration::from_secs));
    }
}

#[tokio::test]
async fn a_body_that_is_not_a_sync_response_is_malformed() {
    let server = server::start(false, Limits::default()).await;
    let t = HttpTransport::new(&server.endpoint(false)).unwrap();
    for raw in [&b"<html>proxy error</html>"[..], br#"{"changes":[]}"#, br#"{"cursor":"x"}"#] {
        server.behave(|b| b.raw_body = Some(raw.to_vec()));
        let err = t.exchange(&pull("a")).await.unwrap_err();
        assert!(matches!(err, Error::MalformedResponse { .. }), "{err}");
        assert!(!err.is_retryable());
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_network_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/sync")).unwrap();
    let err = t.exchange(&pull("a")).await.unwrap_err();
    assert!(matches!(err, Error::Network { .. }), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn https_needs_a_trusted_certificate() {
    let server = server::start(true, Limits::default()).await;
    let untrusting = HttpTransport::new(&server.endpoint(true)).unwrap();
    let err = untrusting.exchange(&pull("a")).await.unwrap_err();
    assert!(matches!(err, Error::Network { .. }), "{err}");
    assert_eq!(server.model.lock().unwrap().seq(), 0);
    let trusting = HttpTransport::builder(&server.endpoint(true)).add_root_certificates_pem(CA_PEM).build().unwrap();
    trusting.exchange(&big_push("a", 1)).await.unwrap();
    assert_eq!(server.model.lock().unwrap().seq(), 1);
}

#[test]
fn bad_endpoints_are_configuration_errors() {
    for endpoint in ["not a url", "ftp://example.com/sync", "/sync"] {
        assert!(matches!(HttpTransport::new(endpoint), Err(Error::Config { .. })), "{endpoint}");
    }
    let bad_root = HttpTransport::builder("https://example.com/sync")
        .add_root_certificates_pem(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        .build();
    assert!(matches!(bad_root, Err(Error::Config { .. })));
}
