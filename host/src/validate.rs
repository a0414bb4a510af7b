//! `sluice validate`: everything that can be checked before consuming a single record.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{LoadedConfig, StageKind};
use crate::sink::clickhouse::writer::{load_schema, ClickHouseSink, SinkError};
use crate::source::kafka::base_client_config;
use crate::stage::wasm::{PluginRuntime, WasmStage};

/// Findings, each a full sentence naming the file, key, stage, table or column concerned.
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// What to check beyond the file itself.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    pub clickhouse: bool,
    pub kafka: bool,
}

pub async fn validate(cfg: &LoadedConfig, runtime: &PluginRuntime, checks: Checks) -> Report {
    let mut r = Report::default();
    let file = cfg.path.display().to_string();
    let p = &cfg.pipeline;
    r.notes.push(format!(
        "{file}: pipeline {:?}: {} topic(s), {} stage(s), sink {}.{}",
        p.name,
        p.kafka.topics.len(),
        p.stages.len(),
        p.sink.clickhouse.database,
        p.sink.clickhouse.table
    ));

    for (i, s) in p.stages.iter().enumerate() {
        let Some(StageKind::Wasm(w)) = s.kind() else {
            continue;
        };
        let path = cfg.resolve(&w.plugin);
        let loaded = runtime.load_file(&path).and_then(|plugin| {
            WasmStage::new(
                &p.name,
                &s.name,
                plugin.clone(),
                &w.config,
                w.limits.clone(),
            )
            .map(|_| plugin)
        });
        match loaded {
            Ok(plugin) => r.notes.push(format!(
                "stages[{i}] {:?}: plugin {} ({}) matches the sluice:plugin/plugin world and accepted its config; sandbox: {} MiB memory, {} ms per batch, no files, sockets or environment",
                s.name,
                plugin.id(),
                path.display(),
                w.limits.memory_mb,
                w.limits.timeout_ms
            )),
            Err(e) => r.errors.push(format!("{file}: stages[{i}] {:?}: {e}", s.name)),
        }
    }

    if checks.clickhouse {
        check_clickhouse(cfg, &mut r).await;
    }
    if checks.kafka {
        check_kafka(cfg, &mut r).await;
    }
    r
}

fn normalize_type(t: &str) -> String {
    t.chars().filter(|c| !c.is_whitespace()).collect()
}

