//! `sluice rewind`: moves a stopped pipeline's consumer-group offsets back to an offset or a
//! point in time, and tells its state which offsets had already been delivered, so that
//! re-delivered records are recognised (dedup drops those still inside its window) instead of
//! landing twice.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::kafka::base_client_config;
use crate::config::KafkaConfig;
use crate::stage::PartitionKey;
use crate::state::{StateError, StateStore};

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("topic {topic:?} has no partition {partition}")]
    NoPartition { topic: String, partition: i32 },
    #[error("topic {0:?} is not one of the pipeline's topics")]
    NotAPipelineTopic(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Where to rewind to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// This offset in every selected partition (clamped to what the broker still has).
    Offset(i64),
    /// The earliest offset whose timestamp is at or after this time (ms since the epoch).
    Time(i64),
    Earliest,
}

/// One partition's rewind.
#[derive(Debug, Clone)]
pub struct Rewound {
    pub partition: PartitionKey,
    pub to: i64,
    /// Offsets below this had been delivered (re-deliveries are recognised below it).
    pub delivered_below: Option<i64>,
}

fn kafka_err(e: impl std::fmt::Display) -> RewindError {
    RewindError::Kafka(e.to_string())
}

/// Rewinds `topic` (all partitions, or `partition`). The pipeline must be stopped: its state
/// store is opened here (RocksDB refuses a second opener), and the group must have no active
/// member for the commit to be accepted.
pub fn rewind(
    kafka: &KafkaConfig,
    instance_id: &str,
    state: &StateStore,
    topic: &str,
    partition: Option<i32>,
    target: Target,
) -> Result<Vec<Rewound>, RewindError> {
    if !kafka.topics.iter().any(|t| t == topic) {
        return Err(RewindError::NotAPipelineTopic(topic.to_string()));
    }
    // Joins the group as the pipeline's own static member (which the stopped pipeline left
    // registered): a commit from outside the group is refused while any member is known,
    // and some brokers never expire a static member.
    let mut c = base_client_config(kafka);
    c.set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000");
    if !kafka.properties.contains_key("group.instance.id") && !instance_id.is_empty() {
        c.set("group.instance.id", instance_id);
    }
    let consumer: BaseConsumer = c.create().map_err(kafka_err)?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(kafka_err)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Polling drives the join; records it may return are not processed (nothing is
        // committed for them).
        let _ = consumer.poll(Duration::from_millis(200));
        if consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(RewindError::Kafka(format!(
                "could not join group {:?} within 60 s (is the pipeline still running?)",
                kafka.group_id
            )));
        }
    }
    let md = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(kafka_err)?;
    let all: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let parts: Vec<i32> = match partition {
        Some(p) if all.contains(&p) => vec![p],
        Some(p) => {
            return Err(RewindError::NoPartition {
                topic: topic.to_string(),
                partition: p,
            })
        }
        None => all,
    };
    let mut targets: Vec<(i32, i64)> = Vec::new();
    match target {
        Target::Time(ms) => {
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition_offset(topic, *p, Offset::Offset(ms))
                    .map_err(kafka_err)?;
            }
            let found = consumer
                .offsets_for_times(tpl, TIMEOUT)
                .map_err(kafka_err)?;
            for e in found.elements() {
                let to = match e.offset() {
                    Offset::Offset(o) => o,
                    // No record at or after that time: the end of the partition.
                    _ => {
                        consumer
                            .fetch_watermarks(topic, e.partition(), TIMEOUT)
                            .map_err(kafka_err)?
                            .1
                    }
                };
                targets.push((e.partition(), to));
            }
        }
        Target::Offset(_) | Target::Earliest => {
            for p in &parts {
                let (low, high) = consumer
                    .fetch_watermarks(topic, *p, TIMEOUT)
                    .map_err(kafka_err)?;
                let to = match target {
                    Target::Offset(o2) => o2.clamp(low, high),
                    _ => low,
                };
                targets.push((*p, to));
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (p, to) in &targets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*to))
            .map_err(kafka_err)?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| RewindError::Kafka(format!("committing the new offsets for group {:?} failed (is an instance of the pipeline still running?): {e}", kafka.group_id)))?;
    let mut out = Vec::new();
    for (p, to) in targets {
        let pk = PartitionKey {
            topic: topic.to_string(),
            partition: p,
        };
        let delivered_below = state.rewind_partition(&pk)?;
        out.push(Rewound {
            partition: pk,
            to,
            delivered_below,
        });
    }
    Ok(out)
}
