//! The weight store: the versions the learner published, on disk under
//! `<state_dir>/weights/` as `v<N>.bin` (the payload) and `v<N>.json` (its manifest), the
//! latest `keep` of them.
//!
//! A payload is verified while it streams in (every tensor's sha256, which together cover every byte,
//! [`selfplay_proto::weights::PayloadVerifier`]) and written to a temporary file; only a
//! payload that verifies is fsynced and renamed into place, then its manifest is written the
//! same way. A version exists once its manifest does, so a crash mid-publish leaves nothing
//! behind but a temporary file, which the next start removes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use selfplay_proto::v1::{TensorInfo, WeightManifest};
use selfplay_proto::weights::{PayloadVerifier, WeightError};
use serde::{Deserialize, Serialize};

use crate::persist::{self, TMP_SUFFIX};

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum WeightStoreError {
    #[error(transparent)]
    Invalid(#[from] WeightError),
    #[error(
        "weights version {version} is older than every kept version (oldest kept {oldest}, \
         keeping {keep})"
    )]
    TooOld { version: u64, oldest: u64, keep: usize },
    #[error("no weights version has been published yet")]
    NoneYet,
    #[error("weights version {version} is not stored (kept: {kept:?})")]
    NotFound { version: u64, kept: Vec<u64> },
    #[error(
        "{}: version {version} of epoch {epoch} arrived after epoch {fence} began",
        selfplay_proto::error::SUPERSEDED_EPOCH
    )]
    Superseded { version: u64, epoch: u64, fence: u64 },
    #[error("weight store: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl WeightStoreError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

impl From<WeightStoreError> for tonic::Status {
    fn from(e: WeightStoreError) -> Self {
        let msg = e.to_string();
        match e {
            WeightStoreError::Invalid(_) => tonic::Status::invalid_argument(msg),
            WeightStoreError::TooOld { .. } | WeightStoreError::Superseded { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            WeightStoreError::NoneYet | WeightStoreError::NotFound { .. } => tonic::Status::not_found(msg),
            WeightStoreError::Io { .. } => tonic::Status::internal(msg),
        }
    }
}

/// The manifest as stored beside its payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    version: u64,
    step: u64,
    #[serde(default)]
    epoch: u64,
    total_bytes: u64,
    sha256: String,
    tensors: Vec<TensorFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorFile {
    name: String,
    shape: Vec<i64>,
    dtype: String,
    offset: u64,
    nbytes: u64,
    sha256: String,
}

impl From<&WeightManifest> for ManifestFile {
    fn from(m: &WeightManifest) -> Self {
        Self {
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            total_bytes: m.total_bytes,
            sha256: m.sha256.clone(),
            tensors: m
                .tensors
                .iter()
                .map(|t| TensorFile {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: t.dtype.clone(),
                    offset: t.offset,
                    nbytes: t.nbytes,
                    sha256: t.sha256.clone(),
                })
                .collect(),
        }
    }
}

impl From<ManifestFile> for WeightManifest {
    fn from(m: ManifestFile) -> Self {
        Self {
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            total_bytes: m.total_bytes,
            sha256: m.sha256,
            tensors: m
                .tensors
                .into_iter()
                .map(|t| TensorInfo {
                    name: t.name,
                    shape: t.shape,
                    dtype: t.dtype,
                    offset: t.offset,
                    nbytes: t.nbytes,
                    sha256: t.sha256,
                })
                .collect(),
        }
    }
}

/// One stored version. Holds its payload file open, so a fetch in progress keeps working
/// when the version is pruned or replaced meanwhile. Chunks are read with `pread`, not from a
/// memory map: a payload file truncated or damaged under the coordinator then fails the fetch
/// with an I/O error instead of killing the process with SIGBUS.
#[derive(Debug)]
pub struct StoredVersion {
    manifest: WeightManifest,
    file: File,
}

impl StoredVersion {
    fn new(manifest: WeightManifest, file: File) -> Self {
        Self { manifest, file }
    }

