//! Weights on the wire: building a manifest, cutting a payload into [`WeightChunk`]s and
//! verifying a received payload against its manifest, incrementally, tensor by tensor.
//!
//! A version travels as one manifest chunk followed by data chunks holding the concatenated
//! payload in order. The manifest lists every tensor (name, shape, dtype, byte range, sha256);
//! the tensors tile the payload in manifest order, so the per-tensor digests cover every byte,
//! and the manifest's own sha256 is the digest of those digests ([`manifest_digest`]). Each
//! byte is thus hashed once, and a manifest that does not agree with itself is refused before
//! any payload is read. The publisher (learner), the store (coordinator) and the fetcher
//! (actor) all use the same checks from this module.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use crate::v1::{weight_chunk, TensorInfo, WeightChunk, WeightManifest};
use crate::WEIGHT_CHUNK_BYTES;

/// Payloads at least this long have their tensors hashed on two threads when a version is
/// built; shorter ones are not worth a thread.
pub const PARALLEL_HASH_BYTES: usize = 256 * 1024;

/// Why a manifest or a payload was refused. Every variant about one tensor names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("the weight stream must start with a manifest chunk")]
    NoManifest,
    #[error("the weight stream holds a second manifest chunk")]
    DuplicateManifest,
    #[error("tensor {tensor:?}: {reason}")]
    Tensor { tensor: String, reason: String },
    #[error("manifest field {field}: {reason}")]
    Manifest { field: &'static str, reason: String },
    #[error("the payload is longer than the manifest's total_bytes ({total_bytes})")]
    TooLong { total_bytes: u64 },
    #[error("the payload ended after {received} of {total_bytes} bytes")]
    Truncated { received: u64, total_bytes: u64 },
    #[error("tensor {tensor:?}: sha256 mismatch (manifest {expected}, payload {actual})")]
    TensorChecksum { tensor: String, expected: String, actual: String },
}

