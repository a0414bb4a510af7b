//! The `sluice` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use reqwest::Method;
use sluice::api::client::ApiClient;
use sluice::api::{ApiConfig, ApiState};
use sluice::config::LoadedConfig;
use sluice::dlq::DeadLetterQueue;
use sluice::pipeline::control::PipelineHandle;
use sluice::pipeline::{Pipeline, PipelineError};
use sluice::plugin_store::PluginStore;
use sluice::sink::clickhouse::writer::ClickHouseSink;
use sluice::stage::wasm::PluginRuntime;
use sluice::state::changelog::Changelog;
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
        #[command(flatten)]
        api: ServeArgs,
    },
    /// Show, pause or resume pipelines of a running sluice (over its HTTP API).
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
        #[command(flatten)]
        api: ClientArgs,
    },
    /// Print the control plane's OpenAPI document (docs/openapi.json).
    Openapi,
    /// Move a stopped pipeline back to an offset or a point in time on one topic. Records
    /// delivered before are recognised when they come again: the dedup stage drops those
    /// still inside its window (docs/reliability.md).
    Rewind {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        topic: String,
        /// Only this partition (default: all).
        #[arg(long)]
        partition: Option<i32>,
        /// An offset, or `earliest`.
        #[arg(long, conflicts_with = "to_time", required_unless_present = "to_time")]
        to_offset: Option<String>,
        /// RFC 3339 time or milliseconds since the epoch: the first record at or after it.
        #[arg(long)]
        to_time: Option<String>,
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
    /// Write, build and test WebAssembly plugins (docs/plugins.md).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

/// Control-plane options of `sluice run`.
#[derive(clap::Args)]
struct ServeArgs {
    /// Serve the HTTP control plane on this address (e.g. 127.0.0.1:8080). Off if not set.
    #[arg(long, env = "SLUICE_API_LISTEN")]
    api_listen: Option<std::net::SocketAddr>,
    /// Accepted bearer token (repeat, or comma-separate in the variable). Required to listen
    /// on a non-loopback address.
    #[arg(
        long = "api-token",
        env = "SLUICE_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_tokens: Vec<String>,
    /// A file with one accepted bearer token per line.
    #[arg(long, env = "SLUICE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Largest plugin upload accepted (larger: 413).
    #[arg(long, env = "SLUICE_MAX_UPLOAD_MB", default_value_t = 64)]
    max_upload_mb: usize,
    /// Where uploaded plugins and each stage's selected version are kept (default:
    /// `plugin-store` in the first pipeline's state directory).
    #[arg(long, env = "SLUICE_PLUGIN_STORE")]
    plugin_store: Option<PathBuf>,
}

/// How the CLI reaches a running sluice.
#[derive(clap::Args)]
struct ClientArgs {
    /// Base URL of the control plane.
    #[arg(
        long,
        global = true,
        env = "SLUICE_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// Bearer token.
    #[arg(long, global = true, env = "SLUICE_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Status of one pipeline, or of all.
    Status { name: Option<String> },
    /// Flush open batches and stop consuming.
    Pause { name: String },
    /// Resume a paused pipeline (also after its circuit breaker tripped).
    Resume { name: String },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Upload a component to a running sluice's plugin store (validated, precompiled,
    /// versioned); prints the stored version.
    Push {
        name: String,
        file: PathBuf,
        /// Config (JSON) the upload check runs `init` with; default `{}`.
        #[arg(long)]
        config: Option<String>,
        #[command(flatten)]
        api: ClientArgs,
    },
    /// List stored plugins and versions.
    List {
        #[command(flatten)]
        api: ClientArgs,
    },
    /// Hot-swap a stage of a running pipeline to a stored version (at the next batch).
    Swap {
        pipeline: String,
        stage: String,
        name: String,
        version: u32,
        #[command(flatten)]
        api: ClientArgs,
    },
    /// Restore the stage's previous plugin.
    Rollback {
        pipeline: String,
        stage: String,
        #[command(flatten)]
        api: ClientArgs,
    },
    /// Shadow runs: `start NAME VERSION`, `report`, `stop [--promote]`.
    Shadow {
        pipeline: String,
        stage: String,
        #[command(subcommand)]
        action: ShadowAction,
        #[command(flatten)]
        api: ClientArgs,
    },
    /// Create a plugin project from a template: the source, `build.sh` (installs its toolchain
    /// on first use), `fixtures/` for `sluice plugin test`, `wit/plugin.wit`.
    New {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(sluice::devtools::Lang::NAMES))]
        lang: String,
        /// The plugin's name: lowercase letters, digits, `_`, `-`; the component is
        /// `target/NAME.wasm`.
        name: String,
        /// The project directory (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rust: the `guest-sdk/` directory to depend on (default: the sluice checkout the
        /// project is in, else the one this binary was built from, else a git dependency).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project (runs its `build.sh`) and check the component against the plugin
    /// world. Prints the component's path on stdout.
    Build {
        /// The project directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Run a plugin on fixture records through the real sandbox (the same stage, limits and
    /// error handling as `sluice run`) and diff its rows and per-record errors against the
    /// expected ones; exits non-zero on any difference.
    Test {
        /// The component (`.wasm`).
        plugin: PathBuf,
        /// Input records, one JSON object per line.
        #[arg(long)]
        input: PathBuf,
        /// Expected outputs, one JSON object per line.
        #[arg(long)]
        expect: PathBuf,
        /// The stage's config (JSON) for inputs that name none; default `{}`.
        #[arg(long)]
        config: Option<String>,
        /// A JSON file `{"configs": {NAME: CONFIG, ...}, "accepted": [...], "refused": [...]}`:
        /// configs inputs name with `"config": NAME`, and configs init must accept or refuse.
        #[arg(long)]
        configs: Option<PathBuf>,
        /// Write the actual outputs to the --expect file instead of comparing (then review it).
        #[arg(long)]
        update: bool,
    },
}

#[derive(Subcommand)]
enum ShadowAction {
    /// Run a stored version beside the live plugin on the same records.
    Start { name: String, version: u32 },
    /// Differences so far.
    Report,
    /// End the shadow run; `--promote` swaps the candidate in.
    Stop {
        #[arg(long)]
        promote: bool,
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
    sluice::memory::tune_allocator();
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
            Command::Run { config, api } => run(&config, api).await,
            Command::Pipeline { command, api } => pipeline_cmd(command, api).await,
            Command::Rewind {
                config,
                topic,
                partition,
                to_offset,
                to_time,
            } => rewind_cmd(&config, &topic, partition, to_offset, to_time).await,
            Command::Openapi => {
                println!("{}", sluice::api::openapi::document());
                Ok(ExitCode::SUCCESS)
            }
            Command::Validate { config, offline } => validate_cmd(&config, offline).await,
            Command::Dlq { command } => dlq_cmd(command).await,
            Command::Plugin { command } => plugin_cmd(command).await,
        }
    });
    // A blocking task still running (a consumer close or restore that outlived its patience)
    // must not keep the process alive once the command is done.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
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

