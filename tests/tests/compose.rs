//! Static checks of docker-compose.yml and what it references. No Docker engine runs on the CI
//! machine, so this keeps the compose setup from rotting: services, official images, bind-mounted
//! files and the Dockerfile must exist, and the mounted pipeline must point at the compose
//! services.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_yaml_ng::Value;
use sluice_tests::services::repo_root;

fn load_yaml(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn compose() -> anyhow::Result<Value> {
    load_yaml(&repo_root().join("docker-compose.yml"))
}

fn service<'a>(compose: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .ok_or_else(|| anyhow!("docker-compose.yml has no service {name:?}"))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    cur.as_str()
}

/// Host paths of bind mounts (short `src:dst[:mode]` with a path-like source, or long syntax
/// with `type: bind`), resolved against the compose file's directory.
fn bind_mounts(service: &Value) -> anyhow::Result<Vec<PathBuf>> {
    let root = repo_root();
    let mut out = Vec::new();
    let Some(volumes) = service.get("volumes") else {
        return Ok(out);
    };
    let volumes = volumes
        .as_sequence()
        .ok_or_else(|| anyhow!("volumes must be a list"))?;
    for v in volumes {
        let source = match v {
            Value::String(s) => {
                let src = s.split(':').next().unwrap_or_default();
                if src.starts_with('.') || src.starts_with('/') || src.starts_with('~') {
                    Some(src.to_string())
                } else {
                    None // a named volume
                }
            }
            Value::Mapping(_) if str_at(v, &["type"]) == Some("bind") => Some(
                str_at(v, &["source"])
                    .ok_or_else(|| anyhow!("bind mount without source: {v:?}"))?
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(src) = source {
            if !src.starts_with('.') {
                bail!("bind mount {src} must be relative to the repository");
            }
            out.push(root.join(src));
        }
    }
    Ok(out)
}

#[test]
fn compose_has_the_three_services_with_official_images() -> anyhow::Result<()> {
    let c = compose()?;
    let kafka_image = str_at(service(&c, "kafka")?, &["image"]).unwrap_or_default();
    assert!(
        kafka_image.starts_with("apache/kafka:"),
        "kafka must use the official apache/kafka image, not {kafka_image:?}"
    );
    let ch_image = str_at(service(&c, "clickhouse")?, &["image"]).unwrap_or_default();
    assert!(
        ch_image.starts_with("clickhouse/clickhouse-server:"),
        "clickhouse must use the official clickhouse/clickhouse-server image, not {ch_image:?}"
    );
    let sluice = service(&c, "sluice")?;
    assert!(
        sluice.get("build").is_some(),
        "sluice is built from the repo"
    );

    // Every pulled image is one of the official ones (the init job reuses the Kafka image).
    let services = c
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or_else(|| anyhow!("services must be a mapping"))?;
    for (name, svc) in services {
        if svc.get("build").is_some() {
            continue;
        }
        let image = str_at(svc, &["image"]).unwrap_or_default();
        assert!(
            image.starts_with("apache/kafka:")
                || image.starts_with("clickhouse/clickhouse-server:"),
            "service {name:?} uses a non-official image {image:?}"
        );
        assert!(
            !image.ends_with(":latest") && image.contains(':'),
            "service {name:?}: pin the image tag ({image:?})"
        );
    }
    Ok(())
}

#[test]
fn compose_references_existing_files() -> anyhow::Result<()> {
    let c = compose()?;
    let root = repo_root();
    let services = c
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or_else(|| anyhow!("services must be a mapping"))?;
    let mut mounts = 0;
    for (name, svc) in services {
        for path in bind_mounts(svc)? {
            assert!(
                path.exists(),
                "service {name:?} bind-mounts {} which does not exist",
                path.display()
            );
            mounts += 1;
        }
        if let Some(build) = svc.get("build") {
            let (context, dockerfile) = match build {
                Value::String(ctx) => (ctx.as_str(), "Dockerfile"),
                _ => (
                    str_at(build, &["context"]).unwrap_or("."),
                    str_at(build, &["dockerfile"]).unwrap_or("Dockerfile"),
                ),
            };
            let context = root.join(context);
            assert!(
                context.is_dir(),
                "service {name:?}: no build context {context:?}"
            );
            let dockerfile = context.join(dockerfile);
            assert!(dockerfile.is_file(), "service {name:?}: no {dockerfile:?}");
        }
    }
    assert!(
        mounts >= 2,
        "expected the pipeline and the ClickHouse init SQL to be mounted"
    );
    Ok(())
}

#[test]
fn dockerfile_matches_the_workspace() -> anyhow::Result<()> {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    let cargo: toml_like::Manifest = toml_like::read(&root.join("Cargo.toml"))?;
    assert!(
        dockerfile.contains(&format!("FROM rust:{}", cargo.rust_version)),
        "the builder image must use the workspace's rust-version {}",
        cargo.rust_version
    );
    assert!(
        dockerfile.contains("libclang-dev"),
        "rocksdb needs libclang-dev"
    );
    assert!(
        dockerfile.contains("wasm32-wasip2"),
        "the plugin is built for wasm32-wasip2"
    );

    // The plugin path in the mounted pipeline is where the image puts the plugin.
    let pipeline = load_yaml(&root.join("deploy/pipeline.yaml"))?;
    let stages = pipeline
        .get("stages")
        .and_then(Value::as_sequence)
        .ok_or_else(|| anyhow!("deploy/pipeline.yaml: stages must be a list"))?;
    for stage in stages {
        if let Some(plugin) = str_at(stage, &["wasm", "plugin"]) {
            assert!(
                dockerfile.contains(plugin),
                "deploy/pipeline.yaml uses plugin {plugin} that the Dockerfile does not install"
            );
        }
    }
    Ok(())
}

#[test]
fn pipeline_points_at_compose_services() -> anyhow::Result<()> {
    let root = repo_root();
    let c = compose()?;
    let pipeline = load_yaml(&root.join("deploy/pipeline.yaml"))?;

    let brokers = str_at(&pipeline, &["kafka", "brokers"])
        .ok_or_else(|| anyhow!("deploy/pipeline.yaml: kafka.brokers missing"))?;
    let kafka_env = service(&c, "kafka")?
        .get("environment")
        .ok_or_else(|| anyhow!("kafka service has no environment"))?;
    let advertised = str_at(kafka_env, &["KAFKA_ADVERTISED_LISTENERS"]).unwrap_or_default();
    for b in brokers.split(',') {
        assert!(
            advertised.contains(&format!("://{b}")),
            "pipeline broker {b} is not among the advertised listeners {advertised}"
        );
    }

    let url = str_at(&pipeline, &["sink", "clickhouse", "url"])
        .ok_or_else(|| anyhow!("deploy/pipeline.yaml: sink.clickhouse.url missing"))?;
    assert_eq!(url, "http://clickhouse:8123");
    service(&c, "clickhouse")?;

    // The table the pipeline writes to is created by the mounted init SQL.
    let database = str_at(&pipeline, &["sink", "clickhouse", "database"]).unwrap_or("default");
    let table = str_at(&pipeline, &["sink", "clickhouse", "table"])
        .ok_or_else(|| anyhow!("deploy/pipeline.yaml: sink.clickhouse.table missing"))?;
    let init = std::fs::read_to_string(root.join("demo/schema.sql"))?;
    assert_eq!(database, "default");
    assert!(
        init.contains(&format!("CREATE TABLE IF NOT EXISTS {table}")),
        "demo/schema.sql (mounted as the init SQL) does not create {table}"
    );
    assert!(
        init.contains("non_replicated_deduplication_window"),
        "the demo table needs a deduplication window for exactly-once inserts"
    );

    // And the dead-letter topic is created by the init job.
    if let Some(dlq) = str_at(&pipeline, &["dead_letter", "topic"]) {
        let init_job = serde_yaml_ng::to_string(service(&c, "kafka-init")?)?;
        assert!(init_job.contains(dlq), "kafka-init does not create {dlq}");
    }
    Ok(())
}

/// Just enough of Cargo.toml: the workspace's rust-version (no TOML parser in the workspace).
mod toml_like {
    use super::*;

    pub struct Manifest {
        pub rust_version: String,
    }

    pub fn read(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)?;
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("rust-version"))
            .ok_or_else(|| anyhow!("no rust-version in {}", path.display()))?;
        let rust_version = line
            .split('=')
            .nth(1)
            .map(|v| v.trim().trim_matches('"').to_string())
            .ok_or_else(|| anyhow!("bad rust-version line {line:?}"))?;
        Ok(Manifest { rust_version })
    }
}

