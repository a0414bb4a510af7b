//! Stages: everything between the source and the sink. Each implements [`Stage`]; the engine
//! runs them in the configured order and knows nothing else about them.

pub mod wasm;

use crate::record::{DeadLetter, Record};

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
}

/// A failure of the stage itself (not of a record): the batch cannot proceed and will be retried
/// from its first offset, so no record is lost.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage:?}: {message}")]
pub struct StageError {
    pub stage: String,
    pub message: String,
}

/// One step of a pipeline, called once per batch.
///
/// Must be deterministic for a given input and state: after a crash the engine rebuilds the same
/// batch and relies on getting the same rows (the ClickHouse deduplication token covers the batch).
pub trait Stage: Send {
    fn name(&self) -> &str;
    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
    ) -> Result<StageOutput, StageError>;
}

/// Builds the configured stages in order. This is the one place that maps config kinds to
/// stage implementations.
pub fn build(
    cfg: &crate::config::LoadedConfig,
    runtime: &wasm::PluginRuntime,
) -> Result<Vec<Box<dyn Stage>>, wasm::PluginError> {
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    for s in &cfg.pipeline.stages {
        match s.kind() {
            Some(crate::config::StageKind::Wasm(w)) => {
                let plugin = runtime.load_file(&cfg.resolve(&w.plugin))?;
                stages.push(Box::new(wasm::WasmStage::new(
                    &cfg.pipeline.name,
                    &s.name,
                    plugin,
                    &w.config,
                    w.limits.clone(),
                )?));
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
