//! Control of a running pipeline: its status, pause/resume, plugin hot-swap, rollback and
//! shadow runs. A [`PipelineHandle`] is what the HTTP API holds; [`PipelineHandle::supervise`]
//! runs the pipeline, restarting it on resume and after an automatic rollback.
//!
//! Hot-swaps reach the worker over a channel it reads only between batches, so a swap takes
//! effect at a batch boundary: the batch in flight finishes on the old version, the next one
//! of every partition runs on the new version. The choice is written to the plugin store
//! before it is applied, so it survives a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Pipeline, PipelineError, Stats};
use crate::config::{LoadedConfig, StageKind, WasmStageConfig};
use crate::metrics::METRICS;
use crate::plugin_store::{now_ms, PluginRef, PluginStore, StoreError};
use crate::stage::wasm::{LoadedPlugin, PluginError, PluginRuntime, ShadowReport};
use crate::stage::{PartitionKey, Stage, StageError};

/// Requests the worker handles between two batches.
pub enum Control {
    Swap {
        stage: String,
        plugin: Arc<LoadedPlugin>,
        reply: oneshot::Sender<Result<SwapApplied, StageError>>,
    },
    ShadowStart {
        stage: String,
        plugin: Arc<LoadedPlugin>,
        reply: oneshot::Sender<Result<(), StageError>>,
    },
    ShadowReport {
        stage: String,
        reply: oneshot::Sender<Result<Option<ShadowReport>, StageError>>,
    },
    ShadowStop {
        stage: String,
        reply: oneshot::Sender<Result<Option<StoppedShadow>, StageError>>,
    },
}

/// A finished shadow run: its report and the candidate (to promote it).
pub type StoppedShadow = (ShadowReport, Arc<LoadedPlugin>);

/// What the worker reports back after a swap.
pub struct SwapApplied {
    pub previous: PluginRef,
    /// Per partition (`topic/partition`): the first offset processed by the new version.
    pub from_offsets: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Starting,
    Running,
    Paused,
    Failed,
    Stopped,
}

impl RunState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Failed => "failed",
            RunState::Stopped => "stopped",
        }
    }
    const ALL: [RunState; 5] = [
        RunState::Starting,
        RunState::Running,
        RunState::Paused,
        RunState::Failed,
        RunState::Stopped,
    ];
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StageStatus {
    pub name: String,
    /// `wasm`, `dedup` or `join`.
    pub kind: String,
    /// The plugin a WASM stage runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginRef>,
    /// The candidate of a running shadow run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<PluginRef>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Next offset this instance will process (known once a batch of it was handled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
    /// Offset committed to the consumer group and end of the partition, from the last probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PipelineStatus {
    pub name: String,
    pub state: RunState,
    /// Why the pipeline is paused, failed or stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub state_since_ms: i64,
    pub stages: Vec<StageStatus>,
    pub partitions: Vec<PartitionStatus>,
    pub consumed: u64,
    pub batches: u64,
    pub rows_inserted: u64,
    pub dead_letters: u64,
    /// Stage counters (`dedup.duplicates`, `join.matches`, ...).
    pub counters: BTreeMap<String, u64>,
}

/// What the worker and the consumer loop publish while running.
#[derive(Debug, Default)]
pub struct Live {
    pub positions: BTreeMap<PartitionKey, i64>,
    /// (committed, end offset) per partition, from the last lag probe.
    pub lag: BTreeMap<PartitionKey, (i64, i64)>,
    pub stages: Vec<StageStatus>,
}

/// Refreshes the stage part of [`Live`] from the stages themselves.
pub(super) fn stage_statuses(
    cfg: &LoadedConfig,
    stages: &mut [Box<dyn Stage>],
) -> Vec<StageStatus> {
    stages
        .iter_mut()
        .zip(cfg.pipeline.stages.iter())
        .map(|(s, c)| {
            let kind = match c.kind() {
                Some(StageKind::Wasm(_)) => "wasm",
                Some(StageKind::Dedup(_)) => "dedup",
                Some(StageKind::Join(_)) => "join",
                None => "unknown",
            };
            let name = s.name().to_string();
            let slot = s.plugin_slot();
            StageStatus {
                name,
                kind: kind.to_string(),
                plugin: slot.as_ref().map(|p| p.current()),
                shadow: slot.and_then(|p| p.shadow_report()).map(|r| r.candidate),
            }
        })
        .collect()
}

