//! Stage state changes of one batch, kept in memory until the engine writes them together with
//! the batch's journal entry and outbox (see the module docs of `state`).

use std::collections::BTreeMap;

use rocksdb::{ColumnFamily, WriteBatch};

use super::{Entries, StateError, StateStore};

/// Reads see committed state plus this transaction's own writes.
pub struct StateTxn<'s> {
    store: &'s StateStore,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'s> StateTxn<'s> {
    pub(super) fn new(store: &'s StateStore) -> Self {
        Self {
            store,
            overlay: BTreeMap::new(),
        }
    }

    /// The state of `stage` for source partition number `partition`. Co-partitioned topics (a
    /// join's two sides) share the namespace of their partition number.
    pub fn stage<'t>(&'t mut self, stage: &str, partition: i32) -> StageState<'t, 's> {
        let mut prefix = stage.as_bytes().to_vec();
        prefix.push(0);
        prefix.extend_from_slice(&partition.to_be_bytes());
        StageState { txn: self, prefix }
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }

    pub(super) fn into_write_batch(self, cf: &ColumnFamily) -> WriteBatch {
        let mut b = WriteBatch::default();
        for (k, v) in self.overlay {
            match v {
                Some(v) => b.put_cf(cf, k, v),
                None => b.delete_cf(cf, k),
            }
        }
        b
    }
}

/// One stage's view of the state of one partition. Keys are relative to the namespace.
pub struct StageState<'t, 's> {
    txn: &'t mut StateTxn<'s>,
    prefix: Vec<u8>,
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl StageState<'_, '_> {
    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let full = self.full(key);
        match self.txn.overlay.get(&full) {
            Some(v) => Ok(v.clone()),
            None => self.txn.store.stage_get(&full),
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        let full = self.full(key);
        self.txn.overlay.insert(full, Some(value.to_vec()));
    }

    pub fn delete(&mut self, key: &[u8]) {
        let full = self.full(key);
        self.txn.overlay.insert(full, None);
    }

    /// Entries with relative keys in `[start, end)`, in key order, including this batch's writes.
    pub fn range(&self, start: &[u8], end: &[u8]) -> Result<Entries, StateError> {
        let (s, e) = (self.full(start), self.full(end));
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = self
            .txn
            .store
            .stage_range(&s, &e)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        for (k, v) in self.txn.overlay.range(s..e) {
            merged.insert(k.clone(), v.clone());
        }
        let n = self.prefix.len();
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k[n..].to_vec(), v)))
            .collect())
    }

    /// Entries whose relative key starts with `prefix`.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        match prefix_end(prefix) {
            Some(end) => self.range(prefix, &end),
            None => {
                // Every key of the namespace starting with 0xFF..: bound by the namespace end.
                let ns_end = prefix_end(&self.prefix).unwrap_or_default();
                let n = self.prefix.len();
                self.range(prefix, &ns_end[n.min(ns_end.len())..])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_own_writes_and_namespaces_are_separate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let mut txn = store.txn();
        {
            let mut a = txn.stage("dedup", 0);
            a.put(b"k1", b"1");
            a.put(b"k2", b"2");
            a.put(b"k3", b"3");
            a.delete(b"k2");
            assert_eq!(a.get(b"k1").expect("get"), Some(b"1".to_vec()));
            assert_eq!(a.get(b"k2").expect("get"), None);
        }
        assert_eq!(txn.stage("dedup", 1).get(b"k1").expect("get"), None);
        assert_eq!(txn.stage("join", 0).get(b"k1").expect("get"), None);
        let keys: Vec<Vec<u8>> = txn
            .stage("dedup", 0)
            .scan_prefix(b"k")
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"k1".to_vec(), b"k3".to_vec()]);
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
