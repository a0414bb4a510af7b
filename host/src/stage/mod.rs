//! Stages: everything between the source and the sink. Each implements [`Stage`]; the engine
//! runs them in the configured order and knows nothing else about them.

pub mod dedup;
pub mod join;
pub mod keyed;
pub mod wasm;

use std::sync::Arc;

use crate::plugin_store::PluginRef;
use crate::record::{DeadLetter, Record};
use crate::state::StateTxn;
pub use wasm::shadow::ShadowReport;
use wasm::LoadedPlugin;

/// Identifies the Kafka partition a batch comes from. Batches never span partitions, so state
/// kept per partition can move with the partition on rebalance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What a stage knows about the batch it is processing.
#[derive(Debug, Clone)]
pub struct BatchContext {
    pub pipeline: String,
    pub partition: PartitionKey,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// A stage's answer for one batch: records for the next stage and records for the dead-letter topic.
#[derive(Debug, Default)]
pub struct StageOutput {
    pub records: Vec<Record>,
    pub dead_letters: Vec<DeadLetter>,
    /// Named counts for metrics (`duplicates`, `join_matches`, ...).
    pub counters: Vec<(&'static str, u64)>,
}

/// A failure of the stage itself (not of a record): the batch cannot proceed and will be retried
/// from its first offset, so no record is lost.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage:?}: {message}")]
pub struct StageError {
    pub stage: String,
    pub message: String,
    /// The stage tripped its circuit breaker: the pipeline pauses instead of retrying.
    pub breaker_open: bool,
}

impl StageError {
    pub fn new(stage: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            stage: stage.into(),
            message: message.into(),
            breaker_open: false,
        }
    }
}

/// One step of a pipeline, called over a batch's records in order.
///
/// A batch larger than a few thousand records reaches the stage in consecutive slices (the
/// engine encodes each slice's output before reading the next, to bound memory): `process`
/// is then called several times with the same `ctx` and `state` transaction, each time with
/// the records after the previous slice's. A stage must not assume one call per batch: what
/// an earlier slice wrote is visible through `state`, but an in-memory view that changes only
/// on commit (as dedup's key index) must also hold what the transaction's earlier calls
/// added ([`crate::state::StateTxn::id`] tells them from the next batch's).
///
/// State lives in `state` (RocksDB behind a per-batch transaction: use
/// `state.stage(self.name(), ctx.partition.partition)`). The engine writes the transaction
/// together with the batch's journal entry and encoded output, so state always matches what
/// reached ClickHouse, and a batch interrupted by a crash is re-sent from that record rather
/// than processed again. Stages should still be deterministic: it keeps rewinds predictable.
pub trait Stage: Send {
    fn name(&self) -> &str;

    /// Topics this stage consumes besides the pipeline's own (e.g. the other side of a join).
    /// The engine subscribes to them and hands their batches to [`Stage::process_side`].
    fn side_topics(&self) -> Vec<String> {
        Vec::new()
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError>;

    /// A batch from one of [`Stage::side_topics`]. Its output continues through the stages
    /// after this one.
    fn process_side(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        let _ = (batch, ctx, state);
        Ok(StageOutput::default())
    }

    /// Stages that run a replaceable plugin expose it here (hot-swap, shadow runs); the
    /// engine calls it only between batches.
    fn plugin_slot(&mut self) -> Option<&mut dyn PluginSlot> {
        None
    }

    /// The committed state of partition number `partition` was replaced underneath the stage
    /// (restored from the state changelog when the partition moved here): drop whatever the
    /// stage keeps in memory about it. Called between batches.
    fn state_replaced(&mut self, partition: i32) {
        let _ = partition;
    }
}

/// A stage whose logic is a plugin that can be replaced while the pipeline runs.
pub trait PluginSlot {
    fn current(&self) -> PluginRef;

    /// Replaces the plugin from the next batch on. The new plugin is instantiated (and its
    /// `init` run with the stage's config) before anything changes: on error the old one stays.
    fn swap(&mut self, plugin: Arc<LoadedPlugin>) -> Result<(), StageError>;

    /// Runs `candidate` beside the live plugin on the same records (its output discarded)
    /// until [`PluginSlot::stop_shadow`]; replaces a running shadow.
    fn start_shadow(&mut self, candidate: Arc<LoadedPlugin>) -> Result<(), StageError>;

    fn shadow_report(&self) -> Option<ShadowReport>;

    /// Ends the shadow run; returns its final report and the candidate (to promote it).
    fn stop_shadow(&mut self) -> Option<(ShadowReport, Arc<LoadedPlugin>)>;
}

/// The sandbox options of a WASM stage, with granted directories resolved against the file.
pub fn wasm_options(
    cfg: &crate::config::LoadedConfig,
    w: &crate::config::WasmStageConfig,
) -> wasm::WasmOptions {
    let mut grants = w.wasi.clone();
    for d in &mut grants.dirs {
        d.host = cfg.resolve(&d.host);
    }
    wasm::WasmOptions {
        limits: w.limits.clone(),
        grants,
        breaker_failures: w.breaker_failures,
    }
}

/// Builds the configured stages in order. This is the one place that maps config kinds to
/// stage implementations.
pub fn build(
    cfg: &crate::config::LoadedConfig,
    runtime: &wasm::PluginRuntime,
) -> Result<Vec<Box<dyn Stage>>, wasm::PluginError> {
    build_with(cfg, runtime, &std::collections::HashMap::new())
}

/// Like [`build`], with plugins chosen over the control plane (stage name → plugin) instead
/// of the files named in the pipeline file.
pub fn build_with(
    cfg: &crate::config::LoadedConfig,
    runtime: &wasm::PluginRuntime,
    plugins: &std::collections::HashMap<String, Arc<LoadedPlugin>>,
) -> Result<Vec<Box<dyn Stage>>, wasm::PluginError> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    for s in &cfg.pipeline.stages {
        match s.kind() {
            Some(crate::config::StageKind::Wasm(w)) => {
                let plugin = match plugins.get(&s.name) {
                    Some(p) => p.clone(),
                    None => runtime.load_file(&cfg.resolve(&w.plugin))?,
                };
                stages.push(Box::new(wasm::WasmStage::with_options(
                    &cfg.pipeline.name,
                    &s.name,
                    plugin,
                    &w.config,
                    wasm_options(cfg, w),
                )?));
            }
            Some(crate::config::StageKind::Dedup(d)) => {
                stages.push(Box::new(dedup::DedupStage::new(&s.name, d)));
            }
            Some(crate::config::StageKind::Join(j)) => {
                // Only a config that skipped `LoadedConfig` checks can fail here.
                stages.push(
                    join::build(&s.name, j).map_err(|m| {
                        wasm::PluginError::Engine(format!("stage {:?}: {m}", s.name))
                    })?,
                );
            }
            // Unreachable for a config that passed `LoadedConfig` checks.
            None => {
                return Err(wasm::PluginError::Engine(format!(
                    "stage {:?} has no kind",
                    s.name
                )))
            }
        }
    }
    Ok(stages)
}
