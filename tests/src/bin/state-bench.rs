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
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;

use sluice::config::JoinConfig;
use sluice::record::{Origin, Record};
use sluice::stage::dedup::{DedupConfig, DedupStage};
use sluice::stage::{join, BatchContext, PartitionKey, Stage, StageOutput};
use sluice::state::{Outbox, StateMemory, StateStore};

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

const BASE_TS: i64 = 1_795_428_000_000;

fn record(topic: &Arc<str>, offset: i64, value: Vec<u8>, key: Option<Bytes>) -> Record {
    Record::from_origin(Arc::new(Origin {
        topic: topic.clone(),
        partition: 0,
        offset,
        timestamp_ms: Some(BASE_TS),
        key,
        value: Bytes::from(value),
        headers: Vec::new(),
    }))
}

/// SplitMix64: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn dir_size(p: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

struct Runner<'a> {
    store: &'a StateStore,
    /// Time spent in stages and commits only (record generation excluded).
    busy: Duration,
    /// Of which in the stages (the commits' synced writes excluded).
    in_stage: Duration,
    counters: std::collections::BTreeMap<&'static str, u64>,
    emitted: u64,
    dead: u64,
}

impl<'a> Runner<'a> {
    fn new(store: &'a StateStore) -> Self {
        Self {
            store,
            busy: Duration::ZERO,
            in_stage: Duration::ZERO,
            counters: Default::default(),
            emitted: 0,
            dead: 0,
        }
    }

    fn run(
        &mut self,
        stage: &mut dyn Stage,
        side: bool,
        topic: &str,
        batch: Vec<Record>,
    ) -> Result<()> {
        let (first, last) = (
            batch.first().map_or(0, |r| r.origin.offset),
            batch.last().map_or(0, |r| r.origin.offset),
        );
        let ctx = BatchContext {
            pipeline: "bench".into(),
            partition: PartitionKey {
                topic: topic.into(),
                partition: 0,
            },
            first_offset: first,
            last_offset: last,
        };
        let t = Instant::now();
        let mut txn = self.store.txn();
        let out: StageOutput = if side {
            stage.process_side(batch, &ctx, &mut txn)?
        } else {
            stage.process(batch, &ctx, &mut txn)?
        };
        self.in_stage += t.elapsed();
        self.store
            .begin_batch(&ctx.partition, first, last, txn, &Outbox::default())?;
        self.store.complete_batch(&ctx.partition, last)?;
        self.busy += t.elapsed();
        self.emitted += out.records.len() as u64;
        self.dead += out.dead_letters.len() as u64;
        for (k, v) in out.counters {
            *self.counters.entry(k).or_default() += v;
        }
        Ok(())
    }

    fn report(&self, phase: &str, records: u64, dir: &std::path::Path) {
        let secs = self.busy.as_secs_f64().max(1e-9);
        let stage_secs = self.in_stage.as_secs_f64().max(1e-9);
        println!(
            "{phase:<14} {records:>11} records in {secs:>7.2} s = {:>10.0} records/s (in the stage: {:>10.0}/s) | emitted {} dead {} {:?} | VmHWM {} MiB, VmRSS {} MiB, state on disk {} MiB",
            records as f64 / secs,
            records as f64 / stage_secs,
            self.emitted,
            self.dead,
            self.counters,
            proc_status_kib("VmHWM:") / 1024,
            proc_status_kib("VmRSS:") / 1024,
            dir_size(dir) / (1024 * 1024),
        );
    }
}

fn dedup(store: &StateStore, dir: &std::path::Path, cli: &Cli) -> Result<()> {
    let cfg: DedupConfig = serde_json::from_value(
        serde_json::json!({"key": "/id", "window": "30d", "time": {"field": "/ts"}}),
    )?;
    let mut stage = DedupStage::new("dedup", &cfg);
    let topic: Arc<str> = Arc::from("tx");
    let mut r = Runner::new(store);
    let mut offset = 0i64;
    let mut i = 0u64;
    while i < cli.keys {
        let n = (cli.batch as u64).min(cli.keys - i);
        let batch = (i..i + n)
            .map(|k| {
                let v = format!(
                    r#"{{"id":"tx-{k:010}","user_id":{},"amount":"12.34","currency":"EUR","ts":{}}}"#,
                    k % 100_000,
                    BASE_TS + (k / 1000) as i64
                );
                offset += 1;
                record(&topic, offset, v.into_bytes(), None)
            })
            .collect();
        r.run(&mut stage, false, "tx", batch)?;
        i += n;
        if i.is_multiple_of(1_000_000) && i < cli.keys {
            r.report("dedup-insert", i, dir);
        }
    }
    r.report("dedup-insert", cli.keys, dir);

    // A restart: a fresh stage loads its in-memory index from the state on its first batch
    // (timed alone as `dedup-reload`), then the remaining lookups run on it.
    drop(stage);
    let mut stage = DedupStage::new("dedup", &cfg);
    let mut rng = Rng(7);
    let hits = cli.hits;
    let mut hit_batch = |n: u64, offset: &mut i64| -> Vec<Record> {
        (0..n)
            .map(|_| {
                let k = rng.next() % cli.keys.max(1);
                let v = format!(
                    r#"{{"id":"tx-{k:010}","user_id":{},"amount":"12.34","currency":"EUR","ts":{}}}"#,
                    k % 100_000,
                    BASE_TS + (cli.keys / 1000) as i64
                );
                *offset += 1;
                record(&topic, *offset, v.into_bytes(), None)
            })
            .collect()
    };
    let mut r = Runner::new(store);
    let first = (cli.batch as u64).min(hits);
    let batch = hit_batch(first, &mut offset);
    r.run(&mut stage, false, "tx", batch)?;
    r.report("dedup-reload", first, dir);

    let mut r = Runner::new(store);
    let mut done = first;
    while done < hits {
        let n = (cli.batch as u64).min(hits - done);
        let batch = hit_batch(n, &mut offset);
        r.run(&mut stage, false, "tx", batch)?;
        done += n;
    }
    r.report("dedup-hit", hits - first, dir);
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
    r.report("interval-join", cli.join_records * 2, dir);
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
    r.report("lookup-table", table, dir);
    let mut r = Runner::new(store);
    let mut rng = Rng(11);
    let mut i = 0u64;
    while i < cli.join_records {
        let n = (cli.batch as u64).min(cli.join_records - i);
        let batch = (i..i + n)
            .map(|k| {
                let v = format!(
                    r#"{{"id":"tx-{k:010}","user_id":{},"amount_cents":1234}}"#,
                    rng.next() % (table + table / 10)
                );
                record(&lt, k as i64, v.into_bytes(), None)
            })
            .collect();
        r.run(stage.as_mut(), false, "tx", batch)?;
        i += n;
    }
    r.report("lookup-join", cli.join_records, dir);
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
