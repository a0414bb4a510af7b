//! The core end-to-end tests: the real `sluice` binary between a real Kafka-protocol broker and
//! a real ClickHouse server, with the reference Rust plugin compiled to a WebAssembly component.
//!
//! Names start with `e2e_` so CI can run them against a second broker (tansu).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::services::{
    self, ch_execute, committed_offsets, consume_all, create_topic, end_offsets, produce,
    query_rows_json, unique_name, BrokerKind, ClickHouseEnv, KafkaEnv, TestRecord,
};
use sluice_tests::sluice::SluiceProcess;
use sluice_tests::workload::{transactions, Event, TransactionSpec};

struct Fixture {
    kafka: KafkaEnv,
    ch: ClickHouseEnv,
    topic: String,
    dlq: String,
    group: String,
    table: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    events: Vec<Event>,
    /// (partition, offset) of each event, in produce order.
    positions: Vec<(i32, i64)>,
}

impl Fixture {
    async fn new(partitions: i32, max_rows: usize, spec: TransactionSpec) -> Result<Self> {
        let kafka = services::kafka().await?;
        let ch = services::clickhouse().await?;
        let topic = unique_name("tx");
        let dlq = format!("{topic}-dlq");
        let group = unique_name("g");
        let table = unique_name("transactions");
        create_topic(&kafka.brokers, &topic, partitions).await?;
        let schema = std::fs::read_to_string(services::repo_root().join("demo/schema.sql"))?;
        let ddl = schema.replace(
            "IF NOT EXISTS transactions",
            &format!("IF NOT EXISTS default.{table}"),
        );
        ch_execute(&ch.url, &ddl).await?;

        let dir = tempfile::tempdir()?;
        let config = dir.path().join("pipeline.yaml");
        std::fs::write(
            &config,
            format!(
                r#"
name: {group}
kafka:
  brokers: {brokers}
  topics: [{topic}]
  group_id: {group}
  start_offset: earliest
stages:
  - name: enrich
    wasm:
      plugin: {plugin}
      config:
        version: v1
sink:
  clickhouse:
    url: {url}
    table: {table}
    columns:
      id: String
      amount_cents: Int64
  batch:
    max_rows: {max_rows}
    max_age_ms: 100
dead_letter:
  topic: {dlq}
state:
  dir: {state}
"#,
                brokers = kafka.brokers,
                plugin = ENRICH_WASM,
                url = ch.url,
                state = dir.path().join("state").display(),
            ),
        )?;
        let mut f = Self {
            kafka,
            ch,
            topic,
            dlq,
            group,
            table,
            dir,
            config,
            events: Vec::new(),
            positions: Vec::new(),
        };
        f.produce(&transactions(&spec)).await?;
        Ok(f)
    }

    /// Produces `events` to the topic, in order, and remembers them and where they landed.
    async fn produce(&mut self, events: &[Event]) -> Result<()> {
        let positions = produce(
            &self.kafka.brokers,
            &self.topic,
            events
                .iter()
                .map(|e| TestRecord::new(e.value.clone()).key(e.key.clone())),
        )
        .await?;
        self.events.extend_from_slice(events);
        self.positions.extend(positions);
        Ok(())
    }

