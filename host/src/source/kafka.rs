//! The Kafka source: a consumer group with automatic commits disabled. Offsets are committed by
//! the engine only after ClickHouse acknowledged the batch that contains them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::idle::{self, FetchSpin};
use super::join_watch::JoinWatch;
use super::side_first::SideFirst;
use crate::config::KafkaConfig;
use crate::record::{Header, Origin};
use crate::stage::PartitionKey;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka consumer: {0}")]
    Create(String),
    #[error("kafka subscribe to {topics:?}: {message}")]
    Subscribe {
        topics: Vec<String>,
        message: String,
    },
    #[error("kafka receive: {0}")]
    Receive(String),
    /// The consumer must be recreated to rejoin its group.
    #[error("kafka consumer fenced: {0}")]
    Rejoin(String),
    #[error("kafka commit of {partition} at offset {offset}: {message}")]
    Commit {
        partition: PartitionKey,
        offset: i64,
        message: String,
        /// The group moved on (new generation, member unknown or fenced, rebalance running):
        /// retrying this consumer's commit cannot succeed before it rejoins.
        group_changed: bool,
    },
}

/// Partition ownership changes, forwarded to the engine so it drops partial batches of
/// partitions it no longer owns.
#[derive(Debug, Clone)]
pub enum RebalanceEvent {
    Assigned(Vec<PartitionKey>),
    Revoked(Vec<PartitionKey>),
}

/// Which partitions the consumer owns, each with the epoch of the assignment that gave it.
/// Updated inside librdkafka's rebalance callbacks, so it is exact at any moment: a batch
/// sealed under an older epoch (its partition was revoked since, even if it came back) must
/// not be delivered, because the partition is consumed again from its committed offset.
#[derive(Debug, Default)]
pub struct Ownership {
    epoch: std::sync::atomic::AtomicU64,
    /// Counts assignments and revocations.
    changes: std::sync::atomic::AtomicU64,
    owned: std::sync::Mutex<std::collections::HashMap<PartitionKey, u64>>,
}

impl Ownership {
    /// The epoch of `pk`'s current assignment (`None`: not owned).
    pub fn epoch_of(&self, pk: &PartitionKey) -> Option<u64> {
        self.owned.lock().ok().and_then(|m| m.get(pk).copied())
    }

    /// Partition numbers of every owned partition.
    pub fn numbers(&self) -> std::collections::BTreeSet<i32> {
        self.owned
            .lock()
            .map(|m| m.keys().map(|pk| pk.partition).collect())
            .unwrap_or_default()
    }

    /// Changes every time partitions are assigned or revoked.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn assign(&self, parts: &[PartitionKey]) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let e = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if let Ok(mut m) = self.owned.lock() {
            for p in parts {
                m.insert(p.clone(), e);
            }
        }
    }

    fn revoke(&self, parts: &[PartitionKey]) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut m) = self.owned.lock() {
            for p in parts {
                m.remove(p);
            }
        }
    }
}

pub struct SourceContext {
    events: mpsc::UnboundedSender<RebalanceEvent>,
    group: String,
    ownership: Arc<Ownership>,
    spin: Arc<FetchSpin>,
    idle_pause: Duration,
    side_first: Arc<SideFirst>,
    join_watch: JoinWatch,
}

impl ClientContext for SourceContext {
    fn stats_raw(&self, statistics: &[u8]) {
        if self.ownership.changes() == 0 {
            if let Some(m) = self
                .join_watch
                .observe(statistics, std::time::Instant::now())
            {
                tracing::warn!(group = %self.group, "{m}");
            }
        }
        if let Some(rate) = self.spin.observe(statistics, std::time::Instant::now()) {
            tracing::info!(
                group = %self.group,
                "the broker answers fetches at the log end at once ({rate:.0} fetch requests/s): \
                 when caught up, partitions pause fetching for {} ms between checks \
                 (kafka.idle_fetch_pause_ms)",
                self.idle_pause.as_millis()
            );
        }
    }
}

