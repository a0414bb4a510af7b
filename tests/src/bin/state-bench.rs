//! Benchmark of the stateful stages without Kafka or ClickHouse: the real dedup and join stages
//! on a real `StateStore` (RocksDB), batches committed the way the engine commits them (state +
//! journal + outbox in one synced write). Prints numbers; asserts nothing about timing.
//!
//! ```text
//! state-bench [--keys 10000000] [--hits 1000000] [--batch 10000] [--join-records 1000000]
//!             [--block-cache-mb 64] [--dir DIR] [--only dedup,interval,lookup]
//! ```
//!
//! Phases:
//! - `dedup-insert`: `--keys` distinct keys (window 30d, so all stay live): each record is one
//!   key lookup that misses plus an insert;
//! - `dedup-reload`: a fresh stage (a restart) and its first batch of `--batch` lookups, which
//!   loads the stage's in-memory key index from the state;
//! - `dedup-hit`: the rest of `--hits` records (default 1 M) repeating random earlier keys:
//!   lookups that hit (all dropped);
//! - `interval-join`: `--join-records` left and as many right records over 100 k keys, ±5 min,
//!   batches alternating between the sides, left-outer (buffered state expires as it goes);
//! - `lookup-join`: a table of 1 M rows, then `--join-records` lookups.
//!
//! Peak RSS is the process's `VmHWM` after each phase (RocksDB's block cache and write buffers
//! included: the store runs with its default memory settings unless `--block-cache-mb` is given).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;

use sluice::config::JoinConfig;
use sluice::stage::join;
use sluice::state::{StateMemory, StateStore};
use sluice_tests::bench::state::{self, record, Runner, BASE_TS};
use sluice_tests::workload::Rng;

#[derive(Parser)]
#[command(about = "Dedup and join stages on RocksDB state: throughput and memory")]
struct Cli {
    /// Distinct keys fed through the dedup stage.
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Lookups of existing keys after the inserts (all duplicates).
    #[arg(long, default_value_t = 1_000_000)]
    hits: u64,
    /// Records per batch (one state transaction and synced write each).
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Records per side for the interval join, and lookups for the lookup join.
    #[arg(long, default_value_t = 1_000_000)]
    join_records: u64,
    /// RocksDB block cache in MiB (`state.block_cache_mb`; the default is the store's).
    #[arg(long)]
    block_cache_mb: Option<usize>,
    /// State directory (default: a temp dir, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these phases (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// `dedup-insert` and `dedup-hit`.
    Dedup,
    /// `interval-join`.
    Interval,
    /// `lookup-table` and `lookup-join`.
    Lookup,
}

fn dedup(store: &StateStore, dir: &std::path::Path, cli: &Cli) -> Result<()> {
    let d = state::dedup(store, dir, cli.keys, cli.hits, cli.batch, |p| {
        println!("{}", p.line())
    })?;
    for p in [&d.insert, &d.reload, &d.hit] {
        println!("{}", p.line());
    }
    Ok(())
}

