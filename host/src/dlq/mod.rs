//! The dead-letter topic: records that could not be processed, with the original key, value
//! and headers plus `sluice.*` headers saying which stage rejected them and why.
//!
//! Dead letters are exactly-once for `read_committed` readers: a pipeline produces them inside
//! a Kafka transaction, either the batch's state-changelog transaction (when the pipeline has
//! a changelog) or one that also commits the batch's offsets to the consumer group
//! ([`DeadLetterQueue::send_with_offsets`]). A crash before that transaction commits leaves
//! nothing visible, and the replayed batch produces its dead letters again; once it commits,
//! the batch is not replayed. The `sluice.source.*` headers say where each record came from.

pub mod tools;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;

use crate::config::KafkaConfig;
use crate::record::DeadLetter;
use crate::source::kafka::{base_client_config, create_topic_if_absent};

pub const H_PIPELINE: &str = "sluice.pipeline";
pub const H_STAGE: &str = "sluice.stage";
pub const H_PLUGIN: &str = "sluice.plugin";
pub const H_KIND: &str = "sluice.error.kind";
pub const H_MESSAGE: &str = "sluice.error.message";
pub const H_TOPIC: &str = "sluice.source.topic";
pub const H_PARTITION: &str = "sluice.source.partition";
pub const H_OFFSET: &str = "sluice.source.offset";
pub const H_TIMESTAMP: &str = "sluice.source.timestamp";
pub const H_AT: &str = "sluice.dead_lettered_at";

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("dead-letter producer: {0}")]
    Create(String),
    #[error("dead-letter topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("dead-letter topic {topic}: delivery of record from {source_topic}/{partition}@{offset} failed: {message}")]
    Deliver {
        topic: String,
        source_topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
    /// The dead-letter transaction failed; nothing of it is visible. `group_changed`: the
    /// consumer group refused the offsets (a rebalance), so the consumer must rejoin first.
    #[error("dead-letter topic {topic}: transaction failed: {message}")]
    Transaction {
        topic: String,
        message: String,
        group_changed: bool,
        /// The producer was fenced by another one with the same `transactional.id`.
        fatal: bool,
    },
}

/// Transactions of the dead-letter producer: as long as any batch may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    pipeline: String,
}

impl DeadLetterQueue {
    /// A producer for [`DeadLetterQueue::send_all`] (at-least-once: tools that keep their own
    /// progress).
    pub fn connect(cfg: &KafkaConfig, topic: &str, pipeline: &str) -> Result<Self, DlqError> {
        Self::with_producer(cfg, topic, pipeline, None)
    }

    /// A transactional producer for [`DeadLetterQueue::send_with_offsets`]. `transactional_id`
    /// must be stable across restarts of this instance: registering it aborts what a crashed
    /// predecessor left open. Blocking.
    pub fn connect_transactional(
        cfg: &KafkaConfig,
        topic: &str,
        pipeline: &str,
        transactional_id: &str,
    ) -> Result<Self, DlqError> {
        Self::with_producer(cfg, topic, pipeline, Some(transactional_id))
    }