    fn log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("sluice-{n}.log"))
    }

    async fn count(&self) -> Result<u64> {
        let rows = query_rows_json(
            &self.ch.url,
            &format!("SELECT count() AS c FROM default.{}", self.table),
        )
        .await?;
        let c = rows
            .first()
            .and_then(|r| {
                r["c"]
                    .as_str()
                    .map(str::to_string)
                    .or(r["c"].as_u64().map(|n| n.to_string()))
            })
            .context("count() returned nothing")?;
        Ok(c.parse()?)
    }

    /// Waits until the table holds `n` rows (or fails with the log).
    async fn wait_rows(&self, p: &mut SluiceProcess, n: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            p.check_alive()?;
            let c = self.count().await?;
            if c >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {c} of {n} rows after {timeout:?}\n{}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn valid_events(&self) -> BTreeMap<String, (&Event, (i32, i64))> {
        let mut m = BTreeMap::new();
        for (e, pos) in self.events.iter().zip(&self.positions) {
            if !e.malformed && !e.duplicate {
                m.insert(e.id.clone(), (e, *pos));
            }
        }
        m
    }

    /// Every valid event is in the table exactly once, with the values the plugin derives.
    async fn check_rows(&self) -> Result<()> {
        let rows = query_rows_json(
            &self.ch.url,
            &format!(
                "SELECT id, user_id, amount_cents, currency, source_partition, source_offset, plugin_version \
                 FROM default.{} ORDER BY id",
                self.table
            ),
        )
        .await?;
        let expected = self.valid_events();
        let mut seen = BTreeSet::new();
        for r in &rows {
            let id = r["id"].as_str().context("id")?.to_string();
            ensure!(seen.insert(id.clone()), "row {id} is duplicated");
            let Some((e, (part, off))) = expected.get(&id) else {
                bail!("unexpected row {r}");
            };
            let v: serde_json::Value = serde_json::from_slice(&e.value)?;
            let cents = match &v["amount"] {
                serde_json::Value::String(s) => (s.parse::<f64>()? * 100.0).round() as i64,
                n => (n.as_f64().context("amount")? * 100.0).round() as i64,
            };
            ensure!(
                num(&r["amount_cents"])? == cents,
                "{id}: amount_cents {r} != {cents}"
            );
            ensure!(
                num(&r["user_id"])? == v["user_id"].as_i64().context("user_id")?,
                "{id}: user_id"
            );
            ensure!(r["currency"] == v["currency"], "{id}: currency");
            ensure!(
                num(&r["source_partition"])? == i64::from(*part),
                "{id}: partition"
            );
            ensure!(
                num(&r["source_offset"])? == *off,
                "{id}: offset {r} != {off}"
            );
            ensure!(r["plugin_version"] == "v1", "{id}: plugin_version");
        }
        ensure!(
            rows.len() == expected.len(),
            "{} rows in ClickHouse, {} expected",
            rows.len(),
            expected.len()
        );
        Ok(())
    }

    /// Every malformed event is in the dead-letter topic, once, with its original bytes and
    /// headers.
    async fn check_dead_letters(&self) -> Result<()> {
        let malformed: BTreeMap<(i32, i64), &Event> = self
            .events
            .iter()
            .zip(&self.positions)
            .filter(|(e, _)| e.malformed)
            .map(|(e, p)| (*p, e))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let letters = loop {
            let letters =
                consume_all(&self.kafka.brokers, &self.dlq, Duration::from_secs(20)).await?;
            let distinct: BTreeSet<(i32, i64)> = letters
                .iter()
                .filter_map(|l| {
                    let p = std::str::from_utf8(l.header("sluice.source.partition")?)
                        .ok()?
                        .parse()
                        .ok()?;
                    let o = std::str::from_utf8(l.header("sluice.source.offset")?)
                        .ok()?
                        .parse()
                        .ok()?;
                    Some((p, o))
                })
                .collect();
            if distinct.len() >= malformed.len() || Instant::now() > deadline {
                break letters;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut found = BTreeSet::new();
        for l in &letters {
            let h = |k: &str| -> Result<String> {
                Ok(String::from_utf8_lossy(
                    l.header(k).with_context(|| format!("header {k} missing"))?,
                )
                .into_owned())
            };
            ensure!(
                h("sluice.source.topic")? == self.topic,
                "source topic header"
            );
            let pos: (i32, i64) = (
                h("sluice.source.partition")?.parse()?,
                h("sluice.source.offset")?.parse()?,
            );
            let Some(e) = malformed.get(&pos) else {
                bail!(
                    "dead letter for a valid record at {pos:?}: kind {} message {}",
                    h("sluice.error.kind")?,
                    h("sluice.error.message")?
                );
            };
            ensure!(
                l.payload.as_deref() == Some(e.value.as_slice()),
                "dead letter payload differs from the original"
            );
            let kind = h("sluice.error.kind")?;
            ensure!(
                kind == "parse" || kind == "schema",
                "unexpected kind {kind}"
            );
            ensure!(h("sluice.stage")? == "enrich", "stage header");
            ensure!(!h("sluice.error.message")?.is_empty(), "empty message");
            ensure!(
                h("sluice.plugin")?.starts_with("sluice_plugin_enrich@"),
                "plugin header {}",
                h("sluice.plugin")?
            );
            // Exactly once, except where the broker shows the aborted transaction of a killed
            // run next to the committed one.
            ensure!(
                found.insert(pos) || !self.kafka.kind.hides_aborted_transactions(),
                "dead letter for {pos:?} twice"
            );
        }
        ensure!(
            found.len() == malformed.len(),
            "{} distinct dead letters, {} malformed records",
            found.len(),
            malformed.len()
        );
        Ok(())
    }

    /// The group's committed offsets reach the end of every partition.
    async fn check_offsets(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let committed =
                committed_offsets(&self.kafka.brokers, &self.group, &self.topic).await?;
            let ends = end_offsets(&self.kafka.brokers, &self.topic).await?;
            let ok = ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end));
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                if self.kafka.kind == BrokerKind::Tansu {
                    // tansu reports wrong high watermarks (shared/notes/kafka.md): compare with
                    // what we produced instead.
                    let mut produced: BTreeMap<i32, i64> = BTreeMap::new();
                    for (p, o) in &self.positions {
                        let e = produced.entry(*p).or_default();
                        *e = (*e).max(o + 1);
                    }
                    let ok = produced
                        .iter()
                        .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end));
                    ensure!(ok, "committed {committed:?}, produced up to {produced:?}");
                    return Ok(());
                }
                bail!("committed offsets {committed:?} != end offsets {ends:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn num(v: &serde_json::Value) -> Result<i64> {
    match v {
        serde_json::Value::String(s) => Ok(s.parse()?),
        n => n.as_i64().with_context(|| format!("{n} is not an integer")),
    }
}

