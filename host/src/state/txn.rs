//! Stage state changes of one batch, kept in memory until the engine writes them together with
//! the batch's journal entry and outbox (see the module docs of `state`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;

use rocksdb::{ColumnFamily, DBRawIteratorWithThreadMode, WriteBatch, DB};

use super::{Entries, StateError, StateStore};

/// One namespace's writes: relative key → value (`None`: deleted).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Runs once the transaction's write is durable (see [`StateTxn::on_commit`]).
pub(super) type CommitHook = Box<dyn FnOnce() + Send>;

/// Reads see committed state plus this transaction's own writes.
pub struct StateTxn<'s> {
    store: &'s StateStore,
    /// Unique in the process (see [`StateTxn::id`]).
    id: u64,
    /// Writes per namespace (stage and partition), keyed relative to it: lookups and inserts
    /// compare and allocate only the key's own part (a single map of full keys built, copied
    /// and compared the namespace on every read and write).
    overlay: BTreeMap<Vec<u8>, Writes>,
    hooks: Vec<CommitHook>,
    /// One iterator over committed stage state for all range reads of the batch: creating one
    /// per read cost a join ~1 µs per record. Committed state does not change during a batch.
    reader: Reader<'s>,
}

impl<'s> StateTxn<'s> {
    pub(super) fn new(store: &'s StateStore) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            store,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            overlay: BTreeMap::new(),
            hooks: Vec::new(),
            reader: RefCell::new(None),
        }
    }

    /// Identifies this transaction within the process. A batch may reach a stage in several
    /// calls within one transaction: a stage that keeps an in-memory view of what the
    /// transaction wrote so far uses the id to tell a later call of the same batch from the
    /// first call of the next one (the previous transaction committed or was dropped).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs `f` after this transaction's synced write succeeded, never if it is dropped: how a
    /// stage keeps an in-memory view equal to committed state.
    pub fn on_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.hooks.push(Box::new(f));
    }

    /// The state of `stage` for source partition number `partition`. Co-partitioned topics (a
    /// join's two sides) share the namespace of their partition number.
    pub fn stage<'t>(&'t mut self, stage: &str, partition: i32) -> StageState<'t, 's> {
        let mut prefix = stage.as_bytes().to_vec();
        prefix.push(0);
        prefix.extend_from_slice(&partition.to_be_bytes());
        StageState {
            store: self.store,
            reader: &self.reader,
            hooks: &mut self.hooks,
            txn_id: self.id,
            writes: self.overlay.entry(prefix.clone()).or_default(),
            prefix,
        }
    }

    /// This transaction's writes (full stage keys; `None`: deleted), in key order.
    pub fn writes(&self) -> impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)> + '_ {
        self.overlay.iter().flat_map(|(ns, writes)| {
            writes
                .iter()
                .map(move |(k, v)| ([&ns[..], &k[..]].concat(), v.clone()))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.overlay.values().all(BTreeMap::is_empty)
    }

    /// Offsets of `partition` below this were delivered before a rewind (see
    /// [`super::PartitionJournal::redelivered_below`]): a record met again below it is a
    /// re-delivery, not a first occurrence.
    pub fn redelivered_below(
        &self,
        partition: &crate::stage::PartitionKey,
    ) -> Result<Option<i64>, StateError> {
        Ok(self.store.journal(partition)?.redelivered_below)
    }

    /// The writes, and the hooks to run once they are durable.
    pub(super) fn into_write_batch(self, cf: &ColumnFamily) -> (WriteBatch, Vec<CommitHook>) {
        let mut b = WriteBatch::default();
        let mut full = Vec::new();
        for (ns, writes) in self.overlay {
            for (k, v) in writes {
                full.clear();
                full.extend_from_slice(&ns);
                full.extend_from_slice(&k);
                match v {
                    Some(v) => b.put_cf(cf, &full, v),
                    None => b.delete_cf(cf, &full),
                }
            }
        }
        (b, self.hooks)
    }
}

/// The iterator over committed stage state a transaction's range reads share.
type Reader<'s> = RefCell<Option<DBRawIteratorWithThreadMode<'s, DB>>>;

