//! `sluice plugin test`: fixture records through the real WASM stage, compared with the
//! expected outputs.
//!
//! The records go through [`WasmStage`] via the [`Stage`] trait exactly as the engine calls it
//! (one batch per partition, never spanning partitions; default limits; a scratch state
//! store), so per-record errors, trap isolation by bisection and the sandbox limits behave as
//! in `sluice run`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::fixtures::{self, ConfigRef, ConfigsFile, Expected, ExpectedOutputs, Input, Position};
use super::DevtoolsError;
use crate::config::PluginLimits;
use crate::record::{Header, Origin, Record};
use crate::stage::wasm::{LoadedPlugin, PluginError, PluginRuntime, WasmStage};
use crate::stage::{BatchContext, PartitionKey, Stage};
use crate::state::StateStore;

/// The pipeline name plugins see in their log labels.
const PIPELINE: &str = "plugin-test";

#[derive(Debug, Clone)]
pub struct TestOptions {
    pub plugin: PathBuf,
    pub input: PathBuf,
    pub expect: PathBuf,
    /// The config of inputs that name none (`null`: `{}`, as a stage without `config:`).
    pub config: Value,
    /// Named configs for inputs with `"config": "<name>"`, and configs `init` must accept or
    /// refuse.
    pub configs: Option<PathBuf>,
    /// Write the actual outputs to `expect` instead of comparing.
    pub update: bool,
}

/// What the plugin made of one input, as the engine would pass it on.
#[derive(Debug, Clone, PartialEq)]
pub enum Actual {
    Row {
        table: Option<String>,
        /// The row as JSON; a value that is not JSON as a string (`json: false`).
        row: Value,
        json: bool,
        key: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
    },
    Error {
        kind: String,
        message: String,
    },
}

/// The outcome of [`run_test`]; `Display` renders the diff.
#[derive(Debug)]
pub struct TestReport {
    /// `name@version` of the plugin.
    pub plugin: String,
    pub plugin_path: PathBuf,
    pub expect_path: PathBuf,
    pub inputs: Vec<Input>,
    pub actual: BTreeMap<Position, Vec<Actual>>,
    /// `None` with `update`.
    pub expected: Option<ExpectedOutputs>,
    /// Indices in `inputs` whose outputs differ from the expected ones.
    pub differing: Vec<usize>,
    /// Configs of the `--configs` file that `init` accepted or refused against expectations.
    pub config_failures: Vec<String>,
    /// `update`: the file written.
    pub written: Option<PathBuf>,
}

impl TestReport {
    pub fn passed(&self) -> bool {
        self.differing.is_empty() && self.config_failures.is_empty()
    }
}

/// A directory removed on drop: the scratch state store (plugins have no state, but the
/// [`Stage`] trait takes a transaction).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self, DevtoolsError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("sluice-plugin-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| DevtoolsError::io(&dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn record(input: &Input) -> Record {
    Record::from_origin(Arc::new(Origin {
        topic: input.topic.as_str().into(),
        partition: input.partition,
        offset: input.offset,
        timestamp_ms: input.timestamp_ms,
        key: input.key.clone().map(Into::into),
        value: input.value.clone().into(),
        headers: input
            .headers
            .iter()
            .map(|(k, v)| Header {
                key: k.clone(),
                value: v.clone().into(),
            })
            .collect(),
    }))
}

/// Inputs that run with one config: a label for messages, the config, the inputs.
type ConfigGroup<'a> = (String, Value, Vec<&'a Input>);

