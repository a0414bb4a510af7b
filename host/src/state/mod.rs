//! Durable pipeline state in RocksDB, one database per pipeline.
//!
//! Three column families:
//! - `journal`: per source partition, the offset after the last completed batch and the batch
//!   in flight, if any;
//! - `outbox`: the encoded output (rows per table, dead letters) of the batch in flight, or,
//!   for outboxes of 1 MiB and more, a reference to the file holding it (`outbox/` next to
//!   the database, see [`outbox_files`]);
//! - `stage`: stage state (dedup keys, join buffers), namespaced per stage and partition.
//!
//! A batch's stage-state changes, its journal entry and its outbox are written in **one**
//! synced RocksDB write before anything leaves the process. After a crash the outbox is re-sent
//! as it was (same rows, same deduplication tokens) instead of being recomputed, so stateful
//! stages never see a batch twice and state always matches what reached ClickHouse.

pub mod changelog;
mod codec;
mod outbox_files;
mod txn;

use std::path::{Path, PathBuf};

use outbox_files::OutboxFiles;

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DataBlockIndexType,
    Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::stage::PartitionKey;
pub use codec::Outbox;
pub use txn::{StageState, StateTxn};

/// Key-value pairs read from the state, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

const CF_JOURNAL: &str = "journal";
const CF_OUTBOX: &str = "outbox";
/// Write buffer of the outbox column family (see `open_with`).
const OUTBOX_WRITE_BUFFER_MB: usize = 8;
const CF_STAGE: &str = "stage";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("state store: {0}")]
    Io(String),
    #[error("state store: corrupt entry for {key}: {message}")]
    Corrupt { key: String, message: String },
}

impl From<rocksdb::Error> for StateError {
    fn from(e: rocksdb::Error) -> Self {
        StateError::Io(e.to_string())
    }
}

/// A batch whose boundaries are fixed: it may or may not have reached ClickHouse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    pub first: i64,
    pub last: i64,
    /// The plugins (`stage=name@version`) that made its rows, for the record: the rows
    /// themselves are in the outbox, so a re-send never depends on these being loadable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// Its dead letters went out in its state-changelog transaction: a re-send must not
    /// produce them again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead_letters_sent: bool,
}

/// What the journal knows about one source partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionJournal {
    /// Offset after the last batch that was inserted and committed.
    pub next_offset: Option<i64>,
    /// The batch in flight when the process stopped, if any.
    pub pending: Option<PendingBatch>,
    /// Set by a rewind: offsets below it were delivered to ClickHouse before, so a record
    /// met again below it is a re-delivery (stages such as dedup drop it rather than treat it
    /// as a first occurrence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered_below: Option<i64>,
    /// How many pieces the last outbox published to the state changelog had (see
    /// [`changelog`]); the next batch deletes the pieces it does not overwrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_chunks: Option<u32>,
}

pub(crate) fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(v).map_err(|e| StateError::Corrupt {
        key: std::any::type_name::<T>().to_string(),
        message: e.to_string(),
    })
}

/// Memory knobs of the state store (RocksDB block cache and write buffers, and which
/// outboxes bypass them).
#[derive(Debug, Clone, Copy)]
pub struct StateMemory {
    pub block_cache_mb: usize,
    pub write_buffer_mb: usize,
    /// Outboxes at least this big go to a file (see [`outbox_files`]).
    pub outbox_file_min_bytes: usize,
}

impl Default for StateMemory {
    fn default() -> Self {
        Self {
            block_cache_mb: 64,
            write_buffer_mb: 32,
            // Smaller ones cost less inline than a file's two syncs.
            outbox_file_min_bytes: 1 << 20,
        }
    }
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
    outbox_files: OutboxFiles,
    outbox_file_min_bytes: usize,
}

/// Column family `name` of `db` (all are created at open; missing means a damaged store).
fn cf_of<'d>(db: &'d DB, name: &str) -> Result<&'d rocksdb::ColumnFamily, StateError> {
    db.cf_handle(name)
        .ok_or_else(|| StateError::Io(format!("column family {name} missing")))
}

