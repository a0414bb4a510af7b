//! The plugin store: uploaded components kept content-addressed on disk, with numbered
//! versions per plugin name, and which version each pipeline stage uses (with its history, for
//! rollback). Everything is plain files written atomically (write + rename), so the store
//! survives restarts and crashes, and an operator can read it.
//!
//! ```text
//! <dir>/blobs/<sha256>.wasm            the component bytes, named by their digest
//! <dir>/plugins/<name>.json            versions of one plugin name
//! <dir>/active/<pipeline>.json         per stage: the version in use and the previous ones
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("plugin store {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "invalid plugin name {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . - (not starting with . or -)"
    )]
    InvalidName(String),
    #[error("no plugin named {0:?}")]
    UnknownPlugin(String),
    #[error("plugin {name:?} has no version {version}")]
    UnknownVersion { name: String, version: u32 },
    #[error("plugin {name:?} version {version} is in use by {users}; swap those stages to another version first")]
    InUse {
        name: String,
        version: u32,
        users: String,
    },
    #[error(
        "stage {stage:?} of pipeline {pipeline:?} has no earlier plugin version to roll back to"
    )]
    NoHistory { pipeline: String, stage: String },
}

/// One stored version of a plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct VersionInfo {
    pub version: u32,
    /// Hex sha256 of the component bytes (the blob's name).
    pub sha256: String,
    pub size_bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub uploaded_at_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginInfo {
    pub name: String,
    pub versions: Vec<VersionInfo>,
}

/// The plugin a stage runs: a stored version, or the component file named in the pipeline
/// file (`version` absent), which is what every stage starts from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PluginRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    pub sha256: String,
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@v{v}", self.name),
            None => write!(f, "{} (pipeline file)", self.name),
        }
    }
}

/// Which plugin a stage uses now and what it used before (most recent last).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageSelection {
    pub current: Option<PluginRef>,
    #[serde(default)]
    pub history: Vec<PluginRef>,
    /// When `current` was set (ms since the epoch): drives automatic rollback on a breaker.
    #[serde(default)]
    pub since_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ActiveFile {
    #[serde(default)]
    stages: BTreeMap<String, StageSelection>,
}

pub struct PluginStore {
    dir: PathBuf,
    /// Serialises read-modify-write of the JSON files within this process.
    lock: Mutex<()>,
}

