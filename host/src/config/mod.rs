//! The pipeline file: YAML, unknown keys rejected, `${VAR}` / `${VAR:-default}` expanded from the
//! environment before parsing so secrets never have to live in the file.

mod env;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::stage::dedup::DedupConfig;
pub use crate::stage::join::JoinConfig;
pub use env::expand_env;

/// Errors reading a pipeline file. Each names the file and, where known, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Env { path: PathBuf, message: String },
    #[error("{path}: at `{key}`: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: at `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// One pipeline: a Kafka source, ordered stages, a ClickHouse sink and a dead-letter topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Pipeline name: part of every deduplication token, metric label and state directory.
    pub name: String,
    pub kafka: KafkaConfig,
    /// Stages applied in order to every batch.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    pub sink: SinkConfig,
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub state: StateConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    /// Where a group with no committed offset starts.
    #[serde(default)]
    pub start_offset: StartOffset,
    /// Static group membership id (`group.instance.id`). A restarted instance with the same id
    /// gets its partitions back at once instead of waiting for the broker to expire the old
    /// member. Default: derived from the pipeline name, host name and state directory, so it
    /// is stable across restarts and distinct for every instance with its own state. An
    /// empty string turns static membership off: the instance leaves the group when it stops,
    /// so its partitions move to the others at once (and back when it rejoins).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Passed through to librdkafka unchanged (SASL, TLS, timeouts...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Against a broker that answers fetches at the log end at once instead of holding them
    /// (`fetch.wait.max.ms`), which sluice detects from librdkafka's statistics: how long a
    /// caught-up partition pauses fetching between checks. The bound on the extra latency
    /// when records come again. 0: never pause.
    #[serde(default = "default_idle_fetch_pause_ms")]
    pub idle_fetch_pause_ms: u64,
    /// Read each side topic's partition (a join's other input) up to the end it had when it
    /// was assigned before fetching the pipeline's partition of the same number, so a lookup
    /// join finds its table loaded and an interval join does not buffer a whole backlog (see
    /// `source::side_first`). Default: true.
    #[serde(default = "default_true")]
    pub side_topics_first: bool,
}

fn default_true() -> bool {
    true
}

fn default_idle_fetch_pause_ms() -> u64 {
    20
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartOffset {
    #[default]
    Earliest,
    Latest,
}

impl StartOffset {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            StartOffset::Earliest => "earliest",
            StartOffset::Latest => "latest",
        }
    }
}

/// A stage: a unique name and exactly one kind key (`wasm:`, `dedup:` or `join:`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// A user WebAssembly component implementing the `sluice:plugin/plugin` world.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmStageConfig>,
    /// Built-in deduplication by key within a time window (state in RocksDB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupConfig>,
    /// Built-in join with another topic: `kind: interval` or `kind: lookup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinConfig>,
}

