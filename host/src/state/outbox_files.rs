//! Large outboxes (1 MiB and more by default, `state.outbox_file_min_kb`) live in files of
//! their own, next to the database; the `outbox` column family then holds a small reference
//! to the file (name, length, CRC-32) instead of the bytes.
//!
//! Why: a batch's encoded rows (~30 MB per 100,000 reference rows) written as one RocksDB
//! value were copied into the write batch, the write-ahead log and a memtable, then — the
//! value being larger than the outbox's write buffer — flushed at once into an LZ4-compressed
//! table file and compacted away after the commit deleted it: ~7 % of the plain path's CPU,
//! page faults included, for bytes that are read back only after a crash.
//!
//! Each partition has two slot files, written alternately and overwritten in place: the slot
//! the last synced reference names is never touched, the other one is free. Overwriting
//! keeps the file's size and directory entry, so its `fdatasync` flushes data blocks only.
//! A new file per batch made every sync an ext4 journal commit (size, extents, directory
//! entry, the previous file's unlink), which waits for whatever else the journal carries —
//! ClickHouse's part files on the same disk — and took 170–340 ms once per latency run
//! against ~7 ms typically. A slot grows with 25 % headroom (so batches of varying size
//! settle into it) and shrinks when four times bigger than needed.
//!
//! Crash safety: the slot is synced (and, when just created, its directory) *before* the
//! RocksDB write that references it, so a committed reference always finds its bytes; the
//! CRC in the reference catches a slot overwritten after all. Slots are deleted by a rewind,
//! a wipe or a restore, and at open (files no reference names).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::StateError;

/// Starts a reference value (an inline outbox starts with `SOB1`).
const REF_MAGIC: &[u8; 4] = b"SOBF";