/// Plugin names become file names: keep them to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_string()))
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl PluginStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        for sub in ["blobs", "plugins", "active"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is on disk and always consistent (atomic renames): a panic while
        // holding the lock leaves nothing half-written, so a poisoned lock is safe to reuse.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plugin_path(&self, name: &str) -> PathBuf {
        self.dir.join("plugins").join(format!("{name}.json"))
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha256}.wasm"))
    }

    fn active_path(&self, pipeline: &str) -> PathBuf {
        self.dir.join("active").join(format!("{pipeline}.json"))
    }

    /// Stores `bytes` as the next version of `name`. Uploading bytes identical to an existing
    /// version returns that version (`false`: nothing new was created).
    pub fn put(&self, name: &str, bytes: &[u8]) -> Result<(VersionInfo, bool), StoreError> {
        check_name(name)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let _g = self.guard();
        let mut info = self.read_plugin(name)?.unwrap_or_else(|| PluginInfo {
            name: name.to_string(),
            versions: Vec::new(),
        });
        if let Some(v) = info.versions.iter().find(|v| v.sha256 == sha256) {
            return Ok((v.clone(), false));
        }
        let blob = self.blob_path(&sha256);
        if !blob.exists() {
            write_atomic(&blob, bytes)?;
        }
        let v = VersionInfo {
            version: info.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1,
            sha256,
            size_bytes: bytes.len() as u64,
            uploaded_at_ms: now_ms(),
        };
        info.versions.push(v.clone());
        self.write_json(&self.plugin_path(name), &info)?;
        Ok((v, true))
    }

    fn read_plugin(&self, name: &str) -> Result<Option<PluginInfo>, StoreError> {
        read_json(&self.plugin_path(name))
    }

    pub fn list(&self) -> Result<Vec<PluginInfo>, StoreError> {
        let dir = self.dir.join("plugins");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| io_err(&dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(info) = read_json::<PluginInfo>(&path)? {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn plugin(&self, name: &str) -> Result<PluginInfo, StoreError> {
        check_name(name).map_err(|_| StoreError::UnknownPlugin(name.to_string()))?;
        self.read_plugin(name)?
            .ok_or_else(|| StoreError::UnknownPlugin(name.to_string()))
    }

    pub fn version(&self, name: &str, version: u32) -> Result<VersionInfo, StoreError> {
        self.plugin(name)?
            .versions
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| StoreError::UnknownVersion {
                name: name.to_string(),
                version,
            })
    }

    /// The component bytes of a version, checked against their digest.
    pub fn bytes(&self, name: &str, version: u32) -> Result<(VersionInfo, Vec<u8>), StoreError> {
        let v = self.version(name, version)?;
        let path = self.blob_path(&v.sha256);
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        if hex::encode(Sha256::digest(&bytes)) != v.sha256 {
            return Err(StoreError::Io {
                path,
                message: "blob does not match its sha256 (corrupted store)".into(),
            });
        }
        Ok((v, bytes))
    }

    /// Deletes a version unless `in_use` (running shadows, or stages of pipelines) or an
    /// active selection names it. The blob goes once no version references it.
    pub fn delete(
        &self,
        name: &str,
        version: u32,
        in_use: &[String],
    ) -> Result<VersionInfo, StoreError> {
        let _g = self.guard();
        let mut info = self
            .read_plugin(name)?
            .ok_or_else(|| StoreError::UnknownPlugin(name.to_string()))?;
        let Some(pos) = info.versions.iter().position(|v| v.version == version) else {
            return Err(StoreError::UnknownVersion {
                name: name.to_string(),
                version,
            });
        };
        let mut users: Vec<String> = in_use.to_vec();
        for (pipeline, active) in self.all_active()? {
            for (stage, sel) in active.stages {
                if sel
                    .current
                    .as_ref()
                    .is_some_and(|c| c.name == name && c.version == Some(version))
                {
                    users.push(format!("{pipeline}/{stage}"));
                }
            }
        }
        if !users.is_empty() {
            users.sort();
            users.dedup();
            return Err(StoreError::InUse {
                name: name.to_string(),
                version,
                users: users.join(", "),
            });
        }
        let removed = info.versions.remove(pos);
        self.write_json(&self.plugin_path(name), &info)?;
        let still_used = self
            .list()?
            .iter()
            .flat_map(|p| p.versions.iter())
            .any(|v| v.sha256 == removed.sha256);
        if !still_used {
            let blob = self.blob_path(&removed.sha256);
            let _ = std::fs::remove_file(&blob);
        }
        Ok(removed)
    }

    fn all_active(&self) -> Result<Vec<(String, ActiveFile)>, StoreError> {
        let dir = self.dir.join("active");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| io_err(&dir, e))?.path();
            let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(a) = read_json::<ActiveFile>(&path)? {
                    out.push((stem, a));
                }
            }
        }
        Ok(out)
    }

    /// The selection of one stage (default: nothing selected, the pipeline file's plugin runs).
    pub fn selection(&self, pipeline: &str, stage: &str) -> Result<StageSelection, StoreError> {
        let _g = self.guard();
        Ok(read_json::<ActiveFile>(&self.active_path(pipeline))?
            .and_then(|mut a| a.stages.remove(stage))
            .unwrap_or_default())
    }

    /// Makes `plugin` the stage's current plugin; the previous one goes to its history.
    pub fn select(
        &self,
        pipeline: &str,
        stage: &str,
        previous: PluginRef,
        plugin: PluginRef,
    ) -> Result<(), StoreError> {
        self.update(pipeline, stage, |sel| {
            let prev = sel.current.take().unwrap_or(previous);
            if prev != plugin {
                sel.history.push(prev);
                // Keep the history short: rollback goes one step at a time.
                let excess = sel.history.len().saturating_sub(32);
                sel.history.drain(..excess);
            }
            sel.current = Some(plugin);
            sel.since_ms = now_ms();
            Ok(())
        })
    }

    /// Restores a selection exactly (used to undo a `select` the pipeline refused).
    pub fn restore(
        &self,
        pipeline: &str,
        stage: &str,
        sel: StageSelection,
    ) -> Result<(), StoreError> {
        self.update(pipeline, stage, |s| {
            *s = sel;
            Ok(())
        })
    }

    /// Pops the previous plugin of a stage and makes it current; returns it.
    pub fn rollback(&self, pipeline: &str, stage: &str) -> Result<PluginRef, StoreError> {
        let mut out = None;
        self.update(pipeline, stage, |sel| {
            let prev = sel.history.pop().ok_or_else(|| StoreError::NoHistory {
                pipeline: pipeline.to_string(),
                stage: stage.to_string(),
            })?;
            sel.current = Some(prev.clone());
            sel.since_ms = now_ms();
            out = Some(prev);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::NoHistory {
            pipeline: pipeline.to_string(),
            stage: stage.to_string(),
        })
    }

    fn update(
        &self,
        pipeline: &str,
        stage: &str,
        f: impl FnOnce(&mut StageSelection) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _g = self.guard();
        let path = self.active_path(pipeline);
        let mut active = read_json::<ActiveFile>(&path)?.unwrap_or_default();
        let sel = active.stages.entry(stage.to_string()).or_default();
        f(sel)?;
        self.write_json(&path, &active)
    }

    fn write_json<T: Serialize>(&self, path: &Path, v: &T) -> Result<(), StoreError> {
        let data = serde_json::to_vec_pretty(v).map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_atomic(path, &data)
    }
}

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StoreError::Io {
                path: path.to_path_buf(),
                message: format!("unreadable: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Write to a temporary file, fsync, rename: readers see the old or the new file, never half.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(data).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_ref(name: &str) -> PluginRef {
        PluginRef {
            name: name.into(),
            version: None,
            sha256: "f".repeat(64),
        }
    }

    fn stored(name: &str, v: &VersionInfo) -> PluginRef {
        PluginRef {
            name: name.into(),
            version: Some(v.version),
            sha256: v.sha256.clone(),
        }
    }

    #[test]
    fn versions_are_numbered_and_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();
        let (v1, new1) = store.put("enrich", b"one").unwrap();
        let (v2, new2) = store.put("enrich", b"two").unwrap();
        let (again, new3) = store.put("enrich", b"one").unwrap();
        assert_eq!((v1.version, v2.version, new1, new2), (1, 2, true, true));
        assert_eq!((again.version, new3), (1, false));
        assert_eq!(store.bytes("enrich", 2).unwrap().1, b"two");
        // Survives reopening.
        let store = PluginStore::open(dir.path()).unwrap();
        assert_eq!(store.plugin("enrich").unwrap().versions.len(), 2);
        assert!(matches!(
            store.bytes("enrich", 9),
            Err(StoreError::UnknownVersion { .. })
        ));
        assert!(matches!(
            store.put("../x", b"x"),
            Err(StoreError::InvalidName(_))
        ));
    }

    #[test]
    fn select_rollback_and_delete_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = PluginStore::open(dir.path()).unwrap();
        let (v1, _) = store.put("enrich", b"one").unwrap();
        let (v2, _) = store.put("enrich", b"two").unwrap();
        store
            .select("p", "s", file_ref("file"), stored("enrich", &v1))
            .unwrap();
        store
            .select("p", "s", file_ref("file"), stored("enrich", &v2))
            .unwrap();
        let err = store.delete("enrich", 2, &[]).unwrap_err();
        assert!(err.to_string().contains("p/s"), "{err}");
        assert_eq!(store.rollback("p", "s").unwrap().version, Some(1));
        store.delete("enrich", 2, &[]).unwrap();
        assert_eq!(store.rollback("p", "s").unwrap().version, None);
        assert!(matches!(
            store.rollback("p", "s"),
            Err(StoreError::NoHistory { .. })
        ));
        let err = store.delete("enrich", 1, &["p/s (shadow)".into()]);
        assert!(matches!(err, Err(StoreError::InUse { .. })));
    }
}
