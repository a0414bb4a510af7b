//! End-to-end tests of the built-in dedup and join stages: the real `sluice` binary between a real
//! Kafka-protocol broker and a real ClickHouse, results checked row by row.
//!
//! Names start with `e2e_dedup_` / `e2e_join_` so CI also runs them against the second broker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::services::{
    self, ch_execute, consume_all, consume_n, create_topic, produce, query_rows_json, unique_name,
    ClickHouseEnv, ConsumedRecord, KafkaEnv, TestRecord,
};
use sluice_tests::sluice::SluiceProcess;
use sluice_tests::workload::{
    event_time_ms, transactions, user_profiles, Event, Profile, TransactionSpec, BASE_TS_MS,
};

const MIN: i64 = 60_000;

/// Services, names and a state directory for one test.
struct Env {
    kafka: KafkaEnv,
    ch: ClickHouseEnv,
    group: String,
    dlq: String,
    table: String,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Result<Self> {
        Ok(Self {
            kafka: services::kafka().await?,
            ch: services::clickhouse().await?,
            group: unique_name("g"),
            dlq: unique_name("dlq"),
            table: unique_name("joined"),
            dir: tempfile::tempdir()?,
        })
    }

    async fn topic(&self, prefix: &str, partitions: i32) -> Result<String> {
        let t = unique_name(prefix);
        create_topic(&self.kafka.brokers, &t, partitions).await?;
        Ok(t)
    }

    /// Creates the destination table with these columns.
    async fn table(&self, columns: &str) -> Result<()> {
        ch_execute(
            &self.ch.url,
            &format!(
                "CREATE TABLE default.{} ({columns}) ENGINE = MergeTree ORDER BY tuple() \
                 SETTINGS non_replicated_deduplication_window = 1000",
                self.table
            ),
        )
        .await
    }

    /// Writes the pipeline file: `topics` in, `stages` (YAML list items), the table out.
    fn pipeline(&self, topics: &[&str], stages: &str, max_rows: usize) -> Result<PathBuf> {
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(
            &path,
            format!(
                r#"
name: {group}
kafka:
  brokers: {brokers}
  topics: [{topics}]
  group_id: {group}
  start_offset: earliest
stages:
{stages}
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
"#,
                group = self.group,
                brokers = self.kafka.brokers,
                topics = topics.join(", "),
                url = self.ch.url,
                table = self.table,
                dlq = self.dlq,
                state = self.dir.path().join("state").display(),
            ),
        )?;
        Ok(path)
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
        num(rows
            .first()
            .map(|r| &r["c"])
            .context("count() returned nothing")?)
        .map(|n| n as u64)
    }

