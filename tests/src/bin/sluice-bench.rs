//! The sluice benchmark: one run, real broker (noida-db), real ClickHouse (chdb-core), the real
//! `sluice` binary. `scripts/bench.sh` builds everything and runs it; the results and how to
//! read them are in `docs/benchmarks.md`.
//!
//! ```text
//! sluice-bench run --plugin sluice_plugin_enrich.wasm [--records 1000000] [--phases all]
//! ```
//!
//! Phases (each starts its broker on an empty data dir, because noida-db keeps its whole log in
//! memory):
//! - `backlog`: produce the backlog; raw rdkafka consume (a child process); raw RowBinary insert
//!   of the same rows; then the plain path (`sluice run`, Rust enrich plugin as WASM) on it;
//! - `full`: the reference workload (`bench::full`: ~10 % repeated ids, a co-partitioned users
//!   topic) through dedup → enrich (WASM) → interval join → ClickHouse, every row counted;
//! - `latency`: sluice running, events produced at a fixed rate, produce time → row visible;
//! - `wasm`: the enrich transform native vs through the WASM stage; compile/load/instantiate;
//! - `scaling`: the plain path with 1, 2, 4 partitions and with 2 instances on 4 partitions;
//! - `swap`: sluice with its HTTP API on, events produced at a fixed rate, the enrich stage
//!   hot-swapped between two versions (`--plugin-v2`) every few seconds: request → response,
//!   request → first row of the new version visible, and every row checked afterwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use sluice::stage::Stage;
use sluice_tests::bench::events::{self, BenchEvent, TxRow};
use sluice_tests::bench::full;
use sluice_tests::bench::kafka::{self, RawConsume};
use sluice_tests::bench::pipeline::{self, PipelineSpec, SluiceProc, Visibility};
use sluice_tests::bench::procfs;
use sluice_tests::bench::services::BenchServices;
use sluice_tests::bench::state::{self, DedupState};
use sluice_tests::bench::stats::{self, Poll};
use sluice_tests::bench::swap::{self, Api};
use sluice_tests::bench::wasm_cost::{self, PluginTimes, WasmCost};

