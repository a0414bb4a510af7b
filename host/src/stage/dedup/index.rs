//! The dedup stage's in-memory index: per source partition, every committed key's 128-bit
//! fingerprint → when it was first seen and a 32-bit tag of where. Lookups are answered here;
//! RocksDB stays the source of truth (the index is rebuilt from it on first use of a partition
//! after start, and changed only by commit hooks, so it never holds uncommitted state).
//!
//! Fingerprints are xxh3-128 with a seed drawn at start (nothing persists them): two distinct
//! keys in one partition's window collide with probability ≈ n²/2¹²⁹ (~10⁻²⁵ at 10 M keys), and
//! a collision cannot be prepared in advance. The position tag is only a filter: equal tags are
//! confirmed against the stored first-seen position before a record passes as its own replay.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use twox_hash::{XxHash3_128, XxHash3_64};

/// Sub-maps per partition: a map grows by doubling, and with shards only one small shard is
/// doubling at a time, so growth never needs twice the memory of the whole index.
const SHARDS: usize = 64;

/// A key's fingerprint, as bytes: alignment 1 keeps a map slot at 28 bytes (no padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint([u8; 16]);

impl Fingerprint {
    fn low(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }

    fn shard(&self) -> usize {
        usize::from(self.0[8]) % SHARDS
    }
}

impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Already a uniform hash: hand the map 64 of its bits instead of hashing again.
        h.write_u64(self.low());
    }
}

/// Passes a [`Fingerprint`]'s bits through.
#[derive(Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a fingerprint is hashed: fold, FNV-1a style.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// When a key was first seen (event time, ms) and a tag of where (topic, partition, offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    ts: [u8; 8],
    at: [u8; 4],
}

impl Seen {
    pub(super) fn new(ts: i64, at: u32) -> Self {
        Self {
            ts: ts.to_le_bytes(),
            at: at.to_le_bytes(),
        }
    }

    pub(super) fn ts(&self) -> i64 {
        i64::from_le_bytes(self.ts)
    }

    pub(super) fn at(&self) -> u32 {
        u32::from_le_bytes(self.at)
    }
}

/// Computes fingerprints and position tags.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hashes {
    seed: u64,
}

impl Hashes {
    /// A fresh random seed (from the standard library's per-process hash keys).
    pub(super) fn random() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one(0x5eed_u64 ^ u64::from(std::process::id()));
        Self { seed }
    }

    pub(super) fn key(&self, key: &[u8]) -> Fingerprint {
        Fingerprint(XxHash3_128::oneshot_with_seed(self.seed, key).to_le_bytes())
    }

    /// A 32-bit tag of a record position: different tags mean different positions.
    pub(super) fn position(topic: &[u8], partition: i32, offset: i64) -> u32 {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&partition.to_le_bytes());
        b[4..].copy_from_slice(&offset.to_le_bytes());
        let h = XxHash3_64::oneshot_with_seed(XxHash3_64::oneshot(topic), &b);
        // Truncation intended: a tag only filters, equal tags are confirmed.
        h as u32
    }
}

/// A map keyed by fingerprints (which need no further hashing).
pub(super) type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<PassThrough>>;

type Shard = FingerprintMap<Seen>;

/// The committed keys of one partition of one dedup stage.
pub(super) struct PartitionIndex {
    shards: Vec<Shard>,
}

impl Default for PartitionIndex {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl PartitionIndex {
    pub(super) fn get(&self, fp: &Fingerprint) -> Option<Seen> {
        self.shards[fp.shard()].get(fp).copied()
    }

    pub(super) fn insert(&mut self, fp: Fingerprint, seen: Seen) {
        self.shards[fp.shard()].insert(fp, seen);
    }

    pub(super) fn remove(&mut self, fp: &Fingerprint) {
        self.shards[fp.shard()].remove(fp);
    }

    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }
}

/// One committed batch's changes to a partition's keys, applied in this order.
#[derive(Debug, Default)]
pub(super) struct Changes {
    pub(super) inserted: Vec<(Fingerprint, Seen)>,
    pub(super) removed: Vec<Fingerprint>,
}

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.inserted.is_empty() && self.removed.is_empty()
    }

    pub(super) fn apply(self, index: &mut PartitionIndex) {
        for (fp, seen) in self.inserted {
            index.insert(fp, seen);
        }
        for fp in &self.removed {
            index.remove(fp);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_compact() {
        // What 10 M keys cost: (16 + 12) bytes per slot plus one control byte.
        assert_eq!(std::mem::size_of::<(Fingerprint, Seen)>(), 28);
    }

    #[test]
    fn insert_get_remove_and_apply_order() {
        let h = Hashes::random();
        let mut idx = PartitionIndex::default();
        let (a, b) = (h.key(b"a"), h.key(b"b"));
        assert_ne!(a, b);
        assert_eq!(a, h.key(b"a"));
        idx.insert(a, Seen::new(-5, 7));
        assert_eq!(idx.get(&a).map(|s| (s.ts(), s.at())), Some((-5, 7)));
        assert_eq!(idx.get(&b), None);
        // Inserted then removed in the same batch (swept at its end): gone.
        let changes = Changes {
            inserted: vec![(b, Seen::new(1, 1))],
            removed: vec![b, a],
        };
        changes.apply(&mut idx);
        assert_eq!(idx.len(), 0);
        assert_ne!(Hashes::position(b"t", 0, 1), Hashes::position(b"t", 0, 2));
        assert_ne!(Hashes::position(b"t", 0, 1), Hashes::position(b"u", 0, 1));
    }
}
