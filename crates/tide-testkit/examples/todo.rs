//! A todo list in the terminal, kept by two replicas (a phone and a
//! laptop) that sync through a tide-server running on its embedded SQLite.
//!
//! ```text
//! cargo run -p tide-testkit --example todo            # type commands
//! cargo run -p tide-testkit --example todo -- --demo  # a scripted session
//! ```
//!
//! Commands: `phone add buy bread`, `laptop done 1`, `phone rm 2`, `list`,
//! `sync`, `help`, `quit`. Both replicas sync in the background; changes
//! that arrive from the other replica are printed as they land.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tide_client::{Source, Tide, TypedEvent};
use tide_server::{Durability, NoAuth, Server, ServerConfig, SqliteBackend};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Todo {
    text: String,
    done: bool,
}

const DEMO: &[&str] = &[
    "phone add buy bread",
    "phone add call the plumber",
    "laptop add water the plants",
    "sync",
    "laptop done 1",
    "phone rm 2",
    "sync",
    "list",
];

struct App {
    phone: Tide,
    laptop: Tide,
}

impl App {
    fn replica(&self, name: &str) -> Option<&Tide> {
        match name {
            "phone" => Some(&self.phone),
            "laptop" => Some(&self.laptop),
            _ => None,
        }
    }

    /// The todos in id order, numbered from 1 for `done` and `rm`.
    async fn todos(tide: &Tide) -> Result<Vec<(String, Todo)>, tide_client::Error> {
        tide.collection::<Todo>("todos").list(None, 1_000).await
    }

    async fn run(&self, line: &str) -> Result<bool, Box<dyn std::error::Error>> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["quit" | "exit"] => return Ok(false),
            ["help"] => println!(
                "commands: <phone|laptop> add TEXT | <phone|laptop> done N | <phone|laptop> rm N | list | sync | quit"
            ),
            ["list"] => {
                for (name, tide) in [("phone", &self.phone), ("laptop", &self.laptop)] {
                    println!("{name}:");
                    for (i, (_, t)) in Self::todos(tide).await?.iter().enumerate() {
                        println!("  {}. [{}] {}", i + 1, if t.done { "x" } else { " " }, t.text);
                    }
                }
            }
            ["sync"] => {
                // Twice round, so each replica also gets what the other just pushed.
                for _ in 0..2 {
                    self.phone.sync_once().await?;
                    self.laptop.sync_once().await?;
                }
            }
            [who, "add", text @ ..] if self.replica(who).is_some() => {
                let tide = self.replica(who).unwrap_or(&self.phone);
                let id = format!("{}-{}", tide_id(), who);
                tide.collection::<Todo>("todos").put(&id, &Todo { text: text.join(" "), done: false }).await?;
            }
            [who, verb @ ("done" | "rm"), n] if self.replica(who).is_some() => {
                let tide = self.replica(who).unwrap_or(&self.phone);
                let todos = Self::todos(tide).await?;
                let Some((id, todo)) = n.parse::<usize>().ok().and_then(|n| todos.get(n.wrapping_sub(1))) else {
                    println!("{who} has no todo {n}");
                    return Ok(true);
                };
                let todos = tide.collection::<Todo>("todos");
                if *verb == "done" {
                    todos.put(id, &Todo { done: true, ..todo.clone() }).await?;
                } else {
                    todos.delete(id).await?;
                }
            }
            _ => println!("unknown command {line:?}; try help"),
        }
        Ok(true)
    }
}

/// A time-ordered id, so the list keeps the order todos were added in.
fn tide_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:024}")
}

fn print_remote(name: &'static str, tide: &Tide) {
    let mut watch = tide.collection::<Todo>("todos").watch();
    tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            match event {
                TypedEvent::Change(c) if c.source == Source::Remote => match c.value {
                    Ok(Some(t)) => println!("  ({name} received: {} [{}])", t.text, if t.done { "x" } else { " " }),
                    Ok(None) => println!("  ({name} received: a todo was removed)"),
                    Err(e) => println!("  ({name} received something unreadable: {e})"),
                },
                TypedEvent::Lagged { missed } => println!("  ({name} missed {missed} changes)"),
                TypedEvent::Change(_) => {}
            }
        }
    });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let demo = std::env::args().any(|a| a == "--demo");
    let dir = tempfile::tempdir()?;
    let backend =
        SqliteBackend::open(&dir.path().join("server.db"), Durability::Full, tide_core::Limits::default()).await?;
    let server = Server::new(backend, Arc::new(NoAuth::new("todo")), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/sync", listener.local_addr()?);
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    println!("tide-server on {endpoint}; replicas in {}", dir.path().display());

    let app = App {
        phone: Tide::open(dir.path().join("phone.db"), &endpoint).await?,
        laptop: Tide::open(dir.path().join("laptop.db"), &endpoint).await?,
    };
    print_remote("phone", &app.phone);
    print_remote("laptop", &app.laptop);
    // In the demo, syncs happen at the `sync` steps, so the output is the same every run.
    let _background = if demo {
        None
    } else {
        Some((
            app.phone.sync_forever(Duration::from_secs(2)).await?,
            app.laptop.sync_forever(Duration::from_secs(2)).await?,
        ))
    };

    if demo {
        for line in DEMO {
            println!("> {line}");
            app.run(line).await?;
            tokio::task::yield_now().await;
        }
        let (phone, laptop) = (App::todos(&app.phone).await?, App::todos(&app.laptop).await?);
        if phone != laptop {
            return Err("the replicas did not converge".into());
        }
        println!("the phone and the laptop agree on {} todos", phone.len());
    } else {
        println!("type help for commands");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            if !app.run(&line).await? {
                break;
            }
        }
    }
    app.phone.close().await;
    app.laptop.close().await;
    Ok(())
}
