//! Reading the dead-letter topic back, and replaying dead letters through a pipeline.
//!
//! Replay remembers how far it got (see [`replay`]), so replaying the same dead letters again
//! (after a crash, or by mistake) does not duplicate rows in ClickHouse.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{DeadLetterQueue, DlqError, H_OFFSET, H_PARTITION, H_TIMESTAMP, H_TOPIC};
use crate::config::KafkaConfig;
use crate::record::{DeadLetter, Header, Origin, Record};
use crate::sink::clickhouse::writer::ClickHouseSink;
use crate::stage::{BatchContext, PartitionKey, Stage};
use crate::state::StateStore;

/// Dead letters replayed together (one insert per table).
pub const REPLAY_WINDOW: i64 = 1000;

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// All headers, `sluice.*` ones included.
    pub headers: Vec<Header>,
}

impl DlqEntry {
    pub fn header(&self, key: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
    }

    /// The original Kafka message, as the pipeline first saw it.
    pub fn origin(&self) -> Origin {
        let num = |k: &str| self.header(k).and_then(|v| v.parse::<i64>().ok());
        Origin {
            topic: Arc::from(self.header(H_TOPIC).unwrap_or_default().as_str()),
            partition: num(H_PARTITION).unwrap_or(-1) as i32,
            offset: num(H_OFFSET).unwrap_or(-1),
            timestamp_ms: num(H_TIMESTAMP),
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self
                .headers
                .iter()
                .filter(|h| !h.key.starts_with("sluice."))
                .cloned()
                .collect(),
        }
    }
}

/// Which dead letters to read.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub partition: Option<i32>,
    pub from: Option<i64>,
    /// Inclusive.
    pub to: Option<i64>,
    pub limit: Option<usize>,
}

fn kafka_err(topic: &str, e: impl std::fmt::Display) -> DlqError {
    DlqError::Topic {
        topic: topic.to_string(),
        message: e.to_string(),
    }
}

/// Reads the selected dead letters (blocking; up to the end of each partition as it is now).
pub fn read(kafka: &KafkaConfig, topic: &str, sel: &Selection) -> Result<Vec<DlqEntry>, DlqError> {
    read_with_ends(kafka, topic, sel).map(|(e, _)| e)
}

/// Like [`read`], also returning each partition's end offset (high watermark) at read time.
pub fn read_with_ends(
    kafka: &KafkaConfig,
    topic: &str,
    sel: &Selection,
) -> Result<(Vec<DlqEntry>, BTreeMap<i32, i64>), DlqError> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = crate::source::kafka::base_client_config(kafka)
        .set(
            "group.id",
            format!("sluice-dlq-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| kafka_err(topic, e))?;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_err(topic, e))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| sel.partition.is_none_or(|want| want == *p))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut highs: BTreeMap<i32, i64> = BTreeMap::new();
    for p in &parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| kafka_err(topic, e))?;
        highs.insert(*p, high);
        let start = sel.from.unwrap_or(low).max(low);
        let end = sel.to.map_or(high, |t| (t + 1).min(high));
        if start < end {
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))
                .map_err(|e| kafka_err(topic, e))?;
            ends.insert(*p, end);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok((out, highs));
    }
    consumer.assign(&tpl).map_err(|e| kafka_err(topic, e))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        if sel.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            // Commit markers of the pipeline's transactions are never delivered: the
            // position says when a partition's end has been passed.
            let position = consumer.position().map_err(|e| kafka_err(topic, e))?;
            ends.retain(|p, end| {
                !matches!(position.find_partition(topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *end)
            });
            continue;
        };
        let m = m.map_err(|e| kafka_err(topic, e))?;
        let (p, o) = (m.partition(), m.offset());
        let Some(end) = ends.get(&p).copied() else {
            continue;
        };
        if o >= end {
            ends.remove(&p);
            continue;
        }
        let headers = crate::source::kafka::copy_headers(&m);
        out.push(DlqEntry {
            partition: p,
            offset: o,
            key: m.key().map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers,
        });
        if o + 1 >= end {
            ends.remove(&p);
        }
    }
    out.sort_by_key(|e| (e.partition, e.offset));
    Ok((out, highs))
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub chunks: usize,
    pub replayed: usize,
    /// Dead letters skipped because an earlier replay already processed them.
    pub already_replayed: usize,
    pub rows_inserted: u64,
    /// Records that failed again and went back to the dead-letter topic.
    pub dead_again: usize,
}