fn spec() -> TransactionSpec {
    TransactionSpec {
        count: 10_000,
        malformed_every: 100,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_10k_events_land_once_and_malformed_go_to_dead_letters() -> Result<()> {
    let f = Fixture::new(3, 1000, spec()).await?;
    assert_eq!(f.events.iter().filter(|e| e.malformed).count(), 100);
    let mut p = SluiceProcess::run(&f.config, &f.log(0))?;
    f.wait_rows(&mut p, 9_900, Duration::from_secs(180)).await?;
    f.check_dead_letters().await?;
    f.check_offsets().await?;
    p.stop_cleanly(Duration::from_secs(30))?;
    // Nothing more arrived after the stop either.
    f.check_rows().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_kill9_and_restart_loses_and_duplicates_nothing() -> Result<()> {
    // Small batches so kills land between many insert/commit pairs.
    let f = Fixture::new(2, 150, spec()).await?;
    let mut run = 0;
    for threshold in [800u64, 2_500, 5_000, 7_500] {
        let mut p = SluiceProcess::run(&f.config, &f.log(run))?;
        run += 1;
        f.wait_rows(&mut p, threshold, Duration::from_secs(180))
            .await?;
        // A little jitter so the kill lands at different points of the batch cycle.
        tokio::time::sleep(Duration::from_millis(u64::from(run as u32) * 37)).await;
        p.kill9()?;
    }
    let mut p = SluiceProcess::run(&f.config, &f.log(run))?;
    f.wait_rows(&mut p, 9_900, Duration::from_secs(180)).await?;
    f.check_offsets().await?;
    p.terminate(Duration::from_secs(30))?;
    f.check_rows().await?;
    f.check_dead_letters().await?;
    Ok(())
}

/// Crashes at each interesting point of the batch cycle (journal written, rows inserted, dead
/// letters sent, offsets committed), restarts, and checks the same exact result every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_crash_at_each_point_of_the_batch_cycle() -> Result<()> {
    use sluice::fault;
    let f = Fixture::new(2, 400, spec()).await?;
    let config = f.config.to_string_lossy().into_owned();
    let mut run = 0;
    let mut replays = 0;
    for (point, after) in [
        (fault::AFTER_BEGIN, "2"),
        (fault::AFTER_INSERT, "3"),
        (fault::AFTER_DEAD_LETTERS, "2"),
        (fault::AFTER_COMMIT, "4"),
        (fault::AFTER_INSERT, "1"),
    ] {
        let mut p = SluiceProcess::spawn_with_env(
            &["run", "-c", &config],
            &[("SLUICE_FAULT_POINT", point), ("SLUICE_FAULT_AFTER", after)],
            &f.log(run),
        )?;
        run += 1;
        let status = p.wait_exit(Duration::from_secs(120))?;
        ensure!(
            !status.success(),
            "expected an injected crash at {point}\n{}",
            p.log_tail()
        );
        ensure!(
            p.log_text().contains("fault injection: aborting at"),
            "sluice exited without reaching {point}\n{}",
            p.log_tail()
        );
        replays += p
            .log_text()
            .matches("re-sending batch from the journal")
            .count();
    }
    let mut p = SluiceProcess::run(&f.config, &f.log(run))?;
    f.wait_rows(&mut p, 9_900, Duration::from_secs(180)).await?;
    f.check_offsets().await?;
    replays += p
        .log_text()
        .matches("re-sending batch from the journal")
        .count();
    p.terminate(Duration::from_secs(30))?;
    // Crashes after the journal entry and before the commit must have been replayed exactly.
    ensure!(
        replays >= 3,
        "only {replays} batches were rebuilt from the journal"
    );
    f.check_rows().await?;
    f.check_dead_letters().await?;
    Ok(())
}

/// Records the consumer hands over a second time in one assignment (librdkafka does so when a
/// partition is paused while a message is being handed over, which the idle fetch governor
/// makes possible) are skipped, not inserted again under another batch's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_records_delivered_again_by_the_consumer_land_once() -> Result<()> {
    use sluice::fault;
    let f = Fixture::new(2, 400, spec()).await?;
    let config = f.config.to_string_lossy().into_owned();
    let mut p = SluiceProcess::spawn_with_env(
        &["run", "-c", &config],
        &[
            ("SLUICE_FAULT_POINT", fault::REDELIVER),
            ("SLUICE_FAULT_AFTER", "3"),
        ],
        &f.log(0),
    )?;
    f.wait_rows(&mut p, 9_900, Duration::from_secs(120)).await?;
    f.check_offsets().await?;
    // Time for a duplicate insert to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.stop_cleanly(Duration::from_secs(30))?;
    f.check_rows().await?;
    f.check_dead_letters().await?;
    let log = p.log_text();
    ensure!(
        log.contains("fault injection:") && log.contains("sought back to"),
        "the consumer never sought back:\n{}",
        p.log_tail()
    );
    ensure!(
        log.contains("delivered records again that were already taken"),
        "no re-delivery was recognised:\n{}",
        p.log_tail()
    );
    Ok(())
}

/// One topic feeding two tables: the plugin routes refunds to their own table; the writer
/// batches per table (each with its own deduplication token) and every valid event lands in
/// exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_one_topic_feeds_two_tables() -> Result<()> {
    let f = Fixture::new(2, 500, spec()).await?;
    let refunds = unique_name("refunds");
    let schema = std::fs::read_to_string(services::repo_root().join("demo/schema.sql"))?;
    ch_execute(
        &f.ch.url,
        &schema.replace(
            "IF NOT EXISTS transactions",
            &format!("IF NOT EXISTS default.{refunds}"),
        ),
    )
    .await?;
    let text = std::fs::read_to_string(&f.config)?
        .replace(
            "        version: v1\n",
            &format!("        version: v1\n        route_by_kind: {{refund: {refunds}}}\n"),
        )
        .replace(
            &format!("    table: {}\n", f.table),
            &format!("    table: {}\n    extra_tables: [{refunds}]\n", f.table),
        );
    std::fs::write(&f.config, text)?;

    let valid = f.valid_events();
    let expect_refunds: BTreeSet<String> = valid
        .iter()
        .filter(|(_, (e, _))| {
            serde_json::from_slice::<serde_json::Value>(&e.value)
                .map(|v| v["kind"] == "refund")
                .unwrap_or(false)
        })
        .map(|(id, _)| id.clone())
        .collect();
    ensure!(!expect_refunds.is_empty(), "workload has no refunds");
    let mut p = SluiceProcess::run(&f.config, &f.log(0))?;
    let main_rows = (valid.len() - expect_refunds.len()) as u64;
    f.wait_rows(&mut p, main_rows, Duration::from_secs(180))
        .await?;
    f.check_offsets().await?;
    p.terminate(Duration::from_secs(30))?;

    let ids = |table: String| {
        let url = f.ch.url.clone();
        async move {
            let rows = query_rows_json(&url, &format!("SELECT id FROM default.{table}")).await?;
            let ids: Vec<String> = rows
                .iter()
                .filter_map(|r| r["id"].as_str().map(str::to_string))
                .collect();
            anyhow::Ok(ids)
        }
    };
    let got_refunds = ids(refunds.clone()).await?;
    let got_main = ids(f.table.clone()).await?;
    ensure!(
        got_refunds.len() == expect_refunds.len(),
        "{} refund rows, {} expected",
        got_refunds.len(),
        expect_refunds.len()
    );
    ensure!(
        got_refunds.iter().cloned().collect::<BTreeSet<_>>() == expect_refunds,
        "refund ids differ"
    );
    ensure!(
        got_main.len() as u64 == main_rows,
        "{} main rows, {main_rows} expected",
        got_main.len()
    );
    ensure!(
        got_main.iter().all(|id| !expect_refunds.contains(id)),
        "a refund landed in the main table"
    );
    f.check_dead_letters().await?;
    Ok(())
}

