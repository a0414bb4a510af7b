//! The bench's own ClickHouse and broker, started through `scripts/services/` on ports of its
//! own. The broker is restarted with an empty data dir before every big backlog: noida-db keeps
//! its whole log in memory (see `shared/notes/kafka.md`), so one instance never holds more than
//! one phase's records.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct BenchServices {
    repo: PathBuf,
    work: PathBuf,
    pub kafka_port: u16,
    pub ch_port: u16,
    /// `noida` or `tansu` (`scripts/services/kafka.sh`).
    broker: String,
    kafka_generation: u32,
}

impl BenchServices {
    pub fn new(repo: &Path, work: &Path, broker: &str, kafka_port: u16, ch_port: u16) -> Self {
        Self {
            repo: repo.to_path_buf(),
            work: work.to_path_buf(),
            kafka_port,
            ch_port,
            broker: broker.to_string(),
            kafka_generation: 0,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn ch_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ch_port)
    }

    fn ch_dir(&self) -> PathBuf {
        self.work.join("clickhouse")
    }

    fn kafka_dir(&self, generation: u32) -> PathBuf {
        self.work.join(format!("kafka-{generation}"))
    }

    fn script(&self, name: &str, args: &[&str], env: &[(&str, String)]) -> Result<()> {
        let path = self.repo.join("scripts/services").join(name);
        let out = Command::new("bash")
            .arg(&path)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .with_context(|| format!("run {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}):\n{}{}",
                path.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn ch_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SLUICE_CH_PORT", self.ch_port.to_string()),
            ("SLUICE_CH_DATA", self.ch_dir().display().to_string()),
        ]
    }

    fn kafka_env(&self, generation: u32) -> Vec<(&'static str, String)> {
        vec![
            ("SLUICE_KAFKA_BROKER", self.broker.clone()),
            ("SLUICE_KAFKA_PORT", self.kafka_port.to_string()),
            (
                "SLUICE_KAFKA_DATA",
                self.kafka_dir(generation).display().to_string(),
            ),
        ]
    }

    /// Starts ClickHouse on an empty data dir; it is stopped when this process exits, however
    /// it ends (the scripts' watchdog), or by [`stop_all`](Self::stop_all).
    pub fn start_clickhouse(&self) -> Result<()> {
        let dir = self.ch_dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        let parent = std::process::id().to_string();
        self.script(
            "clickhouse.sh",
            &["start", "--parent-pid", &parent],
            &self.ch_env(),
        )
    }

    /// Stops the current broker (if any), deletes its data and starts a new one on an empty dir.
    pub fn fresh_kafka(&mut self) -> Result<()> {
        self.stop_kafka()?;
        self.kafka_generation += 1;
        let dir = self.kafka_dir(self.kafka_generation);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        let parent = std::process::id().to_string();
        self.script(
            "kafka.sh",
            &["start", "--parent-pid", &parent],
            &self.kafka_env(self.kafka_generation),
        )
    }

    pub fn stop_kafka(&mut self) -> Result<()> {
        if self.kafka_generation == 0 {
            return Ok(());
        }
        let g = self.kafka_generation;
        self.script("kafka.sh", &["stop"], &self.kafka_env(g))?;
        // The log (hundreds of MB as JSON) is of no further use; keep the broker log.
        let data = self.kafka_dir(g).join("noida");
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("remove {}", data.display()))?;
        }
        Ok(())
    }

    pub fn stop_all(&mut self) -> Result<()> {
        self.stop_kafka()?;
        self.script("clickhouse.sh", &["stop"], &self.ch_env())
    }

    fn pidfile(path: PathBuf) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    pub fn kafka_pid(&self) -> Option<u32> {
        Self::pidfile(self.kafka_dir(self.kafka_generation).join("broker.pid"))
    }

    /// The Python process that embeds the ClickHouse engine (all of its CPU is ClickHouse's).
    pub fn ch_pid(&self) -> Option<u32> {
        Self::pidfile(self.ch_dir().join("server.pid"))
    }
}
