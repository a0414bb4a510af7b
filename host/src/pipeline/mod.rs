//! The engine: Kafka messages → per-partition batches → stages → ClickHouse, then the
//! dead-letter topic, then the offset commit.
//!
//! Order of effects for one batch (the exactly-once argument):
//! 1. stages run (their state changes held in a transaction) and rows are encoded;
//! 2. in ONE synced RocksDB write: the stage-state changes, the batch's offset range (journal)
//!    and its encoded output (outbox);
//! 3. rows are inserted with a token derived from the offset range;
//! 4. dead letters are produced and 5. `first..=last` is committed to the consumer group, in
//!    one Kafka transaction (with a state changelog, the dead letters were already produced in
//!    the batch's changelog transaction, before 2);
//! 6. the journal entry is closed and the outbox dropped.
//!
//! A crash before 2 loses nothing: no state changed, nothing was sent, the batch is consumed
//! again. A crash between 2 and 6 leaves the outbox: when the partition is next consumed, the
//! outbox is re-sent exactly as it was (same rows, same tokens, so ClickHouse drops what had
//! landed), the offsets are committed, and consumption continues after `last`. Stages never
//! process a batch twice, so their state always matches what reached ClickHouse.

mod batch;
pub mod control;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::LoadedConfig;
use crate::dlq::{DeadLetterQueue, DlqError};
use crate::fault;
use crate::metrics::METRICS;
use crate::record::{DeadLetter, Record};
use crate::sink::clickhouse::writer::{dedup_token, ClickHouseSink, EncodedTable, SinkError};
use crate::source::kafka::{Committer, KafkaSource, Ownership, RebalanceEvent, SourceError};
use crate::stage::{BatchContext, PartitionKey, Stage, StageError};
use crate::state::changelog::{Changelog, ChangelogError};
use crate::state::{Outbox, PartitionJournal, PendingBatch, StateError, StateStore};
use batch::{Accumulator, SealedBatch};
use control::{Control, Live, SwapApplied};

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
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    #[error("pipeline worker stopped: {0}")]
    Worker(String),
    /// The consumer group moved on (e.g. after a broker restart): the run ends and is
    /// restarted; the journal makes that safe.
    #[error("the consumer must rejoin its group: {0}")]
    Rejoin(String),
}

