//! Real services for integration tests: a ClickHouse server and a Kafka-protocol broker.
//!
//! Each service comes from an environment variable when it is set (`scripts/test.sh` starts the
//! services once for the whole run and exports them), otherwise the harness starts **one** local
//! instance per test process through `scripts/services/*.sh`, on a free port with a data dir in a
//! temp dir:
//!
//! | service    | variable                        | local instance                            |
//! |------------|---------------------------------|-------------------------------------------|
//! | ClickHouse | `SLUICE_TEST_CLICKHOUSE_URL`    | chdb-core's embedded server (HTTP)        |
//! | Kafka      | `SLUICE_TEST_KAFKA_BROKERS`     | `SLUICE_TEST_KAFKA_BROKER=noida` (default) or `tansu` |
//!
//! Lifetime of local instances: Rust never drops statics and an at-exit hook would need `unsafe`
//! (and would not run on abort or SIGKILL anyway), so the start scripts get `--parent-pid <this
//! process>`; a detached watchdog stops the service and deletes its data dir once this process is
//! gone, however it ended.
//!
//! A service that cannot be started is an error, never a skip: tests fail with the script's
//! output, which includes the tail of the service log.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::OnceCell;

/// Timeout for metadata, watermark and committed-offset requests.
const KAFKA_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `start` exit code of the service scripts when the port is taken (see `lib.sh`).
const EXIT_PORT_IN_USE: i32 = 3;

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A name unique to this run and call, for topics, consumer groups and tables: `prefix_<hex>`.
/// Only `[a-z0-9_]`, so it is a valid ClickHouse identifier and Kafka topic name as long as the
/// prefix is.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process: no extra dependency for a random suffix.
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{prefix}_{:016x}", h.finish())
}

// ---------------------------------------------------------------------------------------------
// Starting services
// ---------------------------------------------------------------------------------------------

/// A ClickHouse server reachable over HTTP.
#[derive(Debug, Clone)]
pub struct ClickHouseEnv {
    /// e.g. `http://127.0.0.1:18123`
    pub url: String,
}

impl ClickHouseEnv {
    pub fn client(&self) -> clickhouse::Client {
        ch_client(&self.url)
    }
}

/// Which Kafka-protocol broker the tests talk to; tests may relax checks that a known emulator
/// quirk breaks (e.g. tansu's high watermarks), never silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Noida,
    Tansu,
    /// An external broker (e.g. Apache Kafka from docker-compose).
    Other,
}

impl BrokerKind {
    /// From `SLUICE_TEST_KAFKA_BROKER`; `None` when unset.
    fn from_env() -> anyhow::Result<Option<Self>> {
        match env_nonempty("SLUICE_TEST_KAFKA_BROKER").as_deref() {
            None => Ok(None),
            Some("noida") => Ok(Some(Self::Noida)),
            Some("tansu") => Ok(Some(Self::Tansu)),
            Some("other") => Ok(Some(Self::Other)),
            Some(v) => bail!("SLUICE_TEST_KAFKA_BROKER must be noida, tansu or other, not {v:?}"),
        }
    }

    /// Whether `read_committed` readers see only committed transactions (the PyPI tansu build
    /// also shows aborted ones, so what a killed producer left open reappears there).
    pub fn hides_aborted_transactions(self) -> bool {
        self != Self::Tansu
    }

    fn script_name(self) -> &'static str {
        match self {
            Self::Noida => "noida",
            Self::Tansu => "tansu",
            Self::Other => "other",
        }
    }
}

/// A Kafka-protocol broker.
#[derive(Debug, Clone)]
pub struct KafkaEnv {
    /// Bootstrap servers, e.g. `127.0.0.1:19092`.
    pub brokers: String,
    pub kind: BrokerKind,
}

static CLICKHOUSE: OnceCell<Result<ClickHouseEnv, String>> = OnceCell::const_new();
static KAFKA: OnceCell<Result<KafkaEnv, String>> = OnceCell::const_new();

