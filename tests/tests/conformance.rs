//! Conformance: the reference enrichment plugin written in every supported language (Rust, C,
//! Python, JavaScript, Go; `plugins/<lang>-enrich`) gives the same rows and the same per-record
//! errors for the same records.
//!
//! - `conformance_<lang>` runs `tests/fixtures/conformance/input.jsonl` through the real host
//!   stage (`sluice::stage::wasm::WasmStage`, the same sandbox and limits as `sluice run`) and
//!   compares with `expected.jsonl`: rows as JSON values (exactly), errors by (partition,
//!   offset, kind). It also checks that the configs in `configs.json` are accepted or refused,
//!   and that splitting the input into other batches changes nothing.
//!   It then calls one instance directly with 1,000-record batches: no call may trap (the stage
//!   would hide a trap by re-running the batch in parts).
//! - `e2e_lang_<lang>` runs the real `sluice` binary with that language's plugin between a real
//!   Kafka-protocol broker and a real ClickHouse: 1,000 events, 10 malformed.
//! - `templates_build_and_run` sets up every template of `plugins/templates` as
//!   `sluice plugin new` does, builds it and runs it through the host stage.
//!
//! The Rust plugin comes from `tests/build.rs`; the others are built once per test process by
//! `plugins/<lang>-enrich/build.sh`, which installs its toolchain on first use (cached under
//! `${SLUICE_HOME:-~/.cache/sluice}/toolchains`; `scripts/test.sh` runs `plugins/build-all.sh`
//! first, so that is a no-op here).
//!
//! `expected.jsonl` is the Rust plugin's answer, reviewed by hand. After a deliberate change of
//! behaviour, regenerate it with
//! `SLUICE_UPDATE_CONFORMANCE=1 cargo test --release -p sluice-tests --test conformance conformance_rust`
//! and review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use sluice::config::{PluginLimits, WasiGrants};
use sluice::record::{Origin, Record};
use sluice::stage::wasm::bindings::{InputRecord, Source};
use sluice::stage::wasm::{LogLabels, PluginError, PluginRuntime, WasmStage};
use sluice::stage::{BatchContext, PartitionKey, Stage};
use sluice::state::StateStore;
use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::services::{
    self, ch_execute, consume_all, create_topic, produce, query_rows_json, unique_name, TestRecord,
};
use sluice_tests::sluice::SluiceProcess;
use sluice_tests::workload::{transactions, TransactionSpec};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/conformance");

/// The repository this test was compiled from (not `services::repo_root`, which is compiled
/// into the library: checkouts sharing a target directory may swap it).
fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

// ---------------------------------------------------------------------------------------------
// The plugins
// ---------------------------------------------------------------------------------------------