fn keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| PartitionKey {
            topic: e.topic().to_string(),
            partition: e.partition(),
        })
        .collect()
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = keys(tpl);
            tracing::info!(group = %self.group, "partitions revoked: {}", list(&parts));
            self.ownership.revoke(&parts);
            self.side_first.revoked(&parts);
            let _ = self.events.send(RebalanceEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = keys(tpl);
                tracing::info!(group = %self.group, "partitions assigned: {}", list(&parts));
                self.ownership.assign(&parts);
                // Before any fetch of the new assignment.
                self.side_first.assigned(c, &parts);
                let _ = self.events.send(RebalanceEvent::Assigned(parts));
            }
            Rebalance::Error(e) => tracing::warn!(group = %self.group, "rebalance error: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

fn list(parts: &[PartitionKey]) -> String {
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type SluiceConsumer = StreamConsumer<SourceContext>;

/// librdkafka settings shared by the consumer, the dead-letter producer and admin clients:
/// brokers plus the user's pass-through properties (SASL, TLS, ...).
pub fn base_client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Creates `topic` unless it exists. `replication`: `-1` for the broker's default.
pub async fn create_topic_if_absent(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), String> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    use rdkafka::types::RDKafkaErrorCode;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| e.to_string())?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("cannot create: {code}")),
        }
    }
    Ok(())
}

/// Defaults that differ from librdkafka's; the user's `properties` win.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    // A crashed instance's partitions move to a live one after this long (librdkafka: 45 s).
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
    // Bound librdkafka's prefetch: its default (64 MiB queued, 50 MiB per fetch) sits on top
    // of the batches sluice holds. 16 MiB is ~80,000 records of 200 bytes, more than a batch
    // takes to process. (A broker that ignores fetch limits, like noida-db, still sends more.)
    ("queued.max.messages.kbytes", "16384"),
    // librdkafka fetches a partition while its queue holds fewer records than this and fewer
    // bytes than the limit above. At a backlog's end the fetcher reaches the log end while
    // sluice is still busy with earlier batches; a broker that answers such fetches at once
    // (noida-db) then gets 10,000-35,000 empty fetches per second until the queue drains.
    // With librdkafka's default (100,000) that lasted for the partition's last 16 MiB (the
    // last ~12 s of a 1 M-record full path); with 10,000 (~2 MB) for its last few thousand
    // records, a queue that still keeps the stages fed.
    ("queued.min.messages", "10000"),
    ("fetch.max.bytes", "16777216"),
    // Once that queue has drained, fetch again soon (librdkafka waits 1 s by default after
    // the queue was full, which shows up as a stall between batches).
    ("fetch.queue.backoff.ms", "10"),
];

pub struct KafkaSource {
    /// When a recoverable consumption error was last logged (rate limit across `recv` calls,
    /// whose futures the engine drops and recreates).
    last_warning: std::sync::Mutex<Option<std::time::Instant>>,
    consumer: Arc<SluiceConsumer>,
    /// Topic names already seen, shared by every record of the topic (an `Arc<str>` per
    /// message was an allocation and a free per record).
    topics: std::sync::Mutex<Vec<Arc<str>>>,
    ownership: Arc<Ownership>,
    side_first: Arc<SideFirst>,
}

