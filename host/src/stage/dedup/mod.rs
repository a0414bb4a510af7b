//! The dedup stage: keeps the first record per key within a time window and drops the rest.
//!
//! State in RocksDB, per stage and partition:
//! - `T` + time + key → where and when the key was first seen (event time, topic, partition,
//!   offset): one entry per key, in time order, swept oldest first as the watermark moves;
//! - `W` → the watermark: the largest event time seen on the partition;
//! - `C` → the sweep cursor: no entry is older than it.
//!
//! State written by earlier versions has a second entry per key, `K` + key → where and when,
//! with an empty `T` entry; such keys are read, looked up and swept as before, and new keys get
//! the one entry (half the writes per key).
//!
//! A key is live while its first sighting is at most `window` older than the watermark; an
//! expired key counts as absent (and is deleted when looked up), so the answer never depends on
//! when the sweep ran. A record at the exact position where its key was first seen is that first
//! occurrence again (a rewound partition), never its own duplicate. Records older than
//! `watermark - window` cannot be checked (their key may already be forgotten) and pass.
//!
//! Lookups do not read RocksDB: each partition's `K` entries are mirrored in memory as
//! fingerprint → (first-seen time, position tag) (see [`index`]), loaded from the state on the
//! partition's first batch after start and changed only when a batch's state commits. Only a
//! record whose position tag matches its key's first sighting (a likely replay) reads its entry.

pub mod config;
mod index;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::record::Record;
use crate::state::{StageState, StateError, StateTxn};

use super::keyed::{
    get_i64, or_dead_letter, put_i64, ts_bytes, ts_from_bytes, with_state, KeySpec, Sweeper,
    TimeSource,
};
use super::{BatchContext, Stage, StageError, StageOutput};
pub use config::DedupConfig;
use index::{Changes, Fingerprint, FingerprintMap, Hashes, PartitionIndex, Seen};

const WATERMARK: &[u8] = b"W";
const CURSOR: &[u8] = b"C";
const KEY: u8 = b'K';
const INDEX: u8 = b'T';

/// Where and when a key was first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FirstSeen<'a> {
    ts: i64,
    partition: i32,
    offset: i64,
    topic: &'a [u8],
}

