//! The hot-swap run's side of the control plane (`docs/api.md`): a small HTTP client for
//! upload, swap and status, and what a swap's `from_offsets` mean for the rows.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::pipeline::SluiceProc;

/// A free TCP port on loopback (bound, then released for sluice to take).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The part of `PUT /v1/pipelines/{p}/stages/{s}/plugin`'s answer the bench uses.
#[derive(Debug, Clone, Deserialize)]
pub struct SwapOutcome {
    /// `next_batch` when the running worker applied it.
    pub applies: String,
    /// `topic/partition` → first offset processed by the new version.
    pub from_offsets: BTreeMap<String, i64>,
}

/// The API of one `sluice run --api-listen 127.0.0.1:<port>` (loopback: no token needed).
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(port: u16) -> Result<Self> {
        Ok(Self {
            // No proxy: an HTTP(S)_PROXY in the environment must not see loopback requests.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(120))
                .build()?,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Waits until the API answers and `pipeline` is running.
    pub async fn wait_running(
        &self,
        pipeline: &str,
        proc: &mut SluiceProc,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/v1/pipelines/{pipeline}", self.base);
        loop {
            proc.check_alive()?;
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    let v: serde_json::Value = r.json().await?;
                    if v["state"] == "running" {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "pipeline {pipeline} not running after {timeout:?}\n{}",
                    proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Uploads a component as the next version of `name`; returns the stored version number.
    pub async fn upload(&self, name: &str, component: &Path) -> Result<u32> {
        let bytes =
            std::fs::read(component).with_context(|| format!("read {}", component.display()))?;
        let r = self
            .http
            .post(format!("{}/v1/plugins/{name}", self.base))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("upload {}: {status} {v}", component.display());
        }
        v["version"]["version"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("upload answer without version.version: {v}"))
    }

    /// Hot-swaps `stage` of `pipeline` to the stored `name` version `version`.
    pub async fn swap(
        &self,
        pipeline: &str,
        stage: &str,
        name: &str,
        version: u32,
    ) -> Result<SwapOutcome> {
        let r = self
            .http
            .put(format!(
                "{}/v1/pipelines/{pipeline}/stages/{stage}/plugin",
                self.base
            ))
            .json(&serde_json::json!({"name": name, "version": version}))
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("swap to {name} version {version}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("swap answer: {text}"))
    }
}

/// The partition number of a `from_offsets` key (`topic/partition`) of `topic`.
fn partition_of(key: &str, topic: &str) -> Option<i32> {
    key.strip_prefix(topic)?.strip_prefix('/')?.parse().ok()
}

/// SQL condition for the rows a swap applies to: at or after the switch offset of each listed
/// partition, and every row of a partition not listed (no batch yet when the swap applied).
pub fn switched_rows_sql(from: &BTreeMap<String, i64>, topic: &str) -> String {
    let listed: Vec<(i32, i64)> = from
        .iter()
        .filter_map(|(k, o)| Some((partition_of(k, topic)?, *o)))
        .collect();
    if listed.is_empty() {
        return "1".into();
    }
    let mut terms: Vec<String> = listed
        .iter()
        .map(|(p, o)| format!("(source_partition = {p} AND source_offset >= {o})"))
        .collect();
    let parts: Vec<String> = listed.iter().map(|(p, _)| p.to_string()).collect();
    terms.push(format!("source_partition NOT IN ({})", parts.join(", ")));
    terms.join(" OR ")
}

/// The version that must have produced the row at (`partition`, `offset`): the last swap (in
/// request order) whose switch point is at or before it; `initial` before the first swap.
pub fn expected_version<'a>(
    swaps: &'a [(String, BTreeMap<String, i64>)],
    initial: &'a str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> &'a str {
    let key = format!("{topic}/{partition}");
    let mut v = initial;
    for (version, from) in swaps {
        if from.get(&key).is_none_or(|f| *f <= offset) {
            v = version;
        }
    }
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, o)| (k.to_string(), *o)).collect()
    }

    #[test]
    fn versions_follow_switch_points() {
        let swaps = vec![
            ("v2".to_string(), offsets(&[("t/0", 100)])),
            ("v1".to_string(), offsets(&[("t/0", 250)])),
        ];
        assert_eq!(expected_version(&swaps, "v1", "t", 0, 99), "v1");
        assert_eq!(expected_version(&swaps, "v1", "t", 0, 100), "v2");
        assert_eq!(expected_version(&swaps, "v1", "t", 0, 249), "v2");
        assert_eq!(expected_version(&swaps, "v1", "t", 0, 250), "v1");
        // A partition with no batch before the swaps gets every swap at once.
        assert_eq!(expected_version(&swaps, "v1", "t", 1, 0), "v1");
        assert_eq!(expected_version(&swaps[..1], "v1", "t", 1, 0), "v2");
    }

    #[test]
    fn switched_rows_condition() {
        assert_eq!(
            switched_rows_sql(&offsets(&[("t/0", 7), ("t/2", 9), ("other/1", 3)]), "t"),
            "(source_partition = 0 AND source_offset >= 7) OR \
             (source_partition = 2 AND source_offset >= 9) OR source_partition NOT IN (0, 2)"
        );
        assert_eq!(switched_rows_sql(&BTreeMap::new(), "t"), "1");
        // "t2/0" is not a partition of "t".
        assert_eq!(partition_of("t2/0", "t"), None);
    }
}
