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