    pub fn manifest(&self) -> &WeightManifest {
        &self.manifest
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    pub fn total_bytes(&self) -> u64 {
        self.manifest.total_bytes
    }

    /// `len` payload bytes from `offset` (a blocking read: call it off the async runtime).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        read_exact_at(&self.file, &mut buf, offset)?;
        Ok(buf)
    }

    /// `len` payload bytes from `offset` as a chunk for the wire (a blocking read).
    pub fn chunk(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        offset.checked_add(len as u64).filter(|&e| e <= self.manifest.total_bytes).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("bytes {offset}..+{len} past the payload's end"))
        })?;
        self.read_at(offset, len).map(bytes::Bytes::from)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new version is stored.
    Stored,
    /// The same version with the same payload was stored already: nothing changed.
    AlreadyStored,
    /// The version existed with another payload (the learner restarted and re-derived it):
    /// the new payload replaced it.
    Replaced,
}

/// The store. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct WeightStore {
    dir: PathBuf,
    keep: usize,
    max_bytes: u64,
    /// The current learner epoch: a version of an older epoch is never stored. Held across
    /// a commit's rename and insert and across an epoch's drop of newer versions, so an
    /// upload of a dead learner that was already past every check cannot land after the new
    /// epoch dropped the future it belongs to.
    fence: std::sync::Mutex<u64>,
    versions: RwLock<BTreeMap<u64, Arc<StoredVersion>>>,
}

fn payload_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("v{version}.bin"))
}

fn manifest_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("v{version}.json"))
}

fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let n = name.strip_prefix('v')?.strip_suffix(ext)?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok()).flatten()
}

impl WeightStore {
    /// Opens (creating it if needed) the store in `dir`, keeping the latest `keep` versions
    /// (at least 1). Temporary files and payloads without a manifest are removed; a version
    /// whose payload is missing or has the wrong size is dropped with a warning.
    pub fn open(dir: impl Into<PathBuf>, keep: usize) -> Result<Self, WeightStoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(WeightStoreError::io(format!("create {}", dir.display())))?;
        let mut manifests = Vec::new();
        let mut payloads = Vec::new();
        let entries = fs::read_dir(&dir).map_err(WeightStoreError::io(format!("list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(WeightStoreError::io(format!("list {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TMP_SUFFIX) {
                tracing::info!(file = %entry.path().display(), "removing an unfinished upload");
                let _ = fs::remove_file(entry.path());
            } else if let Some(v) = parse_name(&name, ".json") {
                manifests.push(v);
            } else if let Some(v) = parse_name(&name, ".bin") {
                payloads.push(v);
            }
        }
        let mut versions = BTreeMap::new();
        for v in manifests {
            match Self::load_version(&dir, v) {
                Ok(stored) => {
                    versions.insert(v, Arc::new(stored));
                }
                Err(e) => {
                    tracing::warn!(version = v, error = %e, "dropping a stored weights version");
                    let _ = fs::remove_file(manifest_path(&dir, v));
                    let _ = fs::remove_file(payload_path(&dir, v));
                }
            }
        }
        for v in payloads {
            if !versions.contains_key(&v) {
                let _ = fs::remove_file(payload_path(&dir, v));
            }
        }
        let store = Self {
            dir,
            keep: keep.max(1),
            max_bytes: u64::MAX,
            fence: std::sync::Mutex::new(0),
            versions: RwLock::new(versions),
        };
        store.prune();
        Ok(store)
    }

    fn load_version(dir: &Path, v: u64) -> Result<StoredVersion, String> {
        let text = fs::read(manifest_path(dir, v)).map_err(|e| e.to_string())?;
        let m: ManifestFile = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        let manifest = WeightManifest::from(m);
        if manifest.version != v {
            return Err(format!("the manifest says version {}", manifest.version));
        }
        selfplay_proto::weights::validate_manifest(&manifest).map_err(|e| e.to_string())?;
        let file = File::open(payload_path(dir, v)).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len != manifest.total_bytes {
            return Err(format!("payload holds {len} bytes, the manifest {}", manifest.total_bytes));
        }
        // Every byte against its tensor's digest: a payload damaged on disk (bit rot, a
        // partial copy) is dropped here instead of being served forever.
        let mut verifier = PayloadVerifier::new(&manifest).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0u64;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            read_exact_at(&file, &mut buf[..n], at).map_err(|e| e.to_string())?;
            verifier.update(&buf[..n]).map_err(|e| e.to_string())?;
            at += n as u64;
        }
        verifier.finish().map_err(|e| e.to_string())?;
        Ok(StoredVersion::new(manifest, file))
    }