/// Groups inputs by the config they run with (first appearance first): one stage each.
fn group_by_config<'a>(
    inputs: &'a [Input],
    default: &Value,
    configs: &ConfigsFile,
    configs_path: Option<&Path>,
    input_path: &Path,
) -> Result<Vec<ConfigGroup<'a>>, DevtoolsError> {
    let mut groups: Vec<ConfigGroup<'a>> = Vec::new();
    for input in inputs {
        let (label, config) = match &input.config {
            ConfigRef::Default => ("--config".to_string(), default.clone()),
            ConfigRef::Named(name) => {
                let Some(config) = configs.configs.get(name) else {
                    let why = match configs_path {
                        Some(p) => format!("config {name:?} is not in {}", p.display()),
                        None => format!("config {name:?} names a config: give --configs FILE"),
                    };
                    return Err(DevtoolsError::Fixture {
                        path: input_path.to_path_buf(),
                        line: input.line,
                        message: why,
                    });
                };
                (format!("config {name:?}"), config.clone())
            }
            ConfigRef::Inline(v) => (format!("the config of line {}", input.line), v.clone()),
        };
        match groups.iter_mut().find(|(_, c, _)| *c == config) {
            Some((_, _, members)) => members.push(input),
            None => groups.push((label, config, vec![input])),
        }
    }
    Ok(groups)
}

fn stage(plugin: &Arc<LoadedPlugin>, config: &Value) -> Result<WasmStage, PluginError> {
    WasmStage::new(
        PIPELINE,
        &plugin.name,
        plugin.clone(),
        config,
        PluginLimits::default(),
    )
}

