//! Helpers for the fault suite (`tests/tests/fault_suite.rs`): services a test owns and can stop
//! and restart, a paced background producer, RSS sampling, row-by-row comparison and the
//! results table.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::services::{kafka_config, repo_root, TestRecord};

/// `SLUICE_SOAK=1`: more runs and larger workloads (on demand, not in CI).
pub fn soak() -> bool {
    std::env::var("SLUICE_SOAK").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The random seed of a run: `SLUICE_FAULT_SEED` to repeat one, otherwise a fresh one (tests
/// print it).
pub fn seed() -> u64 {
    if let Some(s) = std::env::var("SLUICE_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return s;
    }
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Services a test owns
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// chdb-core's ClickHouse server (`scripts/services/clickhouse.sh`).
    ClickHouse,
    /// noida-db (`scripts/services/kafka.sh`), which keeps its log in its data dir across
    /// restarts.
    Noida,
}

/// A local service on its own port and data dir that the test stops and starts again with the
/// same port and data. Unlike the shared instances of [`crate::services`], it is never removed
/// behind the test's back: the watchdog (`--parent-pid`) only stops it if this process dies, and
/// the data dir is deleted on drop.
pub struct OwnService {
    kind: ServiceKind,
    port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

impl OwnService {
    /// Starts a fresh instance on a free port. Blocking (up to a minute).
    pub fn start_new(kind: ServiceKind) -> Result<Self> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .context("finding a free port")?
                .local_addr()?
                .port();
            let mut s = Self {
                kind,
                port,
                dir: tempfile::Builder::new()
                    .prefix("sluice-fault-svc-")
                    .tempdir()?,
                running: false,
            };
            let (code, out) = s.script("start")?;
            if code == Some(0) {
                s.running = true;
                return Ok(s);
            }
            last = out;
            // 3: the port was taken between the probe and the bind (see lib.sh).
            if code != Some(3) {
                break;
            }
        }
        bail!("starting {kind:?} failed:\n{last}")
    }

    /// ClickHouse: its HTTP URL; noida: its bootstrap address.
    pub fn addr(&self) -> String {
        match self.kind {
            ServiceKind::ClickHouse => format!("http://127.0.0.1:{}", self.port),
            ServiceKind::Noida => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Graceful stop (SIGTERM, SIGKILL after 15 s), data kept. Blocking.
    pub fn stop(&mut self) -> Result<()> {
        let (code, out) = self.script("stop")?;
        if code != Some(0) {
            bail!("stopping {:?} failed:\n{out}", self.kind);
        }
        self.running = false;
        Ok(())
    }

    /// Starts it again on the same port with the same data. Blocking.
    pub fn start(&mut self) -> Result<()> {
        let (code, out) = self.script("start")?;
        if code != Some(0) {
            bail!("restarting {:?} failed:\n{out}", self.kind);
        }
        self.running = true;
        Ok(())
    }

    /// The service's own log (server.log / broker.log), for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let name = match self.kind {
            ServiceKind::ClickHouse => "server.log",
            ServiceKind::Noida => "broker.log",
        };
        tail(&self.dir.path().join(name), lines)
    }

    fn script(&self, cmd: &str) -> Result<(Option<i32>, String)> {
        let (script, env): (&str, Vec<(&str, String)>) = match self.kind {
            ServiceKind::ClickHouse => (
                "clickhouse.sh",
                vec![
                    ("SLUICE_CH_PORT", self.port.to_string()),
                    ("SLUICE_CH_DATA", self.dir.path().display().to_string()),
                ],
            ),
            ServiceKind::Noida => (
                "kafka.sh",
                vec![
                    ("SLUICE_KAFKA_BROKER", "noida".to_string()),
                    ("SLUICE_KAFKA_PORT", self.port.to_string()),
                    ("SLUICE_KAFKA_DATA", self.dir.path().display().to_string()),
                ],
            ),
        };
        let path = repo_root().join("scripts/services").join(script);
        let mut c = Command::new("bash");
        c.arg(&path).arg(cmd).envs(env);
        if cmd == "start" {
            c.args(["--parent-pid", &std::process::id().to_string()]);
        }
        let out = c
            .output()
            .with_context(|| format!("running {} {cmd}", path.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.code(), text))
    }
}

impl Drop for OwnService {
    fn drop(&mut self) {
        if self.running {
            let _ = self.script("stop");
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!("--- {} ---\n{}", path.display(), all[start..].join("\n"))
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Produces records in the background at a steady pace until they run out or [`finish`] is
/// called. Its producer waits out broker outages (5 min message timeout), so a restarted
/// broker does not fail the load.
///
/// [`finish`]: LoadGen::finish
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Result<u64>>,
}

impl LoadGen {
    pub fn start(
        brokers: &str,
        topic: &str,
        records: Vec<TestRecord>,
        per_second: u64,
    ) -> Result<Self> {
        let producer: FutureProducer = kafka_config(brokers)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .context("creating the load producer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let topic = topic.to_string();
        let (stop2, sent2, paused2) = (stop.clone(), sent.clone(), paused.clone());
        let handle = tokio::spawn(async move {
            const TICK: Duration = Duration::from_millis(50);
            let per_tick = (per_second * TICK.as_millis() as u64 / 1000).max(1) as usize;
            let mut pending = Vec::with_capacity(records.len());
            let mut tick = tokio::time::interval(TICK);
            let mut it = records.into_iter();
            'outer: while !stop2.load(Ordering::Relaxed) {
                tick.tick().await;
                if paused2.load(Ordering::Relaxed) {
                    continue;
                }
                for _ in 0..per_tick {
                    let Some(rec) = it.next() else { break 'outer };
                    let mut headers = OwnedHeaders::new();
                    for (k, v) in &rec.headers {
                        headers = headers.insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                    let mut fr: FutureRecord<'_, Vec<u8>, Vec<u8>> =
                        FutureRecord::to(&topic).headers(headers);
                    if let Some(k) = &rec.key {
                        fr = fr.key(k);
                    }
                    if let Some(p) = &rec.payload {
                        fr = fr.payload(p);
                    }
                    if let Some(p) = rec.partition {
                        fr = fr.partition(p);
                    }
                    loop {
                        match producer.send_result(fr) {
                            Ok(d) => {
                                pending.push(d);
                                break;
                            }
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                b,
                            )) => {
                                fr = b;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err((e, _)) => return Err(e).context(format!("producing to {topic}")),
                        }
                    }
                    sent2.fetch_add(1, Ordering::Relaxed);
                }
            }
            let mut acked = 0u64;
            for d in pending {
                match d.await.context("producer dropped a delivery report")? {
                    Ok(_) => acked += 1,
                    Err((e, _)) => return Err(e).context(format!("delivery to {topic} failed")),
                }
            }
            Ok(acked)
        });
        Ok(Self {
            stop,
            paused,
            sent,
            handle,
        })
    }

    /// Stops handing new records to the producer until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Records handed to the producer so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops producing, waits for every delivery report, returns how many were acknowledged.
    pub async fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.context("load task")?
    }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// `VmRSS` of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's RSS on a thread until dropped.
pub struct RssSampler {
    start: Instant,
    samples: Arc<Mutex<Vec<(Duration, u64)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> Self {
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (samples.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    if let Ok(mut v) = s2.lock() {
                        v.push((start.elapsed(), kib));
                    }
                }
                std::thread::sleep(every);
            }
        });
        Self {
            start,
            samples,
            stop,
            handle: Some(handle),
        }
    }

    /// Time since sampling started (to mark phases).
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Largest sample taken in `[from, to)`, in KiB.
    pub fn peak(&self, from: Duration, to: Duration) -> Option<u64> {
        self.samples.lock().ok().and_then(|v| {
            v.iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, k)| *k)
                .max()
        })
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison and the results table
// ---------------------------------------------------------------------------------------------

/// What a run's table holds compared with the expected rows (multisets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub expected: u64,
    pub seen: u64,
    /// Expected rows missing from the table.
    pub lost: u64,
    /// Rows beyond the expected count: identical copies of an expected row, or a second row for
    /// a key the dedup stage should have dropped (`dedup_misses`, counted here too).
    pub duplicated: u64,
    pub dedup_misses: u64,
    /// Rows that are neither: an expected source record with other content (e.g. an unmatched
    /// join row where a matched one was expected).
    pub wrong: u64,
    /// A few of each, for the report.
    pub examples: Vec<String>,
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
        self.expected += o.expected;
        self.seen += o.seen;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.dedup_misses += o.dedup_misses;
        self.wrong += o.wrong;
        for e in &o.examples {
            if self.examples.len() < 12 {
                self.examples.push(e.clone());
            }
        }
    }

    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.wrong == 0
    }
}

