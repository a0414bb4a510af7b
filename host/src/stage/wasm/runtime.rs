//! The WebAssembly runtime: one engine per process, components compiled once (precompiled
//! artifacts cached on disk), type-checked into an `InstancePre` before any use, instances
//! sandboxed by an epoch deadline and a memory limit.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, BatchResult, InputRecord, InputRecordRef, Plugin, PluginPre};
use crate::config::{PluginLimits, WasiGrants};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Log lines one plugin call may emit before the rest are dropped (a plugin must not flood the
/// host's log); the number dropped is logged once per call.
const MAX_LOG_LINES_PER_CALL: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name}: not a valid WebAssembly component: {message}")]
    Compile { name: String, message: String },
    #[error(
        "plugin {name}: does not match the sluice:plugin/plugin world (wit/plugin.wit): {message}"
    )]
    WorldMismatch { name: String, message: String },
    #[error("plugin {name}: init refused the config: {message}")]
    Init { name: String, message: String },
    #[error("plugin {name}: trapped: {message}")]
    Trap { name: String, message: String },
    #[error("plugin {name}: exceeded its time limit of {timeout_ms} ms")]
    Timeout { name: String, timeout_ms: u64 },
    #[error("plugin {name}: exceeded its memory limit of {limit_mb} MiB")]
    MemoryLimit { name: String, limit_mb: u64 },
    #[error("plugin {name}: produced {bytes} bytes of output for one call, over its limit of {limit_mb} MiB")]
    OutputLimit {
        name: String,
        bytes: usize,
        limit_mb: u64,
    },
    #[error("plugin {name}: cannot grant WASI capability: {message}")]
    Grant { name: String, message: String },
    #[error("plugin cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("wasm engine: {0}")]
    Engine(String),
}

impl PluginError {
    /// Short reason used in dead-letter headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Timeout { .. } => "timeout",
            PluginError::MemoryLimit { .. } => "memory",
            PluginError::OutputLimit { .. } => "output_limit",
            PluginError::Trap { .. } => "trap",
            PluginError::Init { .. } => "init",
            _ => "plugin",
        }
    }
}

/// Per-store state: an empty WASI context (no files, sockets or environment are granted) and
/// the limits of this instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    log_labels: Arc<LogLabels>,
    log_lines: u32,
}

/// Who is logging, attached to every line a plugin writes.
#[derive(Debug, Clone)]
pub struct LogLabels {
    pub pipeline: String,
    pub stage: String,
    pub plugin: String,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The `types` interface has no functions; the bindings still want it implemented.
impl bindings::sluice::plugin::types::Host for HostState {}

impl bindings::sluice::plugin::log::Host for HostState {
    fn log(&mut self, level: bindings::Level, message: String, fields: Vec<bindings::Field>) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let l = &self.log_labels;
        let fields: Vec<String> = fields
            .iter()
            .map(|f| format!("{}={}", f.key, f.value))
            .collect();
        let fields = fields.join(" ");
        match level {
            bindings::Level::Trace => {
                tracing::trace!(target: "sluice::plugin", pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, %fields, "{message}")
            }
            bindings::Level::Debug => {
                tracing::debug!(target: "sluice::plugin", pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, %fields, "{message}")
            }
            bindings::Level::Info => {
                tracing::info!(target: "sluice::plugin", pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, %fields, "{message}")
            }
            bindings::Level::Warn => {
                tracing::warn!(target: "sluice::plugin", pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, %fields, "{message}")
            }
            bindings::Level::Error => {
                tracing::error!(target: "sluice::plugin", pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, %fields, "{message}")
            }
        }
    }
}

/// Refuses linear-memory growth past the limit and remembers that it did, so the resulting trap
/// is reported as a memory-limit error rather than an opaque crash.
struct MemoryLimiter {
    max_bytes: usize,
    max_instances: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_instances
    }

    fn memories(&self) -> usize {
        self.max_instances
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] for as long as the engine lives: the thread
/// holds only a weak reference and ends when the last plugin, instance and runtime using the
/// engine are gone (stopping it earlier would leave running plugins without a deadline).
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("sluice-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        });
    if let Err(e) = spawned {
        // Without the ticker deadlines never fire; say so loudly rather than hang later.
        tracing::error!(
            "cannot start the epoch ticker thread: {e}; plugin time limits are not enforced"
        );
    }
}

/// One per process: the engine, the linker with the host's imports, the artifact cache.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
}

