//! The `tide` tool as a user runs it: a real store file, a real server over
//! HTTP, every command with its `--json` output parsed, and bad arguments
//! answered with a message and an exit code.

use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{Value, json};
use tide_server::{RulesFile, Server, ServerConfig, SqliteBackend};

const TIDE: &str = env!("CARGO_BIN_EXE_tide");

fn tide(args: &[&str]) -> Output {
    Command::new(TIDE).args(args).output().unwrap()
}

/// Runs `tide` and parses each line of its standard output as JSON.
fn lines(args: &[&str]) -> Vec<Value> {
    let out = tide(args);
    assert!(out.status.success(), "tide {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn one(args: &[&str]) -> Value {
    lines(args).remove(0)
}

fn failing(args: &[&str]) -> (i32, String) {
    let out = tide(args);
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A server in this process where nobody may write the `secret` collection.
async fn server(dir: &std::path::Path) -> String {
    let backend =
        SqliteBackend::open(&dir.join("server.db"), tide_server::Durability::Full, tide_core::Limits::default())
            .await
            .unwrap();
    let rules = "[[rule]]\nprincipal = \"*\"\nread = [\"*\"]\nwrite = [\"tasks\", \"notes\"]\n";
    backend.set_access_rules(Arc::new(RulesFile::parse(rules).unwrap()));
    let server = Server::new(backend, Arc::new(tide_server::NoAuth::new("default")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/sync", listener.local_addr().unwrap());
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_on_a_store_and_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = server(dir.path()).await;
    let path = dir.path().join("app.db");
    let store_arg = path.to_str().unwrap().to_owned();
    {
        let app = tide_client::Tide::builder().path(&path).endpoint(&endpoint).open().await.unwrap();
        let tasks = app.collection::<Value>("tasks");
        for (id, status, due) in [("a", "open", 3), ("b", "done", 1), ("c", "open", 5), ("d", "open", 4)] {
            tasks.put(id, &json!({ "status": status, "due": due })).await.unwrap();
        }
        app.collection::<Value>("secret").put("s", &json!({})).await.unwrap();
        app.sync_once().await.unwrap();
        tasks.put("e", &json!({ "status": "late", "due": 9 })).await.unwrap();
        app.close().await;
    }
    let s = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        v.insert(1, store_arg.clone());
        v
    };
    let run = |args: Vec<String>| one(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let all = |args: Vec<String>| lines(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let status = run(s(&["status", "--json"]));
    assert_eq!((status["pending"].as_u64(), status["rejected"].as_u64()), (Some(1), Some(1)), "{status}");
    assert_eq!(status["documents"], 5);
    assert_eq!(status["schema_version"], tide_store::SCHEMA_VERSION);
    assert!(status["last_sync_unix"].as_u64().is_some() && status["bytes"].as_u64() > Some(0));

    let pending = all(s(&["pending", "--json"]));
    assert_eq!((pending.len(), pending[0]["id"].as_str(), pending[0]["kind"].as_str()), (1, Some("e"), Some("put")));

    let rejected = all(s(&["rejected", "--json"]));
    assert_eq!((rejected[0]["collection"].as_str(), rejected[0]["code"].as_str()), (Some("secret"), Some("forbidden")));
    let seq = rejected[0]["seq"].as_u64().unwrap().to_string();
    assert_eq!(run(s(&["rejected", "--retry", &seq, "--json"]))["retried"].as_u64(), Some(seq.parse().unwrap()));
    assert_eq!(run(s(&["status", "--json"]))["pending"], 2, "retried: pending again");

    let got = tide(&["get", &store_arg, "tasks", "a"]);
    assert_eq!(serde_json::from_slice::<Value>(&got.stdout).unwrap(), json!({"status": "open", "due": 3}));
    let (code, err) = failing(&["get", &store_arg, "tasks", "zz"]);
    assert_eq!(code, 1);
    assert!(err.contains("tasks/zz: no such document"), "{err}");

    let open = all(s(&["ls", "tasks", "--where", "status=open", "--order", "-due", "--limit", "2", "--json"]));
    assert_eq!(open.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), ["c", "d"]);
    assert_eq!(run(s(&["count", "tasks", "--where", "due>=4", "--json"]))["count"], 3);
    assert_eq!(run(s(&["count", "tasks", "--where", "status^=o", "--where", "due<5", "--json"]))["count"], 2);

    let sync = |more: &[&str]| {
        let mut args =
            vec!["sync".to_owned(), store_arg.clone(), "--endpoint".into(), endpoint.clone(), "--json".into()];
        args.extend(more.iter().map(|a| (*a).to_owned()));
        run(args)
    };
    let once = sync(&["--once"]);
    assert_eq!((once["exchanges"].as_u64(), once["pushed"].as_u64()), (Some(1), Some(2)), "{once}");
    assert_eq!(once["rejected"], 1, "the retried op is refused again");
    let rest = sync(&[]);
    assert_eq!((rest["pushed"].as_u64(), rest["verified"].as_bool()), (Some(0), Some(true)), "{rest}");
    let check = one(&["check", "--endpoint", &endpoint, "--json"]);
    assert_eq!((check["healthy"].as_bool(), check["protocol"].as_u64()), (Some(true), Some(1)), "{check}");
    assert_eq!(check["version"], env!("CARGO_PKG_VERSION"));
    let equal = one(&["verify", &store_arg, "--endpoint", &endpoint, "--json"]);
    assert_eq!(equal["equal"], true, "{equal}");

    // A version the server lacks, put straight into the store: verify names it.
    {
        let store = tide_store::Store::open(&path).await.unwrap();
        let change = tide_core::Change {
            collection: "tasks".into(),
            id: "ghost".into(),
            stamp: tide_core::Stamp::new(99, "elsewhere"),
            payload: tide_core::Payload::Put(tide_core::Doc::from_value(&json!({"boo": true})).unwrap()),
            seq: 0,
        };
        store.apply_fetched(vec![change]).await.unwrap();
        store.close().await;
    }
    let out = tide(&["verify", &store_arg, "--endpoint", &endpoint, "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((diff["collection"].as_str(), diff["id"].as_str()), (Some("tasks"), Some("ghost")), "{diff}");
    let unhealthy = tide(&["check", "--endpoint", "http://127.0.0.1:9/sync", "--json"]);
    assert_eq!(unhealthy.status.code(), Some(3));

    // Discarding the rejected op.
    let seq = all(s(&["rejected", "--json"]))[0]["seq"].as_u64().unwrap().to_string();
    assert_eq!(run(s(&["rejected", "--discard", &seq, "--json"]))["discarded"], 1);
    assert!(all(s(&["rejected", "--json"])).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_round_trips_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (dir.path().join("from.db"), dir.path().join("to.db"));
    let n = 5_000;
    {
        let store = tide_store::Store::open(&from).await.unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
            let writes = chunk
                .iter()
                .map(|i| tide_store::Write {
                    collection: ["a", "b"][i % 2].into(),
                    id: format!("{i:05}"),
                    payload: tide_core::Payload::Put(
                        tide_core::Doc::from_value(&json!({"i": i, "s": "é\"\\", "nested": {"k": [i]}})).unwrap(),
                    ),
                })
                .collect();
            store.write(writes).await.unwrap();
        }
        store.close().await;
    }
    let dump = dir.path().join("dump.jsonl");
    let (source, target, d) = (from.to_str().unwrap(), to.to_str().unwrap(), dump.to_str().unwrap());
    assert_eq!(one(&["export", source, "--out", d, "--json"])["exported"], n);
    assert_eq!(one(&["import", target, d, "--json"])["imported"], n);
    let again = dir.path().join("again.jsonl");
    one(&["export", target, "--out", again.to_str().unwrap(), "--json"]);
    assert_eq!(std::fs::read(&dump).unwrap(), std::fs::read(&again).unwrap(), "the same documents, byte for byte");
    let b = tide(&["export", source, "--collection", "b"]);
    assert_eq!(String::from_utf8(b.stdout).unwrap().lines().count(), n / 2);

    // A bad line stops the import at it, naming it; what came before stays.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"collection\":\"c\",\"id\":\"1\",\"doc\":{}}\n{\"collection\":\"c\",\"id\":\"2\"}\n")
        .unwrap();
    let (code, err) = failing(&["import", target, bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.jsonl:2") && err.contains("expected"), "{err}");
}

#[test]
fn bad_arguments_get_a_message_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = failing(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    let missing = dir.path().join("missing.db");
    let (code, err) = failing(&["status", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no such store file"), "{err}");
    assert!(!missing.exists(), "inspecting never creates a store");
    let store = dir.path().join("s.db");
    let out = tide(&["import", store.to_str().unwrap(), "/dev/null"]);
    assert!(out.status.success());
    let (code, err) = failing(&["count", store.to_str().unwrap(), "c", "--where", "nonsense"]);
    assert_eq!(code, 2);
    assert!(err.contains("--where \"nonsense\""), "{err}");
    let (code, err) = failing(&["ls", store.to_str().unwrap(), "c", "--where", "a..b=1"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid query"), "{err}");
}