impl<'a> FirstSeen<'a> {
    fn of(r: &'a Record, ts: i64) -> Self {
        Self {
            ts,
            partition: r.origin.partition,
            offset: r.origin.offset,
            topic: r.origin.topic.as_bytes(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + self.topic.len());
        v.extend_from_slice(&ts_bytes(self.ts));
        v.extend_from_slice(&self.partition.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(self.topic);
        v
    }

    fn decode(v: &'a [u8]) -> Option<Self> {
        if v.len() < 20 {
            return None;
        }
        Some(Self {
            ts: ts_from_bytes(&v[..8])?,
            partition: i32::from_be_bytes(v[8..12].try_into().ok()?),
            offset: i64::from_be_bytes(v[12..20].try_into().ok()?),
            topic: &v[20..],
        })
    }

    /// What the in-memory index keeps of it.
    fn tag(&self) -> Seen {
        Seen::new(
            self.ts,
            Hashes::position(self.topic, self.partition, self.offset),
        )
    }

    fn is_position_of(&self, r: &Record) -> bool {
        self.offset == r.origin.offset
            && self.partition == r.origin.partition
            && self.topic == r.origin.topic.as_bytes()
    }
}

/// `K` + key: the entry of a key in the layout of earlier versions (the key is `entry[1..]`).
fn key_entry(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(KEY);
    k.extend_from_slice(key);
    k
}

fn index_entry(ts: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(INDEX);
    k.extend_from_slice(&ts_bytes(ts));
    k.extend_from_slice(key);
    k
}

/// The in-memory indexes of one stage, per partition number (the state namespace).
type Indexes = HashMap<i32, PartitionIndex>;

pub struct DedupStage {
    name: String,
    spec: KeySpec,
    window_ms: i64,
    sweeper: Sweeper,
    hashes: Hashes,
    /// Shared with the commit hooks of this stage's batches, which alone change it.
    index: Arc<Mutex<Indexes>>,
    /// The keys first seen by the transaction in progress (its id; per partition number): a
    /// batch comes in several calls (slices) within one transaction, and a key first seen in
    /// an earlier slice is not in `index` until the transaction commits.
    uncommitted: (u64, HashMap<i32, FingerprintMap<Seen>>),
    /// Of the batch being processed: offsets below this were delivered before a rewind.
    redelivered_below: Option<i64>,
}

impl DedupStage {
    pub fn new(name: &str, cfg: &DedupConfig) -> Self {
        let time = match &cfg.time {
            Some(t) => TimeSource::Field(t.clone()),
            None => TimeSource::Kafka,
        };
        Self {
            name: name.to_string(),
            spec: KeySpec::new(&cfg.key, Some(time)),
            window_ms: cfg.window.as_millis_i64(),
            sweeper: Sweeper::default(),
            hashes: Hashes::random(),
            index: Arc::new(Mutex::new(HashMap::new())),
            uncommitted: (0, HashMap::new()),
            redelivered_below: None,
        }
    }

    /// The committed keys of `partition`, read from the state the first time it is used.
    fn partition_index<'i>(
        &self,
        indexes: &'i mut Indexes,
        partition: i32,
        st: &StageState<'_, '_>,
    ) -> Result<&'i PartitionIndex, StateError> {
        if let Entry::Vacant(slot) = indexes.entry(partition) {
            let started = Instant::now();
            let mut index = PartitionIndex::default();
            // Keys of earlier versions' layout, then the time index entries that carry their
            // key's first sighting (empty ones belong to a `K` entry).
            st.for_each_committed(&[KEY], |k, v| {
                let seen = FirstSeen::decode(v).ok_or_else(|| self.corrupt())?;
                index.insert(self.hashes.key(&k[1..]), seen.tag());
                Ok(())
            })?;
            st.for_each_committed(&[INDEX], |k, v| {
                if !v.is_empty() {
                    let seen = FirstSeen::decode(v).ok_or_else(|| self.corrupt())?;
                    let key = k.get(9..).ok_or_else(|| self.corrupt())?;
                    index.insert(self.hashes.key(key), seen.tag());
                }
                Ok(())
            })?;
            tracing::info!(
                stage = %self.name,
                partition,
                keys = index.len(),
                seconds = started.elapsed().as_secs_f64(),
                "dedup index loaded from state"
            );
            slot.insert(index);
        }
        indexes
            .get(&partition)
            .ok_or_else(|| StateError::Io("dedup index vanished".into()))
    }

    fn corrupt(&self) -> StateError {
        StateError::Corrupt {
            key: format!("{} dedup entry", self.name),
            message: "truncated".into(),
        }
    }