async fn check_clickhouse(cfg: &LoadedConfig, r: &mut Report) {
    let ch = &cfg.pipeline.sink.clickhouse;
    let client = ClickHouseSink::client(ch);
    if let Err(e) = client.query("SELECT 1").execute().await {
        r.errors
            .push(format!("clickhouse {}: cannot connect: {e}", ch.url));
        return;
    }
    let tables = std::iter::once(&ch.table).chain(ch.extra_tables.iter());
    for table in tables {
        match load_schema(&client, &ch.database, table).await {
            Err(e @ SinkError::MissingTable { .. }) => r.errors.push(format!(
                "{}: sink.clickhouse.table: {e} (create it first; see README)",
                cfg.path.display()
            )),
            Err(e) => r.errors.push(e.to_string()),
            Ok(schema) => {
                if table == &ch.table {
                    for (name, expected) in &ch.columns {
                        match schema.columns.iter().find(|c| &c.name == name) {
                            None => r.errors.push(format!(
                                "{}: sink.clickhouse.columns.{name}: table {}.{table} has no column {name:?}",
                                cfg.path.display(), ch.database
                            )),
                            Some(c) if normalize_type(&c.type_name) != normalize_type(expected) => {
                                r.errors.push(format!(
                                    "{}: sink.clickhouse.columns.{name}: column {name:?} of {}.{table} has type {} but the pipeline expects {expected}",
                                    cfg.path.display(), ch.database, c.type_name
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                }
                r.notes.push(format!(
                    "table {}.{table}: {} insertable column(s), all types supported",
                    ch.database,
                    schema.columns.len()
                ));
                check_dedup_window(&client, &ch.database, table, r).await;
            }
        }
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TableRow {
    engine: String,
    engine_full: String,
}

/// Idempotent replays rely on ClickHouse remembering recent insert tokens. Non-replicated
/// MergeTree tables remember none unless `non_replicated_deduplication_window` is set.
async fn check_dedup_window(client: &clickhouse::Client, db: &str, table: &str, r: &mut Report) {
    let row = client
        .query("SELECT engine, engine_full FROM system.tables WHERE database = ? AND name = ?")
        .bind(db)
        .bind(table)
        .fetch_optional::<TableRow>()
        .await;
    let Ok(Some(t)) = row else { return };
    if t.engine.starts_with("Replicated") || t.engine.starts_with("Shared") {
        return;
    }
    if !t.engine.ends_with("MergeTree") {
        r.warnings.push(format!(
            "table {db}.{table} uses engine {}: ClickHouse deduplicates inserts only into MergeTree tables, so a batch replayed after a crash may land twice (see README, \"Exactly once\")",
            t.engine
        ));
        return;
    }
    let table_setting = t
        .engine_full
        .split("non_replicated_deduplication_window = ")
        .nth(1)
        .and_then(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u64>().ok())
        });
    let window = match table_setting {
        Some(w) => w,
        None => client
            .query("SELECT toUInt64(value) FROM system.merge_tree_settings WHERE name = 'non_replicated_deduplication_window'")
            .fetch_optional::<u64>()
            .await
            .ok()
            .flatten()
            .unwrap_or(0),
    };
    if window == 0 {
        r.warnings.push(format!(
            "table {db}.{table}: non_replicated_deduplication_window is 0, so ClickHouse will not recognise a batch replayed after a crash and rows may be duplicated; set it, e.g. `ALTER TABLE {db}.{table} MODIFY SETTING non_replicated_deduplication_window = 1000` (see README, \"Exactly once\")"
        ));
    }
}

async fn check_kafka(cfg: &LoadedConfig, r: &mut Report) {
    let k = &cfg.pipeline.kafka;
    let consumer: Result<BaseConsumer, _> = base_client_config(k).create();
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(format!("kafka {}: {e}", k.brokers));
            return;
        }
    };
    let brokers = k.brokers.clone();
    let topics = k.topics.clone();
    let pipeline = cfg.pipeline.clone();
    let md = tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|md| {
                md.topics()
                    .iter()
                    .map(|t| (t.name().to_string(), t.partitions().len()))
                    .collect::<Vec<_>>()
            })
    })
    .await;
    match md {
        Ok(Ok(found)) => {
            // Joins need their topics co-partitioned (same partition count, same key hashing).
            let counts: std::collections::BTreeMap<String, usize> = found.iter().cloned().collect();
            if let Err(msg) = crate::stage::join::check_copartitioned(&pipeline, &counts) {
                for line in msg.lines() {
                    r.errors.push(format!("{}: {line}", cfg.path.display()));
                }
            }
            if let Some(c) = &pipeline.state.changelog {
                // One changelog partition per partition number of any consumed topic.
                let needed = pipeline
                    .kafka
                    .topics
                    .iter()
                    .cloned()
                    .chain(
                        pipeline
                            .stages
                            .iter()
                            .filter_map(|s| s.join.as_ref().map(|j| j.side_topic().to_string())),
                    )
                    .filter_map(|t| counts.get(&t).copied())
                    .max()
                    .unwrap_or(1);
                match counts.get(&c.topic) {
                    Some(have) if *have < needed => r.errors.push(format!(
                        "{}: state.changelog: topic {:?} has {have} partition(s), the consumed \
                         topics need {needed} (one per partition number)",
                        cfg.path.display(),
                        c.topic
                    )),
                    Some(have) => r
                        .notes
                        .push(format!("state changelog {}: {have} partition(s)", c.topic)),
                    None => r.notes.push(format!(
                        "state changelog {}: created at start (compacted, {needed} partition(s))",
                        c.topic
                    )),
                }
            }
            for t in &topics {
                match found.iter().find(|(n, _)| n == t) {
                    Some((_, parts)) => r
                        .notes
                        .push(format!("kafka topic {t}: {parts} partition(s)")),
                    None => r.errors.push(format!(
                        "{}: kafka.topics: topic {t:?} does not exist on {brokers}",
                        cfg.path.display()
                    )),
                }
            }
        }
        Ok(Err(e)) => r
            .errors
            .push(format!("kafka {brokers}: cannot fetch metadata: {e}")),
        Err(e) => r.errors.push(format!("kafka {brokers}: {e}")),
    }
}
