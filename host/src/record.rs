//! Records as they flow between stages, and dead letters.

use std::sync::Arc;

use bytes::Bytes;

/// A Kafka header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Bytes,
}

/// The Kafka message a record descends from. Kept whole (cheaply, behind an `Arc`) so every
/// output can be traced to its offset and a dead letter carries the original key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
}

/// A record between stages. The first stage sees the Kafka message itself; later stages see the
/// previous stage's outputs (JSON objects), each still pointing at its [`Origin`].
#[derive(Debug, Clone)]
pub struct Record {
    pub origin: Arc<Origin>,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Destination table chosen by a stage; `None` = the pipeline's default table.
    pub table: Option<String>,
}

impl Record {
    /// A record straight from Kafka.
    pub fn from_origin(origin: Arc<Origin>) -> Self {
        Self {
            key: origin.key.clone(),
            value: origin.value.clone(),
            headers: origin.headers.clone(),
            table: None,
            origin,
        }
    }
}

/// Why a record left the pipeline for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub origin: Arc<Origin>,
    /// The stage that rejected it (`sink` for rows ClickHouse's schema does not accept).
    pub stage: String,
    /// `name@version` of the plugin, for WASM stages.
    pub plugin: Option<String>,
    /// Short machine-readable reason: `parse`, `schema`, `invalid`, `trap`, `timeout`, ...
    pub kind: String,
    pub message: String,
}