async fn build_pipeline(
    cfg: LoadedConfig,
    runtime: &Arc<PluginRuntime>,
    store: &Arc<PluginStore>,
) -> anyhow::Result<(Pipeline, Arc<PipelineHandle>)> {
    let p = cfg.pipeline.clone();
    let sink = ClickHouseSink::connect(&p.sink.clickhouse).await?;
    check_columns(&cfg, &sink)?;
    let state = StateStore::open_with(&cfg.state_dir(), cfg.pipeline.state.memory())?;
    DeadLetterQueue::ensure_topic(&p.kafka, &p.dead_letter.topic).await?;
    // Dead letters are committed in one transaction with the batch's offsets (with a
    // changelog, in the changelog's transaction; this producer then only serves batches
    // journaled before the changelog was configured).
    let id = format!(
        "sluice.{}.{}.{}",
        p.kafka.group_id,
        p.dead_letter.topic,
        cfg.instance_identity()
    );
    let (kafka, topic, name) = (p.kafka.clone(), p.dead_letter.topic.clone(), p.name.clone());
    let dlq = tokio::task::spawn_blocking(move || {
        DeadLetterQueue::connect_transactional(&kafka, &topic, &name, &id)
    })
    .await??;
    let mut pipeline = Pipeline::new(cfg.clone(), sink, dlq, state);
    if let Some(c) = &p.state.changelog {
        let mut topics = p.kafka.topics.clone();
        topics.extend(
            p.stages
                .iter()
                .filter_map(|s| s.join.as_ref().map(|j| j.side_topic().to_string())),
        );
        pipeline = pipeline.with_changelog(Changelog::connect(&p.kafka, c, &topics).await?);
    }
    let handle = PipelineHandle::new(cfg, &pipeline, runtime.clone(), Some(store.clone()));
    // Build the stages once now (plugins as selected in the store), so that a plugin its
    // config refuses is an error at start, not a pipeline that never runs.
    handle
        .check_stages()
        .with_context(|| format!("{}: building stages", handle.cfg.path.display()))?;
    Ok((pipeline, handle))
}