    /// Refuses publishes announcing more than `bytes` of payload.
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Stored versions, oldest first.
    pub fn versions(&self) -> Vec<u64> {
        self.versions.read().unwrap().keys().copied().collect()
    }

    /// The newest stored version, 0 when none.
    pub fn latest_version(&self) -> u64 {
        self.versions.read().unwrap().keys().next_back().copied().unwrap_or(0)
    }

    /// A stored version; 0 means the latest.
    pub fn get(&self, version: u64) -> Result<Arc<StoredVersion>, WeightStoreError> {
        let versions = self.versions.read().unwrap();
        let found = if version == 0 { versions.values().next_back() } else { versions.get(&version) };
        match found {
            Some(v) => Ok(v.clone()),
            None if version == 0 => Err(WeightStoreError::NoneYet),
            None => Err(WeightStoreError::NotFound { version, kept: versions.keys().copied().collect() }),
        }
    }

    fn check_not_too_old(&self, version: u64) -> Result<(), WeightStoreError> {
        let versions = self.versions.read().unwrap();
        if versions.len() >= self.keep && !versions.contains_key(&version) {
            let oldest = versions.keys().next().copied().unwrap_or(0);
            if version < oldest {
                return Err(WeightStoreError::TooOld { version, oldest, keep: self.keep });
            }
        }
        Ok(())
    }

    /// Starts receiving a version: checks the manifest and opens a temporary file.
    pub fn begin(&self, manifest: WeightManifest) -> Result<Upload, WeightStoreError> {
        if manifest.total_bytes > self.max_bytes {
            return Err(WeightStoreError::Invalid(WeightError::Manifest {
                field: "total_bytes",
                reason: format!(
                    "{} bytes is more than this coordinator accepts ({})",
                    manifest.total_bytes, self.max_bytes
                ),
            }));
        }
        let verifier = PayloadVerifier::new(&manifest)?;
        self.check_not_too_old(manifest.version)?;
        let tmp = persist::temp_path(&payload_path(&self.dir, manifest.version));
        let file = File::create(&tmp).map_err(WeightStoreError::io(format!("create {}", tmp.display())))?;
        Ok(Upload { manifest, verifier: Some(verifier), file: Some(file), tmp })
    }

    /// Receives a whole version at once (tests, in-process publishers).
    pub fn publish(&self, manifest: WeightManifest, payload: &[u8]) -> Result<PublishOutcome, WeightStoreError> {
        let mut upload = self.begin(manifest)?;
        for piece in payload.chunks(selfplay_proto::WEIGHT_CHUNK_BYTES) {
            upload.write(piece)?;
        }
        upload.commit(self)
    }

