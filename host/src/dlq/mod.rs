//! The dead-letter topic: records that could not be processed, with the original key, value
//! and headers plus `sluice.*` headers saying which stage rejected them and why.
//!
//! Dead letters are produced (and acknowledged by the broker) before the batch's offsets are
//! committed, so a record is never lost; after a crash a replayed batch may produce the same
//! dead letter twice (at-least-once): the `sluice.source.*` headers identify duplicates.

pub mod tools;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

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
}

pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    pipeline: String,
}

impl DeadLetterQueue {
    pub fn connect(cfg: &KafkaConfig, topic: &str, pipeline: &str) -> Result<Self, DlqError> {
        let mut c = base_client_config(cfg);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000");
        let producer: FutureProducer = c.create().map_err(|e| DlqError::Create(e.to_string()))?;
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

    /// Sends every dead letter and waits until the broker acknowledged all of them.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), DlqError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut pending = Vec::with_capacity(letters.len());
        for l in letters {
            let o = &l.origin;
            let partition = o.partition.to_string();
            let offset = o.offset.to_string();
            let ts = o.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
            let at = now_ms.to_string();
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
                (H_AT, at.as_str()),
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
            if let Some(t) = o.timestamp_ms {
                rec = rec.timestamp(t);
            }
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
}
