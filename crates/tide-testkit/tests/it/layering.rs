//! The layering rules of ARCHITECTURE.md, checked against `cargo metadata`.
//!
//! The rules are read from the `layering` block of ARCHITECTURE.md, so the
//! document and the check cannot drift apart. A fixture with forbidden edges
//! shows that the checker catches them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The rules: which tide crates each tide crate may depend on (normal and
/// build edges), and which external crates it must never reach, even
/// transitively.
#[derive(Debug, Default)]
struct Rules {
    allowed: BTreeMap<String, BTreeSet<String>>,
    forbidden: BTreeMap<String, BTreeSet<String>>,
    dev_only: BTreeSet<String>,
}

/// Parses the fenced `layering` block of ARCHITECTURE.md:
/// `crate -> deps…` lines, `crate !> externals…` lines and `dev-only: crates…`.
fn parse_rules(markdown: &str) -> Rules {
    let block = markdown
        .split("```layering")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```layering block");
    let mut rules = Rules::default();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<BTreeSet<_>>();
        if let Some(rest) = line.strip_prefix("dev-only:") {
            rules.dev_only.extend(words(rest));
        } else if let Some((krate, deps)) = line.split_once("->") {
            rules.allowed.insert(krate.trim().to_owned(), words(deps));
        } else if let Some((krate, deps)) = line.split_once("!>") {
            rules.forbidden.insert(krate.trim().to_owned(), words(deps));
        } else {
            panic!("unreadable layering rule: {line:?}");
        }
    }
    rules
}

/// Every violation of `rules` in the output of `cargo metadata --format-version 1`.
fn violations(metadata: &Value, rules: &Rules) -> Vec<String> {
    let packages = metadata["packages"].as_array().expect("packages");
    let name_of: BTreeMap<&str, &str> =
        packages.iter().map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap())).collect();
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|id| name_of[id.as_str().unwrap()])
        .collect();
    // Edges of the resolved graph, by kind: normal (null) and build count, dev does not.
    let mut edges: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
    for node in metadata["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let from = name_of[node["id"].as_str().unwrap()];
        for dep in node["deps"].as_array().unwrap() {
            let to = name_of[dep["pkg"].as_str().unwrap()];
            let dev_only = dep["dep_kinds"].as_array().unwrap().iter().all(|k| k["kind"] == "dev");
            edges.entry(from).or_default().push((to, dev_only));
        }
    }

    let mut out = Vec::new();
    for &krate in &members {
        let Some(allowed) = rules.allowed.get(krate) else {
            out.push(format!("{krate} has no layering rule in ARCHITECTURE.md"));
            continue;
        };
        for &(to, dev_only) in edges.get(krate).into_iter().flatten() {
            if !members.contains(to) {
                continue;
            }
            if rules.dev_only.contains(to) && !dev_only {
                out.push(format!("{krate} -> {to}: {to} may only be a dev-dependency"));
            } else if !dev_only && !allowed.contains(to) {
                out.push(format!("{krate} -> {to}: not an allowed edge"));
            }
        }
    }
    for (krate, banned) in &rules.forbidden {
        // Walk the normal and build edges from `krate`.
        let mut seen = BTreeSet::new();
        let mut stack = vec![krate.as_str()];
        while let Some(at) = stack.pop() {
            for &(to, dev_only) in edges.get(at).into_iter().flatten() {
                if !dev_only && seen.insert(to) {
                    stack.push(to);
                }
            }
        }
        for to in seen {
            let base = to.split('-').next().unwrap_or(to);
            if banned.contains(to) || banned.contains(base) {
                out.push(format!("{krate} reaches {to}, which it must never depend on"));
            }
        }
    }
    out
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).unwrap()
}

fn architecture_rules() -> Rules {
    parse_rules(&std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).unwrap())
}

#[test]
fn the_workspace_keeps_the_layering_of_architecture_md() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = architecture_rules();
    let members = metadata["workspace_members"].as_array().map_or(0, Vec::len);
    assert_eq!(rules.allowed.len(), members, "one rule per workspace crate: {rules:?}");
    assert!(rules.forbidden["tide-core"].contains("tokio"));
    let found = violations(&metadata, &rules);
    assert!(found.is_empty(), "layering violations:\n{}", found.join("\n"));
}

#[test]
fn the_checker_catches_forbidden_edges_in_a_fixture() {
    let fixture: Value = serde_json::from_str(include_str!("../fixtures/metadata-forbidden.json")).unwrap();
    let mut found = violations(&fixture, &architecture_rules());
    found.sort();
    assert_eq!(
        found,
        [
            "tide-core reaches tokio, which it must never depend on",
            "tide-server -> tide-testkit: tide-testkit may only be a dev-dependency",
            "tide-store -> tide-client: not an allowed edge",
        ]
    );
}

#[test]
fn the_rules_parse_every_form() {
    let rules = parse_rules("x\n```layering\n# comment\na ->\nb -> a\na !> tokio hyper\ndev-only: t\n```\n");
    assert_eq!(rules.allowed["a"].len(), 0);
    assert!(rules.allowed["b"].contains("a"));
    assert_eq!(rules.forbidden["a"].len(), 2);
    assert!(rules.dev_only.contains("t"));
}