    fn with_producer(
        cfg: &KafkaConfig,
        topic: &str,
        pipeline: &str,
        transactional_id: Option<&str>,
    ) -> Result<Self, DlqError> {
        let mut c = base_client_config(cfg);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000");
        if let Some(id) = transactional_id {
            c.set("transactional.id", id).set(
                "transaction.timeout.ms",
                TXN_TIMEOUT.as_millis().to_string(),
            );
        }
        let producer: FutureProducer = c.create().map_err(|e| DlqError::Create(e.to_string()))?;
        if transactional_id.is_some() {
            producer
                .init_transactions(Timeout::After(TXN_TIMEOUT))
                .map_err(|e| DlqError::Create(format!("init_transactions: {e}")))?;
        }
        Ok(Self {
            producer,
            topic: topic.to_string(),
            pipeline: pipeline.to_string(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the topic if the cluster does not have it yet.
    pub async fn ensure_topic(cfg: &KafkaConfig, topic: &str) -> Result<(), DlqError> {
        let err = |message: String| DlqError::Topic {
            topic: topic.to_string(),
            message,
        };
        let admin: AdminClient<DefaultClientContext> = base_client_config(cfg)
            .create()
            .map_err(|e| err(e.to_string()))?;
        create_topic_if_absent(&admin, topic, 1, 1, &[])
            .await
            .map_err(err)?;
        Ok(())
    }

    fn deliver_err(&self, l: &DeadLetter, message: String) -> DlqError {
        DlqError::Deliver {
            topic: self.topic.clone(),
            source_topic: l.origin.topic.to_string(),
            partition: l.origin.partition,
            offset: l.origin.offset,
            message,
        }
    }

    /// The Kafka record of a dead letter: the original key, value and headers, plus the
    /// `sluice.*` headers.
    fn record<'a>(&'a self, l: &'a DeadLetter, at: &str) -> FutureRecord<'a, [u8], [u8]> {
        let o = &l.origin;
        let partition = o.partition.to_string();
        let offset = o.offset.to_string();
        let ts = o.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len() + 10);
        for h in &o.headers {
            headers = headers.insert(KHeader {
                key: &h.key,
                value: Some(h.value.as_ref()),
            });
        }
        let plugin = l.plugin.as_deref().unwrap_or("");
        for (k, v) in [
            (H_PIPELINE, self.pipeline.as_str()),
            (H_STAGE, l.stage.as_str()),
            (H_PLUGIN, plugin),
            (H_KIND, l.kind.as_str()),
            (H_MESSAGE, l.message.as_str()),
            (H_TOPIC, &*o.topic),
            (H_PARTITION, partition.as_str()),
            (H_OFFSET, offset.as_str()),
            (H_TIMESTAMP, ts.as_str()),
            (H_AT, at),
        ] {
            headers = headers.insert(KHeader {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .payload(o.value.as_ref())
            .headers(headers);
        if let Some(k) = &o.key {
            rec = rec.key(k.as_ref());
        }
        // No record timestamp: the broker stamps the dead letter with its own produce time.
        // Keeping the source record's would let time-based retention delete the dead letter of
        // any record older than the topic's `retention.ms` as soon as it lands (replays,
        // rewinds, a backlog). The source time is in `sluice.source.timestamp`.
        rec
    }

    fn now_ms() -> String {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default()
            .to_string()
    }

    /// Sends every dead letter and waits until the broker acknowledged all of them.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), DlqError> {
        let at = Self::now_ms();
        let mut pending = Vec::with_capacity(letters.len());
        for l in letters {
            let mut rec = self.record(l, &at);
            // `send_result` enqueues at once (the async `send` would not start until awaited),
            // so all dead letters of a batch are in flight together.
            let fut = loop {
                match self.producer.send_result(rec) {
                    Ok(f) => break f,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(self.deliver_err(l, e.to_string())),
                }
            };
            pending.push((l, fut));
        }
        for (l, fut) in pending {
            match fut.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(self.deliver_err(l, e.to_string())),
                Err(_) => return Err(self.deliver_err(l, "producer shut down".into())),
            }
        }
        Ok(())
    }

    /// Enqueues the dead letters on `producer`, which has a transaction open: they become
    /// visible when (and only if) that transaction commits, and its commit fails if any of
    /// them was not delivered. Blocking.
    pub fn enqueue(
        &self,
        producer: &FutureProducer,
        letters: &[DeadLetter],
    ) -> Result<(), DlqError> {
        let at = Self::now_ms();
        for l in letters {
            let mut rec = self.record(l, &at);
            loop {
                match producer.send_result(rec) {
                    Ok(_) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(self.deliver_err(l, e.to_string())),
                }
            }
        }
        Ok(())
    }

    /// One transaction: the dead letters plus the consumer group's offsets (the batch's
    /// commit), so they become visible together or not at all. Needs a producer from
    /// [`DeadLetterQueue::connect_transactional`]. Blocking.
    pub fn send_with_offsets(
        &self,
        letters: &[DeadLetter],
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), DlqError> {
        let p = &self.producer;
        let result = p
            .begin_transaction()
            .map_err(|e| self.txn_err(e))
            .and_then(|()| self.enqueue(p, letters))
            .and_then(|()| {
                p.send_offsets_to_transaction(offsets, group, Timeout::After(TXN_TIMEOUT))
                    .map_err(|e| self.txn_err(e))
            })
            .and_then(|()| {
                p.commit_transaction(Timeout::After(TXN_TIMEOUT))
                    .map_err(|e| self.txn_err(e))
            });
        if let Err(e) = &result {
            if !matches!(e, DlqError::Transaction { fatal: true, .. }) {
                // Whatever was enqueued is discarded; the next batch starts a fresh one.
                let _ = p.abort_transaction(Timeout::After(Duration::from_secs(10)));
            }
        }
        result
    }

    fn txn_err(&self, e: KafkaError) -> DlqError {
        use RDKafkaErrorCode as C;
        let code = e.rdkafka_error_code();
        let fatal = match &e {
            KafkaError::Transaction(t) => t.is_fatal(),
            _ => false,
        } || matches!(code, Some(C::ProducerFenced | C::InvalidProducerEpoch));
        DlqError::Transaction {
            topic: self.topic.clone(),
            message: e.to_string(),
            group_changed: matches!(
                code,
                Some(
                    C::IllegalGeneration
                        | C::UnknownMemberId
                        | C::RebalanceInProgress
                        | C::FencedInstanceId
                )
            ),
            fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;

    use bytes::Bytes;
    use rdkafka::message::Headers;

    use crate::record::Origin;

    /// A dead letter must not carry its source record's timestamp: with time-based retention
    /// the broker would delete the dead letter of any old record as soon as it lands.
    #[test]
    fn dead_letters_are_stamped_when_produced_and_keep_the_source_time_in_a_header() {
        let cfg: KafkaConfig =
            serde_yaml_ng::from_str("brokers: 127.0.0.1:1\ntopics: [t]\ngroup_id: g\n").unwrap();
        let dlq = DeadLetterQueue::connect(&cfg, "dlq", "p").unwrap();
        let long_ago = 1_000_000_000_000;
        let letter = DeadLetter {
            origin: Arc::new(Origin {
                topic: Arc::from("t"),
                partition: 3,
                offset: 7,
                timestamp_ms: Some(long_ago),
                key: None,
                value: Bytes::from_static(b"{"),
                headers: Vec::new(),
            }),
            stage: "dedup".into(),
            plugin: None,
            kind: "parse".into(),
            message: "bad".into(),
        };
        let rec = dlq.record(&letter, "now");
        assert_eq!(rec.timestamp, None);
        let headers = rec.headers.as_ref().unwrap();
        let ts = (0..headers.count())
            .map(|i| headers.get(i))
            .find(|h| h.key == H_TIMESTAMP)
            .and_then(|h| h.value)
            .unwrap();
        assert_eq!(ts, long_ago.to_string().as_bytes());
    }
}
