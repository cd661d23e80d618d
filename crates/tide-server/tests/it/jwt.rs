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
