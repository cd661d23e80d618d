//! The transport's error: what went wrong, and whether a retry can help.

use std::time::Duration;

use tide_core::{ErrorBody, ErrorCode};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached or the connection broke. Retryable.
    #[error("network error: {message}")]
    Network {
        /// What happened.
        message: String,
        /// The cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// No complete response within the exchange timeout. Retryable: the
    /// server may or may not have committed the request (see cancel safety).
    #[error("no response within {after:?}")]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// The server answered with a non-success status. Retryable for 408,
    /// 429 and 5xx; not for other statuses.
    #[error("server answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The machine-readable code from the error body, if any.
        code: Option<ErrorCode>,
        /// The human text from the error body (or the start of the body).
        message: String,
        /// The index of the op that caused the refusal, if the server said.
        op: Option<usize>,
        /// How long the server asked the client to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The response is not a sync response. Not retryable.
    #[error("malformed response: {message}")]
    MalformedResponse {
        /// What is wrong with it.
        message: String,
    },
    /// The response body exceeded the configured limit. Not retryable.
    #[error("response body larger than {limit} bytes")]
    ResponseTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The header provider failed. Retryable: a token service may recover.
    #[error("header provider failed: {source}")]
    Headers {
        /// The provider's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The transport is misconfigured (a bad endpoint or certificate).
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// Whether sending the same request again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Network { .. } | Self::Timeout { .. } | Self::Headers { .. } => true,
            Self::Status { status, .. } => matches!(status, 408 | 429) || *status >= 500,
            Self::MalformedResponse { .. } | Self::ResponseTooLarge { .. } | Self::Config { .. } => false,
        }
    }

    /// How long the server asked to wait before retrying, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The server's machine-readable error code, if it sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Status { code, .. } => *code,
            _ => None,
        }
    }

    /// The error for a non-success status, from the body the server sent.
    pub fn from_status(status: u16, body: &[u8], retry_after: Option<Duration>) -> Self {
        if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
            return Self::Status { status, code: b.code, message: b.error, op: b.op, retry_after };
        }
        let message: String = String::from_utf8_lossy(body).chars().take(200).collect();
        Self::Status { status, code: None, message, op: None, retry_after }
    }

    #[cfg(feature = "http")]
    pub(crate) fn network(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Network { message: message.into(), source: Some(source.into()) }
    }
}
