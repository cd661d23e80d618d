//! JWT authentication: HS256 with a secret; RS256, ES256 and `EdDSA` with a
//! JWKS (the test keys in `tests/fixtures/jwt`); `exp`, `nbf`, `aud`, `iss`;
//! expired told apart from invalid, over HTTP too.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tide_server::{AuthError, Authenticator, JwtAuthenticator, JwtConfig, Namespace, Principal};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt/");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}{name}")).unwrap()
}

fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// Claims valid for an hour, for `sub` in namespace `ns`.
fn claims(sub: &str, ns: &str) -> Value {
    json!({"sub": sub, "tide_namespace": ns, "exp": now() + 3_600, "iat": now(), "aud": "tide", "iss": "https://id.example"})
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let header = Header { kid: kid.map(str::to_owned), ..Header::new(alg) };
    encode(&header, claims, key).unwrap()
}

fn config() -> JwtConfig {
    JwtConfig { audience: Some("tide".into()), issuer: Some("https://id.example".into()), ..JwtConfig::default() }
}

async fn check(auth: &JwtAuthenticator, token: &str) -> Result<Principal, AuthError> {
    auth.authenticate(Some(token)).await
}

#[tokio::test]
async fn hs256_tokens_are_checked_for_signature_time_audience_and_issuer() {
    let auth = JwtAuthenticator::hs256(b"a shared secret", config());
    let key = EncodingKey::from_secret(b"a shared secret");
    let ok = sign(Algorithm::HS256, None, &key, &claims("alice", "team"));
    assert_eq!(check(&auth, &ok).await, Ok(Principal { id: "alice".into(), namespace: Namespace::new("team") }));

    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = claims("alice", "team");
        change(&mut c);
        sign(Algorithm::HS256, None, &key, &c)
    };
    let expired = with(&|c| c["exp"] = json!(now() - 3_600));
    assert_eq!(check(&auth, &expired).await, Err(AuthError::Expired), "expired is told apart");
    let within_leeway = with(&|c| c["exp"] = json!(now() - 5));
    assert!(check(&auth, &within_leeway).await.is_ok(), "a few seconds of skew are allowed");
    let not_yet = with(&|c| c["nbf"] = json!(now() + 3_600));
    assert_eq!(check(&auth, &not_yet).await, Err(AuthError::Invalid));
    let other_audience = with(&|c| c["aud"] = json!("another app"));
    assert_eq!(check(&auth, &other_audience).await, Err(AuthError::Invalid));
    let other_issuer = with(&|c| c["iss"] = json!("https://evil.example"));
    assert_eq!(check(&auth, &other_issuer).await, Err(AuthError::Invalid));
    let no_namespace = with(&|c| {
        c.as_object_mut().unwrap().remove("tide_namespace");
    });
    assert_eq!(check(&auth, &no_namespace).await, Err(AuthError::Invalid), "no namespace, no default");
    let forged = sign(Algorithm::HS256, None, &EncodingKey::from_secret(b"a guess"), &claims("alice", "team"));
    assert_eq!(check(&auth, &forged).await, Err(AuthError::Invalid));
    assert_eq!(check(&auth, "not a jwt").await, Err(AuthError::Invalid));
    assert_eq!(auth.authenticate(None).await, Err(AuthError::Missing));

    let defaulted = JwtAuthenticator::hs256(
        b"a shared secret",
        JwtConfig { default_namespace: Some("default".into()), ..config() },
    );
    assert_eq!(check(&defaulted, &no_namespace).await.unwrap().namespace, Namespace::new("default"));
}

