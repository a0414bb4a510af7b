//! `sluice validate` against a real ClickHouse and broker: each mistake gets a clear message
//! naming the file, key, table, column or plugin, and a non-zero exit.

use anyhow::{ensure, Result};

use sluice_tests::plugins::{ENRICH_WASM, NOT_A_PLUGIN_WAT, WRONG_WORLD_WAT};
use sluice_tests::services::{self, ch_execute, create_topic, unique_name};
use sluice_tests::sluice::run_to_end;

struct Case {
    dir: tempfile::TempDir,
    brokers: String,
    ch_url: String,
    topic: String,
    table: String,
}

impl Case {
    async fn new() -> Result<Self> {
        let kafka = services::kafka().await?;
        let ch = services::clickhouse().await?;
        let topic = unique_name("vtopic");
        create_topic(&kafka.brokers, &topic, 1).await?;
        let table = unique_name("vtable");
        ch_execute(
            &ch.url,
            &format!(
                "CREATE TABLE default.{table} (id String, amount_cents Int64, ts DateTime64(3, 'UTC')) \
                 ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100"
            ),
        )
        .await?;
        Ok(Self {
            dir: tempfile::tempdir()?,
            brokers: kafka.brokers,
            ch_url: ch.url,
            topic,
            table,
        })
    }

