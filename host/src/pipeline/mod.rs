//! The engine: Kafka messages → per-partition batches → stages → ClickHouse, then the
//! dead-letter topic, then the offset commit.
//!
//! Order of effects for one batch (the exactly-once argument):
//! 1. the batch's offset range is written to the journal (synced);
//! 2. stages run and rows are encoded (pure, deterministic for a given input);
//! 3. rows are inserted with a token derived from the offset range;
//! 4. dead letters are produced and acknowledged;
//! 5. `first..=last` is committed to the consumer group;
//! 6. the journal entry is closed.
//!
//! A crash before 5 replays the batch: the source starts again at `first`, the journal says
//! where the batch ended, the same rows are rebuilt and re-sent with the same token, and
//! ClickHouse drops them if step 3 had completed. A crash between 5 and 6 leaves a journal
//! entry behind an already-committed offset; it is recognised and discarded.

mod batch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::LoadedConfig;
use crate::dlq::{DeadLetterQueue, DlqError};
use crate::fault;
use crate::record::{DeadLetter, Record};
use crate::sink::clickhouse::writer::{dedup_token, ClickHouseSink, SinkError};
use crate::source::kafka::{Committer, KafkaSource, RebalanceEvent, SourceError};
use crate::stage::{BatchContext, PartitionKey, Stage, StageError};
use crate::state::{PartitionJournal, StateError, StateStore};
use batch::{Accumulator, SealedBatch};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    DeadLetter(#[from] DlqError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("pipeline worker stopped: {0}")]
    Worker(String),
}

/// Counters for progress lines (and, later, metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub consumed: AtomicU64,
    pub batches: AtomicU64,
    pub rows_inserted: AtomicU64,
    pub dead_letters: AtomicU64,
    pub replayed_batches: AtomicU64,
    pub skipped_records: AtomicU64,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub struct Pipeline {
    cfg: LoadedConfig,
    stages: Vec<Box<dyn Stage>>,
    sink: Arc<ClickHouseSink>,
    dlq: Arc<DeadLetterQueue>,
    state: Arc<StateStore>,
    stats: Arc<Stats>,
}

