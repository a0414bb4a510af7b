//! The cost of running the enrich transform as a WebAssembly component, against the same Rust
//! code compiled natively, both behind the engine's `Stage` interface and fed the same batches;
//! plus plugin compile, load and instantiation times.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use sluice::config::{PluginLimits, WasiGrants};
use sluice::record::{DeadLetter, Header, Origin, Record};
use sluice::stage::wasm::{LogLabels, PluginRuntime, WasmStage};
use sluice::stage::{BatchContext, PartitionKey, Stage, StageError, StageOutput};
use sluice::state::{StateStore, StateTxn};
use sluice_guest::Transform;
use sluice_plugin_enrich::Enrich;

use super::events::BenchEvent;

const CONFIG: &str = r#"{"version":"v1"}"#;

/// The enrich plugin's Rust code called directly: the same work a built-in stage would do
/// (copy the record in, transform, copy the row out), without the sandbox.
pub struct NativeEnrich {
    plugin: Enrich,
}

impl NativeEnrich {
    pub fn new() -> Result<Self> {
        let plugin = sluice_guest::testing::init::<Enrich>(CONFIG)
            .map_err(|e| anyhow::anyhow!("enrich init: {e}"))?;
        Ok(Self { plugin })
    }
}

impl Stage for NativeEnrich {
    fn name(&self) -> &str {
        "enrich-native"
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        _ctx: &BatchContext,
        _state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        let mut out = StageOutput::default();
        out.records.reserve(batch.len());
        for r in &batch {
            let input = sluice_guest::Record {
                key: r.key.as_ref().map(|k| k.to_vec()),
                value: r.value.to_vec(),
                headers: r
                    .headers
                    .iter()
                    .map(|h| sluice_guest::Header {
                        key: h.key.clone(),
                        value: h.value.to_vec(),
                    })
                    .collect(),
                source: sluice_guest::Source {
                    topic: r.origin.topic.to_string(),
                    partition: r.origin.partition,
                    offset: r.origin.offset,
                    timestamp_ms: r.origin.timestamp_ms,
                },
            };
            let dead = |kind: &str, message: String| DeadLetter {
                origin: r.origin.clone(),
                stage: "enrich-native".into(),
                plugin: None,
                kind: kind.into(),
                message,
            };
            match self.plugin.transform(&input) {
                Ok(output) => {
                    for row in output.rows() {
                        match row.value() {
                            Ok(v) => out.records.push(Record {
                                origin: r.origin.clone(),
                                key: None,
                                value: Bytes::copy_from_slice(v),
                                headers: Vec::new(),
                                table: row.table().map(str::to_owned),
                            }),
                            Err(m) => out.dead_letters.push(dead("other", m.to_owned())),
                        }
                    }
                }
                Err(e) => out.dead_letters.push(dead(e.kind.as_str(), e.message)),
            }
        }
        Ok(out)
    }
}

/// Host records as the Kafka source would hand them to the first stage.
pub fn records(events: &[BenchEvent]) -> Vec<Record> {
    let topic: Arc<str> = Arc::from("bench");
    (0_i64..)
        .zip(events)
        .map(|(offset, e)| {
            Record::from_origin(Arc::new(Origin {
                topic: topic.clone(),
                partition: 0,
                offset,
                timestamp_ms: Some(e.ts_ms),
                key: Some(Bytes::from(e.key.clone())),
                value: Bytes::from(e.value.clone()),
                headers: Vec::<Header>::new(),
            }))
        })
        .collect()
}

/// A throwaway state store: the stage interface takes a state transaction, which neither
/// enrich stage uses.
pub fn scratch_state() -> Result<(tempfile::TempDir, StateStore)> {
    let dir = tempfile::tempdir()?;
    let store = StateStore::open(dir.path())?;
    Ok((dir, store))
}

pub fn ctx(first: i64, last: i64) -> BatchContext {
    BatchContext {
        pipeline: "bench".into(),
        partition: PartitionKey {
            topic: "bench".into(),
            partition: 0,
        },
        first_offset: first,
        last_offset: last,
    }
}

