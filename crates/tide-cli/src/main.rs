//! `tide`: look inside a tide store file, move its documents in and out,
//! sync it, and check or verify a server, from the shell.
//!
//! Exit codes: 0 success; 1 an error (the message says which); 2 bad
//! arguments; 3 `verify` found differences, or `check` found the server
//! unhealthy.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tide_core::digest;
use tide_core::{Doc, Payload, SyncRequest, Verify};
use tide_store::{Field, Filter, Query, Store, Write, field};
use tide_transport::{HttpTransport, Transport};

/// Exit code: `verify` found differences, or `check` an unhealthy server.
const EXIT_DIFFERENT: u8 = 3;
/// Documents per transaction of `import`, and per read of `export`.
const BATCH_DOCS: usize = 1_000;

/// The tide command-line tool.
#[derive(Parser, Debug)]
#[command(name = "tide", version, about, long_about = None)]
struct Cli {
    /// Print results as JSON (one object, or one per line for lists).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A store's node id, schema, size, pending and rejected ops, last sync.
    Status { store: PathBuf },
    /// The ops waiting to be pushed, oldest first.
    Pending {
        store: PathBuf,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The ops the server rejected; discard them, or write one again.
    Rejected {
        store: PathBuf,
        /// Discard these (by seq).
        #[arg(long, num_args = 1..)]
        discard: Vec<u64>,
        /// Write this one again with a fresh stamp (by seq).
        #[arg(long, conflicts_with = "discard")]
        retry: Option<u64>,
    },
    /// One document.
    Get { store: PathBuf, collection: String, id: String },
    /// Documents of a collection, filtered and ordered.
    Ls {
        store: PathBuf,
        collection: String,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// How many documents of a collection match.
    Count {
        store: PathBuf,
        collection: String,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// Every live document as JSON Lines (`{"collection", "id", "doc"}`).
    Export {
        store: PathBuf,
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
        /// Write here instead of to standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Documents from JSON Lines (as `export` writes them) as local writes,
    /// which the next sync pushes.
    Import { store: PathBuf, file: PathBuf },
    /// Syncs the store with a server until caught up (or one exchange).
    Sync {
        store: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// Only one exchange: push a batch, pull a page.
        #[arg(long)]
        once: bool,
    },
    /// A server's health, version and protocol.
    Check {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Compares a caught-up store with its server by digests and prints
    /// the keys that differ (nothing is changed).
    Verify {
        store: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// The server's sync endpoint, e.g. `https://sync.example.com/sync`.
    #[arg(long, env = "TIDE_ENDPOINT")]
    endpoint: String,
    /// A bearer token.
    #[arg(long, env = "TIDE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(clap::Args, Debug)]
struct QueryArgs {
    /// A condition: `f=v`, `f!=v`, `f<v`, `f<=v`, `f>v`, `f>=v`, `f^=prefix`,
    /// `f~v` (array contains), `f?` (exists); `v` is JSON or else a string.
    /// Repeat to require all.
    #[arg(long = "where", value_name = "COND")]
    conditions: Vec<String>,
    /// Order by a field (`-field` descending); repeat for ties.
    #[arg(long, value_name = "FIELD", allow_hyphen_values = true)]
    order: Vec<String>,
    /// At most this many documents.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// A failure and the exit code it means.
struct Failure(String, u8);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string(), 1)
    }
}

type Out = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            if !message.is_empty() {
                eprintln!("tide: {message}");
            }
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Out {
    let json = cli.json;
    match cli.command {
        Cmd::Status { store } => status(&store, json).await,
        Cmd::Pending { store, limit } => pending(&open(&store).await?, limit, json).await,
        Cmd::Rejected { store, discard, retry } => rejected(&open(&store).await?, &discard, retry, json).await,
        Cmd::Get { store, collection, id } => {
            let doc = open(&store).await?.get(&collection, &id).await?;
            let Some(doc) = doc else { return Err(Failure(format!("{collection}/{id}: no such document"), 1)) };
            println!("{}", doc.as_str());
            Ok(())
        }
        Cmd::Ls { store, collection, query } => ls(&open(&store).await?, &collection, &query, json).await,
        Cmd::Count { store, collection, query } => {
            let n = open(&store).await?.query_count(&build_query(&collection, &query)?).await?;
            if json {
                println!("{}", json!({ "count": n }));
            } else {
                println!("{n}");
            }
            Ok(())
        }
        Cmd::Export { store, collection, out } => {
            export(&open(&store).await?, collection.as_deref(), out.as_deref(), json).await
        }
        Cmd::Import { store, file } => import(&open_or_create(&store).await?, &file, json).await,
        Cmd::Sync { store, server, once } => sync(&store, &server, once, json).await,
        Cmd::Check { server } => check(&server, json).await,
        Cmd::Verify { store, server } => verify(&open(&store).await?, &server, json).await,
    }
}

/// Opens an existing store file (a missing one is an error, not a new store).
async fn open(path: &Path) -> Result<Store, Failure> {
    if !path.exists() {
        return Err(Failure(format!("{}: no such store file", path.display()), 1));
    }
    open_or_create(path).await
}

async fn open_or_create(path: &Path) -> Result<Store, Failure> {
    Store::open(path).await.map_err(|e| Failure(format!("{}: {e}", path.display()), 1))
}

async fn status(path: &Path, json: bool) -> Out {
    let store = open(path).await?;
    let bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum();
    let synced_at = store.synced_at().await?.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs());
    let collections = store.collections().await?;
    let report = json!({
        "node_id": store.node_id(),
        "schema_version": tide_store::SCHEMA_VERSION,
        "bytes": bytes,
        "documents": collections.iter().map(|(_, n)| n).sum::<u64>(),
        "collections": collections.iter().map(|(c, n)| json!({"name": c, "documents": n})).collect::<Vec<_>>(),
        "pending": store.pending_count().await?,
        "rejected": store.rejected().await?.len(),
        "cursor": store.cursor().await?.map(|c| c.to_string()),
        "last_sync_unix": synced_at,
    });
    store.close().await;
    if json {
        println!("{report}");
        return Ok(());
    }
    for key in ["node_id", "schema_version", "bytes", "documents", "pending", "rejected", "cursor", "last_sync_unix"] {
        println!("{key:<15} {}", report[key]);
    }
    for (c, n) in collections {
        println!("  {c:<20} {n} documents");
    }
    Ok(())
}

async fn pending(store: &Store, limit: usize, json: bool) -> Out {
    for p in store.pending(limit).await? {
        let line = json!({
            "seq": p.seq, "collection": p.op.collection, "id": p.op.id,
            "kind": if p.op.payload.doc().is_some() { "put" } else { "delete" },
            "lamport": p.op.stamp.lamport, "node_id": p.op.stamp.node_id,
        });
        print_line(&line, json, || {
            format!("{:>8} {:<6} {}/{}", p.seq, line["kind"].as_str().unwrap_or(""), p.op.collection, p.op.id)
        });
    }
    Ok(())
}

async fn rejected(store: &Store, discard: &[u64], retry: Option<u64>, json: bool) -> Out {
    if !discard.is_empty() {
        let n = store.discard_rejected(discard.to_vec()).await?;
        print_line(&json!({ "discarded": n }), json, || format!("discarded {n}"));
        return Ok(());
    }
    if let Some(seq) = retry {
        let Some(stamp) = store.retry_rejected(seq).await? else {
            return Err(Failure(format!("no rejected op {seq}"), 1));
        };
        print_line(&json!({ "retried": seq, "lamport": stamp.lamport }), json, || format!("op {seq} written again"));
        return Ok(());
    }
    for r in store.rejected().await? {
        let line = json!({ "seq": r.seq, "collection": r.op.collection, "id": r.op.id, "code": r.code.as_str(), "message": r.message });
        print_line(&line, json, || {
            format!("{:>8} {}/{}: {} ({})", r.seq, r.op.collection, r.op.id, r.message, r.code.as_str())
        });
    }
    Ok(())
}

fn print_line(line: &Value, json: bool, text: impl FnOnce() -> String) {
    if json {
        println!("{line}");
    } else {
        println!("{}", text());
    }
}

/// A query from `--where`, `--order` and `--limit`.
fn build_query(collection: &str, args: &QueryArgs) -> Result<Query, Failure> {
    let mut query = Query::new(collection).limit(args.limit);
    for c in &args.conditions {
        query = query.filter(condition(c).ok_or_else(|| Failure(format!("--where {c:?}: not a condition"), 2))?);
    }
    for o in &args.order {
        query = match o.strip_prefix('-') {
            Some(f) => query.order_by_desc(field(f)),
            None => query.order_by(field(o.as_str())),
        };
    }
    Ok(query)
}

/// One `--where` condition.
fn condition(text: &str) -> Option<Filter> {
    if let Some(f) = text.strip_suffix('?') {
        return Some(field(f).exists());
    }
    // Longest operators first, so `<=` is not read as `<`.
    for op in ["!=", "<=", ">=", "^=", "=", "<", ">", "~"] {
        if let Some((f, v)) = text.split_once(op) {
            let f: Field = field(f.trim());
            let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned()));
            return Some(match op {
                "!=" => f.ne(value),
                "<=" => f.le(value),
                ">=" => f.ge(value),
                "^=" => f.starts_with(v),
                "=" => f.eq(value),
                "<" => f.lt(value),
                ">" => f.gt(value),
                _ => f.contains(value),
            });
        }
    }
    None
}

async fn ls(store: &Store, collection: &str, args: &QueryArgs, json: bool) -> Out {
    let page = store.query(&build_query(collection, args)?).await?;
    for (id, doc) in &page.docs {
        if json {
            println!(r#"{{"id":{},"doc":{}}}"#, Value::String(id.clone()), doc.as_str());
        } else {
            println!("{id}\t{}", doc.as_str());
        }
    }
    if page.next.is_some() && !json {
        eprintln!("(more: the page is full at --limit {})", args.limit);
    }
    Ok(())
}

fn progress(len: Option<u64>, what: &str, json: bool) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = indicatif::ProgressStyle::with_template("{msg} {bar:30} {human_pos}/{human_len} ({per_sec}, {eta})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

async fn export(store: &Store, only: Option<&str>, out: Option<&Path>, json: bool) -> Out {
    let collections: Vec<(String, u64)> =
        store.collections().await?.into_iter().filter(|(c, _)| only.is_none_or(|o| o == c)).collect();
    let total = collections.iter().map(|(_, n)| n).sum();
    let bar = progress(Some(total), "export", json);
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut written = 0u64;
    for (collection, _) in &collections {
        let mut after: Option<String> = None;
        loop {
            let rows = store.list(collection, after.as_deref(), BATCH_DOCS).await?;
            for (id, doc) in &rows {
                writeln!(
                    sink,
                    r#"{{"collection":{},"id":{},"doc":{}}}"#,
                    Value::from(collection.as_str()),
                    Value::from(id.as_str()),
                    doc.as_str()
                )?;
            }
            written += rows.len() as u64;
            bar.set_position(written);
            match rows.last() {
                Some((id, _)) if rows.len() == BATCH_DOCS => after = Some(id.clone()),
                _ => break,
            }
        }
    }
    sink.flush()?;
    bar.finish_and_clear();
    if out.is_some() {
        print_line(&json!({ "exported": written }), json, || format!("exported {written} documents"));
    }
    Ok(())
}

async fn import(store: &Store, path: &Path, json: bool) -> Out {
    let file = std::fs::File::open(path).map_err(|e| Failure(format!("{}: {e}", path.display()), 1))?;
    let bar = progress(None, "import", json);
    let mut batch = Vec::with_capacity(BATCH_DOCS);
    let mut imported = 0u64;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| {
            Failure(format!("{}:{}: {why} ({imported} documents imported before it)", path.display(), n + 1), 1)
        };
        let row: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let (Some(collection), Some(id), Some(doc)) = (row["collection"].as_str(), row["id"].as_str(), row.get("doc"))
        else {
            return Err(bad("expected {\"collection\", \"id\", \"doc\"}".into()));
        };
        let doc = Doc::from_value(doc).map_err(|e| bad(e.to_string()))?;
        batch.push(Write { collection: collection.to_owned(), id: id.to_owned(), payload: Payload::Put(doc) });
        if batch.len() == BATCH_DOCS {
            let done = batch.len() as u64;
            store.write(std::mem::take(&mut batch)).await.map_err(|e| bad(e.to_string()))?;
            imported += done;
            bar.set_position(imported);
        }
    }
    if !batch.is_empty() {
        imported += batch.len() as u64;
        store.write(batch).await?;
    }
    bar.finish_and_clear();
    store.close().await;
    print_line(&json!({ "imported": imported }), json, || format!("imported {imported} documents"));
    Ok(())
}

fn headers(server: &ServerArgs) -> tide_transport::Headers {
    match &server.token {
        Some(t) => tide_transport::Headers::Static(vec![("authorization".into(), format!("Bearer {t}"))]),
        None => tide_transport::Headers::None,
    }
}

fn transport(server: &ServerArgs) -> Result<HttpTransport, Failure> {
    Ok(HttpTransport::builder(&server.endpoint).headers(headers(server)).build()?)
}

async fn sync(path: &Path, server: &ServerArgs, once: bool, json: bool) -> Out {
    if !path.exists() {
        return Err(Failure(format!("{}: no such store file", path.display()), 1));
    }
    let tide =
        tide_client::Tide::builder().path(path).endpoint(&server.endpoint).headers(headers(server)).open().await?;
    let bar = progress(None, "sync", json);
    bar.enable_steady_tick(Duration::from_millis(200));
    let report = if once { tide.sync_one_exchange().await } else { tide.sync_once().await };
    bar.finish_and_clear();
    tide.close().await;
    let r = report?;
    let line = json!({
        "exchanges": r.exchanges, "pushed": r.pushed, "acknowledged": r.acknowledged, "rejected": r.rejected,
        "pulled": r.pulled, "applied": r.applied, "verified": r.verified, "repaired": r.repaired,
    });
    print_line(&line, json, || {
        format!(
            "pushed {}, pulled {}, rejected {}, repaired {}; verified: {}",
            r.pushed, r.pulled, r.rejected, r.repaired, r.verified
        )
    });
    Ok(())
}

async fn check(server: &ServerArgs, json: bool) -> Out {
    let t = transport(server)?;
    let started = std::time::Instant::now();
    let health = t.health().await;
    let probe = t.exchange(&SyncRequest::new("tide-cli-check", None)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let healthy = health.as_ref().is_ok_and(|h| h["status"] == "ok") && probe.is_ok();
    let report = json!({
        "healthy": healthy,
        "version": health.as_ref().ok().and_then(|h| h.get("version").cloned()),
        "protocol": probe.as_ref().ok().and_then(|r| r.protocol),
        "milliseconds": ms,
        "error": health.as_ref().err().or(probe.as_ref().err()).map(ToString::to_string),
    });
    print_line(&report, json, || {
        format!(
            "{}: {} (server {}, protocol {}, {ms:.1} ms)",
            server.endpoint,
            if healthy { "healthy" } else { "UNHEALTHY" },
            report["version"],
            report["protocol"]
        )
    });
    if healthy { Ok(()) } else { Err(Failure(String::new(), EXIT_DIFFERENT)) }
}

/// The digest comparison of PROTOCOL.md §12, read-only: roots, then the
/// groups, buckets and keys of each differing collection.
async fn verify(store: &Store, server: &ServerArgs, json: bool) -> Out {
    let t = transport(server)?;
    let ask = |verify: Option<Verify>| {
        let mut req = SyncRequest::new(store.node_id(), None);
        req.verify = verify;
        req.limit = Some(1);
        let t = &t;
        async move {
            req.cursor = store.cursor().await?;
            Ok::<_, Failure>(t.exchange(&req).await?)
        }
    };
    let first = ask(Some(Verify::Roots)).await?;
    let (Some(server_roots), Some(local)) = (first.roots, store.settled_roots().await?) else {
        return Err(Failure("the store is not caught up (changes to pull or ops to push): sync first".into(), 1));
    };
    let mut names: Vec<&String> = local.keys().chain(server_roots.keys()).collect();
    names.sort_unstable();
    names.dedup();
    let mut differing = Vec::new();
    for collection in names.into_iter().filter(|c| local.get(*c) != server_roots.get(*c)) {
        let theirs = ask(Some(Verify::Groups { collection: collection.clone() })).await?.groups.unwrap_or_default();
        let groups = digest::differing(&store.digest_groups(collection).await?, &theirs);
        let mut buckets = Vec::new();
        for chunk in groups.chunks(tide_core::limits::VERIFY_GROUPS_MAX) {
            let theirs = ask(Some(Verify::Buckets { collection: collection.clone(), groups: chunk.to_vec() })).await?;
            buckets.extend(digest::differing(
                &store.digest_buckets(collection, chunk).await?,
                &theirs.buckets.unwrap_or_default(),
            ));
        }
        for chunk in buckets.chunks(tide_core::limits::VERIFY_BUCKETS_MAX) {
            let have = store.held_versions(collection, chunk).await?;
            let resp =
                ask(Some(Verify::Keys { collection: collection.clone(), buckets: chunk.to_vec(), have })).await?;
            differing
                .extend(resp.fetched.iter().map(|c| (collection.clone(), c.id.clone(), "server has a newer version")));
            differing.extend(
                resp.wanted.iter().map(|id| (collection.clone(), id.clone(), "store has a version the server lacks")),
            );
        }
    }
    for (c, id, why) in &differing {
        print_line(&json!({ "collection": c, "id": id, "difference": why }), json, || format!("{c}/{id}: {why}"));
    }
    if differing.is_empty() {
        print_line(&json!({ "equal": true, "roots": local.len() }), json, || {
            format!("equal ({} collections)", local.len())
        });
        return Ok(());
    }
    Err(Failure(format!("{} keys differ", differing.len()), EXIT_DIFFERENT))
}