    /// The epoch the store starts at (from the coordinator's snapshot).
    pub fn set_fence(&self, epoch: u64) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = epoch;
    }

    /// Learner epoch `epoch` begins at `version`: versions of older epochs are refused from
    /// now on and every version newer than `version` is dropped. Returns the versions dropped.
    pub fn begin_epoch(&self, epoch: u64, version: u64) -> Vec<u64> {
        let mut fence = self.fence.lock().unwrap_or_else(|e| e.into_inner());
        *fence = (*fence).max(epoch);
        self.drop_newer_than(version)
    }

    /// Drops every version newer than `version` (a learner restarted from an older checkpoint:
    /// they belong to a future that no longer happens). Returns the versions dropped.
    fn drop_newer_than(&self, version: u64) -> Vec<u64> {
        let removed: Vec<u64> = {
            let mut versions = self.versions.write().unwrap();
            let newer: Vec<u64> = versions.range(version + 1..).map(|(&v, _)| v).collect();
            for v in &newer {
                versions.remove(v);
            }
            newer
        };
        for &v in &removed {
            let _ = fs::remove_file(manifest_path(&self.dir, v));
            let _ = fs::remove_file(payload_path(&self.dir, v));
            tracing::info!(version = v, "dropped a superseded weights version");
        }
        if !removed.is_empty() {
            let _ = persist::sync_dir(&self.dir);
        }
        removed
    }

    /// Drops the versions beyond the newest `keep`.
    fn prune(&self) {
        let removed: Vec<u64> = {
            let mut versions = self.versions.write().unwrap();
            let excess = versions.len().saturating_sub(self.keep);
            let old: Vec<u64> = versions.keys().take(excess).copied().collect();
            for v in &old {
                versions.remove(v);
            }
            old
        };
        for v in removed {
            // The manifest first: without it the version no longer exists.
            let _ = fs::remove_file(manifest_path(&self.dir, v));
            let _ = fs::remove_file(payload_path(&self.dir, v));
            tracing::info!(version = v, "pruned weights version");
        }
    }
}

/// A version being received. Dropping it before [`commit`](Self::commit) removes its
/// temporary file and stores nothing.
pub struct Upload {
    manifest: WeightManifest,
    verifier: Option<PayloadVerifier>,
    file: Option<File>,
    tmp: PathBuf,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("version", &self.manifest.version)
            .field("received", &self.received())
            .field("tmp", &self.tmp)
            .finish()
    }
}

impl Upload {
    pub fn manifest(&self) -> &WeightManifest {
        &self.manifest
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.verifier.as_ref().map_or(0, |v| v.received())
    }

    /// Verifies and writes the next payload bytes (blocking I/O).
    pub fn write(&mut self, data: &[u8]) -> Result<(), WeightStoreError> {
        self.verifier.as_mut().expect("upload already finished").update(data)?;
        self.file
            .as_mut()
            .expect("upload already finished")
            .write_all(data)
            .map_err(WeightStoreError::io(format!("write {}", self.tmp.display())))
    }

