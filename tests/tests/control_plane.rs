//! The HTTP control plane against the real `sluice` binary, broker and ClickHouse: auth,
//! limits and error statuses; hot-swaps under load (every row produced by exactly one version,
//! switch points as the API reported them); rollback; versions surviving a restart; shadow
//! runs; pause/resume; automatic rollback when a freshly swapped plugin trips its breaker;
//! dead letters over the API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use sluice_tests::plugins::{ENRICH_V2_WASM, ENRICH_WASM, HOSTILE_WASM, NOT_A_PLUGIN_WAT};
use sluice_tests::services::{
    self, ch_execute, create_topic, produce, query_rows_json, unique_name, ClickHouseEnv, KafkaEnv,
    TestRecord,
};
use sluice_tests::sluice::SluiceProcess;
use sluice_tests::workload::{transactions, TransactionSpec};

const TOKEN: &str = "test-token-0123456789abcdef";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Fixture {
    kafka: KafkaEnv,
    ch: ClickHouseEnv,
    topic: String,
    dlq: String,
    name: String,
    table: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    http: reqwest::Client,
    runs: usize,
}

impl Fixture {
    /// A pipeline `enrich` stage (the reference plugin from its file) over a fresh topic and
    /// table; the table has v2's extra column.
    async fn new(partitions: i32, extra_stage_yaml: &str) -> Result<Self> {
        let kafka = services::kafka().await?;
        let ch = services::clickhouse().await?;
        let topic = unique_name("cp");
        let dlq = format!("{topic}-dlq");
        let name = unique_name("cpp");
        let table = unique_name("cp_tx");
        create_topic(&kafka.brokers, &topic, partitions).await?;
        let schema = std::fs::read_to_string(services::repo_root().join("demo/schema.sql"))?;
        let ddl = schema
            .replace(
                "IF NOT EXISTS transactions",
                &format!("IF NOT EXISTS default.{table}"),
            )
            .replace(
                "plugin_version LowCardinality(String),",
                "plugin_version LowCardinality(String),\n    risk_level LowCardinality(String) DEFAULT '',",
            );
        ch_execute(&ch.url, &ddl).await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("pipeline.yaml");
        std::fs::write(
            &config,
            format!(
                r#"
name: {name}
kafka:
  brokers: {brokers}
  topics: [{topic}]
  group_id: {name}
  start_offset: earliest
stages:
  - name: enrich
    wasm:
      plugin: {plugin}
{extra_stage_yaml}
sink:
  clickhouse:
    url: {url}
    table: {table}
  batch:
    max_rows: 500
    max_age_ms: 100
dead_letter:
  topic: {dlq}
state:
  dir: {state}
"#,
                brokers = kafka.brokers,
                plugin = ENRICH_WASM,
                url = ch.url,
                state = dir.path().join("state").display(),
            ),
        )?;
        Ok(Self {
            kafka,
            ch,
            topic,
            dlq,
            name,
            table,
            dir,
            config,
            port: free_port()?,
            http: reqwest::Client::new(),
            runs: 0,
        })
    }

