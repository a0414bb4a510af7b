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
    /// Inspect and replay the dead-letter topic of a pipeline.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
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

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter: position, stage, kind, source, message.
    List {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        partition: Option<i32>,
        /// First dead-letter offset to show.
        #[arg(long)]
        from: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter in full: headers, key and value.
    Show {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, default_value_t = 0)]
        partition: i32,
        #[arg(long)]
        offset: i64,
    },
    /// Re-run dead letters through the pipeline's stages (e.g. after fixing a plugin) into
    /// ClickHouse, without duplicating rows already there: progress is kept beside the
    /// pipeline's state, so dead letters are replayed once. Records that fail again go back to
    /// the dead-letter topic (and can be replayed after the next fix).
    Replay {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        partition: Option<i32>,
        #[arg(long)]
        from: Option<i64>,
        /// Last dead-letter offset (inclusive).
        #[arg(long)]
        to: Option<i64>,
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
            Command::Dlq { command } => dlq_cmd(command).await,
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
    let state = StateStore::open_with(&cfg.state_dir(), cfg.pipeline.state.memory())?;
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

async fn dlq_cmd(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    use sluice::dlq::tools::{self, Selection};
    match cmd {
        DlqCommand::List {
            config,
            partition,
            from,
            limit,
        } => {
            let cfg = LoadedConfig::load(&config)?;
            let p = cfg.pipeline;
            let sel = Selection {
                partition,
                from,
                to: None,
                limit: Some(limit),
            };
            let entries = tokio::task::spawn_blocking(move || {
                tools::read(&p.kafka, &p.dead_letter.topic, &sel)
            })
            .await??;
            println!("PARTITION\tOFFSET\tSTAGE\tKIND\tSOURCE\tMESSAGE");
            for e in &entries {
                let h = |k: &str| e.header(k).unwrap_or_default();
                let mut msg = h(sluice::dlq::H_MESSAGE);
                if msg.len() > 160 {
                    let cut = (0..=160)
                        .rev()
                        .find(|i| msg.is_char_boundary(*i))
                        .unwrap_or(0);
                    msg.truncate(cut);
                    msg.push('…');
                }
                println!(
                    "{}\t{}\t{}\t{}\t{}/{}@{}\t{}",
                    e.partition,
                    e.offset,
                    h(sluice::dlq::H_STAGE),
                    h(sluice::dlq::H_KIND),
                    h(sluice::dlq::H_TOPIC),
                    h(sluice::dlq::H_PARTITION),
                    h(sluice::dlq::H_OFFSET),
                    msg
                );
            }
            eprintln!("{} dead letter(s)", entries.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            config,
            partition,
            offset,
        } => {
            let cfg = LoadedConfig::load(&config)?;
            let p = cfg.pipeline;
            let sel = Selection {
                partition: Some(partition),
                from: Some(offset),
                to: Some(offset),
                limit: Some(1),
            };
            let entries = tokio::task::spawn_blocking(move || {
                tools::read(&p.kafka, &p.dead_letter.topic, &sel)
            })
            .await??;
            let Some(e) = entries.first() else {
                anyhow::bail!("no dead letter at partition {partition} offset {offset}");
            };
            println!("partition: {}\noffset: {}", e.partition, e.offset);
            for h in &e.headers {
                println!("header {}: {}", h.key, String::from_utf8_lossy(&h.value));
            }
            if let Some(k) = &e.key {
                println!("key: {}", String::from_utf8_lossy(k));
            }
            println!("value: {}", String::from_utf8_lossy(&e.value));
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            config,
            partition,
            from,
            to,
        } => {
            let cfg = LoadedConfig::load(&config)?;
            let p = cfg.pipeline.clone();
            let runtime = runtime_for(&cfg)?;
            let mut stages = sluice::stage::build(&cfg, &runtime)?;
            let sink = ClickHouseSink::connect(&p.sink.clickhouse).await?;
            let dlq = DeadLetterQueue::connect(&p.kafka, &p.dead_letter.topic, &p.name)?;
            // Scratch state: the running pipeline holds its own store's lock.
            let scratch = tempfile_dir()?;
            let state = StateStore::open(&scratch)?;
            let sel = Selection {
                partition,
                from,
                to,
                limit: None,
            };
            let progress = cfg.state_dir().join("dlq-replay-progress.json");
            std::fs::create_dir_all(cfg.state_dir())?;
            let report = sluice::dlq::tools::replay(
                &p.name,
                &p.kafka,
                &dlq,
                &sel,
                &mut stages,
                &sink,
                &state,
                &progress,
            )
            .await
            .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
            drop(state);
            let _ = std::fs::remove_dir_all(&scratch);
            println!(
                "replayed {} dead letter(s) in {} chunk(s): {} row(s) inserted, {} dead-lettered again, {} skipped (replayed before)",
                report.replayed, report.chunks, report.rows_inserted, report.dead_again, report.already_replayed
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A private scratch directory for replay state.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "sluice-replay-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
