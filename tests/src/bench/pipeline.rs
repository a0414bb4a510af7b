//! Runs the real `sluice` binary on a backlog and measures it from the outside: rows visible in
//! ClickHouse (polled), CPU and peak RSS of the process (from `/proc`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kafka::RECEIVE_MESSAGE_MAX_BYTES;
use super::procfs::{self, ProcUsage};

/// What one pipeline file says; everything else is sluice's defaults (batches of up to
/// 100,000 rows / 32 MiB / 250 ms, plugin limits 256 MiB / 5 s).
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub ch_url: String,
    pub table: String,
    pub plugin: PathBuf,
    /// The stage's `config` (the enrich plugin's settings).
    pub plugin_config: serde_json::Value,
    pub state_dir: PathBuf,
    /// The whole `stages` list instead of the one enrich stage (the full path).
    pub stages: Option<serde_json::Value>,
    /// `state.changelog.topic`: what several instances of one pipeline need (README).
    pub changelog: Option<String>,
    /// `sink.batch.max_rows` (`None`: sluice's default).
    pub batch_rows: Option<usize>,
}

impl PipelineSpec {
    /// Writes the pipeline file (JSON, which is YAML) and returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let stages = self.stages.clone().unwrap_or_else(|| {
            serde_json::json!([{
                "name": "enrich",
                "wasm": {"plugin": self.plugin, "config": self.plugin_config},
            }])
        });
        let cfg = serde_json::json!({
            "name": self.name,
            "kafka": {
                "brokers": self.brokers,
                "topics": [self.topic],
                "group_id": self.group,
                "start_offset": "earliest",
                "properties": {"receive.message.max.bytes": RECEIVE_MESSAGE_MAX_BYTES},
            },
            "stages": stages,
            "sink": match self.batch_rows {
                Some(rows) => serde_json::json!({"clickhouse": {"url": self.ch_url, "table": self.table}, "batch": {"max_rows": rows}}),
                None => serde_json::json!({"clickhouse": {"url": self.ch_url, "table": self.table}}),
            },
            "dead_letter": {"topic": format!("{}-dlq", self.topic)},
            "state": match &self.changelog {
                Some(topic) => serde_json::json!({"dir": self.state_dir, "changelog": {"topic": topic}}),
                None => serde_json::json!({"dir": self.state_dir}),
            },
        });
        std::fs::create_dir_all(dir)?;
        // Named after the state dir: instances of one pipeline share its name, not their files.
        let stem = self
            .state_dir
            .file_name()
            .map_or_else(|| self.name.clone(), |n| n.to_string_lossy().into_owned());
        let path = dir.join(format!("{stem}.yaml"));
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(path)
    }
}

/// Compiles the plugin into the pipeline's artifact cache (`<state.dir>/plugin-cache`) with
/// `sluice validate --offline`, so that a following `run` starts from the precompiled artifact.
pub fn warm_plugin_cache(sluice: &Path, config: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let out = Command::new(sluice)
        .args(["validate", "--offline", "-c"])
        .arg(config)
        .env("SLUICE_LOG", "warn")
        .output()
        .context("run sluice validate")?;
    if !out.status.success() {
        bail!(
            "sluice validate failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t0.elapsed())
}

/// A running `sluice run` whose output goes to a log file.
pub struct SluiceProc {
    child: Option<Child>,
    pub pid: u32,
    pub log: PathBuf,
    pub started: Instant,
}

impl SluiceProc {
    pub fn spawn(sluice: &Path, config: &Path, log: &Path) -> Result<Self> {
        Self::spawn_wrapped(&[], sluice, config, &[], log)
    }

    /// Runs `sluice run -c config extra...` under `wrapper` (e.g. `perf record ... --`); `pid`
    /// is then sluice's own process, found as the wrapper's child.
    pub fn spawn_wrapped(
        wrapper: &[String],
        sluice: &Path,
        config: &Path,
        extra: &[String],
        log: &Path,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = file.try_clone()?;
        let started = Instant::now();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(sluice);
                c
            }
            None => Command::new(sluice),
        };
        let child = cmd
            .args(["run", "-c"])
            .arg(config)
            .args(extra)
            // Per-batch timing lines (`batch done`, `slow synced batch write`) for the latency
            // phase's breakdown.
            .env(
                "SLUICE_LOG",
                "info,sluice::pipeline=debug,sluice::state=debug",
            )
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("spawn {}", sluice.display()))?;
        let mut pid = child.id();
        if !wrapper.is_empty() {
            let children = format!("/proc/{pid}/task/{pid}/children");
            let deadline = Instant::now() + Duration::from_secs(10);
            pid = loop {
                let text = std::fs::read_to_string(&children).unwrap_or_default();
                if let Some(p) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    break p;
                }
                if Instant::now() > deadline {
                    bail!("{} started no sluice process", wrapper.join(" "));
                }
                std::thread::sleep(Duration::from_millis(5));
            };
        }
        Ok(Self {
            pid,
            child: Some(child),
            log: log.to_path_buf(),
            started,
        })
    }

    pub fn usage(&self) -> ProcUsage {
        procfs::usage(self.pid).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(s) = c.try_wait()? {
                self.child = None;
                bail!("sluice exited early with {s}\n{}", self.log_tail());
            }
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- {} ---\n{}",
            self.log.display(),
            lines[start..].join("\n")
        )
    }

    /// SIGTERM (flush and commit), then wait; SIGKILL after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("kill -TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                if !s.success() {
                    bail!("sluice exited with {s} after SIGTERM\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                Self::kill(self.pid, c);
                bail!(
                    "sluice did not stop within {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl SluiceProc {
    /// Kills sluice and, if it runs under a wrapper (`perf`), the wrapper: killing the wrapper
    /// alone left sluice running after a failed profiled run, a consumer-group member that
    /// fenced the next run's sluice.
    fn kill(pid: u32, mut c: std::process::Child) {
        if pid != c.id() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for SluiceProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            Self::kill(self.pid, c);
        }
    }
}

