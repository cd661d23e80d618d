//! Authentication: a token in, a principal and its namespace out.

use std::path::Path;

/// The namespace a request reads and writes. Every stored row belongs to
/// one; a principal reaches only its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    /// A namespace by name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// Its name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who is asking, as established by an [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// An id for logs (never the token).
    pub id: String,
    /// The one namespace this principal may read and write.
    pub namespace: Namespace,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials (401).
    #[error("missing credentials")]
    Missing,
    /// Credentials that are not valid (401).
    #[error("invalid credentials")]
    Invalid,
    /// Credentials that were valid and have expired (401 `token_expired`):
    /// a client with fresh ones retries at once.
    #[error("expired credentials")]
    Expired,
    /// The verifier cannot answer now (503; never treated as success).
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

/// Turns the bearer token of a request (if any) into a [`Principal`].
/// Embedding applications implement it with their own token scheme.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates `token`, the value after `Bearer ` in `Authorization`.
    async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError>;
}

/// No authentication: everyone is one principal in one namespace. For
/// local use only (`tide-server --no-auth`).
#[derive(Debug, Clone)]
pub struct NoAuth {
    namespace: Namespace,
}

impl NoAuth {
    /// Everyone shares `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self { namespace: Namespace::new(namespace) }
    }
}

#[async_trait::async_trait]
impl Authenticator for NoAuth {
    async fn authenticate(&self, _token: Option<&str>) -> Result<Principal, AuthError> {
        Ok(Principal { id: "anonymous".into(), namespace: self.namespace.clone() })
    }
}

/// A fixed set of tokens, each mapped to a namespace (and a principal id).
/// Tokens are compared in constant time.
#[derive(Clone)]
pub struct StaticTokens {
    tokens: Vec<(Vec<u8>, Principal)>,
}

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokens").field("tokens", &self.tokens.len()).finish()
    }
}

/// Why a token list does not parse.
#[derive(Debug, thiserror::Error)]
#[error("token list, line {line}: {message}")]
pub struct TokensError {
    /// The 1-based line (or entry) number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl StaticTokens {
    /// From `(token, namespace)` pairs; each token is its own principal
    /// (see [`token_principal`]).
    pub fn new<T: Into<String>, N: Into<String>>(pairs: impl IntoIterator<Item = (T, N)>) -> Self {
        let tokens = pairs
            .into_iter()
            .map(|(t, n)| {
                let (t, n) = (t.into(), n.into());
                let id = token_principal(&t, &n);
                (t.into_bytes(), Principal { id, namespace: Namespace::new(n) })
            })
            .collect();
        Self { tokens }
    }

    /// Parses a token file: one `TOKEN NAMESPACE [PRINCIPAL]` per line;
    /// blank lines and lines starting with `#` are skipped.
    pub fn parse_file(text: &str) -> Result<Self, TokensError> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let (token, namespace, id) = match words.as_slice() {
                [t, n] => (*t, *n, token_principal(t, n)),
                [t, n, p] => (*t, *n, (*p).to_owned()),
                _ => {
                    return Err(TokensError { line: i + 1, message: "expected TOKEN NAMESPACE [PRINCIPAL]".into() });
                }
            };
            tokens.push((token.as_bytes().to_vec(), Principal { id, namespace: Namespace::new(namespace) }));
        }
        Ok(Self { tokens })
    }

    /// Reads [`StaticTokens::parse_file`]'s format from `path`.
    pub fn from_file(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TokensError { line: 0, message: format!("{}: {e}", path.display()) })?;
        Self::parse_file(&text)
    }

    /// Parses `TOKEN=NAMESPACE,TOKEN=NAMESPACE` (as in an environment variable).
    pub fn parse_list(list: &str) -> Result<Self, TokensError> {
        let mut pairs = Vec::new();
        for (i, entry) in list.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let Some((token, namespace)) = entry.split_once('=') else {
                return Err(TokensError { line: i + 1, message: "expected TOKEN=NAMESPACE".into() });
            };
            pairs.push((token.trim().to_owned(), namespace.trim().to_owned()));
        }
        Ok(Self::new(pairs))
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is known.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The principal id of a token given without one: its namespace and 8 hex
/// digits of a hash of the token, so tokens are told apart in logs and node
/// ids bind to one token, while the id says next to nothing about the token.
pub fn token_principal(token: &str, namespace: &str) -> String {
    let hash = token.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{namespace}:{:08x}", hash >> 32)
}

/// Compares without an early exit, so timing says nothing about the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait::async_trait]
impl Authenticator for StaticTokens {
    async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let token = token.ok_or(AuthError::Missing)?.as_bytes();
        // Look at every entry, so the time taken does not say which matched.
        let mut found = None;
        for (known, principal) in &self.tokens {
            if constant_time_eq(known, token) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(AuthError::Invalid)
    }
}
