//! The original Python tide 0.2.1 client against our server: two of its
//! clients converge through us, a conflict resolves by LWW, a delete
//! reaches both. Needs `TIDE_PYTHON` (set by `.ci/run`); without it the
//! test says so loudly.

use std::process::Command;

use crate::binary::spawn;

const SCRIPT: &str = r#"
import asyncio, json, os, sys, tempfile
from tide import Tide

async def main(endpoint):
    d = tempfile.mkdtemp()
    async with Tide(db_path=os.path.join(d, "a.db"), endpoint=endpoint, node_id="a") as a, \
               Tide(db_path=os.path.join(d, "b.db"), endpoint=endpoint, node_id="b") as b:
        na, nb = a.collection("notes"), b.collection("notes")
        await na.put("n1", {"title": "first", "by": "a"})
        await a.sync_once()
        await b.sync_once()
        # Both write n2 offline at lamport 2: the tie goes to node id "b".
        await na.put("n2", {"by": "a"})
        await nb.put("n2", {"by": "b"})
        await a.sync_once(); await b.sync_once(); await a.sync_once()
        # a deletes n1; b learns it.
        await na.delete("n1")
        await a.sync_once(); await b.sync_once()
        # 600 writes: more than one push batch (500) and one page (ours: 1000 cap, default).
        for i in range(600):
            await na.put(f"bulk{i:03}", {"i": i})
        for _ in range(3):
            await a.sync_once()
        for _ in range(3):
            await b.sync_once()
        print(json.dumps({"a": await na.scan(), "b": await nb.scan()}))

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test]
async fn two_original_clients_converge_through_our_server() {
    let Some(python) = crate::service("TIDE_PYTHON", "the original Python client against our server") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let (mut child, endpoint) = spawn(&["--no-auth", "--db", db.to_str().unwrap()]);
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(["-c", SCRIPT, &endpoint]).output())
        .await
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let states: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(states["a"], states["b"], "the two original clients converged");
    let docs = states["a"].as_array().unwrap();
    assert_eq!(docs.len(), 601, "n2 and 600 bulk documents; n1 is deleted");
    let n2 = docs.iter().find(|d| d[0] == "n2").unwrap();
    assert_eq!(n2[1], serde_json::json!({"by": "b"}), "the tie at lamport 2 goes to node id b");
    assert!(docs.iter().all(|d| d[0] != "n1"));
}

/// One sync of an original client whose store is `argv[2]`, then its documents.
const SYNC_AND_SCAN: &str = r#"
import asyncio, json, sys
from tide import Tide

async def main(endpoint, path):
    async with Tide(db_path=path, endpoint=endpoint, node_id="old") as t:
        await t.sync_once()
        print(json.dumps([d[0] for d in await t.collection("notes").scan()]))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

/// An original client away past the horizon (PROTOCOL.md §14): it cannot
/// hear `resync`, so the server sends it everything again from the start.
/// It learns every live document; it keeps its copies of documents deleted
/// and collected meanwhile (the closest safe behaviour it allows), and the
/// server is left as it was.
#[tokio::test]
async fn an_original_client_away_past_the_horizon_is_sent_everything_again_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db").to_str().unwrap().to_owned();
    original_client_past_the_horizon(&["--db", &db], dir.path()).await;
}

#[tokio::test]
async fn an_original_client_away_past_the_horizon_is_sent_everything_again_on_postgres() {
    let Some(url) = crate::postgres::url() else { return };
    let url = crate::postgres::fresh_schema(&url).await;
    let dir = tempfile::tempdir().unwrap();
    original_client_past_the_horizon(&["--database-url", &url], dir.path()).await;
}

async fn original_client_past_the_horizon(db: &[&str], dir: &std::path::Path) {
    let Some(python) = crate::service("TIDE_PYTHON", "the original Python client past the horizon") else {
        return;
    };
    let mut args = vec!["--no-auth", "--tombstone-horizon-seqs", "3", "--collect-interval", "3600"];
    args.extend_from_slice(db);
    let (mut child, endpoint) = spawn(&args);
    let old_store = dir.join("old.db").to_str().unwrap().to_owned();
    let sync_old = || {
        let (python, endpoint, store) = (python.clone(), endpoint.clone(), old_store.clone());
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(python).args(["-c", SYNC_AND_SCAN, &endpoint, &store]).output()
            })
            .await
            .unwrap()
            .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Vec<String>>(&out.stdout).unwrap()
        }
    };
    let open =
        |name: &str| tide_client::Tide::builder().path(dir.join(name)).endpoint(&endpoint).long_poll(None).open();
    let ours = open("ours.db").await.unwrap();
    let notes = ours.collection::<serde_json::Value>("notes");
    for i in 0..4 {
        notes.put(&format!("k{i}"), &serde_json::json!({"i": i})).await.unwrap();
    }
    ours.sync_once().await.unwrap();
    assert_eq!(sync_old().await, ["k0", "k1", "k2", "k3"]);

    notes.delete("k0").await.unwrap();
    for i in 0..4 {
        notes.put(&format!("later{i}"), &serde_json::json!({"i": i})).await.unwrap();
    }
    ours.sync_once().await.unwrap();
    let out = Command::new(crate::binary::BIN)
        .args(["--collect", "--tombstone-horizon-seqs", "3"])
        .args(db)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("tide-server: removed 1 tombstones ("), "{said}");

    let held = sync_old().await;
    let live = ["k1", "k2", "k3", "later0", "later1", "later2", "later3"];
    assert_eq!(held, ["k0", "k1", "k2", "k3", "later0", "later1", "later2", "later3"], "all live, and its stale k0");
    let fresh = open("fresh.db").await.unwrap();
    fresh.sync_once().await.unwrap();
    let on_server: Vec<String> = fresh
        .collection::<serde_json::Value>("notes")
        .list(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(on_server, live, "the server is as it was");
    let _ = child.kill();
    let _ = child.wait();
}
