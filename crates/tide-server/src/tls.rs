//! HTTPS: a certificate chain and key from PEM files, read again on demand
//! (the binary does on SIGHUP) without dropping a connection: handshakes
//! after a reload get the new certificate, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS {path}: {message}")]
pub struct TlsError {
    path: String,
    message: String,
}

/// A server's certificate and key, from PEM files, reloadable.
#[derive(Clone)]
pub struct Tls {
    resolver: Arc<Reloadable>,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.resolver.cert).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner)))
    }
}

impl Tls {
    /// The certificate chain in `cert` and its private key in `key` (PEM;
    /// PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate or key, or a key
    /// that rustls cannot sign with.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let current = load(cert, key)?;
        let resolver = Arc::new(Reloadable {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(current)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError { path: cert.display().to_string(), message: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { resolver, config: Arc::new(config) })
    }

    /// Reads the files again; new handshakes use what they hold now. On an
    /// error the certificate in use stays.
    ///
    /// # Errors
    /// As [`Tls::from_pem_files`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.resolver.cert, &self.resolver.key)?;
        *self.resolver.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let fail = |path: &Path, message: String| TlsError { path: path.display().to_string(), message };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| fail(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(fail(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key, e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| fail(key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| fail(key, format!("does not match the certificate: {e}")))?;
    Ok(certified)
}
