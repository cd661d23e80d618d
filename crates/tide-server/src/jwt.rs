//! JWT authentication: bearer tokens signed by the app's identity provider,
//! with a shared secret (HS256) or with keys from a JWKS (RS256, ES256,
//! `EdDSA`), a file or a URL fetched again when a token names a key it
//! lacks, checked for `exp`, `nbf`, `aud` and `iss`.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

use crate::auth::{AuthError, Authenticator, Namespace, Principal};

/// Default for [`JwtConfig::leeway`]: the clock skew allowed on `exp` and `nbf`.
pub const JWT_LEEWAY_DEFAULT: Duration = Duration::from_secs(30);
/// Default for [`JwtConfig::namespace_claim`].
pub const JWT_NAMESPACE_CLAIM_DEFAULT: &str = "tide_namespace";
/// Default for [`JwtConfig::principal_claim`].
pub const JWT_PRINCIPAL_CLAIM_DEFAULT: &str = "sub";
/// Default for [`JwtConfig::jwks_refetch_min`]: a token naming an unknown
/// key makes a JWKS URL be fetched again at most this often.
pub const JWKS_REFETCH_MIN_DEFAULT: Duration = Duration::from_mins(1);
/// The largest JWKS document read from a URL.
pub const JWKS_BYTES_MAX: usize = 1 << 20;
/// How long fetching a JWKS may take.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What a token must say, and where its namespace and principal are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The audience a token must name in `aud`; `None`: not checked.
    pub audience: Option<String>,
    /// The issuer a token must carry in `iss`; `None`: not checked.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` ([`JWT_LEEWAY_DEFAULT`]).
    pub leeway: Duration,
    /// The claim that names the namespace ([`JWT_NAMESPACE_CLAIM_DEFAULT`]).
    pub namespace_claim: String,
    /// The namespace of a token without that claim; `None`: such a token is
    /// refused.
    pub default_namespace: Option<String>,
    /// The claim that names the principal ([`JWT_PRINCIPAL_CLAIM_DEFAULT`]).
    pub principal_claim: String,
    /// How often a JWKS URL may be fetched again for a token naming a key
    /// it lacks ([`JWKS_REFETCH_MIN_DEFAULT`]).
    pub jwks_refetch_min: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            audience: None,
            issuer: None,
            leeway: JWT_LEEWAY_DEFAULT,
            namespace_claim: JWT_NAMESPACE_CLAIM_DEFAULT.into(),
            default_namespace: None,
            principal_claim: JWT_PRINCIPAL_CLAIM_DEFAULT.into(),
            jwks_refetch_min: JWKS_REFETCH_MIN_DEFAULT,
        }
    }
}

/// Why a key set cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("JWKS: {0}")]
pub struct JwksError(String);

/// A verifying key: the algorithm it verifies and, from a key set, its id.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    verifying: DecodingKey,
}

/// Authenticates requests by a JWT in `Authorization: Bearer`.
pub struct JwtAuthenticator {
    keys: RwLock<Arc<Vec<Key>>>,
    config: JwtConfig,
    /// Where the keys come from again, for a JWKS URL.
    url: Option<JwksUrl>,
}

/// A JWKS URL, its client, and when it was last fetched.
struct JwksUrl {
    uri: http::Uri,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Empty<bytes::Bytes>,
    >,
    fetched: Mutex<Instant>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("keys", &self.current().len())
            .field("url", &self.url.as_ref().map(|u| u.uri.to_string()))
            .field("config", &self.config)
            .finish()
    }
}

impl JwtAuthenticator {
    /// Tokens signed with HS256 and `secret`.
    pub fn hs256(secret: &[u8], config: JwtConfig) -> Self {
        let key = Key { kid: None, algorithm: Algorithm::HS256, verifying: DecodingKey::from_secret(secret) };
        Self { keys: RwLock::new(Arc::new(vec![key])), config, url: None }
    }

    /// Tokens signed by a key of a JWKS document (RSA for RS256, P-256 for
    /// ES256, Ed25519 for `EdDSA`), picked by the token's `kid`.
    ///
    /// # Errors
    /// [`JwksError`] when the document is not a key set or holds a key of
    /// another kind.
    pub fn from_jwks(json: &str, config: JwtConfig) -> Result<Self, JwksError> {
        Ok(Self { keys: RwLock::new(Arc::new(parse_jwks(json)?)), config, url: None })
    }

