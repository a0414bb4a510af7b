//! The fault suite (issue 5): the real `sluice` binary between a real Kafka-protocol broker and a
//! real ClickHouse, under crashes, outages and rebalances, with a paced load running throughout.
//! Every run compares the final table row by row with the rows a single, undisturbed instance
//! must produce (computed from what the topics actually hold), counting lost, duplicated and
//! wrong rows, and the suite prints a table of the results (see `docs/reliability.md`).
//!
//! The workload is the reference one (`e2e_dedup_join.rs`): transactions with 10 % repeated ids
//! and 1 % malformed records → dedup (1 h window) → the enrich plugin (WASM) → an interval join
//! with a users topic (left outer), so stage state (dedup keys, buffered join sides) has to stay
//! consistent with what reached ClickHouse.
//!
//! Quick mode (default, CI) takes a few minutes; `SLUICE_SOAK=1` runs more and longer.
//! `SLUICE_FAULT_SEED=<n>` repeats a run's random choices (each test prints its seed).
//! `SLUICE_FAULT_KEEP=1` keeps every run's logs and state (by default only a failed run's).
//!
//! Scenarios run one at a time (they load the machine and one measures memory). The
//! `rebalance_` test runs two instances that hand partition state over through the state
//! changelog topic (`state.changelog`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use sluice_tests::faults::{
    self, compare, record, LoadGen, Outcome, OwnService, RssSampler, ScenarioResult, ServiceKind,
};
use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::services::{
    self, ch_execute, committed_offsets, consume_all, consume_all_uncommitted, create_topic,
    produce, query_rows_json, unique_name, TestRecord,
};
use sluice_tests::sluice::SluiceProcess;
use sluice_tests::workload::{
    event_time_ms, transactions, user_profiles, Profile, Rng, TransactionSpec, BASE_TS_MS,
};

