//! Dead letters at volume, their replay after a fix, and pipeline isolation in one process.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use sluice_tests::plugins::{ENRICH_WASM, HOSTILE_WASM};
use sluice_tests::services::{
    self, ch_execute, consume_all, create_topic, produce, query_rows_json, unique_name, TestRecord,
};
use sluice_tests::sluice::{run_to_end, SluiceProcess};
use sluice_tests::workload::{transactions, TransactionSpec};

async fn create_table(url: &str, table: &str) -> Result<()> {
    let schema = std::fs::read_to_string(services::repo_root().join("demo/schema.sql"))?;
    ch_execute(
        url,
        &schema.replace(
            "IF NOT EXISTS transactions",
            &format!("IF NOT EXISTS default.{table}"),
        ),
    )
    .await
}

async fn ids(url: &str, table: &str) -> Result<Vec<String>> {
    let rows = query_rows_json(url, &format!("SELECT id FROM default.{table}")).await?;
    Ok(rows
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &Path,
    file: &str,
    name: &str,
    brokers: &str,
    topic: &str,
    url: &str,
    table: &str,
    plugin: &str,
    plugin_config: &str,
    limits: &str,
) -> Result<PathBuf> {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            r#"name: {name}
kafka:
  brokers: {brokers}
  topics: [{topic}]
  group_id: {name}
stages:
  - name: enrich
    wasm:
      plugin: {plugin}
      config: {plugin_config}
{limits}
sink:
  clickhouse:
    url: {url}
    table: {table}
  batch:
    max_rows: 2000
    max_age_ms: 100
dead_letter:
  topic: {topic}-dlq
state:
  dir: {state}
"#,
            state = dir.join(format!("state-{name}")).display()
        ),
    )?;
    Ok(path)
}

async fn wait_for(
    p: &mut SluiceProcess,
    timeout: Duration,
    mut done: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>>>>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        p.check_alive()?;
        if done().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out\n{}", p.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 10,000 malformed records among 10,000 valid ones, plus valid records a v1 config rejects;
/// then the "fixed" config replays the dead letters: every valid record lands exactly once,
/// also when the replay is run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_records_dead_lettered_then_replayed_exactly_once() -> Result<()> {
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;
    let topic = unique_name("mixed");
    let table = unique_name("mixed");
    create_topic(&kafka.brokers, &topic, 2).await?;
    create_table(&ch.url, &table).await?;
    let events = transactions(&TransactionSpec {
        count: 20_000,
        malformed_every: 2,
        ..Default::default()
    });
    let malformed = events.iter().filter(|e| e.malformed).count();
    ensure!(malformed == 10_000);
    produce(
        &kafka.brokers,
        &topic,
        events
            .iter()
            .map(|e| TestRecord::new(e.value.clone()).key(e.key.clone())),
    )
    .await?;
    let valid: BTreeSet<String> = events
        .iter()
        .filter(|e| !e.malformed)
        .map(|e| e.id.clone())
        .collect();
    let allowed: BTreeSet<String> = events
        .iter()
        .filter(|e| !e.malformed)
        .filter(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.value)
                .map(|v| v["currency"] == "EUR" || v["currency"] == "USD")
                .unwrap_or(false)
        })
        .map(|e| e.id.clone())
        .collect();

    let dir = tempfile::tempdir()?;
    let name = unique_name("mixed");
    let v1 = write_config(
        dir.path(),
        "v1.yaml",
        &name,
        &kafka.brokers,
        &topic,
        &ch.url,
        &table,
        ENRICH_WASM,
        r#"{version: v1, currency_allowlist: [EUR, USD]}"#,
        "",
    )?;
    let mut p = SluiceProcess::run(&v1, &dir.path().join("run.log"))?;
    let (url, t) = (ch.url.clone(), table.clone());
    let want = allowed.len();
    wait_for(&mut p, Duration::from_secs(180), || {
        let (url, t) = (url.clone(), t.clone());
        Box::pin(async move { Ok(ids(&url, &t).await?.len() >= want) })
    })
    .await?;
    p.terminate(Duration::from_secs(30))?;
    let landed = ids(&ch.url, &table).await?;
    ensure!(
        landed.len() == allowed.len(),
        "{} rows, {} expected",
        landed.len(),
        allowed.len()
    );
    ensure!(landed.iter().cloned().collect::<BTreeSet<_>>() == allowed);

    // Every rejected record is in the dead-letter topic with a reason.
    let letters = consume_all(
        &kafka.brokers,
        &format!("{topic}-dlq"),
        Duration::from_secs(30),
    )
    .await?;
    let mut kinds = std::collections::BTreeMap::new();
    let mut origins = BTreeSet::new();
    for l in &letters {
        let kind =
            String::from_utf8_lossy(l.header("sluice.error.kind").context("kind")?).into_owned();
        ensure!(!l
            .header("sluice.error.message")
            .context("message")?
            .is_empty());
        let off = String::from_utf8_lossy(l.header("sluice.source.offset").context("offset")?)
            .into_owned();
        let part =
            String::from_utf8_lossy(l.header("sluice.source.partition").context("partition")?)
                .into_owned();
        origins.insert((part, off));
        *kinds.entry(kind).or_insert(0usize) += 1;
    }
    let rejected = valid.len() - allowed.len();
    ensure!(
        origins.len() == malformed + rejected,
        "{} dead letters for {} malformed + {} rejected; kinds {kinds:?}",
        origins.len(),
        malformed,
        rejected
    );
    ensure!(kinds.get("invalid") == Some(&rejected), "kinds {kinds:?}");

    // The fix: the same plugin without the allowlist. Replay twice: rows land exactly once.
    let v2 = write_config(
        dir.path(),
        "v2.yaml",
        &name,
        &kafka.brokers,
        &topic,
        &ch.url,
        &table,
        ENRICH_WASM,
        "{version: v1}",
        "",
    )?;
    let v2s = v2.to_string_lossy().into_owned();
    for round in 0..2 {
        let (status, out) = run_to_end(&["dlq", "replay", "-c", &v2s])?;
        ensure!(status.success(), "replay {round} failed:\n{out}");
        ensure!(out.contains("replayed"), "{out}");
    }
    let all = ids(&ch.url, &table).await?;
    ensure!(
        all.len() == valid.len(),
        "{} rows after replay, {} valid records",
        all.len(),
        valid.len()
    );
    ensure!(
        all.iter().cloned().collect::<BTreeSet<_>>() == valid,
        "ids differ after replay"
    );

    // `dlq list` and `dlq show` read the topic back.
    let (status, out) = run_to_end(&["dlq", "list", "-c", &v2s, "--limit", "5"])?;
    ensure!(status.success() && out.lines().count() >= 6, "{out}");
    let (status, out) = run_to_end(&[
        "dlq",
        "show",
        "-c",
        &v2s,
        "--partition",
        "0",
        "--offset",
        "0",
    ])?;
    ensure!(
        status.success() && out.contains("header sluice.error.kind"),
        "{out}"
    );
    Ok(())
}