/// The kind of a stage, borrowed from its config.
#[derive(Debug, Clone, Copy)]
pub enum StageKind<'a> {
    Wasm(&'a WasmStageConfig),
    Dedup(&'a DedupConfig),
    Join(&'a JoinConfig),
}

impl StageConfig {
    /// The one kind this stage has; `None` only for a config that failed [`LoadedConfig`] checks.
    pub fn kind(&self) -> Option<StageKind<'_>> {
        let kinds: Vec<StageKind<'_>> = self
            .wasm
            .iter()
            .map(StageKind::Wasm)
            .chain(self.dedup.iter().map(StageKind::Dedup))
            .chain(self.join.iter().map(StageKind::Join))
            .collect();
        match kinds.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    fn kind_count(&self) -> usize {
        usize::from(self.wasm.is_some())
            + usize::from(self.dedup.is_some())
            + usize::from(self.join.is_some())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmStageConfig {
    /// Path of the component (`.wasm`), relative to the pipeline file.
    pub plugin: PathBuf,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub limits: PluginLimits,
    /// WASI capabilities granted to the plugin. None by default.
    #[serde(default)]
    pub wasi: WasiGrants,
    /// After this many consecutive batches on which the plugin failed (trap, timeout, limit),
    /// the stage trips and the pipeline pauses with a clear status instead of isolating
    /// records forever. 0 disables the breaker.
    #[serde(default = "default_breaker")]
    pub breaker_failures: u32,
    /// When the breaker trips within this many seconds of a hot-swap of this stage, the
    /// previous plugin version is restored automatically and the pipeline continues (instead
    /// of pausing). 0 disables automatic rollback.
    #[serde(default = "default_rollback_window")]
    pub rollback_on_breaker_s: u64,
}

fn default_breaker() -> u32 {
    5
}

fn default_rollback_window() -> u64 {
    600
}

/// Per-plugin sandbox limits. Defaults are safe for untrusted code; a limit hit is a typed
/// error for the batch (the offending records are isolated and dead-lettered), never a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Linear memory a plugin instance may grow to.
    pub memory_mb: u64,
    /// Wall time one `process` call may take before it is interrupted (epoch deadline).
    pub timeout_ms: u64,
    /// Total size of the outputs of one call (values, keys and headers).
    pub max_output_mb: u64,
    /// WebAssembly instances, tables and memories one plugin instance may create.
    pub max_instances: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_mb: 256,
            timeout_ms: 5_000,
            max_output_mb: 64,
            max_instances: 64,
        }
    }
}

/// Narrow, explicit WASI grants. Everything not listed is denied: no files, no sockets, no
/// environment; clocks and randomness are available as WASI defines them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasiGrants {
    /// Environment variables the plugin sees (explicit values; nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Host directories the plugin may read (read-only unless `writable`).
    pub dirs: Vec<DirGrant>,
    /// Let the plugin write to the host's stderr (debugging; use the log import otherwise).
    pub stderr: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// Directory on the host, relative to the pipeline file.
    pub host: PathBuf,
    /// Path the plugin sees.
    pub guest: String,
    #[serde(default)]
    pub writable: bool,
}

impl WasiGrants {
    /// One line per grant, for `validate` and logs.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for k in self.env.keys() {
            out.push(format!("env {k}"));
        }
        for d in &self.dirs {
            out.push(format!(
                "dir {} as {} ({})",
                d.host.display(),
                d.guest,
                if d.writable {
                    "read-write"
                } else {
                    "read-only"
                }
            ));
        }
        if self.stderr {
            out.push("stderr".into());
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub batch: BatchConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    /// Default table; records may name another one (see the WIT contract).
    pub table: String,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Tables other than `table` that plugins may route records to.
    #[serde(default)]
    pub extra_tables: Vec<String>,
    /// Expected column types of `table` (name → ClickHouse type), checked by `validate` and at
    /// start so a schema change is caught before rows are dead-lettered.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// What to do with JSON fields that are not columns of the table.
    #[serde(default)]
    pub unknown_fields: UnknownFieldsPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFieldsPolicy {
    #[default]
    Ignore,
    Reject,
}

fn default_database() -> String {
    "default".into()
}
fn default_user() -> String {
    "default".into()
}

/// A batch closes when any limit is reached. Batches never span partitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_rows: usize,
    pub max_bytes: usize,
    /// Sub-second by default: a quiet topic still lands quickly.
    pub max_age_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            max_bytes: 32 * 1024 * 1024,
            max_age_ms: 250,
        }
    }
}

impl BatchConfig {
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    pub topic: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory for the batch journal and stage state; default `./sluice-state/<pipeline>`.
    pub dir: Option<PathBuf>,
    /// RocksDB block cache shared by all state (dedup keys, join buffers), in MiB: bounds read
    /// memory whatever the state size. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_cache_mb: Option<usize>,
    /// RocksDB write buffer (memtable) size per column family, in MiB; up to two per family
    /// are in memory. Default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_buffer_mb: Option<usize>,
    /// A batch's encoded output at least this big (KiB) is journaled in a file of its own
    /// (`<dir>/outbox/`) rather than in RocksDB, where it would pass through the write-ahead
    /// log, a memtable and a table file. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_file_min_kb: Option<usize>,
    /// Hand-off of per-partition state between instances of one consumer group through a
    /// compacted Kafka topic. Needed when more than one instance runs the pipeline: without
    /// it, a partition that moves arrives at its new owner without its dedup keys and join
    /// buffers, and a batch in flight at a crash is not re-sent with its tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changelog: Option<ChangelogConfig>,
}

