//! tide-server mounted in an existing axum app, beside the app's own
//! routes, behind the app's own authentication: its middleware decides who
//! is asking and puts a `Principal` in the request, which the sync server
//! takes as given.
//!
//! `cargo run -p tide-server --example axum` starts it, syncs two users'
//! clients through it, shows that each sees only their own namespace, and
//! exits.

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tide_server::{Durability, Namespace, NoAuth, Principal, Server, ServerConfig, SqliteBackend};

/// The app's own authentication (here a header its login sets; in a real
/// app a session cookie or its own tokens): each user gets a namespace.
async fn app_auth(mut req: Request, next: Next) -> Response {
    let Some(user) = req.headers().get("x-app-user").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return (axum::http::StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    req.extensions_mut().insert(Principal { id: user.clone(), namespace: Namespace::new(format!("user-{user}")) });
    next.run(req).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let backend =
        SqliteBackend::open(&dir.path().join("app.db"), Durability::Full, tide_core::Limits::default()).await?;
    // The app authenticates; NoAuth only names a namespace nobody reaches here.
    let tide = Server::new(backend, Arc::new(NoAuth::new("unused")), ServerConfig::default());

    let app = axum::Router::new()
        .route("/api/hello", get(|| async { "the app's own route" }))
        .route("/sync", post(move |req: Request| async move { tide.handle(req).await }))
        .layer(middleware::from_fn(app_auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = |user: &str, file: &str| {
        let headers = tide_transport::Headers::Static(vec![("x-app-user".into(), user.into())]);
        tide_client::Tide::builder()
            .path(dir.path().join(file))
            .endpoint(format!("http://{addr}/sync"))
            .headers(headers)
            .open()
    };
    let (ann, bob) = (client("ann", "ann.db").await?, client("bob", "bob.db").await?);
    ann.collection::<serde_json::Value>("notes").put("n1", &json!({"title": "ann's note"})).await?;
    ann.sync_once().await?;
    bob.sync_once().await?;
    let ann_sees = ann.collection::<serde_json::Value>("notes").list(None, 10).await?;
    let bob_sees = bob.collection::<serde_json::Value>("notes").list(None, 10).await?;
    println!("ann sees {} note(s), bob sees {} (separate namespaces)", ann_sees.len(), bob_sees.len());
    assert_eq!((ann_sees.len(), bob_sees.len()), (1, 0));
    Ok(())
}
