//! The WASM plugin stage: hands each batch to a user component in one call.
//!
//! Per-record errors returned by the plugin are data: those records go to the dead-letter topic
//! and the rest proceed. A trap, timeout or memory-limit hit means the instance is broken: it is
//! discarded, and the batch is re-run one record per call on fresh instances so that only the
//! records that make the plugin fail are dead-lettered.

pub mod bindings;
pub mod runtime;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::PluginLimits;
use crate::record::{DeadLetter, Header, Record};
use crate::stage::{BatchContext, Stage, StageError, StageOutput};
use crate::state::StateTxn;
use bindings::{BatchResult, InputRecord, Source};
pub use runtime::{LoadedPlugin, LogLabels, PluginError, PluginInstance, PluginRuntime};

pub struct WasmStage {
    name: String,
    plugin: Arc<LoadedPlugin>,
    config_json: String,
    limits: PluginLimits,
    labels: Arc<LogLabels>,
    instance: Option<PluginInstance>,
}

impl WasmStage {
    /// Instantiates the plugin once up front so a config `init` refuses fails at start.
    pub fn new(
        pipeline: &str,
        name: &str,
        plugin: Arc<LoadedPlugin>,
        config: &serde_json::Value,
        limits: PluginLimits,
    ) -> Result<Self, PluginError> {
        let config_json = if config.is_null() {
            "{}".to_string()
        } else {
            config.to_string()
        };
        let labels = Arc::new(LogLabels {
            pipeline: pipeline.to_string(),
            stage: name.to_string(),
            plugin: plugin.id(),
        });
        let instance = plugin.instantiate(&config_json, &limits, labels.clone())?;
        Ok(Self {
            name: name.to_string(),
            plugin,
            config_json,
            limits,
            labels,
            instance: Some(instance),
        })
    }

    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// Calls the plugin; on any failure the instance is dropped so the next call starts clean.
    fn call(&mut self, inputs: &[InputRecord]) -> Result<BatchResult, PluginError> {
        let instance = match self.instance.as_mut() {
            Some(i) => i,
            None => self.instance.insert(self.plugin.instantiate(
                &self.config_json,
                &self.limits,
                self.labels.clone(),
            )?),
        };
        let result = instance.process(inputs);
        if result.is_err() {
            self.instance = None;
        }
        result
    }

    fn dead_letter(&self, record: &Record, kind: &str, message: String) -> DeadLetter {
        DeadLetter {
            origin: record.origin.clone(),
            stage: self.name.clone(),
            plugin: Some(self.plugin.id()),
            kind: kind.to_string(),
            message,
        }
    }

    /// Turns a plugin's answer into stage output. Indices out of range violate the contract.
    fn collect(
        &self,
        batch: &[Record],
        result: BatchResult,
        out: &mut StageOutput,
    ) -> Result<(), String> {
        let mut failed = vec![false; batch.len()];
        for e in &result.errors {
            let Some(record) = batch.get(e.input as usize) else {
                return Err(format!("error names input {} of {}", e.input, batch.len()));
            };
            failed[e.input as usize] = true;
            out.dead_letters
                .push(self.dead_letter(record, e.kind.as_str(), e.message.clone()));
        }
        for o in result.outputs {
            let idx = o.input as usize;
            let Some(record) = batch.get(idx) else {
                return Err(format!("output names input {} of {}", o.input, batch.len()));
            };
            // A record that failed is dead-lettered whole: its partial outputs are discarded.
            if failed[idx] {
                continue;
            }
            out.records.push(Record {
                origin: record.origin.clone(),
                key: o.key.map(Bytes::from),
                value: Bytes::from(o.value),
                headers: o
                    .headers
                    .into_iter()
                    .map(|h| Header {
                        key: h.key,
                        value: Bytes::from(h.value),
                    })
                    .collect(),
                table: o.table,
            });
        }
        Ok(())
    }

    /// Re-runs a failed batch one record per call so only the records that break the plugin
    /// are dead-lettered.
    fn isolate(
        &mut self,
        batch: &[Record],
        inputs: Vec<InputRecord>,
        ctx: &BatchContext,
    ) -> Result<StageOutput, StageError> {
        let mut out = StageOutput::default();
        for (i, input) in inputs.into_iter().enumerate() {
            let one = std::slice::from_ref(&batch[i]);
            match self.call(std::slice::from_ref(&input)) {
                Ok(result) => {
                    if let Err(msg) = self.collect(one, result, &mut out) {
                        out.dead_letters.push(self.dead_letter(
                            &batch[i],
                            "contract",
                            format!("plugin broke the contract: {msg}"),
                        ));
                    }
                }
                Err(e @ (PluginError::Init { .. } | PluginError::Engine(_))) => {
                    return Err(StageError {
                        stage: self.name.clone(),
                        message: e.to_string(),
                    })
                }
                Err(e) => {
                    tracing::warn!(pipeline = %ctx.pipeline, stage = %self.name, partition = %ctx.partition,
                        offset = batch[i].origin.offset, "record isolated: {e}");
                    out.dead_letters
                        .push(self.dead_letter(&batch[i], e.kind(), e.to_string()));
                }
            }
        }
        Ok(out)
    }
}

fn to_input(r: &Record) -> InputRecord {
    InputRecord {
        key: r.key.as_ref().map(|k| k.to_vec()),
        value: r.value.to_vec(),
        headers: r
            .headers
            .iter()
            .map(|h| bindings::Header {
                key: h.key.clone(),
                value: h.value.to_vec(),
            })
            .collect(),
        source: Source {
            topic: r.origin.topic.to_string(),
            partition: r.origin.partition,
            offset: r.origin.offset,
            timestamp_ms: r.origin.timestamp_ms,
        },
    }
}

impl Stage for WasmStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        _state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        if batch.is_empty() {
            return Ok(StageOutput::default());
        }
        let inputs: Vec<InputRecord> = batch.iter().map(to_input).collect();
        let failure = match self.call(&inputs) {
            Ok(result) => {
                let mut out = StageOutput::default();
                match self.collect(&batch, result, &mut out) {
                    Ok(()) => return Ok(out),
                    Err(msg) => format!("plugin broke the contract: {msg}"),
                }
            }
            Err(e @ (PluginError::Init { .. } | PluginError::Engine(_))) => {
                return Err(StageError {
                    stage: self.name.clone(),
                    message: e.to_string(),
                })
            }
            Err(e) => e.to_string(),
        };
        tracing::warn!(pipeline = %ctx.pipeline, stage = %self.name, partition = %ctx.partition,
            first_offset = ctx.first_offset, last_offset = ctx.last_offset,
            "batch failed ({failure}); isolating the failing records");
        self.isolate(&batch, inputs, ctx)
    }
}