#[tokio::test]
async fn jwks_keys_verify_rs256_es256_and_eddsa_tokens_by_their_kid() {
    let jwks = String::from_utf8(fixture("jwks.json")).unwrap();
    let auth = JwtAuthenticator::from_jwks(&jwks, config()).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&fixture("ed25519.pem")).unwrap();
    for (alg, kid, key) in
        [(Algorithm::RS256, "rsa-1", &rsa), (Algorithm::ES256, "ec-1", &ec), (Algorithm::EdDSA, "ed-1", &ed)]
    {
        let token = sign(alg, Some(kid), key, &claims("bob", "team"));
        assert_eq!(check(&auth, &token).await.unwrap().id, "bob", "{alg:?}");
        let mut expired = claims("bob", "team");
        expired["exp"] = json!(now() - 3_600);
        assert_eq!(check(&auth, &sign(alg, Some(kid), key, &expired)).await, Err(AuthError::Expired), "{alg:?}");
    }
    // A key that is not in the set: under an unknown kid, or passed off as a known one.
    let other = EncodingKey::from_rsa_pem(&fixture("rsa-other.pem")).unwrap();
    let unknown = sign(Algorithm::RS256, Some("rsa-2"), &other, &claims("mallory", "team"));
    assert_eq!(check(&auth, &unknown).await, Err(AuthError::Invalid));
    let posing = sign(Algorithm::RS256, Some("rsa-1"), &other, &claims("mallory", "team"));
    assert_eq!(check(&auth, &posing).await, Err(AuthError::Invalid));
    // An algorithm the key is not for.
    let hs = sign(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(b"x"), &claims("mallory", "team"));
    assert_eq!(check(&auth, &hs).await, Err(AuthError::Invalid));

    assert!(JwtAuthenticator::from_jwks("{}", config()).is_err());
    assert!(JwtAuthenticator::from_jwks(r#"{"keys":[]}"#, config()).is_err());
}

#[tokio::test]
async fn over_http_an_expired_token_is_401_token_expired_and_a_fresh_one_is_served() {
    let auth = Arc::new(JwtAuthenticator::hs256(b"s3cret", config()));
    let running =
        crate::support::start_on_with(crate::support::Storage::Sqlite, tide_server::ServerConfig::default(), auth)
            .await;
    let key = EncodingKey::from_secret(b"s3cret");
    let mut expired = claims("alice", "team");
    expired["exp"] = json!(now() - 3_600);
    let endpoint = running.endpoint();
    let ask = |token: String| {
        let endpoint = endpoint.clone();
        async move {
            let t = tide_transport::HttpTransport::builder(&endpoint)
                .header("authorization", format!("Bearer {token}"))
                .build()
                .unwrap();
            tide_transport::Transport::exchange(&t, &tide_core::SyncRequest::new("n", None)).await
        }
    };
    let err = ask(sign(Algorithm::HS256, None, &key, &expired)).await.unwrap_err();
    assert_eq!(err.code(), Some(tide_core::ErrorCode::TokenExpired), "{err}");
    let err = ask("garbage".into()).await.unwrap_err();
    assert_eq!(err.code(), Some(tide_core::ErrorCode::Unauthorized), "{err}");
    assert!(ask(sign(Algorithm::HS256, None, &key, &claims("alice", "team"))).await.is_ok());
}

/// A key set served over HTTP from `set` (replaceable), one connection at
/// a time; returns its URL and how many times it was fetched.
async fn serve_jwks(
    set: Arc<std::sync::Mutex<String>>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
    let fetched = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&fetched);
    let task = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = set.lock().unwrap().clone();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
        }
    });
    (url, fetched, task)
}

#[tokio::test]
async fn a_jwks_url_is_fetched_again_for_an_unknown_key_so_rotated_keys_work_without_a_restart() {
    use std::sync::atomic::Ordering;
    let full: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    let only = |kids: &[&str]| {
        let keys: Vec<&Value> =
            full["keys"].as_array().unwrap().iter().filter(|k| kids.contains(&k["kid"].as_str().unwrap())).collect();
        json!({ "keys": keys }).to_string()
    };
    let set = Arc::new(std::sync::Mutex::new(only(&["rsa-1"])));
    let (url, fetched, server) = serve_jwks(Arc::clone(&set)).await;
    let eager = JwtConfig { jwks_refetch_min: std::time::Duration::ZERO, ..config() };
    let auth = JwtAuthenticator::from_jwks_url(&url, eager).await.unwrap();
    assert_eq!(fetched.load(Ordering::SeqCst), 1, "fetched at start");

    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec.pem")).unwrap();
    let by_rsa = sign(Algorithm::RS256, Some("rsa-1"), &rsa, &claims("alice", "team"));
    let by_ec = sign(Algorithm::ES256, Some("ec-1"), &ec, &claims("bob", "team"));
    assert_eq!(check(&auth, &by_rsa).await.unwrap().id, "alice");
    assert_eq!(fetched.load(Ordering::SeqCst), 1, "a known key needs no fetch");
    // An unknown key: fetched again, still unknown.
    assert_eq!(check(&auth, &by_ec).await, Err(AuthError::Invalid));
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
    // The provider rotates in the new key: the next token with it is accepted.
    *set.lock().unwrap() = only(&["rsa-1", "ec-1"]);
    assert_eq!(check(&auth, &by_ec).await.unwrap().id, "bob");
    assert_eq!(fetched.load(Ordering::SeqCst), 3);
    // The provider unreachable: a token naming an unknown key is a 503
    // (retry later), never a pass; known keys go on working.
    server.abort();
    let _ = server.await;
    let ed = EncodingKey::from_ed_pem(&fixture("ed25519.pem")).unwrap();
    let by_ed25519 = sign(Algorithm::EdDSA, Some("ed-1"), &ed, &claims("carol", "team"));
    assert!(matches!(check(&auth, &by_ed25519).await, Err(AuthError::Unavailable(_))));
    assert_eq!(check(&auth, &by_rsa).await.unwrap().id, "alice");

    // With the default interval, unknown keys cannot make it fetch again and again.
    let set = Arc::new(std::sync::Mutex::new(only(&["rsa-1"])));
    let (url, fetched, _server) = serve_jwks(set).await;
    let auth = JwtAuthenticator::from_jwks_url(&url, config()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(check(&auth, &by_ec).await, Err(AuthError::Invalid));
    }
    assert_eq!(fetched.load(Ordering::SeqCst), 1, "at most once a minute");
    assert!(JwtAuthenticator::from_jwks_url("ftp://x/jwks", config()).await.is_err());
}