pub async fn ch_count(ch: &clickhouse::Client, table: &str) -> Result<u64> {
    ch.query(&format!("SELECT count() FROM {table}"))
        .fetch_one::<u64>()
        .await
        .with_context(|| format!("count rows of {table}"))
}

/// Why `table` has more rows than expected: the same source record inserted twice (sluice's
/// fault), or distinct offsets with repeated ids: more records in the topic than the producer
/// counted (a producer retry the broker wrote twice) or, where a dedup stage runs, repeats it
/// let through (how a dedup bug showed on 2026-12-06).
async fn too_many_rows(ch: &clickhouse::Client, table: &str, n: u64, expected: u64) -> String {
    let q =
        format!("SELECT uniqExact(source_partition, source_offset), uniqExact(id) FROM {table}");
    match ch.query(&q).fetch_one::<(u64, u64)>().await {
        Ok((positions, ids)) if positions == n => format!(
            "{table} has {n} rows, expected {expected}, but no source record twice ({positions} \
             distinct offsets, {ids} distinct ids): records the producer did not count (a \
             retry the broker wrote twice) or, with a dedup stage, repeats it let through"
        ),
        Ok((positions, ids)) => {
            let q = format!(
                "SELECT concat(toString(source_partition), '/', toString(source_offset), ' in ', \
                 arrayStringConcat(groupArray(_part), ' and ')) FROM {table} \
                 GROUP BY source_partition, source_offset HAVING count() > 1 \
                 ORDER BY source_partition, source_offset LIMIT 10"
            );
            let twice = ch
                .query(&q)
                .fetch_all::<String>()
                .await
                .map(|v| v.join("; "))
                .unwrap_or_else(|e| e.to_string());
            format!(
                "{table} has {n} rows, expected {expected}: duplicates ({positions} distinct \
                 source offsets, {ids} distinct ids; inserted more than once, as partition/offset \
                 in parts: {twice})"
            )
        }
        Err(e) => format!("{table} has {n} rows, expected {expected}: duplicates ({e})"),
    }
}

/// Seconds from start until the first and until all `expected` rows were visible, with the
/// processes' usage sampled at the moment all rows were seen.
#[derive(Debug, Clone)]
pub struct Visibility {
    pub first_row_s: f64,
    pub all_rows_s: f64,
    pub usage: Vec<ProcUsage>,
    /// Rows visible at the end: `expected`, or fewer when the count stalled (see
    /// [`wait_visible_or_stall`]); then `all_rows_s` and `usage` are those of the last change.
    pub rows: u64,
}

impl Visibility {
    pub fn complete(&self, expected: u64) -> bool {
        self.rows == expected
    }
}

/// Polls `count()` until `expected` rows are visible: every 10 ms until the first row (the
/// first-row time needs the resolution), then every `every` (each poll costs ClickHouse CPU
/// that the measured process could use). `start` is when the (first) process was spawned.
pub async fn wait_visible(
    ch: &clickhouse::Client,
    table: &str,
    expected: u64,
    procs: &mut [SluiceProc],
    start: Instant,
    every: Duration,
    timeout: Duration,
) -> Result<Visibility> {
    wait_visible_or_stall(ch, table, expected, procs, start, every, timeout, None).await
}

/// [`wait_visible`], but when `stall` is given and the count has not changed for that long
/// (rows lost or stuck in the pipeline), returns what was visible then instead of waiting for
/// the timeout: the time and usage of the last change, and `rows` < `expected`.
#[allow(clippy::too_many_arguments)]
pub async fn wait_visible_or_stall(
    ch: &clickhouse::Client,
    table: &str,
    expected: u64,
    procs: &mut [SluiceProc],
    start: Instant,
    every: Duration,
    timeout: Duration,
    stall: Option<Duration>,
) -> Result<Visibility> {
    let mut first = None;
    // (count, time, usage) when the count last changed.
    let mut last: (u64, f64, Vec<ProcUsage>) = (0, 0.0, Vec::new());
    loop {
        let n = ch_count(ch, table).await?;
        let t = start.elapsed().as_secs_f64();
        if n > 0 && first.is_none() {
            first = Some(t);
        }
        if n >= expected {
            if n > expected {
                bail!("{}", too_many_rows(ch, table, n, expected).await);
            }
            return Ok(Visibility {
                first_row_s: first.unwrap_or(t),
                all_rows_s: t,
                usage: procs.iter().map(SluiceProc::usage).collect(),
                rows: n,
            });
        }
        if n != last.0 {
            last = (n, t, procs.iter().map(SluiceProc::usage).collect());
        } else if let Some(stall) = stall.filter(|s| n > 0 && t - last.1 > s.as_secs_f64()) {
            eprintln!(
                "==> {table}: {n} of {expected} rows, no new row for {stall:?}: stopping the wait"
            );
            return Ok(Visibility {
                first_row_s: first.unwrap_or(t),
                all_rows_s: last.1,
                usage: last.2,
                rows: n,
            });
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if start.elapsed() > timeout {
            bail!(
                "only {n} of {expected} rows visible in {table} after {timeout:?}\n{}",
                procs
                    .iter()
                    .map(SluiceProc::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let pause = if first.is_some() {
            every
        } else {
            Duration::from_millis(10)
        };
        tokio::time::sleep(pause).await;
    }
}
