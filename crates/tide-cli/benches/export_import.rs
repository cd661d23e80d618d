//! `tide export` then `tide import` of `TIDE_BENCH_CLI_DOCS` documents
//! (default 1,000,000; also a tenth of that, to show the memory does not
//! grow with the count): rates and each process's peak RSS.
//!
//! ```text
//! cargo bench -p tide-cli --bench export_import
//! ```
#![expect(clippy::cast_precision_loss, reason = "rates are shown to a few digits")]

use std::process::Command;
use std::time::{Duration, Instant};

const TIDE: &str = env!("CARGO_BIN_EXE_tide");

/// Runs `tide args` and watches its peak resident set (`VmHWM`) until it exits.
fn run(args: &[&str]) -> (Duration, f64) {
    let start = Instant::now();
    let mut child = Command::new(TIDE).args(args).stdout(std::process::Stdio::null()).spawn().unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && let Some(kib) = text.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            peak_kib = peak_kib.max(kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
        }
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "tide {args:?}");
            return (start.elapsed(), peak_kib as f64 / 1024.0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let n: usize = std::env::var("TIDE_BENCH_CLI_DOCS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("{:>9} | {:>26} | {:>26}", "documents", "export", "import");
    for count in [n / 10, n] {
        let dir = tempfile::tempdir().unwrap();
        let (from, to, dump) = (dir.path().join("from.db"), dir.path().join("to.db"), dir.path().join("dump.jsonl"));
        runtime.block_on(async {
            let store = tide_store::Store::open(&from).await.unwrap();
            for chunk in (0..count).collect::<Vec<_>>().chunks(4_000) {
                let writes = chunk
                    .iter()
                    .map(|i| tide_store::Write {
                        collection: "items".into(),
                        id: format!("{i:08}"),
                        payload: tide_core::Payload::Put(
                            tide_core::Doc::from_value(
                                &serde_json::json!({"title": format!("item {i}"), "n": i, "body": "z".repeat(120)}),
                            )
                            .unwrap(),
                        ),
                    })
                    .collect();
                store.write(writes).await.unwrap();
            }
            store.close().await;
        });
        let (export, export_rss) = run(&["export", from.to_str().unwrap(), "--out", dump.to_str().unwrap()]);
        let (import, import_rss) = run(&["import", to.to_str().unwrap(), dump.to_str().unwrap()]);
        let rate = |d: Duration| count as f64 / d.as_secs_f64();
        println!(
            "{count:>9} | {:>9.0}/s, peak {:>6.1} MiB | {:>9.0}/s, peak {:>6.1} MiB",
            rate(export),
            export_rss,
            rate(import),
            import_rss
        );
    }
}
