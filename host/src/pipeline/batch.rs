//! Per-partition batch accumulation.

use std::time::Instant;

use crate::config::BatchConfig;
use crate::record::Record;
use crate::stage::PartitionKey;
use crate::state::PendingBatch;

/// A batch ready for the worker: one partition, a fixed offset range.
pub struct SealedBatch {
    pub partition: PartitionKey,
    pub first: i64,
    pub last: i64,
    pub records: Vec<Record>,
    /// Rebuilt from the journal after a restart.
    pub replay: bool,
}

/// Records of one partition waiting to become a batch. In replay mode the boundaries come
/// from the journal and size or age limits do not apply: the batch must be rebuilt exactly.
pub struct Accumulator {
    records: Vec<Record>,
    bytes: usize,
    opened: Instant,
    replay: Option<PendingBatch>,
}

impl Accumulator {
    pub fn new(replay: Option<PendingBatch>) -> Self {
        Self {
            records: Vec::new(),
            bytes: 0,
            opened: Instant::now(),
            replay,
        }
    }

    pub fn is_replay(&self) -> bool {
        self.replay.is_some()
    }

    pub fn push(&mut self, r: Record) {
        if self.records.is_empty() {
            self.opened = Instant::now();
        }
        self.bytes += r.value.len() + r.key.as_ref().map_or(0, |k| k.len());
        self.records.push(r);
    }

    fn last_offset(&self) -> Option<i64> {
        self.records.last().map(|r| r.origin.offset)
    }

    pub fn is_full(&self, cfg: &BatchConfig) -> bool {
        match self.replay {
            Some(p) => self.last_offset().is_some_and(|o| o >= p.last),
            None => self.records.len() >= cfg.max_rows || self.bytes >= cfg.max_bytes,
        }
    }

    pub fn is_aged(&self, cfg: &BatchConfig) -> bool {
        self.replay.is_none() && !self.records.is_empty() && self.opened.elapsed() >= cfg.max_age()
    }

    pub fn seal(self, pk: &PartitionKey) -> Option<SealedBatch> {
        let (first, last) = match self.replay {
            // The journal's range, even if some offsets in it no longer exist (compaction):
            // the token must be the one used before the crash.
            Some(p) => (p.first, p.last),
            None => (self.records.first()?.origin.offset, self.last_offset()?),
        };
        Some(SealedBatch {
            partition: pk.clone(),
            first,
            last,
            records: self.records,
            replay: self.replay.is_some(),
        })
    }
}
