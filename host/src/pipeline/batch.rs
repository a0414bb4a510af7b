//! Per-partition batch accumulation.

use std::time::Instant;

use crate::config::BatchConfig;
use crate::record::Origin;
use crate::stage::PartitionKey;

/// Row limit of a partition's first batch under [`Accumulator::ramp`].
pub const FIRST_BATCH_ROWS: usize = 1024;

/// A batch ready for the worker: one partition, a fixed offset range.
pub struct SealedBatch {
    pub partition: PartitionKey,
    pub first: i64,
    pub last: i64,
    /// The consumed messages, inline: a [`crate::record::Record`] (with its `Arc<Origin>`) is
    /// made of each only when the worker takes the batch, so a batch waiting for it costs
    /// ~140 bytes per record less (docs/benchmarks.md, ninth round).
    pub records: Vec<Origin>,
    /// The epoch of the partition's assignment when the batch was sealed (see
    /// [`crate::source::kafka::Ownership`]); set by the engine.
    pub epoch: Option<u64>,
    /// When its first record was taken, and when it was sealed (for the per-batch timing log).
    pub opened: Instant,
    pub sealed: Instant,
}

/// Records of one partition waiting to become a batch.
pub struct Accumulator {
    records: Vec<Origin>,
    bytes: usize,
    opened: Instant,
    /// At most this many rows, below the config's `max_rows` while ramping up.
    row_limit: usize,
}

impl Accumulator {
    /// An accumulator bounded by the config alone.
    #[cfg(test)]
    pub fn new() -> Self {
        Self::with_row_limit(usize::MAX)
    }

    /// The accumulator for a partition's `nth` batch since it was assigned (0 = the first).
    ///
    /// With a backlog, a full batch of `max_rows` (100,000 by default) takes ~1 s of
    /// processing before its insert, and nothing is visible until then. Ramping the limit
    /// from [`FIRST_BATCH_ROWS`], doubling per batch up to `max_rows`, makes the first rows
    /// visible after ~1,000 records' worth of work and costs only a few extra small batches.
    pub fn ramp(nth: u32) -> Self {
        Self::with_row_limit(FIRST_BATCH_ROWS.saturating_mul(1 << nth.min(24)))
    }

    fn with_row_limit(row_limit: usize) -> Self {
        Self {
            records: Vec::new(),
            bytes: 0,
            opened: Instant::now(),
            row_limit,
        }
    }

    pub fn push(&mut self, r: Origin) {
        if self.records.is_empty() {
            self.opened = Instant::now();
        }
        self.bytes += r.value.len() + r.key.as_ref().map_or(0, |k| k.len());
        self.records.push(r);
    }

    pub fn is_full(&self, cfg: &BatchConfig) -> bool {
        self.records.len() >= cfg.max_rows.min(self.row_limit) || self.bytes >= cfg.max_bytes
    }

    pub fn is_aged(&self, cfg: &BatchConfig) -> bool {
        !self.records.is_empty() && self.opened.elapsed() >= cfg.max_age()
    }

    /// When the batch reaches its age limit (`None`: empty).
    pub fn deadline(&self, cfg: &BatchConfig) -> Option<Instant> {
        (!self.records.is_empty()).then(|| self.opened + cfg.max_age())
    }

    pub fn seal(self, pk: &PartitionKey) -> Option<SealedBatch> {
        let first = self.records.first()?.offset;
        let last = self.records.last()?.offset;
        Some(SealedBatch {
            partition: pk.clone(),
            first,
            last,
            records: self.records,
            epoch: None,
            opened: self.opened,
            sealed: Instant::now(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(offset: i64) -> Origin {
        Origin {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            timestamp_ms: None,
            key: None,
            value: bytes::Bytes::from_static(b"{}"),
            headers: Vec::new(),
        }
    }

    fn rows_until_full(mut acc: Accumulator, cfg: &BatchConfig) -> usize {
        let mut n = 0;
        while !acc.is_full(cfg) {
            acc.push(record(n as i64));
            n += 1;
        }
        n
    }

    #[test]
    fn ramp_doubles_up_to_max_rows() {
        let cfg = BatchConfig {
            max_rows: 5000,
            ..BatchConfig::default()
        };
        let limits: Vec<usize> = (0..5)
            .map(|nth| rows_until_full(Accumulator::ramp(nth), &cfg))
            .collect();
        assert_eq!(limits, [1024, 2048, 4096, 5000, 5000]);
        assert_eq!(rows_until_full(Accumulator::ramp(u32::MAX), &cfg), 5000);
        assert_eq!(rows_until_full(Accumulator::new(), &cfg), 5000);
        let sealed = {
            let mut acc = Accumulator::new();
            acc.push(record(7));
            acc.push(record(9));
            acc.seal(&PartitionKey {
                topic: "t".into(),
                partition: 0,
            })
            .unwrap()
        };
        assert_eq!((sealed.first, sealed.last, sealed.records.len()), (7, 9, 2));
    }
}