/// Two pipelines in one process: one plugin loops forever on every record and trips its
/// breaker (that pipeline pauses); the other lands all of its rows regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pipeline_pauses_alone() -> Result<()> {
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;
    let good_topic = unique_name("good");
    let bad_topic = unique_name("bad");
    let good_table = unique_name("good");
    let bad_table = unique_name("bad");
    create_topic(&kafka.brokers, &good_topic, 1).await?;
    create_topic(&kafka.brokers, &bad_topic, 1).await?;
    create_table(&ch.url, &good_table).await?;
    create_table(&ch.url, &bad_table).await?;
    let events = transactions(&TransactionSpec {
        count: 3_000,
        ..Default::default()
    });
    produce(
        &kafka.brokers,
        &good_topic,
        events.iter().map(|e| TestRecord::new(e.value.clone())),
    )
    .await?;
    produce(
        &kafka.brokers,
        &bad_topic,
        (0..200).map(|i| TestRecord::new(json!({"n": i, "action": "loop"}).to_string())),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let good = write_config(
        dir.path(),
        "good.yaml",
        &unique_name("good"),
        &kafka.brokers,
        &good_topic,
        &ch.url,
        &good_table,
        ENRICH_WASM,
        "{}",
        "",
    )?;
    let bad = write_config(
        dir.path(),
        "bad.yaml",
        &unique_name("bad"),
        &kafka.brokers,
        &bad_topic,
        &ch.url,
        &bad_table,
        HOSTILE_WASM,
        "{}",
        "      limits: {timeout_ms: 100}\n      breaker_failures: 2",
    )?;
    // Small batches, so the broken plugin fails on several consecutive batches.
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad)?.replace("max_rows: 2000", "max_rows: 40"),
    )?;
    let (g, b) = (
        good.to_string_lossy().into_owned(),
        bad.to_string_lossy().into_owned(),
    );
    let mut p = SluiceProcess::spawn(&["run", "-c", &b, "-c", &g], &dir.path().join("run.log"))?;
    let (url, t) = (ch.url.clone(), good_table.clone());
    wait_for(&mut p, Duration::from_secs(180), || {
        let (url, t) = (url.clone(), t.clone());
        Box::pin(async move { Ok(ids(&url, &t).await?.len() >= 3_000) })
    })
    .await?;
    // The hostile pipeline trips its breaker and pauses; the process keeps serving the other.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.log_text().contains("pipeline PAUSED") {
        p.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "breaker never tripped\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.check_alive()?;
    ensure!(
        ids(&ch.url, &bad_table).await?.is_empty(),
        "hostile rows landed"
    );
    let status = p.terminate(Duration::from_secs(30))?;
    ensure!(
        !status.success(),
        "a paused pipeline must make the exit code non-zero"
    );
    ensure!(ids(&ch.url, &good_table).await?.len() == 3_000);
    Ok(())
}