/// Errors of control operations, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("pipeline {pipeline:?} has no stage {stage:?}")]
    UnknownStage { pipeline: String, stage: String },
    #[error("stage {0:?} is not a WASM plugin stage")]
    NotAPluginStage(String),
    #[error("pipeline {0:?} is not running (state: {1}); resume it first")]
    NotRunning(String, &'static str),
    #[error("stage {0:?} has no shadow run")]
    NoShadow(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("the plugin store is not configured")]
    NoStore,
    #[error("pipeline worker is gone: {0}")]
    Gone(String),
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SwapOutcome {
    pub pipeline: String,
    pub stage: String,
    pub previous: PluginRef,
    pub current: PluginRef,
    /// `next_batch` when the pipeline is running, `next_start` when it is paused or stopped.
    pub applies: String,
    /// Per partition (`topic/partition`): the first offset processed by the new version.
    /// Partitions not listed had no batch since the pipeline started: all of their records
    /// are processed by the new version.
    pub from_offsets: BTreeMap<String, i64>,
}

struct Inner {
    state: RunState,
    reason: Option<String>,
    last_error: Option<String>,
    since_ms: i64,
}

pub struct PipelineHandle {
    pub cfg: LoadedConfig,
    runtime: Arc<PluginRuntime>,
    store: Option<Arc<PluginStore>>,
    stats: Arc<Stats>,
    live: Arc<Mutex<Live>>,
    inner: Mutex<Inner>,
    /// The worker's control channel while a run is active. Held across a whole operation so
    /// that swaps, rollbacks and run starts are serialised.
    ctl: tokio::sync::Mutex<Option<mpsc::Sender<Control>>>,
    /// `true`: the pipeline should be paused.
    paused: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Status data stays consistent field by field; a panic elsewhere must not hide it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PipelineHandle {
    pub fn new(
        cfg: LoadedConfig,
        pipeline: &Pipeline,
        runtime: Arc<PluginRuntime>,
        store: Option<Arc<PluginStore>>,
    ) -> Arc<Self> {
        let h = Arc::new(Self {
            cfg,
            runtime,
            store,
            stats: pipeline.stats(),
            live: pipeline.live(),
            inner: Mutex::new(Inner {
                state: RunState::Starting,
                reason: None,
                last_error: None,
                since_ms: now_ms(),
            }),
            ctl: tokio::sync::Mutex::new(None),
            paused: watch::channel(false).0,
        });
        h.set_state(RunState::Starting, None);
        h
    }

    pub fn name(&self) -> &str {
        &self.cfg.pipeline.name
    }

    fn set_state(&self, state: RunState, reason: Option<String>) {
        let mut i = lock(&self.inner);
        i.state = state;
        i.reason = reason;
        i.since_ms = now_ms();
        for s in RunState::ALL {
            METRICS
                .pipeline_state
                .with_label_values(&[self.name(), s.as_str()])
                .set(i64::from(s == state));
        }
    }

    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    pub fn status(&self) -> PipelineStatus {
        let i = lock(&self.inner);
        let live = lock(&self.live);
        let mut parts: BTreeMap<PartitionKey, PartitionStatus> = BTreeMap::new();
        let entry = |parts: &mut BTreeMap<PartitionKey, PartitionStatus>, pk: &PartitionKey| {
            parts.entry(pk.clone()).or_insert_with(|| PartitionStatus {
                topic: pk.topic.clone(),
                partition: pk.partition,
                next_offset: None,
                committed: None,
                end_offset: None,
                lag: None,
            });
        };
        for (pk, next) in &live.positions {
            entry(&mut parts, pk);
            if let Some(p) = parts.get_mut(pk) {
                p.next_offset = Some(*next);
            }
        }
        for (pk, (committed, end)) in &live.lag {
            entry(&mut parts, pk);
            if let Some(p) = parts.get_mut(pk) {
                p.committed = Some(*committed);
                p.end_offset = Some(*end);
                p.lag = Some((end - committed).max(0));
            }
        }
        let stages = if live.stages.is_empty() {
            self.configured_stages()
        } else {
            live.stages.clone()
        };
        PipelineStatus {
            name: self.name().to_string(),
            state: i.state,
            reason: i.reason.clone(),
            last_error: i.last_error.clone(),
            state_since_ms: i.since_ms,
            stages,
            partitions: parts.into_values().collect(),
            consumed: Stats::get(&self.stats.consumed),
            batches: Stats::get(&self.stats.batches),
            rows_inserted: Stats::get(&self.stats.rows_inserted),
            dead_letters: Stats::get(&self.stats.dead_letters),
            counters: self
                .stats
                .stage_counters
                .lock()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
        }
    }

    /// Stage list from the config (plugins as selected in the store) when no run is active.
    fn configured_stages(&self) -> Vec<StageStatus> {
        self.cfg
            .pipeline
            .stages
            .iter()
            .map(|s| {
                let (kind, plugin) = match s.kind() {
                    Some(StageKind::Wasm(_)) => (
                        "wasm",
                        self.store
                            .as_ref()
                            .and_then(|st| st.selection(self.name(), &s.name).ok())
                            .and_then(|sel| sel.current),
                    ),
                    Some(StageKind::Dedup(_)) => ("dedup", None),
                    Some(StageKind::Join(_)) => ("join", None),
                    None => ("unknown", None),
                };
                StageStatus {
                    name: s.name.clone(),
                    kind: kind.to_string(),
                    plugin,
                    shadow: None,
                }
            })
            .collect()
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    fn wasm_stage(&self, stage: &str) -> Result<&WasmStageConfig, ControlError> {
        let s = self
            .cfg
            .pipeline
            .stages
            .iter()
            .find(|s| s.name == stage)
            .ok_or_else(|| ControlError::UnknownStage {
                pipeline: self.name().to_string(),
                stage: stage.to_string(),
            })?;
        match s.kind() {
            Some(StageKind::Wasm(w)) => Ok(w),
            _ => Err(ControlError::NotAPluginStage(stage.to_string())),
        }
    }

    fn store(&self) -> Result<&Arc<PluginStore>, ControlError> {
        self.store.as_ref().ok_or(ControlError::NoStore)
    }

    /// Loads a plugin reference: a store version, or the stage's pipeline-file plugin.
    fn load(&self, stage: &str, r: &PluginRef) -> Result<Arc<LoadedPlugin>, ControlError> {
        match r.version {
            Some(v) => {
                let (_, bytes) = self.store()?.bytes(&r.name, v)?;
                Ok(self.runtime.load_stored(&r.name, Some(v), &bytes)?)
            }
            None => {
                let w = self.wasm_stage(stage)?;
                Ok(self.runtime.load_file(&self.cfg.resolve(&w.plugin))?)
            }
        }
    }

    /// Loads a stored version and checks that it accepts the stage's config (`init`) under
    /// the stage's limits, before anything is changed.
    pub fn load_for_stage(
        &self,
        stage: &str,
        name: &str,
        version: u32,
    ) -> Result<Arc<LoadedPlugin>, ControlError> {
        let w = self.wasm_stage(stage)?.clone();
        let plugin = self.load(
            stage,
            &PluginRef {
                name: name.to_string(),
                version: Some(version),
                sha256: String::new(),
            },
        )?;
        self.check_init(stage, &w, &plugin)?;
        Ok(plugin)
    }

    fn check_init(
        &self,
        stage: &str,
        w: &WasmStageConfig,
        plugin: &Arc<LoadedPlugin>,
    ) -> Result<(), ControlError> {
        let opts = crate::stage::wasm_options(&self.cfg, w);
        let config = if w.config.is_null() {
            "{}".to_string()
        } else {
            w.config.to_string()
        };
        plugin.instantiate(
            &config,
            &opts.limits,
            &opts.grants,
            Arc::new(crate::stage::wasm::LogLabels {
                pipeline: self.name().to_string(),
                stage: stage.to_string(),
                plugin: plugin.id(),
            }),
        )?;
        Ok(())
    }

    /// The plugin a stage runs now (from the live run, else from the store's selection, else
    /// the pipeline file).
    fn current(&self, stage: &str) -> Result<PluginRef, ControlError> {
        if let Some(p) = lock(&self.live)
            .stages
            .iter()
            .find(|s| s.name == stage)
            .and_then(|s| s.plugin.clone())
        {
            return Ok(p);
        }
        if let Some(c) = self.store()?.selection(self.name(), stage)?.current {
            return Ok(c);
        }
        let w = self.wasm_stage(stage)?;
        Ok(self
            .runtime
            .load_file(&self.cfg.resolve(&w.plugin))?
            .plugin_ref())
    }

    /// Hot-swaps a stage to a stored plugin version.
    pub async fn swap(
        &self,
        stage: &str,
        name: &str,
        version: u32,
    ) -> Result<SwapOutcome, ControlError> {
        let plugin = self.load_for_stage(stage, name, version)?;
        let ctl = self.ctl.lock().await;
        let store = self.store()?;
        let before = store.selection(self.name(), stage)?;
        let previous = self.current(stage)?;
        store.select(self.name(), stage, previous.clone(), plugin.plugin_ref())?;
        match self.apply(&ctl, stage, plugin.clone(), "swap").await {
            Ok(out) => Ok(out.unwrap_or_else(|| self.pending(stage, previous, &plugin))),
            Err(e) => {
                store.restore(self.name(), stage, before)?;
                Err(e)
            }
        }
    }

    /// Restores the stage's previous plugin (a stored version or the pipeline file's).
    pub async fn rollback(&self, stage: &str) -> Result<SwapOutcome, ControlError> {
        self.wasm_stage(stage)?;
        let ctl = self.ctl.lock().await;
        self.rollback_locked(&ctl, stage).await
    }

    async fn rollback_locked(
        &self,
        ctl: &Option<mpsc::Sender<Control>>,
        stage: &str,
    ) -> Result<SwapOutcome, ControlError> {
        let store = self.store()?;
        let before = store.selection(self.name(), stage)?;
        let target = before
            .history
            .last()
            .cloned()
            .ok_or_else(|| StoreError::NoHistory {
                pipeline: self.name().to_string(),
                stage: stage.to_string(),
            })?;
        let plugin = self.load(stage, &target)?;
        let previous = self.current(stage)?;
        store.rollback(self.name(), stage)?;
        match self.apply(ctl, stage, plugin.clone(), "rollback").await {
            Ok(out) => Ok(out.unwrap_or_else(|| self.pending(stage, previous, &plugin))),
            Err(e) => {
                store.restore(self.name(), stage, before)?;
                Err(e)
            }
        }
    }

    fn pending(&self, stage: &str, previous: PluginRef, plugin: &LoadedPlugin) -> SwapOutcome {
        SwapOutcome {
            pipeline: self.name().to_string(),
            stage: stage.to_string(),
            previous,
            current: plugin.plugin_ref(),
            applies: "next_start".into(),
            from_offsets: BTreeMap::new(),
        }
    }

    /// Sends a swap to the running worker; `None` when no run is active (the store's
    /// selection then applies at the next start).
    async fn apply(
        &self,
        ctl: &Option<mpsc::Sender<Control>>,
        stage: &str,
        plugin: Arc<LoadedPlugin>,
        kind: &str,
    ) -> Result<Option<SwapOutcome>, ControlError> {
        let Some(tx) = ctl else {
            return Ok(None);
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Control::Swap {
            stage: stage.to_string(),
            plugin: plugin.clone(),
            reply,
        })
        .await
        .map_err(|_| ControlError::Gone("control channel closed".into()))?;
        let applied = rx
            .await
            .map_err(|_| ControlError::Gone("the run ended before the swap".into()))??;
        METRICS
            .swaps
            .with_label_values(&[self.name(), stage, kind])
            .inc();
        Ok(Some(SwapOutcome {
            pipeline: self.name().to_string(),
            stage: stage.to_string(),
            previous: applied.previous,
            current: plugin.plugin_ref(),
            applies: "next_batch".into(),
            from_offsets: applied.from_offsets,
        }))
    }

    async fn running_ctl(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<mpsc::Sender<Control>>>, ControlError> {
        let ctl = self.ctl.lock().await;
        if ctl.is_none() {
            return Err(ControlError::NotRunning(
                self.name().to_string(),
                self.state().as_str(),
            ));
        }
        Ok(ctl)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StageError>>) -> Control,
    ) -> Result<T, ControlError> {
        let ctl = self.running_ctl().await?;
        let (reply, rx) = oneshot::channel();
        let tx = ctl
            .as_ref()
            .ok_or_else(|| ControlError::Gone("no run".into()))?;
        tx.send(make(reply))
            .await
            .map_err(|_| ControlError::Gone("control channel closed".into()))?;
        Ok(rx
            .await
            .map_err(|_| ControlError::Gone("the run ended".into()))??)
    }

    /// Starts running a stored version beside the live plugin of `stage`.
    pub async fn shadow_start(
        &self,
        stage: &str,
        name: &str,
        version: u32,
    ) -> Result<(), ControlError> {
        let plugin = self.load_for_stage(stage, name, version)?;
        let stage = stage.to_string();
        self.ask(|reply| Control::ShadowStart {
            stage,
            plugin,
            reply,
        })
        .await
    }

    pub async fn shadow_report(&self, stage: &str) -> Result<ShadowReport, ControlError> {
        self.wasm_stage(stage)?;
        let s = stage.to_string();
        self.ask(|reply| Control::ShadowReport { stage: s, reply })
            .await?
            .ok_or_else(|| ControlError::NoShadow(stage.to_string()))
    }

    /// Ends a shadow run; with `promote`, swaps the candidate in.
    pub async fn shadow_stop(
        &self,
        stage: &str,
        promote: bool,
    ) -> Result<(ShadowReport, Option<SwapOutcome>), ControlError> {
        self.wasm_stage(stage)?;
        let s = stage.to_string();
        let (report, candidate) = self
            .ask(|reply| Control::ShadowStop { stage: s, reply })
            .await?
            .ok_or_else(|| ControlError::NoShadow(stage.to_string()))?;
        if !promote {
            return Ok((report, None));
        }
        let version = candidate
            .store_version
            .ok_or_else(|| ControlError::NoShadow(stage.to_string()))?;
        let out = self.swap(stage, &candidate.name, version).await?;
        Ok((report, Some(out)))
    }

    /// Names of stored plugin versions in use by shadow runs (they cannot be deleted).
    pub fn shadow_users(&self) -> Vec<(String, PluginRef)> {
        lock(&self.live)
            .stages
            .iter()
            .filter_map(|s| {
                s.shadow
                    .clone()
                    .map(|r| (format!("{}/{} (shadow)", self.name(), s.name), r))
            })
            .collect()
    }

    /// Plugins chosen in the store for this pipeline's stages, loaded.
    fn selected_plugins(&self) -> Result<HashMap<String, Arc<LoadedPlugin>>, ControlError> {
        let mut out = HashMap::new();
        let Some(store) = &self.store else {
            return Ok(out);
        };
        for s in &self.cfg.pipeline.stages {
            if let Some(StageKind::Wasm(_)) = s.kind() {
                if let Some(r) = store.selection(self.name(), &s.name)?.current {
                    if r.version.is_some() {
                        out.insert(s.name.clone(), self.load(&s.name, &r)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Builds the stages as a run would (and drops them): reports a plugin that cannot load or
    /// refuses its config.
    pub fn check_stages(&self) -> Result<(), ControlError> {
        let plugins = self.selected_plugins()?;
        crate::stage::build_with(&self.cfg, &self.runtime, &plugins)?;
        Ok(())
    }

    /// After a breaker trip in `stage`: roll back if its plugin was swapped in recently.
    async fn auto_rollback(&self, stage: &str) -> Option<SwapOutcome> {
        let w = self.wasm_stage(stage).ok()?;
        let window_ms = i64::try_from(w.rollback_on_breaker_s)
            .ok()?
            .saturating_mul(1000);
        let store = self.store.as_ref()?;
        let sel = store.selection(self.name(), stage).ok()?;
        sel.current.as_ref()?;
        if window_ms == 0 || now_ms() - sel.since_ms > window_ms || sel.history.is_empty() {
            return None;
        }
        let ctl = self.ctl.lock().await;
        match self.rollback_locked(&ctl, stage).await {
            Ok(out) => {
                METRICS
                    .swaps
                    .with_label_values(&[self.name(), stage, "auto_rollback"])
                    .inc();
                Some(out)
            }
            Err(e) => {
                tracing::error!(pipeline = %self.name(), stage, "automatic rollback failed: {e}");
                None
            }
        }
    }

    /// Runs the pipeline until `stop` turns true: starts it, stops it on pause, starts it
    /// again on resume, rolls a freshly swapped plugin back when its breaker trips. Returns
    /// an error if the pipeline failed, or if it was paused by a breaker when stopped.
    ///
    /// With `hold_on_failure` (the control plane is on, so someone can resume it), a failed
    /// pipeline (e.g. ClickHouse refusing rows for a schema change) stays in the `failed`
    /// state with its error until resumed or the process stops; otherwise the error ends it.
    pub async fn supervise(
        self: Arc<Self>,
        pipeline: Pipeline,
        mut stop: watch::Receiver<bool>,
        hold_on_failure: bool,
    ) -> Result<(), PipelineError> {
        let mut paused = self.paused.subscribe();
        let mut breaker: Option<StageError> = None;
        let mut failure: Option<PipelineError> = None;
        loop {
            // Wait until the pipeline should run (or the process stops).
            loop {
                if *stop.borrow() {
                    if let Some(e) = failure {
                        return Err(e);
                    }
                    self.set_state(RunState::Stopped, Some("process stopping".into()));
                    return match breaker {
                        Some(e) => Err(PipelineError::Stage(e)),
                        None => Ok(()),
                    };
                }
                if !*paused.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = paused.changed() => {}
                }
            }
            breaker = None;
            failure = None;
            self.set_state(RunState::Starting, None);
            let (ctl_tx, ctl_rx) = mpsc::channel(8);
            let stages = {
                let mut ctl = self.ctl.lock().await;
                let built =
                    self.selected_plugins()
                        .map_err(|e| e.to_string())
                        .and_then(|plugins| {
                            crate::stage::build_with(&self.cfg, &self.runtime, &plugins)
                                .map_err(|e| e.to_string())
                        });
                match built {
                    Ok(s) => {
                        *ctl = Some(ctl_tx);
                        s
                    }
                    Err(e) => {
                        tracing::error!(pipeline = %self.name(), "cannot build stages: {e}");
                        lock(&self.inner).last_error = Some(e.clone());
                        self.paused.send_replace(true);
                        self.set_state(RunState::Failed, Some(format!("cannot build stages: {e}")));
                        continue;
                    }
                }
            };
            self.set_state(RunState::Running, None);
            let mut stop2 = stop.clone();
            let mut paused2 = self.paused.subscribe();
            let until = async move {
                tokio::select! {
                    _ = stop2.wait_for(|s| *s) => {}
                    _ = paused2.wait_for(|p| *p) => {}
                }
            };
            let result = pipeline.run(stages, ctl_rx, until).await;
            *self.ctl.lock().await = None;
            lock(&self.live).stages.clear();
            match result {
                Ok(()) => {
                    if !*stop.borrow() {
                        tracing::info!(pipeline = %self.name(), "pipeline paused over the API");
                        self.set_state(RunState::Paused, Some("paused over the API".into()));
                    }
                }
                Err(PipelineError::Rejoin(why)) => {
                    tracing::warn!(pipeline = %self.name(), "{why}: restarting the run");
                    lock(&self.inner).last_error = Some(why);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(PipelineError::Stage(e)) if e.breaker_open => {
                    lock(&self.inner).last_error = Some(e.to_string());
                    if let Some(out) = self.auto_rollback(&e.stage).await {
                        tracing::warn!(pipeline = %self.name(), stage = %e.stage,
                            "circuit breaker tripped shortly after a swap: rolled back from {} to {}; restarting", out.previous, out.current);
                        continue;
                    }
                    tracing::error!(pipeline = %self.name(), "pipeline PAUSED: {e}");
                    eprintln!("sluice: pipeline {} paused: {e}", self.name());
                    self.paused.send_replace(true);
                    self.set_state(RunState::Paused, Some(e.to_string()));
                    breaker = Some(e);
                }
                Err(e) => {
                    lock(&self.inner).last_error = Some(e.to_string());
                    self.set_state(RunState::Failed, Some(e.to_string()));
                    if !hold_on_failure {
                        return Err(e);
                    }
                    tracing::error!(pipeline = %self.name(), "pipeline FAILED (resume it over the API once fixed): {e}");
                    self.paused.send_replace(true);
                    failure = Some(e);
                }
            }
        }
    }
}