pub(crate) struct OutboxFiles {
    dir: PathBuf,
    /// Per partition key, the slot (0 or 1) the last synced reference names: the next write
    /// goes to the other.
    referenced: Mutex<HashMap<Vec<u8>, u8>>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StateError {
    StateError::Io(format!("outbox file {}: {what}: {e}", path.display()))
}

/// A slot file's name: the partition key in hex, `-`, the slot number.
fn slot_name(key: &[u8], slot: u8) -> String {
    format!("{}-{slot}", hex::encode(key))
}

/// The partition key and slot of a slot file's name (`None`: not a slot file, e.g. a file
/// written by an older version, one per batch).
fn parse_slot_name(name: &str) -> Option<(Vec<u8>, u8)> {
    let (key, slot) = name.rsplit_once('-')?;
    let slot = match slot {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    Some((hex::decode(key).ok()?, slot))
}

impl OutboxFiles {
    /// Opens the directory; `live` are the stored references (nothing is in flight yet).
    /// Files none of them names are deleted.
    pub(crate) fn open(dir: PathBuf, live: &[Vec<u8>]) -> Result<Self, StateError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create directory", &dir, e))?;
        let names: Vec<&str> = live
            .iter()
            .filter_map(|v| Self::referenced(v))
            .map(|(_, _, n)| n)
            .collect();
        let referenced = names.iter().filter_map(|n| parse_slot_name(n)).collect();
        let files = Self {
            dir,
            referenced: Mutex::new(referenced),
        };
        files.remove_where(|name| !names.contains(&name));
        Ok(files)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, u8>> {
        // The map holds plain numbers: a panic elsewhere cannot leave it half-updated.
        self.referenced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `outbox` for partition key `key` into the slot no synced reference names, and
    /// syncs it; returns the reference to store in its place. Call [`OutboxFiles::stored`]
    /// once a synced write holds the reference.
    pub(crate) fn write(&self, key: &[u8], outbox: &[u8]) -> Result<Vec<u8>, StateError> {
        let slot = self.slots().get(key).map_or(0, |s| 1 - s);
        let name = slot_name(key, slot);
        let path = self.dir.join(&name);
        let (mut f, created) = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == ErrorKind::NotFound => (
                File::create_new(&path).map_err(|e| io_err("create", &path, e))?,
                true,
            ),
            Err(e) => return Err(io_err("open", &path, e)),
        };
        let size = f.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        let need = outbox.len() as u64;
        let room = need + need / 4;
        f.write_all(outbox).map_err(|e| io_err("write", &path, e))?;
        if size < need {
            // Written headroom (not `fallocate`d: writing into unwritten extents changes
            // metadata again), so the next batches of about this size do not grow the file.
            let pad = vec![0u8; (room - need) as usize];
            f.write_all(&pad).map_err(|e| io_err("write", &path, e))?;
        } else if size > 4 * room {
            f.set_len(room).map_err(|e| io_err("shrink", &path, e))?;
        }
        f.sync_data().map_err(|e| io_err("sync", &path, e))?;
        if created {
            // The file's directory entry must survive a power cut as well as its bytes.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("sync directory", &self.dir, e))?;
        }
        let mut r = Vec::with_capacity(4 + 8 + 4 + 4 + name.len());
        r.extend_from_slice(REF_MAGIC);
        r.extend_from_slice(&need.to_le_bytes());
        r.extend_from_slice(&crc32fast::hash(outbox).to_le_bytes());
        r.extend_from_slice(&(name.len() as u32).to_le_bytes());
        r.extend_from_slice(name.as_bytes());
        Ok(r)
    }

    /// Records that a synced write made `value` a partition's stored outbox. (An inline
    /// value frees both slots; alternating on is harmless.)
    pub(crate) fn stored(&self, value: &[u8]) {
        if let Some((key, slot)) = Self::referenced(value).and_then(|(_, _, n)| parse_slot_name(n))
        {
            self.slots().insert(key, slot);
        }
    }

    /// Whether a stored value is a file reference (not an inline outbox).
    pub(crate) fn is_reference(value: &[u8]) -> bool {
        value.starts_with(REF_MAGIC)
    }

    /// The file a stored value refers to (`None`: the value is an inline outbox).
    fn referenced(value: &[u8]) -> Option<(u64, u32, &str)> {
        let rest = value.strip_prefix(REF_MAGIC)?;
        let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let crc = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?);
        let n = u32::from_le_bytes(rest.get(12..16)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(rest.get(16..16 + n)?).ok()?;
        Some((len, crc, name))
    }

    /// The outbox bytes a stored value stands for: the value itself, or the start of its
    /// file (checked against the reference's length and CRC).
    pub(crate) fn resolve<'a>(&self, value: &'a [u8]) -> Result<Cow<'a, [u8]>, StateError> {
        if !Self::is_reference(value) {
            return Ok(Cow::Borrowed(value));
        }
        let Some((len, crc, name)) = Self::referenced(value) else {
            return Err(StateError::Corrupt {
                key: "outbox".into(),
                message: "unreadable outbox file reference".into(),
            });
        };
        let path = self.dir.join(name);
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(len).read_to_end(&mut data))
            .map_err(|e| io_err("read", &path, e))?;
        let found = crc32fast::hash(&data);
        if data.len() as u64 != len || found != crc {
            return Err(StateError::Corrupt {
                key: path.display().to_string(),
                message: format!(
                    "outbox file has {} bytes with CRC {found:08x}, its reference says {len} bytes, CRC {crc:08x}",
                    data.len(),
                ),
            });
        }
        Ok(Cow::Owned(data))
    }

    /// Deletes every file of partition key `key`. Only call it after a synced write that left
    /// no reference to them.
    pub(crate) fn remove_all_of(&self, key: &[u8]) {
        self.slots().remove(key);
        let prefix = format!("{}-", hex::encode(key));
        self.remove_where(|name| name.starts_with(&prefix));
    }

    fn remove_where(&self, doomed: impl Fn(&str) -> bool) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot list outbox files: {e}");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if doomed(name) {
                // A file left behind costs disk only; the next clean-up tries again.
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), "cannot delete outbox file: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_reference_resolves_to_its_file_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = OutboxFiles::open(dir.path().join("outbox"), &[]).expect("open");
        let data: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        let r = files.write(b"t\0\0\0\0\x01", &data).expect("write");
        assert_eq!(&*files.resolve(&r).expect("resolve"), &data[..]);
        // An inline value is returned as it is.
        assert_eq!(&*files.resolve(b"SOB1abc").expect("inline"), b"SOB1abc");
        let (_, _, name) = OutboxFiles::referenced(&r).expect("a reference");
        let path = dir.path().join("outbox").join(name);
        let mut damaged = data.clone();
        damaged[100] ^= 1;
        std::fs::write(&path, &damaged).expect("damage");
        let e = files.resolve(&r).expect_err("a damaged file is refused");
        assert!(e.to_string().contains("CRC"), "{e}");
        std::fs::write(&path, &data[..10]).expect("truncate");
        let e = files.resolve(&r).expect_err("a short file is refused");
        assert!(e.to_string().contains("10 bytes"), "{e}");
        std::fs::remove_file(&path).expect("remove");
        let e = files.resolve(&r).expect_err("a missing file is refused");
        assert!(e.to_string().contains(name), "{e}");
    }

    #[test]
    fn writes_alternate_between_two_slots_and_never_touch_the_stored_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = OutboxFiles::open(dir.path().to_path_buf(), &[]).expect("open");
        let key = b"a\0\0\0\0\0".as_slice();
        let big = vec![7u8; 4000];
        let r1 = files.write(key, &big).expect("write");
        files.stored(&r1);
        // Not recorded as stored (its synced write failed): the next write reuses the slot.
        let lost = files.write(key, b"lost").expect("write");
        let r2 = files.write(key, b"two").expect("write");
        let name = |r: &[u8]| {
            OutboxFiles::referenced(r)
                .expect("a reference")
                .2
                .to_owned()
        };
        assert_eq!(name(&lost), name(&r2));
        assert_ne!(name(&r1), name(&r2));
        assert_eq!(
            &*files.resolve(&r1).expect("the stored slot is intact"),
            &big[..]
        );
        files.stored(&r2);
        // Overwritten in place: the slot keeps its size, the reference its own length.
        let three = vec![3u8; 2000];
        let r3 = files.write(key, &three).expect("write");
        assert_eq!(name(&r1), name(&r3));
        assert_eq!(&*files.resolve(&r3).expect("resolve"), &three[..]);
        assert_eq!(&*files.resolve(&r2).expect("resolve"), b"two");
        let size = |r: &[u8]| {
            std::fs::metadata(dir.path().join(name(r)))
                .expect("stat")
                .len()
        };
        assert_eq!(
            size(&r3),
            5000,
            "4000 bytes and a quarter of headroom, kept"
        );
        assert_eq!(names(dir.path()), ["610000000000-0", "610000000000-1"]);
        // At open, the stored reference's slot is known again: the next write avoids it.
        files.stored(&r3);
        drop(files);
        let files =
            OutboxFiles::open(dir.path().to_path_buf(), std::slice::from_ref(&r3)).expect("reopen");
        assert_eq!(
            names(dir.path()),
            ["610000000000-0"],
            "the free slot is deleted"
        );
        let r4 = files.write(key, b"four").expect("write");
        assert_eq!(&*files.resolve(&r3).expect("intact"), &three[..]);
        assert_eq!(&*files.resolve(&r4).expect("resolve"), b"four");
        files.stored(&r4);
        // Four times bigger than needed: shrunk.
        let r5 = files.write(key, &[5u8; 800]).expect("write");
        assert_eq!(size(&r5), 1000);
    }

    #[test]
    fn clean_up_keeps_what_is_referenced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (b"a\0\0\0\0\0".as_slice(), b"b\0\0\0\0\0".as_slice());
        // A file of an older version (one per batch) is deleted at open unless referenced.
        std::fs::write(dir.path().join("610000000000-0000000000000001"), b"old").expect("write");
        let files = OutboxFiles::open(dir.path().to_path_buf(), &[]).expect("open");
        assert!(names(dir.path()).is_empty());
        let a1 = files.write(a, b"one").expect("write");
        files.stored(&a1);
        let b1 = files.write(b, b"three").expect("write");
        files.stored(&b1);
        files.remove_all_of(a);
        assert!(files.resolve(&a1).is_err());
        assert_eq!(&*files.resolve(&b1).expect("other key kept"), b"three");
        drop(files);
        let files =
            OutboxFiles::open(dir.path().to_path_buf(), std::slice::from_ref(&b1)).expect("open");
        assert_eq!(&*files.resolve(&b1).expect("kept"), b"three");
        files.remove_all_of(b);
        assert!(files.resolve(&b1).is_err());
        assert!(names(dir.path()).is_empty());
    }
}