/// The mounted pipeline is a valid sluice config (parsed by sluice itself, unknown keys and
/// all), so the compose file cannot drift from the config format.
#[test]
fn mounted_pipeline_parses_with_sluice() -> anyhow::Result<()> {
    let path = repo_root().join("deploy/pipeline.yaml");
    let text = std::fs::read_to_string(&path)?;
    let cfg = sluice::config::LoadedConfig::from_str(&path, &text)?;
    assert_eq!(cfg.pipeline.kafka.brokers, "kafka:9092");
    assert_eq!(cfg.pipeline.stages.len(), 1);
    // The demo pipeline parses too (its variables all have defaults).
    let demo = repo_root().join("demo/pipeline.yaml");
    sluice::config::LoadedConfig::from_str(&demo, &std::fs::read_to_string(&demo)?)?;
    Ok(())
}

/// The demo's reference pipeline is the one the bench's full path measures
/// (`sluice_tests::bench::full::stages`), and it parses with sluice.
#[test]
fn demo_reference_pipeline_is_the_benchmarked_one() -> anyhow::Result<()> {
    let path = repo_root().join("demo/reference.yaml");
    let text = std::fs::read_to_string(&path)?;
    sluice::config::LoadedConfig::from_str(&path, &text)?;
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&text)?;
    let mut stages = yaml
        .get("stages")
        .cloned()
        .ok_or_else(|| anyhow!("demo/reference.yaml has no stages"))?;
    // The plugin path is the demo's (an environment variable with a default).
    let plugin = stages
        .pointer_mut("/1/wasm/plugin")
        .ok_or_else(|| anyhow!("stage 2 of demo/reference.yaml is not the wasm plugin"))?;
    *plugin = serde_json::json!("enrich.wasm");
    let expected = sluice_tests::bench::full::stages(Path::new("enrich.wasm"), "ref-users");
    assert_eq!(stages, expected);
    Ok(())
}
