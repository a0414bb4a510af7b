//! The WASM plugin stage: hands each batch to a user component in one call.
//!
//! Per-record errors returned by the plugin are data: those records go to the dead-letter topic
//! and the rest proceed. A trap, timeout or memory-limit hit means the instance is broken: it is
//! discarded, and the batch is re-run one record per call on fresh instances so that only the
//! records that make the plugin fail are dead-lettered.

pub mod bindings;
pub mod runtime;
pub mod shadow;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{PluginLimits, WasiGrants};
use crate::plugin_store::{now_ms, PluginRef};
use crate::record::{DeadLetter, Header, Record};
use crate::stage::{BatchContext, PluginSlot, Stage, StageError, StageOutput};
use crate::state::StateTxn;
use bindings::{BatchResult, HeaderParam, InputRecordRef, SourceRef};
pub use runtime::{LoadedPlugin, LogLabels, PluginError, PluginInstance, PluginRuntime};
pub use shadow::ShadowReport;

/// Dead-letter kinds that mean "the plugin failed on this record" rather than "the plugin
/// rejected this record".
const FAILURE_KINDS: &[&str] = &["trap", "timeout", "memory", "output_limit", "contract"];

pub struct WasmStage {
    name: String,
    plugin: Arc<LoadedPlugin>,
    config_json: String,
    limits: PluginLimits,
    grants: WasiGrants,
    labels: Arc<LogLabels>,
    instance: Option<PluginInstance>,
    /// Trip after this many consecutive failing batches (0: never).
    breaker_failures: u32,
    consecutive_failures: u32,
    shadow: Option<shadow::ShadowRun>,
}

/// Sandbox options of a WASM stage beyond its limits.
#[derive(Debug, Clone)]
pub struct WasmOptions {
    pub limits: PluginLimits,
    /// Directory paths must be resolved (absolute or relative to the working directory).
    pub grants: WasiGrants,
    pub breaker_failures: u32,
}

impl WasmStage {
    /// A stage with default grants (none) and breaker.
    pub fn new(
        pipeline: &str,
        name: &str,
        plugin: Arc<LoadedPlugin>,
        config: &serde_json::Value,
        limits: PluginLimits,
    ) -> Result<Self, PluginError> {
        Self::with_options(
            pipeline,
            name,
            plugin,
            config,
            WasmOptions {
                limits,
                grants: WasiGrants::default(),
                breaker_failures: 5,
            },
        )
    }