/// Records produced after the pipeline has been caught up and idle for a while land exactly
/// once. Against a broker that answers fetches at the log end at once (noida-db), sluice keeps
/// caught-up partitions paused between looks (`kafka.idle_fetch_pause_ms`): this is the path
/// from paused back to fetching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_records_after_an_idle_spell_land_once() -> Result<()> {
    let all = transactions(&TransactionSpec {
        count: 4_000,
        malformed_every: 0,
        ..Default::default()
    });
    let mut f = Fixture::new(
        2,
        1000,
        TransactionSpec {
            count: 2_000,
            malformed_every: 0,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        f.events
            .iter()
            .zip(&all)
            .all(|(a, b)| a.id == b.id && a.value == b.value),
        "the first wave is a prefix of the events generated for both"
    );
    let mut p = SluiceProcess::run(&f.config, &f.log(0))?;
    f.wait_rows(&mut p, 2_000, Duration::from_secs(120)).await?;
    // Idle: long enough for the statistics to show a fetch spin and for many pause cycles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if f.kafka.kind == BrokerKind::Noida {
        let log = p.log_text();
        ensure!(
            log.contains("answers fetches at the log end at once"),
            "no fetch spin seen on noida-db:\n{}",
            p.log_tail()
        );
    }
    f.produce(&all[2_000..]).await?;
    f.wait_rows(&mut p, 4_000, Duration::from_secs(120)).await?;
    f.check_offsets().await?;
    p.stop_cleanly(Duration::from_secs(30))?;
    f.check_rows().await?;
    Ok(())
}