/// CPU seconds of the calling thread for one pass of `stage` over `records` in batches of
/// `batch` (the stages run on the calling thread).
fn pass(
    stage: &mut dyn Stage,
    records: &[Record],
    batch: usize,
    state: &mut StateTxn<'_>,
) -> Result<f64> {
    let batches: Vec<Vec<Record>> = records.chunks(batch).map(<[Record]>::to_vec).collect();
    let mut rows = 0usize;
    let t0 = Instant::now();
    let cpu0 = super::procfs::thread_cpu_ns();
    for b in batches {
        let (first, last) = (b[0].origin.offset, b[b.len() - 1].origin.offset);
        let out = stage.process(b, &ctx(first, last), state)?;
        rows += out.records.len();
    }
    // The thread's CPU time where the kernel reports it (robust to other load on the machine),
    // else wall time.
    let secs = match (cpu0, super::procfs::thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => t0.elapsed().as_secs_f64(),
    };
    if rows != records.len() {
        bail!(
            "{}: {rows} rows from {} records",
            stage.name(),
            records.len()
        );
    }
    Ok(secs)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WasmCost {
    /// The plugin's language (`rust`: the same code as the native transform).
    pub lang: String,
    pub batch: usize,
    pub records: usize,
    pub native_us_per_record: f64,
    pub wasm_us_per_record: f64,
    /// The plugin's own code built natively (C: `plugins/c-enrich/build-native.sh`), same
    /// records and batches (see [`c_native`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_native_us_per_record: Option<f64>,
}

impl WasmCost {
    pub fn ratio(&self) -> f64 {
        self.wasm_us_per_record / self.native_us_per_record.max(1e-12)
    }
}

pub fn wasm_stage(plugin_path: &Path, cache_dir: &Path) -> Result<WasmStage> {
    let runtime = PluginRuntime::new(Some(cache_dir.to_path_buf()))?;
    let plugin = runtime.load_file(plugin_path)?;
    Ok(WasmStage::new(
        "bench",
        "enrich",
        plugin,
        &serde_json::json!({"version": "v1"}),
        PluginLimits::default(),
    )?)
}

/// Native vs WASM on the same records, for each batch size (see [`measure_lang`]).
pub fn measure(
    plugin_path: &Path,
    cache_dir: &Path,
    events: &[BenchEvent],
    batches: &[usize],
    reps: usize,
) -> Result<Vec<WasmCost>> {
    measure_lang("rust", plugin_path, cache_dir, events, batches, reps)
}

/// The enrich plugin of language `lang` (any component that answers like the Rust one: the
/// conformance suite checks every language gives the same rows) against the native Rust
/// transform, on the same records, for each batch size: rows compared first, then the best
/// of `reps` interleaved passes after a warm-up pass (so background noise hits both alike).
pub fn measure_lang(
    lang: &str,
    plugin_path: &Path,
    cache_dir: &Path,
    events: &[BenchEvent],
    batches: &[usize],
    reps: usize,
) -> Result<Vec<WasmCost>> {
    let recs = records(events);
    let (_dir, store) = scratch_state()?;
    let mut st = store.txn();
    let mut native = NativeEnrich::new()?;
    let mut wasm = wasm_stage(plugin_path, cache_dir).with_context(|| format!("{lang} plugin"))?;
    check_same_output(
        &mut native,
        &mut wasm,
        &recs[..recs.len().min(2000)],
        &mut st,
    )
    .with_context(|| format!("{lang} plugin"))?;
    let mut out = Vec::new();
    for &batch in batches {
        pass(&mut native, &recs, batch, &mut st)?;
        pass(&mut wasm, &recs, batch, &mut st)?;
        let (mut best_n, mut best_w) = (f64::MAX, f64::MAX);
        for _ in 0..reps.max(1) {
            best_n = best_n.min(pass(&mut native, &recs, batch, &mut st)?);
            best_w = best_w.min(pass(&mut wasm, &recs, batch, &mut st)?);
        }
        let n = recs.len().max(1) as f64;
        out.push(WasmCost {
            lang: lang.to_string(),
            batch,
            records: recs.len(),
            native_us_per_record: best_n * 1e6 / n,
            wasm_us_per_record: best_w * 1e6 / n,
            own_native_us_per_record: None,
        });
    }
    Ok(out)
}

/// What the native C harness prints.
#[derive(serde::Deserialize)]
struct HarnessRun {
    records: usize,
    rows: usize,
    errors: usize,
    us_per_record: f64,
}

/// The C plugin built for this machine (`harness`: `plugins/c-enrich/target/native-bench`,
/// which calls the plugin's export as the host does) on the same records in batches of
/// `batch`: µs per record of the calling thread's CPU, best of `reps` passes after a warm-up.
/// Its rows must equal the native Rust transform's. `work`: a dir for the records file.
pub fn c_native(
    harness: &Path,
    events: &[BenchEvent],
    batch: usize,
    reps: usize,
    work: &Path,
) -> Result<f64> {
    let input = work.join("c-native-records.tsv");
    let rows_path = work.join("c-native-rows.jsonl");
    let mut text = String::new();
    for (offset, e) in events.iter().enumerate() {
        let value = std::str::from_utf8(&e.value).context("event value is not UTF-8")?;
        if e.key.contains(['\t', '\n']) || value.contains(['\t', '\n']) {
            bail!("event {offset}: a tab or newline in its key or value (compact JSON has none)");
        }
        text.push_str(&format!("{offset}\t{}\t{}\t{value}\n", e.ts_ms, e.key));
    }
    std::fs::write(&input, text)?;
    let out = std::process::Command::new(harness)
        .arg(&input)
        .arg(batch.to_string())
        .arg(reps.to_string())
        .arg(&rows_path)
        .output()
        .with_context(|| format!("run {}", harness.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            harness.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run: HarnessRun = serde_json::from_slice(&out.stdout).context("the harness's output")?;
    if run.records != events.len() || run.rows != events.len() || run.errors != 0 {
        bail!(
            "native C: {} rows and {} errors for {} records ({} read)",
            run.rows,
            run.errors,
            events.len(),
            run.records
        );
    }
    // The same rows as the native Rust transform (as the WASM builds are checked).
    let rows = std::fs::read_to_string(&rows_path)?;
    let recs = records(events);
    let k = recs.len().min(2000);
    let (_dir, store) = scratch_state()?;
    let expected = NativeEnrich::new()?.process(
        recs[..k].to_vec(),
        &ctx(0, k as i64 - 1),
        &mut store.txn(),
    )?;
    for (i, (line, want)) in rows.lines().zip(&expected.records).enumerate() {
        let got: serde_json::Value = serde_json::from_str(line)?;
        let want: serde_json::Value = serde_json::from_slice(&want.value)?;
        if got != want {
            bail!("native C row {i} differs from the Rust transform's:\n{got}\n{want}");
        }
    }
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&rows_path);
    Ok(run.us_per_record)
}

/// Both stages must produce the same rows, or the comparison is meaningless.
fn check_same_output(
    native: &mut dyn Stage,
    wasm: &mut dyn Stage,
    recs: &[Record],
    state: &mut StateTxn<'_>,
) -> Result<()> {
    let c = ctx(0, recs.len() as i64 - 1);
    let a = native.process(recs.to_vec(), &c, state)?;
    let b = wasm.process(recs.to_vec(), &c, state)?;
    if a.records.len() != b.records.len()
        || !a.dead_letters.is_empty()
        || !b.dead_letters.is_empty()
    {
        bail!(
            "native and WASM disagree: {} / {} rows, {} / {} dead letters",
            a.records.len(),
            b.records.len(),
            a.dead_letters.len(),
            b.dead_letters.len()
        );
    }
    for (x, y) in a.records.iter().zip(&b.records) {
        let vx: serde_json::Value = serde_json::from_slice(&x.value)?;
        let vy: serde_json::Value = serde_json::from_slice(&y.value)?;
        if vx != vy {
            bail!("native and WASM rows differ:\n{vx}\n{vy}");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginTimes {
    pub wasm_bytes: u64,
    /// Compiling the component (Cranelift), no cache: median of 3.
    pub compile_ms: f64,
    /// Loading the precompiled artifact from the cache dir (read, checksum, deserialize,
    /// type-check against the world), fresh runtime each time: median of 5.
    pub load_cached_ms: f64,
    /// A new sandboxed instance with `init(config)` called: median and max of 50.
    pub instantiate_median_us: f64,
    pub instantiate_max_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn plugin_times(plugin_path: &Path, cache_dir: &Path) -> Result<PluginTimes> {
    let wasm_bytes = std::fs::metadata(plugin_path)
        .with_context(|| format!("{}", plugin_path.display()))?
        .len();
    let mut compile = Vec::new();
    for _ in 0..3 {
        let rt = PluginRuntime::new(None)?;
        let t0 = Instant::now();
        rt.load_file(plugin_path)?;
        compile.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    if cache_dir.exists() {
        std::fs::remove_dir_all(cache_dir)?;
    }
    // Fills the cache.
    PluginRuntime::new(Some(cache_dir.to_path_buf()))?.load_file(plugin_path)?;
    let mut load = Vec::new();
    let mut plugin = None;
    for _ in 0..5 {
        let rt = PluginRuntime::new(Some(cache_dir.to_path_buf()))?;
        let t0 = Instant::now();
        let p = rt.load_file(plugin_path)?;
        load.push(t0.elapsed().as_secs_f64() * 1e3);
        plugin = Some((rt, p));
    }
    let Some((_rt, plugin)) = plugin else {
        bail!("no plugin loaded");
    };
    let labels = Arc::new(LogLabels {
        pipeline: "bench".into(),
        stage: "enrich".into(),
        plugin: plugin.id(),
    });
    let mut inst = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let i = plugin.instantiate(
            CONFIG,
            &PluginLimits::default(),
            &WasiGrants::default(),
            labels.clone(),
        )?;
        inst.push(t0.elapsed().as_secs_f64() * 1e6);
        drop(i);
    }
    let max = inst.iter().copied().fold(0.0, f64::max);
    Ok(PluginTimes {
        wasm_bytes,
        compile_ms: median(compile),
        load_cached_ms: median(load),
        instantiate_median_us: median(inst),
        instantiate_max_us: max,
    })
}
