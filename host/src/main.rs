//! The `sluice` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use sluice::config::LoadedConfig;
use sluice::dlq::DeadLetterQueue;
use sluice::pipeline::{Pipeline, PipelineError};
use sluice::sink::clickhouse::writer::ClickHouseSink;
use sluice::stage::wasm::PluginRuntime;
use sluice::state::StateStore;
use sluice::validate::{validate, Checks};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Kafka → dedup, joins, WASM plugins → ClickHouse, exactly once"
)]
struct Cli {
    /// Log filter (`info`, `sluice=debug`, ...); `RUST_LOG` works too.
    #[arg(long, global = true, env = "SLUICE_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run pipelines until interrupted (SIGINT/SIGTERM flush and stop cleanly). Several `-c`
    /// run several pipelines in one process, isolated from each other: one whose plugin trips
    /// its circuit breaker pauses alone.
    Run {
        /// Pipeline file (YAML); repeat for more pipelines.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
    },
    /// Check a pipeline file, its plugins, its ClickHouse tables and its Kafka topics.
    Validate {
        #[arg(short, long)]
        config: PathBuf,
        /// Only check the file and the plugins (no connection to ClickHouse or Kafka).
        #[arg(long)]
        offline: bool,
    },
}

fn init_logging(filter: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, &cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run { config } => run(&config).await,
            Command::Validate { config, offline } => validate_cmd(&config, offline).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime_for(cfg: &LoadedConfig) -> anyhow::Result<PluginRuntime> {
    Ok(PluginRuntime::new(Some(
        cfg.state_dir().join("plugin-cache"),
    ))?)
}

async fn build_pipeline(cfg: LoadedConfig, runtime: &PluginRuntime) -> anyhow::Result<Pipeline> {
    let p = cfg.pipeline.clone();
    let stages = sluice::stage::build(&cfg, runtime)
        .with_context(|| format!("{}: building stages", cfg.path.display()))?;
    let sink = ClickHouseSink::connect(&p.sink.clickhouse).await?;
    check_columns(&cfg, &sink)?;
    let state = StateStore::open(&cfg.state_dir())?;
    DeadLetterQueue::ensure_topic(&p.kafka, &p.dead_letter.topic).await?;
    let dlq = DeadLetterQueue::connect(&p.kafka, &p.dead_letter.topic, &p.name)?;
    Ok(Pipeline::new(cfg, stages, sink, dlq, state))
}

async fn run(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut cfgs = Vec::new();
    for path in paths {
        cfgs.push(LoadedConfig::load(path)?);
    }
    let Some(first) = cfgs.first() else {
        anyhow::bail!("no pipeline file given");
    };
    // One engine for all pipelines: plugins are compiled once, epochs tick once.
    let runtime = Arc::new(runtime_for(first)?);
    let mut names = std::collections::HashSet::new();
    for c in &cfgs {
        if !names.insert(c.pipeline.name.clone()) {
            anyhow::bail!(
                "{}: pipeline name {:?} is used twice",
                c.path.display(),
                c.pipeline.name
            );
        }
    }
    let mut pipelines = Vec::new();
    for cfg in cfgs {
        let name = cfg.pipeline.name.clone();
        pipelines.push((name, build_pipeline(cfg, &runtime).await?));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (name, pipeline) in pipelines {
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            (name, pipeline.run(stop).await)
        });
    }
    let mut failed = false;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(pipeline = %name, "stopped cleanly"),
            Ok((name, Err(PipelineError::Stage(e)))) if e.breaker_open => {
                failed = true;
                tracing::error!(pipeline = %name, "pipeline PAUSED: {e}");
                eprintln!("sluice: pipeline {name} paused: {e}");
            }
            Ok((name, Err(e))) => {
                failed = true;
                tracing::error!(pipeline = %name, "pipeline stopped: {e}");
                eprintln!("error: pipeline {name} stopped: {e}");
            }
            Err(e) => {
                failed = true;
                eprintln!("error: pipeline task failed: {e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Declared column types are checked at start too: a schema change is a clear startup error,
/// not a stream of dead letters.
fn check_columns(cfg: &LoadedConfig, sink: &ClickHouseSink) -> anyhow::Result<()> {
    let ch = &cfg.pipeline.sink.clickhouse;
    let Some((_, table)) = sink.tables().find(|(n, _)| **n == ch.table) else {
        return Ok(());
    };
    for (name, expected) in &ch.columns {
        let norm = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        match table.schema.column(name) {
            None => anyhow::bail!(
                "{}: sink.clickhouse.columns.{name}: table {} has no column {name:?}",
                cfg.path.display(),
                ch.table
            ),
            Some(c) if norm(&c.type_name) != norm(expected) => anyhow::bail!(
                "{}: sink.clickhouse.columns.{name}: column has type {} in ClickHouse, the pipeline expects {expected}",
                cfg.path.display(),
                c.type_name
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested: flushing open batches");
}

async fn validate_cmd(path: &Path, offline: bool) -> anyhow::Result<ExitCode> {
    let cfg = match LoadedConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let runtime = runtime_for(&cfg)?;
    let report = validate(
        &cfg,
        &runtime,
        Checks {
            clickhouse: !offline,
            kafka: !offline,
        },
    )
    .await;
    for n in &report.notes {
        println!("ok: {n}");
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if report.ok() {
        println!(
            "{}: valid ({} warning(s))",
            path.display(),
            report.warnings.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{}: {} error(s), {} warning(s)",
            path.display(),
            report.errors.len(),
            report.warnings.len()
        );
        Ok(ExitCode::FAILURE)
    }
}
