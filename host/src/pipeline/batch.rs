//! Per-partition batch accumulation.

use std::time::Instant;

use crate::config::BatchConfig;
use crate::record::Record;
use crate::stage::PartitionKey;

/// A batch ready for the worker: one partition, a fixed offset range.
pub struct SealedBatch {
    pub partition: PartitionKey,
    pub first: i64,
    pub last: i64,
    pub records: Vec<Record>,
}

/// Records of one partition waiting to become a batch.
pub struct Accumulator {
    records: Vec<Record>,
    bytes: usize,
    opened: Instant,
}

impl Accumulator {
    pub fn new() -> Self {
        Self {
            records: Vec::new(),
            bytes: 0,
            opened: Instant::now(),
        }
    }

    pub fn push(&mut self, r: Record) {
        if self.records.is_empty() {
            self.opened = Instant::now();
        }
        self.bytes += r.value.len() + r.key.as_ref().map_or(0, |k| k.len());
        self.records.push(r);
    }

    pub fn is_full(&self, cfg: &BatchConfig) -> bool {
        self.records.len() >= cfg.max_rows || self.bytes >= cfg.max_bytes
    }

    pub fn is_aged(&self, cfg: &BatchConfig) -> bool {
        !self.records.is_empty() && self.opened.elapsed() >= cfg.max_age()
    }

    pub fn seal(self, pk: &PartitionKey) -> Option<SealedBatch> {
        let first = self.records.first()?.origin.offset;
        let last = self.records.last()?.origin.offset;
        Some(SealedBatch {
            partition: pk.clone(),
            first,
            last,
            records: self.records,
        })
    }
}