/// Compares two multisets of rows. `key` is what the dedup stage keys on (an event id),
/// `source` the source record a row comes from (partition, offset).
pub fn compare<R: Ord + Clone + std::fmt::Debug>(
    expected: &[R],
    got: &[R],
    key: impl Fn(&R) -> String,
    source: impl Fn(&R) -> (i64, i64),
) -> Outcome {
    let count = |rows: &[R]| {
        let mut m: BTreeMap<R, u64> = BTreeMap::new();
        for r in rows {
            *m.entry(r.clone()).or_default() += 1;
        }
        m
    };
    let (exp, seen) = (count(expected), count(got));
    let exp_keys: std::collections::BTreeSet<String> = expected.iter().map(&key).collect();
    let exp_sources: std::collections::BTreeSet<(i64, i64)> =
        expected.iter().map(&source).collect();
    let mut o = Outcome {
        expected: expected.len() as u64,
        seen: got.len() as u64,
        ..Outcome::default()
    };
    for (r, n) in &exp {
        let g = seen.get(r).copied().unwrap_or(0);
        if g < *n {
            o.lost += n - g;
            if o.examples.len() < 12 {
                o.examples.push(format!("lost: {r:?}"));
            }
        }
    }
    for (r, n) in &seen {
        let e = exp.get(r).copied().unwrap_or(0);
        if *n <= e {
            continue;
        }
        let surplus = n - e;
        let what = if e > 0 {
            o.duplicated += surplus;
            "duplicated"
        } else if exp_sources.contains(&source(r)) {
            o.wrong += surplus;
            "wrong"
        } else if exp_keys.contains(&key(r)) {
            o.duplicated += surplus;
            o.dedup_misses += surplus;
            "dedup miss"
        } else {
            o.wrong += surplus;
            "unexpected"
        };
        if o.examples.len() < 12 {
            o.examples.push(format!("{what} (x{surplus}): {r:?}"));
        }
    }
    o
}

