//! The stateful stages without Kafka or ClickHouse: the real dedup and join stages on a real
//! `StateStore` (RocksDB), each batch committed the way the engine commits it (state changes,
//! journal entry and outbox in one synced write, then the journal entry closed). Used by
//! `state-bench` (every phase) and by `sluice-bench`'s `dedup` phase (10 M keys, in a process
//! of its own so that its peak RSS is the dedup state's alone).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use sluice::record::{Origin, Record};
use sluice::stage::dedup::{DedupConfig, DedupStage};
use sluice::stage::{BatchContext, PartitionKey, Stage, StageOutput};
use sluice::state::{Outbox, StateStore};

use super::procfs;
use crate::workload::Rng;

/// Event time of the generated records (2026-11-23T10:00:00Z).
pub const BASE_TS: i64 = 1_795_428_000_000;

/// A record of partition 0 of `topic`, as the source builds it.
pub fn record(topic: &Arc<str>, offset: i64, value: Vec<u8>, key: Option<Bytes>) -> Record {
    Record::from_origin(Arc::new(Origin {
        topic: topic.clone(),
        partition: 0,
        offset,
        timestamp_ms: Some(BASE_TS),
        key,
        value: Bytes::from(value),
        headers: Vec::new(),
    }))
}

/// Bytes of all files under `dir` (0 if it cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// One phase's numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    pub phase: String,
    pub records: u64,
    /// Stages and commits only (record generation excluded).
    pub busy_s: f64,
    /// Of which in the stage (the commits' synced writes excluded).
    pub in_stage_s: f64,
    pub emitted: u64,
    pub dead: u64,
    pub counters: BTreeMap<String, u64>,
    /// The process's peak and current resident set after the phase.
    pub peak_rss_mib: u64,
    pub rss_mib: u64,
    pub state_on_disk_mib: u64,
}

impl PhaseResult {
    /// Records per second, batch commits included.
    pub fn per_s(&self) -> f64 {
        self.records as f64 / self.busy_s.max(1e-9)
    }

    /// Records per second in the stage alone.
    pub fn in_stage_per_s(&self) -> f64 {
        self.records as f64 / self.in_stage_s.max(1e-9)
    }

    /// The line `state-bench` prints.
    pub fn line(&self) -> String {
        format!(
            "{:<14} {:>11} records in {:>7.2} s = {:>10.0} records/s (in the stage: {:>10.0}/s) | emitted {} dead {} {:?} | VmHWM {} MiB, VmRSS {} MiB, state on disk {} MiB",
            self.phase,
            self.records,
            self.busy_s,
            self.per_s(),
            self.in_stage_per_s(),
            self.emitted,
            self.dead,
            self.counters,
            self.peak_rss_mib,
            self.rss_mib,
            self.state_on_disk_mib,
        )
    }
}

/// Feeds batches through a stage, committing each as the engine does, and times it.
pub struct Runner<'a> {
    store: &'a StateStore,
    busy: Duration,
    in_stage: Duration,
    counters: BTreeMap<String, u64>,
    emitted: u64,
    dead: u64,
}

impl<'a> Runner<'a> {
    pub fn new(store: &'a StateStore) -> Self {
        Self {
            store,
            busy: Duration::ZERO,
            in_stage: Duration::ZERO,
            counters: BTreeMap::new(),
            emitted: 0,
            dead: 0,
        }
    }

    /// One batch of `topic` (partition 0) through `stage` (`side`: as a side topic's batch)
    /// and its commit.
    pub fn run(
        &mut self,
        stage: &mut dyn Stage,
        side: bool,
        topic: &str,
        batch: Vec<Record>,
    ) -> Result<()> {
        let (first, last) = (
            batch.first().map_or(0, |r| r.origin.offset),
            batch.last().map_or(0, |r| r.origin.offset),
        );
        let ctx = BatchContext {
            pipeline: "bench".into(),
            partition: PartitionKey {
                topic: topic.into(),
                partition: 0,
            },
            first_offset: first,
            last_offset: last,
        };
        let t = Instant::now();
        let mut txn = self.store.txn();
        let out: StageOutput = if side {
            stage.process_side(batch, &ctx, &mut txn)?
        } else {
            stage.process(batch, &ctx, &mut txn)?
        };
        self.in_stage += t.elapsed();
        self.store
            .begin_batch(&ctx.partition, first, last, txn, &Outbox::default())?;
        self.store.complete_batch(&ctx.partition, last)?;
        self.busy += t.elapsed();
        self.emitted += out.records.len() as u64;
        self.dead += out.dead_letters.len() as u64;
        for (k, v) in out.counters {
            *self.counters.entry(k.to_string()).or_default() += v;
        }
        Ok(())
    }