impl PluginRuntime {
    /// `cache_dir`: where precompiled artifacts are kept (`None`: compile in memory every time).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // `SLUICE_WASM_PROFILE=perfmap`: write /tmp/perf-<pid>.map so that `perf report` names
        // the plugins' functions instead of showing `[JIT]` (docs/benchmarks.md).
        if std::env::var("SLUICE_WASM_PROFILE").as_deref() == Ok("perfmap") {
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&cfg).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        start_epoch_ticker(&engine);
        Ok(Self {
            engine,
            linker,
            cache_dir,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads a component file (binary or WAT text); its name is the file stem.
    pub fn load_file(&self, path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        self.load_bytes(&name, &bytes)
    }

    /// Compiles (or loads the cached artifact of) a component and type-checks it against the world.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.load_stored(name, None, bytes)
    }

    /// Like [`PluginRuntime::load_bytes`] for a version of the plugin store: dead-letter
    /// headers and status then say `name@v<version>`.
    pub fn load_stored(
        &self,
        name: &str,
        store_version: Option<u32>,
        bytes: &[u8],
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let component = self.component(name, &digest, bytes)?;
        let mismatch = |e: wasmtime::Error| PluginError::WorldMismatch {
            name: name.to_string(),
            message: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(mismatch)?;
        let pre = PluginPre::new(instance_pre).map_err(mismatch)?;
        Ok(Arc::new(LoadedPlugin {
            name: name.to_string(),
            version: match store_version {
                Some(v) => format!("v{v}"),
                None => digest[..12].to_string(),
            },
            store_version,
            digest,
            pre,
        }))
    }

    fn component(&self, name: &str, digest: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        let compile = || {
            Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
                name: name.to_string(),
                message: compile_hint(bytes, &e),
            })
        };
        let Some(dir) = &self.cache_dir else {
            return compile();
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let artifact = dir.join(format!("{digest}-{:016x}.cwasm", h.finish()));
        let sidecar = artifact.with_extension("cwasm.sha256");
        if let Some(c) = self.load_artifact(&artifact, &sidecar) {
            return Ok(c);
        }
        let component = compile()?;
        let cache_err = |message: String| PluginError::Cache {
            path: artifact.clone(),
            message,
        };
        let serialized = component
            .serialize()
            .map_err(|e| cache_err(format!("{e:#}")))?;
        std::fs::create_dir_all(dir).map_err(|e| cache_err(e.to_string()))?;
        // Several loaders (pipelines of one process, processes sharing the dir) may compile
        // the same component at once: each writes its own temporary files, and both files
        // appear by rename, the checksum first, so a reader never sees a partial file. The
        // artifacts they race to place are identical (compilation is deterministic); if they
        // were not, the checksum check sends a reader back to compiling.
        static WRITER: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "{}-{}.tmp",
            std::process::id(),
            WRITER.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = artifact.with_extension(format!("cwasm.{unique}"));
        let sidecar_tmp = artifact.with_extension(format!("cwasm.sha256.{unique}"));
        let placed = std::fs::write(&tmp, &serialized)
            .and_then(|()| std::fs::write(&sidecar_tmp, hex::encode(Sha256::digest(&serialized))))
            .and_then(|()| std::fs::rename(&sidecar_tmp, &sidecar))
            .and_then(|()| std::fs::rename(&tmp, &artifact));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&sidecar_tmp);
            return Err(cache_err(e.to_string()));
        }
        Ok(component)
    }

    /// A cached artifact is native code: load it only if its checksum matches the one written
    /// next to it when it was produced, so a truncated or altered file is recompiled instead.
    fn load_artifact(&self, artifact: &Path, sidecar: &Path) -> Option<Component> {
        let data = std::fs::read(artifact).ok()?;
        let expected = std::fs::read_to_string(sidecar).ok()?;
        if hex::encode(Sha256::digest(&data)) != expected.trim() {
            tracing::warn!(path = %artifact.display(), "cached plugin artifact failed its checksum; recompiling");
            return None;
        }
        // SAFETY: the bytes were produced by `Component::serialize` of an engine with the same
        // compatibility hash (part of the file name) and verified against the checksum written
        // alongside; wasmtime additionally checks the artifact header.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, &data) };
        component
            .map_err(|e| tracing::warn!(path = %artifact.display(), "cannot load cached artifact: {e:#}"))
            .ok()
    }
}

fn compile_hint(bytes: &[u8], e: &wasmtime::Error) -> String {
    // Core modules start with version 1; components with the component-model layer marker.
    let core_header = bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0];
    // WAT text has no header; wasmtime's message says the same thing.
    let core_text = format!("{e:#}").contains("wasm module with a component parser");
    if core_header || core_text {
        return format!(
            "{e:#} (this is a core WebAssembly module, not a component: build for wasm32-wasip2 or wrap it with `wasm-tools component new`)"
        );
    }
    format!("{e:#}")
}

/// A component compiled and type-checked against the plugin world, ready to instantiate.
pub struct LoadedPlugin {
    pub name: String,
    /// `v<n>` for a plugin-store version, else the first 12 hex digits of the sha256.
    pub version: String,
    /// The plugin-store version it was loaded from (none: a file of the pipeline config).
    pub store_version: Option<u32>,
    pub digest: String,
    pre: PluginPre<HostState>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl LoadedPlugin {
    /// `name@version`, as written in dead-letter headers.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn plugin_ref(&self) -> crate::plugin_store::PluginRef {
        crate::plugin_store::PluginRef {
            name: self.name.clone(),
            version: self.store_version,
            sha256: self.digest.clone(),
        }
    }