/// One line of the suite's table.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub scenario: String,
    pub runs: u64,
    pub outcome: Outcome,
    pub note: String,
}

static RESULTS: Mutex<Vec<ScenarioResult>> = Mutex::new(Vec::new());

/// Records a scenario's result and prints the table of every scenario recorded so far in this
/// process (written to stderr directly, so it shows even when the test harness captures
/// output).
pub fn record(r: ScenarioResult) {
    let table = {
        let mut all = RESULTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.push(r);
        render(&all)
    };
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(table.as_bytes());
    let _ = err.flush();
}

/// The table as Markdown.
pub fn render(rows: &[ScenarioResult]) -> String {
    let mut s = format!(
        "\nfault suite ({} mode)\n\n| scenario | runs | rows expected | rows seen | lost | duplicated | of which dedup misses | wrong | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        if soak() { "soak" } else { "quick" }
    );
    for r in rows {
        let o = &r.outcome;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.runs,
            o.expected,
            o.seen,
            o.lost,
            o.duplicated,
            o.dedup_misses,
            o.wrong,
            r.note
        ));
    }
    s.push('\n');
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compare_classifies_surplus_rows() {
        // (key, partition, offset, variant)
        type R = (String, i64, i64, u8);
        let r = |k: &str, o: i64, v: u8| -> R { (k.to_string(), 0, o, v) };
        let expected = vec![r("a", 1, 0), r("b", 2, 0), r("c", 3, 0), r("c", 3, 1)];
        let got = vec![
            r("a", 1, 0),
            r("a", 1, 0), // copy
            r("b", 5, 0), // b again from another offset: the dedup stage let it through
            r("b", 2, 0),
            r("c", 3, 0),
            r("c", 3, 2), // c's second variant has other content
            r("z", 9, 0), // nobody expected z
        ];
        let o = compare(&expected, &got, |x| x.0.clone(), |x| (x.1, x.2));
        assert_eq!(o.expected, 4);
        assert_eq!(o.seen, 7);
        assert_eq!(o.lost, 1);
        assert_eq!(o.duplicated, 2);
        assert_eq!(o.dedup_misses, 1);
        assert_eq!(o.wrong, 2);
        assert!(!o.clean());
        let same = compare(&expected, &expected, |x| x.0.clone(), |x| (x.1, x.2));
        assert!(same.clean());
    }

    #[test]
    fn rss_of_this_process_is_read() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