/// The ClickHouse server for this test process (see the module docs).
pub async fn clickhouse() -> anyhow::Result<ClickHouseEnv> {
    // The outcome, failure included, is cached: every test gets the same error instead of each
    // one retrying a 60 s start.
    CLICKHOUSE
        .get_or_init(|| async {
            if let Some(url) = env_nonempty("SLUICE_TEST_CLICKHOUSE_URL") {
                return Ok(ClickHouseEnv { url });
            }
            blocking(|| {
                let port = start_local("clickhouse.sh", "sluice-ch-", |port, dir| {
                    vec![
                        ("SLUICE_CH_PORT", port.to_string()),
                        ("SLUICE_CH_DATA", dir.display().to_string()),
                    ]
                })?;
                Ok(ClickHouseEnv {
                    url: format!("http://127.0.0.1:{port}"),
                })
            })
            .await
        })
        .await
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

/// The Kafka-protocol broker for this test process (see the module docs).
pub async fn kafka() -> anyhow::Result<KafkaEnv> {
    KAFKA
        .get_or_init(|| async {
            let kind = BrokerKind::from_env().map_err(|e| e.to_string())?;
            if let Some(brokers) = env_nonempty("SLUICE_TEST_KAFKA_BROKERS") {
                // An external broker of unnamed kind is treated as a real Kafka.
                let kind = kind.unwrap_or(BrokerKind::Other);
                return Ok(KafkaEnv { brokers, kind });
            }
            let kind = kind.unwrap_or(BrokerKind::Noida);
            if kind == BrokerKind::Other {
                return Err(
                    "SLUICE_TEST_KAFKA_BROKER=other needs SLUICE_TEST_KAFKA_BROKERS".into(),
                );
            }
            blocking(move || {
                let port = start_local("kafka.sh", "sluice-kafka-", |port, dir| {
                    vec![
                        ("SLUICE_KAFKA_BROKER", kind.script_name().to_string()),
                        ("SLUICE_KAFKA_PORT", port.to_string()),
                        ("SLUICE_KAFKA_DATA", dir.display().to_string()),
                    ]
                })?;
                Ok(KafkaEnv {
                    brokers: format!("127.0.0.1:{port}"),
                    kind,
                })
            })
            .await
        })
        .await
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(format!("service start task failed: {e}")),
    }
}

/// Runs `scripts/services/<script> start` on a free port, tied to this process, and returns the
/// port. Retries with another port when the script reports the port as taken (another process can
/// grab it between our probe and the server's bind).
fn start_local(
    script: &str,
    dir_prefix: &str,
    env: impl Fn(u16, &std::path::Path) -> Vec<(&'static str, String)>,
) -> anyhow::Result<u16> {
    let script_path = repo_root().join("scripts/services").join(script);
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        // Kept (not deleted on drop): the watchdog removes it once this process exits.
        let dir = tempfile::Builder::new()
            .prefix(dir_prefix)
            .tempdir()
            .context("creating a data dir for a local service")?
            .keep();
        let out = Command::new("bash")
            .arg(&script_path)
            .args(["start", "--parent-pid"])
            .arg(std::process::id().to_string())
            .arg("--remove-data-on-exit")
            .envs(env(port, &dir))
            .output()
            .with_context(|| format!("running {}", script_path.display()))?;
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            tracing::info!("{}", output.trim());
            return Ok(port);
        }
        // Nothing was started, so the watchdog never runs: clean up here.
        let _ = std::fs::remove_dir_all(&dir);
        last_error = format!(
            "`{} start` failed ({}):\n{}",
            script_path.display(),
            out.status,
            output.trim_end()
        );
        if out.status.code() != Some(EXIT_PORT_IN_USE) {
            break;
        }
    }
    bail!("{last_error}\n(run scripts/install-deps.sh if the venv or a service binary is missing)")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Kafka helpers
// ---------------------------------------------------------------------------------------------

/// Client settings shared by the helpers; public so tests build their own clients alike.
pub fn kafka_config(brokers: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        // noida-db ignores fetch size limits and may answer with the whole backlog at once.
        .set("receive.message.max.bytes", "1000000000")
        .set("log_level", "4");
    cfg
}

/// A transactional producer of its own that has sent one record to `topic` [`partition`] in a
/// transaction it leaves open (for up to 10 minutes): the partition's last stable offset stays
/// below it, as behind a stalled or crashed producer. Abort it (or drop it) to end that.
pub fn open_transaction(
    brokers: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<rdkafka::producer::BaseProducer> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = kafka_config(brokers)
        .set("transactional.id", unique_name("blocker"))
        .set("transaction.timeout.ms", "600000")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    producer.begin_transaction()?;
    producer
        .send(
            BaseRecord::to(topic)
                .partition(partition)
                .key("X-blocker")
                .payload("never committed"),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    Ok(producer)
}

/// Consumer settings for a consumer group: manual commits, start at the beginning.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut cfg = kafka_config(brokers);
    cfg.set("group.id", group)
        // tansu completes a group join only after about half the session timeout: 23 s with
        // librdkafka's default 45 s, 3 s with 6 s.
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    cfg
}