    /// The WASI context: empty (no preopened directories, no environment, no network) except
    /// for what `grants` lists. Directory paths must already be resolved.
    fn wasi_ctx(&self, grants: &WasiGrants) -> Result<WasiCtx, PluginError> {
        let mut b = WasiCtx::builder();
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in &grants.env {
            b.env(k, v);
        }
        for d in &grants.dirs {
            let perms = if d.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            b.preopened_dir(&d.host, &d.guest, perms)
                .map_err(|e| PluginError::Grant {
                    name: self.id(),
                    message: format!("directory {}: {e:#}", d.host.display()),
                })?;
        }
        if grants.stderr {
            b.inherit_stderr();
        }
        Ok(b.build())
    }

    /// A fresh sandboxed instance with `init(config)` already called.
    pub fn instantiate(
        &self,
        config_json: &str,
        limits: &PluginLimits,
        grants: &WasiGrants,
        labels: Arc<LogLabels>,
    ) -> Result<PluginInstance, PluginError> {
        let engine = self.pre.engine();
        let state = HostState {
            wasi: self.wasi_ctx(grants)?,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(limits.memory_mb.saturating_mul(1024 * 1024))
                    .unwrap_or(usize::MAX),
                max_instances: limits.max_instances,
                exceeded: false,
            },
            log_labels: labels,
            log_lines: 0,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        let mut instance = PluginInstance {
            name: self.id(),
            timeout_ms: limits.timeout_ms,
            memory_mb: limits.memory_mb,
            max_output_mb: limits.max_output_mb,
            bindings: None,
            store,
        };
        instance.arm_deadline();
        let bindings = self
            .pre
            .instantiate(&mut instance.store)
            .map_err(|e| instance.classify(e))?;
        instance.arm_deadline();
        let init = bindings
            .sluice_plugin_transform()
            .call_init(&mut instance.store, config_json)
            .map_err(|e| instance.classify(e))?;
        init.map_err(|message| PluginError::Init {
            name: self.id(),
            message,
        })?;
        instance.bindings = Some(bindings);
        Ok(instance)
    }
}

/// A live plugin instance, reused across batches until it traps.
pub struct PluginInstance {
    name: String,
    timeout_ms: u64,
    memory_mb: u64,
    max_output_mb: u64,
    bindings: Option<Plugin>,
    store: Store<HostState>,
}

impl PluginInstance {
    fn arm_deadline(&mut self) {
        let ticks = self
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis().max(1) as u64);
        self.store.set_epoch_deadline(ticks.max(1));
        self.store.epoch_deadline_trap();
        self.store.data_mut().log_lines = 0;
    }

    /// Runs `process` on one batch of owned records (see [`PluginInstance::process_refs`]).
    pub fn process(&mut self, batch: &[InputRecord]) -> Result<BatchResult, PluginError> {
        InputRecord::with_refs(batch, |refs| self.process_refs(refs))
    }

    /// Runs `process` on one batch, lowered straight from the borrowed records into the guest.
    /// Any error means the instance must be discarded.
    pub fn process_refs(
        &mut self,
        batch: &[InputRecordRef<'_>],
    ) -> Result<BatchResult, PluginError> {
        self.arm_deadline();
        let Some(bindings) = &self.bindings else {
            return Err(PluginError::Engine(
                "instance used after init failed".into(),
            ));
        };
        let result = bindings
            .sluice_plugin_transform()
            .call_process(&mut self.store, batch);
        let dropped = self
            .store
            .data()
            .log_lines
            .saturating_sub(MAX_LOG_LINES_PER_CALL);
        if dropped > 0 {
            let l = &self.store.data().log_labels;
            tracing::warn!(pipeline = %l.pipeline, stage = %l.stage, plugin = %l.plugin, "dropped {dropped} log lines from one plugin call");
        }
        let result = result.map_err(|e| self.classify(e))?;
        let bytes: usize = result
            .outputs
            .iter()
            .map(|o| {
                o.value.len()
                    + o.key.as_ref().map_or(0, Vec::len)
                    + o.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.len())
                        .sum::<usize>()
            })
            .sum();
        let limit =
            usize::try_from(self.max_output_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
        if bytes > limit {
            return Err(PluginError::OutputLimit {
                name: self.name.clone(),
                bytes,
                limit_mb: self.max_output_mb,
            });
        }
        Ok(result)
    }

    fn classify(&self, e: wasmtime::Error) -> PluginError {
        if self.store.data().limiter.exceeded {
            return PluginError::MemoryLimit {
                name: self.name.clone(),
                limit_mb: self.memory_mb,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::Timeout {
                name: self.name.clone(),
                timeout_ms: self.timeout_ms,
            };
        }
        PluginError::Trap {
            name: self.name.clone(),
            message: format!("{e:#}"),
        }
    }
}