    /// The numbers so far, as phase `phase` of `records` records; `dir` holds the state.
    pub fn result(&self, phase: &str, records: u64, dir: &Path) -> PhaseResult {
        let usage = procfs::usage(std::process::id()).unwrap_or_default();
        PhaseResult {
            phase: phase.to_string(),
            records,
            busy_s: self.busy.as_secs_f64(),
            in_stage_s: self.in_stage.as_secs_f64(),
            emitted: self.emitted,
            dead: self.dead,
            counters: self.counters.clone(),
            peak_rss_mib: usage.peak_rss_kb / 1024,
            rss_mib: usage.rss_kb / 1024,
            state_on_disk_mib: dir_size(dir) / (1024 * 1024),
        }
    }
}

/// The dedup state benchmark's three phases (see [`dedup`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DedupState {
    pub keys: u64,
    pub batch: usize,
    pub insert: PhaseResult,
    pub reload: PhaseResult,
    pub hit: PhaseResult,
}

/// The dedup stage (key `/id`, a 30-day window so that every key stays live) on `store`:
/// - `dedup-insert`: `keys` distinct keys, each a lookup that misses plus an insert;
/// - `dedup-reload`: a fresh stage (a restart) and its first batch of lookups, which loads
///   the stage's in-memory key index from the state;
/// - `dedup-hit`: the rest of `hits` records repeating random earlier keys, lookups that hit
///   (all dropped).
///
/// `progress` gets the insert phase's numbers every million keys.
pub fn dedup(
    store: &StateStore,
    dir: &Path,
    keys: u64,
    hits: u64,
    batch: usize,
    mut progress: impl FnMut(&PhaseResult),
) -> Result<DedupState> {
    let cfg: DedupConfig = serde_json::from_value(
        serde_json::json!({"key": "/id", "window": "30d", "time": {"field": "/ts"}}),
    )?;
    let batch = batch.max(1);
    let mut stage = DedupStage::new("dedup", &cfg);
    let topic: Arc<str> = Arc::from("tx");
    let event = |k: u64, ts: i64| {
        format!(
            r#"{{"id":"tx-{k:010}","user_id":{},"amount":"12.34","currency":"EUR","ts":{ts}}}"#,
            k % 100_000,
        )
        .into_bytes()
    };
    let mut r = Runner::new(store);
    let mut offset = 0i64;
    let mut i = 0u64;
    while i < keys {
        let n = (batch as u64).min(keys - i);
        let records = (i..i + n)
            .map(|k| {
                offset += 1;
                record(&topic, offset, event(k, BASE_TS + (k / 1000) as i64), None)
            })
            .collect();
        r.run(&mut stage, false, "tx", records)?;
        i += n;
        if i.is_multiple_of(1_000_000) && i < keys {
            progress(&r.result("dedup-insert", i, dir));
        }
    }
    let insert = r.result("dedup-insert", keys, dir);

    // A restart: a fresh stage loads its in-memory index from the state on its first batch.
    drop(stage);
    let mut stage = DedupStage::new("dedup", &cfg);
    let mut rng = Rng::new(7);
    let hit_ts = BASE_TS + (keys / 1000) as i64;
    let mut hit_batch = |n: u64, offset: &mut i64| -> Vec<Record> {
        (0..n)
            .map(|_| {
                *offset += 1;
                record(
                    &topic,
                    *offset,
                    event(rng.next_u64() % keys.max(1), hit_ts),
                    None,
                )
            })
            .collect()
    };
    let mut r = Runner::new(store);
    let first = (batch as u64).min(hits);
    let records = hit_batch(first, &mut offset);
    r.run(&mut stage, false, "tx", records)?;
    let reload = r.result("dedup-reload", first, dir);

    let mut r = Runner::new(store);
    let mut done = first;
    while done < hits {
        let n = (batch as u64).min(hits - done);
        let records = hit_batch(n, &mut offset);
        r.run(&mut stage, false, "tx", records)?;
        done += n;
    }
    let hit = r.result("dedup-hit", hits - first, dir);
    Ok(DedupState {
        keys,
        batch,
        insert,
        reload,
        hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phases do what their names say: every inserted key is new, every later lookup
    /// finds an existing key (dropped as a duplicate), including the restart's first batch.
    #[test]
    fn dedup_phases_insert_new_keys_then_hit_existing_ones() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(&dir.path().join("state"))?;
        let d = dedup(&store, dir.path(), 25_000, 6_000, 2_000, |_| {})?;
        assert_eq!((d.insert.records, d.insert.emitted), (25_000, 25_000));
        assert_eq!(d.insert.counters.get("duplicates"), Some(&0));
        assert_eq!((d.reload.records, d.reload.emitted), (2_000, 0));
        assert_eq!((d.hit.records, d.hit.emitted), (4_000, 0));
        assert_eq!(d.hit.counters.get("duplicates"), Some(&4_000));
        assert!(d.hit.peak_rss_mib > 0 && d.hit.state_on_disk_mib < 1024);
        Ok(())
    }
}