    fn run(
        &mut self,
        batch: Vec<Record>,
        partition: i32,
        st: &mut StageState<'_, '_>,
    ) -> Result<StageOutput, StateError> {
        let mut out = StageOutput::default();
        let (mut duplicates, mut unchecked, mut expired) = (0u64, 0u64, 0u64);
        let old_wm = get_i64(st, WATERMARK)?;
        let old_cursor = get_i64(st, CURSOR)?;
        let (mut wm, mut cursor) = (old_wm, old_cursor);
        let budget = (batch.len() * 2).max(4_096);

        let shared = self.index.clone();
        let mut indexes = shared
            .lock()
            .map_err(|_| StateError::Io("dedup index poisoned by an earlier panic".into()))?;
        let index = self.partition_index(&mut indexes, partition, st)?;
        // The inserts of this call (applied to the index when the batch commits), and of the
        // transaction's earlier calls (stale ones, of a transaction dropped or committed, are
        // discarded).
        // Sized for the call up front: growing it from empty rehashes it a dozen times.
        let mut fresh: FingerprintMap<Seen> =
            FingerprintMap::with_capacity_and_hasher(batch.len(), Default::default());
        if self.uncommitted.0 != st.txn_id() {
            self.uncommitted = (st.txn_id(), HashMap::new());
        }
        let mut earlier = self.uncommitted.1.remove(&partition).unwrap_or_default();

        // Keys and fingerprints first, then all index probes in one tight loop: independent
        // probes overlap their cache misses (a large index is far bigger than the CPU caches).
        let keyed: Vec<Option<(Vec<u8>, i64, Fingerprint)>> = batch
            .iter()
            .map(|r| {
                let read = self.spec.read(r).map(|(key, ts)| {
                    let fp = self.hashes.key(&key);
                    (key, ts, fp)
                });
                or_dead_letter(read, &mut out, &self.name, r)
            })
            .collect();
        let probes: Vec<Option<Seen>> = keyed
            .iter()
            .map(|k| k.as_ref().and_then(|(_, _, fp)| index.get(fp)))
            .collect();

        for ((r, keyed), probe) in batch.into_iter().zip(keyed).zip(probes) {
            let Some((key, ts, fp)) = keyed else {
                continue;
            };
            let w = wm.map_or(ts, |w| w.max(ts));
            wm = Some(w);
            let oldest_live = w.saturating_sub(self.window_ms);
            if ts < oldest_live {
                // Its key may be forgotten already: no answer is reliable, and dropping data on
                // a guess is worse than a rare duplicate.
                unchecked += 1;
                out.records.push(r);
                continue;
            }
            let mut known = fresh
                .get(&fp)
                .or_else(|| earlier.get(&fp))
                .copied()
                .or(probe);
            if let Some(seen) =
                known.filter(|seen| seen.ts() >= oldest_live && seen.at() == tag_of(&r))
            {
                // Perhaps this very record read again (a rewound partition): the stored
                // position decides. Absent means the fingerprint was another key's. An empty
                // time-index entry is one of the earlier layout: the position is in `K`.
                let stored = match st.get(&index_entry(seen.ts(), &key))? {
                    Some(v) if v.is_empty() => st.get(&key_entry(&key))?,
                    found => found,
                };
                match stored {
                    Some(v) => {
                        let seen = FirstSeen::decode(&v).ok_or_else(|| self.corrupt())?;
                        // Its own first occurrence: delivered already if the partition was
                        // rewound past it (a re-delivery), else not yet (pass it on).
                        let delivered = self.redelivered_below.is_some_and(|h| r.origin.offset < h);
                        if seen.is_position_of(&r) && !delivered {
                            out.records.push(r);
                        } else {
                            duplicates += 1;
                        }
                        continue;
                    }
                    None => known = None,
                }
            }
            if let Some(seen) = known {
                if seen.ts() >= oldest_live {
                    duplicates += 1;
                    continue;
                }
                // Expired but not swept yet: replaced (with its `K` entry, if it has one).
                st.delete(&index_entry(seen.ts(), &key));
                st.delete(&key_entry(&key));
                expired += 1;
            }
            let first = FirstSeen::of(&r, ts);
            st.put_owned(index_entry(ts, &key), first.encode());
            fresh.insert(fp, first.tag());
            cursor = Some(cursor.map_or(ts, |c| c.min(ts)));
            out.records.push(r);
        }

        earlier.reserve(fresh.len());
        earlier.extend(fresh.iter().map(|(fp, seen)| (*fp, *seen)));
        self.uncommitted.1.insert(partition, earlier);
        let mut changes = Changes {
            inserted: fresh.into_iter().collect(),
            removed: Vec::new(),
        };
        if let (Some(w), Some(c)) = (wm, cursor) {
            let cutoff = w.saturating_sub(self.window_ms);
            if c < cutoff {
                let (entries, next) = self.sweeper.expired(st, INDEX, c, cutoff, budget)?;
                for e in entries {
                    st.delete(&index_entry(e.ts, &e.rest));
                    if e.value.is_empty() {
                        st.delete(&key_entry(&e.rest));
                    }
                    changes.removed.push(self.hashes.key(&e.rest));
                    expired += 1;
                }
                cursor = Some(next);
            }
        }
        drop(indexes);
        if !changes.is_empty() {
            st.on_commit(move || {
                // A poisoned lock fails the next batch, and the run restarts with a fresh index.
                if let Ok(mut indexes) = shared.lock() {
                    if let Some(index) = indexes.get_mut(&partition) {
                        changes.apply(index);
                    }
                }
            });
        }
        if wm != old_wm {
            if let Some(w) = wm {
                put_i64(st, WATERMARK, w);
            }
        }
        if cursor != old_cursor {
            if let Some(c) = cursor {
                put_i64(st, CURSOR, c);
            }
        }
        out.counters.push(("duplicates", duplicates));
        out.counters.push(("dedup_expired", expired));
        out.counters.push(("dedup_unchecked_late", unchecked));
        Ok(out)
    }
}