    /// Instantiates the plugin once up front so a config `init` refuses fails at start.
    pub fn with_options(
        pipeline: &str,
        name: &str,
        plugin: Arc<LoadedPlugin>,
        config: &serde_json::Value,
        options: WasmOptions,
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
        let instance = plugin.instantiate(
            &config_json,
            &options.limits,
            &options.grants,
            labels.clone(),
        )?;
        Ok(Self {
            name: name.to_string(),
            plugin,
            config_json,
            limits: options.limits,
            grants: options.grants,
            labels,
            instance: Some(instance),
            breaker_failures: options.breaker_failures,
            consecutive_failures: 0,
            shadow: None,
        })
    }

    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// Calls the plugin; on any failure the instance is dropped so the next call starts clean
    /// (a fresh instance from the precompiled component costs tens of microseconds).
    fn call(&mut self, inputs: &[InputRecordRef<'_>]) -> Result<BatchResult, PluginError> {
        let instance = match self.instance.as_mut() {
            Some(i) => i,
            None => self.instance.insert(self.plugin.instantiate(
                &self.config_json,
                &self.limits,
                &self.grants,
                self.labels.clone(),
            )?),
        };
        let result = instance.process_refs(inputs);
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

    /// Turns a plugin's answer for `batch` into stage output. Indices out of range violate the
    /// contract (nothing is added to `out` then).
    fn collect(
        &self,
        batch: &[Record],
        result: BatchResult,
        out: &mut StageOutput,
    ) -> Result<(), String> {
        let n = batch.len();
        if let Some(e) = result.errors.iter().find(|e| e.input as usize >= n) {
            return Err(format!("error names input {} of {n}", e.input));
        }
        if let Some(o) = result.outputs.iter().find(|o| o.input as usize >= n) {
            return Err(format!("output names input {} of {n}", o.input));
        }
        let mut failed = vec![false; n];
        for e in &result.errors {
            let i = e.input as usize;
            failed[i] = true;
            out.dead_letters
                .push(self.dead_letter(&batch[i], e.kind.as_str(), e.message.clone()));
        }
        for o in result.outputs {
            let idx = o.input as usize;
            // A record that failed is dead-lettered whole: its partial outputs are discarded.
            if failed[idx] {
                continue;
            }
            out.records.push(Record {
                origin: batch[idx].origin.clone(),
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

    /// Runs `batch[range]`; if the plugin fails on it, splits the range in halves on fresh
    /// instances until the failing records are alone, and dead-letters only those. One bad
    /// record in n costs about 2·log2(n) extra calls.
    ///
    /// `budget` caps the failing calls per batch (each may cost a whole time limit): once spent,
    /// the undecided records are dead-lettered as they are, and the batch counts as failing.
    fn bisect(
        &mut self,
        batch: &[Record],
        inputs: &[InputRecordRef<'_>],
        ctx: &BatchContext,
        out: &mut StageOutput,
        budget: &mut u32,
    ) -> Result<(), StageError> {
        let failure = match self.call(inputs) {
            Ok(result) => match self.collect(batch, result, out) {
                Ok(()) => return Ok(()),
                Err(msg) => (
                    "contract".to_string(),
                    format!("plugin broke the contract: {msg}"),
                ),
            },
            Err(
                e @ (PluginError::Init { .. } | PluginError::Engine(_) | PluginError::Grant { .. }),
            ) => return Err(StageError::new(&self.name, e.to_string())),
            Err(e) => (e.kind().to_string(), e.to_string()),
        };
        if batch.len() == 1 || *budget == 0 {
            let message = if batch.len() == 1 {
                failure.1
            } else {
                format!(
                    "{} (isolation budget spent: {} records of this batch dead-lettered undecided)",
                    failure.1,
                    batch.len()
                )
            };
            tracing::warn!(pipeline = %ctx.pipeline, stage = %self.name, partition = %ctx.partition,
                first_offset = batch[0].origin.offset, records = batch.len(), "records isolated: {message}");
            for r in batch {
                out.dead_letters
                    .push(self.dead_letter(r, &failure.0, message.clone()));
            }
            return Ok(());
        }
        *budget -= 1;
        let mid = batch.len() / 2;
        self.bisect(&batch[..mid], &inputs[..mid], ctx, out, budget)?;
        self.bisect(&batch[mid..], &inputs[mid..], ctx, out, budget)
    }
}

/// The plugin's view of a record: borrowed, copied once by wasmtime into the guest's memory.
fn to_input<'a>(r: &'a Record, headers: &'a [HeaderParam<'a>]) -> InputRecordRef<'a> {
    InputRecordRef {
        key: r.key.as_deref(),
        value: &r.value,
        headers,
        source: SourceRef {
            topic: &r.origin.topic,
            partition: r.origin.partition,
            offset: r.origin.offset,
            timestamp_ms: r.origin.timestamp_ms,
        },
    }
}

/// The headers of each record as the plugin sees them (no allocation for records without).
fn header_refs(batch: &[Record]) -> Vec<Vec<HeaderParam<'_>>> {
    batch
        .iter()
        .map(|r| {
            r.headers
                .iter()
                .map(|h| HeaderParam {
                    key: &h.key,
                    value: &h.value,
                })
                .collect()
        })
        .collect()
}

impl Stage for WasmStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn plugin_slot(&mut self) -> Option<&mut dyn PluginSlot> {
        Some(self)
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        _state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        // The time limit applies per call: slower guests (Python, JS, Go) would time out on a
        // whole 100k-record batch, so large batches are handed over in chunks.
        if batch.len() <= MAX_RECORDS_PER_CALL {
            return self.process_chunk(&batch, ctx);
        }
        let mut out = StageOutput::default();
        for chunk in batch.chunks(MAX_RECORDS_PER_CALL) {
            let o = self.process_chunk(chunk, ctx)?;
            out.records.extend(o.records);
            out.dead_letters.extend(o.dead_letters);
            out.counters.extend(o.counters);
        }
        Ok(out)
    }
}

impl WasmStage {
    /// Gives the shadow candidate the same inputs the live plugin just processed. Its failures
    /// are counted, never propagated: a shadow cannot disturb the live pipeline.
    fn run_shadow(
        &mut self,
        inputs: &[InputRecordRef<'_>],
        live: &BatchResult,
        live_time: std::time::Duration,
    ) {
        let Some(run) = self.shadow.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        let instance = match run.instance.take() {
            Some(i) => Ok(i),
            None => run.candidate.instantiate(
                &self.config_json,
                &self.limits,
                &self.grants,
                self.labels.clone(),
            ),
        };
        let result = instance.and_then(|mut i| {
            let r = i.process_refs(inputs);
            if r.is_ok() {
                run.instance = Some(i);
            }
            r
        });
        let elapsed = started.elapsed();
        if let Err(e) = &result {
            tracing::debug!(stage = %self.name, candidate = %run.candidate.id(), "shadow call failed: {e}");
        }
        run.observe(inputs, live, live_time, result.as_ref().ok(), elapsed);
    }
}

impl PluginSlot for WasmStage {
    fn current(&self) -> PluginRef {
        self.plugin.plugin_ref()
    }

    fn swap(&mut self, plugin: Arc<LoadedPlugin>) -> Result<(), StageError> {
        let labels = Arc::new(LogLabels {
            pipeline: self.labels.pipeline.clone(),
            stage: self.name.clone(),
            plugin: plugin.id(),
        });
        let instance = plugin
            .instantiate(
                &self.config_json,
                &self.limits,
                &self.grants,
                labels.clone(),
            )
            .map_err(|e| StageError::new(&self.name, e.to_string()))?;
        tracing::info!(pipeline = %labels.pipeline, stage = %self.name, from = %self.plugin.id(), to = %plugin.id(), "plugin swapped");
        self.plugin = plugin;
        self.labels = labels;
        self.instance = Some(instance);
        self.consecutive_failures = 0;
        Ok(())
    }

    fn start_shadow(&mut self, candidate: Arc<LoadedPlugin>) -> Result<(), StageError> {
        let instance = candidate
            .instantiate(
                &self.config_json,
                &self.limits,
                &self.grants,
                self.labels.clone(),
            )
            .map_err(|e| StageError::new(&self.name, e.to_string()))?;
        self.shadow = Some(shadow::ShadowRun {
            report: ShadowReport {
                live: self.plugin.plugin_ref(),
                candidate: candidate.plugin_ref(),
                started_at_ms: now_ms(),
                batches: 0,
                records: 0,
                rows_live: 0,
                rows_candidate: 0,
                records_same: 0,
                records_changed: 0,
                errors_live: 0,
                errors_candidate: 0,
                candidate_failures: 0,
                fields_added: Default::default(),
                fields_removed: Default::default(),
                fields_changed: Default::default(),
                live_ms: 0.0,
                candidate_ms: 0.0,
                samples: Vec::new(),
            },
            candidate,
            instance: Some(instance),
        });
        Ok(())
    }

    fn shadow_report(&self) -> Option<ShadowReport> {
        self.shadow.as_ref().map(|s| s.report.clone())
    }

    fn stop_shadow(&mut self) -> Option<(ShadowReport, Arc<LoadedPlugin>)> {
        self.shadow.take().map(|s| (s.report, s.candidate))
    }
}

/// Records handed to the plugin in one `process` call (the batch is split beyond this).
pub const MAX_RECORDS_PER_CALL: usize = 4096;

impl WasmStage {
    fn process_chunk(
        &mut self,
        batch: &[Record],
        ctx: &BatchContext,
    ) -> Result<StageOutput, StageError> {
        if batch.is_empty() {
            return Ok(StageOutput::default());
        }
        let headers = header_refs(batch);
        let inputs: Vec<InputRecordRef<'_>> = batch
            .iter()
            .zip(&headers)
            .map(|(r, h)| to_input(r, h))
            .collect();
        let started = std::time::Instant::now();
        let called = self.call(&inputs);
        if let (Ok(result), Some(_)) = (&called, &self.shadow) {
            self.run_shadow(&inputs, result, started.elapsed());
        }
        let failure = match called {
            Ok(result) => {
                let mut out = StageOutput::default();
                match self.collect(batch, result, &mut out) {
                    Ok(()) => {
                        self.consecutive_failures = 0;
                        return Ok(out);
                    }
                    Err(msg) => format!("plugin broke the contract: {msg}"),
                }
            }
            Err(
                e @ (PluginError::Init { .. } | PluginError::Engine(_) | PluginError::Grant { .. }),
            ) => return Err(StageError::new(&self.name, e.to_string())),
            Err(e) => e.to_string(),
        };
        tracing::warn!(pipeline = %ctx.pipeline, stage = %self.name, partition = %ctx.partition,
            first_offset = ctx.first_offset, last_offset = ctx.last_offset,
            "batch failed ({failure}); isolating the failing records");
        let mut out = StageOutput::default();
        let n = batch.len();
        let mut budget = 8 + 2 * (usize::BITS - n.leading_zeros());
        let full_budget = budget;
        self.bisect(batch, &inputs, ctx, &mut out, &mut budget)?;
        // Records the plugin failed on (not the per-record errors it returned as data).
        let isolated = out
            .dead_letters
            .iter()
            .filter(|d| FAILURE_KINDS.contains(&d.kind.as_str()))
            .count();
        out.counters.push(("plugin_failures", isolated as u64));
        // Poison records contained: the plugin works. Most records failing, or isolation
        // giving up, means the plugin itself is broken.
        let broken = budget == 0 && full_budget > 0 || isolated * 2 >= n;
        if !broken {
            self.consecutive_failures = 0;
            return Ok(out);
        }
        self.consecutive_failures += 1;
        if self.breaker_failures > 0 && self.consecutive_failures >= self.breaker_failures {
            return Err(StageError {
                stage: self.name.clone(),
                message: format!(
                    "circuit breaker open: plugin {} failed on {} consecutive batches (last: {failure}); the pipeline is paused and the batch was not committed",
                    self.plugin.id(),
                    self.consecutive_failures
                ),
                breaker_open: true,
            });
        }
        Ok(out)
    }
}