impl From<WeightError> for tonic::Status {
    fn from(e: WeightError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The manifest-level sha256: the digest of the tensors' lowercase hex digests concatenated in
/// manifest order. With the tiling rule of [`validate_manifest`] it identifies the payload.
pub fn manifest_digest(tensors: &[TensorInfo]) -> String {
    let mut h = Sha256::new();
    for t in tensors {
        h.update(t.sha256.to_ascii_lowercase().as_bytes());
    }
    hex(&h.finalize())
}

/// Bytes per element of a wire dtype name (case-insensitive), `None` when unknown.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype.to_ascii_lowercase().as_str() {
        "f64" | "i64" | "u64" => 8,
        "f32" | "i32" | "u32" => 4,
        "f16" | "bf16" | "i16" | "u16" => 2,
        "i8" | "u8" | "bool" => 1,
        _ => return None,
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a manifest without any payload (version 0 is the initial model, which a learner
/// publishes when it begins an epoch at step 0; FetchWeights' 0 means "the latest"): sha256 strings well formed, every
/// tensor named once with a known dtype and `nbytes` equal to its shape times the dtype size,
/// the tensors tiling `0..total_bytes` in manifest order (each starts where the previous one
/// ended), and the manifest's sha256 equal to [`manifest_digest`] of its tensors.
pub fn validate_manifest(m: &WeightManifest) -> Result<(), WeightError> {
    if !is_sha256_hex(&m.sha256) {
        return Err(WeightError::Manifest { field: "sha256", reason: format!("{:?} is not 64 hex digits", m.sha256) });
    }
    let mut names = HashSet::new();
    let mut at: u64 = 0;
    for t in &m.tensors {
        let bad = |reason: String| WeightError::Tensor { tensor: t.name.clone(), reason };
        if t.name.is_empty() {
            return Err(bad("empty name".into()));
        }
        if !names.insert(t.name.as_str()) {
            return Err(bad("listed twice".into()));
        }
        let size = dtype_size(&t.dtype).ok_or_else(|| bad(format!("unknown dtype {:?}", t.dtype)))?;
        let mut numel: u64 = 1;
        for &d in &t.shape {
            let d = u64::try_from(d).map_err(|_| bad(format!("negative dimension in {:?}", t.shape)))?;
            numel = numel.checked_mul(d).ok_or_else(|| bad("shape overflows".into()))?;
        }
        let expect = numel.checked_mul(size).ok_or_else(|| bad("shape overflows".into()))?;
        if expect != t.nbytes {
            return Err(bad(format!("nbytes {} but shape {:?} of {} needs {expect}", t.nbytes, t.shape, t.dtype)));
        }
        if t.offset != at {
            return Err(bad(format!(
                "starts at byte {} but the previous tensor ends at {at} (tensors tile the payload in manifest order)",
                t.offset
            )));
        }
        at = at.checked_add(t.nbytes).filter(|&e| e <= m.total_bytes).ok_or_else(|| {
            bad(format!("bytes {}..+{} fall outside total_bytes {}", t.offset, t.nbytes, m.total_bytes))
        })?;
        if !is_sha256_hex(&t.sha256) {
            return Err(bad(format!("sha256 {:?} is not 64 hex digits", t.sha256)));
        }
    }
    if at != m.total_bytes {
        return Err(WeightError::Manifest {
            field: "total_bytes",
            reason: format!("{} but the tensors end at byte {at}", m.total_bytes),
        });
    }
    let digest = manifest_digest(&m.tensors);
    if !m.sha256.eq_ignore_ascii_case(&digest) {
        return Err(WeightError::Manifest {
            field: "sha256",
            reason: format!("{} is not the digest of the tensors' sha256 ({digest})", m.sha256),
        });
    }
    Ok(())
}

/// Verifies a payload against its manifest as it streams in, without keeping it: feed the
/// bytes in order with [`update`](Self::update), then call [`finish`](Self::finish). A
/// tensor's checksum is compared as soon as its last byte arrives, so a bad tensor is refused
/// before the rest of the payload is read. Every byte is hashed once: the manifest's own
/// digest was checked against the tensors' digests by [`validate_manifest`].
pub struct PayloadVerifier {
    total_bytes: u64,
    /// In manifest order, which is payload order: (name, end offset, expected sha256).
    tensors: Vec<(String, u64, String)>,
    next: usize,
    current: Sha256,
    received: u64,
}

impl PayloadVerifier {
    /// Validates the manifest ([`validate_manifest`]) and prepares the checks.
    pub fn new(manifest: &WeightManifest) -> Result<Self, WeightError> {
        validate_manifest(manifest)?;
        let tensors = manifest
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.offset + t.nbytes, t.sha256.to_ascii_lowercase()))
            .collect();
        let mut v = Self { total_bytes: manifest.total_bytes, tensors, next: 0, current: Sha256::new(), received: 0 };
        v.settle()?;
        Ok(v)
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Checks every tensor that ends at the current position (empty ones included).
    fn settle(&mut self) -> Result<(), WeightError> {
        while let Some((name, end, expected)) = self.tensors.get(self.next) {
            if self.received < *end {
                return Ok(());
            }
            let actual = hex(&std::mem::take(&mut self.current).finalize());
            if &actual != expected {
                return Err(WeightError::TensorChecksum { tensor: name.clone(), expected: expected.clone(), actual });
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Feeds the next bytes of the payload.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), WeightError> {
        if self.received + bytes.len() as u64 > self.total_bytes {
            return Err(WeightError::TooLong { total_bytes: self.total_bytes });
        }
        while !bytes.is_empty() {
            // The tensors tile the payload, so the bytes here belong to tensor `next`.
            let end = self.tensors.get(self.next).map_or(self.total_bytes, |t| t.1);
            let take = ((end - self.received) as usize).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.received += take as u64;
            bytes = &bytes[take..];
            self.settle()?;
        }
        Ok(())
    }

    /// Checks that the whole payload arrived (every tensor's checksum was checked on the way).
    pub fn finish(self) -> Result<(), WeightError> {
        if self.received != self.total_bytes || self.next != self.tensors.len() {
            return Err(WeightError::Truncated { received: self.received, total_bytes: self.total_bytes });
        }
        Ok(())
    }
}

/// Builds a version's manifest and payload from tensors appended in order.
#[derive(Default)]
pub struct ManifestBuilder {
    tensors: Vec<TensorInfo>,
    payload: Vec<u8>,
}

impl ManifestBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder whose payload buffer holds `bytes` without growing (growing a buffer of
    /// hundreds of megabytes copies it and touches twice the memory).
    pub fn with_capacity(bytes: usize) -> Self {
        Self { tensors: Vec::new(), payload: Vec::with_capacity(bytes) }
    }

    /// Appends one tensor's bytes (already in the wire dtype, little-endian). Its sha256 is
    /// computed in [`finish`](Self::finish).
    pub fn push(&mut self, name: impl Into<String>, shape: &[i64], dtype: &str, bytes: &[u8]) {
        self.tensors.push(TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: dtype.to_string(),
            offset: self.payload.len() as u64,
            nbytes: bytes.len() as u64,
            sha256: String::new(),
        });
        self.payload.extend_from_slice(bytes);
    }

    /// The manifest (checked with [`validate_manifest`]) and the concatenated payload. The
    /// per-tensor digests are computed on two threads (each takes about half of the bytes).
    pub fn finish(self, version: u64, step: u64) -> Result<(WeightManifest, Vec<u8>), WeightError> {
        let Self { mut tensors, payload } = self;
        let hash = |tensors: &mut [TensorInfo]| {
            for t in tensors.iter_mut() {
                t.sha256 = sha256_hex(&payload[t.offset as usize..(t.offset + t.nbytes) as usize]);
            }
        };
        // The first tensor that starts in the second half of the payload.
        let split = tensors.partition_point(|t| t.offset < payload.len() as u64 / 2);
        if payload.len() < PARALLEL_HASH_BYTES || split == 0 {
            hash(&mut tensors);
        } else {
            let (a, b) = tensors.split_at_mut(split);
            std::thread::scope(|s| {
                s.spawn(|| hash(b));
                hash(a);
            });
        }
        let sha256 = manifest_digest(&tensors);
        let manifest = WeightManifest { version, tensors, total_bytes: payload.len() as u64, sha256, step, epoch: 0 };
        validate_manifest(&manifest)?;
        Ok((manifest, payload))
    }
}

/// The chunks of one version in wire order: the manifest, then the payload in pieces of at
/// most [`WEIGHT_CHUNK_BYTES`] (slices of `payload`, not copies). Wrap it with
/// `tokio_stream::iter` to publish.
pub fn into_chunks(
    manifest: WeightManifest,
    payload: bytes::Bytes,
) -> impl Iterator<Item = WeightChunk> + Send + 'static {
    let total = payload.len();
    let first = std::iter::once(WeightChunk { part: Some(weight_chunk::Part::Manifest(manifest)) });
    let data = (0..total.div_ceil(WEIGHT_CHUNK_BYTES)).map(move |i| {
        let end = ((i + 1) * WEIGHT_CHUNK_BYTES).min(total);
        WeightChunk { part: Some(weight_chunk::Part::Data(payload.slice(i * WEIGHT_CHUNK_BYTES..end))) }
    });
    first.chain(data)
}

/// Reassembles a fetched version from its chunks, verifying every checksum on the way.
#[derive(Default)]
pub struct WeightAssembler {
    manifest: Option<WeightManifest>,
    verifier: Option<PayloadVerifier>,
    payload: Vec<u8>,
    /// The most payload bytes this fetcher accepts (0 = no limit): checked against the
    /// manifest before any memory is reserved.
    limit: u64,
}

impl WeightAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that writes the payload into `buffer`'s memory (for instance the payload
    /// of the previous version): a fetcher that keeps its buffer between versions touches no
    /// fresh memory, which for hundreds of megabytes costs more than the copy itself.
    pub fn with_buffer(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        Self { payload: buffer, ..Self::default() }
    }

    /// Refuses a manifest announcing more than `bytes` of payload (checked before anything is
    /// reserved). A fetcher knows its model's size; a bigger payload is not meant for it.
    pub fn with_limit(mut self, bytes: u64) -> Self {
        self.limit = bytes;
        self
    }

    /// The manifest once the first chunk arrived.
    pub fn manifest(&self) -> Option<&WeightManifest> {
        self.manifest.as_ref()
    }

    /// Feeds one chunk (the manifest first).
    pub fn push(&mut self, chunk: WeightChunk) -> Result<(), WeightError> {
        match (chunk.part, self.verifier.as_mut()) {
            (Some(weight_chunk::Part::Manifest(m)), None) => {
                if self.limit > 0 && m.total_bytes > self.limit {
                    return Err(WeightError::Manifest {
                        field: "total_bytes",
                        reason: format!("{} bytes is more than this model's {} bytes", m.total_bytes, self.limit),
                    });
                }
                let verifier = PayloadVerifier::new(&m)?;
                self.payload.clear();
                // Fallible: a manifest may announce more than this machine can hold (a
                // fetcher without a limit), which is an error for this version, not an abort.
                let want = usize::try_from(m.total_bytes).unwrap_or(usize::MAX);
                self.payload.try_reserve_exact(want).map_err(|_| WeightError::Manifest {
                    field: "total_bytes",
                    reason: format!("cannot reserve {} bytes for the payload", m.total_bytes),
                })?;
                self.verifier = Some(verifier);
                self.manifest = Some(m);
                Ok(())
            }
            (Some(weight_chunk::Part::Manifest(_)), Some(_)) => Err(WeightError::DuplicateManifest),
            (_, None) => Err(WeightError::NoManifest),
            (Some(weight_chunk::Part::Data(d)), Some(v)) => {
                v.update(&d)?;
                self.payload.extend_from_slice(&d);
                Ok(())
            }
            (None, Some(_)) => Ok(()),
        }
    }

    /// The verified manifest and payload.
    pub fn finish(self) -> Result<(WeightManifest, Vec<u8>), WeightError> {
        let (Some(manifest), Some(verifier)) = (self.manifest, self.verifier) else {
            return Err(WeightError::NoManifest);
        };
        verifier.finish()?;
        Ok((manifest, self.payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (WeightManifest, Vec<u8>) {
        let mut b = ManifestBuilder::new();
        b.push("a", &[2, 3], "f32", &[1u8; 24]);
        b.push("empty", &[0], "bf16", &[]);
        b.push("b", &[5], "bf16", &[7u8; 10]);
        b.finish(3, 9).unwrap()
    }

    #[test]
    fn a_payload_larger_than_the_fetcher_allows_is_refused_before_any_reserve() {
        let (m, p) = sample();
        let mut asm = WeightAssembler::new().with_limit(m.total_bytes - 1);
        let err = asm.push(WeightChunk { part: Some(weight_chunk::Part::Manifest(m.clone())) }).unwrap_err();
        assert!(err.to_string().contains("total_bytes"), "{err}");
        assert_eq!(asm.payload.capacity(), 0);
        // At the limit it is taken.
        let mut asm = WeightAssembler::new().with_limit(m.total_bytes);
        for c in into_chunks(m.clone(), p.into()) {
            asm.push(c).unwrap();
        }
        assert_eq!(asm.finish().unwrap().0, m);
    }

    #[test]
    fn round_trip_in_odd_pieces() {
        let (m, p) = sample();
        let mut v = PayloadVerifier::new(&m).unwrap();
        for piece in p.chunks(5) {
            v.update(piece).unwrap();
        }
        v.finish().unwrap();
        let mut a = WeightAssembler::new();
        for c in into_chunks(m.clone(), p.clone().into()) {
            a.push(c).unwrap();
        }
        assert_eq!(a.finish().unwrap(), (m, p));
    }

    #[test]
    fn a_bad_tensor_is_named() {
        let (m, mut p) = sample();
        p[30] ^= 1; // inside "b"
        let mut v = PayloadVerifier::new(&m).unwrap();
        let err = v.update(&p).unwrap_err();
        assert!(matches!(&err, WeightError::TensorChecksum { tensor, .. } if tensor == "b"), "{err}");
    }

    #[test]
    fn layout_errors() {
        let (m, _) = sample();
        let mut bad = m.clone();
        bad.tensors[0].nbytes = 20;
        assert!(matches!(validate_manifest(&bad), Err(WeightError::Tensor { tensor, .. }) if tensor == "a"));
        let mut bad = m.clone();
        bad.tensors[2].offset = 20;
        assert!(matches!(validate_manifest(&bad), Err(WeightError::Tensor { .. })));
        let mut bad = m.clone();
        bad.tensors[2].dtype = "q4".into();
        assert!(validate_manifest(&bad).unwrap_err().to_string().contains("unknown dtype"));
        let mut bad = m;
        bad.sha256 = "xyz".into();
        assert!(validate_manifest(&bad).is_err());
    }

    #[test]
    fn truncation_and_overflow() {
        let (m, p) = sample();
        let mut v = PayloadVerifier::new(&m).unwrap();
        v.update(&p[..10]).unwrap();
        assert!(matches!(v.finish(), Err(WeightError::Truncated { .. })));
        let mut v = PayloadVerifier::new(&m).unwrap();
        let mut longer = p.clone();
        longer.push(0);
        assert!(matches!(v.update(&longer), Err(WeightError::TooLong { .. })));
    }

    #[test]
    fn large_versions_are_hashed_on_two_threads() {
        // Above PARALLEL_HASH_BYTES the builder hashes the two halves' tensors on two threads.
        let big: Vec<u8> = (0..PARALLEL_HASH_BYTES + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        let mut b = ManifestBuilder::with_capacity(2 * big.len() + 8);
        b.push("x", &[big.len() as i64], "u8", &big);
        b.push("small", &[2], "f32", &[3u8; 8]);
        b.push("y", &[big.len() as i64], "u8", &big);
        let (m, p) = b.finish(1, 1).unwrap();
        assert_eq!(m.tensors[0].sha256, sha256_hex(&big));
        assert_eq!(m.tensors[1].sha256, sha256_hex(&[3u8; 8]));
        assert_eq!(m.tensors[2].sha256, sha256_hex(&big));
        assert_eq!(m.sha256, manifest_digest(&m.tensors));
        let mut v = PayloadVerifier::new(&m).unwrap();
        v.update(&p).unwrap();
        v.finish().unwrap();
        let mut bad = p.clone();
        bad[p.len() - 1] ^= 1; // inside "y"
        let err = PayloadVerifier::new(&m).unwrap().update(&bad).unwrap_err();
        assert!(matches!(&err, WeightError::TensorChecksum { tensor, .. } if tensor == "y"), "{err}");
        // Reassembling into a reused buffer gives the same payload.
        let mut a = WeightAssembler::with_buffer(vec![9u8; 100]);
        for c in into_chunks(m.clone(), p.clone().into()) {
            a.push(c).unwrap();
        }
        let (_, again) = a.finish().unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn the_manifest_digest_must_agree_with_the_tensors() {
        let (m, _) = sample();
        let mut wrong = m.clone();
        wrong.sha256 = "0".repeat(64);
        let err = PayloadVerifier::new(&wrong).err().unwrap();
        assert!(matches!(err, WeightError::Manifest { field: "sha256", .. }), "{err}");
        // A changed tensor digest changes the manifest digest.
        let mut other = m.clone();
        other.tensors[0].sha256 = sha256_hex(b"x");
        assert_ne!(manifest_digest(&other.tensors), m.sha256);
        assert!(validate_manifest(&other).is_err());
    }

    #[test]
    fn tensors_must_tile_the_payload() {
        let t = |name: &str, offset, nbytes| TensorInfo {
            name: name.into(),
            shape: vec![nbytes as i64],
            dtype: "u8".into(),
            offset,
            nbytes,
            sha256: sha256_hex(b""),
        };
        let manifest = |tensors: Vec<TensorInfo>, total_bytes| {
            let sha256 = manifest_digest(&tensors);
            WeightManifest { version: 1, tensors, total_bytes, sha256, step: 0, epoch: 0 }
        };
        // A gap before the first tensor, between two, after the last; out of order.
        for (m, what) in [
            (manifest(vec![t("a", 4, 4)], 8), "starts at byte 4"),
            (manifest(vec![t("a", 0, 2), t("b", 4, 4)], 8), "starts at byte 4"),
            (manifest(vec![t("a", 0, 4)], 8), "tensors end at byte 4"),
            (manifest(vec![t("b", 4, 4), t("a", 0, 4)], 8), "starts at byte 4"),
        ] {
            let err = validate_manifest(&m).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        assert!(validate_manifest(&manifest(vec![t("a", 0, 4), t("e", 4, 0), t("b", 4, 4)], 8)).is_ok());
    }
}