/// See `docs/reliability.md` ("State hand-off").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangelogConfig {
    /// The topic (created compacted, one partition per source partition number, if absent).
    pub topic: String,
    /// Replication factor when sluice creates the topic; default: the broker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i16>,
}

impl StateConfig {
    /// The memory settings to open the state store with.
    pub fn memory(&self) -> crate::state::StateMemory {
        let d = crate::state::StateMemory::default();
        crate::state::StateMemory {
            block_cache_mb: self.block_cache_mb.unwrap_or(d.block_cache_mb).max(1),
            write_buffer_mb: self.write_buffer_mb.unwrap_or(d.write_buffer_mb).max(1),
            outbox_file_min_bytes: self
                .outbox_file_min_kb
                .map_or(d.outbox_file_min_bytes, |kb| kb.saturating_mul(1024)),
        }
    }
}

/// A parsed pipeline file plus where it came from (relative plugin paths resolve against it).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub pipeline: PipelineConfig,
}

impl LoadedConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(path, &text)
    }

    /// Parses `text` as if read from `path`, applying environment expansion and overrides.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let expanded =
            expand_env(text, |k| std::env::var(k).ok()).map_err(|message| ConfigError::Env {
                path: path.to_path_buf(),
                message,
            })?;
        let de = serde_yaml_ng::Deserializer::from_str(&expanded);
        let mut pipeline: PipelineConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                key: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        apply_env_overrides(&mut pipeline, |k| std::env::var(k).ok());
        let loaded = Self {
            path: path.to_path_buf(),
            pipeline,
        };
        loaded.check()?;
        Ok(loaded)
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        self.path
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }

    pub fn state_dir(&self) -> PathBuf {
        match &self.pipeline.state.dir {
            Some(d) => self.resolve(d),
            None => PathBuf::from("sluice-state").join(&self.pipeline.name),
        }
    }

    /// The consumer's `group.instance.id` (see [`KafkaConfig::instance_id`]).
    pub fn instance_id(&self) -> String {
        match &self.pipeline.kafka.instance_id {
            Some(id) => id.clone(),
            None => self.derived_instance_id(),
        }
    }

    /// Names this instance among those of the pipeline even when static membership is off
    /// (`instance_id: ""`): what its transactional producers are registered as.
    pub fn instance_identity(&self) -> String {
        match self.instance_id() {
            id if id.is_empty() => self.derived_instance_id(),
            id => id,
        }
    }

    /// Pipeline name + a hash of host name and state directory: stable across restarts,
    /// distinct for every instance with its own state.
    fn derived_instance_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_default();
        let dir = self.state_dir();
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let mut h = Sha256::new();
        h.update(host.as_bytes());
        h.update([0]);
        h.update(dir.to_string_lossy().as_bytes());
        format!(
            "{}-{}",
            self.pipeline.name,
            &hex::encode(h.finalize())[..12]
        )
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Rules serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.invalid(
                "name",
                "must be non-empty and use only letters, digits, '-' and '_'",
            ));
        }
        if p.kafka.topics.is_empty() {
            return Err(self.invalid("kafka.topics", "at least one topic is required"));
        }
        if p.kafka.brokers.trim().is_empty() {
            return Err(self.invalid("kafka.brokers", "must not be empty"));
        }
        for key in p.kafka.properties.keys() {
            if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                return Err(self.invalid(
                    &format!("kafka.properties.{key}"),
                    "is managed by sluice (offsets are committed only after ClickHouse acknowledged the batch)",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in p.stages.iter().enumerate() {
            if s.kind_count() != 1 {
                return Err(self.invalid(
                    &format!("stages[{i}]"),
                    format!(
                        "stage {:?} must have exactly one kind key (wasm, dedup or join)",
                        s.name
                    ),
                ));
            }
            let kind_check = match s.kind() {
                Some(StageKind::Dedup(d)) => d.check(),
                Some(StageKind::Join(j)) => j.check(&p.kafka.topics, &p.dead_letter.topic),
                _ => Ok(()),
            };
            if let Err((key, message)) = kind_check {
                return Err(self.invalid(&format!("stages[{i}].{key}"), message));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(self.invalid(
                    &format!("stages[{i}].name"),
                    format!("duplicate stage name {:?}", s.name),
                ));
            }
        }
        let b = &p.sink.batch;
        if b.max_rows == 0 || b.max_bytes == 0 || b.max_age_ms == 0 {
            return Err(self.invalid(
                "sink.batch",
                "max_rows, max_bytes and max_age_ms must be > 0",
            ));
        }
        if p.dead_letter.topic.is_empty() {
            return Err(self.invalid("dead_letter.topic", "must not be empty"));
        }
        if p.kafka.topics.contains(&p.dead_letter.topic) {
            return Err(self.invalid(
                "dead_letter.topic",
                "must differ from the source topics (dead letters would loop)",
            ));
        }
        Ok(())
    }
}

/// librdkafka properties that would break the commit-after-insert guarantee if overridden.
const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

/// Secrets that may come from the environment even when the file does not mention them.
fn apply_env_overrides(p: &mut PipelineConfig, get: impl Fn(&str) -> Option<String>) {
    if let Some(v) = get("SLUICE_CLICKHOUSE_USER") {
        p.sink.clickhouse.user = v;
    }
    if let Some(v) = get("SLUICE_CLICKHOUSE_PASSWORD") {
        p.sink.clickhouse.password = v;
    }
    if let Some(v) = get("SLUICE_KAFKA_SASL_USERNAME") {
        p.kafka.properties.insert("sasl.username".into(), v);
    }
    if let Some(v) = get("SLUICE_KAFKA_SASL_PASSWORD") {
        p.kafka.properties.insert("sasl.password".into(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: events
kafka:
  brokers: 127.0.0.1:9092
  topics: [events]
  group_id: g
  properties:
    client.id: x
stages:
  - name: enrich
    wasm:
      plugin: enrich.wasm
      config: {version: v2}
sink:
  clickhouse:
    url: http://127.0.0.1:8123
    table: events
  batch:
    max_rows: 10
dead_letter:
  topic: events-dlq
"#;

    fn parse(text: &str) -> Result<LoadedConfig, ConfigError> {
        LoadedConfig::from_str(Path::new("/etc/sluice/p.yaml"), text)
    }

    #[test]
    fn parses_a_full_file_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.pipeline.sink.batch.max_rows, 10);
        assert_eq!(c.pipeline.sink.batch.max_age_ms, 250);
        assert_eq!(c.pipeline.sink.clickhouse.database, "default");
        let Some(StageKind::Wasm(w)) = c.pipeline.stages[0].kind() else {
            panic!("wasm stage expected")
        };
        assert_eq!(
            c.resolve(&w.plugin),
            PathBuf::from("/etc/sluice/enrich.wasm")
        );
        assert_eq!(w.config["version"], "v2");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = GOOD.replace("max_rows: 10", "max_rowz: 10");
        let err = parse(&text).expect_err("unknown key").to_string();
        assert!(err.contains("/etc/sluice/p.yaml"), "{err}");
        assert!(err.contains("sink.batch"), "{err}");
        assert!(err.contains("max_rowz"), "{err}");
    }

    #[test]
    fn reserved_kafka_property_is_refused() {
        let text = GOOD.replace("client.id: x", "enable.auto.commit: \"true\"");
        let err = parse(&text).expect_err("reserved").to_string();
        assert!(err.contains("kafka.properties.enable.auto.commit"), "{err}");
    }

    #[test]
    fn duplicate_stage_names_are_refused() {
        let text = GOOD.replace(
            "stages:\n",
            "stages:\n  - name: enrich\n    wasm:\n      plugin: a.wasm\n",
        );
        let err = parse(&text).expect_err("dup").to_string();
        assert!(err.contains("duplicate stage name"), "{err}");
    }

    #[test]
    fn env_overrides_secrets() {
        let mut c = parse(GOOD).expect("valid").pipeline;
        apply_env_overrides(&mut c, |k| match k {
            "SLUICE_CLICKHOUSE_PASSWORD" => Some("s3cret".into()),
            "SLUICE_KAFKA_SASL_PASSWORD" => Some("k".into()),
            _ => None,
        });
        assert_eq!(c.sink.clickhouse.password, "s3cret");
        assert_eq!(c.kafka.properties["sasl.password"], "k");
    }
}