impl Pipeline {
    pub fn new(
        cfg: LoadedConfig,
        stages: Vec<Box<dyn Stage>>,
        sink: ClickHouseSink,
        dlq: DeadLetterQueue,
        state: StateStore,
    ) -> Self {
        Self {
            cfg,
            stages,
            sink: Arc::new(sink),
            dlq: Arc::new(dlq),
            state: Arc::new(state),
            stats: Arc::new(Stats::default()),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` resolves (then flushes what it holds) or a fatal error occurs.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), PipelineError> {
        let p = &self.cfg.pipeline;
        let (source, mut events) = KafkaSource::connect(&p.kafka, &self.cfg.instance_id())?;
        let (tx, rx) = mpsc::channel::<SealedBatch>(2);
        let worker = Worker {
            pipeline: p.name.clone(),
            stages: Arc::new(Mutex::new(std::mem::take(&mut self.stages))),
            sink: self.sink.clone(),
            dlq: self.dlq.clone(),
            state: self.state.clone(),
            committer: source.committer(),
            stats: self.stats.clone(),
        };
        let mut worker_task = tokio::spawn(worker.run(rx));
        let batch_cfg = p.sink.batch.clone();
        let mut accs: HashMap<PartitionKey, Accumulator> = HashMap::new();
        let mut journals: HashMap<PartitionKey, PartitionJournal> = HashMap::new();
        let tick_every = (batch_cfg.max_age() / 4).max(Duration::from_millis(5));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = Instant::now();
        tokio::pin!(shutdown);
        tracing::info!(pipeline = %p.name, topics = ?p.kafka.topics, "pipeline started");

        let result: Result<(), PipelineError> = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                r = &mut worker_task => break Err(worker_exit(r)),
                Some(ev) = events.recv() => {
                    if let RebalanceEvent::Revoked(parts) = ev {
                        for pk in parts {
                            // Not committed: the next owner replays from the committed offset.
                            accs.remove(&pk);
                            journals.remove(&pk);
                        }
                    }
                }
                m = source.recv() => {
                    let origin = m?;
                    Stats::add(&self.stats.consumed, 1);
                    let pk = PartitionKey { topic: origin.topic.to_string(), partition: origin.partition };
                    if !journals.contains_key(&pk) {
                        let j = self.state.journal(&pk)?;
                        journals.insert(pk.clone(), j);
                    }
                    let Some(journal) = journals.get_mut(&pk) else { continue };
                    if journal.next_offset.is_some_and(|n| origin.offset < n) {
                        // Already inserted and committed (the group's offset was behind the journal).
                        Stats::add(&self.stats.skipped_records, 1);
                        continue;
                    }
                    if let Some(pending) = journal.pending {
                        if origin.offset > pending.last {
                            // The pending batch was committed before the crash: nothing to rebuild.
                            self.state.drop_pending(&pk)?;
                            journal.pending = None;
                        }
                    }
                    let acc = accs.entry(pk.clone()).or_insert_with(|| {
                        let replay = journal.pending.take();
                        if let Some(r) = replay {
                            tracing::info!(partition = %pk, first = r.first, last = r.last, "rebuilding batch from the journal");
                        }
                        Accumulator::new(replay)
                    });
                    acc.push(Record::from_origin(Arc::new(origin)));
                    if acc.is_full(&batch_cfg) {
                        if let Some(sealed) = accs.remove(&pk).and_then(|a| a.seal(&pk)) {
                            if sealed.replay { Stats::add(&self.stats.replayed_batches, 1); }
                            if tx.send(sealed).await.is_err() {
                                break Err(worker_exit((&mut worker_task).await));
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    let aged: Vec<PartitionKey> = accs.iter()
                        .filter(|(_, a)| a.is_aged(&batch_cfg))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for pk in aged {
                        if let Some(sealed) = accs.remove(&pk).and_then(|a| a.seal(&pk)) {
                            if tx.send(sealed).await.is_err() {
                                return Err(worker_exit((&mut worker_task).await));
                            }
                        }
                    }
                    if last_report.elapsed() >= Duration::from_secs(5) {
                        last_report = Instant::now();
                        self.report();
                    }
                }
            }
        };
        if result.is_ok() {
            // Graceful stop: flush complete batches; a half-rebuilt replay batch stays in the
            // journal and is finished by the next run.
            for (pk, acc) in accs.drain() {
                if acc.is_replay() {
                    continue;
                }
                if let Some(sealed) = acc.seal(&pk) {
                    if tx.send(sealed).await.is_err() {
                        break;
                    }
                }
            }
        }
        drop(tx);
        let worker_result = worker_task
            .await
            .map_err(|e| PipelineError::Worker(e.to_string()))?;
        self.report();
        result?;
        worker_result
    }

    fn report(&self) {
        let s = &self.stats;
        tracing::info!(
            pipeline = %self.cfg.pipeline.name,
            consumed = Stats::get(&s.consumed),
            batches = Stats::get(&s.batches),
            rows_inserted = Stats::get(&s.rows_inserted),
            dead_letters = Stats::get(&s.dead_letters),
            "progress"
        );
    }
}

fn worker_exit(r: Result<Result<(), PipelineError>, tokio::task::JoinError>) -> PipelineError {
    match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => PipelineError::Worker("worker ended unexpectedly".into()),
        Err(e) => PipelineError::Worker(e.to_string()),
    }
}

/// Processes sealed batches one at a time, in order (per partition order is what matters for
/// commits; one worker keeps it simple and deterministic).
struct Worker {
    pipeline: String,
    stages: Arc<Mutex<Vec<Box<dyn Stage>>>>,
    sink: Arc<ClickHouseSink>,
    dlq: Arc<DeadLetterQueue>,
    state: Arc<StateStore>,
    committer: Committer,
    stats: Arc<Stats>,
}

/// Exponential backoff with jitter for retryable failures: 100 ms doubling to 30 s.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0 }
    }

    async fn wait(&mut self) {
        let base = 100u64
            .saturating_mul(1u64 << self.attempt.min(9))
            .min(30_000);
        let nanos = Instant::now().elapsed().subsec_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        let jitter = nanos % (base / 2 + 1);
        self.attempt += 1;
        tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
    }
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<SealedBatch>) -> Result<(), PipelineError> {
        while let Some(batch) = rx.recv().await {
            self.process(batch).await?;
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PipelineError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| PipelineError::Worker(e.to_string()))
    }

    async fn process(&self, batch: SealedBatch) -> Result<(), PipelineError> {
        let pk = batch.partition.clone();
        let (first, last) = (batch.first, batch.last);
        let state = self.state.clone();
        let key = pk.clone();
        Self::blocking(move || state.begin_batch(&key, first, last)).await??;
        fault::point(fault::AFTER_BEGIN);

        let ctx = BatchContext {
            pipeline: self.pipeline.clone(),
            partition: pk.clone(),
            first_offset: first,
            last_offset: last,
        };
        let stages = self.stages.clone();
        let sink = self.sink.clone();
        let records = batch.records;
        let (tables, dead_letters) = Self::blocking(move || {
            let mut stages = stages
                .lock()
                .map_err(|_| PipelineError::Worker("a stage panicked earlier".into()))?;
            let mut records = records;
            let mut dead: Vec<DeadLetter> = Vec::new();
            for stage in stages.iter_mut() {
                let out = stage.process(records, &ctx)?;
                records = out.records;
                dead.extend(out.dead_letters);
            }
            let tables = sink.encode(records, &mut dead);
            Ok::<_, PipelineError>((tables, dead))
        })
        .await??;

        for (table, enc) in tables {
            let token = dedup_token(&self.pipeline, &pk.topic, pk.partition, first, last, &table);
            let data = Bytes::from(enc.data);
            let mut backoff = Backoff::new();
            loop {
                match self.sink.insert(&table, data.clone(), &token).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(partition = %pk, first, last, "{e}; retrying");
                        backoff.wait().await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Stats::add(&self.stats.rows_inserted, enc.rows as u64);
        }

        fault::point(fault::AFTER_INSERT);

        if !dead_letters.is_empty() {
            let mut backoff = Backoff::new();
            loop {
                match self.dlq.send_all(&dead_letters).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(partition = %pk, "{e}; retrying");
                        backoff.wait().await;
                    }
                }
            }
            Stats::add(&self.stats.dead_letters, dead_letters.len() as u64);
        }

        fault::point(fault::AFTER_DEAD_LETTERS);

        let mut backoff = Backoff::new();
        loop {
            match self.committer.commit(&pk, last + 1).await {
                Ok(()) => break,
                Err(e) if backoff.attempt < 5 => {
                    tracing::warn!("{e}; retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        fault::point(fault::AFTER_COMMIT);
        let state = self.state.clone();
        Self::blocking(move || state.complete_batch(&pk, last)).await??;
        Stats::add(&self.stats.batches, 1);
        Ok(())
    }
}