    /// Tokens signed by a key of the JWKS document at `url` (http or
    /// https), fetched now and again when a token names a key it lacks (at
    /// most every [`JwtConfig::jwks_refetch_min`]): keys rotated by the
    /// identity provider are picked up without a restart.
    ///
    /// # Errors
    /// [`JwksError`] when the URL is not http(s), cannot be fetched, or does
    /// not hold a usable key set.
    pub async fn from_jwks_url(url: &str, config: JwtConfig) -> Result<Self, JwksError> {
        let uri: http::Uri = url.parse().map_err(|e| JwksError(format!("{url}: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(JwksError(format!("{url} is not an http(s) URL")));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| JwksError(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        let source = JwksUrl { uri, client, fetched: Mutex::new(Instant::now()) };
        let keys = parse_jwks(&source.fetch().await?)?;
        Ok(Self { keys: RwLock::new(Arc::new(keys)), config, url: Some(source) })
    }

    fn current(&self) -> Arc<Vec<Key>> {
        Arc::clone(&self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Fetches the key set again, if it comes from a URL and was not
    /// fetched within [`JwtConfig::jwks_refetch_min`]; whether it did.
    async fn refetch(&self) -> Result<bool, AuthError> {
        let Some(source) = &self.url else { return Ok(false) };
        {
            let mut fetched = source.fetched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if fetched.elapsed() < self.config.jwks_refetch_min {
                return Ok(false);
            }
            *fetched = Instant::now();
        }
        let json = source.fetch().await.map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let keys = parse_jwks(&json).map_err(|e| AuthError::Unavailable(e.to_string()))?;
        *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(true)
    }
}

impl JwksUrl {
    async fn fetch(&self) -> Result<String, JwksError> {
        use http_body_util::BodyExt as _;
        let request = http::Request::get(self.uri.clone())
            .body(http_body_util::Empty::new())
            .map_err(|e| JwksError(e.to_string()))?;
        let fetch = async {
            let response = self.client.request(request).await.map_err(|e| JwksError(format!("{}: {e}", self.uri)))?;
            if !response.status().is_success() {
                return Err(JwksError(format!("{}: HTTP {}", self.uri, response.status())));
            }
            let body = http_body_util::Limited::new(response.into_body(), JWKS_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| JwksError(format!("{}: {e}", self.uri)))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|e| JwksError(format!("{}: {e}", self.uri)))
        };
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| JwksError(format!("{}: no answer within {JWKS_FETCH_TIMEOUT:?}", self.uri)))?
    }
}

/// The usable keys of a JWKS document.
fn parse_jwks(json: &str) -> Result<Vec<Key>, JwksError> {
    {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| JwksError(e.to_string()))?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(_), None | Some(KeyAlgorithm::ES256)) => Algorithm::ES256,
                (AlgorithmParameters::OctetKeyPair(_), None | Some(KeyAlgorithm::EdDSA)) => Algorithm::EdDSA,
                (_, alg) => {
                    return Err(JwksError(format!(
                        "key {:?}: {alg:?} is not RS256, ES256 or EdDSA",
                        jwk.common.key_id.as_deref().unwrap_or("")
                    )));
                }
            };
            let verifying = DecodingKey::from_jwk(jwk).map_err(|e| JwksError(e.to_string()))?;
            keys.push(Key { kid: jwk.common.key_id.clone(), algorithm, verifying });
        }
        if keys.is_empty() {
            return Err(JwksError("the key set is empty".into()));
        }
        Ok(keys)
    }
}

impl JwtAuthenticator {
    async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let find = |keys: &[Key]| {
            keys.iter().position(|k| k.algorithm == header.alg && (k.kid.is_none() || k.kid == header.kid))
        };
        let mut keys = self.current();
        if find(&keys).is_none() && self.refetch().await? {
            keys = self.current();
        }
        let key = &keys[find(&keys).ok_or(AuthError::Invalid)?];
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        match &self.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
        }
        let claims =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.verifying, &validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                })?
                .claims;
        let claim = |name: &str| claims.get(name).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty());
        let namespace = claim(&self.config.namespace_claim)
            .or(self.config.default_namespace.as_deref())
            .ok_or(AuthError::Invalid)?;
        let id = claim(&self.config.principal_claim).ok_or(AuthError::Invalid)?;
        Ok(Principal { id: id.to_owned(), namespace: Namespace::new(namespace) })
    }
}

#[async_trait::async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        self.verify(token.ok_or(AuthError::Missing)?).await
    }
}
