//! State hand-off between instances: every batch's state changes, journal entry and outbox are
//! also written to a compacted Kafka topic (the *changelog*), so an instance that gains a
//! partition restores that partition's state before it processes a record of it.
//!
//! Layout: one changelog partition per source partition *number* (co-partitioned topics, a
//! join's two sides, share the state namespace of their number). Record keys:
//! - `S` + stage key → the value (null: deleted): dedup keys, join buffers;
//! - `J` + partition key → the journal entry (offsets, the batch in flight);
//! - `O` + partition key + chunk number (u32, big endian) → a piece of that batch's outbox.
//!
//! A batch's records are written in **one Kafka transaction** that commits before anything of
//! the batch leaves the process (before the local RocksDB write too). The restorer reads with
//! `read_committed`, so it sees whole batches only. Each source partition number has its own
//! `transactional.id`; the instance that gains it calls `init_transactions` first, which fences
//! the previous owner: a stalled old owner's next changelog commit fails, and it abandons its
//! batch before inserting it. That is what keeps two owners from both writing one batch.
//!
//! Locally the store remembers, per partition number, the offset of the last changelog record
//! its state includes; regaining a partition only reads what others wrote since (and the
//! whole partition when that read passed over records it did not deliver, see
//! [`Changelog::restore`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::{PartitionJournal, StateError, StateStore};
use crate::config::{ChangelogConfig, KafkaConfig};
use crate::source::kafka::{base_client_config, create_topic_if_absent};

/// Outbox pieces stay well below Kafka's default 1 MB message limit.
const CHUNK: usize = 512 * 1024;
/// How long a restore may wait for the changelog before the run fails (and is retried).
const RESTORE_PATIENCE: Duration = Duration::from_secs(300);
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// A restore read that gets nothing for this long says where it stands.
const QUIET_REPORT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("state changelog topic {topic}: {message}")]
    Topic { topic: String, message: String },
    /// Another instance took this partition over: the batch must be abandoned.
    #[error("state changelog partition {partition}: fenced by a newer owner ({message})")]
    Fenced { partition: i32, message: String },
    #[error("state changelog partition {partition} is not owned by this instance")]
    NotOwned { partition: i32 },
    #[error("state changelog partition {partition}: {message}")]
    Kafka { partition: i32, message: String },
    /// The process is stopping ([`Changelog::cancel_restores`]).
    #[error("state changelog partition {partition}: restore cancelled, the process is stopping")]
    Cancelled { partition: i32 },
    #[error(transparent)]
    State(#[from] StateError),
}

/// One changelog record: key and value (`None`: a tombstone).
pub type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// What a restore did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    pub from_offset: i64,
    /// The partition's end (high watermark) when the restore began.
    pub end: i64,
    pub records: u64,
    pub full: bool,
    /// The read passed over records it did not deliver and was checked by a second read from
    /// the partition's start.
    pub checked_from_start: bool,
    pub bootstrapped: u64,
    pub took: Duration,
}

pub struct Changelog {
    topic: String,
    kafka: KafkaConfig,
    txn_prefix: String,
    /// Producers of the partition numbers this instance owns.
    producers: Mutex<HashMap<i32, Arc<FutureProducer>>>,
    /// Set when the process stops: a restore can wait minutes for the changelog (RESTORE_PATIENCE),
    /// and a stop must not wait with it.
    cancelled: AtomicBool,
}

