//! The `sluice` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use sluice::config::LoadedConfig;
use sluice::dlq::DeadLetterQueue;
use sluice::pipeline::Pipeline;
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
    /// Run a pipeline until interrupted (SIGINT/SIGTERM flush and stop cleanly).
    Run {
        /// Pipeline file (YAML).
        #[arg(short, long)]
        config: PathBuf,
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

async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = LoadedConfig::load(path)?;
    let p = cfg.pipeline.clone();
    let runtime = Arc::new(runtime_for(&cfg)?);
    let stages = sluice::stage::build(&cfg, &runtime)?;
    let sink = ClickHouseSink::connect(&p.sink.clickhouse).await?;
    check_columns(&cfg, &sink)?;
    let state = StateStore::open(&cfg.state_dir())?;
    DeadLetterQueue::ensure_topic(&p.kafka, &p.dead_letter.topic).await?;
    let dlq = DeadLetterQueue::connect(&p.kafka, &p.dead_letter.topic, &p.name)?;
    let pipeline = Pipeline::new(cfg, stages, sink, dlq, state);
    pipeline
        .run(shutdown_signal())
        .await
        .context("pipeline stopped")?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
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
