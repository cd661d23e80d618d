//! Request headers: a static set, or a provider asked before every exchange
//! (for short-lived tokens).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed error from a header provider.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Supplies headers before every exchange, for example a fresh bearer token.
#[async_trait::async_trait]
pub trait HeaderProvider: Send + Sync {
    /// The headers for the next exchange, as `(name, value)` pairs.
    async fn headers(&self) -> Result<Vec<(String, String)>, BoxError>;
}

/// The extra headers of every request.
#[derive(Clone, Default)]
pub enum Headers {
    /// None.
    #[default]
    None,
    /// The same headers on every request.
    Static(Vec<(String, String)>),
    /// Headers asked of a provider before every request.
    Provider(Arc<dyn HeaderProvider>),
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            // Header values are often secrets: show names only.
            Self::Static(h) => f.debug_list().entries(h.iter().map(|(k, _)| k)).finish(),
            Self::Provider(_) => f.write_str("Provider"),
        }
    }
}

impl Headers {
    /// Headers from a synchronous function, called before every request.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn() -> Result<Vec<(String, String)>, BoxError> + Send + Sync + 'static,
    {
        struct FromFn<F>(F);
        #[async_trait::async_trait]
        impl<F> HeaderProvider for FromFn<F>
        where
            F: Fn() -> Result<Vec<(String, String)>, BoxError> + Send + Sync + 'static,
        {
            async fn headers(&self) -> Result<Vec<(String, String)>, BoxError> {
                (self.0)()
            }
        }
        Self::Provider(Arc::new(FromFn(f)))
    }

    /// Headers from an async function, awaited before every request.
    pub fn from_async_fn<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<(String, String)>, BoxError>> + Send + 'static,
    {
        type BoxFut = Pin<Box<dyn Future<Output = Result<Vec<(String, String)>, BoxError>> + Send>>;
        struct Async(Box<dyn Fn() -> BoxFut + Send + Sync>);
        #[async_trait::async_trait]
        impl HeaderProvider for Async {
            async fn headers(&self) -> Result<Vec<(String, String)>, BoxError> {
                (self.0)().await
            }
        }
        Self::Provider(Arc::new(Async(Box::new(move || Box::pin(f())))))
    }

    /// The headers for the next request: the static ones, or the
    /// provider's answer now (for a transport of your own).
    ///
    /// # Errors
    /// The provider's.
    pub async fn resolve(&self) -> Result<Vec<(String, String)>, BoxError> {
        match self {
            Self::None => Ok(Vec::new()),
            Self::Static(h) => Ok(h.clone()),
            Self::Provider(p) => p.headers().await,
        }
    }
}