/// Runs the plugin on the inputs and compares (or, with `update`, writes) the expected
/// outputs. Errors are for what prevents a comparison (unreadable fixtures, a plugin that
/// does not load or refuses its config); differences are in the report.
pub fn run_test(opts: &TestOptions) -> Result<TestReport, DevtoolsError> {
    let inputs = fixtures::load_inputs(&opts.input)?;
    let expected = if opts.update {
        None
    } else {
        let expected = fixtures::load_expected(&opts.expect)?;
        for (pos, lines) in &expected {
            if !inputs.iter().any(|i| i.position() == *pos) {
                return Err(DevtoolsError::Fixture {
                    path: opts.expect.clone(),
                    line: lines.first().map_or(0, |(l, _)| *l),
                    message: format!(
                        "partition {} offset {} is not an input of {}",
                        pos.0,
                        pos.1,
                        opts.input.display()
                    ),
                });
            }
        }
        Some(expected)
    };
    let configs = match &opts.configs {
        Some(p) => fixtures::load_configs(p)?,
        None => ConfigsFile::default(),
    };
    let groups = group_by_config(
        &inputs,
        &opts.config,
        &configs,
        opts.configs.as_deref(),
        &opts.input,
    )?;

    let plugin = PluginRuntime::new(None)?.load_file(&opts.plugin)?;
    let scratch = ScratchDir::new()?;
    let store = StateStore::open(&scratch.0)?;
    let mut actual: BTreeMap<Position, Vec<Actual>> = BTreeMap::new();
    for (label, config, members) in &groups {
        let mut stage = stage(&plugin, config).map_err(|source| DevtoolsError::Config {
            config: label.clone(),
            source,
        })?;
        let mut by_partition: BTreeMap<(&str, i32), Vec<&Input>> = BTreeMap::new();
        for input in members {
            by_partition
                .entry((input.topic.as_str(), input.partition))
                .or_default()
                .push(input);
        }
        for ((topic, partition), batch) in by_partition {
            let ctx = BatchContext {
                pipeline: PIPELINE.into(),
                partition: PartitionKey {
                    topic: topic.into(),
                    partition,
                },
                first_offset: batch.first().map_or(0, |i| i.offset),
                last_offset: batch.last().map_or(0, |i| i.offset),
            };
            let records = batch.iter().map(|i| record(i)).collect();
            let out = stage.process(records, &ctx, &mut store.txn())?;
            for r in out.records {
                let (row, json) = match serde_json::from_slice::<Value>(&r.value) {
                    Ok(v) => (v, true),
                    Err(_) => (
                        Value::String(String::from_utf8_lossy(&r.value).into_owned()),
                        false,
                    ),
                };
                actual
                    .entry((r.origin.partition, r.origin.offset))
                    .or_default()
                    .push(Actual::Row {
                        table: r.table,
                        row,
                        json,
                        key: r.key.map(|k| k.to_vec()),
                        headers: r
                            .headers
                            .into_iter()
                            .map(|h| (h.key, h.value.to_vec()))
                            .collect(),
                    });
            }
            for d in out.dead_letters {
                actual
                    .entry((d.origin.partition, d.origin.offset))
                    .or_default()
                    .push(Actual::Error {
                        kind: d.kind,
                        message: d.message,
                    });
            }
        }
    }

    let mut config_failures = Vec::new();
    for config in &configs.accepted {
        if let Err(e) = stage(&plugin, config) {
            config_failures.push(format!("config {config} must be accepted: {e}"));
        }
    }
    for config in &configs.refused {
        match stage(&plugin, config) {
            Err(PluginError::Init { .. }) => {}
            Err(e) => {
                config_failures.push(format!("config {config} must be refused by init, but: {e}"))
            }
            Ok(_) => config_failures.push(format!(
                "config {config} must be refused by init, which accepted it"
            )),
        }
    }

    let differing = match &expected {
        None => Vec::new(),
        Some(expected) => inputs
            .iter()
            .enumerate()
            .filter(|(_, input)| {
                let want = expected
                    .get(&input.position())
                    .map_or(&[][..], Vec::as_slice);
                let got = actual.get(&input.position()).map_or(&[][..], Vec::as_slice);
                !(want.len() == got.len() && want.iter().zip(got).all(|((_, w), g)| matches(w, g)))
            })
            .map(|(i, _)| i)
            .collect(),
    };
    let written = if opts.update {
        write_expected(&opts.expect, &inputs, &actual)?;
        Some(opts.expect.clone())
    } else {
        None
    };
    Ok(TestReport {
        plugin: plugin.id(),
        plugin_path: opts.plugin.clone(),
        expect_path: opts.expect.clone(),
        inputs,
        actual,
        expected,
        differing,
        config_failures,
        written,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(super) fn header_map(headers: &[(String, Vec<u8>)]) -> BTreeMap<String, String> {
    headers.iter().map(|(k, v)| (k.clone(), lossy(v))).collect()
}

/// Whether an actual output is what an expected line describes (`key`, `headers` and
/// `message` only when the line gives them).
pub(super) fn matches(want: &Expected, got: &Actual) -> bool {
    match (want, got) {
        (
            Expected::Row {
                table,
                row,
                key,
                headers,
            },
            Actual::Row {
                table: t,
                row: r,
                key: k,
                headers: h,
                ..
            },
        ) => {
            table == t
                && row == r
                && key
                    .as_ref()
                    .is_none_or(|key| k.as_deref() == Some(key.as_bytes()))
                && headers.as_ref().is_none_or(|want| *want == header_map(h))
        }
        (
            Expected::Error { kind, message },
            Actual::Error {
                kind: k,
                message: m,
            },
        ) => {
            kind == k
                && message
                    .as_ref()
                    .is_none_or(|part| m.contains(part.as_str()))
        }
        _ => false,
    }
}

/// `--update`: the actual outputs as `expected.jsonl` (rows and error kinds; keys, headers
/// and messages are left for the author to add where they matter).
fn write_expected(
    path: &Path,
    inputs: &[Input],
    actual: &BTreeMap<Position, Vec<Actual>>,
) -> Result<(), DevtoolsError> {
    let mut text = String::new();
    for input in inputs {
        for a in actual.get(&input.position()).into_iter().flatten() {
            let mut line = json!({"partition": input.partition, "offset": input.offset});
            match a {
                Actual::Row { table, row, .. } => {
                    line["row"] = row.clone();
                    if let Some(t) = table {
                        line["table"] = t.as_str().into();
                    }
                }
                Actual::Error { kind, .. } => line["error"] = kind.as_str().into(),
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
    }
    std::fs::write(path, text).map_err(|e| DevtoolsError::io(path, e))
}
