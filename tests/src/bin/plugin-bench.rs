//! Cost of the reference enrichment plugin in each language, through the real host stage
//! (`sluice::stage::wasm::WasmStage`, default limits): component size, cold start (compile,
//! then instantiate + `init`), start from the precompiled cache, and µs per record on the
//! reference workload (1% malformed), in batches as the engine sends them.
//!
//! ```sh
//! plugins/build-all.sh
//! cargo run --release -p sluice-tests --bin plugin-bench -- [--records 100000] [--batch 1000] [LANG...]
//! ```
//!
//! The numbers in docs/plugins.md come from this binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;

use sluice::config::PluginLimits;
use sluice::record::{Origin, Record};
use sluice::stage::wasm::{PluginRuntime, WasmStage};
use sluice::stage::{BatchContext, PartitionKey, Stage};
use sluice::state::StateStore;
use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::workload::{transactions, TransactionSpec};

#[derive(Parser)]
#[command(about = "Cost per record of the enrichment plugin in each language")]
struct Args {
    /// Records per language.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Records per `process` call.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Passes over the records; the fastest counts (the machine may be shared).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Measure this component too, under this name (repeatable); it must accept the
    /// enrichment plugin's config `{"version": "bench"}`.
    #[arg(long = "plugin", value_name = "NAME=PATH")]
    plugins: Vec<String>,
    /// Languages to measure (rust, c, python, js, go); all by default, none with --plugin.
    langs: Vec<String>,
}

struct Measure {
    lang: String,
    size: u64,
    compile: Duration,
    cached_load: Duration,
    instantiate: Duration,
    per_record: Duration,
    rows: usize,
    errors: usize,
}

fn component(lang: &str) -> PathBuf {
    if lang == "rust" {
        PathBuf::from(ENRICH_WASM)
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins"))
            .join(format!("{lang}-enrich/target/enrich.wasm"))
    }
}

fn records(count: usize) -> Vec<Record> {
    let spec = TransactionSpec {
        count,
        malformed_every: 100,
        ..Default::default()
    };
    (0_i64..)
        .zip(transactions(&spec))
        .map(|(offset, e)| {
            Record::from_origin(Arc::new(Origin {
                topic: "transactions".into(),
                partition: 0,
                offset,
                timestamp_ms: None,
                key: Some(e.key.into_bytes().into()),
                value: e.value.into(),
                headers: Vec::new(),
            }))
        })
        .collect()
}

fn measure(lang: &str, path: &Path, input: &[Record], batch: usize, runs: u32) -> Result<Measure> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("{}: run plugins/build-all.sh first", path.display()))?
        .len();
    let cache = tempfile::tempdir()?;
    let config = serde_json::json!({"version": "bench"});

    // Cold: compile (and write the precompiled artifact), then a fresh runtime loads that.
    let started = Instant::now();
    PluginRuntime::new(Some(cache.path().to_path_buf()))?.load_file(path)?;
    let compile = started.elapsed();
    let runtime = PluginRuntime::new(Some(cache.path().to_path_buf()))?;
    let started = Instant::now();
    let plugin = runtime.load_file(path)?;
    let cached_load = started.elapsed();
    let started = Instant::now();
    let mut stage = WasmStage::new("bench", "enrich", plugin, &config, PluginLimits::default())?;
    let instantiate = started.elapsed();

    let state_dir = tempfile::tempdir()?;
    let store = StateStore::open(state_dir.path())?;
    let mut run = |records: &[Record]| -> Result<(usize, usize)> {
        let (mut rows, mut errors) = (0, 0);
        for chunk in records.chunks(batch.max(1)) {
            let ctx = BatchContext {
                pipeline: "bench".into(),
                partition: PartitionKey {
                    topic: "transactions".into(),
                    partition: 0,
                },
                first_offset: chunk[0].origin.offset,
                last_offset: chunk[chunk.len() - 1].origin.offset,
            };
            let out = stage
                .process(chunk.to_vec(), &ctx, &mut store.txn())
                .map_err(|e| anyhow::anyhow!("{lang}: {e}"))?;
            rows += out.records.len();
            errors += out.dead_letters.len();
        }
        Ok((rows, errors))
    };
    // Warm-up: first calls fault in memory and fill caches inside the guest.
    run(&input[..input.len().min(batch * 2)])?;
    let (mut rows, mut errors, mut elapsed) = (0, 0, Duration::MAX);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        (rows, errors) = run(input)?;
        elapsed = elapsed.min(started.elapsed());
    }
    ensure!(
        rows + errors == input.len(),
        "{lang}: {rows} rows + {errors} errors for {} records",
        input.len()
    );
    Ok(Measure {
        lang: lang.to_string(),
        size,
        compile,
        cached_load,
        instantiate,
        per_record: elapsed / u32::try_from(input.len().max(1))?,
        rows,
        errors,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut targets: Vec<(String, PathBuf)> = args
        .langs
        .iter()
        .map(|lang| (lang.clone(), component(lang)))
        .collect();
    if targets.is_empty() && args.plugins.is_empty() {
        for lang in ["rust", "c", "python", "js", "go"] {
            targets.push((lang.to_string(), component(lang)));
        }
    }
    for p in &args.plugins {
        let (name, path) = p.split_once('=').context("--plugin takes NAME=PATH")?;
        targets.push((name.to_string(), PathBuf::from(path)));
    }
    let input = records(args.records);
    println!(
        "{} records per language, batches of {}, reference workload (1% malformed), best of {}\n",
        args.records, args.batch, args.runs
    );
    println!("| language | component | compile (cold) | load precompiled | instantiate + init | per record | rows / errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (lang, path) in &targets {
        let m = measure(lang, path, &input, args.batch, args.runs)?;
        println!(
            "| {} | {:.2} MiB | {} | {} | {} | {:.2} µs | {} / {} |",
            m.lang,
            m.size as f64 / (1024.0 * 1024.0),
            ms(m.compile),
            ms(m.cached_load),
            ms(m.instantiate),
            m.per_record.as_secs_f64() * 1e6,
            m.rows,
            m.errors
        );
    }
    Ok(())
}