/// The bad-input battery's tokens: each bad one, carrying a write, is
/// answered 401 with its code, the server stays up, and nothing is stored.
#[tokio::test]
async fn bad_tokens_are_refused_and_store_nothing() {
    let auth = Arc::new(JwtAuthenticator::hs256(b"s3cret", config()));
    let running =
        crate::support::start_on_with(crate::support::Storage::Sqlite, tide_server::ServerConfig::default(), auth)
            .await;
    let key = EncodingKey::from_secret(b"s3cret");
    let good = sign(Algorithm::HS256, None, &key, &claims("alice", "team"));
    // {"alg":"none","typ":"JWT"} . valid claims (expiring in 2100) . no signature
    let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsInRpZGVfbmFtZXNwYWNlIjoidGVhbSIsImV4cCI6NDEwMjQ0NDgwMCwiYXVkIjoidGlkZSIsImlzcyI6Imh0dHBzOi8vaWQuZXhhbXBsZSJ9.".to_owned();
    let mut wrong_audience = claims("alice", "team");
    wrong_audience["aud"] = json!("someone-else");
    let mut no_subject = claims("alice", "team");
    no_subject.as_object_mut().unwrap().remove("sub");
    let mut tampered = good.clone();
    tampered.insert(good.len() / 2, 'x');
    let cases: Vec<(&str, String, tide_core::ErrorCode)> = vec![
        ("garbage", "not.a.jwt".into(), tide_core::ErrorCode::Unauthorized),
        ("alg none", unsigned, tide_core::ErrorCode::Unauthorized),
        (
            "another secret",
            sign(Algorithm::HS256, None, &EncodingKey::from_secret(b"guess"), &claims("alice", "team")),
            tide_core::ErrorCode::Unauthorized,
        ),
        ("wrong audience", sign(Algorithm::HS256, None, &key, &wrong_audience), tide_core::ErrorCode::Unauthorized),
        ("no subject", sign(Algorithm::HS256, None, &key, &no_subject), tide_core::ErrorCode::Unauthorized),
        ("tampered", tampered, tide_core::ErrorCode::Unauthorized),
        ("empty", String::new(), tide_core::ErrorCode::Unauthorized),
    ];
    let endpoint = running.endpoint();
    let with = |token: &str| {
        tide_transport::HttpTransport::builder(&endpoint)
            .header("authorization", format!("Bearer {token}"))
            .build()
            .unwrap()
    };
    let mut write = tide_core::SyncRequest::new("n", None);
    write.ops = vec![tide_core::Op {
        collection: "c".into(),
        id: "planted".into(),
        stamp: tide_core::Stamp::new(1, "n"),
        payload: tide_core::Payload::Put(tide_core::Doc::from_value(&json!({})).unwrap()),
        op_id: None,
    }];
    for (name, token, code) in cases {
        let err = tide_transport::Transport::exchange(&with(&token), &write).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{name}: {err}");
    }
    let after = tide_transport::Transport::exchange(&with(&good), &tide_core::SyncRequest::new("n", None)).await;
    assert_eq!(after.expect("the server is still up").changes, vec![], "nothing was stored");
}