/// Creates a topic (replication 1) and waits until the broker's metadata shows all its
/// partitions with a leader.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(brokers)
        .create()
        .context("creating a Kafka admin client")?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(KAFKA_REQUEST_TIMEOUT));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .with_context(|| format!("creating topic {name}"))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                bail!("topic {t} already exists (use unique_name)")
            }
            Err((t, code)) => bail!("creating topic {t}: {code}"),
        }
    }

    let brokers = brokers.to_string();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka_config(&brokers).create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = partition_count(&consumer, &name).unwrap_or(0);
            if seen == partitions as usize {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("topic {name}: metadata shows {seen} of {partitions} partitions after 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await?
}

/// Number of partitions of `topic` that have a leader, from a fresh metadata request.
fn partition_count<C: Consumer>(consumer: &C, topic: &str) -> anyhow::Result<usize> {
    let md = consumer
        .fetch_metadata(Some(topic), KAFKA_REQUEST_TIMEOUT)
        .with_context(|| format!("fetching metadata of {topic}"))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(0);
    };
    if t.error().is_some() {
        return Ok(0);
    }
    Ok(t.partitions().iter().filter(|p| p.leader() >= 0).count())
}

/// Partition ids of an existing topic.
fn partitions_of<C: Consumer>(consumer: &C, topic: &str) -> anyhow::Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), KAFKA_REQUEST_TIMEOUT)
        .with_context(|| format!("fetching metadata of {topic}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow!("topic {topic} not in metadata"))?;
    if let Some(e) = t.error() {
        bail!("topic {topic}: metadata error {e:?}");
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct TestRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// `None`: the producer's partitioner picks (by key hash when there is a key).
    pub partition: Option<i32>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the epoch; `None`: the producer's clock.
    pub timestamp: Option<i64>,
}

impl TestRecord {
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: Some(payload.into()),
            ..Self::default()
        }
    }

    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }
}

/// Produces the records in order (pipelined) and waits until every one is acknowledged.
/// Returns `(partition, offset)` of each record.
pub async fn produce(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = TestRecord>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer: FutureProducer = kafka_config(brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .context("creating a Kafka producer")?;
    let mut pending = Vec::new();
    for rec in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut fr: FutureRecord<'_, Vec<u8>, Vec<u8>> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &rec.key {
            fr = fr.key(k);
        }
        if let Some(p) = &rec.payload {
            fr = fr.payload(p);
        }
        if let Some(p) = rec.partition {
            fr = fr.partition(p);
        }
        if let Some(ts) = rec.timestamp {
            fr = fr.timestamp(ts);
        }
        // Enqueue without awaiting each delivery; back off while librdkafka's queue is full.
        loop {
            match producer.send_result(fr) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e).context(format!("producing to {topic}")),
            }
        }
    }
    let mut positions = Vec::with_capacity(pending.len());
    for delivery in pending {
        match delivery
            .await
            .context("producer dropped a delivery report")?
        {
            Ok(d) => positions.push((d.partition, d.offset)),
            Err((e, _)) => return Err(e).context(format!("delivery to {topic} failed")),
        }
    }
    Ok(positions)
}

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
}

impl ConsumedRecord {
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn payload_str(&self) -> Option<&str> {
        self.payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }
}

/// Reads every record of `topic`, without a consumer group, sorted by (partition, offset).
///
/// Done means: each partition reached the high watermark it had when the call started, and then
/// nothing new arrived for [`CONSUME_QUIET`]. The quiet period is what makes this correct on
/// tansu, whose watermarks are wrong (it reports 1 for a partition holding 30 records); records
/// produced concurrently may or may not be included. Fails if `timeout` passes first; the error
/// says what was read. To wait for an exact count, use [`consume_n`].
pub async fn consume_all(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    read_in_background(brokers, topic, None, timeout, true).await
}

/// As [`consume_all`], but also the records of open and aborted transactions
/// (`isolation.level=read_uncommitted`): tells a transaction the broker never committed from
/// records that were never written.
pub async fn consume_all_uncommitted(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    read_in_background(brokers, topic, None, timeout, false).await
}

/// Reads `topic` from the beginning, without a consumer group, until `n` records were read
/// (fails if `timeout` passes first). More records may exist; they are not read.
pub async fn consume_n(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    read_in_background(brokers, topic, Some(n), timeout, true).await
}

/// [`read_topic`] on a blocking thread.
async fn read_in_background(
    brokers: &str,
    topic: &str,
    want: Option<usize>,
    timeout: Duration,
    committed: bool,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic(&brokers, &topic, want, timeout, committed))
        .await?
}

/// How long [`consume_all`] waits for more records once it reached the start watermarks.
pub const CONSUME_QUIET: Duration = Duration::from_secs(1);

