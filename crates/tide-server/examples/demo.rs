//! The main job, end to end: a tide-server on its embedded SQLite, and two
//! replicas (tide-store files) that write offline, conflict, and converge by
//! syncing over HTTP.
//!
//! `cargo run -p tide-server --example demo`

use std::sync::Arc;

use serde_json::json;
use tide_core::{OpResult, SyncRequest};
use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};
use tide_store::{Rejection, Store};
use tide_transport::{HttpTransport, Transport};

/// One sync: push the outbox in batches, settle the results, apply every page.
async fn sync(name: &str, store: &Store, transport: &dyn Transport) -> Result<(), Box<dyn std::error::Error>> {
    loop {
        let pending = store.pending(500).await?;
        let mut req = SyncRequest::new(store.node_id(), store.cursor().await?);
        req.ops = pending.iter().map(|p| p.op.clone()).collect();
        let resp = transport.exchange(&req).await?;
        let (mut acked, mut rejected) = (Vec::new(), Vec::new());
        for (p, result) in pending.iter().zip(&resp.results) {
            println!("  {name} pushed {}/{}: {result:?}", p.op.collection, p.op.id);
            match result {
                OpResult::Rejected { code, message } => {
                    rejected.push(Rejection { seq: p.seq, code: *code, message: message.clone() });
                }
                _ => acked.push(p.seq),
            }
        }
        store.settle(acked, rejected).await?;
        for change in store.apply_page(resp.changes, resp.cursor).await? {
            println!("  {name} applied {}/{} from {}", change.collection, change.id, change.stamp.node_id);
        }
        if !resp.has_more && pending.len() < 500 {
            return Ok(());
        }
    }
}

async fn show(name: &str, store: &Store) -> Result<Vec<(String, tide_core::Doc)>, Box<dyn std::error::Error>> {
    let docs = store.list("notes", None, 100).await?;
    for (id, doc) in &docs {
        println!("  {name}: notes/{id} = {}", serde_json::to_string(doc)?);
    }
    Ok(docs)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let backend =
        SqliteBackend::open(&dir.path().join("server.db"), Durability::Full, tide_core::Limits::default()).await?;
    let server = Server::new(backend, Arc::new(NoAuth::new("demo")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/sync", listener.local_addr()?);
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    println!("tide-server on {endpoint} (SQLite in {})", dir.path().display());

    let a = Store::open(dir.path().join("phone.db")).await?;
    let b = Store::open(dir.path().join("laptop.db")).await?;
    let transport = HttpTransport::new(&endpoint)?;

    println!("offline: both edit notes/n1; the phone also writes notes/n2");
    a.put("notes", "n1", json!({"title": "from the phone"}).as_object().cloned().unwrap_or_default().into()).await?;
    a.put("notes", "n2", json!({"title": "shopping list"}).as_object().cloned().unwrap_or_default().into()).await?;
    b.put("notes", "n1", json!({"title": "from the laptop"}).as_object().cloned().unwrap_or_default().into()).await?;

    println!("the phone syncs, then the laptop, which also deletes notes/n2, then the phone again:");
    sync("phone", &a, &transport).await?;
    sync("laptop", &b, &transport).await?;
    b.delete("notes", "n2").await?;
    sync("laptop", &b, &transport).await?;
    sync("phone", &a, &transport).await?;

    println!("final states:");
    let (da, db) = (show("phone", &a).await?, show("laptop", &b).await?);
    if da != db || a.pending_count().await? != 0 || b.pending_count().await? != 0 {
        return Err("the replicas did not converge".into());
    }
    println!("converged: {} document(s), both outboxes empty", da.len());
    Ok(())
}