const MIN: i64 = 60_000;
const USERS: u64 = 40;
/// The interval join's `allowed_lateness` (below).
const LATENESS_MS: i64 = MIN;
/// Event-time step between two transactions (`workload::transaction`).
const TX_STEP_MS: i64 = 37;

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pick<T: Copy>(quick: T, soak: T) -> T {
    if faults::soak() {
        soak
    } else {
        quick
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[fault_suite] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// The workload and its expected rows
// ---------------------------------------------------------------------------------------------

/// One row of the joined table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct JoinedRow {
    id: String,
    user_id: i64,
    amount_cents: i64,
    source_partition: i64,
    source_offset: i64,
    plugin_version: String,
    user_name: Option<String>,
    user_country: Option<String>,
}

/// What a single undisturbed instance must produce from the topics as they are.
struct Model {
    rows: Vec<JoinedRow>,
    /// (partition, offset) of every transaction that must be dead-lettered.
    dead: BTreeSet<(i32, i64)>,
    /// Records in the transactions topic (the load plus the two flush records).
    tx_records: usize,
}

/// Where one sluice instance writes: pipeline/group name, table, state dir, instance id.
struct Target {
    group: String,
    table: String,
    state: String,
    instance_id: Option<String>,
    /// The state changelog topic (state hand-off between instances), if any.
    changelog: Option<String>,
    /// A dead-letter topic of its own (default: the workload's, which the checks read).
    dlq: Option<String>,
    /// `state.outbox_file_min_kb` (default: sluice's, 1 MiB, which the small batches here
    /// never reach).
    outbox_file_min_kb: Option<usize>,
}

struct Workload {
    brokers: String,
    ch_url: String,
    tx_topic: String,
    users_topic: String,
    dlq: String,
    group: String,
    table: String,
    dir: tempfile::TempDir,
    /// The load, in produce order, with its partition.
    load: Vec<TestRecord>,
    /// Payload → malformed?
    kinds: HashMap<Vec<u8>, bool>,
    /// Event time after every transaction and profile, for the flush records.
    flush_ts: i64,
    /// When the broker was stopped: (SIGTERM sent, process gone), wall-clock ms.
    broker_stops: std::sync::Mutex<Vec<(i64, i64)>>,
}

/// How long before a broker stop a transaction that the broker loses may have begun (see
/// [`Workload::dead_letter_outcome`]): a transaction of sluice's takes well under a second.
const OPEN_TXN_WINDOW_MS: i64 = 10_000;

/// Dead letters checked against the model.
#[derive(Debug, Default)]
struct Letters {
    missing: usize,
    duplicated: usize,
    unexpected: usize,
    /// Missing ones the broker lost with a transaction it acknowledged across its restart.
    lost_by_broker: usize,
    /// Source positions (partition, offset) of some duplicated and missing ones, to find
    /// their batches in the logs.
    examples: Vec<String>,
}

impl Letters {
    fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const COLUMNS: &str = "id String, user_id UInt64, amount_cents Int64, \
    currency LowCardinality(String), ts DateTime64(3, 'UTC'), source_partition Int32, \
    source_offset Int64, plugin_version LowCardinality(String), user_name Nullable(String), \
    user_country Nullable(String)";

impl Workload {
    /// Topics, table and users on the given services, and `planned` transactions ready to be
    /// produced by [`Workload::start_load`]. Valid transactions carry a `pad` field of `pad`
    /// bytes (not a table column) to make records as large as a test needs.
    async fn new(
        brokers: &str,
        ch_url: &str,
        planned: usize,
        seed: u64,
        pad: usize,
    ) -> Result<Self> {
        let tx_topic = unique_name("ftx");
        let users_topic = unique_name("fusers");
        // Co-partitioned: both keyed by user (partition = user_id % 2).
        create_topic(brokers, &tx_topic, 2).await?;
        create_topic(brokers, &users_topic, 2).await?;
        let w = Self {
            brokers: brokers.to_string(),
            ch_url: ch_url.to_string(),
            dlq: format!("{tx_topic}-dlq"),
            group: unique_name("fg"),
            table: unique_name("fjoined"),
            tx_topic,
            users_topic,
            dir: tempfile::tempdir()?,
            load: Vec::new(),
            kinds: HashMap::new(),
            flush_ts: 0,
            broker_stops: std::sync::Mutex::default(),
        };
        w.create_table(&w.table).await?;

        let events = transactions(&TransactionSpec {
            count: planned,
            users: USERS,
            malformed_every: 100,
            duplicate_percent: 10,
            seed,
        });
        // Spread the profiles over the transactions' time span so that some pair and some not.
        let span = planned as i64 * TX_STEP_MS;
        let spacing = (span / USERS as i64).max(30_000);
        let profiles = user_profiles(USERS, spacing);
        produce(
            brokers,
            &w.users_topic,
            profiles.iter().map(|p| {
                TestRecord::new(p.to_json())
                    .key(p.user_id.to_string())
                    .partition((p.user_id % 2) as i32)
            }),
        )
        .await?;
        let mut kinds = HashMap::new();
        let mut load = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let parsed = serde_json::from_slice::<Value>(&e.value).ok();
            let partition = parsed
                .as_ref()
                .and_then(|v| v["user_id"].as_u64())
                .map_or((i % 2) as i32, |u| (u % 2) as i32);
            let value = match parsed {
                // A repeated event is padded alike, so it stays byte-identical.
                Some(mut v) if !e.malformed && pad > 0 => {
                    v["pad"] = json!("p".repeat(pad));
                    serde_json::to_vec(&v)?
                }
                _ => e.value.clone(),
            };
            kinds.insert(value.clone(), e.malformed);
            load.push(
                TestRecord::new(value)
                    .key(e.key.clone())
                    .partition(partition),
            );
        }
        let last_profile = profiles.iter().map(|p| p.ts_ms).max().unwrap_or(BASE_TS_MS);
        Ok(Self {
            load,
            kinds,
            flush_ts: (BASE_TS_MS + span).max(last_profile) + 120 * MIN,
            ..w
        })
    }

    async fn create_table(&self, table: &str) -> Result<()> {
        ch_execute(
            &self.ch_url,
            &format!(
                "CREATE TABLE default.{table} ({COLUMNS}) ENGINE = MergeTree ORDER BY tuple() \
                 SETTINGS non_replicated_deduplication_window = 1000"
            ),
        )
        .await
    }

    /// The usual single instance.
    fn main_target(&self) -> Target {
        Target {
            group: self.group.clone(),
            table: self.table.clone(),
            state: "state".into(),
            instance_id: None,
            changelog: None,
            dlq: None,
            outbox_file_min_kb: None,
        }
    }

    /// Writes a pipeline file for `t`, batches of at most `max_rows`.
    fn config(&self, t: &Target, max_rows: usize) -> Result<PathBuf> {
        let path = self
            .dir
            .path()
            .join(format!("{}-{}.yaml", t.group, t.state));
        let instance = t
            .instance_id
            .as_ref()
            .map(|i| format!("  instance_id: \"{i}\"\n"))
            .unwrap_or_default();
        let changelog = t
            .changelog
            .as_ref()
            .map(|c| format!("  changelog: {{topic: {c}}}\n"))
            .unwrap_or_default();
        let outbox_files = t
            .outbox_file_min_kb
            .map(|kb| format!("  outbox_file_min_kb: {kb}\n"))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                r#"
name: {group}
kafka:
  brokers: {brokers}
  topics: [{tx}]
  group_id: {group}
  start_offset: earliest
{instance}stages:
  - name: dedup
    dedup:
      key: /id
      window: 1h
      time: {{field: /ts}}
  - name: enrich
    wasm:
      plugin: {ENRICH_WASM}
      config: {{version: v1}}
  - name: with-user
    join:
      kind: interval
      right_topic: {users}
      left_key: /user_id
      right_key: /user_id
      left_time: {{field: /ts, format: rfc3339}}
      right_time: {{field: /ts, format: epoch_ms}}
      before: 5m
      after: 5m
      allowed_lateness: 1m
      mode: left_outer
      prefix: user_
      fields: [name, country]
sink:
  clickhouse:
    url: {url}
    table: {table}
  batch:
    max_rows: {max_rows}
    max_age_ms: 100
dead_letter:
  topic: {dlq}
state:
  dir: {state}
{changelog}{outbox_files}"#,
                group = t.group,
                brokers = self.brokers,
                tx = self.tx_topic,
                users = self.users_topic,
                url = self.ch_url,
                table = t.table,
                dlq = t.dlq.as_ref().unwrap_or(&self.dlq),
                state = self.dir.path().join(&t.state).display(),
            ),
        )?;
        Ok(path)
    }

    /// Stops the load, produces the flush records and returns the model of what the topics
    /// hold, checking that the broker kept every acknowledged record.
    async fn finish_load(&self, load: LoadGen) -> Result<Model> {
        let produced = load.finish().await?;
        self.flush().await?;
        let model = self.expected().await?;
        ensure!(
            model.tx_records as u64 >= produced,
            "the broker holds {} records, {produced} were acknowledged (it lost some)",
            model.tx_records
        );
        Ok(model)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("sluice-{name}.log"))
    }

    /// Starts producing the transactions at `per_second`.
    fn start_load(&self, per_second: u64) -> Result<LoadGen> {
        LoadGen::start(&self.brokers, &self.tx_topic, self.load.clone(), per_second)
    }

    /// Moves both sides of both partitions far ahead in event time, so every join window
    /// closes and unmatched transactions are emitted. These records stay buffered themselves.
    async fn flush(&self) -> Result<()> {
        for p in 0..2i32 {
            let tx = json!({"id": format!("tx-flush-{p}"), "user_id": 1000 + p,
                "amount": "1.00", "currency": "EUR", "kind": "purchase", "ts": self.flush_ts});
            produce(
                &self.brokers,
                &self.tx_topic,
                [TestRecord::new(serde_json::to_vec(&tx)?).partition(p)],
            )
            .await?;
            let user = Profile {
                user_id: 2000 + p as u64,
                name: "flush".into(),
                country: "XX".into(),
                ts_ms: self.flush_ts,
            };
            produce(
                &self.brokers,
                &self.users_topic,
                [TestRecord::new(user.to_json()).partition(p)],
            )
            .await?;
        }
        Ok(())
    }

    /// The expected rows, from what the topics hold (so a record the producer wrote twice
    /// while the broker restarted is expected exactly as sluice must treat it).
    async fn expected(&self) -> Result<Model> {
        let tx = consume_all(&self.brokers, &self.tx_topic, Duration::from_secs(120)).await?;
        let users = consume_all(&self.brokers, &self.users_topic, Duration::from_secs(60)).await?;
        let mut profiles: HashMap<u64, Vec<(i64, String, String)>> = HashMap::new();
        for u in &users {
            let v: Value = serde_json::from_slice(u.payload.as_deref().unwrap_or_default())?;
            profiles
                .entry(v["user_id"].as_u64().context("profile user_id")?)
                .or_default()
                .push((
                    v["ts"].as_i64().context("profile ts")?,
                    v["name"].as_str().unwrap_or_default().to_string(),
                    v["country"].as_str().unwrap_or_default().to_string(),
                ));
        }
        let mut rows = Vec::new();
        let mut dead = BTreeSet::new();
        let mut seen: BTreeSet<(i32, String)> = BTreeSet::new();
        let mut watermark: BTreeMap<i32, i64> = BTreeMap::new();
        // consume_all returns records sorted by (partition, offset): each partition in order.
        for r in &tx {
            let payload = r.payload.as_deref().unwrap_or_default();
            let pos = (r.partition, r.offset);
            let malformed = match self.kinds.get(payload) {
                Some(m) => *m,
                None if is_flush(payload) => continue,
                None => bail!(
                    "record {pos:?} is not from this workload: {}",
                    String::from_utf8_lossy(payload)
                ),
            };
            if malformed {
                dead.insert(pos);
                continue;
            }
            let v: Value = serde_json::from_slice(payload)?;
            let id = v["id"].as_str().context("id")?.to_string();
            // The dedup stage: the first occurrence of an id in the partition passes.
            if !seen.insert((r.partition, id.clone())) {
                continue;
            }
            // The join: a record more than the allowed lateness behind its side is late.
            let ts = event_time_ms(&v["ts"]).context("ts")?;
            let wm = watermark.entry(r.partition).or_insert(i64::MIN);
            if ts < wm.saturating_sub(LATENESS_MS) {
                dead.insert(pos);
                continue;
            }
            *wm = (*wm).max(ts);
            let user = v["user_id"].as_u64().context("user_id")?;
            let cents = match &v["amount"] {
                Value::String(s) => (s.parse::<f64>()? * 100.0).round() as i64,
                n => (n.as_f64().context("amount")? * 100.0).round() as i64,
            };
            let row = |p: Option<&(i64, String, String)>| JoinedRow {
                id: id.clone(),
                user_id: user as i64,
                amount_cents: cents,
                source_partition: i64::from(r.partition),
                source_offset: r.offset,
                plugin_version: "v1".into(),
                user_name: p.map(|p| p.1.clone()),
                user_country: p.map(|p| p.2.clone()),
            };
            let matches: Vec<&(i64, String, String)> = profiles
                .get(&user)
                .map(|ps| ps.iter().filter(|p| (p.0 - ts).abs() <= 5 * MIN).collect())
                .unwrap_or_default();
            if matches.is_empty() {
                rows.push(row(None));
            }
            for p in matches {
                rows.push(row(Some(p)));
            }
        }
        rows.sort();
        let matched = rows.iter().filter(|r| r.user_name.is_some()).count();
        ensure!(
            matched > 0 && matched < rows.len(),
            "the workload does not exercise the join: {matched} of {} rows matched",
            rows.len()
        );
        Ok(Model {
            rows,
            dead,
            tx_records: tx.len(),
        })
    }

    async fn count(&self, table: &str) -> Result<u64> {
        let rows = query_rows_json(
            &self.ch_url,
            &format!("SELECT count() AS c FROM default.{table}"),
        )
        .await?;
        num(rows
            .first()
            .map(|r| &r["c"])
            .context("count() returned nothing")?)
        .map(|n| n as u64)
    }

    async fn rows(&self, table: &str) -> Result<Vec<JoinedRow>> {
        let rows = query_rows_json(
            &self.ch_url,
            &format!(
                "SELECT id, user_id, amount_cents, source_partition, source_offset, plugin_version, \
                 user_name, user_country FROM default.{table} \
                 SETTINGS output_format_json_quote_64bit_integers = 0"
            ),
        )
        .await?;
        rows.iter()
            .map(|r| {
                let text = |k: &str| r[k].as_str().map(str::to_string);
                Ok(JoinedRow {
                    id: text("id").context("id")?,
                    user_id: num(&r["user_id"])?,
                    amount_cents: num(&r["amount_cents"])?,
                    source_partition: num(&r["source_partition"])?,
                    source_offset: num(&r["source_offset"])?,
                    plugin_version: text("plugin_version").unwrap_or_default(),
                    user_name: text("user_name"),
                    user_country: text("user_country"),
                })
            })
            .collect()
    }

    /// Sum of the group's committed offsets over the transactions topic.
    async fn committed(&self, group: &str) -> Result<i64> {
        Ok(committed_offsets(&self.brokers, group, &self.tx_topic)
            .await?
            .values()
            .map(|o| o.unwrap_or(0))
            .sum())
    }

    /// Waits until the group committed past `before` (sluice is consuming, inserting and
    /// committing), checking that every process is alive.
    async fn wait_progress(
        &self,
        procs: &mut [&mut SluiceProcess],
        group: &str,
        before: i64,
        timeout: Duration,
    ) -> Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            for p in procs.iter_mut() {
                p.check_alive()?;
            }
            // The broker may be restarting: an error is "no progress yet".
            if let Ok(c) = self.committed(group).await {
                if c > before {
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = procs.iter().map(|p| p.log_tail()).collect();
                bail!(
                    "no commit past {before} within {timeout:?}\n{}",
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `table` holds at least `n` rows (then a little longer, so rows beyond `n`
    /// show up too). Returns false on timeout: the comparison then reports what is missing.
    async fn wait_rows(
        &self,
        procs: &mut [&mut SluiceProcess],
        table: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            for p in procs.iter_mut() {
                p.check_alive()?;
            }
            if self.count(table).await? >= n as u64 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Dead letters checked against the model.
    ///
    /// noida-db acknowledges the commit of a transaction that was open while it restarted, but
    /// read_committed consumers never see its records (read_uncommitted ones do; the broker's
    /// fault, a Kafka broker keeps the transaction). A dead letter missing from the committed
    /// topic is put down to that only if it is there uncommitted and was produced just before
    /// a broker stop; any other is missing.
    async fn dead_letter_outcome(&self, model: &Model) -> Result<Letters> {
        let letters = consume_all(&self.brokers, &self.dlq, Duration::from_secs(60)).await?;
        let mut found: BTreeSet<(i32, i64)> = BTreeSet::new();
        let mut out = Letters::default();
        for l in &letters {
            match self.letter_source(l) {
                None => {}
                Some(None) => out.unexpected += 1,
                Some(Some(pos)) if !model.dead.contains(&pos) => out.unexpected += 1,
                Some(Some(pos)) if !found.insert(pos) => {
                    out.duplicated += 1;
                    out.examples
                        .push(format!("duplicated: {}@{}", pos.0, pos.1));
                }
                Some(Some(_)) => {}
            }
        }
        let missing: BTreeSet<_> = model.dead.difference(&found).copied().collect();
        let stops = self
            .broker_stops
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut lost = BTreeSet::new();
        if !missing.is_empty() && !stops.is_empty() {
            let all =
                consume_all_uncommitted(&self.brokers, &self.dlq, Duration::from_secs(60)).await?;
            for l in &all {
                let Some(Some(pos)) = self.letter_source(l) else {
                    continue;
                };
                let at = l.timestamp.unwrap_or(0);
                if missing.contains(&pos)
                    && stops
                        .iter()
                        .any(|(from, to)| at >= from - OPEN_TXN_WINDOW_MS && at <= *to)
                {
                    lost.insert(pos);
                }
            }
        }
        out.lost_by_broker = lost.len();
        out.missing = missing.len() - lost.len();
        for (p, o) in missing.difference(&lost).take(6) {
            out.examples.push(format!("missing: {p}@{o}"));
        }
        Ok(out)
    }

    /// The source position a dead letter of this workload names: `None` for another
    /// workload's, `Some(None)` if its headers do not say.
    fn letter_source(&self, l: &services::ConsumedRecord) -> Option<Option<(i32, i64)>> {
        if l.header("sluice.source.topic") != Some(self.tx_topic.as_bytes()) {
            return None;
        }
        let h = |k: &str| std::str::from_utf8(l.header(k)?).ok()?.parse::<i64>().ok();
        Some(
            h("sluice.source.partition")
                .zip(h("sluice.source.offset"))
                .map(|(p, o)| (p as i32, o)),
        )
    }

    /// Compares `table` with the model.
    async fn outcome(&self, model: &Model, table: &str) -> Result<Outcome> {
        let got = self.rows(table).await?;
        Ok(compare(&model.rows, &got, key_of, source_of))
    }

    /// Keeps the logs and state of a run that went wrong, and says where.
    fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// One of the records [`Workload::flush`] writes.
fn is_flush(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v["id"].as_str().map(|id| id.starts_with("tx-flush-")))
        .unwrap_or(false)
}

fn key_of(r: &JoinedRow) -> String {
    r.id.clone()
}

fn source_of(r: &JoinedRow) -> (i64, i64) {
    (r.source_partition, r.source_offset)
}

fn num(v: &Value) -> Result<i64> {
    match v {
        Value::String(s) => Ok(s.parse()?),
        n => n.as_i64().with_context(|| format!("{n} is not an integer")),
    }
}

fn count_in_log(p: &SluiceProcess, needle: &str) -> usize {
    p.log_text().matches(needle).count()
}

/// Stops sluice with SIGTERM and checks it exits cleanly.
fn stop(p: &mut SluiceProcess) -> Result<()> {
    let status = p.terminate(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "sluice exited with {status}\n{}",
        p.log_tail()
    );
    ensure!(!p.log_text().contains("panicked"), "{}", p.log_tail());
    Ok(())
}

/// Everything a run checks after the workload was fully produced and processed.
async fn finish_run(
    w: Workload,
    model: &Model,
    table: &str,
    label: &str,
    total: &mut Outcome,
    problems: &mut Vec<String>,
) -> Result<()> {
    let o = w.outcome(model, table).await?;
    let d = w.dead_letter_outcome(model).await?;
    let broker_lost = if d.lost_by_broker > 0 {
        format!(
            " (and {} in transactions noida-db acknowledged across its restart but never \
             committed)",
            d.lost_by_broker
        )
    } else {
        String::new()
    };
    say(format!(
        "{label}: {} rows expected, {} seen, lost {}, duplicated {} (dedup misses {}), wrong {}; \
         dead letters missing {}, duplicated {}, unexpected {}{broker_lost}",
        o.expected,
        o.seen,
        o.lost,
        o.duplicated,
        o.dedup_misses,
        o.wrong,
        d.missing,
        d.duplicated,
        d.unexpected
    ));
    for e in o.examples.iter().take(6) {
        say(format!("  {e}"));
    }
    for e in d.examples.iter().take(6) {
        say(format!("  dead letter {e}"));
    }
    let letters_ok = d.ok();
    if !letters_ok {
        problems.push(format!(
            "{label}: dead letters missing {}, duplicated {}, unexpected {}",
            d.missing, d.duplicated, d.unexpected
        ));
    }
    total.add(&o);
    // SLUICE_FAULT_KEEP=1 keeps every run's logs and state, clean or not.
    if !o.clean() || !letters_ok || std::env::var_os("SLUICE_FAULT_KEEP").is_some() {
        let dir = w.keep();
        say(format!("{label}: logs and state kept in {}", dir.display()));
    }
    Ok(())
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn mib(kib: Option<u64>) -> u64 {
    kib.unwrap_or(0) / 1024
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 at random moments and at each point of the batch cycle
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_kill9_at_random_moments_loses_and_duplicates_nothing() -> Result<()> {
    use sluice::fault::{AFTER_BEGIN, AFTER_COMMIT, AFTER_DEAD_LETTERS, AFTER_INSERT};
    let _serial = SERIAL.lock().await;
    let seed = faults::seed();
    say(format!(
        "kill -9: seed {seed} (SLUICE_FAULT_SEED={seed} repeats it)"
    ));
    let mut rng = Rng::new(seed);
    let rounds = pick(2, 5);
    let rate = pick(300, 800);
    // Per round: random-moment kills, plus crashes at each point of the batch cycle (after the
    // journal write, between the insert and the dead letters / the offset commit, after the
    // commit), in random order.
    let random_kills = pick(8, 12);
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;

    let mut total = Outcome::default();
    let mut problems = Vec::new();
    let (mut runs, mut kills, mut injected, mut replays) = (0u64, 0, 0, 0);
    for round in 0..rounds {
        let w = Workload::new(
            &kafka.brokers,
            &ch.url,
            rate as usize * 150,
            rng.next_u64(),
            0,
        )
        .await?;
        let mut target = w.main_target();
        // Every outbox in a file: kills land between its write, its reference's and its deletion.
        target.outbox_file_min_kb = Some(0);
        // Every other round with the state changelog: each restart then also restores from it
        // (the batch in flight comes back from the changelog's copy).
        if round % 2 == 1 {
            target.changelog = Some(format!("{}-state", target.group));
        }
        // Small batches: kills land between many journal writes, inserts and commits.
        let config = w.config(&target, 100)?;
        let cfg = config.to_string_lossy().into_owned();
        let load = w.start_load(rate)?;
        let mut plan: Vec<Option<(&str, u64)>> = vec![None; random_kills];
        for point in [AFTER_BEGIN, AFTER_INSERT, AFTER_DEAD_LETTERS, AFTER_COMMIT] {
            plan.push(Some((point, 1 + rng.below(4))));
        }
        // Two more between insert and commit: the window the issue singles out.
        plan.push(Some((AFTER_INSERT, 2 + rng.below(6))));
        plan.push(Some((AFTER_DEAD_LETTERS, 2 + rng.below(6))));
        shuffle(&mut plan, &mut rng);
        for (i, crash) in plan.iter().enumerate() {
            let log = w.log(&format!("r{round}-{i}"));
            let mut p = match crash {
                None => {
                    let before = w.committed(&target.group).await?;
                    let mut p = SluiceProcess::run(&config, &log)?;
                    w.wait_progress(
                        &mut [&mut p],
                        &target.group,
                        before,
                        Duration::from_secs(60),
                    )
                    .await?;
                    tokio::time::sleep(ms(rng.below(1500))).await;
                    p.check_alive()?;
                    p.kill9()?;
                    kills += 1;
                    p
                }
                Some((point, after)) => {
                    let after = after.to_string();
                    let mut p = SluiceProcess::spawn_with_env(
                        &["run", "-c", &cfg],
                        &[
                            ("SLUICE_FAULT_POINT", point),
                            ("SLUICE_FAULT_AFTER", &after),
                        ],
                        &log,
                    )?;
                    let status = p.wait_exit(Duration::from_secs(90))?;
                    ensure!(
                        !status.success() && p.log_text().contains("fault injection: aborting at"),
                        "expected an injected crash at {point} (hit {after})\n{}",
                        p.log_tail()
                    );
                    injected += 1;
                    p
                }
            };
            replays += count_in_log(&p, "re-sending batch from the journal");
            let _ = p.kill9();
            runs += 1;
        }
        let model = w.finish_load(load).await?;
        let mut p = SluiceProcess::run(&config, &w.log(&format!("r{round}-final")))?;
        w.wait_rows(
            &mut [&mut p],
            &target.table,
            model.rows.len(),
            Duration::from_secs(240),
        )
        .await?;
        replays += count_in_log(&p, "re-sending batch from the journal");
        stop(&mut p)?;
        finish_run(
            w,
            &model,
            &target.table,
            &format!("kill -9 round {round}"),
            &mut total,
            &mut problems,
        )
        .await?;
    }
    record(ScenarioResult {
        scenario: "kill -9 (random moments + fault points), dedup → WASM → join".into(),
        runs,
        outcome: total.clone(),
        note: format!(
            "{kills} random kills, {injected} injected crashes, {replays} batches re-sent from the journal; \
             odd rounds with the state changelog"
        ),
    });
    ensure!(
        total.clean() && problems.is_empty(),
        "kill -9: {total:?} {problems:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. ClickHouse down for 60 s under load
// ---------------------------------------------------------------------------------------------

/// Bytes of padding per transaction in the outage scenario: at 1000 records/s the backlog
/// grows by ~1.7 MB/s, ~50 MB per half of the outage, well past librdkafka's 16 MiB prefetch
/// queue.
const OUTAGE_PAD: usize = 1500;

/// How much sluice's RSS may grow from the first to the second half of the outage. The load
/// goes on at the same rate in both halves, so holding on to what it consumed would add ~50 MB;
/// bounded buffers (the worker channel, librdkafka's prefetch queue) level off.
const OUTAGE_GROWTH_LIMIT_MIB: u64 = 24;

/// How far above its level before the outage sluice's RSS may go while ClickHouse is down: the
/// 16 MiB prefetch queue, two batches in the worker channel, allocator slack.
const OUTAGE_EXTRA_LIMIT_MIB: u64 = 128;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clickhouse_down_60s_under_load() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed = faults::seed();
    say(format!("ClickHouse outage: seed {seed}"));
    let mut rng = Rng::new(seed);
    let runs = pick(1, 3);
    let rate = 1000;
    let outage = Duration::from_secs(60);

    let mut total = Outcome::default();
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for run in 0..runs {
        // Its own ClickHouse: stopping the shared one would break the other tests. Its own
        // broker too: noida-db keeps every record in memory, and this load is large.
        let mut ch =
            tokio::task::block_in_place(|| OwnService::start_new(ServiceKind::ClickHouse))?;
        let broker = tokio::task::block_in_place(|| OwnService::start_new(ServiceKind::Noida))?;
        let w = Workload::new(
            &broker.addr(),
            &ch.addr(),
            rate as usize * 100,
            rng.next_u64(),
            OUTAGE_PAD,
        )
        .await?;
        let target = w.main_target();
        let config = w.config(&target, 1000)?;
        let mut p = SluiceProcess::run(&config, &w.log(&format!("ch{run}")))?;
        let rss = RssSampler::start(p.pid().context("sluice pid")?, ms(100));
        let load = w.start_load(rate)?;
        w.wait_progress(&mut [&mut p], &target.group, 0, Duration::from_secs(60))
            .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;

        let down_at = rss.now();
        tokio::task::block_in_place(|| ch.stop())?;
        let deadline = Instant::now() + outage;
        while Instant::now() < deadline {
            p.check_alive()?;
            tokio::time::sleep(ms(500)).await;
        }
        let up_at = rss.now();
        // Nothing is committed without an insert: what is not committed yet waits in the
        // broker or in sluice's bounded buffers.
        let backlog = load.sent() as i64 - w.committed(&target.group).await?;
        tokio::task::block_in_place(|| ch.start()).with_context(|| ch.log_tail(30))?;
        let restarted = Instant::now();
        // Keep the load on while it catches up.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let model = w.finish_load(load).await?;
        let done = w
            .wait_rows(
                &mut [&mut p],
                &target.table,
                model.rows.len(),
                Duration::from_secs(300),
            )
            .await?;
        let caught_up = restarted.elapsed();
        let end = rss.now();
        let half = down_at + (up_at - down_at) / 2;
        let before = mib(rss.peak(Duration::ZERO, down_at));
        let (first, second) = (mib(rss.peak(down_at, half)), mib(rss.peak(half, up_at)));
        let after = mib(rss.peak(up_at, end));
        drop(rss);
        let retries = count_in_log(&p, "; retrying");
        stop(&mut p)?;
        let growth = second.saturating_sub(first);
        let note = format!(
            "peak RSS {before} MiB before, {first}/{second} MiB in the 1st/2nd half of the outage, \
             {after} MiB after; backlog at restart {backlog} records; {retries} retries; \
             all rows {} {:.0} s after the restart",
            if done { "in" } else { "NOT in" },
            caught_up.as_secs_f64()
        );
        say(format!("ClickHouse outage run {run}: {note}"));
        if first.max(second) > before + OUTAGE_EXTRA_LIMIT_MIB {
            problems.push(format!(
                "run {run}: RSS reached {} MiB during the outage, {before} MiB before \
                 (limit +{OUTAGE_EXTRA_LIMIT_MIB})",
                first.max(second)
            ));
        }
        if growth > OUTAGE_GROWTH_LIMIT_MIB {
            problems.push(format!(
                "run {run}: RSS grew {growth} MiB during the outage (limit {OUTAGE_GROWTH_LIMIT_MIB})"
            ));
        }
        ensure!(retries > 0, "no insert was retried during the outage");
        notes.push(note);
        finish_run(
            w,
            &model,
            &target.table,
            &format!("ClickHouse outage run {run}"),
            &mut total,
            &mut problems,
        )
        .await?;
    }
    record(ScenarioResult {
        scenario: format!(
            "ClickHouse stopped {} s under load ({rate} records/s of ~{} B)",
            outage.as_secs(),
            OUTAGE_PAD + 150
        ),
        runs,
        outcome: total.clone(),
        note: notes.join("; "),
    });
    ensure!(
        total.clean() && problems.is_empty(),
        "ClickHouse outage: {total:?} {problems:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Broker restarted under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_restart_under_load() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed = faults::seed();
    say(format!("broker restarts: seed {seed}"));
    let mut rng = Rng::new(seed);
    let runs = pick(2, 4);
    let restarts = pick(2, 3);
    let rate = pick(500, 1500);
    let ch = services::clickhouse().await?;

    let mut total = Outcome::default();
    let mut problems = Vec::new();
    let mut downtime = Duration::ZERO;
    let mut exits = Vec::new();
    for run in 0..runs {
        // Its own noida-db: it keeps its log, topics and committed offsets in its data dir
        // across a restart (tansu from PyPI has memory storage only).
        let mut broker = tokio::task::block_in_place(|| OwnService::start_new(ServiceKind::Noida))?;
        let w = Workload::new(
            &broker.addr(),
            &ch.url,
            rate as usize * 120,
            rng.next_u64(),
            0,
        )
        .await?;
        let mut target = w.main_target();
        // The second run with the state changelog: its transactions must survive the
        // restarts too (a failed publish is retried; nothing of it is visible).
        if run % 2 == 1 {
            target.changelog = Some(format!("{}-state", target.group));
        }
        let config = w.config(&target, 500)?;
        let mut sup = Supervised::start(&w, &config, &format!("b{run}"))?;
        let load = w.start_load(rate)?;
        let mut committed = sup
            .wait_progress(&w, &target.group, 0, Duration::from_secs(60))
            .await?;
        for k in 0..restarts {
            tokio::time::sleep(ms(1000 + rng.below(3000))).await;
            let down = ms(2000 + rng.below(8000));
            say(format!("run {run}: broker restart {k}, down for {down:?}"));
            // noida-db acknowledges produce requests that reach it while it shuts down, then
            // loses them (the broker's fault, not sluice's, and it would shift offsets under
            // the comparison): no new records from shortly before the stop until it is down.
            // Records the producer holds are delivered after the restart.
            load.pause();
            tokio::time::sleep(ms(500)).await;
            let stop_from = now_ms();
            tokio::task::block_in_place(|| broker.stop())?;
            if let Ok(mut s) = w.broker_stops.lock() {
                s.push((stop_from, now_ms()));
            }
            load.resume();
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| broker.start()).with_context(|| broker.log_tail(30))?;
            downtime += down;
            committed = sup
                .wait_progress(&w, &target.group, committed, Duration::from_secs(120))
                .await
                .with_context(|| broker.log_tail(30))?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let model = w.finish_load(load).await?;
        let deadline = Instant::now() + Duration::from_secs(240);
        while w.count(&target.table).await? < model.rows.len() as u64 && Instant::now() < deadline {
            sup.poll(&w)?;
            tokio::time::sleep(ms(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        sup.poll(&w)?;
        stop(&mut sup.p)?;
        for e in &sup.exits {
            say(format!("run {run}: sluice exited: {e}"));
        }
        exits.extend(sup.exits);
        finish_run(
            w,
            &model,
            &target.table,
            &format!("broker restart run {run}"),
            &mut total,
            &mut problems,
        )
        .await?;
        drop(broker);
    }
    if !exits.is_empty() {
        problems.push(format!(
            "sluice exited {} times while the broker restarted (restarted by the test, as a \
             supervisor would): {}",
            exits.len(),
            exits.first().map(String::as_str).unwrap_or_default()
        ));
    }
    record(ScenarioResult {
        scenario: format!(
            "broker (noida-db) restarted {restarts}× per run under load ({rate} rows/s)"
        ),
        runs,
        outcome: total.clone(),
        note: format!(
            "broker down {:.0} s in total; sluice exited {} times and was restarted by the test",
            downtime.as_secs_f64(),
            exits.len()
        ),
    });
    ensure!(
        total.clean() && problems.is_empty(),
        "broker restarts: {total:?} {problems:?}"
    );
    Ok(())
}

/// A sluice process that the test restarts when it exits (as systemd or Kubernetes would), so
/// that a crash is reported and the data is still checked.
struct Supervised {
    config: PathBuf,
    name: String,
    p: SluiceProcess,
    /// Why each earlier process ended (its last error line).
    exits: Vec<String>,
}

impl Supervised {
    fn start(w: &Workload, config: &std::path::Path, name: &str) -> Result<Self> {
        Ok(Self {
            config: config.to_path_buf(),
            name: name.to_string(),
            p: SluiceProcess::run(config, &w.log(&format!("{name}-0")))?,
            exits: Vec::new(),
        })
    }

    /// Restarts sluice if it has exited.
    fn poll(&mut self, w: &Workload) -> Result<()> {
        if self.p.check_alive().is_ok() {
            return Ok(());
        }
        let log = self.p.log_text();
        let why = log
            .lines()
            .rev()
            .find(|l| l.starts_with("error:") || l.contains("panicked"))
            .unwrap_or("(no error line)")
            .to_string();
        self.exits.push(why);
        let n = self.exits.len();
        self.p = SluiceProcess::run(&self.config, &w.log(&format!("{}-{n}", self.name)))?;
        Ok(())
    }

    async fn wait_progress(
        &mut self,
        w: &Workload,
        group: &str,
        before: i64,
        timeout: Duration,
    ) -> Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll(w)?;
            if let Ok(c) = w.committed(group).await {
                if c > before {
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no commit past {before} within {timeout:?}\n{}",
                    self.p.log_tail()
                );
            }
            tokio::time::sleep(ms(200)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Two instances in one group, one killed and restarted (rebalances both ways)
// ---------------------------------------------------------------------------------------------

/// Both instances hand partition state over through the state changelog topic: the instance
/// that gains a partition restores its dedup keys, buffered join sides and in-flight batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_two_instances_one_killed_and_restarted() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed = faults::seed();
    say(format!("rebalance: seed {seed}"));
    let mut rng = Rng::new(seed);
    let runs = pick(2, 4);
    let cycles = 2;
    let rate = 300u64;
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;

    let mut total = Outcome::default();
    let mut problems = Vec::new();
    let mut restored = 0;
    for run in 0..runs {
        let w = Workload::new(
            &kafka.brokers,
            &ch.url,
            rate as usize * 120,
            rng.next_u64(),
            0,
        )
        .await?;
        // Even runs: static membership, B is killed (-9). Odd runs: dynamic membership, B stops
        // and leaves the group, so A takes its partitions at once. Either way B comes back
        // with an empty state dir (a replaced machine): everything it then holds was restored
        // from the changelog, including a batch the killed B had in flight.
        let dynamic = run % 2 == 1;
        let id = |suffix: &str| {
            if dynamic {
                Some(String::new())
            } else {
                Some(format!("{}-{suffix}", w.group))
            }
        };
        let mut a_target = w.main_target();
        a_target.state = "state-a".into();
        a_target.instance_id = id("a");
        // SLUICE_FAULT_NO_CHANGELOG=1 shows what the scenario catches without the hand-off
        // (the restore-count check then fails as well).
        if std::env::var_os("SLUICE_FAULT_NO_CHANGELOG").is_none() {
            a_target.changelog = Some(format!("{}-state", w.group));
        }
        let b_target = |c: usize| Target {
            state: format!("state-b{c}"),
            instance_id: id("b"),
            changelog: a_target.changelog.clone(),
            ..w.main_target()
        };
        let a_cfg = w.config(&a_target, 100)?;
        let b_cfg = w.config(&b_target(0), 100)?;
        let mut a = SluiceProcess::run(&a_cfg, &w.log(&format!("a{run}")))?;
        let mut b = SluiceProcess::run(&b_cfg, &w.log(&format!("b{run}-0")))?;
        let load = w.start_load(rate)?;
        w.wait_progress(
            &mut [&mut a, &mut b],
            &a_target.group,
            0,
            Duration::from_secs(60),
        )
        .await?;
        for c in 0..cycles {
            tokio::time::sleep(ms(2000 + rng.below(3000))).await;
            if dynamic {
                stop(&mut b)?;
            } else {
                b.kill9()?;
            }
            // A takes B's partitions: at once after a leave; after a kill once the broker
            // expires B (session timeout 10 s; noida-db never expires a static member, so
            // there B's partitions wait for it).
            tokio::time::sleep(Duration::from_secs(15)).await;
            a.check_alive()?;
            let b_cfg = w.config(&b_target(c + 1), 100)?;
            b = SluiceProcess::run(&b_cfg, &w.log(&format!("b{run}-{}", c + 1)))?;
            // B gets its partitions back.
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        let model = w.finish_load(load).await?;
        w.wait_rows(
            &mut [&mut a, &mut b],
            &a_target.table,
            model.rows.len(),
            Duration::from_secs(120),
        )
        .await?;
        stop(&mut a)?;
        stop(&mut b)?;
        // The partitions did move with their state: each instance restored what the other
        // had written while it owned them.
        let logs = std::iter::once(w.log(&format!("a{run}")))
            .chain((0..=cycles).map(|c| w.log(&format!("b{run}-{c}"))));
        let restores: usize = logs
            .map(|l| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .matches("state restored from the changelog")
                    .count()
            })
            .sum();
        say(format!(
            "rebalance run {run}: {restores} partition restores from the changelog"
        ));
        restored += restores;
        if restores < cycles {
            let keep = tempfile::Builder::new()
                .prefix("sluice-rebalance-logs")
                .tempdir()?
                .keep();
            for l in std::fs::read_dir(w.dir.path())?.flatten() {
                if l.path().extension().is_some_and(|e| e == "log") {
                    std::fs::copy(l.path(), keep.join(l.file_name()))?;
                }
            }
            problems.push(format!(
                "run {run}: only {restores} restores from the state changelog for {cycles} \
                 hand-offs (logs in {})",
                keep.display()
            ));
        }

        // The same topics through one undisturbed instance: its rows are the model's (else the
        // model is wrong), and the dedup decisions of the two instances must equal its.
        let single = Target {
            group: unique_name("fsingle"),
            table: unique_name("fsingle"),
            state: "state-single".into(),
            instance_id: None,
            changelog: None,
            // Its dead letters must not mix with the checked instances'.
            dlq: Some(unique_name("fsingle_dlq")),
            outbox_file_min_kb: None,
        };
        w.create_table(&single.table).await?;
        let mut s = SluiceProcess::run(&w.config(&single, 100)?, &w.log("single"))?;
        w.wait_rows(
            &mut [&mut s],
            &single.table,
            model.rows.len(),
            Duration::from_secs(120),
        )
        .await?;
        stop(&mut s)?;
        let single_outcome = w.outcome(&model, &single.table).await?;
        ensure!(
            single_outcome.clean(),
            "the single-instance run differs from the model: {single_outcome:?}"
        );
        finish_run(
            w,
            &model,
            &a_target.table,
            &format!("rebalance run {run}"),
            &mut total,
            &mut problems,
        )
        .await?;
    }
    record(ScenarioResult {
        scenario: format!(
            "2 instances, one killed (-9, static membership) or stopped (dynamic: rebalances both \
             ways) and restarted on an empty state dir {cycles}× per run"
        ),
        runs,
        outcome: total.clone(),
        note: format!(
            "state handed over through the changelog topic ({restored} partition restores); \
             compared with the model and a single-instance run of the same topics"
        ),
    });
    ensure!(
        total.clean() && problems.is_empty(),
        "two instances: {total:?} {problems:?}"
    );
    Ok(())
}

/// The safety net behind the hand-off: an instance whose restore missed what the other owner
/// wrote (its changelog position is moved to the partition's end by hand, as a broker that
/// hid records or a wrong position would leave it) must notice that its state ends before the
/// group's committed offset and restore the partition in full, not carry on without the
/// other owner's dedup keys and buffered join rows (which would then be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_state_behind_the_group_is_restored_in_full() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = services::kafka().await?;
    if !kafka.kind.hides_aborted_transactions() {
        eprintln!("skipped: tansu shows aborted transactions to read_committed readers");
        return Ok(());
    }
    let ch = services::clickhouse().await?;
    let rate = 300u64;
    let w = Workload::new(
        &kafka.brokers,
        &ch.url,
        rate as usize * 40,
        faults::seed(),
        0,
    )
    .await?;
    let changelog = format!("{}-state", w.group);
    let target = |state: &str| Target {
        state: state.into(),
        changelog: Some(changelog.clone()),
        // Dynamic membership: a stop leaves the group, the next instance is assigned at once.
        instance_id: Some(String::new()),
        ..w.main_target()
    };
    let (a_target, b_target) = (target("state-a"), target("state-b"));
    let a_cfg = w.config(&a_target, 100)?;
    let load = w.start_load(rate)?;
    // A, then B (restoring A's state), then A again: each stop leaves the group at once.
    let mut a = SluiceProcess::run(&a_cfg, &w.log("a0"))?;
    let c = w
        .wait_progress(&mut [&mut a], &w.group, 0, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop(&mut a)?;
    let c = w.committed(&w.group).await?.max(c);
    let mut b = SluiceProcess::run(&w.config(&b_target, 100)?, &w.log("b0"))?;
    w.wait_progress(&mut [&mut b], &w.group, c + 300, Duration::from_secs(60))
        .await?;
    ensure!(
        (0..2).all(|n| count_in_log(&b, &format!("{}/{n}", w.tx_topic)) > 0),
        "B did not take both partitions over:\n{}",
        b.log_tail()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop(&mut b)?;
    // A's restore will find nothing new: its position is at the end of the changelog.
    let ends = services::end_offsets(&w.brokers, &changelog).await?;
    {
        let store = sluice::state::StateStore::open(&w.dir.path().join(&a_target.state))?;
        for (n, end) in &ends {
            store.set_changelog_position(*n, end - 1)?;
        }
    }
    let mut a = SluiceProcess::run(&a_cfg, &w.log("a1"))?;
    let model = w.finish_load(load).await?;
    w.wait_rows(
        &mut [&mut a],
        &a_target.table,
        model.rows.len(),
        Duration::from_secs(120),
    )
    .await?;
    stop(&mut a)?;
    let noticed = count_in_log(&a, "restoring the whole partition from the changelog");
    let mut total = Outcome::default();
    let mut problems = Vec::new();
    finish_run(
        w,
        &model,
        &a_target.table,
        "state behind the group",
        &mut total,
        &mut problems,
    )
    .await?;
    record(ScenarioResult {
        scenario: "an instance regains partitions with a restore that missed the other owner's \
                   changelog records (position moved to the end by hand)"
            .into(),
        runs: 1,
        outcome: total.clone(),
        note: format!("{noticed} partitions noticed behind the group and restored in full"),
    });
    ensure!(noticed > 0, "the stale state was not noticed");
    ensure!(
        total.clean() && problems.is_empty(),
        "state behind the group: {total:?} {problems:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. ClickHouse refuses the rows (a fatal error) under load
// ---------------------------------------------------------------------------------------------

/// The table disappears under load (renamed away): inserts fail with a non-retryable error.
/// The pipeline must stop retrying and show `failed` with the error over the API, keep the
/// batch in its journal, and after the table is back and the pipeline resumed, land every
/// row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clickhouse_refuses_rows_pipeline_fails_then_resumes() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed = faults::seed();
    say(format!("refused rows: seed {seed}"));
    let mut rng = Rng::new(seed);
    let rate = 300u64;
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;
    let w = Workload::new(
        &kafka.brokers,
        &ch.url,
        rate as usize * 40,
        rng.next_u64(),
        0,
    )
    .await?;
    let target = w.main_target();
    let config = w.config(&target, 100)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let api = format!("http://127.0.0.1:{port}/v1/pipelines/{}", target.group);
    let listen = format!("127.0.0.1:{port}");
    let cfg = config.to_string_lossy().into_owned();
    let mut p = SluiceProcess::spawn(
        &["run", "-c", &cfg, "--api-listen", &listen],
        &w.log("refused"),
    )?;
    let load = w.start_load(rate)?;
    w.wait_progress(&mut [&mut p], &target.group, 0, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(ms(1000 + rng.below(2000))).await;
    let aside = format!("{}_aside", target.table);
    ch_execute(
        &ch.url,
        &format!("RENAME TABLE default.{} TO default.{aside}", target.table),
    )
    .await?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        p.check_alive()?;
        if let Ok(r) = http.get(&api).send().await {
            let v: Value = r.json().await.unwrap_or_default();
            if v["state"] == "failed" {
                break v;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the pipeline did not fail within 60 s of losing its table\n{}",
            p.log_tail()
        );
        tokio::time::sleep(ms(200)).await;
    };
    let reason = status["reason"].as_str().unwrap_or_default().to_string();
    say(format!("refused rows: status failed, reason: {reason}"));
    ensure!(
        reason.contains(&target.table) && reason.contains("UNKNOWN_TABLE"),
        "the failure does not name the table and the error: {status}"
    );
    // Failed means stopped: no retry loop against the missing table.
    let committed = w.committed(&target.group).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        w.committed(&target.group).await? == committed,
        "offsets moved while the pipeline was failed"
    );
    let retries = count_in_log(&p, "retrying");
    ch_execute(
        &ch.url,
        &format!("RENAME TABLE default.{aside} TO default.{}", target.table),
    )
    .await?;
    let r = http.post(format!("{api}/resume")).send().await?;
    ensure!(r.status().is_success(), "resume: {}", r.status());
    let model = w.finish_load(load).await?;
    w.wait_rows(
        &mut [&mut p],
        &target.table,
        model.rows.len(),
        Duration::from_secs(120),
    )
    .await?;
    stop(&mut p)?;
    let mut total = Outcome::default();
    let mut problems = Vec::new();
    finish_run(
        w,
        &model,
        &target.table,
        "refused rows",
        &mut total,
        &mut problems,
    )
    .await?;
    record(ScenarioResult {
        scenario:
            "ClickHouse refuses the rows (table renamed away under load), then fixed and resumed"
                .into(),
        runs: 1,
        outcome: total.clone(),
        note: format!(
            "status `failed` naming the table and UNKNOWN_TABLE; offsets held while failed; \
             {retries} insert retries before failing"
        ),
    });
    ensure!(
        total.clean() && problems.is_empty(),
        "refused rows: {total:?} {problems:?}"
    );
    Ok(())
}
