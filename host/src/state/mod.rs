//! Durable pipeline state in RocksDB, one database per pipeline.
//!
//! The batch journal lives here: the boundaries of a batch are written (synced) *before* it is
//! inserted, so after a crash the very same batch is rebuilt and re-sent with the same
//! deduplication token, and ClickHouse drops it if it had already landed.

use std::path::{Path, PathBuf};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::stage::PartitionKey;

const CF_JOURNAL: &str = "journal";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("state store: {0}")]
    Io(String),
    #[error("state store: corrupt journal entry for {key}: {message}")]
    Corrupt { key: String, message: String },
}

impl From<rocksdb::Error> for StateError {
    fn from(e: rocksdb::Error) -> Self {
        StateError::Io(e.to_string())
    }
}

/// A batch whose boundaries are fixed: it may or may not have reached ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBatch {
    pub first: i64,
    pub last: i64,
}

/// What the journal knows about one source partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionJournal {
    /// Offset after the last batch that was inserted and committed.
    pub next_offset: Option<i64>,
    /// The batch in flight when the process stopped, if any.
    pub pending: Option<PendingBatch>,
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
}

impl StateStore {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::Open {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The journal is tiny; keep RocksDB's own memory small.
        opts.set_write_buffer_size(4 * 1024 * 1024);
        opts.set_max_open_files(256);
        let cfs = vec![ColumnFamilyDescriptor::new(CF_JOURNAL, Options::default())];
        let path = dir.join("db");
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| StateError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn journal_key(pk: &PartitionKey) -> Vec<u8> {
        let mut k = pk.topic.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&pk.partition.to_be_bytes());
        k
    }

    fn cf(&self) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.db
            .cf_handle(CF_JOURNAL)
            .ok_or_else(|| StateError::Io("journal column family missing".into()))
    }

    pub fn journal(&self, pk: &PartitionKey) -> Result<PartitionJournal, StateError> {
        match self.db.get_cf(self.cf()?, Self::journal_key(pk))? {
            None => Ok(PartitionJournal::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StateError::Corrupt {
                key: pk.to_string(),
                message: e.to_string(),
            }),
        }
    }

    fn put_journal(&self, pk: &PartitionKey, j: &PartitionJournal) -> Result<(), StateError> {
        let v = serde_json::to_vec(j).map_err(|e| StateError::Io(e.to_string()))?;
        let mut wo = WriteOptions::default();
        // Synced: the guarantee depends on this record surviving a power cut, not just a crash.
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf()?, Self::journal_key(pk), v, &wo)?;
        Ok(())
    }

    /// Fixes a batch's boundaries before any part of it is sent to ClickHouse.
    pub fn begin_batch(&self, pk: &PartitionKey, first: i64, last: i64) -> Result<(), StateError> {
        let mut j = self.journal(pk)?;
        j.pending = Some(PendingBatch { first, last });
        self.put_journal(pk, &j)
    }

    /// Records that a batch was inserted and its offsets committed.
    pub fn complete_batch(&self, pk: &PartitionKey, last: i64) -> Result<(), StateError> {
        let mut j = self.journal(pk)?;
        j.pending = None;
        j.next_offset = Some(last + 1);
        self.put_journal(pk, &j)
    }

    /// Forgets a pending batch that can no longer be rebuilt (its offsets are gone).
    pub fn drop_pending(&self, pk: &PartitionKey) -> Result<(), StateError> {
        let mut j = self.journal(pk)?;
        j.pending = None;
        self.put_journal(pk, &j)
    }

    /// Forgets everything about a partition (used by rewinds).
    pub fn reset_partition(&self, pk: &PartitionKey) -> Result<(), StateError> {
        self.db.delete_cf(self.cf()?, Self::journal_key(pk))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pk = PartitionKey {
            topic: "t".into(),
            partition: 3,
        };
        {
            let s = StateStore::open(dir.path()).expect("open");
            assert_eq!(s.journal(&pk).expect("read"), PartitionJournal::default());
            s.begin_batch(&pk, 10, 19).expect("begin");
        }
        let s = StateStore::open(dir.path()).expect("reopen");
        let j = s.journal(&pk).expect("read");
        assert_eq!(
            j.pending,
            Some(PendingBatch {
                first: 10,
                last: 19
            })
        );
        s.complete_batch(&pk, 19).expect("complete");
        let j = s.journal(&pk).expect("read");
        assert_eq!(j.pending, None);
        assert_eq!(j.next_offset, Some(20));
    }
}