/// The component of `plugins/<lang>-enrich`: Rust from `tests/build.rs`, the others built by
/// their `build.sh` (once per process; the build log is the error if it fails).
fn plugin(lang: &str) -> Result<PathBuf> {
    if lang == "rust" {
        return Ok(PathBuf::from(ENRICH_WASM));
    }
    const LANGS: [&str; 4] = ["c", "python", "js", "go"];
    static BUILDS: [OnceLock<Result<PathBuf, String>>; 4] = [const { OnceLock::new() }; 4];
    let i = LANGS
        .iter()
        .position(|l| *l == lang)
        .with_context(|| format!("no plugin for language {lang:?}"))?;
    BUILDS[i]
        .get_or_init(|| build(lang).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build(lang: &str) -> Result<PathBuf> {
    let dir = repo_root().join("plugins").join(format!("{lang}-enrich"));
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(dir.join("build.sh"))
        .output()
        .with_context(|| format!("running {}/build.sh", dir.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{}/build.sh failed ({}):\n{log}",
        dir.display(),
        out.status
    );
    let wasm = dir.join("target/enrich.wasm");
    ensure!(
        wasm.is_file(),
        "{}/build.sh succeeded but wrote no {}:\n{log}",
        dir.display(),
        wasm.display()
    );
    eprintln!(
        "{lang}: built {} in {:?}",
        wasm.display(),
        started.elapsed()
    );
    Ok(wasm)
}

/// Where compiled components are kept across runs: Python and JavaScript components take
/// tens of seconds to compile, a cached one loads in milliseconds.
fn plugin_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-plugin-cache")
}

/// One runtime per test, sharing [`plugin_cache`]. Artifacts untouched for two days (of
/// components since rebuilt) are deleted once per process: each is tens of MiB.
fn runtime() -> Result<PluginRuntime> {
    static PRUNED: OnceLock<()> = OnceLock::new();
    PRUNED.get_or_init(|| {
        let old = |e: &std::fs::DirEntry| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(2 * 86_400))
        };
        for entry in std::fs::read_dir(plugin_cache())
            .into_iter()
            .flatten()
            .flatten()
        {
            if old(&entry) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    });
    Ok(PluginRuntime::new(Some(plugin_cache()))?)
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// One line of `input.jsonl`. The payload is one of `json` (written compactly), `text` (as
/// is) or `hex` (raw bytes, for payloads that are not UTF-8).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    config: String,
    partition: i32,
    offset: i64,
    note: String,
    #[serde(default)]
    json: Option<Value>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    hex: Option<String>,
}

impl Input {
    fn payload(&self) -> Result<Vec<u8>> {
        match (&self.json, &self.text, &self.hex) {
            (Some(v), None, None) => Ok(serde_json::to_vec(v)?),
            (None, Some(t), None) => Ok(t.clone().into_bytes()),
            (None, None, Some(h)) => (0..h.len())
                .step_by(2)
                .map(|i| {
                    u8::from_str_radix(h.get(i..i + 2).context("odd hex length")?, 16)
                        .context("bad hex")
                })
                .collect(),
            _ => bail!("input {}: give exactly one of json, text, hex", self.offset),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Configs {
    /// The configs inputs refer to by name.
    configs: BTreeMap<String, Value>,
    /// Configs every plugin must accept.
    accepted: Vec<Value>,
    /// Configs every plugin must refuse in `init`.
    refused: Vec<Value>,
}

/// What a plugin made of one input.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Row { table: Option<String>, row: Value },
    Error { kind: String },
}

type Outcomes = BTreeMap<(i32, i64), Outcome>;

fn load_fixtures() -> Result<(Vec<Input>, Configs)> {
    let inputs = std::fs::read_to_string(Path::new(FIXTURES).join("input.jsonl"))?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("input.jsonl:{}", i + 1)))
        .collect::<Result<Vec<Input>>>()?;
    let configs = serde_json::from_str(&std::fs::read_to_string(
        Path::new(FIXTURES).join("configs.json"),
    )?)
    .context("configs.json")?;
    Ok((inputs, configs))
}

fn load_expected() -> Result<Outcomes> {
    let mut expected = Outcomes::new();
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("expected.jsonl"))?;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("expected.jsonl:{}", i + 1))?;
        let key = (
            v["partition"].as_i64().context("partition")? as i32,
            v["offset"].as_i64().context("offset")?,
        );
        let outcome = match v.get("error") {
            Some(kind) => Outcome::Error {
                kind: kind.as_str().context("error kind")?.to_string(),
            },
            None => Outcome::Row {
                table: v["table"].as_str().map(str::to_string),
                row: v.get("row").context("row")?.clone(),
            },
        };
        ensure!(
            expected.insert(key, outcome).is_none(),
            "expected.jsonl:{}: duplicate",
            i + 1
        );
    }
    Ok(expected)
}

