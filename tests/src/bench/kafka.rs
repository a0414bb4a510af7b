//! Kafka side of the bench: topics, bulk and paced producers, and the raw-consume baseline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::events::{event, BenchEvent};
use super::procfs;
use crate::workload::Rng;

/// noida-db ignores fetch size limits and answers a fetch at offset 0 with the whole backlog
/// (`shared/notes/kafka.md`); librdkafka refuses responses above this, so every consumer of a
/// big backlog needs it raised.
pub const RECEIVE_MESSAGE_MAX_BYTES: &str = "1000000000";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("create admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Counts failed deliveries and, when the opaque carries a send time, records send → ack.
#[derive(Default)]
pub struct DeliveryStats {
    pub failed: AtomicU64,
    pub acked: AtomicU64,
    /// Microseconds from `send` to the broker's acknowledgement (paced producer only).
    pub ack_us: Mutex<Vec<u32>>,
}

pub struct StatsContext {
    pub stats: Arc<DeliveryStats>,
    /// Time base of the send stamps carried as opaques.
    pub origin: Instant,
}

impl ClientContext for StatsContext {}

impl ProducerContext for StatsContext {
    /// Microseconds since `origin` at send time, plus one (0 means "not stamped").
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: usize) {
        match result {
            Ok(_) => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                if sent > 0 {
                    let now = self.origin.elapsed().as_micros() as usize;
                    let us = now.saturating_sub(sent - 1).min(u32::MAX as usize) as u32;
                    if let Ok(mut v) = self.stats.ack_us.lock() {
                        v.push(us);
                    }
                }
            }
            Err(_) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub type BenchProducer = ThreadedProducer<StatsContext>;

pub fn producer(brokers: &str, linger_ms: u32) -> Result<(BenchProducer, Arc<DeliveryStats>)> {
    let stats = Arc::new(DeliveryStats::default());
    let p: BenchProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms.to_string())
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2000000")
        .create_with_context(StatsContext {
            stats: stats.clone(),
            origin: Instant::now(),
        })
        .context("create producer")?;
    Ok((p, stats))
}

fn send_retrying(
    p: &BenchProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    partition: Option<i32>,
    opaque: usize,
) -> Result<()> {
    let mut rec = BaseRecord::with_opaque_to(topic, opaque)
        .key(key)
        .payload(value);
    if let Some(p) = partition {
        rec = rec.partition(p);
    }
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => bail!("produce to {topic}: {e}"),
        }
    }
}

/// Produces every event and waits for all acknowledgements.
pub fn produce_all(brokers: &str, topic: &str, events: &[BenchEvent]) -> Result<Duration> {
    let t0 = Instant::now();
    let (p, stats) = producer(brokers, 5)?;
    for e in events {
        send_retrying(&p, topic, &e.key, &e.value, e.partition, 0)?;
    }
    p.flush(Duration::from_secs(120))
        .context("flush the backlog")?;
    let failed = stats.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} of {} records were not delivered to {topic}",
            events.len()
        );
    }
    Ok(t0.elapsed())
}

/// What the paced producer did.
#[derive(Debug, Clone)]
pub struct PacedRun {
    pub sent: usize,
    pub secs: f64,
    /// send → broker acknowledgement, microseconds, sorted.
    pub ack_us: Vec<u32>,
}

/// Sends `rate` events per second for `secs` seconds, each carrying its send time (epoch
/// milliseconds) in `ts`. Event numbers start at `first_index`. Blocks the calling thread.
pub fn produce_paced(
    brokers: &str,
    topic: &str,
    rate: u64,
    secs: u64,
    first_index: usize,
) -> Result<PacedRun> {
    // linger 1 ms: the produce call precedes the broker's append by at most linger + a round
    // trip, which the ack times below measure.
    let (p, stats) = producer(brokers, 1)?;
    let origin = Instant::now();
    let total = (rate * secs) as usize;
    let mut rng = Rng::new(7);
    let mut sent = 0usize;
    let t0 = Instant::now();
    while sent < total {
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        while sent < due {
            let e = event(first_index + sent, &mut rng, Some(now_ms()));
            let stamp = origin.elapsed().as_micros() as usize + 1;
            send_retrying(&p, topic, &e.key, &e.value, e.partition, stamp)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs_taken = t0.elapsed().as_secs_f64();
    p.flush(Duration::from_secs(60)).context("flush")?;
    let failed = stats.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sent} paced records were not delivered");
    }
    let mut ack_us = stats
        .ack_us
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    ack_us.sort_unstable();
    Ok(PacedRun {
        sent,
        secs: secs_taken,
        ack_us,
    })
}

/// The raw-consume baseline, measured in a process of its own (`sluice-bench raw-consume`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RawConsume {
    pub records: u64,
    pub bytes: u64,
    /// From creating the consumer (group join included, as for sluice) to the last record.
    pub secs: f64,
    /// From the first record to the last.
    pub secs_from_first: f64,
    pub cpu_s: f64,
    pub peak_rss_kb: u64,
    /// The broker's CPU meanwhile (filled in by the parent, which knows the broker's pid).
    #[serde(default)]
    pub broker_cpu_s: f64,
}

impl RawConsume {
    pub fn records_per_s(&self) -> f64 {
        self.records as f64 / self.secs.max(1e-9)
    }
}

/// Consumes `count` records of `topic` from the beginning with a fresh consumer group,
/// touching every payload.
pub fn raw_consume(brokers: &str, topic: &str, group: &str, count: u64) -> Result<RawConsume> {
    let cpu0 = procfs::self_usage().cpu_s;
    let t0 = Instant::now();
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("receive.message.max.bytes", RECEIVE_MESSAGE_MAX_BYTES)
        .create()
        .context("create consumer")?;
    c.subscribe(&[topic]).context("subscribe")?;
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while records < count {
        if Instant::now() > deadline {
            bail!("raw consume: only {records} of {count} records within 300 s");
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                records += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
            }
            Some(Err(e)) => bail!("raw consume: {e}"),
            None => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let u = procfs::self_usage();
    Ok(RawConsume {
        records,
        bytes,
        secs,
        secs_from_first: first.map_or(secs, |f| f.elapsed().as_secs_f64()),
        cpu_s: u.cpu_s - cpu0,
        peak_rss_kb: u.peak_rss_kb,
        broker_cpu_s: 0.0,
    })
}