/// Committed entries with full keys in `[start, end)`, in key order, without their first
/// `strip` bytes (the namespace).
fn committed_range<'s>(
    store: &'s StateStore,
    reader: &Reader<'s>,
    start: &[u8],
    end: &[u8],
    strip: usize,
) -> Result<Entries, StateError> {
    let mut reader = reader.borrow_mut();
    let it = match reader.as_mut() {
        Some(it) => it,
        None => reader.insert(store.stage_reader()?),
    };
    let mut out = Vec::new();
    it.seek(start);
    while let Some((k, v)) = it.item() {
        if k >= end {
            break;
        }
        out.push((k.get(strip..).unwrap_or_default().to_vec(), v.to_vec()));
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// One stage's view of the state of one partition. Keys are relative to the namespace.
pub struct StageState<'t, 's> {
    store: &'s StateStore,
    reader: &'t Reader<'s>,
    hooks: &'t mut Vec<CommitHook>,
    txn_id: u64,
    /// The transaction's writes in this namespace.
    writes: &'t mut Writes,
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
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.stage_get(&self.full(key)),
        }
    }

    /// Values of many keys, as [`StageState::get`] each, with one batched RocksDB read for the
    /// keys this transaction has not written (sorted keys read fastest).
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let mut out = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        let mut at = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.writes.get(key.as_ref()) {
                Some(v) => out.push(v.clone()),
                None => {
                    out.push(None);
                    missing.push(self.full(key.as_ref()));
                    at.push(i);
                }
            }
        }
        for (i, v) in at.into_iter().zip(self.store.stage_get_many(&missing)?) {
            out[i] = v;
        }
        Ok(out)
    }

    /// See [`StateTxn::id`].
    pub fn txn_id(&self) -> u64 {
        self.txn_id
    }

    /// See [`StateTxn::on_commit`].
    pub fn on_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.hooks.push(Box::new(f));
    }

    /// Committed entries (this transaction's writes excluded) whose relative key starts with
    /// `prefix`, streamed in key order to `f`: rebuilds in-memory views of large state without
    /// holding it all at once.
    pub fn for_each_committed(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let start = self.full(prefix);
        let end = prefix_end(&start).unwrap_or_default();
        let n = self.prefix.len();
        self.store
            .stage_for_each(&start, &end, |k, v| f(&k[n..], v))
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.set(key, Some(value.to_vec()));
    }

    /// [`StageState::put`] of a key and value the caller built for it (not copied again).
    pub fn put_owned(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.set(key, None);
    }

    fn set(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        // Overwriting keeps the map's key: no allocation for a key written before.
        match self.writes.get_mut(key) {
            Some(v) => *v = value,
            None => {
                self.writes.insert(key.to_vec(), value);
            }
        }
    }

    /// Entries with relative keys in `[start, end)`, in key order, including this batch's writes.
    pub fn range(&self, start: &[u8], end: &[u8]) -> Result<Entries, StateError> {
        let (s, e) = (self.full(start), self.full(end));
        let n = self.prefix.len();
        let committed = committed_range(self.store, self.reader, &s, &e, n)?;
        if start >= end {
            return Ok(committed);
        }
        let mut own = self
            .writes
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .peekable();
        if own.peek().is_none() {
            return Ok(committed);
        }
        // Both lists are in key order: merge them, this transaction's writes winning.
        let mut out = Vec::with_capacity(committed.len());
        let mut committed = committed.into_iter().peekable();
        loop {
            let take_own = match (committed.peek(), own.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((ck, _)), Some((ok, _))) => ok <= &ck,
            };
            if take_own {
                let Some((k, v)) = own.next() else { break };
                if committed.peek().is_some_and(|(ck, _)| ck == k) {
                    committed.next();
                }
                if let Some(v) = v {
                    out.push((k.clone(), v.clone()));
                }
            } else if let Some(entry) = committed.next() {
                out.push(entry);
            }
        }
        Ok(out)
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

    /// Commits what `write` puts in a transaction, as a batch of partition t/0.
    fn commit(store: &StateStore, write: impl FnOnce(&mut StateTxn<'_>)) {
        let mut txn = store.txn();
        write(&mut txn);
        let pk = crate::stage::PartitionKey {
            topic: "t".into(),
            partition: 0,
        };
        store
            .begin_batch(&pk, 0, 0, txn, &super::super::Outbox::default())
            .expect("commit");
    }

    #[test]
    fn get_many_sees_committed_state_and_own_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        commit(&store, |txn| {
            txn.stage("s", 0).put(b"a", b"1");
            txn.stage("s", 0).put(b"b", b"2");
            txn.stage("s", 1).put(b"c", b"other partition");
        });
        let mut txn = store.txn();
        let mut st = txn.stage("s", 0);
        st.put(b"c", b"3");
        st.delete(b"a");
        let got = st
            .get_many(&[&b"a"[..], b"b", b"c", b"d", b"b"])
            .expect("get_many");
        let want: Vec<Option<Vec<u8>>> = vec![
            None,
            Some(b"2".to_vec()),
            Some(b"3".to_vec()),
            None,
            Some(b"2".to_vec()),
        ];
        assert_eq!(got, want);
        for k in [&b"a"[..], b"b", b"c", b"d"] {
            assert_eq!(
                st.get(k).expect("get"),
                st.get_many(&[k]).expect("get_many")[0]
            );
        }
    }

    #[test]
    fn range_merges_committed_state_with_own_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        commit(&store, |txn| {
            for k in [&b"b"[..], b"d", b"f", b"h"] {
                txn.stage("s", 0).put(k, b"old");
            }
            txn.stage("s", 1).put(b"c", b"other partition");
        });
        let mut txn = store.txn();
        let mut st = txn.stage("s", 0);
        let range = |st: &StageState<'_, '_>| -> Vec<(String, String)> {
            st.range(b"a", b"h")
                .expect("range")
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8(k).unwrap_or_default(),
                        String::from_utf8(v).unwrap_or_default(),
                    )
                })
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            range(&st),
            vec![pair("b", "old"), pair("d", "old"), pair("f", "old")]
        );
        st.put(b"a", b"new");
        st.put(b"d", b"new");
        st.delete(b"f");
        st.put(b"g", b"new");
        st.put(b"h", b"past the end");
        assert_eq!(
            range(&st),
            vec![
                pair("a", "new"),
                pair("b", "old"),
                pair("d", "new"),
                pair("g", "new")
            ]
        );
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