    fn start(&mut self, extra: &[&str]) -> Result<SluiceProcess> {
        self.runs += 1;
        let log = self.dir.path().join(format!("sluice-{}.log", self.runs));
        let config = self.config.display().to_string();
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "run",
            "-c",
            &config,
            "--api-listen",
            &listen,
            "--api-token",
            TOKEN,
        ];
        args.extend_from_slice(extra);
        SluiceProcess::spawn(&args, &log)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Uploads a plugin announced as `declared` bytes, of which only `sent` (just over the
    /// limit) are written, then reads the answer. Over plain TCP: the server answers 413 once
    /// the limit is passed and closes the connection, so a client still writing the rest of
    /// the body (as reqwest does) may get a broken pipe instead of the response; sending no
    /// more than the server reads makes the answer arrive every time.
    async fn oversized_upload(
        &self,
        name: &str,
        declared: usize,
        sent: usize,
    ) -> Result<(StatusCode, Value)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let head = format!(
            "POST /v1/plugins/{name} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nauthorization: Bearer {TOKEN}\r\n\
             content-type: application/wasm\r\ncontent-length: {declared}\r\nconnection: close\r\n\r\n",
            self.port
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(&vec![0u8; sent]).await?;
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut reply))
            .await
            .context("no answer to an oversized upload within 30 s")??;
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("not an HTTP response: {text:?}"))?;
        let code: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        let v = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
        Ok((StatusCode::from_u16(code)?, v))
    }

    /// An authenticated request; returns status and JSON body (or the text as a string).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let (s, v) = self.call(method.clone(), path, body).await?;
        ensure!(s.is_success(), "{method} {path}: {s} {v}");
        Ok(v)
    }

    async fn upload(&self, name: &str, file: &str) -> Result<(StatusCode, Value)> {
        let bytes = std::fs::read(file)?;
        let resp = self
            .http
            .post(self.url(&format!("/v1/plugins/{name}")))
            .bearer_auth(TOKEN)
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await?;
        let status = resp.status();
        Ok((status, resp.json().await?))
    }

    /// Waits until the API answers and the pipeline runs.
    async fn wait_running(&self, p: &mut SluiceProcess) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            p.check_alive()?;
            if let Ok((StatusCode::OK, v)) = self
                .call(Method::GET, &format!("/v1/pipelines/{}", self.name), None)
                .await
            {
                if v["state"] == "running" {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "pipeline never running\n{}",
                p.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn rows(&self) -> Result<Vec<Value>> {
        query_rows_json(
            &self.ch.url,
            &format!(
                "SELECT id, source_partition, source_offset, plugin_version, risk_level FROM default.{} ORDER BY source_partition, source_offset",
                self.table
            ),
        )
        .await
    }

    async fn wait_rows(&self, p: &mut SluiceProcess, n: usize) -> Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            p.check_alive()?;
            let rows = self.rows().await?;
            if rows.len() >= n {
                return Ok(rows);
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {n} rows\n{}",
                rows.len(),
                p.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn produce_events(&self, count: usize, seed: u64) -> Result<usize> {
        let events = transactions(&TransactionSpec {
            count,
            users: 100,
            malformed_every: 0,
            duplicate_percent: 0,
            seed,
        });
        // Ids must be unique across calls.
        let recs = events.iter().map(|e| {
            let mut v: Value = serde_json::from_slice(&e.value).expect("workload JSON");
            v["id"] = json!(format!("{}-s{seed}", e.id));
            TestRecord::new(serde_json::to_vec(&v).expect("JSON")).key(e.key.clone())
        });
        produce(&self.kafka.brokers, &self.topic, recs).await?;
        Ok(count)
    }
}

fn num(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_limits_and_error_statuses() -> Result<()> {
    let mut f = Fixture::new(1, "").await?;
    let mut p = f.start(&["--max-upload-mb", "4"])?;
    f.wait_running(&mut p).await?;
    let http = &f.http;

    // Health is open; everything else needs the token.
    let r = http.get(f.url("/healthz")).send().await?;
    ensure!(r.status() == StatusCode::OK);
    let r = http.get(f.url("/readyz")).send().await?;
    ensure!(r.status() == StatusCode::OK, "{}", r.text().await?);
    for (path, token) in [
        ("/v1/plugins", None),
        ("/v1/pipelines", Some("wrong-token-0123456789")),
        ("/metrics", None),
    ] {
        let mut req = http.get(f.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        ensure!(
            r.status() == StatusCode::UNAUTHORIZED,
            "{path}: {}",
            r.status()
        );
        ensure!(r.headers().get("www-authenticate").is_some());
        let v: Value = r.json().await?;
        ensure!(v["error"]["code"] == "unauthorized", "{v}");
    }

    // Upload limit → 413; not a component → 422 with the validation error.
    let (s, v) = f.oversized_upload("big", 5 << 20, (4 << 20) + 1).await?;
    ensure!(s == StatusCode::PAYLOAD_TOO_LARGE, "{s} {v}");
    ensure!(v["error"]["code"] == "too_large", "{v}");
    // The CLI's client (`sluice plugin push`) says so too, whether it got the 413 or the
    // server closed the connection before the whole body was written.
    let client = sluice::api::client::ApiClient::new(&f.url(""), Some(TOKEN.to_string()));
    let pushed = client
        .call(
            Method::POST,
            "/v1/plugins/big",
            None,
            Some((vec![0u8; 5 << 20], "application/wasm")),
        )
        .await;
    match pushed {
        Err(sluice::api::client::ClientError::Api { status, code, .. }) => {
            ensure!(
                status == StatusCode::PAYLOAD_TOO_LARGE && code == "too_large",
                "{status} {code}"
            )
        }
        Err(e @ sluice::api::client::ClientError::UploadCut { .. }) => {
            ensure!(e.to_string().contains("upload limit"), "{e}")
        }
        other => bail!("an upload over the limit: {other:?}"),
    }
    let (s, v) = f.upload("core", NOT_A_PLUGIN_WAT).await?;
    ensure!(s == StatusCode::UNPROCESSABLE_ENTITY, "{s} {v}");
    ensure!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a component")),
        "{v}"
    );
    let r = http
        .post(f.url("/v1/plugins/garbage"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(b"definitely not wasm".to_vec())
        .send()
        .await?;
    ensure!(r.status() == StatusCode::UNPROCESSABLE_ENTITY);
    let r = http
        .post(f.url("/v1/plugins/bad"))
        .bearer_auth(TOKEN)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await?;
    ensure!(r.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // init refusing the given config → 422.
    let r = http
        .post(f.url("/v1/plugins/enrich?config=%7B%22version%22%3A%22%22%7D"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(std::fs::read(ENRICH_WASM)?)
        .send()
        .await?;
    ensure!(
        r.status() == StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        r.status()
    );

    // Valid uploads: 201 then 200 for identical bytes; multipart works too.
    let (s, v) = f.upload("enrich", ENRICH_WASM).await?;
    ensure!(
        s == StatusCode::CREATED && v["version"]["version"] == 1,
        "{s} {v}"
    );
    let (s, v) = f.upload("enrich", ENRICH_WASM).await?;
    ensure!(s == StatusCode::OK && v["created"] == false, "{s} {v}");
    let form = reqwest::multipart::Form::new()
        .part(
            "component",
            reqwest::multipart::Part::bytes(std::fs::read(ENRICH_V2_WASM)?).file_name("v2.wasm"),
        )
        .text("config", "{}");
    let r = http
        .post(f.url("/v1/plugins/enrich"))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await?;
    ensure!(r.status() == StatusCode::CREATED, "{}", r.status());

    // Unknown names → 404, one error shape.
    let name = f.name.clone();
    for (m, path, body) in [
        (Method::GET, "/v1/pipelines/nope".to_string(), None),
        (Method::GET, "/v1/plugins/nope".to_string(), None),
        (
            Method::DELETE,
            "/v1/plugins/enrich/versions/99".to_string(),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/pipelines/{name}/stages/nope/plugin"),
            Some(json!({"name": "enrich", "version": 1})),
        ),
        (
            Method::PUT,
            format!("/v1/pipelines/{name}/stages/enrich/plugin"),
            Some(json!({"name": "enrich", "version": 42})),
        ),
        (Method::GET, "/v1/nothing-here".to_string(), None),
    ] {
        let (s, v) = f.call(m.clone(), &path, body).await?;
        ensure!(s == StatusCode::NOT_FOUND, "{m} {path}: {s} {v}");
        ensure!(
            v["error"]["code"] == "not_found" && v["error"]["message"].is_string(),
            "{v}"
        );
    }
    // Bad JSON → 400; nothing to roll back → 409; version in use → 409.
    let (s, v) = f
        .call(
            Method::PUT,
            &format!("/v1/pipelines/{name}/stages/enrich/plugin"),
            Some(json!({"nom": 1})),
        )
        .await?;
    ensure!(s == StatusCode::BAD_REQUEST, "{s} {v}");
    let (s, _) = f
        .call(
            Method::POST,
            &format!("/v1/pipelines/{name}/stages/enrich/rollback"),
            None,
        )
        .await?;
    ensure!(s == StatusCode::CONFLICT);
    f.ok(
        Method::PUT,
        &format!("/v1/pipelines/{name}/stages/enrich/plugin"),
        Some(json!({"name": "enrich", "version": 2})),
    )
    .await?;
    let (s, v) = f
        .call(Method::DELETE, "/v1/plugins/enrich/versions/2", None)
        .await?;
    ensure!(s == StatusCode::CONFLICT, "{s} {v}");
    let v = f
        .ok(Method::DELETE, "/v1/plugins/enrich/versions/1", None)
        .await?;
    ensure!(v["version"] == 1, "{v}");

    // Metrics and the OpenAPI document (the served one is the one in the repo).
    let (s, m) = f.call(Method::GET, "/metrics", None).await?;
    ensure!(s == StatusCode::OK);
    let m = m.as_str().unwrap_or_default().to_string();
    for metric in ["sluice_pipeline_state", "sluice_plugin_swaps_total"] {
        ensure!(m.contains(metric), "no {metric} in\n{m}");
    }
    let served = f.ok(Method::GET, "/v1/openapi.json", None).await?;
    let repo: Value = serde_json::from_str(&std::fs::read_to_string(
        services::repo_root().join("docs/openapi.json"),
    )?)?;
    ensure!(
        served == repo,
        "docs/openapi.json is stale: regenerate it with `sluice openapi > docs/openapi.json`"
    );
    p.terminate(Duration::from_secs(30))?;

    // No token on a non-loopback address → refused at start.
    let config = f.config.display().to_string();
    let (status, out) =
        sluice_tests::sluice::run_to_end(&["run", "-c", &config, "--api-listen", "0.0.0.0:0"])?;
    ensure!(
        !status.success() && out.contains("without a bearer token"),
        "{out}"
    );
    Ok(())
}

/// Expected plugin version of a row at (partition, offset), from the swap responses.
fn expected_version(
    swaps: &[(String, BTreeMap<String, i64>)],
    topic: &str,
    p: i64,
    o: i64,
) -> String {
    let key = format!("{topic}/{p}");
    let mut v = "v1".to_string();
    for (version, from) in swaps {
        if from.get(&key).is_none_or(|f| *f <= o) {
            v = version.clone();
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_load_rollback_and_restart() -> Result<()> {
    let mut f = Fixture::new(2, "").await?;
    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    let (s, _) = f.upload("enrich", ENRICH_WASM).await?;
    ensure!(s == StatusCode::CREATED);
    let (s, _) = f.upload("enrich", ENRICH_V2_WASM).await?;
    ensure!(s == StatusCode::CREATED);
    let name = f.name.clone();
    let swap_path = format!("/v1/pipelines/{name}/stages/enrich/plugin");

    // Produce in the background while swapping v2, v1, v2, ... ten times.
    let total = 24_000;
    let producer = {
        let (brokers, topic) = (f.kafka.brokers.clone(), f.topic.clone());
        tokio::spawn(async move {
            for chunk in 0..12u64 {
                let events = transactions(&TransactionSpec {
                    count: 2_000,
                    users: 100,
                    malformed_every: 0,
                    duplicate_percent: 0,
                    seed: chunk + 1,
                });
                let recs: Vec<TestRecord> = events
                    .iter()
                    .map(|e| {
                        let mut v: Value = serde_json::from_slice(&e.value).expect("workload JSON");
                        v["id"] = json!(format!("{}-c{chunk}", e.id));
                        TestRecord::new(serde_json::to_vec(&v).expect("JSON")).key(e.key.clone())
                    })
                    .collect();
                produce(&brokers, &topic, recs).await?;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok(())
        })
    };
    let mut swaps: Vec<(String, BTreeMap<String, i64>)> = Vec::new();
    let mut switch_latency = Vec::new();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let version = if i % 2 == 0 { 2 } else { 1 };
        let started = Instant::now();
        let out = f
            .ok(
                Method::PUT,
                &swap_path,
                Some(json!({"name": "enrich", "version": version})),
            )
            .await?;
        switch_latency.push(started.elapsed());
        ensure!(out["applies"] == "next_batch", "{out}");
        ensure!(out["current"]["version"] == version, "{out}");
        let from: BTreeMap<String, i64> =
            serde_json::from_value(out["from_offsets"].clone()).context("from_offsets")?;
        swaps.push((format!("v{version}"), from));
    }
    producer.await??;
    let rows = f.wait_rows(&mut p, total).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = if rows.len() == total {
        f.rows().await?
    } else {
        rows
    };
    ensure!(
        rows.len() == total,
        "{} rows, expected {total} (duplicates?)",
        rows.len()
    );
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["id"].as_str()).collect();
    ensure!(ids.len() == total, "{} distinct ids of {total}", ids.len());

    // Switch points are monotonic per partition.
    for part in 0..2 {
        let key = format!("{}/{part}", f.topic);
        let points: Vec<i64> = swaps
            .iter()
            .filter_map(|(_, m)| m.get(&key).copied())
            .collect();
        ensure!(points.windows(2).all(|w| w[0] <= w[1]), "{key}: {points:?}");
    }
    // Every row was produced by exactly one version: the one active at its offset.
    let mut by_version: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        let (part, off) = (num(&r["source_partition"]), num(&r["source_offset"]));
        let version = r["plugin_version"].as_str().unwrap_or_default();
        let risk = r["risk_level"].as_str().unwrap_or_default();
        ensure!(
            (version == "v2") != risk.is_empty(),
            "row mixes versions: {r}"
        );
        let want = expected_version(&swaps, &f.topic, part, off);
        ensure!(
            version == want,
            "row {r}: produced by {version}, the API said {want} applies from {swaps:?}"
        );
        *by_version.entry(version.to_string()).or_default() += 1;
    }
    ensure!(
        by_version.len() == 2,
        "both versions must have produced rows: {by_version:?}"
    );
    eprintln!("rows per version: {by_version:?}; swap request latencies: {switch_latency:?}");

    // Rollback: the last swap set v1 after v2, so rollback restores v2.
    let out = f
        .ok(
            Method::POST,
            &format!("/v1/pipelines/{name}/stages/enrich/rollback"),
            None,
        )
        .await?;
    ensure!(
        out["current"]["version"] == 2 && out["previous"]["version"] == 1,
        "{out}"
    );

    // The selection survives a restart.
    p.terminate(Duration::from_secs(60))?;
    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    let status = f
        .ok(Method::GET, &format!("/v1/pipelines/{name}"), None)
        .await?;
    ensure!(status["stages"][0]["plugin"]["version"] == 2, "{status}");
    f.produce_events(500, 99).await?;
    let rows = f.wait_rows(&mut p, total + 500).await?;
    let late: Vec<&Value> = rows
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|i| i.ends_with("-s99")))
        .collect();
    ensure!(
        late.len() == 500
            && late
                .iter()
                .all(|r| r["plugin_version"] == "v2" && r["risk_level"] != "")
    );
    p.terminate(Duration::from_secs(60))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_run_reports_differences_then_promotes() -> Result<()> {
    let mut f = Fixture::new(1, "").await?;
    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    f.upload("enrich", ENRICH_WASM).await?;
    f.upload("enrich", ENRICH_V2_WASM).await?;
    let name = f.name.clone();
    let path = format!("/v1/pipelines/{name}/stages/enrich/shadow");
    let (s, v) = f.call(Method::GET, &path, None).await?;
    ensure!(s == StatusCode::CONFLICT, "no shadow yet: {s} {v}");
    let (s, v) = f
        .call(
            Method::POST,
            &path,
            Some(json!({"name": "enrich", "version": 2})),
        )
        .await?;
    ensure!(s == StatusCode::ACCEPTED, "{s} {v}");
    let status = f
        .ok(Method::GET, &format!("/v1/pipelines/{name}"), None)
        .await?;
    ensure!(status["stages"][0]["shadow"]["version"] == 2, "{status}");
    let n = f.produce_events(3_000, 1).await?;
    let rows = f.wait_rows(&mut p, n).await?;
    // The candidate's output was discarded: every row is v1's.
    ensure!(rows
        .iter()
        .all(|r| r["plugin_version"] == "v1" && r["risk_level"] == ""));
    let report = f.ok(Method::GET, &path, None).await?;
    ensure!(num(&report["records"]) == n as i64, "{report}");
    ensure!(
        num(&report["records_changed"]) == n as i64 && num(&report["records_same"]) == 0,
        "{report}"
    );
    ensure!(
        num(&report["fields_added"]["risk_level"]) == n as i64,
        "{report}"
    );
    ensure!(
        num(&report["fields_changed"]["plugin_version"]) == n as i64,
        "{report}"
    );
    ensure!(
        report["fields_removed"]
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "{report}"
    );
    ensure!(num(&report["errors_live"]) == 0 && num(&report["candidate_failures"]) == 0);
    ensure!(
        !report["samples"].as_array().is_none_or(|s| s.is_empty()),
        "{report}"
    );
    // Promote: the candidate becomes live.
    let out = f
        .ok(Method::DELETE, &format!("{path}?promote=true"), None)
        .await?;
    ensure!(out["swap"]["current"]["version"] == 2, "{out}");
    f.produce_events(1_000, 2).await?;
    let rows = f.wait_rows(&mut p, n + 1_000).await?;
    let new: Vec<&Value> = rows
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|i| i.ends_with("-s2")))
        .collect();
    ensure!(
        new.len() == 1_000
            && new
                .iter()
                .all(|r| r["plugin_version"] == "v2" && r["risk_level"] != "")
    );
    p.terminate(Duration::from_secs(60))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_auto_rollback_and_dead_letters_over_the_api() -> Result<()> {
    let mut f = Fixture::new(1, "      breaker_failures: 1").await?;
    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    let name = f.name.clone();

    // Pause: nothing lands; resume: everything does.
    let (s, _) = f
        .call(Method::POST, &format!("/v1/pipelines/{name}/pause"), None)
        .await?;
    ensure!(s == StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(30);
    while f
        .ok(Method::GET, &format!("/v1/pipelines/{name}"), None)
        .await?["state"]
        != "paused"
    {
        ensure!(Instant::now() < deadline, "never paused\n{}", p.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = f.produce_events(1_000, 1).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(f.rows().await?.is_empty(), "rows landed while paused");
    let (r, _) = f.call(Method::GET, "/readyz", None).await?;
    ensure!(
        r == StatusCode::OK,
        "a paused pipeline is a deliberate state"
    );
    f.ok(Method::POST, &format!("/v1/pipelines/{name}/resume"), None)
        .await?;
    f.wait_rows(&mut p, n).await?;

    // A plugin that traps on these records, swapped in: the breaker trips at once, the swap
    // is rolled back automatically, and the same records land through the previous plugin.
    let (s, v) = f.upload("hostile", HOSTILE_WASM).await?;
    ensure!(s == StatusCode::CREATED, "{v}");
    f.ok(
        Method::PUT,
        &format!("/v1/pipelines/{name}/stages/enrich/plugin"),
        Some(json!({"name": "hostile", "version": 1})),
    )
    .await?;
    let poison = transactions(&TransactionSpec {
        count: 200,
        users: 10,
        malformed_every: 0,
        duplicate_percent: 0,
        seed: 7,
    });
    produce(
        &f.kafka.brokers,
        &f.topic,
        poison.iter().map(|e| {
            let mut v: Value = serde_json::from_slice(&e.value).expect("JSON");
            v["id"] = json!(format!("{}-poison", e.id));
            v["action"] = json!("trap");
            TestRecord::new(serde_json::to_vec(&v).expect("JSON"))
        }),
    )
    .await?;
    let rows = f.wait_rows(&mut p, n + 200).await?;
    ensure!(rows.len() == n + 200);
    ensure!(p.log_text().contains("rolled back"), "{}", p.log_tail());
    let status = f
        .ok(Method::GET, &format!("/v1/pipelines/{name}"), None)
        .await?;
    ensure!(status["state"] == "running", "{status}");
    ensure!(
        status["stages"][0]["plugin"].get("version").is_none(),
        "back on the file plugin: {status}"
    );
    let (_, m) = f.call(Method::GET, "/metrics", None).await?;
    ensure!(
        m.as_str()
            .is_some_and(|m| m.contains("kind=\"auto_rollback\"")),
        "{m}"
    );

    // Dead letters over the API: a malformed record, with its reason.
    produce(
        &f.kafka.brokers,
        &f.topic,
        [TestRecord::new(b"{not json".to_vec())],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let entries = loop {
        let v = f
            .ok(
                Method::GET,
                &format!("/v1/pipelines/{name}/dead-letters?limit=10"),
                None,
            )
            .await?;
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        ensure!(
            Instant::now() < deadline,
            "no dead letter\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let e = &entries[0];
    ensure!(e["value"] == "{not json", "{e}");
    ensure!(e["headers"]["sluice.stage"] == "enrich", "{e}");
    ensure!(e["headers"]["sluice.error.kind"] == "parse", "{e}");
    let _ = &f.dlq;
    p.terminate(Duration::from_secs(60))?;
    if rows.len() != n + 200 {
        bail!("unexpected rows");
    }
    Ok(())
}

/// `sluice rewind` (issue 5; here for this file's fixture): after rewinding a stopped pipeline
/// to the start of its topic, the re-delivered records are recognised by the dedup stage (all
/// inside its window) and nothing lands twice; new records after them still land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_redelivers_without_duplicates_inside_the_dedup_window() -> Result<()> {
    let mut f = Fixture::new(
        2,
        "  - name: dedup\n    dedup:\n      key: /id\n      window: 24h\n",
    )
    .await?;
    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    let n = f.produce_events(1_000, 1).await?;
    f.wait_rows(&mut p, n).await?;
    p.terminate(Duration::from_secs(60))?;

    let config = f.config.display().to_string();
    let (status, out) = sluice_tests::sluice::run_to_end(&[
        "rewind",
        "-c",
        &config,
        "--topic",
        &f.topic,
        "--to-offset",
        "earliest",
    ])?;
    ensure!(status.success(), "rewind failed:\n{out}");
    ensure!(out.contains("REWOUND TO"), "{out}");

    let mut p = f.start(&[])?;
    f.wait_running(&mut p).await?;
    f.produce_events(200, 2).await?;
    let rows = f.wait_rows(&mut p, n + 200).await?;
    // Give re-delivered records time to (wrongly) land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = if rows.len() == n + 200 {
        f.rows().await?
    } else {
        rows
    };
    ensure!(
        rows.len() == n + 200,
        "{} rows after the rewind, expected {}",
        rows.len(),
        n + 200
    );
    let status = f
        .ok(Method::GET, &format!("/v1/pipelines/{}", f.name), None)
        .await?;
    ensure!(
        num(&status["counters"]["dedup.duplicates"]) >= n as i64,
        "{status}"
    );
    p.terminate(Duration::from_secs(60))?;
    Ok(())
}
