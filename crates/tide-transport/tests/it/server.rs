//! A small sync server over real HTTP(S) for the transport's tests: hyper
//! serving `tide_core::Model`, with knobs to misbehave. (The product server
//! is tide-server; this one exists so the transport is tested over real
//! sockets, TLS and gzip without depending on it.)

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tide_core::{Limits, Model, SyncRequest};

/// How the server should misbehave on the next requests.
#[derive(Default)]
pub(crate) struct Behaviour {
    /// Answer with this status, `Retry-After` and body instead of serving.
    pub(crate) status: Option<(u16, Option<u64>, String)>,
    /// Answer 200 with this body instead of serving.
    pub(crate) raw_body: Option<Vec<u8>>,
    /// Wait this long before answering.
    pub(crate) delay: Option<Duration>,
    /// Say `Accept-Encoding: gzip` in responses.
    pub(crate) advertise_gzip: bool,
    /// The headers of the last request.
    pub(crate) last_headers: Option<http::HeaderMap>,
    /// Whether the last request body was gzip-compressed.
    pub(crate) last_gzipped: bool,
    /// Whether the last response was gzip-compressed.
    pub(crate) last_response_gzipped: bool,
}

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) connections: Arc<AtomicUsize>,
    pub(crate) model: Arc<Mutex<Model>>,
    pub(crate) behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub(crate) fn endpoint(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        let host = if tls { "localhost" } else { "127.0.0.1" };
        format!("{scheme}://{host}:{}/sync", self.addr.port())
    }

    pub(crate) fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }
}

pub(crate) const CA_PEM: &[u8] = include_bytes!("../fixtures/ca.pem");

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(include_bytes!("../fixtures/server.pem")).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("../fixtures/server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

pub(crate) async fn start(tls: bool, limits: Limits) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let model = Arc::new(Mutex::new(Model::new(limits)));
    let behaviour = Arc::new(Mutex::new(Behaviour::default()));
    let acceptor = tls.then(tls_acceptor);
    let (conns, m, b) = (Arc::clone(&connections), Arc::clone(&model), Arc::clone(&behaviour));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            let (m, b, acceptor) = (Arc::clone(&m), Arc::clone(&b), acceptor.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, Arc::clone(&m), Arc::clone(&b)));
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            });
        }
    });
    TestServer { addr, connections, model, behaviour, task }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    model: Arc<Mutex<Model>>,
    behaviour: Arc<Mutex<Behaviour>>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.unwrap().to_bytes().to_vec();
    let gzipped = parts.headers.get("content-encoding").is_some_and(|v| v == "gzip");
    if gzipped {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out).unwrap();
        body = out;
    }
    let accepts_gzip = parts.headers.get("accept-encoding").is_some_and(|v| v.to_str().unwrap().contains("gzip"));
    let (delay, status, raw, advertise) = {
        let mut b = behaviour.lock().unwrap();
        b.last_headers = Some(parts.headers.clone());
        b.last_gzipped = gzipped;
        (b.delay, b.status.clone(), b.raw_body.clone(), b.advertise_gzip)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = hyper::Response::builder().header("content-type", "application/json");
    if advertise {
        resp = resp.header("accept-encoding", "gzip");
    }
    if let Some((status, retry_after, text)) = status {
        if let Some(s) = retry_after {
            resp = resp.header("retry-after", s.to_string());
        }
        return Ok(resp.status(status).body(Full::new(Bytes::from(text))).unwrap());
    }
    if let Some(raw) = raw {
        return Ok(resp.body(Full::new(Bytes::from(raw))).unwrap());
    }
    let (status, mut out) = match SyncRequest::from_json(&body) {
        Err(v) => (v.status(), serde_json::to_vec(&v.to_body()).unwrap()),
        Ok(req) => match model.lock().unwrap().exchange(&req) {
            Ok(r) => (200, serde_json::to_vec(&r).unwrap()),
            Err(v) => (v.status(), serde_json::to_vec(&v.to_body()).unwrap()),
        },
    };
    let compress = accepts_gzip && out.len() > 1024;
    if compress {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&out).unwrap();
        out = enc.finish().unwrap();
        resp = resp.header("content-encoding", "gzip");
    }
    behaviour.lock().unwrap().last_response_gzipped = compress;
    Ok(resp.status(status).body(Full::new(Bytes::from(out))).unwrap())
}