/// Key of the local record saying how far a namespace's state follows the changelog.
pub(super) fn position_key(n: i32) -> Vec<u8> {
    let mut k = b"\0changelog\0".to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn chunk_key(pk_key: &[u8], i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(pk_key.len() + 5);
    k.push(b'O');
    k.extend_from_slice(pk_key);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn prefixed(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tag);
    k.extend_from_slice(key);
    k
}

impl Changelog {
    /// Checks (or creates, compacted) the changelog topic: it needs a partition for every
    /// partition number of `source_topics`.
    pub async fn connect(
        kafka: &KafkaConfig,
        cfg: &ChangelogConfig,
        source_topics: &[String],
    ) -> Result<Self, ChangelogError> {
        let topic = cfg.topic.clone();
        let err = |message: String| ChangelogError::Topic {
            topic: topic.clone(),
            message,
        };
        let admin: AdminClient<DefaultClientContext> = base_client_config(kafka)
            .create()
            .map_err(|e| err(e.to_string()))?;
        // All topics' metadata: asking for one topic by name makes brokers with automatic
        // topic creation create it (with their default partition count).
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| err(format!("metadata: {e}")))?;
        let partitions = |name: &str| -> Result<Option<usize>, ChangelogError> {
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len())
                .filter(|n| *n > 0))
        };
        let mut needed = 1;
        for t in source_topics {
            needed = needed.max(partitions(t)?.unwrap_or(1));
        }
        match partitions(&topic)? {
            Some(have) if have >= needed => {}
            Some(have) => {
                return Err(err(format!(
                    "has {have} partitions, the source topics need {needed} (one per partition \
                     number); add partitions to it"
                )))
            }
            None => {
                let rf = cfg.replication_factor.map_or(-1, i32::from);
                create_topic_if_absent(
                    &admin,
                    &topic,
                    needed as i32,
                    rf,
                    &[("cleanup.policy", "compact")],
                )
                .await
                .map_err(err)?;
                tracing::info!(topic = %topic, partitions = needed, "created the state changelog topic");
            }
        }
        Ok(Self {
            txn_prefix: format!("sluice.{}.{}", kafka.group_id, topic),
            topic,
            kafka: kafka.clone(),
            producers: Mutex::new(HashMap::new()),
            cancelled: AtomicBool::new(false),
        })
    }

    fn kafka_err(&self, partition: i32, e: KafkaError) -> ChangelogError {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Fenced)
                | Some(RDKafkaErrorCode::ProducerFenced)
                | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        );
        if fenced {
            ChangelogError::Fenced {
                partition,
                message: e.to_string(),
            }
        } else {
            ChangelogError::Kafka {
                partition,
                message: e.to_string(),
            }
        }
    }

    /// Makes this instance the writer of partition number `n`: fences the previous owner,
    /// then brings the local state of `n` up to the changelog. Blocking.
    pub fn restore(&self, store: &StateStore, n: i32) -> Result<Restored, ChangelogError> {
        self.check_cancelled(n)?;
        let started = Instant::now();
        tracing::debug!(
            partition = n,
            "restoring from the state changelog: fencing the previous owner"
        );
        let producer = self.producer_for(n)?;
        let fenced_after = started.elapsed();
        if fenced_after > Duration::from_secs(2) {
            tracing::info!(
                partition = n,
                took_ms = fenced_after.as_millis() as u64,
                "fencing the previous owner of the state changelog partition was slow"
            );
        }
        self.check_cancelled(n)?;
        let reader = self.client("read_committed")?;
        let (low, high) = self.watermarks(n)?;
        tracing::debug!(partition = n, low, high, "reading the state changelog");
        let pos = store.changelog_position(n)?;
        let mut done = Restored {
            from_offset: low,
            end: high,
            ..Restored::default()
        };
        let from = match pos {
            // Nothing written by anyone yet, but state from before the changelog was
            // configured: publish it, so it can move.
            None if high <= low => {
                done.bootstrapped = self.bootstrap(store, &producer, n)?;
                None
            }
            None => Some(low),
            Some(p) if p + 1 < low => Some(low),
            Some(p) => Some(p + 1),
        };
        if let Some(from) = from {
            done.full = pos.is_none_or(|p| p + 1 < low);
            done.from_offset = from;
            if done.full {
                store.wipe_namespace(n)?;
            }
            if from < high {
                let read = self.replay(&reader, store, n, from, from, high)?;
                done.records = read.records;
                if read.skipped && from > low {
                    // Offsets were passed over without being delivered: aborted transactions
                    // (the previous owner's unfinished batch), or committed records a broker
                    // hid. noida-db (the test broker) lists aborted transactions that ended
                    // before a fetch's offset, and librdkafka then skips every later record
                    // of that producer id, which all owners of the partition share (one
                    // `transactional.id`). Reading from the partition's start passes each
                    // abort marker and tells the two apart; what it finds at `from` and
                    // after is applied again (re-applying changelog records is idempotent).
                    let reader = self.client("read_committed")?;
                    let check = self.replay(&reader, store, n, low, from, high)?;
                    if check.records > read.records {
                        tracing::warn!(
                            partition = n,
                            from,
                            end = high,
                            read = read.records,
                            from_start = check.records,
                            "the broker hid committed changelog records from a read starting \
                             at the state's position; applied them as read from the partition's start"
                        );
                        done.records = check.records;
                    }
                    done.checked_from_start = true;
                }
                if done.records == 0 && high - from > 1 {
                    // More than the commit marker of this instance's own last publish, yet
                    // nothing readable (aborted transactions): worth knowing when a handover
                    // goes wrong.
                    tracing::info!(
                        partition = n,
                        from,
                        end = high,
                        "no committed changelog record readable before the partition's end"
                    );
                }
            } else {
                store.set_changelog_position(n, from - 1)?;
            }
        }
        if let Ok(mut m) = self.producers.lock() {
            m.insert(n, producer);
        }
        done.took = started.elapsed();
        Ok(done)
    }

    /// Restores partition number `n` from the changelog's first record, whatever the local
    /// state holds. Blocking.
    pub fn restore_full(&self, store: &StateStore, n: i32) -> Result<Restored, ChangelogError> {
        store.wipe_namespace(n)?;
        self.restore(store, n)
    }

    /// Ends restores in progress and refuses new ones (with [`ChangelogError::Cancelled`]):
    /// the process is stopping. The state they leave is safe to build on: a partial read has
    /// not moved the local position, and re-applying changelog records is idempotent.
    pub fn cancel_restores(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Undoes [`Changelog::cancel_restores`] (a pipeline paused by the API runs again).
    pub fn allow_restores(&self) {
        self.cancelled.store(false, Ordering::Relaxed);
    }

    fn check_cancelled(&self, n: i32) -> Result<(), ChangelogError> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(ChangelogError::Cancelled { partition: n });
        }
        Ok(())
    }

    /// Forgets partition number `n` (it moved to another instance).
    pub fn release(&self, n: i32) {
        if let Ok(mut m) = self.producers.lock() {
            m.remove(&n);
        }
    }

    /// Forgets every partition (the run ends).
    pub fn release_all(&self) {
        if let Ok(mut m) = self.producers.lock() {
            m.clear();
        }
    }

    fn producer_for(&self, n: i32) -> Result<Arc<FutureProducer>, ChangelogError> {
        let mut c = base_client_config(&self.kafka);
        c.set("transactional.id", format!("{}.{n}", self.txn_prefix))
            .set(
                "transaction.timeout.ms",
                TXN_TIMEOUT.as_millis().to_string(),
            )
            .set("compression.type", "lz4")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "60000");
        let producer: FutureProducer = c.create().map_err(|e| self.kafka_err(n, e))?;
        // Fences the previous owner and aborts its unfinished transaction, so what follows
        // reads only finished batches.
        producer
            .init_transactions(Timeout::After(TXN_TIMEOUT))
            .map_err(|e| self.kafka_err(n, e))?;
        Ok(Arc::new(producer))
    }

    /// A consumer of the changelog topic with the given `isolation.level`.
    fn client(&self, isolation: &str) -> Result<BaseConsumer, ChangelogError> {
        let mut c = base_client_config(&self.kafka);
        c.set("group.id", format!("{}.restore", self.txn_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", isolation)
            .set("receive.message.max.bytes", "1000000000");
        c.create().map_err(|e| ChangelogError::Topic {
            topic: self.topic.clone(),
            message: e.to_string(),
        })
    }

    /// Reads changelog partition `n` from offset `from` to its end `high` (the high watermark
    /// taken after the partition's producer was fenced) and applies the records at `apply_from`
    /// and after to the local store.
    fn replay(
        &self,
        consumer: &BaseConsumer,
        store: &StateStore,
        n: i32,
        from: i64,
        apply_from: i64,
        high: i64,
    ) -> Result<Replayed, ChangelogError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, n, Offset::Offset(from))
            .map_err(|e| self.kafka_err(n, e))?;
        consumer.assign(&tpl).map_err(|e| self.kafka_err(n, e))?;
        let mut apply = Replay::default();
        let mut records = 0u64;
        let mut last = from - 1;
        let mut skipped = false;
        let started = Instant::now();
        let deadline = started + RESTORE_PATIENCE;
        let mut held_at: Option<i64> = None;
        let mut last_progress = started;
        let mut reported = started;
        loop {
            self.check_cancelled(n)?;
            if reported.max(last_progress).elapsed() >= QUIET_REPORT {
                // Without this a stalled read is silent for RESTORE_PATIENCE.
                reported = Instant::now();
                tracing::info!(
                    partition = n,
                    from,
                    end = high,
                    last_read = last,
                    position = self.position(consumer, n),
                    quiet_s = last_progress.elapsed().as_secs(),
                    "restoring from the state changelog: nothing read for a while; still waiting"
                );
            }
            if Instant::now() > deadline {
                return Err(ChangelogError::Kafka {
                    partition: n,
                    message: format!(
                        "restore did not reach the end within {}s",
                        RESTORE_PATIENCE.as_secs()
                    ),
                });
            }
            let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                // Waiting at the readable end (above): the end may be passed without another
                // end-of-partition event (only aborted records and markers beyond it).
                if held_at.is_some() && self.position(consumer, n).is_some_and(|at| at >= high) {
                    break;
                }
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => {
                    // A read_committed reader ends at the last stable offset, which a
                    // transaction whose commit or abort markers the broker has not written
                    // yet holds below the end: records of the transaction the previous owner
                    // committed last can be unreadable for a moment after the fencing. Only
                    // the end taken after the fencing is the end.
                    let at = self.position(consumer, n).unwrap_or(from);
                    if at >= high {
                        break;
                    }
                    if held_at.is_none() {
                        tracing::info!(partition = n, at, end = high,
                            "the changelog's readable end is below its end (a transaction's markers are not written yet); waiting");
                    }
                    held_at = Some(at);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e)
                    if e.rdkafka_error_code()
                        .is_some_and(|c| c == RDKafkaErrorCode::MessageTimedOut) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(partition = n, "reading the state changelog: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            last_progress = Instant::now();
            // Consecutive records of one transaction are adjacent; between transactions
            // lies one commit marker. A wider gap is an aborted transaction or hidden records.
            skipped |= m.offset() - last > 2;
            last = m.offset();
            if last < apply_from {
                continue;
            }
            records += 1;
            apply.record(m.key().unwrap_or_default(), m.payload());
            if apply.stage.len() >= 65_536 {
                store.apply_stage_writes(std::mem::take(&mut apply.stage))?;
            }
        }
        if let Some(at) = held_at {
            tracing::info!(
                partition = n,
                at,
                end = high,
                waited_ms = started.elapsed().as_millis() as u64,
                "the changelog's readable end reached its end"
            );
        }
        // The last transaction's commit marker sits just before the end.
        skipped |= high - last > 2;
        store.apply_stage_writes(std::mem::take(&mut apply.stage))?;
        let (journals, outboxes) = apply.finish()?;
        // A check from the start may end before the state's position (nothing after it).
        store.finish_restore(n, journals, outboxes, last.max(apply_from - 1))?;
        Ok(Replayed { records, skipped })
    }

    /// Low and high watermark of partition `n`. Asked with `read_uncommitted`: a
    /// `read_committed` client gets the last stable offset as the high one, which an open
    /// transaction (or one whose markers are not written yet) holds below records that are
    /// already committed.
    fn watermarks(&self, n: i32) -> Result<(i64, i64), ChangelogError> {
        self.client("read_uncommitted")?
            .fetch_watermarks(&self.topic, n, Duration::from_secs(10))
            .map_err(|e| self.kafka_err(n, e))
    }

    /// The reader's position in partition `n` (the next offset it would read), once known.
    fn position(&self, consumer: &BaseConsumer, n: i32) -> Option<i64> {
        let tpl = consumer.position().ok()?;
        match tpl.find_partition(&self.topic, n)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// Publishes the whole local state of namespace `n` (state that predates the changelog).
    fn bootstrap(
        &self,
        store: &StateStore,
        producer: &FutureProducer,
        n: i32,
    ) -> Result<u64, ChangelogError> {
        let mut records = Vec::new();
        store.for_each_in_namespace(n, |kind, key, value| {
            match kind {
                Kind::Stage => records.push((prefixed(b'S', key), Some(value.to_vec()))),
                Kind::Journal => records.push((prefixed(b'J', key), Some(value.to_vec()))),
                Kind::Outbox => {
                    let value = store.outbox_bytes(value)?;
                    for (i, c) in value.chunks(CHUNK).enumerate() {
                        records.push((chunk_key(key, i as u32), Some(c.to_vec())));
                    }
                }
            }
            Ok(())
        })?;
        // The journal entries must say how many outbox pieces they have.
        let mut fixed = Vec::with_capacity(records.len());
        let mut chunks: HashMap<Vec<u8>, u32> = HashMap::new();
        for (k, _) in records.iter().filter(|(k, _)| k[0] == b'O') {
            *chunks.entry(k[1..k.len() - 4].to_vec()).or_default() += 1;
        }
        for (k, v) in records {
            if k[0] == b'J' {
                let mut j: PartitionJournal = serde_json::from_slice(v.as_deref().unwrap_or(b"{}"))
                    .map_err(|e| StateError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        message: e.to_string(),
                    })?;
                j.outbox_chunks = chunks.get(&k[1..]).copied();
                fixed.push((k, Some(super::json(&j)?)));
            } else {
                fixed.push((k, v));
            }
        }
        let count = fixed.len() as u64;
        if count > 0 {
            let last = self.send(producer, n, &fixed, &|_| Ok(()))?;
            store.set_changelog_position(n, last)?;
            tracing::info!(
                partition = n,
                records = count,
                "published pre-existing state to the changelog"
            );
        }
        Ok(count)
    }

    /// The changelog records of one batch: its state changes, its outbox in pieces, and its
    /// journal entry last (`journal.outbox_chunks` is set here).
    pub fn batch_records(
        pk_key: &[u8],
        writes: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
        outbox: &[u8],
        journal: &mut PartitionJournal,
    ) -> Result<Vec<ChangelogRecord>, StateError> {
        let mut out: Vec<ChangelogRecord> = writes.map(|(k, v)| (prefixed(b'S', &k), v)).collect();
        let previous = journal.outbox_chunks.unwrap_or(0);
        let mut count = 0u32;
        for (i, c) in outbox.chunks(CHUNK).enumerate() {
            out.push((chunk_key(pk_key, i as u32), Some(c.to_vec())));
            count = i as u32 + 1;
        }
        for i in count..previous {
            out.push((chunk_key(pk_key, i), None));
        }
        journal.outbox_chunks = Some(count);
        out.push((prefixed(b'J', pk_key), Some(super::json(journal)?)));
        Ok(out)
    }

    /// Writes one batch's records to changelog partition `n` in one transaction; returns the
    /// offset of the last one. `also` enqueues more records (to other topics: the batch's dead
    /// letters) in the same transaction. Blocking.
    pub fn publish(
        &self,
        n: i32,
        records: &[ChangelogRecord],
        also: &dyn Fn(&FutureProducer) -> Result<(), String>,
    ) -> Result<i64, ChangelogError> {
        let producer = self
            .producers
            .lock()
            .ok()
            .and_then(|m| m.get(&n).cloned())
            .ok_or(ChangelogError::NotOwned { partition: n })?;
        self.send(&producer, n, records, also)
    }

    fn send(
        &self,
        producer: &FutureProducer,
        n: i32,
        records: &[ChangelogRecord],
        also: &dyn Fn(&FutureProducer) -> Result<(), String>,
    ) -> Result<i64, ChangelogError> {
        producer
            .begin_transaction()
            .map_err(|e| self.kafka_err(n, e))?;
        let result = also(producer)
            .map_err(|message| ChangelogError::Kafka {
                partition: n,
                message,
            })
            .and_then(|()| self.send_in_txn(producer, n, records));
        if result.is_err() {
            // A fenced producer cannot abort; anything else leaves nothing visible either way.
            let _ = producer.abort_transaction(Timeout::After(Duration::from_secs(10)));
        }
        result
    }

    fn send_in_txn(
        &self,
        producer: &FutureProducer,
        n: i32,
        records: &[ChangelogRecord],
    ) -> Result<i64, ChangelogError> {
        let mut last = None;
        for (k, v) in records {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&self.topic)
                .partition(n)
                .key(k.as_slice());
            if let Some(v) = v {
                rec = rec.payload(v.as_slice());
            }
            loop {
                match producer.send_result(rec) {
                    Ok(f) => {
                        last = Some(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(self.kafka_err(n, e)),
                }
            }
        }
        producer
            .commit_transaction(Timeout::After(TXN_TIMEOUT))
            .map_err(|e| self.kafka_err(n, e))?;
        let Some(f) = last else {
            return Err(ChangelogError::Kafka {
                partition: n,
                message: "empty transaction".into(),
            });
        };
        match futures::executor::block_on(f) {
            Ok(Ok(d)) => Ok(d.offset),
            Ok(Err((e, _))) => Err(self.kafka_err(n, e)),
            Err(_) => Err(ChangelogError::Kafka {
                partition: n,
                message: "delivery report lost".into(),
            }),
        }
    }
}

/// What [`Changelog::replay`] read.
struct Replayed {
    /// Records applied.
    records: u64,
    /// Offsets were passed over without being delivered (see [`Changelog::restore`]).
    skipped: bool,
}

/// Which local column family a namespace entry lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Stage,
    Journal,
    Outbox,
}

