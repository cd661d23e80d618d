//! The Rust client against real servers: ours (over HTTP) and the original
//! Python reference server; and two Rust clients with one original Python
//! client converging through ours. The Python parts need `TIDE_PYTHON`
//! (set by `.ci/run`) and say so loudly without it.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tide_client::Tide;
use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};

use crate::{Note, note};

async fn our_server(dir: &std::path::Path) -> String {
    let backend =
        SqliteBackend::open(&dir.join("server.db"), Durability::Normal, tide_core::Limits::default()).await.unwrap();
    let server = Server::new(backend, Arc::new(NoAuth::new("test")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    endpoint
}

fn python() -> Option<String> {
    crate::service("TIDE_PYTHON", "interop with the original Python tide 0.2.1")
}

#[tokio::test]
async fn rust_clients_sync_through_our_server_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = our_server(dir.path()).await;
    let a = Tide::builder().path(dir.path().join("a.db")).endpoint(&endpoint).open().await.unwrap();
    let b = Tide::open(dir.path().join("b.db"), &endpoint).await.unwrap();
    a.collection::<Note>("n").put("k", &note("over http")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    assert_eq!(b.collection::<Note>("n").get("k").await.unwrap(), Some(note("over http")));
}

#[tokio::test]
async fn the_rust_client_syncs_with_the_original_server() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = format!(
        "import uvicorn; from tide.server import create_app; uvicorn.run(create_app({:?}), host='127.0.0.1', port={port}, log_level='error')",
        dir.path().join("original.db").to_string_lossy()
    );
    let mut child = Command::new(python).args(["-c", &script]).stdout(Stdio::null()).spawn().unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoint = format!("http://127.0.0.1:{port}/sync");
    let a = Tide::open(dir.path().join("a.db"), &endpoint).await.unwrap();
    let b = Tide::open(dir.path().join("b.db"), &endpoint).await.unwrap();
    for i in 0..700 {
        a.collection::<Note>("n").put(&format!("k{i:03}"), &note("to the original")).await.unwrap();
    }
    a.collection::<Note>("n").delete("k000").await.unwrap();
    let report = a.sync_once().await.unwrap();
    assert_eq!(report.acknowledged, 701, "a version-0 server acknowledges with a 200");
    b.sync_once().await.unwrap();
    assert_eq!(b.collection::<Note>("n").count().await.unwrap(), 699);
    assert_eq!(a.pending_count().await.unwrap(), 0);
    let _ = child.kill();
    let _ = child.wait();
}

const PYTHON_CLIENT: &str = r#"
import asyncio, json, os, sys, tempfile
from tide import Tide

async def main(endpoint, phase):
    path = os.path.join(sys.argv[3], "py.db")
    async with Tide(db_path=path, endpoint=endpoint, node_id="python") as t:
        notes = t.collection("notes")
        if phase == "write":
            await notes.put("from-python", {"title": "hello from python", "done": False})
            await notes.put("shared", {"title": "python's version", "done": False})
        for _ in range(3):
            await t.sync_once()
        print(json.dumps(await notes.scan()))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[tokio::test]
async fn two_rust_clients_and_one_python_client_converge() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let endpoint = our_server(dir.path()).await;
    let a = Tide::open(dir.path().join("a.db"), &endpoint).await.unwrap();
    let b = Tide::open(dir.path().join("b.db"), &endpoint).await.unwrap();
    a.collection::<Note>("notes").put("from-a", &note("hello from a")).await.unwrap();
    b.collection::<Note>("notes").put("shared", &note("b's version")).await.unwrap();
    a.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    let run = |phase: &'static str| {
        let (python, endpoint, dir) = (python.clone(), endpoint.clone(), dir.path().to_string_lossy().into_owned());
        tokio::task::spawn_blocking(move || {
            Command::new(python).args(["-c", PYTHON_CLIENT, &endpoint, phase, &dir]).output().unwrap()
        })
    };
    let out = run("write").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..2 {
        a.sync_once().await.unwrap();
        b.sync_once().await.unwrap();
    }
    let out = run("read").await.unwrap();
    let py: Vec<(String, Note)> = serde_json::from_slice(&out.stdout).unwrap();
    let ra = a.collection::<Note>("notes").list(None, 100).await.unwrap();
    let rb = b.collection::<Note>("notes").list(None, 100).await.unwrap();
    assert_eq!(ra, rb);
    assert_eq!(ra, py, "the Python client holds the same documents");
    assert_eq!(ra.len(), 3);
    // "shared" was written by b at counter 1 and by python at counter 2
    // (python observed b's write first): python's wins everywhere.
    assert_eq!(ra.iter().find(|(id, _)| id == "shared").unwrap().1, note("python's version"));
}