/// The position tag of a record (see [`Hashes::position`]).
fn tag_of(r: &Record) -> u32 {
    Hashes::position(
        r.origin.topic.as_bytes(),
        r.origin.partition,
        r.origin.offset,
    )
}

impl Stage for DedupStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn state_replaced(&mut self, partition: i32) {
        // Rebuilt from the restored state on the partition's next batch.
        if let Ok(mut indexes) = self.index.lock() {
            indexes.remove(&partition);
        }
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        let partition = ctx.partition.partition;
        self.redelivered_below = state
            .redelivered_below(&ctx.partition)
            .map_err(|e| StageError::new(&self.name, e.to_string()))?;
        with_state(state, &self.name.clone(), ctx, |st| {
            self.run(batch, partition, st)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::record::Origin;
    use crate::stage::PartitionKey;
    use crate::state::{Outbox, StateStore};

    pub(crate) fn record(
        topic: &str,
        partition: i32,
        offset: i64,
        value: serde_json::Value,
    ) -> Record {
        record_ts(topic, partition, offset, value, Some(0))
    }

    pub(crate) fn record_ts(
        topic: &str,
        partition: i32,
        offset: i64,
        value: serde_json::Value,
        timestamp_ms: Option<i64>,
    ) -> Record {
        let v = if value.is_null() {
            Bytes::new()
        } else {
            Bytes::from(serde_json::to_vec(&value).unwrap())
        };
        Record::from_origin(Arc::new(Origin {
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp_ms,
            key: None,
            value: v,
            headers: vec![],
        }))
    }

    pub(crate) fn ctx(topic: &str, partition: i32) -> BatchContext {
        BatchContext {
            pipeline: "p".into(),
            partition: PartitionKey {
                topic: topic.into(),
                partition,
            },
            first_offset: 0,
            last_offset: 0,
        }
    }

    /// Runs one batch and commits its state the way the engine does.
    pub(crate) fn run_batch(
        store: &StateStore,
        stage: &mut dyn Stage,
        side: bool,
        batch: Vec<Record>,
    ) -> StageOutput {
        run_batch_inspecting(store, stage, side, batch, |_| {})
    }

    /// [`run_batch`], handing the batch's transaction to `inspect` before it is written.
    pub(crate) fn run_batch_inspecting(
        store: &StateStore,
        stage: &mut dyn Stage,
        side: bool,
        batch: Vec<Record>,
        inspect: impl FnOnce(&StateTxn<'_>),
    ) -> StageOutput {
        let (topic, partition) = batch
            .first()
            .map(|r| (r.origin.topic.to_string(), r.origin.partition))
            .unwrap_or(("t".into(), 0));
        let c = ctx(&topic, partition);
        let mut txn = store.txn();
        let out = if side {
            stage.process_side(batch, &c, &mut txn).unwrap()
        } else {
            stage.process(batch, &c, &mut txn).unwrap()
        };
        inspect(&txn);
        store
            .begin_batch(&c.partition, 0, 0, txn, &Outbox::default())
            .unwrap();
        store.complete_batch(&c.partition, 0).unwrap();
        out
    }

    pub(crate) fn counter(out: &StageOutput, name: &str) -> u64 {
        out.counters
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .sum()
    }

    fn ids(out: &StageOutput) -> Vec<String> {
        out.records
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
                v["id"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    fn stage(yaml: &str) -> DedupStage {
        let cfg: DedupConfig = serde_yaml_ng::from_str(yaml).unwrap();
        cfg.check().unwrap();
        DedupStage::new("dedup", &cfg)
    }

    const BASE: i64 = 1_795_428_000_000;

    fn ev(id: &str, ts: i64) -> serde_json::Value {
        json!({"id": id, "ts": ts})
    }

    #[test]
    fn keeps_first_occurrence_within_a_batch_and_across_batches_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        {
            let store = StateStore::open(dir.path()).unwrap();
            let out = run_batch(
                &store,
                &mut s,
                false,
                vec![
                    record("t", 0, 0, ev("a", BASE)),
                    record("t", 0, 1, ev("b", BASE + 1)),
                    record("t", 0, 2, ev("a", BASE + 2)),
                ],
            );
            assert_eq!(ids(&out), ["a", "b"]);
            assert_eq!(counter(&out, "duplicates"), 1);
            assert!(out.dead_letters.is_empty());
        }
        let store = StateStore::open(dir.path()).unwrap();
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 3, ev("b", BASE + 10)),
                record("t", 0, 4, ev("c", BASE + 11)),
            ],
        );
        assert_eq!(ids(&out), ["c"]);
        assert_eq!(counter(&out, "duplicates"), 1);
    }

    #[test]
    fn a_record_at_its_first_position_is_never_its_own_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        let batch = || {
            vec![
                record("t", 0, 0, ev("a", BASE)),
                record("t", 0, 1, ev("a", BASE)),
            ]
        };
        assert_eq!(ids(&run_batch(&store, &mut s, false, batch())), ["a"]);
        // The partition is rewound and read again: offset 0 is still the first occurrence.
        let out = run_batch(&store, &mut s, false, batch());
        assert_eq!(ids(&out), ["a"]);
        assert_eq!(counter(&out, "duplicates"), 1);
        // The same key from another partition's offset 0 is a duplicate.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![record("u", 0, 0, ev("a", BASE))],
        );
        assert!(out.records.is_empty());
    }

    #[test]
    fn partitions_have_separate_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 0, 0, ev("a", BASE))],
        );
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 1, 0, ev("a", BASE))],
        );
        assert_eq!(ids(&out), ["a"]);
    }

    #[test]
    fn keys_expire_by_event_time_and_out_of_order_records_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 10s\ntime: {field: /ts}\n");
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 0, ev("a", BASE)),
                // Out of order but inside the window: checked, and a duplicate.
                record("t", 0, 1, ev("b", BASE + 8_000)),
                record("t", 0, 2, ev("a", BASE + 3_000)),
                record("t", 0, 3, ev("c", BASE - 1_000)),
                record("t", 0, 4, ev("c", BASE + 7_000)),
            ],
        );
        assert_eq!(ids(&out), ["a", "b", "c"]);
        // 10 s after its first sighting `a` is still remembered ...
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 0, 5, ev("a", BASE + 10_000))],
        );
        assert!(out.records.is_empty());
        // ... and forgotten once the watermark is more than 10 s past it.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 6, ev("d", BASE + 10_001)),
                record("t", 0, 7, ev("a", BASE + 10_001)),
            ],
        );
        assert_eq!(ids(&out), ["d", "a"]);
        assert!(counter(&out, "dedup_expired") >= 1);
        // A record older than the window cannot be checked: it passes.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 0, 8, ev("z", BASE - 60_000))],
        );
        assert_eq!(ids(&out), ["z"]);
        assert_eq!(counter(&out, "dedup_unchecked_late"), 1);
    }

    #[test]
    fn the_sweep_bounds_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1s\ntime: {field: /ts}\n");
        for b in 0..20i64 {
            let batch = (0..500)
                .map(|i| {
                    let n = b * 500 + i;
                    record("t", 0, n, ev(&format!("k{n}"), BASE + n * 10))
                })
                .collect();
            run_batch(&store, &mut s, false, batch);
        }
        // The last event is at BASE + 99 990 ms: only keys of the last second (100 of them)
        // may remain, plus whatever the sweep of the last batch had not reached yet.
        let mut txn = store.txn();
        let st = txn.stage("dedup", 0);
        // One entry per key, in the time index.
        assert!(st.scan_prefix(b"K").unwrap().is_empty());
        let keys = st.scan_prefix(b"T").unwrap().len();
        assert!(keys <= 101, "{keys} keys left");
        assert!(keys >= 100, "{keys} keys left");
        // The sweep removed the expired keys from memory too.
        assert_eq!(index_len(&s, 0), keys);
    }

    #[test]
    fn state_of_the_two_entry_layout_is_read_looked_up_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        let first = record("t", 0, 0, ev("a", BASE));
        run_batch(&store, &mut s, false, vec![first.clone()]);
        // Rewrite the state as earlier versions wrote it: `K` + key → first sighting, and an
        // empty time index entry.
        {
            let mut txn = store.txn();
            let mut st = txn.stage("dedup", 0);
            let entries = st.scan_prefix(b"T").unwrap();
            assert_eq!(entries.len(), 1);
            for (k, v) in entries {
                st.put(&key_entry(&k[9..]), &v);
                st.put(&k, &[]);
            }
            let c = ctx("t", 0);
            store
                .begin_batch(&c.partition, 0, 0, txn, &crate::state::Outbox::default())
                .unwrap();
            store.complete_batch(&c.partition, 0).unwrap();
        }
        // A new stage loads its index from that state: "a" is a duplicate elsewhere, and its
        // own first record read again passes (the position is read from the `K` entry).
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 5, ev("a", BASE)),
                record("t", 0, 6, ev("b", BASE)),
            ],
        );
        assert_eq!(ids(&out), ["b"]);
        assert_eq!(ids(&run_batch(&store, &mut s, false, vec![first])), ["a"]);
        // Two hours on, the sweep removes both entries of "a" and the one of "b".
        run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 0, 7, ev("c", BASE + 2 * 3_600_000))],
        );
        let mut txn = store.txn();
        let st = txn.stage("dedup", 0);
        assert!(st.scan_prefix(b"K").unwrap().is_empty());
        assert_eq!(st.scan_prefix(b"T").unwrap().len(), 1);
        assert_eq!(index_len(&s, 0), 1);
    }

    fn index_len(s: &DedupStage, partition: i32) -> usize {
        s.index
            .lock()
            .unwrap()
            .get(&partition)
            .map_or(0, PartitionIndex::len)
    }

    #[test]
    fn the_index_holds_only_committed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        run_batch(
            &store,
            &mut s,
            false,
            vec![record("t", 0, 0, ev("a", BASE))],
        );
        // A batch whose state is never written (a later stage failed, or a crash): its keys
        // must not count as seen.
        {
            let mut txn = store.txn();
            let out = s
                .process(
                    vec![
                        record("t", 0, 1, ev("b", BASE)),
                        record("t", 0, 2, ev("a", BASE)),
                    ],
                    &ctx("t", 0),
                    &mut txn,
                )
                .unwrap();
            assert_eq!(ids(&out), ["b"]);
        }
        assert_eq!(index_len(&s, 0), 1);
        // Read again from other offsets: had the index kept `b`, it would now be dropped.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 3, ev("b", BASE)),
                record("t", 0, 4, ev("a", BASE)),
            ],
        );
        assert_eq!(ids(&out), ["b"]);
        assert_eq!(index_len(&s, 0), 2);
    }

    #[test]
    fn a_batch_in_several_calls_sees_the_keys_of_its_earlier_calls() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 1h\ntime: {field: /ts}\n");
        let c = ctx("t", 0);
        // The engine runs a large batch through the stages in slices, in one transaction.
        let mut txn = store.txn();
        let first = s
            .process(vec![record("t", 0, 0, ev("a", BASE))], &c, &mut txn)
            .unwrap();
        let second = s
            .process(
                vec![
                    record("t", 0, 1, ev("a", BASE + 1)),
                    record("t", 0, 2, ev("b", BASE + 2)),
                ],
                &c,
                &mut txn,
            )
            .unwrap();
        assert_eq!(ids(&first), ["a"]);
        assert_eq!(ids(&second), ["b"]);
        assert_eq!(counter(&second, "duplicates"), 1);
        // Another partition's calls in the same transaction do not see them.
        let other = s
            .process(
                vec![record("t", 1, 0, ev("a", BASE))],
                &ctx("t", 1),
                &mut txn,
            )
            .unwrap();
        assert_eq!(ids(&other), ["a"]);
        drop(txn);
        // Nor does the next transaction, the earlier one having been dropped.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 3, ev("b", BASE + 3)),
                record("t", 0, 4, ev("a", BASE + 4)),
            ],
        );
        assert_eq!(ids(&out), ["b", "a"]);
    }

    #[test]
    fn a_fresh_stage_loads_the_index_and_decides_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let yaml = "key: [/id, /src]\nwindow: 1h\ntime: {field: /ts}\n";
        let r = |o, id: &str| record("t", 2, o, json!({"id": id, "src": "x", "ts": BASE}));
        let batch = || vec![r(0, "a"), r(1, "b"), r(2, "a"), r(3, "c")];
        let mut first = stage(yaml);
        assert_eq!(
            ids(&run_batch(&store, &mut first, false, batch())),
            ["a", "b", "c"]
        );
        // A restart: another instance (another fingerprint seed) and the same records again,
        // as a rewound partition delivers them: the first occurrences pass again.
        let mut again = stage(yaml);
        let out = run_batch(&store, &mut again, false, batch());
        assert_eq!(ids(&out), ["a", "b", "c"]);
        assert_eq!(counter(&out, "duplicates"), 1);
        assert_eq!(index_len(&again, 2), 3);
        let out = run_batch(&store, &mut again, false, vec![r(4, "b"), r(5, "d")]);
        assert_eq!(ids(&out), ["d"]);
    }

    #[test]
    fn composite_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: [/id, /src]\nwindow: 1h\ntime: {field: /ts}\n");
        let r =
            |o, id: &str, src: &str| record("t", 0, o, json!({"id": id, "src": src, "ts": BASE}));
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                r(0, "a", "x"),
                r(1, "a", "y"),
                r(2, "a", "x"),
                r(3, "ax", ""),
                r(4, "a", "x"),
            ],
        );
        assert_eq!(ids(&out), ["a", "a", "ax"]);
        assert_eq!(counter(&out, "duplicates"), 2);
    }

    #[test]
    fn bad_records_are_dead_lettered_with_the_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: [/id, /src]\nwindow: 1h\ntime: {field: /ts, format: rfc3339}\n");
        let mut broken = record("t", 0, 3, json!(null));
        broken.value = Bytes::from_static(b"{not json");
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                record("t", 0, 0, json!({"id": "a", "ts": "2026-11-23T10:00:00Z"})),
                record("t", 0, 1, json!({"id": "a", "src": "x", "ts": 5})),
                record(
                    "t",
                    0,
                    2,
                    json!({"id": "a", "src": "x", "ts": "2026-11-23T10:00:00Z"}),
                ),
                broken,
            ],
        );
        assert_eq!(out.records.len(), 1);
        let dl: Vec<(&str, &str, i64)> = out
            .dead_letters
            .iter()
            .map(|d| (d.kind.as_str(), d.message.as_str(), d.origin.offset))
            .collect();
        assert_eq!(dl.len(), 3);
        assert_eq!(dl[0], ("schema", "key field /src is missing", 0));
        assert_eq!(dl[1].0, "schema");
        assert!(dl[1].1.starts_with("time field /ts"), "{}", dl[1].1);
        assert_eq!(dl[2].0, "parse");
        assert!(out
            .dead_letters
            .iter()
            .all(|d| d.stage == "dedup" && d.plugin.is_none()));
        assert_eq!(counter(&out, "duplicates"), 0);
    }

    #[test]
    fn processing_time_is_the_kafka_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /id\nwindow: 10s\n");
        let r = |o, ts| record_ts("t", 0, o, json!({"id": "a"}), ts);
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![r(0, Some(BASE)), r(1, Some(BASE + 5_000))],
        );
        assert_eq!(out.records.len(), 1);
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![r(2, Some(BASE + 20_000)), r(3, None)],
        );
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.dead_letters.len(), 1);
        assert!(out.dead_letters[0].message.contains("no timestamp"));
    }
}