/// Changelog records being applied: stage writes stream to the store, journal entries and
/// outbox pieces are kept (latest per key) until the end, when each journal's pieces are
/// joined. Compaction can drop an older batch's piece that a newer batch overwrote, so
/// pieces are only assembled for the final journal entries.
#[derive(Default)]
struct Replay {
    stage: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    journals: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    chunks: HashMap<Vec<u8>, BTreeMap<u32, Vec<u8>>>,
}

impl Replay {
    fn record(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some((&tag, rest)) = key.split_first() else {
            return;
        };
        let value = value.map(<[u8]>::to_vec);
        match tag {
            b'S' => self.stage.push((rest.to_vec(), value)),
            b'J' => {
                self.journals.insert(rest.to_vec(), value);
            }
            b'O' if rest.len() >= 4 => {
                let (pk, i) = rest.split_at(rest.len() - 4);
                let i = u32::from_be_bytes([i[0], i[1], i[2], i[3]]);
                let pieces = self.chunks.entry(pk.to_vec()).or_default();
                match value {
                    Some(v) => {
                        pieces.insert(i, v);
                    }
                    None => {
                        pieces.remove(&i);
                    }
                }
            }
            _ => tracing::warn!("ignoring an unknown state changelog record"),
        }
    }

    /// (journal entries, outboxes) per partition key; `None` deletes.
    #[allow(clippy::type_complexity)]
    fn finish(
        mut self,
    ) -> Result<
        (
            Vec<(Vec<u8>, Option<Vec<u8>>)>,
            Vec<(Vec<u8>, Option<Vec<u8>>)>,
        ),
        StateError,
    > {
        let mut outboxes = Vec::new();
        for (pk, j) in &self.journals {
            let parsed: Option<PartitionJournal> = match j {
                Some(v) => Some(serde_json::from_slice(v).map_err(|e| StateError::Corrupt {
                    key: String::from_utf8_lossy(pk).into_owned(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            let outbox = match parsed {
                Some(PartitionJournal {
                    pending: Some(_),
                    outbox_chunks: Some(count),
                    ..
                }) => {
                    let mut pieces = self.chunks.remove(pk).unwrap_or_default();
                    let mut bytes = Vec::new();
                    for i in 0..count {
                        let piece = pieces.remove(&i).ok_or_else(|| StateError::Corrupt {
                            key: String::from_utf8_lossy(pk).into_owned(),
                            message: format!(
                                "outbox piece {i} of {count} missing in the changelog"
                            ),
                        })?;
                        bytes.extend_from_slice(&piece);
                    }
                    Some(bytes)
                }
                _ => None,
            };
            outboxes.push((pk.clone(), outbox));
        }
        Ok((self.journals.into_iter().collect(), outboxes))
    }
}

/// The partition number of a source partition key as stored (`topic \0 partition`).
pub(super) fn partition_of_pk_key(key: &[u8]) -> Option<i32> {
    let tail = key.len().checked_sub(4)?;
    if tail == 0 || key.get(tail - 1) != Some(&0) {
        return None;
    }
    let b = &key[tail..];
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The partition number of a stage key (`stage \0 partition key…`).
pub(super) fn partition_of_stage_key(key: &[u8]) -> Option<i32> {
    let zero = key.iter().position(|b| *b == 0)?;
    let b = key.get(zero + 1..zero + 5)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::PartitionKey;

    #[test]
    fn keys_parse_back() {
        let pk = PartitionKey {
            topic: "orders".into(),
            partition: 7,
        };
        let k = StateStore::partition_key(&pk);
        assert_eq!(partition_of_pk_key(&k), Some(7));
        assert_eq!(partition_of_stage_key(b"dedup\0\0\0\0\x09K..."), Some(9));
        assert_eq!(partition_of_stage_key(b"dedup"), None);
    }

    #[test]
    fn replay_assembles_only_the_final_outbox() {
        let pk = b"t\0\0\0\0\x01".to_vec();
        let mut j = PartitionJournal {
            pending: Some(super::super::PendingBatch {
                first: 0,
                last: 9,
                plugins: vec![],
                ..Default::default()
            }),
            ..PartitionJournal::default()
        };
        let big = vec![7u8; CHUNK + 10];
        let first =
            Changelog::batch_records(&pk, std::iter::empty(), &big, &mut j).expect("records");
        assert_eq!(j.outbox_chunks, Some(2));
        j.pending = Some(super::super::PendingBatch {
            first: 10,
            last: 19,
            plugins: vec![],
            ..Default::default()
        });
        let second =
            Changelog::batch_records(&pk, std::iter::empty(), b"small", &mut j).expect("records");
        // The second batch tombstones the first one's extra piece.
        assert!(second
            .iter()
            .any(|(k, v)| k == &chunk_key(&pk, 1) && v.is_none()));
        let mut r = Replay::default();
        for (k, v) in first.iter().chain(second.iter()) {
            r.record(k, v.as_deref());
        }
        let (journals, outboxes) = r.finish().expect("finish");
        assert_eq!(journals.len(), 1);
        assert_eq!(outboxes, vec![(pk.clone(), Some(b"small".to_vec()))]);
    }
}