/// Counters for progress lines (and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub consumed: AtomicU64,
    pub batches: AtomicU64,
    pub rows_inserted: AtomicU64,
    pub dead_letters: AtomicU64,
    pub recovered_batches: AtomicU64,
    pub skipped_records: AtomicU64,
    /// Per stage counter name (`dedup.duplicates`, ...).
    pub stage_counters: Mutex<HashMap<String, u64>>,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn stage_counter(&self, name: &str) -> u64 {
        self.stage_counters
            .lock()
            .map(|m| m.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// Messages taken from the consumer per wake-up of the engine's loop, at most.
const RECV_CHUNK: usize = 512;

/// What the consumer loop hands to the worker, in order.
enum WorkItem {
    /// A fresh batch to process.
    Batch(SealedBatch),
    /// A batch fixed in the journal before a stop: re-send its outbox.
    Recover {
        partition: PartitionKey,
        first: i64,
        last: i64,
        outbox: Outbox,
        /// Its dead letters went out with its changelog transaction.
        dead_letters_sent: bool,
        epoch: Option<u64>,
    },
    /// Partition numbers gained (restore their state from the changelog first) and lost.
    Ownership {
        gained: Vec<i32>,
        lost: Vec<i32>,
        reply: tokio::sync::oneshot::Sender<Result<(), PipelineError>>,
    },
}

/// A pipeline's long-lived parts (sink, dead-letter producer, state store, counters); each
/// [`Pipeline::run`] consumes from Kafka with a given set of stages until it is stopped.
pub struct Pipeline {
    cfg: LoadedConfig,
    sink: Arc<ClickHouseSink>,
    dlq: Arc<DeadLetterQueue>,
    state: Arc<StateStore>,
    stats: Arc<Stats>,
    live: Arc<Mutex<Live>>,
    changelog: Option<Arc<Changelog>>,
}

impl Pipeline {
    pub fn new(
        cfg: LoadedConfig,
        sink: ClickHouseSink,
        dlq: DeadLetterQueue,
        state: StateStore,
    ) -> Self {
        Self {
            cfg,
            sink: Arc::new(sink),
            dlq: Arc::new(dlq),
            state: Arc::new(state),
            stats: Arc::new(Stats::default()),
            live: Arc::new(Mutex::new(Live::default())),
            changelog: None,
        }
    }

    /// Hands partition state between instances through `changelog` (see
    /// [`crate::state::changelog`]).
    pub fn with_changelog(mut self, changelog: Changelog) -> Self {
        self.changelog = Some(Arc::new(changelog));
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn live(&self) -> Arc<Mutex<Live>> {
        self.live.clone()
    }

    /// Runs `stages` until `shutdown` resolves (then flushes what it holds) or a fatal error
    /// occurs. `control` requests are applied between batches.
    pub async fn run(
        &self,
        mut stages: Vec<Box<dyn Stage>>,
        control: mpsc::Receiver<Control>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), PipelineError> {
        let p = self.cfg.pipeline.clone();
        if let Some(c) = &self.changelog {
            c.allow_restores();
        }
        if let Ok(mut live) = self.live.lock() {
            live.stages = control::stage_statuses(&self.cfg, &mut stages);
        }
        // Side topics (e.g. a join's other stream) go straight to the stage that owns them.
        let mut side: HashMap<String, usize> = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            for t in s.side_topics() {
                side.insert(t, i);
            }
        }
        let extra: Vec<String> = side.keys().cloned().collect();
        let side_topics: BTreeSet<String> = extra.iter().cloned().collect();
        let (source, mut events) = KafkaSource::connect(&p.kafka, &self.cfg.instance_id(), &extra)?;
        let run = async {
            let ownership = source.ownership();
            // One sealed batch waiting is enough to keep the single worker busy while the next one
            // fills; every further one is up to `max_rows` records of memory and no throughput.
            let (tx, rx) = mpsc::channel::<WorkItem>(1);
            let mut to_worker = ToWorker { tx, permit: None };
            let worker = Worker {
                pipeline: p.name.clone(),
                cfg: self.cfg.clone(),
                stages: Arc::new(Mutex::new(stages)),
                live: self.live.clone(),
                side,
                sink: self.sink.clone(),
                dlq: self.dlq.clone(),
                state: self.state.clone(),
                committer: source.committer(),
                stats: self.stats.clone(),
                ownership: ownership.clone(),
                changelog: self.changelog.clone(),
            };
            let mut worker_task = tokio::spawn(worker.run(rx, control));
            let committer = source.committer();
            let mut lag_probe: Option<tokio::task::JoinHandle<()>> = None;
            // Set once the worker's result has been taken (a finished JoinHandle must not be
            // awaited again).
            let mut worker_done = false;
            let batch_cfg = p.sink.batch.clone();
            let mut accs: HashMap<PartitionKey, Accumulator> = HashMap::new();
            // Batches sealed per partition since it was assigned: the first ones are small so the
            // first rows are visible quickly, then they grow to the configured size.
            let mut sealed_count: HashMap<PartitionKey, u32> = HashMap::new();
            let mut journals: HashMap<PartitionKey, PartitionJournal> = HashMap::new();
            // Per partition, the offset after the last record taken since it was assigned: a
            // record below it is a re-delivery. librdkafka re-delivers when a partition is paused
            // (the idle fetch governor does) while a message is being handed to the application:
            // the pause saves the position before that message, and the resume fetches it again.
            let mut taken: HashMap<PartitionKey, i64> = HashMap::new();
            // With a changelog: partition numbers whose state this run restored since they were
            // last assigned, and numbers revoked since the last assignment (to forget if they
            // did not come back).
            let mut held: BTreeSet<i32> = BTreeSet::new();
            let mut dropped: BTreeSet<i32> = BTreeSet::new();
            let seal = |acc: Accumulator, pk: &PartitionKey| {
                acc.seal(pk).map(|mut b| {
                    b.epoch = ownership.epoch_of(pk);
                    b
                })
            };
            let tick_every = (batch_cfg.max_age() / 4).max(Duration::from_millis(5));
            let mut tick = tokio::time::interval(tick_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_report = Instant::now();
            tokio::pin!(shutdown);
            tracing::info!(pipeline = %p.name, topics = ?p.kafka.topics, side_topics = ?extra, "pipeline started");

            let result: Result<(), PipelineError> = 'consume: loop {
                // Batches are sealed when the earliest reaches its age limit (a timer, not the
                // tick: its period would add up to a quarter of the age to the latency).
                let due = accs.values().filter_map(|a| a.deadline(&batch_cfg)).min();
                let mut seal_aged = false;
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    r = &mut worker_task, if !worker_done => {
                        worker_done = true;
                        break Err(worker_exit(r));
                    }
                    Some(ev) = events.recv() => {
                        match ev {
                            RebalanceEvent::Revoked(parts) => {
                                for pk in parts {
                                    // Not committed: the next owner consumes it again.
                                    accs.remove(&pk);
                                    sealed_count.remove(&pk);
                                    journals.remove(&pk);
                                    taken.remove(&pk);
                                    // Someone else may write its state before it comes back.
                                    if held.remove(&pk.partition) {
                                        dropped.insert(pk.partition);
                                    }
                                }
                            }
                            RebalanceEvent::Assigned(_) if self.changelog.is_some() => {
                                // Restore gained partitions now rather than at their first record;
                                // forget the state of those that did not come back.
                                let now = ownership.numbers();
                                let gained: Vec<i32> = now.difference(&held).copied().collect();
                                let lost: Vec<i32> = dropped.difference(&now).copied().collect();
                                dropped.clear();
                                match self.change_ownership(&mut to_worker, gained.clone(), lost, shutdown.as_mut()).await {
                                    Ok(true) => held.extend(gained),
                                    Ok(false) => break 'consume Ok(()),
                                    Err(Some(e)) => break Err(e),
                                    Err(None) => {
                                        worker_done = true;
                                        break Err(worker_exit((&mut worker_task).await));
                                    }
                                }
                            }
                            RebalanceEvent::Assigned(_) => {}
                        }
                    }
                    // Before `recv` in this biased select: with a steady stream of messages the age
                    // limit must still close batches (and progress must still be reported).
                    _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                        seal_aged = true;
                    }
                    _ = tick.tick() => {
                        source.release_loaded_sides();
                        if last_report.elapsed() >= Duration::from_secs(5) {
                            last_report = Instant::now();
                            self.report();
                            if lag_probe.as_ref().is_none_or(|h| h.is_finished()) {
                                lag_probe = Some(self.probe_lag(&committer));
                            }
                        }
                    }
                    // Records are taken only while the channel's one slot is reserved: the worker
                    // holds one batch, the channel (at most) one more, and this loop fills no third
                    // meanwhile (each is up to `max_rows` records of memory).
                    permit = to_worker.tx.clone().reserve_owned(), if to_worker.permit.is_none() => {
                        match permit {
                            Ok(p) => to_worker.permit = Some(p),
                            Err(_) => {
                                worker_done = true;
                                break Err(worker_exit((&mut worker_task).await));
                            }
                        }
                    }
                    chunk = source.recv_many(RECV_CHUNK), if to_worker.permit.is_some() => {
                        let chunk = match chunk {
                            Ok(c) => c,
                            Err(SourceError::Rejoin(why)) => break Err(PipelineError::Rejoin(why)),
                            Err(e) => break Err(e.into()),
                        };
                        Stats::add(&self.stats.consumed, chunk.len() as u64);
                        // Consecutive records mostly share a partition: its key is built once.
                        let mut current: Option<PartitionKey> = None;
                        let mut again: Vec<(PartitionKey, i64)> = Vec::new();
                        for origin in chunk {
                            if current.as_ref().is_none_or(|pk| {
                                pk.partition != origin.partition || pk.topic.as_str() != &*origin.topic
                            }) {
                                current = Some(PartitionKey { topic: origin.topic.to_string(), partition: origin.partition });
                            }
                            let Some(pk) = current.as_ref() else { continue };
                            if self.changelog.is_some() && !held.contains(&pk.partition) {
                                // A record of a partition whose assignment event is still queued: its
                                // state (and journal) must be restored before the journal is read.
                                match self.change_ownership(&mut to_worker, vec![pk.partition], Vec::new(), shutdown.as_mut()).await {
                                    Ok(true) => {
                                        held.insert(pk.partition);
                                    }
                                    Ok(false) => break 'consume Ok(()),
                                    Err(Some(e)) => break 'consume Err(e),
                                    Err(None) => {
                                        worker_done = true;
                                        break 'consume Err(worker_exit((&mut worker_task).await));
                                    }
                                }
                            }
                            if !journals.contains_key(pk) {
                                // First record of this partition since it was assigned: finish the
                                // batch a previous run left in flight before anything else.
                                let mut j = self.state.journal(pk)?;
                                if let Some(b) = j.pending.as_ref().filter(|b| b.last < origin.offset) {
                                    // The group is already past it (another instance handled this
                                    // partition meanwhile): re-sending it would commit an older offset.
                                    tracing::warn!(partition = %pk, "dropping a stale journal entry: the group's offset is past it");
                                    self.state.complete_batch(pk, b.last)?;
                                    j = self.state.journal(pk)?;
                                }
                                if let Some(pending) = j.pending.clone() {
                                    match self.state.outbox(pk)? {
                                        Some(outbox) => {
                                            tracing::info!(partition = %pk, first = pending.first, last = pending.last,
                                                "re-sending batch from the journal");
                                            Stats::add(&self.stats.recovered_batches, 1);
                                            let item = WorkItem::Recover { partition: pk.clone(), first: pending.first, last: pending.last, outbox, dead_letters_sent: pending.dead_letters_sent, epoch: ownership.epoch_of(pk) };
                                            if to_worker.send(item).await.is_err() {
                                                worker_done = true;
                                                break 'consume Err(worker_exit((&mut worker_task).await));
                                            }
                                            j.next_offset = Some(pending.last + 1);
                                        }
                                        None => tracing::warn!(partition = %pk, "journal entry without outbox; consuming the batch again"),
                                    }
                                    j.pending = None;
                                }
                                journals.insert(pk.clone(), j);
                            }
                            let Some(journal) = journals.get(pk) else { continue };
                            if journal.next_offset.is_some_and(|n| origin.offset < n) {
                                // Already in ClickHouse (the group's offset was behind the journal).
                                Stats::add(&self.stats.skipped_records, 1);
                                continue;
                            }
                            match taken.get_mut(pk) {
                                Some(next) if origin.offset < *next => {
                                    Stats::add(&self.stats.skipped_records, 1);
                                    again.push((pk.clone(), origin.offset));
                                    continue;
                                }
                                Some(next) => *next = origin.offset + 1,
                                None => {
                                    taken.insert(pk.clone(), origin.offset + 1);
                                }
                            }
                            let acc = match accs.get_mut(pk) {
                                Some(acc) => acc,
                                None => accs.entry(pk.clone()).or_insert_with(|| {
                                    Accumulator::ramp(sealed_count.get(pk).copied().unwrap_or(0))
                                }),
                            };
                            acc.push(origin);
                            if acc.is_full(&batch_cfg) {
                                for k in sides_first(&accs, pk, &side_topics) {
                                    if let Some(sealed) = accs.remove(&k).and_then(|a| seal(a, &k)) {
                                        *sealed_count.entry(k).or_default() += 1;
                                        if to_worker.send(WorkItem::Batch(sealed)).await.is_err() {
                                            worker_done = true;
                                            break 'consume Err(worker_exit((&mut worker_task).await));
                                        }
                                    }
                                }
                            }
                        }
                        if let (Some((pk, first)), Some((_, last))) = (again.first(), again.last()) {
                            tracing::info!(partition = %pk, first, last, records = again.len(),
                                "the consumer delivered records again that were already taken; skipped them");
                        }
                    }
                }
                if seal_aged {
                    let aged: Vec<PartitionKey> = accs
                        .iter()
                        .filter(|(_, a)| a.is_aged(&batch_cfg))
                        .map(|(k, _)| k.clone())
                        .collect();
                    let order: Vec<PartitionKey> = aged
                        .iter()
                        .flat_map(|pk| sides_first(&accs, pk, &side_topics))
                        .collect();
                    for pk in order {
                        if let Some(sealed) = accs.remove(&pk).and_then(|a| seal(a, &pk)) {
                            *sealed_count.entry(pk.clone()).or_default() += 1;
                            if to_worker.send(WorkItem::Batch(sealed)).await.is_err() {
                                return Err(worker_exit((&mut worker_task).await));
                            }
                        }
                    }
                }
            };
            if result.is_ok() {
                // Graceful stop: flush what has been consumed, side topics first.
                let mut open: Vec<(PartitionKey, Accumulator)> = accs.drain().collect();
                open.sort_by_key(|(pk, _)| !side_topics.contains(&pk.topic));
                for (pk, acc) in open {
                    if let Some(sealed) = seal(acc, &pk) {
                        if to_worker.send(WorkItem::Batch(sealed)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            drop(to_worker);
            if worker_done {
                self.end_run();
                return result;
            }
            let worker_result = worker_task
                .await
                .map_err(|e| PipelineError::Worker(e.to_string()))?;
            self.end_run();
            result?;
            worker_result
        };
        let result: Result<(), PipelineError> = run.await;
        close_source(source).await;
        result
    }

    /// Measures lag (end offset − committed offset) per assigned partition, off the loop.
    fn probe_lag(&self, committer: &Committer) -> tokio::task::JoinHandle<()> {
        let committer = committer.clone();
        let live = self.live.clone();
        let name = self.cfg.pipeline.name.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(lags) = committer.lag(Duration::from_secs(2)) else {
                return;
            };
            for (pk, committed, end) in &lags {
                METRICS
                    .lag
                    .with_label_values(&[&name, &pk.topic, &pk.partition.to_string()])
                    .set((end - committed).max(0));
            }
            if let Ok(mut l) = live.lock() {
                l.lag = lags.into_iter().map(|(pk, c, e)| (pk, (c, e))).collect();
            }
        })
    }

    /// Has the worker restore `gained` partition numbers from the changelog and forget `lost`
    /// ones, after the batches queued before; waits for it, unless `shutdown` comes first: a
    /// restore can wait minutes for the changelog, so a stop cancels it (`Ok(false)`).
    /// `Err(None)`: the worker is gone.
    async fn change_ownership(
        &self,
        tx: &mut ToWorker,
        gained: Vec<i32>,
        lost: Vec<i32>,
        shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<bool, Option<PipelineError>> {
        if gained.is_empty() && lost.is_empty() {
            return Ok(true);
        }
        let changed = async {
            let (reply, done) = tokio::sync::oneshot::channel();
            tx.send(WorkItem::Ownership {
                gained,
                lost,
                reply,
            })
            .await
            .map_err(|()| None)?;
            match done.await {
                Ok(r) => r.map(|()| true).map_err(Some),
                Err(_) => Err(None),
            }
        };
        tokio::select! {
            r = changed => r,
            _ = shutdown => {
                if let Some(c) = &self.changelog {
                    tracing::info!(pipeline = %self.cfg.pipeline.name, "stopping during a state restore: cancelling it");
                    c.cancel_restores();
                }
                Ok(false)
            }
        }
    }

    fn end_run(&self) {
        // The next run restores (and fences) again.
        if let Some(c) = &self.changelog {
            c.release_all();
        }
        self.report();
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

/// The engine's end of the worker channel (capacity 1). `permit` is its one slot, reserved
/// before records are taken; a send uses it if held, so no send waits behind the engine's own
/// reservation.
struct ToWorker {
    tx: mpsc::Sender<WorkItem>,
    permit: Option<mpsc::OwnedPermit<WorkItem>>,
}

impl ToWorker {
    /// `Err`: the worker is gone.
    async fn send(&mut self, item: WorkItem) -> Result<(), ()> {
        match self.permit.take() {
            Some(permit) => {
                permit.send(item);
                Ok(())
            }
            None => self.tx.send(item).await.map_err(|_| ()),
        }
    }
}

/// How long leaving the consumer group may hold up the end of a run.
const CLOSE_PATIENCE: Duration = Duration::from_secs(30);

/// Closes the consumer (commits nothing; leaves the group) off the async threads. librdkafka's
/// close polls until the group is left, without a time limit: a broker or group coordinator
/// that stops answering must not keep a stopping instance alive.
async fn close_source(source: KafkaSource) {
    let started = Instant::now();
    let closing = tokio::task::spawn_blocking(move || drop(source));
    match tokio::time::timeout(CLOSE_PATIENCE, closing).await {
        Ok(_) if started.elapsed() > Duration::from_secs(2) => tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "closing the Kafka consumer (leaving the group) was slow"
        ),
        Ok(_) => {}
        Err(_) => tracing::warn!(
            "the Kafka consumer did not close within {} s; going on without it (the broker ends its group membership after session.timeout.ms)",
            CLOSE_PATIENCE.as_secs()
        ),
    }
}

fn worker_exit(r: Result<Result<(), PipelineError>, tokio::task::JoinError>) -> PipelineError {
    match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => PipelineError::Worker("worker ended unexpectedly".into()),
        Err(e) => PipelineError::Worker(e.to_string()),
    }
}

fn log_restore(n: i32, r: &crate::state::changelog::Restored) {
    if r.records > 0 || r.full || r.checked_from_start || r.bootstrapped > 0 {
        tracing::info!(
            partition = n,
            from_offset = r.from_offset,
            end = r.end,
            records = r.records,
            full = r.full,
            checked_from_start = r.checked_from_start,
            bootstrapped = r.bootstrapped,
            took_ms = r.took.as_millis() as u64,
            "state restored from the changelog"
        );
    }
}

/// The partitions to seal for `pk`'s batch, in order: a pipeline partition's batch comes after
/// the open batches of the side topics' partitions of the same number, so a stage sees the
/// side records consumed before a pipeline record first (a lookup finds the table rows read
/// before it; the side topics are also read first at assignment, `source::side_first`).
fn sides_first<A>(
    accs: &HashMap<PartitionKey, A>,
    pk: &PartitionKey,
    side_topics: &BTreeSet<String>,
) -> Vec<PartitionKey> {
    let mut order: Vec<PartitionKey> = Vec::new();
    if !side_topics.contains(&pk.topic) {
        order.extend(
            accs.keys()
                .filter(|k| k.partition == pk.partition && side_topics.contains(&k.topic))
                .cloned(),
        );
        order.sort();
    }
    order.push(pk.clone());
    order
}

/// Where the state of partition number `n` ends before the group's committed offset, as
/// "topic/n: state ends at X, group at Y" (`None`: it does not, or it cannot be told).
/// Blocking.
fn state_behind_group(
    state: &StateStore,
    committer: &Committer,
    topics: &[String],
    n: i32,
) -> Option<String> {
    let pks: Vec<PartitionKey> = topics
        .iter()
        .map(|t| PartitionKey {
            topic: t.clone(),
            partition: n,
        })
        .collect();
    let committed = match committer.committed_offsets(&pks, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                partition = n,
                "cannot compare the restored state with the group's offsets: {e}"
            );
            return None;
        }
    };
    let mut gaps = Vec::new();
    for pk in &pks {
        let Ok(j) = state.journal(pk) else { continue };
        let end = j.pending.as_ref().map(|b| b.last + 1).max(j.next_offset);
        if let (Some(end), Some(Some(group))) = (end, committed.get(pk)) {
            if *group > end {
                gaps.push(format!("{pk}: state ends at {end}, group at {group}"));
            }
        }
    }
    (!gaps.is_empty()).then(|| gaps.join("; "))
}

/// Why a batch starting at `first` must not be processed on top of `journal` (`None`: it
/// may). The engine's loop skips records the journal shows as delivered when a partition is
/// assigned; but a partition revoked while a batch was in the worker and assigned back at
/// once may have been read from its committed offset before that batch reached the journal.
/// Processing both would insert the same records twice under two tokens; a new run reads the
/// journal again (re-sending the batch in flight, skipping what was delivered).
fn overlap(journal: &PartitionJournal, first: i64) -> Option<String> {
    if let Some(p) = journal.pending.as_ref().filter(|p| p.last >= first) {
        return Some(format!(
            "overlaps batch {}-{} still in the journal; restarting the run to finish that one first",
            p.first, p.last
        ));
    }
    match journal.next_offset {
        Some(n) if n > first => Some(format!(
            "starts below offset {n}, up to which records were delivered; restarting the run to skip them"
        )),
        _ => None,
    }
}

/// Processes work items one at a time, in order (per-partition order is what commits need;
/// one worker keeps it simple and deterministic).
struct Worker {
    pipeline: String,
    cfg: LoadedConfig,
    stages: Arc<Mutex<Vec<Box<dyn Stage>>>>,
    live: Arc<Mutex<Live>>,
    /// Side topic → index of the stage that consumes it.
    side: HashMap<String, usize>,
    sink: Arc<ClickHouseSink>,
    dlq: Arc<DeadLetterQueue>,
    state: Arc<StateStore>,
    committer: Committer,
    stats: Arc<Stats>,
    ownership: Arc<Ownership>,
    changelog: Option<Arc<Changelog>>,
}

/// Records per slice of a batch through the stages and the encoder (see `Worker::process`);
/// the WASM stage's calls are this size too.
const SUB_BATCH: usize = crate::stage::wasm::MAX_RECORDS_PER_CALL;

/// A slice of a batch after the stages: its rows, the stages' dead letters, and how many of
/// the batch's records were not encoded yet when it was cut (its own included).
struct Staged {
    rows: Vec<Record>,
    dead: Vec<DeadLetter>,
    remaining: usize,
}

/// Encodes the slices `next_slice` produces, inline or, with `overlap`, on a second thread
/// while the stages produce the next slice. Either way the dead letters come in the order of
/// the inline loop: per slice, the stages' then the encoder's.
fn encode_slices(
    sink: &ClickHouseSink,
    overlap: bool,
    mut next_slice: impl FnMut() -> Result<Option<Staged>, PipelineError>,
) -> Result<(BTreeMap<String, EncodedTable>, Vec<DeadLetter>), PipelineError> {
    let mut tables = BTreeMap::new();
    let mut dead = Vec::new();
    if !overlap {
        while let Some(s) = next_slice()? {
            dead.extend(s.dead);
            sink.encode_into(s.rows, &mut dead, &mut tables, s.remaining);
        }
        return Ok((tables, dead));
    }
    let mut stage_dead: Vec<Vec<DeadLetter>> = Vec::new();
    let (tables, encoder_dead) = std::thread::scope(|scope| {
        // One slice in the channel: the stages run at most one slice ahead of the encoder.
        let (to_encoder, slices) = std::sync::mpsc::sync_channel::<(Vec<Record>, usize)>(1);
        let encoder = scope.spawn(move || {
            let mut tables = BTreeMap::new();
            let mut dead = Vec::new();
            for (rows, remaining) in slices {
                let mut d = Vec::new();
                sink.encode_into(rows, &mut d, &mut tables, remaining);
                dead.push(d);
            }
            (tables, dead)
        });
        let staged = (|| {
            while let Some(s) = next_slice()? {
                stage_dead.push(s.dead);
                if to_encoder.send((s.rows, s.remaining)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(to_encoder);
        let encoded = encoder
            .join()
            .map_err(|_| PipelineError::Worker("the encoder thread panicked".into()));
        staged.and(encoded)
    })?;
    for (s, e) in stage_dead.into_iter().zip(encoder_dead) {
        dead.extend(s);
        dead.extend(e);
    }
    Ok((tables, dead))
}

/// A batch fixed in the journal, to deliver (see `Worker::deliver`).
struct Journaled<'a> {
    partition: &'a PartitionKey,
    first: i64,
    last: i64,
    /// The assignment of the partition it was sealed under (see `Ownership`).
    epoch: Option<u64>,
}

/// How long a worker whose commit was refused for a new group generation waits for its
/// partition's revocation before it restarts the run (see `Worker::revoked_since`): when the
/// engine's loop is polling, the rebalance callback follows within milliseconds; when it is
/// held up behind the worker, no wait helps.
const REVOKE_PATIENCE: Duration = Duration::from_secs(1);

/// How long an offset commit is retried before the run gives up on it.
const COMMIT_PATIENCE: Duration = Duration::from_secs(300);

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
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0);
        let jitter = nanos % (base / 2 + 1);
        self.attempt += 1;
        tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
    }
}

impl Worker {
    async fn run(
        self,
        mut rx: mpsc::Receiver<WorkItem>,
        mut control: mpsc::Receiver<Control>,
    ) -> Result<(), PipelineError> {
        loop {
            // Control first: a swap requested while a batch was running applies to the next.
            if let Ok(c) = control.try_recv() {
                self.control(c);
                continue;
            }
            // A batch already waiting means the worker is behind (a backlog); one it had to
            // wait for means it keeps up, and has time to spare for that batch (see `process`).
            let (item, waited) = match rx.try_recv() {
                Ok(item) => (Some(item), false),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    Some(c) = control.recv() => {
                        self.control(c);
                        continue;
                    }
                    item = rx.recv() => (item, true),
                },
            };
            let Some(item) = item else { break };
            match item {
                WorkItem::Batch(b) => {
                    if self.still_owned(&b.partition, b.epoch) {
                        let journal = self.state.journal(&b.partition)?;
                        if let Some(why) = overlap(&journal, b.first) {
                            return Err(PipelineError::Rejoin(format!(
                                "batch {}-{} of {}: {why}",
                                b.first, b.last, b.partition
                            )));
                        }
                        self.process(b, journal, waited).await?;
                        crate::memory::release_freed();
                    }
                }
                WorkItem::Recover {
                    partition,
                    first,
                    last,
                    outbox,
                    dead_letters_sent,
                    epoch,
                } => {
                    if self.still_owned(&partition, epoch) {
                        let sent = dead_letters_sent;
                        let batch = Journaled {
                            partition: &partition,
                            first,
                            last,
                            epoch,
                        };
                        self.deliver(batch, outbox, sent, Vec::new()).await?
                    }
                }
                WorkItem::Ownership {
                    gained,
                    lost,
                    reply,
                } => {
                    let _ = reply.send(self.change_ownership(gained, lost).await);
                }
            }
        }
        Ok(())
    }

    /// Whether `pk` has been revoked since the assignment of `epoch` (it may be owned again,
    /// under a newer one). A commit refused for a new generation usually comes a moment before
    /// the consumer's rebalance callback revokes the partition: wait a little for it.
    async fn revoked_since(&self, pk: &PartitionKey, epoch: Option<u64>) -> bool {
        let started = Instant::now();
        loop {
            if self.ownership.epoch_of(pk) != epoch {
                return true;
            }
            if started.elapsed() >= REVOKE_PATIENCE {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A batch sealed before its partition was revoked is dropped: the partition is consumed
    /// again from its committed offset, here or by its new owner.
    fn still_owned(&self, pk: &PartitionKey, epoch: Option<u64>) -> bool {
        let now = self.ownership.epoch_of(pk);
        if epoch.is_some() && now == epoch {
            return true;
        }
        tracing::info!(partition = %pk, "dropping a batch sealed before its partition was revoked");
        false
    }

    /// Restores the state of gained partition numbers from the changelog and forgets lost
    /// ones. Runs between batches.
    async fn change_ownership(
        &self,
        gained: Vec<i32>,
        lost: Vec<i32>,
    ) -> Result<(), PipelineError> {
        let Some(changelog) = self.changelog.clone() else {
            return Ok(());
        };
        let state = self.state.clone();
        let stages = self.stages.clone();
        let committer = self.committer.clone();
        let mut topics = self.cfg.pipeline.kafka.topics.clone();
        topics.extend(self.side.keys().cloned());
        Self::blocking(move || {
            let mut replaced = lost.clone();
            for n in &lost {
                changelog.release(*n);
            }
            for n in gained {
                let r = changelog.restore(&state, n)?;
                log_restore(n, &r);
                if r.records > 0 || r.full {
                    replaced.push(n);
                }
                // Every commit follows its batch's changelog entry, so a group offset past
                // the last batch in the state means the restore missed records: read the
                // partition again from its start rather than carry on with a stale state.
                if let Some(gap) = state_behind_group(&state, &committer, &topics, n) {
                    tracing::warn!(partition = n, %gap,
                        "the restored state ends before the group's offset; restoring the whole partition from the changelog");
                    let r = changelog.restore_full(&state, n)?;
                    log_restore(n, &r);
                    replaced.push(n);
                    if let Some(gap) = state_behind_group(&state, &committer, &topics, n) {
                        tracing::warn!(partition = n, %gap,
                            "the state still ends before the group's offset after a full restore (offsets moved by hand, or the changelog lost records); continuing from the group's offset");
                    }
                }
            }
            let mut stages = stages
                .lock()
                .map_err(|_| PipelineError::Worker("a stage panicked earlier".into()))?;
            for n in replaced {
                for s in stages.iter_mut() {
                    s.state_replaced(n);
                }
            }
            Ok::<_, PipelineError>(())
        })
        .await?
    }

    /// The plugins of the current stages, as recorded in a batch's journal entry.
    fn plugin_refs(stages: &mut [Box<dyn Stage>]) -> Vec<String> {
        stages
            .iter_mut()
            .filter_map(|s| {
                let name = s.name().to_string();
                s.plugin_slot()
                    .map(|slot| format!("{name}={}", slot.current()))
            })
            .collect()
    }

    /// Applies a control request. Runs between batches: no stage is in use.
    fn control(&self, c: Control) {
        let Ok(mut stages) = self.stages.lock() else {
            return;
        };
        let find = |stages: &mut Vec<Box<dyn Stage>>, name: &str| -> Result<usize, StageError> {
            stages
                .iter()
                .position(|s| s.name() == name)
                .ok_or_else(|| StageError::new(name, "no such stage"))
        };
        macro_rules! with_slot {
            ($stage:expr, |$slot:ident| $body:expr) => {{
                match find(&mut stages, &$stage) {
                    Ok(i) => match stages[i].plugin_slot() {
                        Some($slot) => $body,
                        None => Err(StageError::new(&$stage, "not a plugin stage")),
                    },
                    Err(e) => Err(e),
                }
            }};
        }
        match c {
            Control::Swap {
                stage,
                plugin,
                reply,
            } => {
                let r = with_slot!(stage, |slot| {
                    let previous = slot.current();
                    slot.swap(plugin).map(|()| previous)
                })
                .map(|previous| SwapApplied {
                    previous,
                    from_offsets: self
                        .live
                        .lock()
                        .map(|l| {
                            l.positions
                                .iter()
                                .map(|(pk, o)| (pk.to_string(), *o))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
                let _ = reply.send(r);
            }
            Control::ShadowStart {
                stage,
                plugin,
                reply,
            } => {
                let _ = reply.send(with_slot!(stage, |slot| slot.start_shadow(plugin)));
            }
            Control::ShadowReport { stage, reply } => {
                let _ = reply.send(with_slot!(stage, |slot| Ok(slot.shadow_report())));
            }
            Control::ShadowStop { stage, reply } => {
                let _ = reply.send(with_slot!(stage, |slot| Ok(slot.stop_shadow())));
            }
        }
        let statuses = control::stage_statuses(&self.cfg, &mut stages);
        if let Ok(mut l) = self.live.lock() {
            l.stages = statuses;
        }
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PipelineError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| PipelineError::Worker(e.to_string()))
    }

    /// Steps 1 and 2: run the stages, encode, and fix the batch in the journal (`journal`: the
    /// partition's entry as read before the batch; nothing else writes it meanwhile).
    ///
    /// `overlap`: the worker keeps up (it waited for this batch), so what counts is how soon
    /// the rows are visible, and the machine has time to spare: the batch's encoding then
    /// runs on a second thread beside its stages. Behind (a backlog), the batch is encoded
    /// inline: there the overlap costs CPU (hand-offs, memory freed on another thread) for
    /// no gain, the next batch waiting anyway (docs/benchmarks.md, fifteenth round).
    async fn process(
        &self,
        batch: SealedBatch,
        journal: PartitionJournal,
        overlap: bool,
    ) -> Result<(), PipelineError> {
        let pk = batch.partition.clone();
        let (first, last, epoch) = (batch.first, batch.last, batch.epoch);
        let (opened, sealed, taken) = (batch.opened, batch.sealed, Instant::now());
        let ctx = BatchContext {
            pipeline: self.pipeline.clone(),
            partition: pk.clone(),
            first_offset: first,
            last_offset: last,
        };
        let stages = self.stages.clone();
        let sink = self.sink.clone();
        let state = self.state.clone();
        let side_stage = self.side.get(&pk.topic).copied();
        let stats = self.stats.clone();
        let records = batch.records;
        let pipeline = self.pipeline.clone();
        METRICS
            .consumed
            .with_label_values(&[&pipeline, &pk.topic])
            .inc_by(records.len() as u64);
        METRICS
            .batch_records
            .with_label_values(&[&pipeline])
            .observe(records.len() as f64);
        let timestamps: Vec<i64> = records.iter().filter_map(|r| r.timestamp_ms).collect();
        let changelog = self.changelog.clone();
        let dlq = self.dlq.clone();
        let outbox = Self::blocking(move || {
            let mut stages = stages
                .lock()
                .map_err(|_| PipelineError::Worker("a stage panicked earlier".into()))?;
            let mut txn = state.txn();
            let start = side_stage.unwrap_or(0);
            // The batch goes through the stages and the encoder in slices of SUB_BATCH
            // records (same context and transaction, in order): a slice's stage outputs are
            // encoded and freed before the next slices are read, so the batch's rows exist at
            // once only as consumed messages and as RowBinary, not also as every stage's
            // output (docs/benchmarks.md, ninth round). With `overlap` and more than one
            // slice, a second thread encodes slice n while the stages run slice n + 1.
            let mut spent = vec![Duration::ZERO; stages.len()];
            let started = Instant::now();
            let total = records.len();
            let mut consumed = records.into_iter();
            let next_slice = || {
                // Records of the batch not encoded yet, this slice's included.
                let remaining = consumed.len();
                let mut records: Vec<Record> = consumed
                    .by_ref()
                    .take(SUB_BATCH)
                    .map(|o| Record::from_origin(Arc::new(o)))
                    .collect();
                if records.is_empty() {
                    return Ok(None);
                }
                let mut dead = Vec::new();
                for (i, stage) in stages.iter_mut().enumerate().skip(start) {
                    let started = Instant::now();
                    let out = if Some(i) == side_stage {
                        stage.process_side(records, &ctx, &mut txn)?
                    } else {
                        stage.process(records, &ctx, &mut txn)?
                    };
                    spent[i] += started.elapsed();
                    records = out.records;
                    dead.extend(out.dead_letters);
                    if !out.counters.is_empty() {
                        for (name, n) in &out.counters {
                            METRICS
                                .stage_events
                                .with_label_values(&[&pipeline, stage.name(), name])
                                .inc_by(*n);
                        }
                        if let Ok(mut m) = stats.stage_counters.lock() {
                            for (name, n) in out.counters {
                                *m.entry(format!("{}.{name}", stage.name())).or_default() += n;
                            }
                        }
                    }
                }
                Ok(Some(Staged {
                    rows: records,
                    dead,
                    remaining,
                }))
            };
            let (tables, dead) =
                encode_slices(&sink, overlap && total > SUB_BATCH, next_slice)?;
            for (i, stage) in stages.iter().enumerate().skip(start) {
                METRICS
                    .stage_seconds
                    .with_label_values(&[&pipeline, stage.name()])
                    .observe(spent[i].as_secs_f64());
            }
            let staged = started.elapsed();
            let (outbox, encoded) = Outbox::seal(
                tables
                    .into_iter()
                    .map(|(t, e)| (t, e.rows as u64, e.data))
                    .collect(),
                dead,
            );
            let mut journal = journal;
            journal.pending = Some(PendingBatch {
                first,
                last,
                plugins: Self::plugin_refs(&mut stages),
                dead_letters_sent: changelog.is_some(),
            });
            // With a changelog, the batch is published there first (with its dead letters):
            // once that commits, a new owner of the partition re-sends this very batch; if it
            // fails because another instance took the partition over, nothing of the batch
            // has left the process.
            let position = match &changelog {
                None => None,
                Some(cl) => {
                    let letters = &outbox.dead_letters;
                    let also = |p: &rdkafka::producer::FutureProducer| {
                        if letters.is_empty() {
                            return Ok(());
                        }
                        dlq.enqueue(p, letters).map_err(|e| e.to_string())
                    };
                    let n = ctx.partition.partition;
                    let records = Changelog::batch_records(
                        &StateStore::partition_key(&ctx.partition),
                        txn.writes(),
                        &encoded,
                        &mut journal,
                    )?;
                    // Nothing of the batch is visible until a publish commits, so a failed
                    // one (broker restarting, transaction timed out) is simply tried again.
                    let started = Instant::now();
                    let mut wait = Duration::from_millis(100);
                    loop {
                        match cl.publish(n, &records, &also) {
                            Ok(offset) => break Some((n, offset)),
                            Err(
                                e @ (ChangelogError::Fenced { .. }
                                | ChangelogError::NotOwned { .. }),
                            ) => {
                                tracing::warn!(partition = %ctx.partition, first, last,
                                    "{e}; batch abandoned (its partition's new owner consumes it)");
                                return Ok(None);
                            }
                            Err(e) if started.elapsed() < COMMIT_PATIENCE => {
                                tracing::warn!(partition = %ctx.partition, first, last, "{e}; retrying");
                                std::thread::sleep(wait);
                                wait = (wait * 2).min(Duration::from_secs(10));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            };
            state.begin_batch_with(&ctx.partition, &journal, txn, &encoded, position)?;
            Ok::<_, PipelineError>(Some((outbox, staged)))
        })
        .await??;
        let Some((outbox, staged)) = outbox else {
            return Ok(());
        };
        let journaled = Instant::now();
        fault::point(fault::AFTER_BEGIN);
        let sent = self.changelog.is_some();
        let rows: u64 = outbox.tables.iter().map(|(_, rows, _)| rows).sum();
        let batch = Journaled {
            partition: &pk,
            first,
            last,
            epoch,
        };
        self.deliver(batch, outbox, sent, timestamps).await?;
        // Where a batch's latency goes (`RUST_LOG=sluice::pipeline=debug`): filling, waiting
        // for the worker, stages and encoding, the rest of the blocking part (changelog,
        // synced journal write), insert and offset commit.
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(partition = %pk, first, last, rows,
            fill_ms = ms(sealed - opened), queue_ms = ms(taken - sealed), stages_ms = ms(staged),
            journal_ms = ms(journaled - taken) - ms(staged),
            deliver_ms = ms(journaled.elapsed()), "batch done");
        Ok(())
    }

    /// The batch's commit as one transaction with its dead letters (no changelog): both
    /// become visible together, so a replay after a crash never produces them twice.
    async fn commit_with_dead_letters(
        &self,
        pk: &PartitionKey,
        last: i64,
        letters: Arc<Vec<DeadLetter>>,
    ) -> Result<(), SourceError> {
        let dlq = self.dlq.clone();
        let committer = self.committer.clone();
        let key = pk.clone();
        let commit_err = |message: String, group_changed: bool| SourceError::Commit {
            partition: pk.clone(),
            offset: last + 1,
            message,
            group_changed,
        };
        let result = tokio::task::spawn_blocking(move || {
            let group = committer
                .group_metadata()
                .ok_or_else(|| (String::from("the consumer has no group metadata"), false))?;
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(&key.topic, key.partition, rdkafka::Offset::Offset(last + 1))
                .map_err(|e| (e.to_string(), false))?;
            dlq.send_with_offsets(&letters, &tpl, &group)
                .map_err(|e| match e {
                    DlqError::Transaction {
                        group_changed,
                        fatal,
                        message,
                        ..
                    } => (message, group_changed || fatal),
                    e => (e.to_string(), false),
                })
        })
        .await
        .map_err(|e| commit_err(e.to_string(), false))?;
        result.map_err(|(m, changed)| commit_err(format!("dead letters + offsets: {m}"), changed))
    }

    /// Steps 3 to 6, for a fresh batch or one recovered from the journal.
    async fn deliver(
        &self,
        batch: Journaled<'_>,
        outbox: Outbox,
        dead_letters_sent: bool,
        timestamps: Vec<i64>,
    ) -> Result<(), PipelineError> {
        let Journaled {
            partition: pk,
            first,
            last,
            epoch,
        } = batch;
        let p = self.pipeline.as_str();
        for (table, rows, data) in outbox.tables {
            let token = dedup_token(&self.pipeline, &pk.topic, pk.partition, first, last, &table);
            let mut backoff = Backoff::new();
            let started = Instant::now();
            loop {
                match self.sink.insert(&table, data.clone(), &token).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(partition = %pk, first, last, "{e}; retrying");
                        METRICS.insert_retries.with_label_values(&[p, &table]).inc();
                        backoff.wait().await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            METRICS
                .insert_seconds
                .with_label_values(&[p, &table])
                .observe(started.elapsed().as_secs_f64());
            METRICS
                .rows_inserted
                .with_label_values(&[p, &table])
                .inc_by(rows);
            Stats::add(&self.stats.rows_inserted, rows);
        }
        // Kafka timestamp → acknowledged by ClickHouse (records of a recovered batch are not
        // counted: their latency includes the downtime).
        if !timestamps.is_empty() {
            let now = crate::plugin_store::now_ms();
            // One observation per row: a local histogram adds them up without atomics and
            // publishes once per batch.
            let h = METRICS.end_to_end_seconds.with_label_values(&[p]).local();
            for ts in timestamps.iter().filter(|t| **t > 0) {
                h.observe((now - ts).max(0) as f64 / 1e3);
            }
            h.flush();
        }
        fault::point(fault::AFTER_INSERT);

        // Dead letters are exactly-once: with a changelog they went out in the batch's
        // changelog transaction already; otherwise they are committed together with the
        // batch's offsets.
        let dead_letters = outbox.dead_letters;
        if !dead_letters.is_empty() {
            let mut by: HashMap<(&str, &str), u64> = HashMap::new();
            for d in &dead_letters {
                *by.entry((d.stage.as_str(), d.kind.as_str())).or_default() += 1;
            }
            for ((stage, kind), n) in by {
                METRICS
                    .dead_letters
                    .with_label_values(&[p, stage, kind])
                    .inc_by(n);
            }
        }
        let n_dead = dead_letters.len() as u64;
        let with_offsets =
            (!dead_letters_sent && !dead_letters.is_empty()).then_some(Arc::new(dead_letters));
        fault::point(fault::AFTER_DEAD_LETTERS);

        // The batch stays in the journal until the commit succeeds, so waiting is safe; a
        // broker restart can take minutes. Give up (the run ends, the batch is re-sent by the
        // next one) only after that.
        let mut backoff = Backoff::new();
        let started = Instant::now();
        loop {
            let result = match &with_offsets {
                None => self.committer.commit(pk, last + 1).await,
                Some(letters) => {
                    self.commit_with_dead_letters(pk, last, letters.clone())
                        .await
                }
            };
            match result {
                Ok(()) => break,
                // The group moved to a new generation (a rebalance): no commit of the old
                // assignment can succeed.
                Err(SourceError::Commit {
                    group_changed: true,
                    message,
                    ..
                }) => {
                    if self.revoked_since(pk, epoch).await {
                        // Its journal entry (here, and in the changelog if there is one) lets
                        // the partition's next owner finish the batch: this instance too when
                        // the partition came back to it, since the engine reads the journal
                        // again at the partition's first record, re-sends the batch (same
                        // tokens) and commits it in the new generation. Restarting the
                        // consumer instead would make the group rebalance once more, and
                        // every other member with a commit in flight would then do the same
                        // (docs/reliability.md, known problem 8).
                        tracing::warn!(partition = %pk, first, last, back = self.ownership.epoch_of(pk).is_some(),
                            "offset commit refused after the partition was revoked ({message}); left in the journal for its next owner");
                        return Ok(());
                    }
                    // Not revoked: the consumer has not seen the rebalance, and cannot while
                    // this worker holds up the loop. End the run: the supervisor starts a new
                    // one, which re-sends this batch from the journal and commits it.
                    return Err(PipelineError::Rejoin(format!(
                        "offset commit of {pk} refused ({message})"
                    )));
                }
                Err(e) if started.elapsed() < COMMIT_PATIENCE => {
                    tracing::warn!("{e}; retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Stats::add(&self.stats.dead_letters, n_dead);
        fault::point(fault::AFTER_COMMIT);
        let state = self.state.clone();
        let key = pk.clone();
        Self::blocking(move || state.complete_batch(&key, last)).await??;
        Stats::add(&self.stats.batches, 1);
        METRICS.batches.with_label_values(&[p]).inc();
        if let Ok(mut l) = self.live.lock() {
            l.positions.insert(pk.clone(), last + 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(first: i64, last: i64) -> Option<PendingBatch> {
        Some(PendingBatch {
            first,
            last,
            plugins: vec![],
            ..Default::default()
        })
    }

    #[test]
    fn open_side_batches_of_the_same_number_are_sealed_first() {
        let pk = |t: &str, n: i32| PartitionKey {
            topic: t.into(),
            partition: n,
        };
        let side: BTreeSet<String> = ["users".to_string()].into();
        let accs: HashMap<PartitionKey, ()> = [
            (pk("tx", 0), ()),
            (pk("users", 0), ()),
            (pk("users", 1), ()),
        ]
        .into();
        assert_eq!(
            sides_first(&accs, &pk("tx", 0), &side),
            [pk("users", 0), pk("tx", 0)]
        );
        // A side batch goes alone; so does a pipeline batch with no open side batch.
        assert_eq!(sides_first(&accs, &pk("users", 1), &side), [pk("users", 1)]);
        assert_eq!(sides_first(&accs, &pk("tx", 2), &side), [pk("tx", 2)]);
    }

    #[test]
    fn a_batch_after_the_journal_may_run() {
        let done = PartitionJournal {
            next_offset: Some(100),
            ..Default::default()
        };
        assert_eq!(overlap(&done, 100), None);
        assert_eq!(overlap(&PartitionJournal::default(), 0), None);
        let in_flight = PartitionJournal {
            next_offset: Some(50),
            pending: pending(50, 99),
            ..Default::default()
        };
        assert_eq!(overlap(&in_flight, 100), None);
    }

    #[test]
    fn a_batch_over_delivered_or_pending_records_restarts_the_run() {
        let done = PartitionJournal {
            next_offset: Some(100),
            ..Default::default()
        };
        assert!(overlap(&done, 60).is_some_and(|w| w.contains("offset 100")));
        let in_flight = PartitionJournal {
            next_offset: Some(50),
            pending: pending(50, 99),
            ..Default::default()
        };
        assert!(overlap(&in_flight, 50).is_some_and(|w| w.contains("50-99")));
        assert!(overlap(&in_flight, 99).is_some());
    }

    /// Three slices of rows, some of which the table rejects, and a dead letter from the
    /// stages in each: the overlapped encoder gives the same bytes and the same dead letters,
    /// in the same order, as the inline one.
    #[test]
    fn overlapped_encoding_matches_inline_encoding() {
        use crate::sink::clickhouse::types::TableSchema;
        use crate::stage::dedup::tests::record;
        let cfg: crate::config::ClickHouseConfig =
            serde_yaml_ng::from_str("url: http://127.0.0.1:1\ntable: t\n").unwrap();
        let schema = TableSchema::from_columns(
            "default",
            "t",
            [("id", "UInt64", ""), ("name", "String", "")],
        )
        .unwrap();
        let sink = ClickHouseSink::with_schemas(ClickHouseSink::client(&cfg), &cfg, vec![schema]);
        let slices = || {
            let mut offset = 0;
            (0..3)
                .map(|n| {
                    let rows: Vec<Record> = (0..4)
                        .map(|i| {
                            offset += 1;
                            let id = if i == 2 {
                                serde_json::json!("not a number")
                            } else {
                                serde_json::json!(offset)
                            };
                            record("tx", 0, offset, serde_json::json!({"id": id, "name": "x"}))
                        })
                        .collect();
                    let dead = vec![DeadLetter {
                        origin: rows[0].origin.clone(),
                        stage: format!("stage-{n}"),
                        plugin: None,
                        kind: "schema".into(),
                        message: String::new(),
                    }];
                    Staged {
                        rows,
                        dead,
                        remaining: 12 - 4 * n,
                    }
                })
                .collect::<Vec<_>>()
                .into_iter()
        };
        let run = |overlap| {
            let mut it = slices();
            let (tables, dead) = encode_slices(&sink, overlap, || Ok(it.next())).unwrap();
            let tables: Vec<(String, usize, Vec<u8>)> = tables
                .into_iter()
                .map(|(t, e)| (t, e.rows, e.data))
                .collect();
            let dead: Vec<(i64, String)> = dead
                .into_iter()
                .map(|d| (d.origin.offset, d.stage))
                .collect();
            (tables, dead)
        };
        let inline = run(false);
        assert_eq!(inline.0.len(), 1);
        assert_eq!(inline.0[0].1, 9);
        assert_eq!(inline.1.len(), 6);
        assert_eq!(inline.1[0], (1, "stage-0".to_string()));
        assert_eq!(inline.1[1], (3, "sink".to_string()));
        assert_eq!(run(true), inline);
    }
}