fn read_topic(
    brokers: &str,
    topic: &str,
    want: Option<usize>,
    timeout: Duration,
    committed: bool,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = consumer_config(brokers, &unique_name("sluice_tests_reader"))
        // Short broker-side waits: the quiet period then spans many fetch round trips.
        .set("fetch.wait.max.ms", "100")
        .set(
            "isolation.level",
            if committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .context("creating a Kafka consumer")?;
    let mut behind: BTreeMap<i32, i64> = BTreeMap::new(); // partition -> start high watermark
    let mut tpl = TopicPartitionList::new();
    for p in partitions_of(&consumer, topic)? {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, KAFKA_REQUEST_TIMEOUT)
            .with_context(|| format!("fetching watermarks of {topic}/{p}"))?;
        if high > 0 {
            behind.insert(p, high);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    // Assigned, not subscribed: no group rebalance to wait for.
    consumer.assign(&tpl)?;

    let mut out = Vec::new();
    let mut last_record = Instant::now();
    loop {
        match want {
            Some(n) if out.len() >= n => break,
            None if behind.is_empty() && last_record.elapsed() >= CONSUME_QUIET => break,
            _ => {}
        }
        if Instant::now() >= deadline {
            let wanted = want.map_or_else(|| "all records".to_string(), |n| format!("{n} records"));
            bail!(
                "reading {topic}: timed out after {timeout:?} waiting for {wanted}, read {}; \
                 partitions short of their start watermark: {behind:?}",
                out.len()
            );
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if !behind.is_empty() {
            // Transactional producers leave commit markers at the end, which are never
            // delivered: the position tells when they have been passed.
            let position = consumer.position()?;
            behind.retain(|p, end| {
                !matches!(position.find_partition(topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *end)
            });
        }
        let Some(msg) = polled else {
            continue;
        };
        let msg = msg.with_context(|| format!("consuming {topic}"))?;
        last_record = Instant::now();
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let rec = ConsumedRecord {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: msg.timestamp().to_millis(),
        };
        if behind
            .get(&rec.partition)
            .is_some_and(|end| rec.offset + 1 >= *end)
        {
            behind.remove(&rec.partition);
        }
        out.push(rec);
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Committed offset of `group` per partition of `topic` (`None` where the group committed
/// nothing). The offset is the next one to read, as Kafka stores it.
pub async fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let brokers = brokers.to_string();
    let group = group.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = consumer_config(&brokers, &group)
            .create()
            .context("creating a Kafka consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions_of(&consumer, &topic)? {
            tpl.add_partition(&topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, KAFKA_REQUEST_TIMEOUT)
            .with_context(|| format!("fetching committed offsets of group {group}"))?;
        let mut out = BTreeMap::new();
        for e in committed.elements_for_topic(&topic) {
            let off = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            out.insert(e.partition(), off);
        }
        Ok(out)
    })
    .await?
}

/// High watermark (offset of the next record to be written) per partition of `topic`.
/// tansu (`BrokerKind::Tansu`) is known to report these wrongly.
pub async fn end_offsets(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka_config(&brokers)
            .create()
            .context("creating a Kafka consumer")?;
        let mut out = BTreeMap::new();
        for p in partitions_of(&consumer, &topic)? {
            let (_, high) = consumer
                .fetch_watermarks(&topic, p, KAFKA_REQUEST_TIMEOUT)
                .with_context(|| format!("fetching watermarks of {topic}/{p}"))?;
            out.insert(p, high);
        }
        Ok(out)
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// ClickHouse helpers
// ---------------------------------------------------------------------------------------------

pub fn ch_client(url: &str) -> clickhouse::Client {
    clickhouse::Client::default().with_url(url)
}

/// Runs a statement that returns nothing (DDL, INSERT ... SELECT, OPTIMIZE ...).
pub async fn ch_execute(url: &str, sql: &str) -> anyhow::Result<()> {
    ch_client(url)
        .query_raw(sql)
        .execute()
        .await
        .with_context(|| format!("ClickHouse: {sql}"))
}

/// Runs a query and returns its rows as JSON objects (format JSONEachRow). Note ClickHouse's
/// JSON quirks: 64-bit integers come back as strings unless the query sets
/// `output_format_json_quote_64bit_integers = 0`.
pub async fn query_rows_json(url: &str, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let bytes = ch_client(url)
        .query_raw(sql)
        .fetch_bytes("JSONEachRow")
        .with_context(|| format!("ClickHouse: {sql}"))?
        .collect()
        .await
        .with_context(|| format!("ClickHouse: {sql}"))?;
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line).with_context(|| {
                format!(
                    "ClickHouse returned a line that is not JSON: {}",
                    String::from_utf8_lossy(line)
                )
            })
        })
        .collect()
}
