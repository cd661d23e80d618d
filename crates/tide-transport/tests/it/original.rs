//! Against the original Python reference server (tide 0.2.1 under uvicorn
//! on loopback). Needs `TIDE_PYTHON`: a Python with `tide==0.2.1`,
//! `starlette` and `uvicorn` installed (`.ci/run` sets one up). Without it
//! the test says so loudly and does not pretend to pass.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tide_core::{Cursor, Op, Payload, Stamp, SyncRequest};
use tide_transport::{HttpTransport, Transport};

use crate::doc;

/// The original reference server, killed on drop.
pub(crate) struct Original {
    child: tokio::process::Child,
    _dir: tempfile_dir::Dir,
    pub(crate) port: u16,
}

mod tempfile_dir {
    /// A scratch directory removed on drop.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Original {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub(crate) async fn start_original() -> Option<Original> {
    let python = crate::service("TIDE_PYTHON", "interop with the original Python tide 0.2.1")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("tide-original-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "import uvicorn; from tide.server import create_app; \
         uvicorn.run(create_app({db:?}), host='127.0.0.1', port={port}, log_level='error')",
        db = dir.join("server.db").to_string_lossy()
    );
    let child = tokio::process::Command::new(python)
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("TIDE_PYTHON runs");
    let original = Original { child, _dir: tempfile_dir::Dir(dir), port };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some(original);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the original server did not start on port {port}");
}

#[tokio::test]
async fn an_exchange_round_trips_with_the_original_server() {
    let Some(original) = start_original().await else {
        return;
    };
    let endpoint = format!("http://127.0.0.1:{}/sync", original.port);
    let a = HttpTransport::new(&endpoint).unwrap();
    let b = HttpTransport::new(&endpoint).unwrap();
    let mut req = SyncRequest::new("node-a", None);
    req.ops = vec![
        Op {
            collection: "notes".into(),
            id: "n1".into(),
            stamp: Stamp::new(1, "node-a"),
            payload: Payload::Put(doc(json!({"title": "from rust", "n": 1.5}))),
            op_id: Some("op-1".into()),
        },
        Op {
            collection: "notes".into(),
            id: "n2".into(),
            stamp: Stamp::new(2, "node-a"),
            payload: Payload::Delete,
            op_id: None,
        },
    ];
    let resp = a.exchange(&req).await.unwrap();
    assert_eq!(resp.cursor, Cursor(2));
    assert!(resp.results.is_empty() && resp.protocol.is_none(), "the original has no extensions");
    assert_eq!(resp.changes.len(), 2, "the original echoes our own writes");

    let resp = b.exchange(&SyncRequest::new("node-b", None)).await.unwrap();
    assert_eq!(resp.changes[0].payload, Payload::Put(doc(json!({"title": "from rust", "n": 1.5}))));
    assert_eq!((resp.changes[1].id.as_str(), &resp.changes[1].payload), ("n2", &Payload::Delete));

    // Our extensions (protocol, limit) are extra fields the original ignores.
    let mut ours = SyncRequest::new("node-b", Some(resp.cursor));
    ours.limit = Some(10);
    let resp = b.exchange(&ours).await.unwrap();
    assert_eq!((resp.cursor, resp.changes.len()), (Cursor(2), 0));
}