impl StateStore {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_with(dir, StateMemory::default())
    }

    pub fn open_with(dir: &Path, mem: StateMemory) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::Open {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_open_files(512);
        // The journal column family flushes rarely; without a cap its memtable would pin every
        // write-ahead log (which holds all stage writes) until it fills.
        opts.set_max_total_wal_size(256 * 1024 * 1024);
        // One block cache for all column families bounds read memory regardless of state size.
        let cache = Cache::new_lru_cache(mem.block_cache_mb * 1024 * 1024);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        // Partitioned filters and indexes: a whole-file filter of a large state file (MBs) is
        // bigger than one cache shard, so it would be re-read from disk on every lookup; 4 KiB
        // partitions cache like data blocks, and only the small top level stays pinned.
        table.set_partition_filters(true);
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
        table.set_cache_index_and_filter_blocks_with_high_priority(true);
        // Point lookups (dedup keys, table rows) find their entry in a block by hash.
        table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
        table.set_data_block_hash_ratio(0.75);
        let cf_opts = |write_buffer_mb: usize| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(write_buffer_mb * 1024 * 1024);
            o.set_max_write_buffer_number(2);
            // A bloom filter over the memtable: lookups of absent keys skip its skiplist.
            o.set_memtable_whole_key_filtering(true);
            o.set_memtable_prefix_bloom_ratio(0.05);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o
        };
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_JOURNAL, cf_opts(4)),
            // The outbox holds one batch per partition at a time (overwritten by the next,
            // deleted once committed), each up to a whole batch of rows: a memtable the size
            // of the stage state's would hold several old copies (up to 64 MiB of RSS).
            ColumnFamilyDescriptor::new(
                CF_OUTBOX,
                cf_opts(mem.write_buffer_mb.min(OUTBOX_WRITE_BUFFER_MB)),
            ),
            ColumnFamilyDescriptor::new(CF_STAGE, cf_opts(mem.write_buffer_mb)),
        ];
        let path = dir.join("db");
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| StateError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Files of batches finished (or never referenced) before the last stop are deleted.
        let mut live = Vec::new();
        {
            let mut it = db.raw_iterator_cf(cf_of(&db, CF_OUTBOX)?);
            it.seek_to_first();
            while let Some(v) = it.value() {
                // Inline outboxes (restored ones, or written before outbox files) are not copied.
                if OutboxFiles::is_reference(v) {
                    live.push(v.to_vec());
                }
                it.next();
            }
            it.status()?;
        }
        Ok(Self {
            db,
            path,
            outbox_files: OutboxFiles::open(dir.join("outbox"), &live)?,
            outbox_file_min_bytes: mem.outbox_file_min_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How a source partition is keyed in the journal and outbox (and the changelog).
    pub fn partition_key(pk: &PartitionKey) -> Vec<u8> {
        let mut k = pk.topic.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&pk.partition.to_be_bytes());
        k
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StateError> {
        cf_of(&self.db, name)
    }

    pub fn journal(&self, pk: &PartitionKey) -> Result<PartitionJournal, StateError> {
        match self
            .db
            .get_cf(self.cf(CF_JOURNAL)?, Self::partition_key(pk))?
        {
            None => Ok(PartitionJournal::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: pk.to_string(),
                message: e.to_string(),
            }),
        }
    }

    fn journal_bytes(pk: &PartitionKey, j: &PartitionJournal) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(j).map_err(|e| StateError::Corrupt {
            key: pk.to_string(),
            message: e.to_string(),
        })
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StateError> {
        let mut wo = WriteOptions::default();
        // Synced where the guarantee depends on the record surviving a power cut.
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// A transaction for one batch's stage-state changes (see [`StateTxn`]).
    pub fn txn(&self) -> StateTxn<'_> {
        StateTxn::new(self)
    }

    /// Fixes a batch before any of it leaves the process: its state changes, its boundaries and
    /// its encoded output, in one synced write.
    pub fn begin_batch(
        &self,
        pk: &PartitionKey,
        first: i64,
        last: i64,
        txn: StateTxn<'_>,
        outbox: &Outbox,
    ) -> Result<(), StateError> {
        let mut j = self.journal(pk)?;
        j.pending = Some(PendingBatch {
            first,
            last,
            plugins: Vec::new(),
            ..Default::default()
        });
        self.begin_batch_with(pk, &j, txn, &outbox.encode(), None)
    }

    /// [`StateStore::begin_batch`] with a prepared journal entry (its `pending` set) and
    /// encoded outbox; `changelog` = (partition number, offset of the batch's last changelog
    /// record) when the batch was published to the state changelog first.
    pub fn begin_batch_with(
        &self,
        pk: &PartitionKey,
        journal: &PartitionJournal,
        txn: StateTxn<'_>,
        outbox: &[u8],
        changelog: Option<(i32, i64)>,
    ) -> Result<(), StateError> {
        let key = Self::partition_key(pk);
        let started = std::time::Instant::now();
        let stored = if outbox.len() >= self.outbox_file_min_bytes {
            std::borrow::Cow::Owned(self.outbox_files.write(&key, outbox)?)
        } else {
            std::borrow::Cow::Borrowed(outbox)
        };
        let (mut batch, hooks) = txn.into_write_batch(self.cf(CF_STAGE)?);
        batch.put_cf(
            self.cf(CF_JOURNAL)?,
            &key,
            Self::journal_bytes(pk, journal)?,
        );
        batch.put_cf(self.cf(CF_OUTBOX)?, &key, &stored);
        if let Some((n, offset)) = changelog {
            batch.put_cf(
                self.cf(CF_JOURNAL)?,
                changelog::position_key(n),
                offset.to_be_bytes(),
            );
        }
        let filed = started.elapsed();
        self.write(batch, true)?;
        self.outbox_files.stored(&stored);
        // Synced writes usually take a few ms; the odd one that waits for the disk (a stalled
        // flush of the outbox file, or of RocksDB's log) sets the latency tail, so say which.
        let all = started.elapsed();
        if all >= std::time::Duration::from_millis(50) {
            tracing::debug!(partition = %pk, outbox_bytes = outbox.len(),
                outbox_file_ms = filed.as_secs_f64() * 1e3,
                rocksdb_ms = (all - filed).as_secs_f64() * 1e3, "slow synced batch write");
        }
        for hook in hooks {
            hook();
        }
        Ok(())
    }

    /// Offset of the last state-changelog record the local state of partition number `n`
    /// includes (`None`: it does not follow the changelog).
    pub fn changelog_position(&self, n: i32) -> Result<Option<i64>, StateError> {
        let v = self
            .db
            .get_cf(self.cf(CF_JOURNAL)?, changelog::position_key(n))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_be_bytes))
    }

    pub fn set_changelog_position(&self, n: i32, offset: i64) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_JOURNAL)?,
            changelog::position_key(n),
            offset.to_be_bytes(),
        );
        self.write(batch, true)
    }

    /// Deletes everything kept for partition number `n`: stage state, journal entries and
    /// outboxes of every topic's partition `n`, the changelog position.
    pub fn wipe_namespace(&self, n: i32) -> Result<(), StateError> {
        // First, so that a wipe interrupted halfway is followed by a full restore again.
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_JOURNAL)?, changelog::position_key(n));
        self.write(std::mem::take(&mut batch), true)?;
        let mut outboxes = Vec::new();
        self.for_each_in_namespace(n, |kind, k, _| {
            let cf = match kind {
                changelog::Kind::Stage => CF_STAGE,
                changelog::Kind::Journal => CF_JOURNAL,
                changelog::Kind::Outbox => {
                    outboxes.push(k.to_vec());
                    CF_OUTBOX
                }
            };
            batch.delete_cf(self.cf(cf)?, k);
            if batch.len() >= 65_536 {
                self.write(std::mem::take(&mut batch), false)?;
            }
            Ok(())
        })?;
        self.write(batch, true)?;
        for k in outboxes {
            self.outbox_files.remove_all_of(&k);
        }
        Ok(())
    }

    /// Calls `f` on every entry of partition number `n` (position records excluded). An
    /// outbox's value may be a file reference: see [`StateStore::outbox_bytes`].
    pub(crate) fn for_each_in_namespace(
        &self,
        n: i32,
        mut f: impl FnMut(changelog::Kind, &[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        for (cf, kind) in [
            (CF_STAGE, changelog::Kind::Stage),
            (CF_OUTBOX, changelog::Kind::Outbox),
            (CF_JOURNAL, changelog::Kind::Journal),
        ] {
            let mut it = self.db.raw_iterator_cf(self.cf(cf)?);
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let part = match kind {
                    changelog::Kind::Stage => changelog::partition_of_stage_key(k),
                    _ if k.first() == Some(&0) => None,
                    _ => changelog::partition_of_pk_key(k),
                };
                if part == Some(n) {
                    f(kind, k, v)?;
                }
                it.next();
            }
            it.status()?;
        }
        Ok(())
    }

    /// Stage writes read from the changelog (not synced: [`StateStore::finish_restore`] is).
    pub(crate) fn apply_stage_writes(
        &self,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), StateError> {
        if writes.is_empty() {
            return Ok(());
        }
        let cf = self.cf(CF_STAGE)?;
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        self.write(batch, false)
    }

    /// Ends a restore: journal entries and outboxes read from the changelog, and the offset
    /// of the last record applied, in one synced write.
    #[allow(clippy::type_complexity)]
    pub(crate) fn finish_restore(
        &self,
        n: i32,
        journals: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        outboxes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        last: i64,
    ) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        let (jcf, ocf) = (self.cf(CF_JOURNAL)?, self.cf(CF_OUTBOX)?);
        for (k, v) in journals {
            match v {
                Some(v) => batch.put_cf(jcf, k, v),
                None => batch.delete_cf(jcf, k),
            }
        }
        // Restored outboxes are stored inline: a restore is rare and they are read back soon.
        let keys: Vec<Vec<u8>> = outboxes.iter().map(|(k, _)| k.clone()).collect();
        for (k, v) in outboxes {
            match v {
                Some(v) => batch.put_cf(ocf, k, v),
                None => batch.delete_cf(ocf, k),
            }
        }
        batch.put_cf(jcf, changelog::position_key(n), last.to_be_bytes());
        self.write(batch, true)?;
        for k in keys {
            self.outbox_files.remove_all_of(&k);
        }
        Ok(())
    }

    /// The encoded outbox an `outbox` column family value stands for (read from its file if
    /// it is a reference).
    pub(crate) fn outbox_bytes<'a>(
        &self,
        value: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, StateError> {
        self.outbox_files.resolve(value)
    }

    /// The output of the batch in flight on `pk`, if it was fixed before a stop.
    pub fn outbox(&self, pk: &PartitionKey) -> Result<Option<Outbox>, StateError> {
        let Some(v) = self
            .db
            .get_cf(self.cf(CF_OUTBOX)?, Self::partition_key(pk))?
        else {
            return Ok(None);
        };
        Outbox::decode(&self.outbox_bytes(&v)?)
            .map(Some)
            .map_err(|message| StateError::Corrupt {
                key: pk.to_string(),
                message,
            })
    }

    /// Records that a batch was inserted and its offsets committed. Not synced: if this write
    /// is lost, the outbox is re-sent once more and ClickHouse drops it by its token (so the
    /// slot an outbox file reference names is not reused before a later synced write, see
    /// [`outbox_files`]).
    pub fn complete_batch(&self, pk: &PartitionKey, last: i64) -> Result<(), StateError> {
        let mut j = self.journal(pk)?;
        j.pending = None;
        j.next_offset = Some(last + 1);
        let key = Self::partition_key(pk);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_JOURNAL)?, &key, Self::journal_bytes(pk, &j)?);
        batch.delete_cf(self.cf(CF_OUTBOX)?, &key);
        self.write(batch, false)
    }

    /// Prepares a partition for a rewind: forgets its progress (so rewound records are not
    /// skipped as already inserted) and remembers how far it had been delivered, returned.
    /// A batch still in flight must have been finished first (see `sluice rewind`).
    pub fn rewind_partition(&self, pk: &PartitionKey) -> Result<Option<i64>, StateError> {
        let old = self.journal(pk)?;
        // A batch fixed in the journal may have landed: its records count as delivered (the
        // stages' state already includes them).
        let pending = old.pending.as_ref().map(|b| b.last + 1);
        let horizon = old.next_offset.max(old.redelivered_below).max(pending);
        let j = PartitionJournal {
            next_offset: None,
            pending: None,
            redelivered_below: horizon,
            outbox_chunks: old.outbox_chunks,
        };
        let key = Self::partition_key(pk);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_JOURNAL)?, &key, Self::journal_bytes(pk, &j)?);
        batch.delete_cf(self.cf(CF_OUTBOX)?, &key);
        self.write(batch, true)?;
        self.outbox_files.remove_all_of(&key);
        Ok(horizon)
    }

    fn stage_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf(CF_STAGE)?, key)?)
    }

    /// Committed values of `keys`, in one batched lookup (RocksDB `MultiGet`: keys that share
    /// files, filter partitions and blocks are looked up together).
    fn stage_get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sorted = keys.is_sorted();
        self.db
            .batched_multi_get_cf(self.cf(CF_STAGE)?, keys, sorted)
            .into_iter()
            .map(|r| Ok(r?.map(|v| v.to_vec())))
            .collect()
    }

    /// Calls `f` on each committed stage entry with key in `[start, end)` (empty `end`: no upper
    /// bound), in key order, one at a time.
    fn stage_for_each(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mut opts = rocksdb::ReadOptions::default();
        if !end.is_empty() {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        // A bulk scan: keep it from evicting the lookups' working set, and read ahead.
        opts.fill_cache(false);
        opts.set_readahead_size(2 * 1024 * 1024);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_STAGE)?, opts);
        it.seek(start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            f(k, v)?;
            it.next();
        }
        it.status()?;
        Ok(())
    }

    /// Committed stage entries with keys in `[start, end)`.
    /// An iterator over the committed stage state (positioned nowhere yet).
    fn stage_reader(&self) -> Result<rocksdb::DBRawIteratorWithThreadMode<'_, DB>, StateError> {
        Ok(self.db.raw_iterator_cf(self.cf(CF_STAGE)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::PartitionKey;

    fn pk() -> PartitionKey {
        PartitionKey {
            topic: "t".into(),
            partition: 3,
        }
    }

    #[test]
    fn batch_state_journal_and_outbox_are_written_together_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox {
            tables: vec![("events".into(), 2, bytes::Bytes::from_static(&[1, 2, 3]))],
            dead_letters: vec![],
        };
        {
            let s = StateStore::open(dir.path()).expect("open");
            assert_eq!(s.journal(&pk()).expect("read"), PartitionJournal::default());
            let mut txn = s.txn();
            txn.stage("dedup", 3).put(b"k", b"v");
            s.begin_batch(&pk(), 10, 19, txn, &outbox).expect("begin");
        }
        let s = StateStore::open(dir.path()).expect("reopen");
        let j = s.journal(&pk()).expect("read");
        assert_eq!(
            j.pending,
            Some(PendingBatch {
                first: 10,
                last: 19,
                plugins: vec![],
                ..Default::default()
            })
        );
        assert_eq!(s.outbox(&pk()).expect("outbox"), Some(outbox));
        let mut txn = s.txn();
        assert_eq!(
            txn.stage("dedup", 3).get(b"k").expect("get"),
            Some(b"v".to_vec())
        );
        // Hooks run only when their transaction's write succeeds.
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for commit in [false, true] {
            let mut txn = s.txn();
            let r = ran.clone();
            txn.on_commit(move || {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            if commit {
                s.begin_batch(&pk(), 10, 19, txn, &Outbox::default())
                    .expect("begin");
            }
        }
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
        s.complete_batch(&pk(), 19).expect("complete");
        let j = s.journal(&pk()).expect("read");
        assert_eq!(j.pending, None);
        assert_eq!(j.next_offset, Some(20));
        assert_eq!(s.outbox(&pk()).expect("outbox"), None);
    }

    fn outbox_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("outbox")).map_or(0, |d| d.count())
    }

    #[test]
    fn a_large_outbox_lives_in_a_file_until_no_synced_reference_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = |b: u8| Outbox {
            tables: vec![(
                "events".into(),
                1,
                bytes::Bytes::from(vec![b; StateMemory::default().outbox_file_min_bytes]),
            )],
            dead_letters: vec![],
        };
        {
            let s = StateStore::open(dir.path()).expect("open");
            s.begin_batch(&pk(), 0, 9, s.txn(), &big(1)).expect("begin");
            assert_eq!(outbox_files(dir.path()), 1);
            // The next batch of the partition goes to the other slot, the one after it
            // overwrites the first.
            s.begin_batch(&pk(), 10, 19, s.txn(), &big(2))
                .expect("begin");
            assert_eq!(outbox_files(dir.path()), 2);
            s.begin_batch(&pk(), 20, 29, s.txn(), &big(3))
                .expect("begin");
            assert_eq!(outbox_files(dir.path()), 2);
        }
        // At open, the slot no reference names is deleted.
        let s = StateStore::open(dir.path()).expect("reopen");
        assert_eq!(outbox_files(dir.path()), 1);
        assert_eq!(s.outbox(&pk()).expect("outbox"), Some(big(3)));
        // Its commit is not synced: the file stays until the next open.
        s.complete_batch(&pk(), 29).expect("complete");
        assert_eq!(s.outbox(&pk()).expect("outbox"), None);
        assert_eq!(outbox_files(dir.path()), 1);
        drop(s);
        let s = StateStore::open(dir.path()).expect("reopen");
        assert_eq!(outbox_files(dir.path()), 0);
        // A damaged file is an error naming it, not an empty outbox.
        s.begin_batch(&pk(), 30, 39, s.txn(), &big(4))
            .expect("begin");
        for f in std::fs::read_dir(dir.path().join("outbox")).expect("list") {
            std::fs::write(f.expect("entry").path(), b"short").expect("damage");
        }
        let e = s.outbox(&pk()).expect_err("damaged");
        assert!(e.to_string().contains("outbox"), "{e}");
        // A small outbox stays inline, and a rewind drops the partition's files.
        s.rewind_partition(&pk()).expect("rewind");
        assert_eq!(outbox_files(dir.path()), 0);
        s.begin_batch(&pk(), 40, 49, s.txn(), &Outbox::default())
            .expect("begin");
        assert_eq!(outbox_files(dir.path()), 0);
        assert_eq!(s.outbox(&pk()).expect("outbox"), Some(Outbox::default()));
    }
}