    /// Checks that the payload is complete and matches, makes it durable and stores the
    /// version (blocking I/O). On error nothing is stored.
    pub fn commit(mut self, store: &WeightStore) -> Result<PublishOutcome, WeightStoreError> {
        self.verifier.take().expect("upload already finished").finish()?;
        let file = self.file.take().expect("upload already finished");
        file.sync_all().map_err(WeightStoreError::io(format!("fsync {}", self.tmp.display())))?;
        drop(file);
        let version = self.manifest.version;
        let fence = store.fence.lock().unwrap_or_else(|e| e.into_inner());
        if self.manifest.epoch < *fence {
            return Err(WeightStoreError::Superseded { version, epoch: self.manifest.epoch, fence: *fence });
        }
        store.check_not_too_old(version)?;
        let previous = store.versions.read().unwrap().get(&version).cloned();
        let outcome = match previous {
            Some(p)
                if p.manifest.sha256.eq_ignore_ascii_case(&self.manifest.sha256)
                    && p.manifest.epoch == self.manifest.epoch =>
            {
                // Drop removes the temporary file.
                return Ok(PublishOutcome::AlreadyStored);
            }
            Some(_) => PublishOutcome::Replaced,
            None => PublishOutcome::Stored,
        };
        // A resumed learner re-publishes its checkpoint's version in its new epoch: the same
        // bytes, nothing to warn about.
        let epoch = self.manifest.epoch;
        let same_bytes =
            previous.as_ref().is_some_and(|p| p.manifest.sha256.eq_ignore_ascii_case(&self.manifest.sha256));
        let dir = store.dir.clone();
        let bin = payload_path(&dir, version);
        if outcome == PublishOutcome::Replaced {
            // Without its manifest the old version is gone from disk before its payload is
            // overwritten, so a crash in between cannot pair the old manifest with new bytes.
            fs::remove_file(manifest_path(&dir, version))
                .map_err(WeightStoreError::io(format!("remove the manifest of version {version}")))?;
        }
        fs::rename(&self.tmp, &bin).map_err(WeightStoreError::io(format!("rename to {}", bin.display())))?;
        let json = serde_json::to_vec_pretty(&ManifestFile::from(&self.manifest)).expect("a manifest serializes");
        persist::write_atomic(&manifest_path(&dir, version), &json)
            .map_err(WeightStoreError::io(format!("write the manifest of version {version}")))?;
        let file = File::open(&bin).map_err(WeightStoreError::io(format!("open {}", bin.display())))?;
        let stored = Arc::new(StoredVersion::new(std::mem::take(&mut self.manifest), file));
        store.versions.write().unwrap().insert(version, stored);
        store.prune();
        if outcome == PublishOutcome::Replaced && same_bytes {
            tracing::info!(version, epoch, "weights version re-published by a new learner epoch (same bytes)");
        } else if outcome == PublishOutcome::Replaced {
            tracing::warn!(version, "weights version replaced by a different payload");
        }
        Ok(outcome)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // After a successful commit the temporary path no longer exists.
        self.file.take();
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfplay_proto::weights::ManifestBuilder;

    fn version(v: u64, fill: u8) -> (WeightManifest, Vec<u8>) {
        let mut b = ManifestBuilder::new();
        b.push("w", &[8, 4], "f32", &[fill; 128]);
        b.push("b", &[4], "bf16", &[fill.wrapping_add(1); 8]);
        b.finish(v, v * 10).unwrap()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_publish_larger_than_the_limit_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (m, p) = version(1, 3);
        let store = WeightStore::open(dir.path(), 2).unwrap().with_max_bytes(m.total_bytes - 1);
        assert!(matches!(store.publish(m.clone(), &p), Err(WeightStoreError::Invalid(_))));
        assert!(files(dir.path()).is_empty());
        let store = store.with_max_bytes(m.total_bytes);
        assert_eq!(store.publish(m, &p).unwrap(), PublishOutcome::Stored);
    }

    #[test]
    fn an_upload_of_a_superseded_epoch_never_lands() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 4).unwrap();
        store.set_fence(1);
        let (mut m, p) = version(3, 1);
        m.epoch = 1;
        // The old learner's upload passed every check and is about to commit...
        let mut up = store.begin(m).unwrap();
        up.write(&p).unwrap();
        // ...when a restarted learner begins epoch 2 at version 2.
        assert!(store.begin_epoch(2, 2).is_empty());
        assert!(matches!(up.commit(&store), Err(WeightStoreError::Superseded { version: 3, epoch: 1, fence: 2 })));
        assert!(store.versions().is_empty());
        assert!(files(dir.path()).is_empty(), "no file of the refused upload is left");
    }

    #[test]
    fn a_damaged_payload_fails_reads_and_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 2).unwrap();
        let (m, p) = version(1, 7);
        store.publish(m, &p).unwrap();
        let v = store.get(1).unwrap();
        // Truncated under the running store: the read fails, nothing crashes.
        let bin = dir.path().join("v1.bin");
        fs::OpenOptions::new().write(true).open(&bin).unwrap().set_len(10).unwrap();
        assert!(v.chunk(0, v.total_bytes() as usize).is_err());
        // Same size, one bit flipped: the next open verifies every byte and drops it.
        fs::write(&bin, {
            let mut q = p.clone();
            q[5] ^= 1;
            q
        })
        .unwrap();
        drop((v, store));
        let store = WeightStore::open(dir.path(), 2).unwrap();
        assert!(store.versions().is_empty());
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn keeps_the_latest_versions_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 2).unwrap();
        assert!(matches!(store.get(0), Err(WeightStoreError::NoneYet)));
        for v in 1..=3 {
            let (m, p) = version(v, v as u8);
            assert_eq!(store.publish(m, &p).unwrap(), PublishOutcome::Stored);
        }
        assert_eq!(store.versions(), [2, 3]);
        assert_eq!(files(dir.path()), ["v2.bin", "v2.json", "v3.bin", "v3.json"]);
        let latest = store.get(0).unwrap();
        assert_eq!(latest.version(), 3);
        assert_eq!(latest.read_at(0, 4).unwrap(), [3u8; 4]);
        assert!(matches!(store.get(1), Err(WeightStoreError::NotFound { version: 1, .. })));
        // Older than everything kept: refused.
        let (m, p) = version(1, 1);
        assert!(matches!(store.publish(m, &p), Err(WeightStoreError::TooOld { .. })));
        // Same version, same payload: nothing changes.
        let (m, p) = version(3, 3);
        assert_eq!(store.publish(m, &p).unwrap(), PublishOutcome::AlreadyStored);
        drop(store);
        fs::write(dir.path().join("v9.bin.123-4.tmp"), b"debris").unwrap();
        fs::write(dir.path().join("v7.bin"), b"orphan").unwrap();
        let store = WeightStore::open(dir.path(), 2).unwrap();
        assert_eq!(store.versions(), [2, 3]);
        assert_eq!(store.get(2).unwrap().manifest(), &version(2, 2).0);
        assert_eq!(files(dir.path()), ["v2.bin", "v2.json", "v3.bin", "v3.json"]);
    }

    #[test]
    fn a_bad_payload_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 2).unwrap();
        let (m, mut p) = version(1, 1);
        p[130] ^= 0xff; // inside tensor "b"
        let err = store.publish(m.clone(), &p).unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
        let mut wrong = m.clone();
        wrong.sha256 = "0".repeat(64);
        let (_, good) = version(1, 1);
        assert!(matches!(
            store.publish(wrong, &good),
            Err(WeightStoreError::Invalid(WeightError::Manifest { field: "sha256", .. }))
        ));
        assert!(matches!(store.publish(m, &good[..10]), Err(WeightStoreError::Invalid(WeightError::Truncated { .. }))));
        assert!(store.versions().is_empty());
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    #[test]
    fn a_bad_large_payload_stores_nothing() {
        // Pieces above PARALLEL_HASH_BYTES are verified on two threads.
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 2).unwrap();
        let n = 2 * selfplay_proto::WEIGHT_CHUNK_BYTES + 100;
        let big: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        let mut b = ManifestBuilder::new();
        b.push("big", &[n as i64], "u8", &big);
        let (m, p) = b.finish(1, 1).unwrap();
        let mut bad = p.clone();
        bad[n / 2] ^= 1;
        assert!(store.publish(m.clone(), &bad).is_err());
        assert!(store.versions().is_empty());
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        assert_eq!(store.publish(m, &p).unwrap(), PublishOutcome::Stored);
        let stored = store.get(1).unwrap();
        assert_eq!(stored.read_at(0, n).unwrap(), p);
        // Fetches send slices of the mapped payload.
        assert_eq!(stored.chunk(0, n).unwrap(), p);
        assert_eq!(stored.chunk(7, 9).unwrap(), p[7..16]);
        assert!(stored.chunk(n as u64 - 1, 2).is_err(), "a chunk past the end");
    }

    #[test]
    fn replacing_keeps_open_readers_working() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(dir.path(), 1).unwrap();
        let (m, p) = version(1, 1);
        store.publish(m, &p).unwrap();
        let reader = store.get(1).unwrap();
        let (m, p) = version(1, 9);
        assert_eq!(store.publish(m, &p).unwrap(), PublishOutcome::Replaced);
        assert_eq!(reader.read_at(0, 2).unwrap(), [1, 1]);
        assert_eq!(reader.chunk(0, 2).unwrap(), [1u8, 1][..]);
        assert_eq!(store.get(1).unwrap().read_at(0, 2).unwrap(), [9, 9]);
        assert_eq!(store.get(1).unwrap().chunk(0, 2).unwrap(), [9u8, 9][..]);
        let (m, p) = version(2, 2);
        store.publish(m, &p).unwrap();
        assert_eq!(store.versions(), [2]);
    }
}