fn write_expected(inputs: &[Input], outcomes: &Outcomes) -> Result<()> {
    let mut text = String::new();
    for input in inputs {
        let key = (input.partition, input.offset);
        let line = match outcomes.get(&key) {
            Some(Outcome::Row { table, row }) => json!({
                "partition": key.0, "offset": key.1, "table": table, "row": row,
            }),
            Some(Outcome::Error { kind }) => json!({
                "partition": key.0, "offset": key.1, "error": kind,
            }),
            None => continue,
        };
        text.push_str(&serde_json::to_string(&line)?);
        text.push('\n');
    }
    std::fs::write(Path::new(FIXTURES).join("expected.jsonl"), text)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running a plugin through the host stage
// ---------------------------------------------------------------------------------------------

fn record(input: &Input) -> Result<Record> {
    Ok(Record::from_origin(Arc::new(Origin {
        topic: "transactions".into(),
        partition: input.partition,
        offset: input.offset,
        timestamp_ms: Some(1_795_428_000_000),
        key: Some(format!("key-{}", input.offset).into_bytes().into()),
        value: input.payload()?.into(),
        headers: Vec::new(),
    })))
}

/// Runs `inputs` through a fresh stage in batches of at most `batch_size` (never spanning
/// partitions, as in the engine) and collects what became of each input.
fn run(
    runtime: &PluginRuntime,
    wasm: &Path,
    config: &Value,
    inputs: &[&Input],
    batch_size: usize,
) -> Result<Outcomes> {
    let plugin = runtime.load_file(wasm)?;
    let mut stage = WasmStage::new(
        "conformance",
        "enrich",
        plugin,
        config,
        PluginLimits::default(),
    )?;
    let state_dir = tempfile::tempdir()?;
    let store = StateStore::open(state_dir.path())?;
    let mut outcomes = Outcomes::new();
    let mut by_partition: BTreeMap<i32, Vec<&Input>> = BTreeMap::new();
    for input in inputs {
        by_partition.entry(input.partition).or_default().push(input);
    }
    for (partition, inputs) in by_partition {
        for chunk in inputs.chunks(batch_size.max(1)) {
            let batch = chunk
                .iter()
                .map(|i| record(i))
                .collect::<Result<Vec<_>>>()?;
            let ctx = BatchContext {
                pipeline: "conformance".into(),
                partition: PartitionKey {
                    topic: "transactions".into(),
                    partition,
                },
                first_offset: chunk.first().map_or(0, |i| i.offset),
                last_offset: chunk.last().map_or(0, |i| i.offset),
            };
            let mut txn = store.txn();
            let out = stage
                .process(batch, &ctx, &mut txn)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for r in out.records {
                let key = (r.origin.partition, r.origin.offset);
                let row: Value = serde_json::from_slice(&r.value).with_context(|| {
                    format!(
                        "input {key:?}: the row is not JSON: {}",
                        String::from_utf8_lossy(&r.value)
                    )
                })?;
                ensure!(
                    row.is_object(),
                    "input {key:?}: the row is not an object: {row}"
                );
                let outcome = Outcome::Row {
                    table: r.table,
                    row,
                };
                ensure!(
                    outcomes.insert(key, outcome).is_none(),
                    "input {key:?}: more than one output"
                );
            }
            for d in out.dead_letters {
                let key = (d.origin.partition, d.origin.offset);
                let outcome = Outcome::Error { kind: d.kind };
                ensure!(
                    outcomes.insert(key, outcome).is_none(),
                    "input {key:?}: both a row and an error ({})",
                    d.message
                );
            }
        }
    }
    Ok(outcomes)
}

fn describe(o: Option<&Outcome>) -> String {
    match o {
        None => "nothing".into(),
        Some(Outcome::Error { kind }) => format!("a {kind} error"),
        Some(Outcome::Row { table, row }) => format!("row for table {table:?}: {row}"),
    }
}

fn conformance(lang: &str) -> Result<()> {
    let wasm = plugin(lang)?;
    let (inputs, configs) = load_fixtures()?;
    let runtime = runtime()?;
    let plugin = runtime.load_file(&wasm)?;
    let mut failures = Vec::new();

    for config in &configs.accepted {
        if let Err(e) = WasmStage::new(
            "c",
            "enrich",
            plugin.clone(),
            config,
            PluginLimits::default(),
        ) {
            failures.push(format!("config {config} refused: {e}"));
        }
    }
    for config in &configs.refused {
        match WasmStage::new(
            "c",
            "enrich",
            plugin.clone(),
            config,
            PluginLimits::default(),
        ) {
            Err(PluginError::Init { .. }) => {}
            Err(e) => failures.push(format!("config {config}: not an init refusal: {e}")),
            Ok(_) => failures.push(format!("config {config} accepted, must be refused")),
        }
    }

    let mut outcomes = Outcomes::new();
    for (name, config) in &configs.configs {
        let mine: Vec<&Input> = inputs.iter().filter(|i| &i.config == name).collect();
        let whole = run(&runtime, &wasm, config, &mine, usize::MAX)?;
        // Batches are an accident of timing: other boundaries must not change any answer.
        let split = run(&runtime, &wasm, config, &mine, 7)?;
        if split != whole {
            failures.push(format!(
                "config {name}: batches of 7 give other results than one batch"
            ));
        }
        outcomes.extend(whole);
    }
    ensure!(
        inputs
            .iter()
            .all(|i| configs.configs.contains_key(&i.config)),
        "an input names an unknown config"
    );

    if lang == "rust" && std::env::var_os("SLUICE_UPDATE_CONFORMANCE").is_some() {
        write_expected(&inputs, &outcomes)?;
        eprintln!("wrote {FIXTURES}/expected.jsonl");
    }
    let expected = load_expected()?;
    for input in &inputs {
        let key = (input.partition, input.offset);
        let (want, got) = (expected.get(&key), outcomes.get(&key));
        if want != got {
            failures.push(format!(
                "partition {} offset {} ({}):\n    expected {}\n    got      {}",
                key.0,
                key.1,
                input.note,
                describe(want),
                describe(got)
            ));
        }
    }
    ensure!(
        expected.len() == inputs.len(),
        "expected.jsonl has {} entries for {} inputs",
        expected.len(),
        inputs.len()
    );
    if let Err(e) = never_traps(&runtime, &wasm) {
        failures.push(format!("{e:#}"));
    }
    ensure!(
        failures.is_empty(),
        "{lang} plugin ({}) differs from the reference in {} ways:\n{}",
        wasm.display(),
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Calls one instance directly with batches of the reference workload: no call may trap. (The
/// stage hides a trap by re-running the batch in parts, so the checks above would not see it;
/// Go's garbage collector used to trap this way, see plugins/go-enrich/enrich.go.)
fn never_traps(runtime: &PluginRuntime, wasm: &Path) -> Result<()> {
    let plugin = runtime.load_file(wasm)?;
    let labels = Arc::new(LogLabels {
        pipeline: "conformance".into(),
        stage: "enrich".into(),
        plugin: plugin.id(),
    });
    let mut instance = plugin.instantiate(
        "{}",
        &PluginLimits::default(),
        &WasiGrants::default(),
        labels,
    )?;
    let events = transactions(&TransactionSpec {
        count: 1_000,
        malformed_every: 100,
        ..Default::default()
    });
    let batch: Vec<InputRecord> = (0_i64..)
        .zip(&events)
        .map(|(offset, e)| InputRecord {
            key: Some(e.key.clone().into_bytes()),
            value: e.value.clone(),
            headers: Vec::new(),
            source: Source {
                topic: "transactions".into(),
                partition: 0,
                offset,
                timestamp_ms: None,
            },
        })
        .collect();
    for call in 0..20 {
        let result = instance
            .process(&batch)
            .with_context(|| format!("call {call} with {} records trapped", batch.len()))?;
        ensure!(
            result.outputs.len() == 990 && result.errors.len() == 10,
            "call {call}: {} rows and {} errors for 990 valid and 10 malformed records",
            result.outputs.len(),
            result.errors.len()
        );
    }
    Ok(())
}

#[test]
fn conformance_rust() -> Result<()> {
    conformance("rust")
}

#[test]
fn conformance_c() -> Result<()> {
    conformance("c")
}

/// The C plugin built for this machine (`build-native.sh`: its code and bindings with a harness
/// that calls the export as the host does), which the benchmark compares with its WASM build:
/// it must give the Rust transform's rows (`c_native` checks them) for the bench's events.
#[test]
fn c_plugin_built_natively_gives_the_same_rows() -> Result<()> {
    let dir = repo_root().join("plugins/c-enrich");
    let out = Command::new("bash")
        .arg(dir.join("build-native.sh"))
        .output()
        .context("running plugins/c-enrich/build-native.sh")?;
    ensure!(
        out.status.success(),
        "build-native.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let work = tempfile::tempdir()?;
    let events = sluice_tests::bench::events::backlog(3_000);
    let us = sluice_tests::bench::wasm_cost::c_native(
        &dir.join("target/native-bench"),
        &events,
        1_000,
        1,
        work.path(),
    )?;
    ensure!(us > 0.0, "no time measured");
    Ok(())
}

#[test]
fn conformance_python() -> Result<()> {
    conformance("python")
}

#[test]
fn conformance_js() -> Result<()> {
    conformance("js")
}

#[test]
fn conformance_go() -> Result<()> {
    conformance("go")
}

/// The fixtures cover every rule of the contract: all error kinds, routing, both configs.
#[test]
fn fixtures_cover_every_outcome() -> Result<()> {
    let (inputs, configs) = load_fixtures()?;
    let expected = load_expected()?;
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tables: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for o in expected.values() {
        match o {
            Outcome::Error { kind } => *kinds.entry(kind.as_str()).or_default() += 1,
            Outcome::Row { table, .. } => *tables.entry(table.as_deref()).or_default() += 1,
        }
    }
    for kind in ["parse", "schema", "invalid"] {
        ensure!(
            kinds.get(kind).copied().unwrap_or(0) >= 2,
            "few {kind} errors: {kinds:?}"
        );
    }
    for table in [None, Some("main"), Some("refunds"), Some("disputes")] {
        ensure!(
            tables.contains_key(&table),
            "no row for table {table:?}: {tables:?}"
        );
    }
    ensure!(configs.configs.len() >= 2 && !configs.refused.is_empty());
    let keys: std::collections::BTreeSet<_> =
        inputs.iter().map(|i| (i.partition, i.offset)).collect();
    ensure!(
        keys.len() == inputs.len(),
        "inputs repeat a (partition, offset)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// End to end, per language
// ---------------------------------------------------------------------------------------------

/// 1,000 events (10 malformed) through the real `sluice` binary with `lang`'s plugin: every
/// valid event lands once with the derived fields, every malformed one is dead-lettered with
/// this plugin named in its headers.
async fn e2e_lang(lang: &str) -> Result<()> {
    let wasm = plugin(lang)?;
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;
    let topic = unique_name(&format!("tx_{lang}"));
    let dlq = format!("{topic}-dlq");
    let table = unique_name(&format!("tx_{lang}"));
    create_topic(&kafka.brokers, &topic, 2).await?;
    let schema = std::fs::read_to_string(repo_root().join("demo/schema.sql"))?;
    ch_execute(
        &ch.url,
        &schema.replace(
            "IF NOT EXISTS transactions",
            &format!("IF NOT EXISTS default.{table}"),
        ),
    )
    .await?;

    let events = transactions(&TransactionSpec {
        count: 1_000,
        malformed_every: 100,
        ..Default::default()
    });
    let positions = produce(
        &kafka.brokers,
        &topic,
        events
            .iter()
            .map(|e| TestRecord::new(e.value.clone()).key(e.key.clone())),
    )
    .await?;

    let dir = tempfile::tempdir()?;
    // Seed sluice's plugin cache (<state dir>/plugin-cache) with the component precompiled by
    // this process: compiling the Python or JavaScript component takes ~20 s, which the
    // conformance tests already pay (and check) once.
    let digest = runtime()?.load_file(&wasm)?.digest.clone();
    let seeded = dir.path().join("state/plugin-cache");
    std::fs::create_dir_all(&seeded)?;
    for entry in std::fs::read_dir(plugin_cache())? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&digest) {
            std::fs::copy(entry.path(), seeded.join(entry.file_name()))?;
        }
    }
    let config = dir.path().join("pipeline.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
name: {topic}
kafka:
  brokers: {brokers}
  topics: [{topic}]
  group_id: {topic}
  start_offset: earliest
stages:
  - name: enrich
    wasm:
      plugin: {plugin}
      config:
        version: {lang}-v1
sink:
  clickhouse:
    url: {url}
    table: {table}
  batch:
    max_rows: 200
    max_age_ms: 100
dead_letter:
  topic: {dlq}
state:
  dir: {state}
"#,
            brokers = kafka.brokers,
            plugin = wasm.display(),
            url = ch.url,
            state = dir.path().join("state").display(),
        ),
    )?;

    let valid: BTreeMap<String, (Value, (i32, i64))> = events
        .iter()
        .zip(&positions)
        .filter(|(e, _)| !e.malformed)
        .map(|(e, p)| Ok((e.id.clone(), (serde_json::from_slice(&e.value)?, *p))))
        .collect::<Result<_>>()?;
    let malformed: BTreeMap<(i32, i64), &[u8]> = events
        .iter()
        .zip(&positions)
        .filter(|(e, _)| e.malformed)
        .map(|(e, p)| (*p, e.value.as_slice()))
        .collect();
    ensure!(malformed.len() == 10 && valid.len() == 990);

    let mut sluice = SluiceProcess::run(&config, &dir.path().join("sluice.log"))?;
    let query = format!(
        "SELECT id, user_id, amount_cents, amount_bucket, currency, kind, \
         toString(ts) AS ts, toString(event_date) AS event_date, \
         source_partition, source_offset, plugin_version FROM default.{table} ORDER BY id"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        sluice.check_alive()?;
        let rows = query_rows_json(&ch.url, &query).await?;
        if rows.len() >= valid.len() {
            break rows;
        }
        ensure!(
            Instant::now() < deadline,
            "{lang}: {} of {} rows after 120 s\n{}",
            rows.len(),
            valid.len(),
            sluice.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        rows.len() == valid.len(),
        "{lang}: {} rows, {} expected",
        rows.len(),
        valid.len()
    );
    let int = |v: &Value| -> Result<i64> {
        match v {
            Value::String(s) => Ok(s.parse()?),
            n => n.as_i64().with_context(|| format!("{n} is not an integer")),
        }
    };
    for r in &rows {
        let id = r["id"].as_str().context("id")?;
        let (event, (partition, offset)) = valid
            .get(id)
            .with_context(|| format!("unexpected row {r}"))?;
        let cents = int(&r["amount_cents"])?;
        let amount = match &event["amount"] {
            Value::String(s) => s.clone(),
            n => n.to_string(),
        };
        let (whole, frac) = amount.split_once('.').unwrap_or((&amount, "0"));
        let expected_cents =
            whole.parse::<i64>()? * 100 + format!("{frac:0<2}")[..2].parse::<i64>()?;
        ensure!(
            cents == expected_cents,
            "{lang} {id}: amount_cents {cents}, expected {expected_cents} ({amount})"
        );
        let bucket = if cents < 1_000 {
            "small"
        } else if cents < 10_000 {
            "medium"
        } else {
            "large"
        };
        ensure!(r["amount_bucket"] == bucket, "{lang} {id}: bucket {r}");
        ensure!(
            int(&r["user_id"])? == event["user_id"].as_i64().context("user_id")?,
            "{lang} {id}: user_id"
        );
        ensure!(
            r["currency"] == event["currency"] && r["kind"] == event["kind"],
            "{lang} {id}: {r}"
        );
        let ts = match &event["ts"] {
            Value::String(s) => s.clone(),
            n => sluice_tests::workload::rfc3339_ms(n.as_i64().context("ts")?),
        };
        // ClickHouse prints DateTime64(3, 'UTC') as `2026-11-23 10:00:00.123`.
        let ch_ts = ts.replacen('T', " ", 1).trim_end_matches('Z').to_string();
        ensure!(
            r["ts"] == ch_ts.as_str(),
            "{lang} {id}: ts {} != {ts}",
            r["ts"]
        );
        ensure!(r["event_date"] == ts[..10], "{lang} {id}: event_date {r}");
        ensure!(
            int(&r["source_partition"])? == i64::from(*partition),
            "{lang} {id}: partition"
        );
        ensure!(int(&r["source_offset"])? == *offset, "{lang} {id}: offset");
        ensure!(
            r["plugin_version"] == format!("{lang}-v1"),
            "{lang} {id}: plugin_version"
        );
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let letters = consume_all(&kafka.brokers, &dlq, Duration::from_secs(20)).await?;
        if letters.len() >= malformed.len() || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut seen = std::collections::BTreeSet::new();
    for l in &letters {
        let h = |k: &str| -> Result<String> {
            Ok(
                String::from_utf8_lossy(l.header(k).with_context(|| format!("header {k}"))?)
                    .into_owned(),
            )
        };
        let pos = (
            h("sluice.source.partition")?.parse()?,
            h("sluice.source.offset")?.parse()?,
        );
        let payload = malformed.get(&pos).with_context(|| {
            format!(
                "{lang}: dead letter for valid record {pos:?}: {}",
                h("sluice.error.message").unwrap_or_default()
            )
        })?;
        ensure!(
            l.payload.as_deref() == Some(*payload),
            "{lang}: dead letter payload differs"
        );
        let kind = h("sluice.error.kind")?;
        ensure!(kind == "parse" || kind == "schema", "{lang}: kind {kind}");
        ensure!(
            h("sluice.plugin")?.starts_with("enrich@"),
            "{lang}: plugin header {}",
            h("sluice.plugin")?
        );
        seen.insert(pos);
    }
    ensure!(
        seen.len() == malformed.len(),
        "{lang}: {} of {} dead letters",
        seen.len(),
        malformed.len()
    );

    sluice
        .stop_cleanly(Duration::from_secs(30))
        .with_context(|| format!("{lang}: stopping sluice"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_lang_c() -> Result<()> {
    e2e_lang("c").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_lang_python() -> Result<()> {
    e2e_lang("python").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_lang_js() -> Result<()> {
    e2e_lang("js").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_lang_go() -> Result<()> {
    e2e_lang("go").await
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// Sets up `plugins/templates/<lang>` as `sluice plugin new --lang <lang> <name>` does (every
/// `{{name}}` replaced, `{{sdk_path}}` pointing at guest-sdk/, the contract in `wit/` and
/// `toolchains.sh` copied next to `build.sh`) in a stable directory, so that a rebuild with
/// unchanged sources is a no-op. Files are only written when their content changes.
fn instantiate_template(lang: &str, name: &str) -> Result<PathBuf> {
    let root = repo_root();
    let template = root.join("plugins/templates").join(lang);
    let dest = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("templates")
        .join(lang);
    let sdk = root.join("guest-sdk").canonicalize()?;
    let mut files = vec![
        (root.join("wit/plugin.wit"), PathBuf::from("wit/plugin.wit")),
        (
            root.join("plugins/toolchains.sh"),
            PathBuf::from("toolchains.sh"),
        ),
    ];
    let mut stack = vec![template.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default();
            if name == "target" || name == "__pycache__" {
                continue; // left by building the template in place
            } else if path.is_dir() {
                stack.push(path);
            } else {
                files.push((path.clone(), path.strip_prefix(&template)?.to_path_buf()));
            }
        }
    }
    for (from, to) in files {
        let text = std::fs::read_to_string(&from)
            .with_context(|| format!("{}", from.display()))?
            .replace("{{name}}", name)
            .replace("{{sdk_path}}", &sdk.display().to_string());
        let to = dest.join(to);
        if std::fs::read_to_string(&to).ok().as_deref() != Some(text.as_str()) {
            std::fs::create_dir_all(to.parent().context("a file has a parent")?)?;
            std::fs::write(&to, text)?;
        }
    }
    Ok(dest)
}

/// Every template builds and its component works through the host stage: a JSON object gets
/// its greeting, a payload that is not UTF-8 is a `parse` error.
#[test]
fn templates_build_and_run() -> Result<()> {
    let runtime = runtime()?;
    let mut failures = Vec::new();
    for lang in ["rust", "c", "python", "js", "go"] {
        let name = format!("hello_{lang}");
        let result = (|| -> Result<()> {
            let dir = instantiate_template(lang, &name)?;
            let out = Command::new("bash").arg(dir.join("build.sh")).output()?;
            ensure!(
                out.status.success(),
                "build.sh failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let plugin = runtime.load_file(&dir.join(format!("target/{name}.wasm")))?;
            let config = json!({"greeting": "hi"});
            let mut stage = WasmStage::new("t", "hello", plugin, &config, PluginLimits::default())?;
            let inputs: Vec<Input> = [&br#"{"id": 1}"#[..], b"\xff"]
                .iter()
                .zip(0..)
                .map(|(payload, offset)| Input {
                    config: String::new(),
                    partition: 0,
                    offset,
                    note: String::new(),
                    json: None,
                    text: None,
                    hex: Some(payload.iter().map(|b| format!("{b:02x}")).collect()),
                })
                .collect();
            let batch = inputs.iter().map(record).collect::<Result<Vec<_>>>()?;
            let ctx = BatchContext {
                pipeline: "t".into(),
                partition: PartitionKey {
                    topic: "transactions".into(),
                    partition: 0,
                },
                first_offset: 0,
                last_offset: 1,
            };
            let state_dir = tempfile::tempdir()?;
            let store = StateStore::open(state_dir.path())?;
            let out = stage
                .process(batch, &ctx, &mut store.txn())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(
                out.records.len() == 1 && out.dead_letters.len() == 1,
                "{out:?}"
            );
            let row: Value = serde_json::from_slice(&out.records[0].value)?;
            let greeting = row["greeting"].as_str().unwrap_or_default();
            ensure!(greeting.ends_with(&format!("from {name}")), "row {row}");
            ensure!(
                out.dead_letters[0].kind == "parse",
                "{:?}",
                out.dead_letters[0]
            );
            Ok(())
        })();
        if let Err(e) = result {
            failures.push(format!("template {lang}: {e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}