#[derive(Parser)]
#[command(about = "Benchmark sluice against the machine's limits (see docs/benchmarks.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark and print the results table.
    Run(Box<RunArgs>),
    /// Internal: the raw-consume baseline, in a process of its own; prints JSON.
    #[command(hide = true)]
    RawConsume {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        count: u64,
    },
    /// Internal: the dedup state benchmark, in a process of its own (its peak RSS is the
    /// state's alone); prints JSON.
    #[command(hide = true)]
    DedupState {
        #[arg(long)]
        keys: u64,
        #[arg(long)]
        hits: u64,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The `sluice` binary (default: next to this one).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// The enrich plugin component (wasm32-wasip2).
    #[arg(long)]
    plugin: PathBuf,
    /// The enrich plugin built with its `v2` feature; the `swap` phase alternates between the
    /// two (required by that phase).
    #[arg(long)]
    plugin_v2: Option<PathBuf>,
    /// Work dir: service data, pipeline files, logs, results (emptied first).
    #[arg(long)]
    work_dir: PathBuf,
    /// Backlog size for the baselines and the plain path.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Backlog size of each scaling run (default: --records; 1 partition then reuses the plain run).
    #[arg(long)]
    scaling_records: Option<usize>,
    /// Produce rates of the latency runs (records/s, comma-separated): the target's rate and
    /// one sluice sustains on this machine, so that queueing and the engine's own latency can
    /// be told apart.
    #[arg(long, default_value = "50000,10000", value_delimiter = ',')]
    latency_rates: Vec<u64>,
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,
    /// Produce rate during the hot swaps (records/s).
    #[arg(long, default_value_t = 20_000)]
    swap_rate: u64,
    /// Number of hot swaps (alternating v2, v1, v2, ...).
    #[arg(long, default_value_t = 10)]
    swaps: usize,
    /// Time from one swap request to the next (ms).
    #[arg(long, default_value_t = 2_000)]
    swap_every_ms: u64,
    /// The enrich plugin in another language, `LANG=PATH` (repeatable), measured in the `wasm`
    /// phase against the same native transform. Default: the components `plugins/build-all.sh`
    /// leaves in `plugins/<lang>-enrich/target/enrich.wasm` (C, Python, JavaScript, Go).
    #[arg(long = "lang-plugin", value_name = "LANG=PATH")]
    lang_plugins: Vec<String>,
    /// Records per language in the `wasm` phase (interpreted languages take ~100 µs each).
    #[arg(long, default_value_t = 20_000)]
    lang_records: usize,
    /// Distinct keys of the dedup state phase (`dedup`), and lookups of existing keys after.
    #[arg(long, default_value_t = 10_000_000)]
    dedup_keys: u64,
    #[arg(long, default_value_t = 1_000_000)]
    dedup_hits: u64,
    /// Records for the native-vs-WASM comparison.
    #[arg(long, default_value_t = 200_000)]
    wasm_records: usize,
    /// The broker the bench starts: `noida` (noida-db, the default) or `tansu`, which honours
    /// fetch size limits (noida-db sends a whole backlog in one response, so librdkafka's
    /// memory then follows the backlog, not its configured bounds) but consumes more slowly.
    #[arg(long, default_value = "noida", value_parser = ["noida", "tansu"])]
    broker: String,
    #[arg(long, default_value_t = 19292)]
    kafka_port: u16,
    #[arg(long, default_value_t = 18323)]
    ch_port: u16,
    /// `sink.batch.max_rows` of every pipeline (default: sluice's own default).
    #[arg(long)]
    batch_rows: Option<usize>,
    /// Partitions of the full path's two (co-partitioned) topics.
    #[arg(long, default_value_t = 2)]
    full_partitions: i32,
    /// Comma-separated subset of backlog,full,latency,wasm,dedup,scaling,swap (or `all`).
    #[arg(long, default_value = "all")]
    phases: String,
    /// Run the sluice process of the 1-partition plain-path run (and of the full path) under
    /// `perf record` (250 Hz, DWARF call graphs; slows it down a little); the reports go to
    /// <work-dir>/perf-plain.txt and perf-full.txt.
    #[arg(long)]
    perf: bool,
    /// Where to write the results as JSON (default: <work-dir>/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

impl RunArgs {
    fn phase(&self, name: &str) -> bool {
        self.phases == "all" || self.phases.split(',').any(|p| p.trim() == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Serialize)]
struct Machine {
    cpu_model: String,
    cores: usize,
    ram_gib: f64,
    kernel: String,
    loadavg_at_start: String,
}

#[derive(Debug, Clone, Serialize)]
struct RawInsert {
    rows: usize,
    batch_rows: usize,
    secs: f64,
    rows_per_s: f64,
    client_cpu_s: f64,
    clickhouse_cpu_s: f64,
}

/// One run of the plain path (one or more sluice processes on one backlog).
#[derive(Debug, Clone, Serialize)]
struct PathRun {
    partitions: i32,
    instances: usize,
    records: usize,
    first_row_s: f64,
    all_rows_s: f64,
    records_per_s: f64,
    sluice_cpu_s: f64,
    sluice_cpu_s_per_million: f64,
    /// Largest peak RSS of one sluice process.
    peak_rss_mib: f64,
    broker_cpu_s: f64,
    clickhouse_cpu_s: f64,
    /// All CPU the machine spent (every process) while the run lasted.
    machine_busy_cpu_s: f64,
    /// What other processes (other users of the machine, this driver) took meanwhile.
    other_cpu_s: f64,
    /// The raw-consume baseline of the same topic.
    raw_consume_per_s: f64,
    /// Size of the state dirs after the run (journal, outbox and WAL in RocksDB).
    state_dir_mib: f64,
}

/// The full path: the reference workload through dedup → enrich → interval join.
#[derive(Debug, Clone, Serialize)]
struct FullRun {
    /// `records` = transaction records produced (repeats included); CPU per million of those.
    run: PathRun,
    users_records: usize,
    duplicates: usize,
    distinct_ids: usize,
    expected_rows: u64,
    expected_matched: u64,
    /// What the table held after sluice stopped.
    rows: u64,
    matched_rows: u64,
    row_ids: u64,
    /// The slower of raw consume (of the transactions topic) and raw insert (backlog phase).
    slower_baseline_per_s: f64,
}

impl FullRun {
    fn intact(&self) -> bool {
        self.rows == self.expected_rows
            && self.matched_rows == self.expected_matched
            && self.row_ids == self.distinct_ids as u64
    }
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    target_rate: u64,
    secs: u64,
    sent: usize,
    achieved_rate: f64,
    p50_ms: i64,
    p90_ms: i64,
    p99_ms: i64,
    p999_ms: i64,
    max_ms: i64,
    poll_every_ms: u64,
    poll_query_mean_ms: f64,
    /// Producer send → broker ack (upper bound of send → append).
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// Start of `sluice run` with an empty plugin cache (compile included) → first row visible.
    cold_first_row_s: f64,
    /// CPU per second of an idle (caught-up) sluice and of the broker meanwhile.
    idle_sluice_cpu_per_s: f64,
    idle_broker_cpu_per_s: f64,
    sluice_cpu_s_per_million: f64,
    sluice_peak_rss_mib: f64,
    /// The batches' work after sealing, from sluice's log (`None`: no timing lines).
    phases: Option<stats::BatchPhases>,
}

/// One hot swap under load.
#[derive(Debug, Clone, Serialize)]
struct SwapSample {
    /// `v1` or `v2` (the enrich build's default `plugin_version`).
    to: String,
    stored_version: u32,
    request_epoch_ms: i64,
    /// Request sent → response received (the worker applied the swap at a batch boundary).
    response_ms: f64,
    /// Request sent → first row of the new version at or after its switch point visible.
    visible_ms: f64,
    from_offsets: BTreeMap<String, i64>,
    /// That first row's own produce → visible time (the pipeline's latency at that moment).
    switch_row_produce_to_visible_ms: Option<i64>,
    /// Produce time of the last row still processed by the old version, relative to the
    /// request (negative: everything produced after the request got the new version).
    last_old_row_after_request_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
struct SwapRun {
    target_rate: u64,
    achieved_rate: f64,
    swap_every_ms: u64,
    /// sluice's batch age limit (`sink.batch.max_age_ms`; the bench pipeline keeps the default).
    batch_interval_ms: u64,
    poll_every_ms: u64,
    swaps: Vec<SwapSample>,
    response_p50_ms: f64,
    response_max_ms: f64,
    visible_p50_ms: f64,
    visible_max_ms: f64,
    /// Records produced (warm-up included) and what the table holds at the end.
    produced: u64,
    rows: u64,
    distinct_ids: u64,
    rows_per_version: BTreeMap<String, u64>,
    /// Rows whose version is not the one the API's switch points say applies at their offset,
    /// or whose `risk_level` does not match their version.
    version_mismatches: u64,
    sluice_cpu_s_per_million: f64,
    sluice_peak_rss_mib: f64,
    /// CPU taken by everything but sluice, the broker and ClickHouse while swapping (the
    /// driver's producer and poller included), per second.
    other_cpu_per_s: f64,
    loadavg_at_start: String,
}

impl SwapRun {
    fn intact(&self) -> bool {
        self.rows == self.produced
            && self.distinct_ids == self.produced
            && self.version_mismatches == 0
    }
}

#[derive(Debug, Default, Serialize)]
struct Results {
    machine: Machine,
    command: String,
    /// `git describe` of the source tree the binaries were built from (at bench start).
    commit: String,
    records: usize,
    event_bytes_mean: f64,
    produce_backlog_s: Option<f64>,
    raw_consume: Option<RawConsume>,
    raw_insert: Option<RawInsert>,
    plain: Option<PathRun>,
    full: Option<FullRun>,
    latency: Vec<Latency>,
    wasm: Vec<WasmCost>,
    /// Plugin languages the `wasm` phase could not measure, and why.
    wasm_missing: Vec<String>,
    plugin: Option<PluginTimes>,
    dedup: Option<DedupState>,
    scaling: Vec<PathRun>,
    swap: Option<SwapRun>,
    total_secs: f64,
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

/// One run of a path (see `Bench::path_run`).
struct PathJob<'a> {
    topic: &'a str,
    partitions: i32,
    instances: usize,
    /// Records of the topic; CPU is reported per million of these.
    records: usize,
    /// Rows the table holds once everything is processed.
    expected_rows: u64,
    raw_consume_per_s: f64,
    profile: bool,
    /// The full path's stages (and table with the join's columns); `None`: the plain path.
    stages: Option<serde_json::Value>,
}

struct Bench {
    args: RunArgs,
    sluice: PathBuf,
    work: PathBuf,
    svc: BenchServices,
    ch: clickhouse::Client,
    run_id: u32,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

impl Bench {
    fn next_id(&mut self) -> u32 {
        self.run_id += 1;
        self.run_id
    }

    async fn ch_exec(&self, sql: &str) -> Result<()> {
        self.ch
            .query(sql)
            .execute()
            .await
            .with_context(|| format!("ClickHouse: {sql}"))
    }

    async fn fresh_table(&self, table: &str) -> Result<()> {
        self.ch_exec(&format!("DROP TABLE IF EXISTS {table} SYNC"))
            .await?;
        self.ch_exec(&events::table_ddl(table)).await
    }

    fn pid_cpu(pid: Option<u32>) -> f64 {
        pid.and_then(procfs::usage).map_or(0.0, |u| u.cpu_s)
    }

    /// Fresh broker, topic with `partitions`, backlog produced; returns the produce time.
    async fn backlog_topic(
        &mut self,
        topic: &str,
        partitions: i32,
        backlog: &[BenchEvent],
    ) -> Result<f64> {
        self.svc.fresh_kafka()?;
        let brokers = self.svc.brokers();
        kafka::create_topic(&brokers, topic, partitions).await?;
        kafka::create_topic(&brokers, &format!("{topic}-dlq"), 1).await?;
        say(format!(
            "producing {} records to {topic} ({partitions} partition(s))",
            backlog.len()
        ));
        let t = tokio::task::block_in_place(|| kafka::produce_all(&brokers, topic, backlog))?;
        // Let the broker finish writing its snapshot before anything is measured.
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(t.as_secs_f64())
    }

    fn raw_consume(&mut self, topic: &str, count: usize) -> Result<RawConsume> {
        let group = format!("raw-{}", self.next_id());
        say(format!("raw rdkafka consume of {topic}"));
        let broker0 = Self::pid_cpu(self.svc.kafka_pid());
        // /proc/self/exe, not current_exe(): a concurrent cargo build may replace the file.
        let out = Command::new("/proc/self/exe")
            .args([
                "raw-consume",
                "--brokers",
                &self.svc.brokers(),
                "--topic",
                topic,
            ])
            .args(["--group", &group, "--count", &count.to_string()])
            .output()
            .context("run raw-consume")?;
        if !out.status.success() {
            bail!(
                "raw-consume failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().context("raw-consume printed nothing")?;
        let mut r: RawConsume = serde_json::from_str(line)?;
        r.broker_cpu_s = Self::pid_cpu(self.svc.kafka_pid()) - broker0;
        Ok(r)
    }

    /// The C plugin's own native build on the records `c` was measured on, if it was built
    /// (`plugins/c-enrich/build-native.sh`, which `scripts/bench.sh` runs).
    fn c_native(&self, c: &mut WasmCost, events: &[BenchEvent], missing: &mut Vec<String>) {
        let harness =
            sluice_tests::services::repo_root().join("plugins/c-enrich/target/native-bench");
        if !harness.is_file() {
            missing.push(format!(
                "C built natively: {} not built (plugins/c-enrich/build-native.sh)",
                harness.display()
            ));
            return;
        }
        say("the C plugin built natively");
        match wasm_cost::c_native(&harness, events, c.batch, 3, &self.work) {
            Ok(us) => c.own_native_us_per_record = Some(us),
            Err(e) => missing.push(format!("C built natively: {e:#}")),
        }
    }

    /// The other languages' enrich plugins for the `wasm` phase (see `--lang-plugin`).
    fn lang_plugins(&self) -> Result<Vec<(String, PathBuf)>> {
        if self.args.lang_plugins.is_empty() {
            let plugins = sluice_tests::services::repo_root().join("plugins");
            return Ok(["c", "python", "js", "go"]
                .into_iter()
                .map(|l| {
                    let path = plugins.join(format!("{l}-enrich/target/enrich.wasm"));
                    (l.to_string(), path)
                })
                .collect());
        }
        self.args
            .lang_plugins
            .iter()
            .map(|p| {
                let (lang, path) = p
                    .split_once('=')
                    .with_context(|| format!("--lang-plugin {p}: expected LANG=PATH"))?;
                Ok((lang.to_string(), PathBuf::from(path)))
            })
            .collect()
    }

    /// The dedup stage's state at `--dedup-keys` keys (`bench::state::dedup`), in a process of
    /// its own so that its peak RSS is the state's alone.
    fn dedup_state(&self) -> Result<DedupState> {
        say(format!(
            "dedup state: {} keys, then {} lookups of existing keys",
            self.args.dedup_keys, self.args.dedup_hits
        ));
        let dir = self.work.join("dedup-state");
        let out = Command::new("/proc/self/exe")
            .arg("dedup-state")
            .args(["--keys", &self.args.dedup_keys.to_string()])
            .args(["--hits", &self.args.dedup_hits.to_string()])
            .args(["--batch", "10000", "--dir"])
            .arg(&dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("run dedup-state")?;
        // The state is ~200 MiB at 10 M keys; its size is in the results.
        let _ = std::fs::remove_dir_all(&dir);
        if !out.status.success() {
            bail!("dedup-state failed ({})", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().context("dedup-state printed nothing")?;
        Ok(serde_json::from_str(line)?)
    }

    /// The same rows sluice writes, built natively beforehand, inserted as typed RowBinary.
    async fn raw_insert(&mut self, backlog: &[BenchEvent]) -> Result<RawInsert> {
        say("raw ClickHouse insert (RowBinary, typed rows)");
        let mut native = wasm_cost::NativeEnrich::new()?;
        let (_dir, store) = wasm_cost::scratch_state()?;
        let mut st = store.txn();
        let recs = wasm_cost::records(backlog);
        let mut rows = Vec::with_capacity(backlog.len());
        for (chunk, evs) in recs.chunks(10_000).zip(backlog.chunks(10_000)) {
            let first = chunk[0].origin.offset;
            let ctx = wasm_cost::ctx(first, first + chunk.len() as i64 - 1);
            let out = native.process(chunk.to_vec(), &ctx, &mut st)?;
            for (r, e) in out.records.iter().zip(evs) {
                let v: serde_json::Value = serde_json::from_slice(&r.value)?;
                rows.push(TxRow::from_enriched(&v, e.ts_ms).context("enriched row shape")?);
            }
        }
        drop(recs);
        let table = "raw_insert";
        self.fresh_table(table).await?;
        let client = self
            .ch
            .clone()
            .with_validation(false)
            .with_setting("async_insert", "0");
        // Same batch size as sluice's default `max_rows`, one INSERT after the other.
        let batch_rows = 100_000;
        let ch_pid = self.svc.ch_pid();
        let (cpu0, ch0) = (procfs::self_usage().cpu_s, Self::pid_cpu(ch_pid));
        let t0 = Instant::now();
        for chunk in rows.chunks(batch_rows) {
            let mut ins = client.insert::<TxRow>(table).await?;
            for r in chunk {
                ins.write(r).await?;
            }
            ins.end().await?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let (cpu1, ch1) = (procfs::self_usage().cpu_s, Self::pid_cpu(ch_pid));
        let n = pipeline::ch_count(&self.ch, table).await?;
        if n != rows.len() as u64 {
            bail!("raw insert: {n} rows visible, {} inserted", rows.len());
        }
        self.ch_exec(&format!("DROP TABLE {table} SYNC")).await?;
        Ok(RawInsert {
            rows: rows.len(),
            batch_rows,
            secs,
            rows_per_s: rows.len() as f64 / secs,
            client_cpu_s: cpu1 - cpu0,
            clickhouse_cpu_s: ch1 - ch0,
        })
    }

    fn spec(&self, name: &str, topic: &str, group: &str, table: &str) -> PipelineSpec {
        PipelineSpec {
            name: name.to_string(),
            brokers: self.svc.brokers(),
            topic: topic.to_string(),
            group: group.to_string(),
            ch_url: self.svc.ch_url(),
            table: table.to_string(),
            plugin: self.args.plugin.clone(),
            plugin_config: serde_json::json!({"version": "v1"}),
            state_dir: self.work.join("state").join(name),
            stages: None,
            changelog: None,
            batch_rows: self.args.batch_rows,
        }
    }

    /// `instances` sluice processes (same group and table, own state dirs) on `topic` until all
    /// `records` rows are visible.
    async fn plain_path(
        &mut self,
        topic: &str,
        partitions: i32,
        instances: usize,
        records: usize,
        raw_consume_per_s: f64,
        profile: bool,
    ) -> Result<PathRun> {
        let job = PathJob {
            topic,
            partitions,
            instances,
            records,
            expected_rows: records as u64,
            raw_consume_per_s,
            profile,
            stages: None,
        };
        Ok(self.path_run(job).await?.0)
    }

    /// Runs `job` until its expected rows are visible; with `job.stages` (the full path) also
    /// returns what the table held after sluice stopped: (rows, rows with a user, distinct ids).
    async fn path_run(&mut self, job: PathJob<'_>) -> Result<(PathRun, Option<(u64, u64, u64)>)> {
        let PathJob {
            topic,
            partitions,
            instances,
            records,
            expected_rows,
            raw_consume_per_s,
            profile,
            stages,
        } = job;
        let id = self.next_id();
        let kind = if stages.is_some() { "full" } else { "plain" };
        let table = format!("{kind}_{id}");
        let group = format!("sluice-bench-{id}");
        self.ch_exec(&format!("DROP TABLE IF EXISTS {table} SYNC"))
            .await?;
        if stages.is_some() {
            self.ch_exec(&full::table_ddl_full(&table)).await?;
        } else {
            self.ch_exec(&events::table_ddl(&table)).await?;
        }
        let mut configs = Vec::new();
        for i in 0..instances {
            // Instances of one pipeline: one name (it is part of every insert deduplication
            // token, so a batch re-consumed by another instance after a rebalance is dropped
            // by ClickHouse), own state dirs, and the state changelog the README asks for.
            let mut spec = self.spec(&format!("bench{id}"), topic, &group, &table);
            spec.state_dir = self.work.join("state").join(format!("bench{id}i{i}"));
            if instances > 1 {
                spec.changelog = Some(format!("{topic}-state-{id}"));
            }
            spec.stages = stages.clone();
            let cfg = spec.write(&self.work.join("pipelines"))?;
            pipeline::warm_plugin_cache(&self.sluice, &cfg)?;
            configs.push(cfg);
        }
        say(format!(
            "{kind} path: {instances} sluice instance(s), {partitions} partition(s), {records} records, {expected_rows} rows expected"
        ));
        let (broker_pid, ch_pid) = (self.svc.kafka_pid(), self.svc.ch_pid());
        let (b0, c0, m0) = (
            Self::pid_cpu(broker_pid),
            Self::pid_cpu(ch_pid),
            procfs::machine_busy_s(),
        );
        let start = Instant::now();
        // DWARF call graphs: the release build keeps line tables but no frame pointers.
        let perf_data = self.work.join(format!("perf-{kind}.data"));
        let wrapper: Vec<String> = if profile {
            [
                "perf",
                "record",
                "-F",
                "250",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([perf_data.display().to_string(), "--".to_string()])
            .collect()
        } else {
            Vec::new()
        };
        let mut procs = Vec::new();
        for (i, cfg) in configs.iter().enumerate() {
            let log = self.work.join("logs").join(format!("{kind}_{id}_{i}.log"));
            procs.push(SluiceProc::spawn_wrapped(
                &wrapper,
                &self.sluice,
                cfg,
                &[],
                &log,
            )?);
        }
        // The full path stops waiting once no row came for a minute (rows stuck in the join's
        // state are reported as missing rather than waited for until the timeout).
        let stall = stages.is_some().then(|| Duration::from_secs(60));
        let vis: Visibility = pipeline::wait_visible_or_stall(
            &self.ch,
            &table,
            expected_rows,
            &mut procs,
            start,
            Duration::from_millis(100),
            Duration::from_secs(900),
            stall,
        )
        .await?;
        let (b1, c1, m1) = (
            Self::pid_cpu(broker_pid),
            Self::pid_cpu(ch_pid),
            procfs::machine_busy_s(),
        );
        for p in &mut procs {
            p.terminate(Duration::from_secs(60))?;
        }
        if profile {
            perf_report(&perf_data, &self.work.join(format!("perf-{kind}.txt")))?;
            // `SLUICE_BENCH_KEEP_PERF=1` keeps the data for other `perf report` views.
            if std::env::var_os("SLUICE_BENCH_KEEP_PERF").is_none() {
                std::fs::remove_file(&perf_data).ok();
            }
        }
        let total = procfs::combine(&vis.usage);
        let check = if stages.is_some() {
            let (rows, matched, ids): (u64, u64, u64) = self
                .ch
                .query(&format!(
                    "SELECT count(), countIf(user_name IS NOT NULL), uniqExact(id) FROM {table}"
                ))
                .fetch_one()
                .await
                .context("count the full path's rows")?;
            Some((rows, matched, ids))
        } else {
            None
        };
        self.ch_exec(&format!("DROP TABLE {table} SYNC")).await?;
        // Measured, then removed: a million records leave ~150 MiB of RocksDB files.
        let mut state_bytes = 0;
        for i in 0..instances {
            let dir = self.work.join("state").join(format!("bench{id}i{i}"));
            state_bytes += state::dir_size(&dir);
            std::fs::remove_dir_all(&dir).ok();
        }
        let run = PathRun {
            partitions,
            instances,
            records,
            first_row_s: vis.first_row_s,
            all_rows_s: vis.all_rows_s,
            records_per_s: records as f64 / vis.all_rows_s,
            sluice_cpu_s: total.cpu_s,
            sluice_cpu_s_per_million: total.cpu_s * 1e6 / records as f64,
            peak_rss_mib: total.peak_rss_mib(),
            broker_cpu_s: b1 - b0,
            clickhouse_cpu_s: c1 - c0,
            machine_busy_cpu_s: m1 - m0,
            other_cpu_s: (m1 - m0) - total.cpu_s - (b1 - b0) - (c1 - c0),
            raw_consume_per_s,
            state_dir_mib: state_bytes as f64 / (1024.0 * 1024.0),
        };
        Ok((run, check))
    }

    /// The full path on a fresh broker: both topics produced, a raw consume of the transactions,
    /// then one sluice on the reference pipeline until all expected rows are visible.
    async fn full_path(&mut self, n: usize, raw_insert_per_s: Option<f64>) -> Result<FullRun> {
        let parts = self.args.full_partitions;
        say(format!(
            "generating the full path's workload: {n} transactions"
        ));
        let w = full::workload(n, parts);
        self.svc.fresh_kafka()?;
        let brokers = self.svc.brokers();
        let (tx_topic, users_topic) = ("full-tx", "full-users");
        for (t, p) in [(tx_topic, parts), (users_topic, parts), ("full-tx-dlq", 1)] {
            kafka::create_topic(&brokers, t, p).await?;
        }
        say(format!(
            "producing {} transactions ({} repeats) and {} user profiles ({parts} partition(s) each)",
            w.transactions.len(),
            w.duplicates,
            w.users.len()
        ));
        tokio::task::block_in_place(|| {
            kafka::produce_all(&brokers, users_topic, &w.users)?;
            kafka::produce_all(&brokers, tx_topic, &w.transactions)
        })?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let raw = self.raw_consume(tx_topic, w.transactions.len())?;
        let slower = raw_insert_per_s.map_or(raw.records_per_s(), |i| i.min(raw.records_per_s()));
        let stages = full::stages(&self.args.plugin, users_topic);
        let (run, check) = self
            .path_run(PathJob {
                topic: tx_topic,
                partitions: parts,
                instances: 1,
                records: w.transactions.len(),
                expected_rows: w.expected_rows,
                raw_consume_per_s: raw.records_per_s(),
                profile: self.args.perf,
                stages: Some(stages),
            })
            .await?;
        let (rows, matched_rows, row_ids) = check.context("full path: no row check")?;
        Ok(FullRun {
            run,
            users_records: w.users.len(),
            duplicates: w.duplicates,
            distinct_ids: w.distinct,
            expected_rows: w.expected_rows,
            expected_matched: w.expected_matched,
            rows,
            matched_rows,
            row_ids,
            slower_baseline_per_s: slower,
        })
    }

    async fn latency(&mut self, rate: u64) -> Result<Latency> {
        let secs = self.args.latency_secs;
        self.svc.fresh_kafka()?;
        let brokers = self.svc.brokers();
        let topic = "latency";
        kafka::create_topic(&brokers, topic, 1).await?;
        kafka::create_topic(&brokers, "latency-dlq", 1).await?;
        let table = "latency";
        self.fresh_table(table).await?;
        // Warm-up records, present before sluice starts: the cold start is measured on them.
        let warm = 2_000usize;
        let mut rng = sluice_tests::workload::Rng::new(3);
        let warmup: Vec<BenchEvent> = (0..warm)
            .map(|i| events::event(i, &mut rng, Some(kafka::now_ms())))
            .collect();
        tokio::task::block_in_place(|| kafka::produce_all(&brokers, topic, &warmup))?;

        let id = self.next_id();
        let spec = self.spec(
            &format!("latency{id}"),
            topic,
            &format!("latency-{id}"),
            table,
        );
        let cfg = spec.write(&self.work.join("pipelines"))?;
        say(format!(
            "latency: sluice started with an empty plugin cache, then {rate} records/s for {secs} s"
        ));
        let start = Instant::now();
        let log = self.work.join("logs").join("latency.log");
        let mut procs = vec![SluiceProc::spawn(&self.sluice, &cfg, &log)?];
        let cold = pipeline::wait_visible(
            &self.ch,
            table,
            warm as u64,
            &mut procs,
            start,
            Duration::from_millis(10),
            Duration::from_secs(120),
        )
        .await?;
        // Idle cost: caught up, nothing produced. noida-db answers fetches at once instead of
        // waiting fetch.wait.max.ms, so an idle consumer and the broker spin.
        let idle_secs = 5.0;
        let (s0, b0) = (procs[0].usage().cpu_s, Self::pid_cpu(self.svc.kafka_pid()));
        tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
        let (s1, b1) = (procs[0].usage().cpu_s, Self::pid_cpu(self.svc.kafka_pid()));
        let pid = procs[0].pid;
        procfs::reset_peak_rss(pid).ok();
        let cpu0 = procs[0].usage().cpu_s;

        // Poll the visible prefix of the partition while the producer runs.
        let poll_every = Duration::from_millis(10);
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let ch = self.ch.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut polls = Vec::new();
                let mut query_ms = 0.0;
                while !stop.load(Ordering::Relaxed) {
                    let q0 = Instant::now();
                    let n = pipeline::ch_count(&ch, table).await?;
                    query_ms += q0.elapsed().as_secs_f64() * 1e3;
                    polls.push(Poll {
                        t_ms: kafka::now_ms(),
                        visible: n,
                    });
                    tokio::time::sleep(poll_every).await;
                }
                let mean = query_ms / polls.len().max(1) as f64;
                anyhow::Ok((polls, mean))
            })
        };
        let b = brokers.clone();
        let paced =
            tokio::task::spawn_blocking(move || kafka::produce_paced(&b, topic, rate, secs, warm))
                .await??;
        let expected = (warm + paced.sent) as u64;
        let all = pipeline::wait_visible(
            &self.ch,
            table,
            expected,
            &mut procs,
            start,
            Duration::from_millis(20),
            Duration::from_secs(secs + 300),
        )
        .await?;
        // A last poll after everything is visible, so every row has a poll that saw it.
        tokio::time::sleep(poll_every * 3).await;
        stop.store(true, Ordering::Relaxed);
        let (polls, poll_query_mean_ms) = poller.await??;
        let u = all.usage[0];
        procs[0].terminate(Duration::from_secs(30))?;
        std::fs::remove_dir_all(&spec.state_dir).ok();
        // Batches of the paced run (a quarter of what one batch age holds at this rate or
        // more), not the warm-up's.
        let phases = std::fs::read_to_string(&log)
            .ok()
            .and_then(|text| stats::batch_phases(&text, rate / 16));

        let rows: Vec<(i64, i64)> = self
            .ch
            .query(&format!(
                "SELECT source_offset, toUnixTimestamp64Milli(ts) FROM {table} \
                 WHERE source_offset >= {warm} ORDER BY source_offset"
            ))
            .fetch_all()
            .await?;
        let max_offset = rows.last().map_or(-1, |r| r.0);
        if rows.len() != paced.sent || max_offset != expected as i64 - 1 {
            bail!(
                "latency: {} rows up to offset {max_offset}, expected {} up to {}: the visible \
                 set is not an offset prefix, so the measurement would be wrong",
                rows.len(),
                paced.sent,
                expected - 1
            );
        }
        let mut lat = stats::latencies(&polls, &rows).map_err(anyhow::Error::msg)?;
        lat.sort_unstable();
        let q = |x: f64| stats::quantile(&lat, x).unwrap_or(-1);
        let ack_ms =
            |x: f64| stats::quantile(&paced.ack_us, x).map_or(f64::NAN, |v| v as f64 / 1e3);
        self.ch_exec(&format!("DROP TABLE {table} SYNC")).await?;
        Ok(Latency {
            target_rate: rate,
            secs,
            sent: paced.sent,
            achieved_rate: paced.sent as f64 / paced.secs,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: lat.last().copied().unwrap_or(-1),
            poll_every_ms: poll_every.as_millis() as u64,
            poll_query_mean_ms,
            ack_p50_ms: ack_ms(0.50),
            ack_p99_ms: ack_ms(0.99),
            cold_first_row_s: cold.first_row_s,
            idle_sluice_cpu_per_s: (s1 - s0) / idle_secs,
            idle_broker_cpu_per_s: (b1 - b0) / idle_secs,
            sluice_cpu_s_per_million: (u.cpu_s - cpu0) * 1e6 / paced.sent as f64,
            sluice_peak_rss_mib: u.peak_rss_mib(),
            phases,
        })
    }

    /// Hot swaps under load: sluice with its API on, `swap_rate` records/s produced, the enrich
    /// stage swapped v2, v1, v2, ... every `swap_every_ms`; each swap timed to its response and
    /// to the first row of the new version visible; every row checked at the end.
    async fn swap(&mut self) -> Result<SwapRun> {
        let v2_plugin = self
            .args
            .plugin_v2
            .clone()
            .context("the swap phase needs --plugin-v2 (scripts/bench.sh builds it)")?;
        let (rate, n_swaps) = (self.args.swap_rate, self.args.swaps);
        let every = Duration::from_millis(self.args.swap_every_ms);
        let loadavg_at_start = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string();
        self.svc.fresh_kafka()?;
        let brokers = self.svc.brokers();
        // One partition: every swap has one switch point, and a row's version follows from it.
        let topic = "swap";
        kafka::create_topic(&brokers, topic, 1).await?;
        kafka::create_topic(&brokers, "swap-dlq", 1).await?;
        let table = "swap";
        self.ch_exec(&format!("DROP TABLE IF EXISTS {table} SYNC"))
            .await?;
        self.ch_exec(&events::swap_table_ddl(table)).await?;
        // Warm-up records: sluice has processed a batch of the partition before the first swap.
        let warm = 2_000usize;
        let mut rng = sluice_tests::workload::Rng::new(5);
        let warmup: Vec<BenchEvent> = (0..warm)
            .map(|i| events::event(i, &mut rng, Some(kafka::now_ms())))
            .collect();
        tokio::task::block_in_place(|| kafka::produce_all(&brokers, topic, &warmup))?;

        let id = self.next_id();
        let name = format!("swap{id}");
        let mut spec = self.spec(&name, topic, &format!("swap-{id}"), table);
        // No `version` in the stage config: each build writes its own default ("v1", "v2") to
        // `plugin_version`, so a row shows which version produced it.
        spec.plugin_config = serde_json::json!({});
        let cfg = spec.write(&self.work.join("pipelines"))?;
        pipeline::warm_plugin_cache(&self.sluice, &cfg)?;
        let port = swap::free_port()?;
        let extra = ["--api-listen".to_string(), format!("127.0.0.1:{port}")];
        let log = self.work.join("logs").join("swap.log");
        let start = Instant::now();
        let mut procs = vec![SluiceProc::spawn_wrapped(
            &[],
            &self.sluice,
            &cfg,
            &extra,
            &log,
        )?];
        pipeline::wait_visible(
            &self.ch,
            table,
            warm as u64,
            &mut procs,
            start,
            Duration::from_millis(50),
            Duration::from_secs(120),
        )
        .await?;
        let api = Api::new(port)?;
        api.wait_running(&name, &mut procs[0], Duration::from_secs(60))
            .await?;
        let v1 = api.upload("enrich", &self.args.plugin).await?;
        let v2 = api.upload("enrich", &v2_plugin).await?;
        say(format!(
            "swap: {rate} records/s, {n_swaps} hot swaps {} ms apart (stored versions: v1 = {v1}, v2 = {v2})",
            every.as_millis()
        ));

        // The producer runs from 2 s before the first swap until 3 s after the last.
        let lead = Duration::from_secs(2);
        let secs = (lead + every * n_swaps as u32 + Duration::from_secs(3))
            .as_secs_f64()
            .ceil() as u64;
        let pid = procs[0].pid;
        procfs::reset_peak_rss(pid).ok();
        let cpu0 = procs[0].usage().cpu_s;
        let b = brokers.clone();
        let producer =
            tokio::task::spawn_blocking(move || kafka::produce_paced(&b, topic, rate, secs, warm));
        tokio::time::sleep(lead).await;
        let (broker_pid, ch_pid) = (self.svc.kafka_pid(), self.svc.ch_pid());
        let (sl0, b0, c0, m0) = (
            procs[0].usage().cpu_s,
            Self::pid_cpu(broker_pid),
            Self::pid_cpu(ch_pid),
            procfs::machine_busy_s(),
        );
        let poll_every = Duration::from_millis(10);
        let t0 = Instant::now();
        let mut samples = Vec::new();
        for i in 0..n_swaps {
            tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + every * i as u32)).await;
            let (to, version) = if i % 2 == 0 { ("v2", v2) } else { ("v1", v1) };
            let request_epoch_ms = kafka::now_ms();
            let t_req = Instant::now();
            let out = api.swap(&name, "enrich", "enrich", version).await?;
            let response_ms = t_req.elapsed().as_secs_f64() * 1e3;
            if out.applies != "next_batch" {
                bail!("swap {i} applies at {:?}, not the next batch", out.applies);
            }
            // Rows of the new version at or after the switch point: before it, the same
            // version can only be an earlier swap's.
            let sql = format!(
                "SELECT count() FROM {table} WHERE plugin_version = '{to}' AND ({})",
                swap::switched_rows_sql(&out.from_offsets, topic)
            );
            let visible_ms = loop {
                let n: u64 = self.ch.query(&sql).fetch_one().await?;
                if n > 0 {
                    break t_req.elapsed().as_secs_f64() * 1e3;
                }
                procs[0].check_alive()?;
                if t_req.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "swap {i} to {to}: no row of it visible after 120 s\n{}",
                        procs[0].log_tail()
                    );
                }
                tokio::time::sleep(poll_every).await;
            };
            say(format!(
                "swap {} → {to}: response {response_ms:.0} ms, first row visible {visible_ms:.0} ms, from {:?}",
                i + 1,
                out.from_offsets
            ));
            samples.push(SwapSample {
                to: to.to_string(),
                stored_version: version,
                request_epoch_ms,
                response_ms,
                visible_ms,
                from_offsets: out.from_offsets,
                switch_row_produce_to_visible_ms: None,
                last_old_row_after_request_ms: None,
            });
        }
        let swap_secs = t0.elapsed().as_secs_f64();
        let (sl1, b1, c1, m1) = (
            procs[0].usage().cpu_s,
            Self::pid_cpu(broker_pid),
            Self::pid_cpu(ch_pid),
            procfs::machine_busy_s(),
        );
        let paced = producer.await??;
        let produced = (warm + paced.sent) as u64;
        let all = pipeline::wait_visible(
            &self.ch,
            table,
            produced,
            &mut procs,
            start,
            Duration::from_millis(100),
            Duration::from_secs(start.elapsed().as_secs() + 300),
        )
        .await?;
        // A moment more: a duplicate batch would show up after the last expected row.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let u = all.usage[0];
        procs[0].terminate(Duration::from_secs(30))?;
        std::fs::remove_dir_all(&spec.state_dir).ok();

        // Every row: produced by the version the API's switch points name for its offset.
        let rows: Vec<(i32, i64, String, String, i64)> = self
            .ch
            .query(&format!(
                "SELECT source_partition, source_offset, plugin_version, risk_level, \
                 toUnixTimestamp64Milli(ts) FROM {table}"
            ))
            .fetch_all()
            .await?;
        let distinct_ids: u64 = self
            .ch
            .query(&format!("SELECT uniqExact(id) FROM {table}"))
            .fetch_one()
            .await?;
        let switches: Vec<(String, BTreeMap<String, i64>)> = samples
            .iter()
            .map(|s| (s.to.clone(), s.from_offsets.clone()))
            .collect();
        let mut rows_per_version = BTreeMap::new();
        let mut version_mismatches = 0u64;
        let mut produced_at = std::collections::HashMap::new();
        for (part, offset, version, risk, ts) in &rows {
            *rows_per_version.entry(version.clone()).or_insert(0u64) += 1;
            let want = swap::expected_version(&switches, "v1", topic, *part, *offset);
            if version != want || (version == "v2") == risk.is_empty() {
                version_mismatches += 1;
            }
            produced_at.insert((*part, *offset), *ts);
        }
        let key = format!("{topic}/0");
        for s in &mut samples {
            // The switch row (partition 0's first offset of the new version), produce → seen.
            let from = s.from_offsets.get(&key).copied();
            s.switch_row_produce_to_visible_ms = from
                .and_then(|o| produced_at.get(&(0, o)))
                .map(|ts| s.request_epoch_ms + s.visible_ms as i64 - ts);
            s.last_old_row_after_request_ms = from
                .and_then(|o| produced_at.get(&(0, o - 1)))
                .map(|ts| ts - s.request_epoch_ms);
        }
        self.ch_exec(&format!("DROP TABLE {table} SYNC")).await?;

        let sorted = |f: fn(&SwapSample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (resp, vis) = (sorted(|s| s.response_ms), sorted(|s| s.visible_ms));
        let q = |v: &[f64], x: f64| stats::quantile(v, x).unwrap_or(f64::NAN);
        Ok(SwapRun {
            target_rate: rate,
            achieved_rate: paced.sent as f64 / paced.secs,
            swap_every_ms: self.args.swap_every_ms,
            batch_interval_ms: BATCH_INTERVAL_MS,
            poll_every_ms: poll_every.as_millis() as u64,
            response_p50_ms: q(&resp, 0.5),
            response_max_ms: q(&resp, 1.0),
            visible_p50_ms: q(&vis, 0.5),
            visible_max_ms: q(&vis, 1.0),
            swaps: samples,
            produced,
            rows: rows.len() as u64,
            distinct_ids,
            rows_per_version,
            version_mismatches,
            sluice_cpu_s_per_million: (u.cpu_s - cpu0) * 1e6 / paced.sent as f64,
            sluice_peak_rss_mib: u.peak_rss_mib(),
            other_cpu_per_s: ((m1 - m0) - (sl1 - sl0) - (b1 - b0) - (c1 - c0)) / swap_secs,
            loadavg_at_start,
        })
    }
}

/// Writes the report of a `perf record` run: the flat profile (hottest symbols), the call
/// graph of the hottest ones and the inclusive share of every function above 0.5 %.
fn perf_report(data: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let mut text = Vec::new();
    for args in [
        &["--no-children", "--sort", "dso,sym", "-g", "none"][..],
        &[
            "--no-children",
            "--sort",
            "sym",
            "-g",
            "caller,0.5,callee",
            "--percent-limit",
            "2",
        ][..],
        // Inclusive shares (a function and everything it calls): where each stage's CPU goes.
        &[
            "--children",
            "--sort",
            "sym",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ][..],
    ] {
        // --no-inline: resolving inlined frames runs addr2line per address (tens of minutes
        // for a DWARF profile of a release build).
        let o = Command::new("perf")
            .args(["report", "--stdio", "--no-inline", "-i"])
            .arg(data)
            .args(args)
            .output()
            .context("perf report")?;
        text.extend_from_slice(&o.stdout);
    }
    std::fs::write(out, text)?;
    say(format!("perf profile of sluice: {}", out.display()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        ram_gib: ram_kb / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn commit(repo: &std::path::Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn lang_name(lang: &str) -> &str {
    match lang {
        "c" => "C",
        "python" => "Python",
        "js" => "JavaScript",
        "go" => "Go",
        "rust" => "Rust",
        other => other,
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// sluice's default `sink.batch.max_age_ms`; `PipelineSpec` sets no `batch` section.
const BATCH_INTERVAL_MS: u64 = 250;

fn report(r: &Results) -> String {
    let mut t = String::new();
    let mut row = |what: &str, value: String, target: &str, met: Option<bool>| {
        t.push_str(&format!(
            "| {what} | {value} | {target} | {} |\n",
            if target.is_empty() { "" } else { verdict(met) }
        ));
    };
    let k = |x: f64| format!("{:.0}k/s", x / 1e3);
    if let Some(c) = &r.raw_consume {
        row(
            "raw rdkafka consume (baseline)",
            format!(
                "{} ({:.2} s incl. group join, first record after {:.2} s; {:.2} CPU-s, broker {:.2} CPU-s; peak RSS {:.0} MiB)",
                k(c.records_per_s()),
                c.secs,
                c.secs - c.secs_from_first,
                c.cpu_s,
                c.broker_cpu_s,
                c.peak_rss_kb as f64 / 1024.0
            ),
            "",
            None,
        );
    }
    if let Some(i) = &r.raw_insert {
        row(
            "raw ClickHouse insert, RowBinary (baseline)",
            format!(
                "{} ({:.2} s, {} rows/insert; client {:.2} CPU-s, ClickHouse {:.2} CPU-s)",
                k(i.rows_per_s),
                i.secs,
                i.batch_rows,
                i.client_cpu_s,
                i.clickhouse_cpu_s
            ),
            "",
            None,
        );
    }
    let slower = match (&r.raw_consume, &r.raw_insert) {
        (Some(c), Some(i)) => Some(c.records_per_s().min(i.rows_per_s)),
        _ => None,
    };
    if let Some(p) = &r.plain {
        row(
            "plain path: all rows visible",
            format!(
                "{:.2} s for {} records = {} ({:.2}× the slower baseline)",
                p.all_rows_s,
                p.records,
                k(p.records_per_s),
                slower.map_or(f64::NAN, |s| p.records_per_s / s)
            ),
            "",
            None,
        );
        // CPU-s differ between machines of the same kind (and between runs) by more than the
        // changes being measured; the raw consumer's CPU in the same run is the stable yardstick.
        let vs_raw = r
            .raw_consume
            .as_ref()
            .filter(|c| c.records > 0 && c.cpu_s > 0.0)
            .map_or(f64::NAN, |c| {
                p.sluice_cpu_s_per_million / (c.cpu_s * 1e6 / c.records as f64)
            });
        row(
            "plain path: CPU-s per million records (sluice process)",
            format!(
                "{:.2} ({:.2} CPU-s; {vs_raw:.1}× the raw consumer's CPU per record; meanwhile broker {:.2}, ClickHouse {:.2}, other processes {:.2} CPU-s)",
                p.sluice_cpu_s_per_million,
                p.sluice_cpu_s,
                p.broker_cpu_s,
                p.clickhouse_cpu_s,
                p.other_cpu_s
            ),
            "≤ 2",
            Some(p.sluice_cpu_s_per_million <= 2.0),
        );
        let ratio = p.records_per_s / p.raw_consume_per_s;
        row(
            "plain path: wall throughput / raw consume",
            format!("{ratio:.2}"),
            "≥ 0.5",
            Some(ratio >= 0.5),
        );
        row(
            "plain path: first row visible after start",
            format!(
                "{:.2} s (the raw consumer's first record came after {:.2} s)",
                p.first_row_s,
                r.raw_consume
                    .as_ref()
                    .map_or(f64::NAN, |c| c.secs - c.secs_from_first)
            ),
            "≤ 0.5 s",
            Some(p.first_row_s <= 0.5),
        );
        row(
            "plain path: peak RSS",
            format!(
                "{:.0} MiB (state dir afterwards: {:.0} MiB)",
                p.peak_rss_mib, p.state_dir_mib
            ),
            "≤ 256 MiB",
            Some(p.peak_rss_mib <= 256.0),
        );
    }
    if let Some(f) = &r.full {
        let p = &f.run;
        row(
            "full path (dedup + WASM + interval join): all rows visible",
            format!(
                "{:.2} s for {} transactions = {} ({:.2}× the slower baseline, {}); {} user profiles on the side topic",
                p.all_rows_s,
                p.records,
                k(p.records_per_s),
                p.records_per_s / f.slower_baseline_per_s,
                k(f.slower_baseline_per_s),
                f.users_records
            ),
            "",
            None,
        );
        row(
            "full path: rows",
            format!(
                "{} rows ({} with a user), expected {} ({}) = {} distinct ids of {} records ({} repeats dropped){}",
                f.rows, f.matched_rows, f.expected_rows, f.expected_matched, f.distinct_ids,
                p.records, f.duplicates,
                if f.rows < f.expected_rows {
                    " — INCOMPLETE: the count stalled; time, CPU and RSS above and below are those of the last row that arrived"
                } else {
                    ""
                }
            ),
            "exact",
            Some(f.intact()),
        );
        row(
            "full path: CPU-s per million records (sluice process)",
            format!(
                "{:.2} per M transactions ({:.2} CPU-s; {:.2} per M records consumed incl. profiles; meanwhile broker {:.2}, ClickHouse {:.2}, other processes {:.2} CPU-s)",
                p.sluice_cpu_s_per_million,
                p.sluice_cpu_s,
                p.sluice_cpu_s * 1e6 / (p.records + f.users_records) as f64,
                p.broker_cpu_s,
                p.clickhouse_cpu_s,
                p.other_cpu_s
            ),
            "≤ 4",
            Some(p.sluice_cpu_s_per_million <= 4.0),
        );
        row(
            "full path: first row visible, peak RSS",
            format!(
                "first row {:.2} s; peak RSS {:.0} MiB (state dir afterwards: {:.0} MiB)",
                p.first_row_s, p.peak_rss_mib, p.state_dir_mib
            ),
            "",
            None,
        );
    } else {
        row(
            "full path (dedup + WASM + join)",
            "not measured in this run (`--phases full`)".into(),
            "≤ 4 CPU-s per M",
            None,
        );
    }
    for l in &r.latency {
        // The target is stated for 50,000 records/s; other rates are for reference.
        let (target, met) = if l.target_rate == 50_000 {
            ("p99 ≤ 500 ms", Some(l.p99_ms <= 500))
        } else {
            ("", None)
        };
        row(
            &format!("latency at {} records/s: produce → visible in ClickHouse", l.target_rate),
            format!(
                "p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms over {} s (achieved {:.0}/s); poll every {} ms",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.secs, l.achieved_rate,
                l.poll_every_ms
            ),
            target,
            met,
        );
        row(
            &format!(
                "latency run at {} records/s: sluice CPU, peak RSS",
                l.target_rate
            ),
            format!(
                "{:.2} CPU-s per M, {:.0} MiB; producer send → ack p50 {:.1} ms, p99 {:.1} ms",
                l.sluice_cpu_s_per_million, l.sluice_peak_rss_mib, l.ack_p50_ms, l.ack_p99_ms
            ),
            "",
            None,
        );
        if let Some(p) = &l.phases {
            let f = |(a, b, c): (f64, f64, f64)| format!("{a:.0}/{b:.0}/{c:.0}");
            row(
                &format!(
                    "latency run at {} records/s: a batch's work after sealing, ms p50/p90/max",
                    l.target_rate
                ),
                format!(
                    "{} in all: stages + encoding {}, journal (synced write) {}, insert + offset commit {} ({} batches)",
                    f(p.after_seal_ms),
                    f(p.stages_ms),
                    f(p.journal_ms),
                    f(p.deliver_ms),
                    p.batches
                ),
                "",
                None,
            );
        }
        row(
            "idle sluice (caught up, nothing produced): CPU per second",
            format!(
                "sluice {:.2} CPU-s/s, broker {:.2} CPU-s/s",
                l.idle_sluice_cpu_per_s, l.idle_broker_cpu_per_s
            ),
            "",
            None,
        );
        row(
            "cold start: first row visible (plugin compiled at start)",
            format!("{:.2} s", l.cold_first_row_s),
            "",
            None,
        );
    }
    for w in r.wasm.iter().filter(|w| w.lang == "rust") {
        row(
            &format!("WASM stage vs native, batches of {}", w.batch),
            format!(
                "native {:.2} µs/record, WASM {:.2} µs/record: {:.2}×",
                w.native_us_per_record,
                w.wasm_us_per_record,
                w.ratio()
            ),
            "≤ 1.25×",
            Some(w.ratio() <= 1.25),
        );
    }
    // Other languages: the same transform (same rows, checked) against the Rust code compiled
    // natively; their own native builds are not measured (docs/benchmarks.md, Method).
    let rust_wasm = r
        .wasm
        .iter()
        .find(|w| w.lang == "rust" && w.batch == 1_000)
        .map(|w| w.wasm_us_per_record);
    for w in r.wasm.iter().filter(|w| w.lang != "rust") {
        let vs_rust = rust_wasm.map_or(String::new(), |rw| {
            format!(
                "; {:.1}× the Rust plugin's WASM stage",
                w.wasm_us_per_record / rw.max(1e-12)
            )
        });
        let own = w.own_native_us_per_record.map_or(String::new(), |n| {
            format!(
                "; the same {} code built natively: {n:.2} µs/record, so WASM/native {:.2}×",
                lang_name(&w.lang),
                w.wasm_us_per_record / n.max(1e-12)
            )
        });
        row(
            &format!(
                "WASM stage, {} plugin, batches of {}",
                lang_name(&w.lang),
                w.batch
            ),
            format!(
                "{:.2} µs/record over {} records: {:.1}× the native (Rust) transform's {:.2} µs{vs_rust}{own}",
                w.wasm_us_per_record,
                w.records,
                w.ratio(),
                w.native_us_per_record
            ),
            "",
            None,
        );
    }
    for m in &r.wasm_missing {
        row("WASM stage, plugin not measured", m.clone(), "", None);
    }
    if let Some(p) = &r.plugin {
        row(
            "plugin compile (Cranelift, no cache)",
            format!(
                "{:.0} ms ({} KiB component)",
                p.compile_ms,
                p.wasm_bytes / 1024
            ),
            "",
            None,
        );
        row(
            "plugin load, precompiled artifact from the cache dir",
            format!("{:.1} ms", p.load_cached_ms),
            "",
            None,
        );
        row(
            "plugin instantiation (+ init)",
            format!(
                "{:.0} µs median, {:.0} µs max of 50",
                p.instantiate_median_us, p.instantiate_max_us
            ),
            "",
            None,
        );
    }
    match &r.dedup {
        Some(d) => {
            let peak = d.insert.peak_rss_mib.max(d.hit.peak_rss_mib);
            let (rate, in_stage) = (d.hit.per_s(), d.hit.in_stage_per_s());
            row(
                &format!(
                    "dedup state at {:.0} M keys: lookups/s, peak RSS",
                    d.keys as f64 / 1e6
                ),
                format!(
                    "{:.2} M lookups/s ({} lookups of existing keys in batches of {}, each batch's synced commit included; {:.2} M/s in the stage); peak RSS {peak} MiB (a process of its own; state on disk {} MiB)",
                    rate / 1e6,
                    d.hit.records,
                    d.batch,
                    in_stage / 1e6,
                    d.hit.state_on_disk_mib
                ),
                "≤ 1 GiB, ≥ 1 M/s",
                Some(peak <= 1024 && rate >= 1e6),
            );
            row(
                "dedup state: inserting the keys, reloading the index",
                format!(
                    "{:.0}k new keys/s ({:.0}k/s in the stage); a restart's first batch loads the index of {:.0} M keys in {:.2} s",
                    d.insert.per_s() / 1e3,
                    d.insert.in_stage_per_s() / 1e3,
                    d.keys as f64 / 1e6,
                    d.reload.busy_s
                ),
                "",
                None,
            );
        }
        None => row(
            "dedup state: RSS and lookups/s at 10 M keys",
            "not measured in this run (`--phases dedup`)".into(),
            "≤ 1 GiB, ≥ 1 M/s",
            None,
        ),
    }
    if let Some(s) = &r.swap {
        let bi = s.batch_interval_ms as f64;
        row(
            &format!(
                "hot swap at {} records/s: request → response (swap applied at a batch boundary)",
                s.target_rate
            ),
            format!(
                "p50 {:.0} ms ({:.2}× the {} ms batch interval), max {:.0} ms ({:.2}×) over {} swaps {} ms apart (achieved {:.0}/s)",
                s.response_p50_ms,
                s.response_p50_ms / bi,
                s.batch_interval_ms,
                s.response_max_ms,
                s.response_max_ms / bi,
                s.swaps.len(),
                s.swap_every_ms,
                s.achieved_rate
            ),
            "≤ 1 batch interval",
            Some(s.response_max_ms <= bi),
        );
        let mut ages: Vec<i64> = s
            .swaps
            .iter()
            .filter_map(|w| w.switch_row_produce_to_visible_ms)
            .collect();
        ages.sort_unstable();
        let mut old: Vec<i64> = s
            .swaps
            .iter()
            .filter_map(|w| w.last_old_row_after_request_ms)
            .collect();
        old.sort_unstable();
        row(
            "hot swap: last row still through the old version, produced … after the request",
            format!(
                "p50 {} ms, max {} ms (negative: produced before the request)",
                stats::quantile(&old, 0.5).unwrap_or(i64::MIN),
                old.last().copied().unwrap_or(i64::MIN)
            ),
            "",
            None,
        );
        row(
            "hot swap: request → first row of the new version visible in ClickHouse",
            format!(
                "p50 {:.0} ms ({:.2}× the batch interval), max {:.0} ms ({:.2}×); poll every {} ms; that row's own produce → visible: p50 {} ms",
                s.visible_p50_ms,
                s.visible_p50_ms / bi,
                s.visible_max_ms,
                s.visible_max_ms / bi,
                s.poll_every_ms,
                stats::quantile(&ages, 0.5).unwrap_or(-1)
            ),
            "",
            None,
        );
        row(
            "hot swap run: rows",
            format!(
                "{} rows, {} distinct ids, {} produced; {} rows not from the version the API named for their offset ({}); sluice {:.2} CPU-s per M, peak RSS {:.0} MiB; other processes {:.2} CPU-s/s (load average at start {})",
                s.rows,
                s.distinct_ids,
                s.produced,
                s.version_mismatches,
                s.rows_per_version
                    .iter()
                    .map(|(v, n)| format!("{v}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                s.sluice_cpu_s_per_million,
                s.sluice_peak_rss_mib,
                s.other_cpu_per_s,
                s.loadavg_at_start
            ),
            "none lost or duplicated",
            Some(s.intact()),
        );
    } else {
        row(
            "hot-swap latency under load",
            "not measured in this run (`--phases swap`)".into(),
            "",
            None,
        );
    }
    for s in &r.scaling {
        row(
            &format!("scaling: {} partition(s), {} instance(s)", s.partitions, s.instances),
            format!(
                "{} ({:.2} s; raw consume {}; {:.2} CPU-s per M; peak RSS {:.0} MiB; first row {:.2} s)",
                k(s.records_per_s),
                s.all_rows_s,
                k(s.raw_consume_per_s),
                s.sluice_cpu_s_per_million,
                s.peak_rss_mib,
                s.first_row_s
            ),
            "",
            None,
        );
    }
    let m = &r.machine;
    format!(
        "Machine: {} × {}, {:.1} GiB RAM, Linux {} (load average at start: {})\n\
         Source: {}. Backlog: {} records, {:.0} bytes of JSON each on average. Total bench time {:.0} s.\n\n\
         | measurement | result | target | |\n|---|---|---|---|\n{t}",
        m.cores,
        m.cpu_model,
        m.ram_gib,
        m.kernel,
        m.loadavg_at_start,
        r.commit,
        r.records,
        r.event_bytes_mean,
        r.total_secs
    )
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

async fn run(args: RunArgs) -> Result<()> {
    let t_start = Instant::now();
    let sluice = match &args.sluice {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("bench binary has no directory")?
            .join("sluice"),
    };
    if !sluice.is_file() {
        bail!(
            "{} not found (build it with cargo build --release -p sluice)",
            sluice.display()
        );
    }
    if !args.plugin.is_file() {
        bail!("plugin {} not found", args.plugin.display());
    }
    if args.phase("swap") && !args.plugin_v2.as_ref().is_some_and(|p| p.is_file()) {
        bail!("the swap phase needs --plugin-v2 <the enrich plugin built with --features v2>");
    }
    let work = args.work_dir.clone();
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("empty {}", work.display()))?;
    }
    std::fs::create_dir_all(work.join("logs"))?;
    let repo = sluice_tests::services::repo_root();
    let mut results = Results {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit: commit(&sluice_tests::services::repo_root()),
        records: args.records,
        ..Default::default()
    };
    let svc = BenchServices::new(&repo, &work, &args.broker, args.kafka_port, args.ch_port);
    say(format!("starting ClickHouse on {}", svc.ch_url()));
    svc.start_clickhouse()?;
    let ch = sluice_tests::services::ch_client(&svc.ch_url());
    let mut bench = Bench {
        args: args.clone(),
        sluice,
        work: work.clone(),
        svc,
        ch,
        run_id: 0,
    };
    let outcome = phases(&mut bench, &mut results).await;
    if let Err(e) = bench.svc.stop_all() {
        eprintln!("warning: stopping the services: {e:#}");
    }
    results.total_secs = t_start.elapsed().as_secs_f64();
    // Whatever was measured is reported, also when a later phase failed.
    let table = report(&results);
    let json_path = args.json.unwrap_or_else(|| work.join("results.json"));
    std::fs::write(&json_path, serde_json::to_vec_pretty(&results)?)?;
    std::fs::write(work.join("results.md"), &table)?;
    println!("{table}");
    say(format!(
        "results: {} and {}",
        json_path.display(),
        work.join("results.md").display()
    ));
    outcome
}

async fn phases(b: &mut Bench, r: &mut Results) -> Result<()> {
    let n = b.args.records;
    say(format!("generating {n} events"));
    let backlog = events::backlog(n);
    r.event_bytes_mean = events::mean_size(&backlog);

    if b.args.phase("backlog") {
        r.produce_backlog_s = Some(b.backlog_topic("backlog", 1, &backlog).await?);
        let raw = b.raw_consume("backlog", n)?;
        r.raw_insert = Some(b.raw_insert(&backlog).await?);
        let plain = b
            .plain_path("backlog", 1, 1, n, raw.records_per_s(), b.args.perf)
            .await?;
        r.raw_consume = Some(raw);
        r.plain = Some(plain);
    }
    // A full path whose rows are wrong does not stop the other phases; the run fails at the end.
    let mut full_broken = false;
    if b.args.phase("full") {
        let raw_insert = r.raw_insert.as_ref().map(|i| i.rows_per_s);
        let f = b.full_path(n, raw_insert).await?;
        full_broken = !f.intact();
        r.full = Some(f);
    }
    if b.args.phase("latency") {
        for rate in b.args.latency_rates.clone() {
            r.latency.push(b.latency(rate).await?);
        }
    }
    if b.args.phase("wasm") {
        // No broker running: nothing else competes for the cores.
        b.svc.stop_kafka()?;
        say("WASM stage vs native transform");
        let k = b.args.wasm_records.min(backlog.len());
        let cache = b.work.join("wasm-cache");
        r.wasm = tokio::task::block_in_place(|| {
            wasm_cost::measure(&b.args.plugin, &cache, &backlog[..k], &[1_000, 100_000], 3)
        })?;
        for (lang, path) in b.lang_plugins()? {
            if !path.is_file() {
                r.wasm_missing.push(format!(
                    "{lang}: {} not built (plugins/build-all.sh)",
                    path.display()
                ));
                continue;
            }
            say(format!(
                "{lang} plugin's WASM stage vs the native transform"
            ));
            let k = b.args.lang_records.min(backlog.len());
            let measured = tokio::task::block_in_place(|| {
                wasm_cost::measure_lang(&lang, &path, &cache, &backlog[..k], &[1_000], 3)
            });
            match measured {
                Ok(costs) => {
                    for mut c in costs {
                        if lang == "c" {
                            b.c_native(&mut c, &backlog[..k], &mut r.wasm_missing);
                        }
                        r.wasm.push(c);
                    }
                }
                Err(e) => r.wasm_missing.push(format!("{lang}: {e:#}")),
            }
        }
        say("plugin compile, load and instantiation");
        r.plugin = Some(tokio::task::block_in_place(|| {
            wasm_cost::plugin_times(&b.args.plugin, &b.work.join("plugin-times-cache"))
        })?);
    }
    if b.args.phase("dedup") {
        b.svc.stop_kafka()?;
        r.dedup = Some(b.dedup_state()?);
    }
    if b.args.phase("scaling") {
        let sn = b.args.scaling_records.unwrap_or(n);
        let scaling_backlog;
        let sb: &[BenchEvent] = if sn == n {
            &backlog
        } else {
            scaling_backlog = events::backlog(sn);
            &scaling_backlog
        };
        if sn == n && r.plain.is_some() {
            r.scaling.extend(r.plain.clone());
        } else {
            b.backlog_topic("scale1", 1, sb).await?;
            let raw = b.raw_consume("scale1", sn)?;
            r.scaling.push(
                b.plain_path("scale1", 1, 1, sn, raw.records_per_s(), false)
                    .await?,
            );
        }
        for parts in [2, 4] {
            let topic = format!("scale{parts}");
            b.backlog_topic(&topic, parts, sb).await?;
            let raw = b.raw_consume(&topic, sn)?;
            r.scaling.push(
                b.plain_path(&topic, parts, 1, sn, raw.records_per_s(), false)
                    .await?,
            );
            if parts == 4 {
                r.scaling.push(
                    b.plain_path(&topic, parts, 2, sn, raw.records_per_s(), false)
                        .await?,
                );
            }
        }
    }
    if b.args.phase("swap") {
        let s = b.swap().await?;
        let intact = s.intact();
        r.swap = Some(s);
        if !intact {
            bail!("swap: rows lost, duplicated or from the wrong version (see the results)");
        }
    }
    b.svc.stop_kafka()?;
    if full_broken {
        bail!("full path: the table does not hold the expected rows (see the results)");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::RawConsume {
            brokers,
            topic,
            group,
            count,
        } => {
            let r = kafka::raw_consume(&brokers, &topic, &group, count)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::DedupState {
            keys,
            hits,
            batch,
            dir,
        } => {
            let store = sluice::state::StateStore::open(&dir.join("state"))?;
            let d = state::dedup(&store, &dir, keys, hits, batch, |p| {
                eprintln!("  {}", p.line())
            })?;
            println!("{}", serde_json::to_string(&d)?);
            Ok(())
        }
        Cmd::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(*args)),
    }
}