    /// A valid pipeline file; `edit` changes its text before it is written.
    fn config(&self, edit: impl Fn(String) -> String) -> Result<String> {
        let text = format!(
            r#"name: validate-test
kafka:
  brokers: {brokers}
  topics: [{topic}]
  group_id: g
stages:
  - name: enrich
    wasm:
      plugin: {plugin}
sink:
  clickhouse:
    url: {url}
    table: {table}
    columns:
      amount_cents: Int64
dead_letter:
  topic: {topic}-dlq
state:
  dir: {state}
"#,
            brokers = self.brokers,
            topic = self.topic,
            plugin = ENRICH_WASM,
            url = self.ch_url,
            table = self.table,
            state = self.dir.path().join("state").display(),
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, edit(text))?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// Runs validate; returns (success, output).
    fn validate(&self, edit: impl Fn(String) -> String) -> Result<(bool, String)> {
        let path = self.config(edit)?;
        let (status, out) = run_to_end(&["validate", "-c", &path])?;
        Ok((status.success(), out))
    }
}

fn expect_error(r: (bool, String), needles: &[&str]) -> Result<()> {
    let (ok, out) = r;
    ensure!(!ok, "validate should fail:\n{out}");
    for n in needles {
        ensure!(out.contains(n), "output lacks {n:?}:\n{out}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_pipeline_passes() -> Result<()> {
    let c = Case::new().await?;
    let (ok, out) = c.validate(|t| t)?;
    ensure!(ok, "validate failed:\n{out}");
    ensure!(out.contains("valid (0 warning(s))"), "{out}");
    ensure!(
        out.contains("matches the sluice:plugin/plugin world"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_is_named() -> Result<()> {
    let c = Case::new().await?;
    let r = c.validate(|t| t.replace("  group_id: g\n", "  group_id: g\n  group_idd: h\n"))?;
    expect_error(r, &["pipeline.yaml", "kafka", "unknown field `group_idd`"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_reported() -> Result<()> {
    let c = Case::new().await?;
    let table = c.table.clone();
    let r = c.validate(|t| t.replace(&format!("table: {table}"), "table: no_such_table"))?;
    expect_error(
        r,
        &["sink.clickhouse.table", "no_such_table does not exist"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_type_mismatch_is_reported() -> Result<()> {
    let c = Case::new().await?;
    let r = c.validate(|t| t.replace("amount_cents: Int64", "amount_cents: String"))?;
    expect_error(
        r,
        &[
            "sink.clickhouse.columns.amount_cents",
            "has type Int64",
            "expects String",
        ],
    )?;
    let r = c.validate(|t| t.replace("amount_cents: Int64", "amount: Int64"))?;
    expect_error(r, &["has no column \"amount\""])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_column_type_is_reported() -> Result<()> {
    let c = Case::new().await?;
    let ch = services::clickhouse().await?;
    let table = unique_name("vagg");
    ch_execute(
        &ch.url,
        &format!(
            "CREATE TABLE default.{table} (k String, s AggregateFunction(sum, UInt64)) \
             ENGINE = AggregatingMergeTree ORDER BY k"
        ),
    )
    .await?;
    let own = c.table.clone();
    let r = c.validate(|t| {
        t.replace(&format!("table: {own}"), &format!("table: {table}"))
            .replace("    columns:\n      amount_cents: Int64\n", "")
    })?;
    expect_error(r, &["AggregateFunction(sum, UInt64)", "\"s\""])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_not_matching_the_world_is_refused() -> Result<()> {
    let c = Case::new().await?;
    let r = c.validate(|t| t.replace(ENRICH_WASM, WRONG_WORLD_WAT))?;
    expect_error(
        r,
        &[
            "stages[0] \"enrich\"",
            "does not match the sluice:plugin/plugin world",
        ],
    )?;
    let r = c.validate(|t| t.replace(ENRICH_WASM, NOT_A_PLUGIN_WAT))?;
    expect_error(r, &["stages[0] \"enrich\"", "not a component"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_dedup_window_gets_a_warning() -> Result<()> {
    let c = Case::new().await?;
    let ch = services::clickhouse().await?;
    let table = unique_name("vnowindow");
    ch_execute(
        &ch.url,
        &format!("CREATE TABLE default.{table} (id String, amount_cents Int64) ENGINE = MergeTree ORDER BY id"),
    )
    .await?;
    let own = c.table.clone();
    let (ok, out) =
        c.validate(|t| t.replace(&format!("table: {own}"), &format!("table: {table}")))?;
    ensure!(ok, "a warning must not fail validation:\n{out}");
    ensure!(
        out.contains("warning:") && out.contains("non_replicated_deduplication_window is 0"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_and_env_variable_are_reported() -> Result<()> {
    let c = Case::new().await?;
    let topic = c.topic.clone();
    let r =
        c.validate(|t| t.replace(&format!("topics: [{topic}]"), "topics: [no-such-topic-xyz]"))?;
    expect_error(r, &["kafka.topics", "no-such-topic-xyz"])?;
    let r = c.validate(|t| t.replace("group_id: g", "group_id: ${SLUICE_TEST_UNSET_VARIABLE}"))?;
    expect_error(r, &["SLUICE_TEST_UNSET_VARIABLE is not set"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changelog_with_too_few_partitions_is_reported() -> Result<()> {
    let c = Case::new().await?;
    let (source, small) = (unique_name("vsrc3"), unique_name("vchangelog1"));
    create_topic(&c.brokers, &source, 3).await?;
    create_topic(&c.brokers, &small, 1).await?;
    let topic = c.topic.clone();
    let with_changelog = |changelog: &str| {
        let (source, changelog) = (source.clone(), changelog.to_string());
        let topic = topic.clone();
        move |t: String| {
            t.replace(
                &format!("topics: [{topic}]"),
                &format!("topics: [{source}]"),
            ) + &format!("  changelog: {{topic: {changelog}}}\n")
        }
    };
    let r = c.validate(with_changelog(&small))?;
    expect_error(
        r,
        &["state.changelog", &small, "has 1 partition(s)", "need 3"],
    )?;
    let fresh = unique_name("vchangelognew");
    let (ok, out) = c.validate(with_changelog(&fresh))?;
    ensure!(ok, "a changelog topic to be created is fine:\n{out}");
    ensure!(
        out.contains(&format!("state changelog {fresh}: created at start")),
        "{out}"
    );
    Ok(())
}
