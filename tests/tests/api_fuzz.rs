//! The control plane's OpenAPI document fuzzed with schemathesis (PyPI, installed by
//! `scripts/install-deps.sh` into `$SLUICE_HOME/venv-fuzz`) against the real `sluice` binary
//! serving a running pipeline: no 5xx, every response matches the documented schema, status
//! code and content type. The number of examples is bounded so CI stays fast.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use sluice_tests::plugins::ENRICH_WASM;
use sluice_tests::services::{self, ch_execute, create_topic, unique_name};
use sluice_tests::sluice::SluiceProcess;

const TOKEN: &str = "fuzz-token-0123456789abcdef";

fn schemathesis() -> Result<PathBuf> {
    let home = std::env::var_os("SLUICE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice")))
        .context("neither SLUICE_HOME nor HOME is set")?;
    let bin = home.join("venv-fuzz/bin/schemathesis");
    ensure!(
        bin.exists(),
        "{} is missing: run scripts/install-deps.sh",
        bin.display()
    );
    Ok(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_fuzzed_with_schemathesis() -> Result<()> {
    let st = schemathesis()?;
    let kafka = services::kafka().await?;
    let ch = services::clickhouse().await?;
    let topic = unique_name("fuzz");
    let name = unique_name("fuzzp");
    let table = unique_name("fuzz_tx");
    create_topic(&kafka.brokers, &topic, 1).await?;
    let schema = std::fs::read_to_string(services::repo_root().join("demo/schema.sql"))?;
    ch_execute(
        &ch.url,
        &schema.replace(
            "IF NOT EXISTS transactions",
            &format!("IF NOT EXISTS default.{table}"),
        ),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("pipeline.yaml");
    std::fs::write(
        &config,
        format!(
            "name: {name}\nkafka:\n  brokers: {}\n  topics: [{topic}]\n  group_id: {name}\nstages:\n  - name: enrich\n    wasm:\n      plugin: {ENRICH_WASM}\nsink:\n  clickhouse:\n    url: {}\n    table: {table}\ndead_letter:\n  topic: {topic}-dlq\nstate:\n  dir: {}\n",
            kafka.brokers,
            ch.url,
            dir.path().join("state").display()
        ),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = config.display().to_string();
    let mut p = SluiceProcess::spawn(
        &[
            "run",
            "-c",
            &cfg,
            "--api-listen",
            &listen,
            "--api-token",
            TOKEN,
            "--max-upload-mb",
            "8",
        ],
        &dir.path().join("sluice.log"),
    )?;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        p.check_alive()?;
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "API never ready\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A stored plugin, so that reads of existing names are exercised too.
    let r = http
        .post(format!("{base}/v1/plugins/enrich"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(std::fs::read(ENRICH_WASM)?)
        .send()
        .await?;
    ensure!(r.status().is_success(), "{}", r.status());

    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .args([
                "--config-file",
                &services::repo_root()
                    .join("tests/fixtures/schemathesis.toml")
                    .display()
                    .to_string(),
                "run",
                &format!("{base}/v1/openapi.json"),
                "--url",
                &base,
                "--header",
                &format!("Authorization: Bearer {TOKEN}"),
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--seed",
                "1",
                "--workers",
                "1",
                "--no-color",
            ])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
    })
    .await??;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    p.check_alive()?;
    ensure!(out.status.success(), "schemathesis found problems:\n{text}");
    p.terminate(Duration::from_secs(60))?;
    Ok(())
}
