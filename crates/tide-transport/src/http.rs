//! The HTTP(S) transport: one `POST` per exchange over hyper, with rustls.

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tide_core::{SyncRequest, SyncResponse};

use crate::{Error, Headers, Transport};

use crate::{CONNECT_TIMEOUT_DEFAULT, EXCHANGE_TIMEOUT_DEFAULT};
/// Default for [`HttpTransportBuilder::response_bytes_max`]: 64 MiB, after
/// decompression.
pub const RESPONSE_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// Request bodies at least this large are gzip-compressed once the server
/// has said it accepts gzip.
pub const GZIP_REQUEST_BYTES_MIN: usize = 1024;
/// How long an idle pooled connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Configures an [`HttpTransport`].
#[derive(Debug)]
#[must_use]
pub struct HttpTransportBuilder {
    endpoint: String,
    headers: Headers,
    connect_timeout: Duration,
    exchange_timeout: Duration,
    response_bytes_max: usize,
    roots_pem: Vec<Vec<u8>>,
}

impl HttpTransportBuilder {
    /// Adds a header sent with every request (turning the headers static).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let mut list = match self.headers {
            Headers::Static(list) => list,
            _ => Vec::new(),
        };
        list.push((name.into(), value.into()));
        self.headers = Headers::Static(list);
        self
    }

    /// Sets the headers: static, or a provider asked before every request.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// How long to wait for a TCP connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a whole exchange may take, from sending to the last byte of
    /// the response (default 60 s).
    pub fn exchange_timeout(mut self, timeout: Duration) -> Self {
        self.exchange_timeout = timeout;
        self
    }

    /// The largest response body accepted, after decompression (default 64 MiB).
    pub fn response_bytes_max(mut self, bytes: usize) -> Self {
        self.response_bytes_max = bytes;
        self
    }

    /// Trusts the certificates in `pem` as roots, besides the public web's
    /// (for a private CA or a self-signed server).
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Self {
        self.roots_pem.push(pem.to_vec());
        self
    }

    /// Builds the transport.
    ///
    /// # Errors
    /// [`Error::Config`] for an endpoint that is not an `http` or `https`
    /// URL, or a root certificate that does not parse.
    pub fn build(self) -> Result<HttpTransport, Error> {
        let endpoint: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e| Error::Config { message: format!("endpoint {:?}: {e}", self.endpoint) })?;
        if !matches!(endpoint.scheme_str(), Some("http" | "https")) || endpoint.host().is_none() {
            return Err(Error::Config { message: format!("endpoint {:?} is not an http(s) URL", self.endpoint) });
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for pem in &self.roots_pem {
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Config { message: format!("root certificate: {e}") })?;
                roots.add(cert).map_err(|e| Error::Config { message: format!("root certificate: {e}") })?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config { message: format!("TLS: {e}") })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(HttpTransport {
            client,
            endpoint,
            headers: self.headers,
            exchange_timeout: self.exchange_timeout,
            response_bytes_max: self.response_bytes_max,
            gzip_requests: AtomicBool::new(false),
        })
    }
}