    /// Waits until the table holds at least `n` rows, then a little longer so that rows beyond
    /// `n` (which would be a bug) have time to show up.
    async fn wait_rows(&self, p: &mut SluiceProcess, n: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            p.check_alive()?;
            let c = self.count().await?;
            if c >= n {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {c} of {n} rows after {timeout:?}\n{}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn rows(&self, columns: &str) -> Result<Vec<Value>> {
        query_rows_json(
            &self.ch.url,
            &format!(
                "SELECT {columns} FROM default.{} SETTINGS output_format_json_quote_64bit_integers = 0",
                self.table
            ),
        )
        .await
    }

    /// Exactly `n` dead letters: waits for them, then checks that no more arrived.
    async fn dead_letters(&self, n: usize) -> Result<Vec<ConsumedRecord>> {
        consume_n(&self.kafka.brokers, &self.dlq, n, Duration::from_secs(30)).await?;
        let all = consume_all(&self.kafka.brokers, &self.dlq, Duration::from_secs(30)).await?;
        ensure!(
            all.len() == n,
            "{} dead letters, {n} expected: {:?}",
            all.len(),
            all.iter().map(describe).collect::<Vec<_>>()
        );
        Ok(all)
    }
}

fn num(v: &Value) -> Result<i64> {
    match v {
        Value::String(s) => Ok(s.parse()?),
        n => n.as_i64().with_context(|| format!("{n} is not an integer")),
    }
}

fn header(l: &ConsumedRecord, k: &str) -> String {
    l.header(k)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn describe(l: &ConsumedRecord) -> String {
    format!(
        "{}/{}@{} {} {}: {}",
        header(l, "sluice.source.topic"),
        header(l, "sluice.source.partition"),
        header(l, "sluice.source.offset"),
        header(l, "sluice.stage"),
        header(l, "sluice.error.kind"),
        header(l, "sluice.error.message")
    )
}

// ---------------------------------------------------------------------------------------------
// The reference workload: dedup → enrich (WASM) → interval join with users
// ---------------------------------------------------------------------------------------------

/// One expected row of the joined table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct JoinedRow {
    id: String,
    user_id: i64,
    amount_cents: i64,
    source_partition: i64,
    source_offset: i64,
    user_name: Option<String>,
    user_country: Option<String>,
}

struct Reference {
    env: Env,
    config: PathBuf,
    expected: Vec<JoinedRow>,
    /// (partition, offset) of every malformed transaction.
    malformed: BTreeSet<(i32, i64)>,
    tx_topic: String,
}

const USERS: u64 = 40;

fn partition_of(e: &Event, i: usize) -> i32 {
    serde_json::from_slice::<Value>(&e.value)
        .ok()
        .and_then(|v| v["user_id"].as_u64())
        .map_or((i % 2) as i32, |u| (u % 2) as i32)
}

impl Reference {
    async fn new(max_rows: usize) -> Result<Self> {
        let env = Env::new().await?;
        // Co-partitioned: both topics keyed by user (partition = user_id % 2).
        let tx_topic = env.topic("tx", 2).await?;
        let users_topic = env.topic("users", 2).await?;
        env.table(
            "id String, user_id UInt64, amount_cents Int64, currency LowCardinality(String), \
             ts DateTime64(3, 'UTC'), source_partition Int32, source_offset Int64, \
             plugin_version LowCardinality(String), user_name Nullable(String), \
             user_country Nullable(String)",
        )
        .await?;

        let spec = TransactionSpec {
            count: 3_000,
            users: USERS,
            malformed_every: 100,
            duplicate_percent: 10,
            seed: 42,
        };
        let events = transactions(&spec);
        let profiles = user_profiles(USERS, 30_000);
        let positions = produce(
            &env.kafka.brokers,
            &tx_topic,
            events.iter().enumerate().map(|(i, e)| {
                TestRecord::new(e.value.clone())
                    .key(e.key.clone())
                    .partition(partition_of(e, i))
            }),
        )
        .await?;
        produce(
            &env.kafka.brokers,
            &users_topic,
            profiles.iter().map(|p| {
                TestRecord::new(p.to_json())
                    .key(p.user_id.to_string())
                    .partition((p.user_id % 2) as i32)
            }),
        )
        .await?;
        // Both sides of each partition move two hours on, so every window closes and unmatched
        // transactions are emitted. These two records themselves stay buffered (never emitted).
        let later = BASE_TS_MS + 120 * MIN;
        for p in 0..2 {
            let flush_tx = json!({"id": format!("tx-flush-{p}"), "user_id": 1000 + p,
                "amount": "1.00", "currency": "EUR", "kind": "purchase", "ts": later});
            produce(
                &env.kafka.brokers,
                &tx_topic,
                [TestRecord::new(serde_json::to_vec(&flush_tx)?).partition(p as i32)],
            )
            .await?;
            let flush_user = Profile {
                user_id: 2000 + p,
                name: "flush".into(),
                country: "XX".into(),
                ts_ms: later,
            };
            produce(
                &env.kafka.brokers,
                &users_topic,
                [TestRecord::new(flush_user.to_json()).partition(p as i32)],
            )
            .await?;
        }

        let mut expected = Vec::new();
        let mut malformed = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for (e, (part, off)) in events.iter().zip(&positions) {
            if e.malformed {
                malformed.insert((*part, *off));
                continue;
            }
            if !seen.insert(e.id.clone()) {
                ensure!(e.duplicate, "{} repeated but not marked duplicate", e.id);
                continue;
            }
            let v: Value = serde_json::from_slice(&e.value)?;
            let ts = event_time_ms(&v["ts"]).context("ts")?;
            let user = v["user_id"].as_u64().context("user_id")?;
            let cents = match &v["amount"] {
                Value::String(s) => (s.parse::<f64>()? * 100.0).round() as i64,
                n => (n.as_f64().context("amount")? * 100.0).round() as i64,
            };
            let row = |p: Option<&Profile>| JoinedRow {
                id: e.id.clone(),
                user_id: user as i64,
                amount_cents: cents,
                source_partition: i64::from(*part),
                source_offset: *off,
                user_name: p.map(|p| p.name.clone()),
                user_country: p.map(|p| p.country.clone()),
            };
            let matches: Vec<&Profile> = profiles
                .iter()
                .filter(|p| p.user_id == user && (p.ts_ms - ts).abs() <= 5 * MIN)
                .collect();
            if matches.is_empty() {
                expected.push(row(None));
            }
            for p in matches {
                expected.push(row(Some(p)));
            }
        }
        expected.sort();
        let matched = expected.iter().filter(|r| r.user_name.is_some()).count();
        let two = expected.len() - seen.len();
        ensure!(
            matched > 500 && matched < expected.len() - 200 && two > 20,
            "workload does not exercise the join: {matched} matched of {}, {two} second matches",
            expected.len()
        );

        let stages = format!(
            r#"
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
      right_topic: {users_topic}
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
"#
        );
        let config = env.pipeline(&[&tx_topic], &stages, max_rows)?;
        Ok(Self {
            env,
            config,
            expected,
            malformed,
            tx_topic,
        })
    }

    async fn check_rows(&self) -> Result<()> {
        let rows = self
            .env
            .rows(
                "id, user_id, amount_cents, source_partition, source_offset, plugin_version, \
                 user_name, user_country",
            )
            .await?;
        let mut got = Vec::new();
        for r in &rows {
            ensure!(r["plugin_version"] == "v1", "row not enriched: {r}");
            let text = |k: &str| r[k].as_str().map(str::to_string);
            got.push(JoinedRow {
                id: text("id").context("id")?,
                user_id: num(&r["user_id"])?,
                amount_cents: num(&r["amount_cents"])?,
                source_partition: num(&r["source_partition"])?,
                source_offset: num(&r["source_offset"])?,
                user_name: text("user_name"),
                user_country: text("user_country"),
            });
        }
        got.sort();
        if got != self.expected {
            let g: BTreeSet<_> = got.iter().collect();
            let e: BTreeSet<_> = self.expected.iter().collect();
            let missing: Vec<_> = e.difference(&g).take(5).collect();
            let extra: Vec<_> = g.difference(&e).take(5).collect();
            bail!(
                "{} rows, {} expected ({} distinct); missing e.g. {missing:?}; unexpected e.g. {extra:?}",
                got.len(),
                self.expected.len(),
                g.len()
            );
        }
        Ok(())
    }

    /// Every malformed transaction is dead-lettered once, by dedup (not JSON) or by the plugin.
    async fn check_dead_letters(&self) -> Result<()> {
        let letters = self.env.dead_letters(self.malformed.len()).await?;
        let mut found = BTreeSet::new();
        for l in &letters {
            ensure!(
                header(l, "sluice.source.topic") == self.tx_topic,
                "{}",
                describe(l)
            );
            let pos = (
                header(l, "sluice.source.partition").parse::<i32>()?,
                header(l, "sluice.source.offset").parse::<i64>()?,
            );
            ensure!(
                self.malformed.contains(&pos),
                "valid record dead-lettered: {}",
                describe(l)
            );
            let (stage, kind) = (header(l, "sluice.stage"), header(l, "sluice.error.kind"));
            ensure!(
                (stage == "dedup" && kind == "parse") || (stage == "enrich" && kind == "schema"),
                "{}",
                describe(l)
            );
            found.insert(pos);
        }
        ensure!(found == self.malformed, "dead letters {found:?}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dedup_enrich_join_reference_workload() -> Result<()> {
    let r = Reference::new(500).await?;
    let mut p = SluiceProcess::run(&r.config, &r.env.log(0))?;
    r.env
        .wait_rows(&mut p, r.expected.len() as u64, Duration::from_secs(120))
        .await?;
    r.check_rows().await?;
    r.check_dead_letters().await?;
    p.stop_cleanly(Duration::from_secs(30))?;
    let log = p.log_text();
    ensure!(!log.contains("panicked"), "{}", p.log_tail());
    Ok(())
}

// Runs against noida only for now (no `e2e_` prefix): on tansu it once read 28 of 30 dead
// letters within 30 s after the kills; whether tansu or sluice is at fault is not yet known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_join_kill9_at_random_points_gives_identical_rows() -> Result<()> {
    // Small batches, so kills land between many state commits, inserts and offset commits.
    let r = Reference::new(100).await?;
    let n = r.expected.len() as u64;
    let mut run = 0;
    for threshold in [n / 6, n / 3, n / 2, (n * 4) / 5] {
        let mut p = SluiceProcess::run(&r.config, &r.env.log(run))?;
        run += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.env.count().await? < threshold {
            p.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "stuck below {threshold}\n{}",
                p.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(run as u64 * 31)).await;
        p.kill9()?;
    }
    let mut p = SluiceProcess::run(&r.config, &r.env.log(run))?;
    r.env.wait_rows(&mut p, n, Duration::from_secs(120)).await?;
    p.terminate(Duration::from_secs(30))?;
    r.check_rows().await?;
    r.check_dead_letters().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Interval join: out-of-order and late events
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_join_out_of_order_and_late_events() -> Result<()> {
    let env = Env::new().await?;
    let clicks = env.topic("clicks", 1).await?;
    let users = env.topic("users", 1).await?;
    env.table("id String, user_id UInt64, ts Int64, user String")
        .await?;
    let at = |m: f64| BASE_TS_MS + (m * MIN as f64) as i64;
    let left = [
        ("c1", 1, at(10.0)),
        ("c2", 1, at(12.0)),
        ("c3", 2, at(11.0)), // out of order, within the 1 min lateness: joins
        ("c4", 1, at(9.0)),  // 3 min behind the clicks seen: late
        ("c5", 2, at(20.0)),
    ];
    let right = [
        ("ann", 1, at(11.0)),
        ("bob", 2, at(11.5)),
        ("old", 1, at(8.0)), // 3.5 min behind the users seen: late
        ("bob2", 2, at(19.0)),
    ];
    let lpos = produce(
        &env.kafka.brokers,
        &clicks,
        left.iter().map(|(id, u, ts)| {
            TestRecord::new(
                serde_json::to_vec(&json!({"id": id, "user_id": u, "ts": ts})).unwrap_or_default(),
            )
        }),
    )
    .await?;
    let rpos = produce(
        &env.kafka.brokers,
        &users,
        right.iter().map(|(name, u, ts)| {
            TestRecord::new(
                serde_json::to_vec(&json!({"uid": u, "name": name, "at": rfc3339(*ts)}))
                    .unwrap_or_default(),
            )
        }),
    )
    .await?;
    let stages = format!(
        r#"
  - name: join
    join:
      kind: interval
      right_topic: {users}
      left_key: /user_id
      right_key: /uid
      left_time: {{field: /ts, format: epoch_ms}}
      right_time: {{field: /at}}
      before: 5m
      after: 5m
      allowed_lateness: 1m
      nest: user
"#
    );
    let config = env.pipeline(&[&clicks], &stages, 100)?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    env.wait_rows(&mut p, 4, Duration::from_secs(60)).await?;
    let rows = env.rows("id, user").await?;
    let got: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| {
            let u: Value =
                serde_json::from_str(r["user"].as_str().unwrap_or("null")).unwrap_or_default();
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                u["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> =
        [("c1", "ann"), ("c2", "ann"), ("c3", "bob"), ("c5", "bob2")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    ensure!(rows.len() == 4 && got == expected, "rows {rows:?}");

    let letters = env.dead_letters(2).await?;
    let late: BTreeSet<(String, i64)> = letters
        .iter()
        .map(|l| -> Result<(String, i64)> {
            ensure!(header(l, "sluice.stage") == "join", "{}", describe(l));
            ensure!(header(l, "sluice.error.kind") == "late", "{}", describe(l));
            ensure!(
                header(l, "sluice.error.message").contains("allowed lateness 60000 ms"),
                "{}",
                describe(l)
            );
            Ok((
                header(l, "sluice.source.topic"),
                header(l, "sluice.source.offset").parse()?,
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        late == BTreeSet::from([(clicks.clone(), lpos[3].1), (users.clone(), rpos[2].1)]),
        "late {late:?}"
    );
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

fn rfc3339(ms: i64) -> String {
    sluice_tests::workload::rfc3339_ms(ms)
}

// ---------------------------------------------------------------------------------------------
// Dedup: window expiry, composite keys, missing key fields
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dedup_window_expiry() -> Result<()> {
    let env = Env::new().await?;
    let topic = env.topic("ev", 1).await?;
    env.table("id String, ts Int64, seq Int64").await?;
    // (id, event time in ms after the base); window 2 s. A key is remembered while its first
    // sighting is at most 2 s behind the latest event time of the partition.
    let events = [
        ("a", 0),
        ("a", 1_000), // duplicate of seq 0
        ("b", 1_500),
        ("a", 2_500), // `a` was first seen 2.5 s ago: forgotten, a new first occurrence
        ("a", 3_000), // duplicate of seq 3
        ("b", 5_000), // `b` first seen 3.5 s ago: a new first occurrence
        ("c", 5_000),
        ("c", 4_000), // out of order, and a duplicate of seq 6
        ("a", 4_600), // out of order; `a` (seq 3, at 2.5 s) is 2.5 s behind 5 s: forgotten
        ("b", 3_100), // out of order, and a duplicate of seq 5
    ];
    produce(
        &env.kafka.brokers,
        &topic,
        events.iter().enumerate().map(|(seq, (id, dt))| {
            TestRecord::new(
                serde_json::to_vec(&json!({"id": id, "ts": BASE_TS_MS + dt, "seq": seq}))
                    .unwrap_or_default(),
            )
        }),
    )
    .await?;
    let config = env.pipeline(
        &[&topic],
        "  - name: dedup\n    dedup:\n      key: /id\n      window: 2s\n      time: {field: /ts, format: epoch_ms}\n",
        100,
    )?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    env.wait_rows(&mut p, 6, Duration::from_secs(60)).await?;
    let rows = env.rows("seq").await?;
    let seqs: BTreeSet<i64> = rows.iter().map(|r| num(&r["seq"])).collect::<Result<_>>()?;
    ensure!(
        rows.len() == 6 && seqs == BTreeSet::from([0, 2, 3, 5, 6, 8]),
        "rows {rows:?}"
    );
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// SIGTERM while the state restore of a gained partition waits behind a transaction someone
/// left open on the changelog: the instance stops within seconds (the restore may otherwise
/// wait 5 minutes, and a stop used to wait with it), and once the transaction is gone the next
/// start restores and delivers every row. Needs transactions that hide aborted records
/// (noida-db), hence no `e2e_` prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_stop_during_a_changelog_restore_is_prompt() -> Result<()> {
    use rdkafka::producer::Producer;

    let env = Env::new().await?;
    if !env.kafka.kind.hides_aborted_transactions() {
        return Ok(());
    }
    let topic = env.topic("ev", 1).await?;
    let changelog = env.topic("cl", 1).await?;
    env.table("id String, ts Int64, seq Int64").await?;
    produce(
        &env.kafka.brokers,
        &topic,
        (0..20).map(|seq| {
            TestRecord::new(
                serde_json::to_vec(
                    &json!({"id": format!("e{}", seq % 10), "ts": BASE_TS_MS + seq, "seq": seq}),
                )
                .unwrap_or_default(),
            )
        }),
    )
    .await?;
    // An open transaction on the changelog partition holds its readable end below its end.
    let blocker = services::open_transaction(&env.kafka.brokers, &changelog, 0)?;

    let config = env.pipeline(
        &[&topic],
        "  - name: dedup\n    dedup:\n      key: /id\n      window: 1h\n      time: {field: /ts, format: epoch_ms}\n",
        100,
    )?;
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!("  changelog: {{topic: {changelog}}}\n"));
    std::fs::write(&config, text)?;

    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.log_text().contains("readable end is below its end") {
        p.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "the restore never waited for the open transaction\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = Instant::now();
    let status = p.terminate(Duration::from_secs(20))?;
    let log = p.log_text();
    ensure!(
        status.success() && log.contains("cancelling it"),
        "stopped after {:?} with {status}, not by cancelling the restore\n{}",
        stopping.elapsed(),
        p.log_tail()
    );
    ensure!(
        env.count().await? == 0,
        "rows were inserted before the state was restored"
    );

    blocker.abort_transaction(Duration::from_secs(30))?;
    let mut p = SluiceProcess::run(&config, &env.log(1))?;
    env.wait_rows(&mut p, 10, Duration::from_secs(60)).await?;
    p.stop_cleanly(Duration::from_secs(30))?;
    let rows = env.rows("seq").await?;
    let seqs: BTreeSet<i64> = rows.iter().map(|r| num(&r["seq"])).collect::<Result<_>>()?;
    ensure!(seqs == (0..10).collect::<BTreeSet<i64>>(), "rows {rows:?}");
    Ok(())
}

/// A batch larger than the engine's slice (4,096 records) reaches the stages in several calls
/// within one state transaction: a key first seen in an earlier slice must count as seen in a
/// later one although the dedup index learns it only at the commit (this let repeats through
/// before 2026-12-06).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dedup_within_a_batch_larger_than_a_slice() -> Result<()> {
    let env = Env::new().await?;
    let topic = env.topic("big", 1).await?;
    env.table("id String, ts Int64, seq Int64").await?;
    // Even positions bring new ids; each odd one repeats an even position's id from 1 to 7,999
    // records earlier, so whatever the batch boundaries (the backlog's batches ramp up from
    // 1,000 rows to the 16,000 below), batches past 4,096 rows hold repeats of first
    // occurrences in their own earlier slices.
    const N: i64 = 24_000;
    let id_of = |j: i64| {
        let d = 1 + 2 * ((j * 7919) % 4000);
        if j % 2 == 0 {
            j
        } else if d <= j {
            j - d
        } else {
            j - 1
        }
    };
    produce(
        &env.kafka.brokers,
        &topic,
        (0..N).map(|j| {
            TestRecord::new(
                serde_json::to_vec(
                    &json!({"id": format!("e{}", id_of(j)), "ts": BASE_TS_MS + j, "seq": j}),
                )
                .unwrap_or_default(),
            )
        }),
    )
    .await?;
    let config = env.pipeline(
        &[&topic],
        "  - name: dedup\n    dedup:\n      key: /id\n      window: 1h\n      time: {field: /ts, format: epoch_ms}\n",
        16_000,
    )?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    let expected = (N / 2) as u64;
    env.wait_rows(&mut p, expected, Duration::from_secs(120))
        .await?;
    let rows = env.rows("seq").await?;
    let odd: Vec<i64> = rows
        .iter()
        .map(|r| num(&r["seq"]))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|s| s % 2 == 1)
        .take(5)
        .collect();
    ensure!(
        rows.len() as u64 == expected && odd.is_empty(),
        "{} rows, expected {expected}; repeats let through at positions {odd:?}",
        rows.len()
    );
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dedup_composite_keys_and_missing_key_fields() -> Result<()> {
    let env = Env::new().await?;
    let topic = env.topic("ev", 2).await?;
    env.table("id String, source String, n Int64").await?;
    let values = [
        json!({"id": 1, "source": "a", "n": 0}),
        json!({"id": 1, "source": "b", "n": 1}),
        json!({"id": 1, "source": "a", "n": 2}), // duplicate of n=0
        json!({"id": "1", "source": "a", "n": 3}), // keys compare by text: duplicate of n=0
        json!({"id": "1a", "source": "", "n": 4}), // no collision with ("1", "a")
        json!({"id": 2, "n": 5}),                // /source missing
        json!({"source": "a", "n": 6}),          // /id missing
        json!({"id": 2, "source": null, "n": 7}), // /source null
        json!({"id": 2, "source": "a", "n": 8}),
    ];
    // One partition for the key (duplicates must meet), Kafka timestamps as processing time.
    // Recent ones: the broker applies time-based retention (7 days by default) to the record
    // timestamps, so a fixed date would have its records deleted once it is a week old.
    let now_ms = sluice_tests::bench::kafka::now_ms();
    let pos = produce(
        &env.kafka.brokers,
        &topic,
        values.iter().enumerate().map(|(i, v)| {
            TestRecord::new(serde_json::to_vec(v).unwrap_or_default())
                .partition(1)
                .timestamp(now_ms - 60_000 + i as i64)
        }),
    )
    .await?;
    let config = env.pipeline(
        &[&topic],
        "  - name: dedup\n    dedup:\n      key: [/id, /source]\n      window: 1h\n",
        100,
    )?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    env.wait_rows(&mut p, 4, Duration::from_secs(60)).await?;
    let rows = env.rows("n").await?;
    let ns: BTreeSet<i64> = rows.iter().map(|r| num(&r["n"])).collect::<Result<_>>()?;
    ensure!(
        rows.len() == 4 && ns == BTreeSet::from([0, 1, 4, 8]),
        "rows {rows:?}"
    );

    let letters = env.dead_letters(3).await?;
    let got: BTreeMap<i64, String> = letters
        .iter()
        .map(|l| -> Result<(i64, String)> {
            ensure!(header(l, "sluice.stage") == "dedup", "{}", describe(l));
            ensure!(
                header(l, "sluice.error.kind") == "schema",
                "{}",
                describe(l)
            );
            Ok((
                header(l, "sluice.source.offset").parse()?,
                header(l, "sluice.error.message"),
            ))
        })
        .collect::<Result<_>>()?;
    let expected = BTreeMap::from([
        (pos[5].1, "key field /source is missing".to_string()),
        (pos[6].1, "key field /id is missing".to_string()),
        (pos[7].1, "key field /source is null".to_string()),
    ]);
    ensure!(got == expected, "dead letters {got:?}");
    // The dead letter carries the original record.
    let l = letters
        .iter()
        .find(|l| header(l, "sluice.source.offset") == pos[6].1.to_string())
        .context("letter")?;
    ensure!(l.payload.as_deref() == Some(serde_json::to_vec(&values[6])?.as_slice()));
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lookup join: changelog with tombstones
// ---------------------------------------------------------------------------------------------

/// Both topics consumed from a backlog: the table topic is read to its end before the
/// pipeline's topic is fetched (`kafka.side_topics_first`), so no record is looked up in a
/// table that is not loaded yet. Before, whichever partition's fetch answered first was
/// consumed first, and records could come out unmatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_join_lookup_reads_the_table_before_a_backlog() -> Result<()> {
    let env = Env::new().await?;
    let orders = env.topic("orders", 1).await?;
    let profiles = env.topic("profiles", 1).await?;
    env.table("id String, user_id UInt64, user_name Nullable(String)")
        .await?;
    const USERS: u64 = 3_000;
    const ORDERS: u64 = 30_000;
    // The orders first, so a consumer that takes topics in produce order would meet them first.
    produce(
        &env.kafka.brokers,
        &orders,
        (0..ORDERS).map(|i| {
            TestRecord::new(
                serde_json::to_vec(&json!({"id": format!("o{i}"), "user_id": (i * 7) % USERS}))
                    .unwrap_or_default(),
            )
        }),
    )
    .await?;
    produce(
        &env.kafka.brokers,
        &profiles,
        (0..USERS).map(|u| {
            TestRecord::new(
                serde_json::to_vec(&json!({"name": format!("user{u}")})).unwrap_or_default(),
            )
            .key(u.to_string())
        }),
    )
    .await?;
    let stages = format!(
        "  - name: users\n    join:\n      kind: lookup\n      table_topic: {profiles}\n      \
         key: /user_id\n      prefix: user_\n      fields: [name]\n      unmatched: dead_letter\n"
    );
    let config = env.pipeline(&[&orders], &stages, 5_000)?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;
    env.wait_rows(&mut p, ORDERS, Duration::from_secs(120))
        .await?;
    let unnamed = query_rows_json(
        &env.ch.url,
        &format!(
            "SELECT count() AS n FROM default.{} WHERE user_name IS NULL",
            env.table
        ),
    )
    .await?;
    let unnamed = unnamed.first().map(|r| num(&r["n"])).transpose()?;
    ensure!(unnamed == Some(0), "{unnamed:?} rows without a user");
    env.dead_letters(0).await?;
    ensure!(
        p.log_text().contains("side topics first"),
        "the table was not read first:\n{}",
        p.log_tail()
    );
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_join_lookup_follows_the_changelog_and_tombstones() -> Result<()> {
    let env = Env::new().await?;
    let orders = env.topic("orders", 1).await?;
    let profiles = env.topic("profiles", 1).await?;
    env.table("id String, user_id UInt64, user_name Nullable(String)")
        .await?;
    let profile = |k: &str, v: Option<Value>| {
        let r = TestRecord::default().key(k.to_string());
        match v {
            Some(v) => TestRecord {
                payload: Some(serde_json::to_vec(&v).unwrap_or_default()),
                ..r
            },
            None => r, // a tombstone: null payload
        }
    };
    produce(
        &env.kafka.brokers,
        &profiles,
        [
            profile("1", Some(json!({"name": "ann"}))),
            profile("2", Some(json!({"name": "bob"}))),
            profile("3", Some(json!({"name": "cy"}))),
        ],
    )
    .await?;
    let stages = format!(
        "  - name: users\n    join:\n      kind: lookup\n      table_topic: {profiles}\n      \
         key: /user_id\n      prefix: user_\n      fields: [name]\n      unmatched: pass\n"
    );
    let config = env.pipeline(&[&orders], &stages, 100)?;
    let mut p = SluiceProcess::run(&config, &env.log(0))?;

    // A lookup sees the table as it is when the record is processed: probe until the
    // changelog has been applied up to the point of interest.
    probe_until(&env, &orders, 100, 3, Some("cy")).await?;
    let order = |id: &str, u: u64| {
        TestRecord::new(serde_json::to_vec(&json!({"id": id, "user_id": u})).unwrap_or_default())
    };
    let before = env.count().await?;
    produce(
        &env.kafka.brokers,
        &orders,
        [
            order("o1", 1),
            order("o2", 2),
            order("o3", 3),
            order("o4", 4),
        ],
    )
    .await?;
    // Records of the two topics that arrive within one batch age may be processed in either
    // order: the update must come after o1..o4 were processed.
    env.wait_rows(&mut p, before + 4, Duration::from_secs(30))
        .await?;
    // Update 3, delete 2 (after: once the delete is seen, so is the update).
    produce(
        &env.kafka.brokers,
        &profiles,
        [
            profile("3", Some(json!({"name": "cy2"}))),
            profile("2", None),
        ],
    )
    .await?;
    probe_until(&env, &orders, 200, 2, None).await?;
    produce(
        &env.kafka.brokers,
        &orders,
        [order("o5", 2), order("o6", 3), order("o7", 1)],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = query_rows_json(
            &env.ch.url,
            &format!(
                "SELECT id, user_name FROM default.{} WHERE id LIKE 'o%' ORDER BY id",
                env.table
            ),
        )
        .await?;
        if rows.len() >= 7 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["user_name"].as_str().map(str::to_string),
            )
        })
        .collect();
    let s = |x: &str| Some(x.to_string());
    let expected = vec![
        ("o1".to_string(), s("ann")),
        ("o2".to_string(), s("bob")),
        ("o3".to_string(), s("cy")),
        ("o4".to_string(), None),
        ("o5".to_string(), None),
        ("o6".to_string(), s("cy2")),
        ("o7".to_string(), s("ann")),
    ];
    ensure!(got == expected, "rows {got:?}");
    p.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// Produces probe orders for `user` until one lands in the table with `user_name == want`.
async fn probe_until(
    env: &Env,
    orders: &str,
    first: usize,
    user: u64,
    want: Option<&str>,
) -> Result<()> {
    for i in first..first + 60 {
        let id = format!("probe-{i}");
        produce(
            &env.kafka.brokers,
            orders,
            [TestRecord::new(serde_json::to_vec(
                &json!({"id": id, "user_id": user}),
            )?)],
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = query_rows_json(
                &env.ch.url,
                &format!(
                    "SELECT user_name FROM default.{} WHERE id = '{id}'",
                    env.table
                ),
            )
            .await?;
            if let Some(r) = rows.first() {
                if r["user_name"].as_str() == want {
                    return Ok(());
                }
                break;
            }
            ensure!(Instant::now() < deadline, "probe {id} never landed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("user {user} was never looked up as {want:?}")
}