/// Per dead-letter partition, the offset after the last replayed dead letter. Kept in a small
/// JSON file beside the pipeline's state (the running pipeline holds the RocksDB lock).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    next: BTreeMap<i32, i64>,
}

impl Progress {
    fn load(path: &std::path::Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Replays the selected dead letters through `stages` into `sink`, in chunks of up to
/// [`REPLAY_WINDOW`] dead letters. Each chunk's rows carry the token
/// `sluice:<pipeline>:dlq:<topic>:<partition>:<first>-<last>:<table>` and progress is saved
/// (in `progress_file`) after each chunk, so a second replay skips what the first did, and a
/// replay interrupted after an insert re-sends that chunk with the same token. Stage state
/// comes from `state` (a scratch store: the running pipeline holds its own).
#[allow(clippy::too_many_arguments)]
pub async fn replay(
    pipeline: &str,
    kafka: &KafkaConfig,
    dlq: &DeadLetterQueue,
    sel: &Selection,
    stages: &mut [Box<dyn Stage>],
    sink: &ClickHouseSink,
    state: &StateStore,
    progress_file: &std::path::Path,
) -> Result<ReplayReport, String> {
    let topic = dlq.topic().to_string();
    let mut progress = Progress::load(progress_file)?;
    let kafka2 = kafka.clone();
    let topic2 = topic.clone();
    let sel2 = Selection {
        limit: None,
        ..sel.clone()
    };
    let entries = tokio::task::spawn_blocking(move || read(&kafka2, &topic2, &sel2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut report = ReplayReport::default();
    let mut per_partition: BTreeMap<i32, Vec<DlqEntry>> = BTreeMap::new();
    // The dead-letter topic is at-least-once: a crash can write a record's dead letter twice.
    // Replay each original record once.
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        if progress
            .next
            .get(&e.partition)
            .is_some_and(|n| e.offset < *n)
        {
            report.already_replayed += 1;
            continue;
        }
        let o = e.origin();
        if !seen.insert((o.topic.to_string(), o.partition, o.offset)) {
            continue;
        }
        per_partition.entry(e.partition).or_default().push(e);
    }
    for (partition, entries) in per_partition {
        for chunk in entries.chunks(REPLAY_WINDOW as usize) {
            let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            let (first, last) = (first.offset, last.offset);
            let ctx = BatchContext {
                pipeline: pipeline.to_string(),
                partition: PartitionKey {
                    topic: topic.clone(),
                    partition,
                },
                first_offset: first,
                last_offset: last,
            };
            let mut records: Vec<Record> = chunk
                .iter()
                .map(|e| Record::from_origin(Arc::new(e.origin())))
                .collect();
            let mut dead: Vec<DeadLetter> = Vec::new();
            let mut txn = state.txn();
            for stage in stages.iter_mut() {
                let out = stage
                    .process(records, &ctx, &mut txn)
                    .map_err(|e| e.to_string())?;
                records = out.records;
                dead.extend(out.dead_letters);
            }
            for (table, enc) in sink.encode(records, &mut dead) {
                let token =
                    format!("sluice:{pipeline}:dlq:{topic}:{partition}:{first}-{last}:{table}");
                sink.insert(&table, Bytes::from(enc.data), &token)
                    .await
                    .map_err(|e| e.to_string())?;
                report.rows_inserted += enc.rows as u64;
            }
            if !dead.is_empty() {
                dlq.send_all(&dead).await.map_err(|e| e.to_string())?;
            }
            progress.next.insert(partition, last + 1);
            progress.save(progress_file)?;
            report.chunks += 1;
            report.replayed += chunk.len();
            report.dead_again += dead.len();
        }
    }
    Ok(report)
}