/// Sync exchanges as `POST` requests over HTTP/1.1 or HTTPS, reusing
/// connections.
pub struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: http::Uri,
    headers: Headers,
    exchange_timeout: Duration,
    response_bytes_max: usize,
    /// Set once the server has said (with `Accept-Encoding`) that it takes gzip.
    gzip_requests: AtomicBool,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// A transport to `endpoint` (for example `https://example.com/sync`)
    /// with the default settings.
    ///
    /// # Errors
    /// See [`HttpTransportBuilder::build`].
    pub fn new(endpoint: &str) -> Result<Self, Error> {
        Self::builder(endpoint).build()
    }

    /// Starts configuring a transport to `endpoint`.
    pub fn builder(endpoint: &str) -> HttpTransportBuilder {
        HttpTransportBuilder {
            endpoint: endpoint.to_owned(),
            headers: Headers::None,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            exchange_timeout: EXCHANGE_TIMEOUT_DEFAULT,
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
            roots_pem: Vec::new(),
        }
    }

    async fn request(&self, request: &SyncRequest) -> Result<http::Request<Full<Bytes>>, Error> {
        let extra = self.headers.resolve().await.map_err(|source| Error::Headers { source })?;
        let mut body = serde_json::to_vec(request).expect("requests serialize");
        let mut req = http::Request::post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT_ENCODING, "gzip");
        if self.gzip_requests.load(Ordering::Relaxed) && body.len() >= GZIP_REQUEST_BYTES_MIN {
            body = gzip(&body);
            req = req.header(CONTENT_ENCODING, "gzip");
        }
        let mut req = req.body(Full::new(Bytes::from(body))).expect("a valid request");
        for (name, value) in extra {
            let bad = |e: &dyn std::fmt::Display| Error::Headers { source: format!("header {name:?}: {e}").into() };
            let name_h = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
            let value_h = HeaderValue::from_str(&value).map_err(|e| bad(&e))?;
            // The caller's headers win, as in the original (`content-type` included).
            req.headers_mut().insert(name_h, value_h);
        }
        Ok(req)
    }

    /// The server's health: `GET /healthz` beside the endpoint, with this
    /// transport's headers, as JSON (tide-server answers its status, version
    /// and protocol).
    ///
    /// # Errors
    /// The network's, a timeout, a non-2xx status or a body that is not JSON.
    pub async fn health(&self) -> Result<serde_json::Value, Error> {
        let mut parts = self.endpoint.clone().into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/healthz"));
        let uri = http::Uri::from_parts(parts).map_err(|e| Error::Config { message: format!("endpoint: {e}") })?;
        let mut req = http::Request::get(uri).body(Full::new(Bytes::new())).expect("a valid request");
        let extra = self.headers.resolve().await.map_err(|source| Error::Headers { source })?;
        for (name, value) in extra {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                req.headers_mut().insert(n, v);
            }
        }
        let (status, _, body) = tokio::time::timeout(self.exchange_timeout, self.send(req))
            .await
            .map_err(|_| Error::Timeout { after: self.exchange_timeout })??;
        if !status.is_success() {
            return Err(Error::Status {
                status: status.as_u16(),
                code: None,
                message: String::from_utf8_lossy(&body).into_owned(),
                op: None,
                retry_after: None,
            });
        }
        serde_json::from_slice(&body).map_err(|e| Error::MalformedResponse { message: format!("/healthz: {e}") })
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<(http::StatusCode, http::HeaderMap, Bytes), Error> {
        let resp = self.client.request(req).await.map_err(|e| Error::network("request failed", e))?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, self.response_bytes_max).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Error::ResponseTooLarge { limit: self.response_bytes_max }
            } else {
                Error::Network { message: "response body broke off".into(), source: Some(e) }
            }
        })?;
        let mut bytes = bytes.to_bytes();
        let gzipped = parts.headers.get(CONTENT_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        if gzipped {
            bytes = gunzip(&bytes, self.response_bytes_max)?;
        }
        Ok((parts.status, parts.headers, bytes))
    }
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, Error> {
        let req = self.request(request).await?;
        let (status, headers, body) = tokio::time::timeout(self.exchange_timeout, self.send(req))
            .await
            .map_err(|_| Error::Timeout { after: self.exchange_timeout })??;
        let accepts_gzip = headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case("gzip"))));
        if accepts_gzip {
            self.gzip_requests.store(true, Ordering::Relaxed);
        }
        let retry_after = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok());
        decode_response(status.as_u16(), retry_after, &body)
    }
}

/// A server's answer as the client reads it: a 2xx body decoded as a
/// [`SyncResponse`] (its documents checked and kept as their canonical
/// text), any other status as [`Error::Status`] with the body's code and the
/// `Retry-After` seconds. Public so fuzzers and tests can drive it with any
/// bytes; it never panics.
///
/// # Errors
/// [`Error::Status`] for a non-2xx status, [`Error::MalformedResponse`] for
/// a body that is not a sync response.
pub fn decode_response(status: u16, retry_after: Option<&str>, body: &[u8]) -> Result<SyncResponse, Error> {
    if !(200..300).contains(&status) {
        let retry_after = retry_after.and_then(|v| retry_after_at(v, std::time::SystemTime::now()));
        return Err(Error::from_status(status, body, retry_after));
    }
    serde_json::from_slice(body).map_err(|e| Error::MalformedResponse { message: e.to_string() })
}

/// A `Retry-After` value as a wait from `now`: seconds, or an HTTP date
/// (a date already past is no wait at all). `None` when it is neither.
fn retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    enc.write_all(body).expect("writing to memory cannot fail");
    enc.finish().expect("writing to memory cannot fail")
}

fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, Error> {
    let mut out = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    dec.read_to_end(&mut out).map_err(|e| Error::MalformedResponse { message: format!("gzip body: {e}") })?;
    if out.len() > limit {
        return Err(Error::ResponseTooLarge { limit });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:26:30 GMT").unwrap();
        assert_eq!(retry_after_at("150", now), Some(Duration::from_secs(150)));
        assert_eq!(retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(retry_after_at("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO), "already past");
        assert_eq!(retry_after_at("soon", now), None);
    }
}
