//! Large outboxes (1 MiB and more by default, `state.outbox_file_min_kb`) live in files of
//! their own, next to the database; the `outbox` column family then holds a small reference
//! to the file (name, length, CRC-32) instead of the bytes.
//!
//! Why: a batch's encoded rows (~30 MB per 100,000 reference rows) written as one RocksDB
//! value were copied into the write batch, the write-ahead log and a memtable, then — the
//! value being larger than the outbox's write buffer — flushed at once into an LZ4-compressed
//! table file and compacted away after the commit deleted it: ~7 % of the plain path's CPU,
//! page faults included, for bytes that are read back only after a crash. A file costs one
//! write, one `fdatasync` and a sync of its directory.
//!
//! Crash safety: the file is synced (and its directory entry) *before* the RocksDB write that
//! references it, so a committed reference always finds its file. A file is deleted only once
//! a synced write has dropped every reference to it: the next batch of the same partition,
//! a rewind, a wipe, a restore, or at open (files no reference names). The commit of a batch
//! deletes its reference without a sync, so its file stays until one of those: at most one
//! finished batch's file per partition lingers.

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StateError;

/// Starts a reference value (an inline outbox starts with `SOB1`).
const REF_MAGIC: &[u8; 4] = b"SOBF";

pub(crate) struct OutboxFiles {
    dir: PathBuf,
    /// Makes file names unique within the process (with the clock, across restarts).
    seq: AtomicU64,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StateError {
    StateError::Io(format!("outbox file {}: {what}: {e}", path.display()))
}

impl OutboxFiles {
    pub(crate) fn open(dir: PathBuf) -> Result<Self, StateError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create directory", &dir, e))?;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Self {
            dir,
            seq: AtomicU64::new(start),
        })
    }

    /// Writes `outbox` for partition key `key` to a new synced file; returns the reference to
    /// store in its place.
    pub(crate) fn write(&self, key: &[u8], outbox: &[u8]) -> Result<Vec<u8>, StateError> {
        let name = format!(
            "{}-{:016x}",
            hex::encode(key),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(&name);
        let mut f = File::create(&path).map_err(|e| io_err("create", &path, e))?;
        f.write_all(outbox).map_err(|e| io_err("write", &path, e))?;
        f.sync_data().map_err(|e| io_err("sync", &path, e))?;
        // The file's directory entry must survive a power cut as well as its bytes.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync directory", &self.dir, e))?;
        let mut r = Vec::with_capacity(4 + 8 + 4 + 4 + name.len());
        r.extend_from_slice(REF_MAGIC);
        r.extend_from_slice(&(outbox.len() as u64).to_le_bytes());
        r.extend_from_slice(&crc32fast::hash(outbox).to_le_bytes());
        r.extend_from_slice(&(name.len() as u32).to_le_bytes());
        r.extend_from_slice(name.as_bytes());
        Ok(r)
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

    /// The outbox bytes a stored value stands for: the value itself, or its file's content
    /// (checked against the reference's length and CRC).
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
        let data = std::fs::read(&path).map_err(|e| io_err("read", &path, e))?;
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

    /// Deletes the files of partition key `key` except the one `keep` (a stored value) names.
    /// Only call it after a synced write that left `keep` as the key's only reference.
    pub(crate) fn remove_unreferenced(&self, key: &[u8], keep: Option<&[u8]>) {
        let prefix = format!("{}-", hex::encode(key));
        let keep = keep.and_then(Self::referenced).map(|(_, _, n)| n);
        self.remove_where(|name| name.starts_with(&prefix) && Some(name) != keep);
    }

    /// Deletes every file no value in `referencing` names (at open: nothing is in flight).
    pub(crate) fn remove_all_but(&self, referencing: &[Vec<u8>]) {
        let names: Vec<&str> = referencing
            .iter()
            .filter_map(|v| Self::referenced(v))
            .map(|(_, _, n)| n)
            .collect();
        self.remove_where(|name| !names.contains(&name));
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

    #[test]
    fn a_reference_resolves_to_its_file_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = OutboxFiles::open(dir.path().join("outbox")).expect("open");
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
        std::fs::remove_file(&path).expect("remove");
        let e = files.resolve(&r).expect_err("a missing file is refused");
        assert!(e.to_string().contains(name), "{e}");
    }

    #[test]
    fn clean_up_keeps_what_is_referenced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = OutboxFiles::open(dir.path().to_path_buf()).expect("open");
        let (a, b) = (b"a\0\0\0\0\0".as_slice(), b"b\0\0\0\0\0".as_slice());
        let a1 = files.write(a, b"one").expect("write");
        let a2 = files.write(a, b"two").expect("write");
        let b1 = files.write(b, b"three").expect("write");
        files.remove_unreferenced(a, Some(&a2));
        assert!(files.resolve(&a1).is_err());
        assert_eq!(&*files.resolve(&a2).expect("kept"), b"two");
        assert_eq!(&*files.resolve(&b1).expect("other key kept"), b"three");
        files.remove_all_but(std::slice::from_ref(&b1));
        assert!(files.resolve(&a2).is_err());
        assert_eq!(&*files.resolve(&b1).expect("kept"), b"three");
        files.remove_unreferenced(b, None);
        assert!(files.resolve(&b1).is_err());
    }
}