fn interval_join(store: &StateStore, dir: &std::path::Path, cli: &Cli) -> Result<()> {
    let cfg: JoinConfig = serde_json::from_value(serde_json::json!({
        "kind": "interval", "right_topic": "users",
        "left_key": "/user_id", "right_key": "/user_id",
        "left_time": {"field": "/ts"}, "right_time": {"field": "/ts"},
        "before": "5m", "after": "5m", "allowed_lateness": "10s",
        "mode": "left_outer", "prefix": "user_", "fields": ["name", "country"],
    }))?;
    let mut stage = join::build("join", &cfg).map_err(anyhow::Error::msg)?;
    let (lt, rt): (Arc<str>, Arc<str>) = (Arc::from("tx"), Arc::from("users"));
    let mut r = Runner::new(store);
    let keys = 100_000u64;
    // Both sides advance 1 s of event time per 100 records: ~600 buffered records per key
    // window at 100 k keys is far below one per key, so most lefts pair with 0–2 rights.
    let step = cli.batch as u64 / 2;
    let mut i = 0u64;
    while i < cli.join_records {
        let n = step.min(cli.join_records - i);
        let left = (i..i + n)
            .map(|k| {
                let v = format!(
                    r#"{{"id":"tx-{k:010}","user_id":{},"amount_cents":1234,"ts":{}}}"#,
                    (k * 7919) % keys,
                    BASE_TS + (k * 10) as i64
                );
                record(&lt, k as i64, v.into_bytes(), None)
            })
            .collect();
        r.run(stage.as_mut(), false, "tx", left)?;
        let right = (i..i + n)
            .map(|k| {
                let v = format!(
                    r#"{{"user_id":{},"name":"user-{k}","country":"DE","ts":{}}}"#,
                    (k * 104_729) % keys,
                    BASE_TS + (k * 10) as i64
                );
                record(&rt, k as i64, v.into_bytes(), None)
            })
            .collect();
        r.run(stage.as_mut(), true, "users", right)?;
        i += n;
    }
    println!(
        "{}",
        r.result("interval-join", cli.join_records * 2, dir).line()
    );
    Ok(())
}

fn lookup_join(store: &StateStore, dir: &std::path::Path, cli: &Cli) -> Result<()> {
    let cfg: JoinConfig = serde_json::from_value(serde_json::json!({
        "kind": "lookup", "table_topic": "profiles", "key": "/user_id", "nest": "user",
    }))?;
    let mut stage = join::build("lookup", &cfg).map_err(anyhow::Error::msg)?;
    let (lt, rt): (Arc<str>, Arc<str>) = (Arc::from("tx"), Arc::from("profiles"));
    let table = 1_000_000u64;
    let mut r = Runner::new(store);
    let mut i = 0u64;
    while i < table {
        let n = (cli.batch as u64).min(table - i);
        let rows = (i..i + n)
            .map(|u| {
                let v = format!(r#"{{"user_id":{u},"name":"user-{u}","country":"DE"}}"#);
                record(
                    &rt,
                    u as i64,
                    v.into_bytes(),
                    Some(Bytes::from(u.to_string())),
                )
            })
            .collect();
        r.run(stage.as_mut(), true, "profiles", rows)?;
        i += n;
    }
    println!("{}", r.result("lookup-table", table, dir).line());
    let mut r = Runner::new(store);
    let mut rng = Rng::new(11);
    let mut i = 0u64;
    while i < cli.join_records {
        let n = (cli.batch as u64).min(cli.join_records - i);
        let batch = (i..i + n)
            .map(|k| {
                let v = format!(
                    r#"{{"id":"tx-{k:010}","user_id":{},"amount_cents":1234}}"#,
                    rng.next_u64() % (table + table / 10)
                );
                record(&lt, k as i64, v.into_bytes(), None)
            })
            .collect();
        r.run(stage.as_mut(), false, "tx", batch)?;
        i += n;
    }
    println!("{}", r.result("lookup-join", cli.join_records, dir).line());
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let tmp;
    let dir = match &cli.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("temp dir")?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "state-bench: {} dedup keys, batches of {}, {} join records per side, state in {}",
        cli.keys,
        cli.batch,
        cli.join_records,
        dir.display()
    );
    let mut memory = StateMemory::default();
    if let Some(mb) = cli.block_cache_mb {
        memory.block_cache_mb = mb;
    }
    println!("state memory: {memory:?}");
    let store = StateStore::open_with(&dir.join("state"), memory)?;
    let run = |p: Phase| cli.only.is_empty() || cli.only.contains(&p);
    if run(Phase::Dedup) {
        dedup(&store, &dir, &cli)?;
    }
    if run(Phase::Interval) {
        interval_join(&store, &dir, &cli)?;
    }
    if run(Phase::Lookup) {
        lookup_join(&store, &dir, &cli)?;
    }
    Ok(())
}