fn api_config(args: &ServeArgs) -> anyhow::Result<Option<ApiConfig>> {
    let Some(listen) = args.api_listen else {
        return Ok(None);
    };
    let mut tokens: Vec<String> = args
        .api_tokens
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(f) = &args.api_token_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading API token file {}", f.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let cfg = ApiConfig {
        listen,
        tokens,
        max_upload_bytes: args.max_upload_mb.saturating_mul(1 << 20),
    };
    cfg.check().map_err(anyhow::Error::msg)?;
    Ok(Some(cfg))
}

async fn run(paths: &[PathBuf], args: ServeArgs) -> anyhow::Result<ExitCode> {
    let api = api_config(&args)?;
    let mut cfgs = Vec::new();
    for path in paths {
        cfgs.push(LoadedConfig::load(path)?);
    }
    let Some(first) = cfgs.first() else {
        anyhow::bail!("no pipeline file given");
    };
    // One engine for all pipelines: plugins are compiled once, epochs tick once.
    let runtime = Arc::new(runtime_for(first)?);
    let store_dir = args
        .plugin_store
        .clone()
        .unwrap_or_else(|| first.state_dir().join("plugin-store"));
    let store = Arc::new(PluginStore::open(&store_dir)?);
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
        pipelines.push(build_pipeline(cfg, &runtime, &store).await?);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_api = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        // A flush can wait on ClickHouse or the broker for minutes (everything in flight is in
        // the journal, so stopping is always safe): say so, and let a second signal end it.
        let started = std::time::Instant::now();
        let nag = async {
            tokio::time::sleep(std::time::Duration::from_secs(20)).await;
            loop {
                tracing::warn!(
                    "shutdown requested {} s ago, still delivering the batches in flight (a second SIGTERM/SIGINT exits now; the journal re-sends them on the next start)",
                    started.elapsed().as_secs()
                );
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        };
        tokio::select! {
            _ = nag => {}
            _ = shutdown_signal() => {
                tracing::warn!("second shutdown signal: exiting without finishing the batches in flight");
                std::process::exit(1);
            }
        }
    });
    let mut api_task = None;
    if let Some(api) = api {
        let state = Arc::new(ApiState {
            pipelines: pipelines
                .iter()
                .map(|(_, h)| (h.name().to_string(), h.clone()))
                .collect(),
            store: store.clone(),
            runtime: runtime.clone(),
            tokens: api.tokens.clone(),
            max_upload_bytes: api.max_upload_bytes,
        });
        let mut rx = stop_api.subscribe();
        let listener = tokio::net::TcpListener::bind(api.listen)
            .await
            .with_context(|| format!("control plane: cannot listen on {}", api.listen))?;
        api_task = Some(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            sluice::api::serve(listener, &api, state, stop).await
        }));
    }
    let mut tasks = tokio::task::JoinSet::new();
    let hold = api_task.is_some();
    for (pipeline, handle) in pipelines {
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            let name = handle.name().to_string();
            (name, handle.supervise(pipeline, rx, hold).await)
        });
    }
    let mut failed = false;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(pipeline = %name, "stopped cleanly"),
            Ok((name, Err(PipelineError::Stage(e)))) if e.breaker_open => {
                failed = true;
                tracing::error!(pipeline = %name, "pipeline was paused by its circuit breaker: {e}");
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
    // Every pipeline ended (stopped or failed): the API goes with them.
    let _ = stop_api.send(true);
    if let Some(t) = api_task {
        match t.await {
            Ok(Err(e)) => eprintln!("error: control plane: {e}"),
            Err(e) => eprintln!("error: control plane task: {e}"),
            Ok(Ok(())) => {}
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

/// Prints an API answer as pretty JSON; API errors become the command's error.
fn print_json(v: &serde_json::Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

fn client(api: &ClientArgs) -> ApiClient {
    ApiClient::new(&api.api, api.token.clone())
}

async fn pipeline_cmd(cmd: PipelineCommand, api: ClientArgs) -> anyhow::Result<ExitCode> {
    let c = client(&api);
    let v = match cmd {
        PipelineCommand::Status { name: None } => c.get("/v1/pipelines").await?,
        PipelineCommand::Status { name: Some(n) } => c.get(&format!("/v1/pipelines/{n}")).await?,
        PipelineCommand::Pause { name } => {
            c.call(
                Method::POST,
                &format!("/v1/pipelines/{name}/pause"),
                None,
                None,
            )
            .await?
        }
        PipelineCommand::Resume { name } => {
            c.call(
                Method::POST,
                &format!("/v1/pipelines/{name}/resume"),
                None,
                None,
            )
            .await?
        }
    };
    print_json(&v)
}

async fn plugin_cmd(cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    use sluice::devtools;
    match cmd {
        PluginCommand::Push {
            name,
            file,
            config,
            api,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut path = format!("/v1/plugins/{name}");
            if let Some(c) = config {
                let encoded: String = url_encode(&c);
                path.push_str(&format!("?config={encoded}"));
            }
            let v = client(&api)
                .call(Method::POST, &path, None, Some((bytes, "application/wasm")))
                .await?;
            print_json(&v)
        }
        PluginCommand::List { api } => print_json(&client(&api).get("/v1/plugins").await?),
        PluginCommand::Swap {
            pipeline,
            stage,
            name,
            version,
            api,
        } => {
            let body = serde_json::json!({"name": name, "version": version});
            let v = client(&api)
                .call(
                    Method::PUT,
                    &format!("/v1/pipelines/{pipeline}/stages/{stage}/plugin"),
                    Some(&body),
                    None,
                )
                .await?;
            print_json(&v)
        }
        PluginCommand::Rollback {
            pipeline,
            stage,
            api,
        } => {
            let v = client(&api)
                .call(
                    Method::POST,
                    &format!("/v1/pipelines/{pipeline}/stages/{stage}/rollback"),
                    None,
                    None,
                )
                .await?;
            print_json(&v)
        }
        PluginCommand::Shadow {
            pipeline,
            stage,
            action,
            api,
        } => {
            let path = format!("/v1/pipelines/{pipeline}/stages/{stage}/shadow");
            let c = client(&api);
            let v = match action {
                ShadowAction::Start { name, version } => {
                    let body = serde_json::json!({"name": name, "version": version});
                    c.call(Method::POST, &path, Some(&body), None).await?
                }
                ShadowAction::Report => c.get(&path).await?,
                ShadowAction::Stop { promote } => {
                    c.call(
                        Method::DELETE,
                        &format!("{path}?promote={promote}"),
                        None,
                        None,
                    )
                    .await?
                }
            };
            print_json(&v)
        }
        PluginCommand::New {
            lang,
            name,
            dir,
            sdk,
        } => {
            let lang = lang.parse().map_err(anyhow::Error::msg)?;
            let opts = devtools::NewOptions {
                lang,
                name,
                dir,
                sdk,
            };
            println!("{}", devtools::new_project(&opts)?);
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Build { dir } => {
            let built =
                tokio::task::spawn_blocking(move || devtools::build_project(&dir)).await??;
            eprintln!("{}", built.summary());
            println!("{}", built.wasm.display());
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test {
            plugin,
            input,
            expect,
            config,
            configs,
            update,
        } => {
            let config = match config {
                Some(text) => serde_json::from_str(&text).context("--config is not JSON")?,
                None => serde_json::Value::Null,
            };
            let opts = devtools::TestOptions {
                plugin,
                input,
                expect,
                config,
                configs,
                update,
            };
            // Plugins run synchronously (their WASI calls may block), as in the engine.
            let report = tokio::task::spawn_blocking(move || devtools::run_test(&opts)).await??;
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn rewind_cmd(
    config: &Path,
    topic: &str,
    partition: Option<i32>,
    to_offset: Option<String>,
    to_time: Option<String>,
) -> anyhow::Result<ExitCode> {
    use sluice::source::rewind::{rewind, Target};
    let cfg = LoadedConfig::load(config)?;
    let target = match (to_offset.as_deref(), to_time.as_deref()) {
        (Some("earliest"), _) => Target::Earliest,
        (Some(o), _) => Target::Offset(
            o.parse()
                .with_context(|| format!("--to-offset {o:?}: an offset or `earliest`"))?,
        ),
        (None, Some(t)) => Target::Time(match t.parse::<i64>() {
            Ok(ms) => ms,
            Err(_) => {
                let at =
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .with_context(|| {
                            format!("--to-time {t:?}: RFC 3339 or epoch milliseconds")
                        })?;
                i64::try_from(at.unix_timestamp_nanos() / 1_000_000)?
            }
        }),
        (None, None) => anyhow::bail!("give --to-offset or --to-time"),
    };
    let state = StateStore::open_with(&cfg.state_dir(), cfg.pipeline.state.memory()).with_context(
        || {
            format!(
                "opening the state of pipeline {:?} (stop it first)",
                cfg.pipeline.name
            )
        },
    )?;
    let kafka = cfg.pipeline.kafka.clone();
    let instance = cfg.instance_id();
    let topic = topic.to_string();
    let done = tokio::task::spawn_blocking(move || {
        rewind(&kafka, &instance, &state, &topic, partition, target)
    })
    .await??;
    println!("PARTITION\tREWOUND TO\tDELIVERED BELOW");
    for r in &done {
        println!(
            "{}\t{}\t{}",
            r.partition,
            r.to,
            r.delivered_below.map_or("-".to_string(), |o| o.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
