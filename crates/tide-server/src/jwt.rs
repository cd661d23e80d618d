//! JWT authentication: bearer tokens signed by the app's identity provider,
//! with a shared secret (HS256) or with keys from a JWKS (RS256, ES256,
//! `EdDSA`), checked for `exp`, `nbf`, `aud` and `iss`.

use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

use crate::auth::{AuthError, Authenticator, Namespace, Principal};

/// Default for [`JwtConfig::leeway`]: the clock skew allowed on `exp` and `nbf`.
pub const JWT_LEEWAY_DEFAULT: Duration = Duration::from_secs(30);
/// Default for [`JwtConfig::namespace_claim`].
pub const JWT_NAMESPACE_CLAIM_DEFAULT: &str = "tide_namespace";
/// Default for [`JwtConfig::principal_claim`].
pub const JWT_PRINCIPAL_CLAIM_DEFAULT: &str = "sub";

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
    keys: Vec<Key>,
    config: JwtConfig,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator").field("keys", &self.keys.len()).field("config", &self.config).finish()
    }
}

impl JwtAuthenticator {
    /// Tokens signed with HS256 and `secret`.
    pub fn hs256(secret: &[u8], config: JwtConfig) -> Self {
        let key = Key { kid: None, algorithm: Algorithm::HS256, verifying: DecodingKey::from_secret(secret) };
        Self { keys: vec![key], config }
    }

    /// Tokens signed by a key of a JWKS document (RSA for RS256, P-256 for
    /// ES256, Ed25519 for `EdDSA`), picked by the token's `kid`.
    ///
    /// # Errors
    /// [`JwksError`] when the document is not a key set or holds a key of
    /// another kind.
    pub fn from_jwks(json: &str, config: JwtConfig) -> Result<Self, JwksError> {
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
        Ok(Self { keys, config })
    }

    fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.algorithm == header.alg && (k.kid.is_none() || k.kid == header.kid))
            .ok_or(AuthError::Invalid)?;
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
        self.verify(token.ok_or(AuthError::Missing)?)
    }
}