impl KafkaSource {
    /// `instance_id` becomes `group.instance.id` unless the properties set one. `side_topics`
    /// are consumed in the same group as the pipeline's topics (stages that join them).
    pub fn connect(
        cfg: &KafkaConfig,
        instance_id: &str,
        side_topics: &[String],
    ) -> Result<(Self, mpsc::UnboundedReceiver<RebalanceEvent>), SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = base_client_config(cfg);
        for (k, v) in CONSUMER_DEFAULTS {
            if !cfg.properties.contains_key(*k) {
                c.set(*k, *v);
            }
        }
        if !cfg.properties.contains_key("group.instance.id") && !instance_id.is_empty() {
            c.set("group.instance.id", instance_id);
        }
        c.set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", cfg.start_offset.as_librdkafka());
        let idle_pause = Duration::from_millis(cfg.idle_fetch_pause_ms);
        // The statistics are how a fetch spin is seen (`idle`), and a group join that does not
        // complete (`join_watch`).
        if !idle_pause.is_zero() && !cfg.properties.contains_key("statistics.interval.ms") {
            c.set("statistics.interval.ms", "1000");
        }
        let ownership = Arc::new(Ownership::default());
        let created = std::time::Instant::now();
        let spin = Arc::new(FetchSpin::starting_at(created));
        let side_first = Arc::new(SideFirst::new(
            if cfg.side_topics_first {
                side_topics
            } else {
                &[]
            },
            cfg.start_offset,
        ));
        let consumer: Arc<SluiceConsumer> = c
            .create_with_context(SourceContext {
                events: tx,
                group: cfg.group_id.clone(),
                ownership: ownership.clone(),
                spin: spin.clone(),
                idle_pause,
                side_first: side_first.clone(),
                join_watch: JoinWatch::starting_at(created),
            })
            .map(Arc::new)
            .map_err(|e| SourceError::Create(e.to_string()))?;
        if !idle_pause.is_zero() {
            idle::spawn_governor(
                Arc::downgrade(&consumer),
                spin,
                idle_pause,
                side_first.clone(),
            );
        }
        let mut all = cfg.topics.clone();
        all.extend(
            side_topics
                .iter()
                .filter(|t| !cfg.topics.contains(t))
                .cloned(),
        );
        let topics: Vec<&str> = all.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| SourceError::Subscribe {
                topics: all.clone(),
                message: e.to_string(),
            })?;
        Ok((
            Self {
                consumer,
                topics: std::sync::Mutex::new(Vec::new()),
                last_warning: std::sync::Mutex::new(None),
                ownership,
                side_first,
            },
            rx,
        ))
    }

    /// Waits for the next message, then takes the messages librdkafka already holds, up to
    /// `max` in all, and copies them out.
    ///
    /// With a backlog one wake-up of the engine's loop then handles hundreds of messages
    /// instead of one, and their keys and values are copied into one shared buffer (one
    /// allocation per call; each record's `Bytes` is a slice of it, so cloning or dropping one
    /// is a reference count, not an allocation).
    ///
    /// Consumption errors librdkafka recovers from by itself (all brokers down during a
    /// restart, a transport failure, a partition EOF) are logged, at most once per 10 s, and
    /// waited out; only fatal ones end the pipeline.
    pub async fn recv_many(&self, max: usize) -> Result<Vec<Origin>, SourceError> {
        // A rebalance callback runs inside a poll: stop taking messages after one, so the engine
        // sees the event before the messages that follow it.
        let changes = self.ownership.changes();
        // One stream for the whole chunk: `recv` makes a stream per message, and each one
        // registers and unregisters a waker under a lock.
        let mut stream = self.consumer.stream();
        let first = loop {
            let next = stream.next().await;
            match next.ok_or_else(|| SourceError::Receive("the consumer's stream ended".into()))? {
                Ok(m) => break m,
                Err(e) => {
                    self.recoverable(e)?;
                    // Without a pause a persistent error would spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut messages = vec![first];
        while messages.len() < max && self.ownership.changes() == changes {
            match stream.next().now_or_never().flatten() {
                Some(Ok(m)) => messages.push(m),
                // Reported here; the next call waits it out.
                Some(Err(e)) => {
                    self.recoverable(e)?;
                    break;
                }
                None => break,
            }
        }
        let size: usize = messages.iter().map(|m| m.key_len() + m.payload_len()).sum();
        let mut buf = BytesMut::with_capacity(size);
        let mut spans = Vec::with_capacity(messages.len());
        for m in &messages {
            let key = m.key().map(|k| {
                buf.extend_from_slice(k);
                buf.len() - k.len()..buf.len()
            });
            let payload = m.payload().unwrap_or_default();
            buf.extend_from_slice(payload);
            spans.push((key, buf.len() - payload.len()..buf.len()));
        }
        let buf = buf.freeze();
        let mut out = Vec::with_capacity(messages.len());
        let mut topic: Option<Arc<str>> = None;
        for (m, (key, value)) in messages.iter().zip(spans) {
            let topic = match &topic {
                Some(t) if **t == *m.topic() => t.clone(),
                _ => topic.insert(self.topic(m.topic())).clone(),
            };
            self.side_first.saw(&topic, m.partition());
            out.push(Origin {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: key.map(|k| buf.slice(k)),
                value: buf.slice(value),
                headers: copy_headers(m),
            });
        }
        drop(messages);
        drop(stream);
        if let Some(o) = out.first() {
            if crate::fault::hit(crate::fault::REDELIVER) {
                let at = Offset::Offset(o.offset);
                let seek = self
                    .consumer
                    .seek(&o.topic, o.partition, at, Duration::from_secs(5));
                eprintln!(
                    "sluice: fault injection: {} [{}] sought back to {} ({seek:?})",
                    o.topic, o.partition, o.offset
                );
            }
        }
        Ok(out)
    }

    /// `Ok` (after a rate-limited warning) for an error librdkafka recovers from by itself.
    fn recoverable(&self, e: KafkaError) -> Result<(), SourceError> {
        match e {
            KafkaError::MessageConsumption(code) => {
                if self.warn_now() {
                    tracing::warn!("kafka consumption: {code} (librdkafka retries; waiting)");
                }
                Ok(())
            }
            // Seen after a broker restart: the group no longer knows this static member as
            // it is. A new consumer (a new run) rejoins.
            e @ KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::FencedInstanceId) => {
                Err(SourceError::Rejoin(e.to_string()))
            }
            e => Err(SourceError::Receive(e.to_string())),
        }
    }

    pub fn ownership(&self) -> Arc<Ownership> {
        self.ownership.clone()
    }

    /// Lets the pipeline's partitions be fetched once their side partitions have loaded
    /// (see [`SideFirst`]). Cheap: call it often.
    pub fn release_loaded_sides(&self) {
        self.side_first.release(self.consumer.as_ref());
    }

    /// True at most once per 10 s.
    fn warn_now(&self) -> bool {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    fn topic(&self, name: &str) -> Arc<str> {
        // Only `recv` takes the lock, so it is never contended; a poisoned lock only means a
        // panic elsewhere, and the cache is still valid.
        let mut topics = self
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = topics.iter().find(|t| &***t == name) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(name);
        topics.push(t.clone());
        t
    }

    pub fn committer(&self) -> Committer {
        Committer {
            consumer: self.consumer.clone(),
        }
    }
}

/// Commits offsets synchronously (on a blocking thread): the journal entry of a batch is only
/// cleared once the broker has confirmed its commit.
#[derive(Clone)]
pub struct Committer {
    consumer: Arc<SluiceConsumer>,
}

impl Committer {
    /// What a transactional producer needs to commit offsets for this consumer's group.
    pub fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    pub async fn commit(&self, pk: &PartitionKey, next_offset: i64) -> Result<(), SourceError> {
        let consumer = self.consumer.clone();
        let key = pk.clone();
        let err = |(message, group_changed): (String, bool)| SourceError::Commit {
            partition: pk.clone(),
            offset: next_offset,
            message,
            group_changed,
        };
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&key.topic, key.partition, Offset::Offset(next_offset))
                .map_err(|e| (e.to_string(), false))?;
            consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
                use rdkafka::types::RDKafkaErrorCode as C;
                let changed = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        C::IllegalGeneration
                            | C::UnknownMemberId
                            | C::RebalanceInProgress
                            | C::FencedInstanceId
                    )
                );
                (e.to_string(), changed)
            })
        })
        .await
        .map_err(|e| err((e.to_string(), false)))?
        .map_err(err)
    }

    /// Per assigned partition: (committed offset, end offset), for lag metrics. Blocking.
    pub fn lag(&self, timeout: Duration) -> Result<Vec<(PartitionKey, i64, i64)>, SourceError> {
        let committed = self.committed(timeout)?;
        let mut out = Vec::new();
        for e in committed.elements() {
            let Ok((_, high)) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)
            else {
                continue;
            };
            let committed = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            let pk = PartitionKey {
                topic: e.topic().to_string(),
                partition: e.partition(),
            };
            out.push((pk, committed, high));
        }
        Ok(out)
    }

    /// The group's committed offsets of `partitions` (`None`: nothing committed yet). Blocking.
    pub fn committed_offsets(
        &self,
        partitions: &[PartitionKey],
        timeout: Duration,
    ) -> Result<HashMap<PartitionKey, Option<i64>>, SourceError> {
        let mut tpl = TopicPartitionList::new();
        for pk in partitions {
            tpl.add_partition(&pk.topic, pk.partition);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, timeout)
            .map_err(|e| SourceError::Receive(e.to_string()))?;
        Ok(got
            .elements()
            .iter()
            .map(|e| {
                let pk = PartitionKey {
                    topic: e.topic().to_string(),
                    partition: e.partition(),
                };
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (pk, offset)
            })
            .collect())
    }

    /// Committed offsets of the current assignment (for status and tests).
    pub fn committed(&self, timeout: Duration) -> Result<TopicPartitionList, SourceError> {
        self.consumer
            .committed(timeout)
            .map_err(|e| SourceError::Receive(e.to_string()))
    }
}

/// A message's headers, copied out of librdkafka's buffer.
pub fn copy_headers(m: &BorrowedMessage<'_>) -> Vec<Header> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    key: h.key.to_string(),
                    value: Bytes::copy_from_slice(h.value.unwrap_or_default()),
                })
                .collect()
        })
        .unwrap_or_default()
}
