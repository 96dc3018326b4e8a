//! Model checksums for the answer cache: sha256 over the weight files (model.safetensors, or
//! model.safetensors.index.json and the shards it names) and the small files that change what
//! the model writes (config, generation config, tokenizer, chat template). Weight-file hashes
//! are remembered by (path, size, mtime) so that an unchanged checkpoint is not re-read.
use crate::error::{io_err, EvalError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Small files that shape generation, hashed whenever present.
const SIDE_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelChecksum {
    /// sha256 over every weight and side file (name and content hash).
    pub checksum: String,
    /// sha256 of each weight file, by file name.
    pub weights: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Remembered {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// The weight files of a model directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(EvalError::Input(format!("model directory {} not found", dir.display())));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EvalError::Input(format!("{}: {e}", index.display())))?;
        let shards: BTreeSet<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EvalError::Input(format!("{}: no weight_map", index.display())))?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        let mut files = vec![index];
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(EvalError::Input(format!("{}: shard {s} is missing", dir.display())));
            }
            files.push(p);
        }
        return Ok(files);
    }
    Err(EvalError::Input(format!(
        "{} holds no model.safetensors or model.safetensors.index.json: not a model directory",
        dir.display()
    )))
}

/// The checksum of a model directory. `memo` is a JSON file remembering weight-file hashes.
pub fn model_checksum(dir: &Path, memo: &Path) -> Result<ModelChecksum> {
    let files = weight_files(dir)?;
    let mut remembered: BTreeMap<String, Remembered> =
        std::fs::read_to_string(memo).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let mut changed = false;
    let mut weights = BTreeMap::new();
    for f in &files {
        let meta = std::fs::metadata(f).map_err(io_err(f))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()).display().to_string();
        let sha = match remembered.get(&key) {
            Some(r) if r.size == meta.len() && r.mtime_ns == mtime_ns => r.sha256.clone(),
            _ => {
                let sha = sha256_file(f)?;
                remembered.insert(key, Remembered { size: meta.len(), mtime_ns, sha256: sha.clone() });
                changed = true;
                sha
            }
        };
        weights.insert(file_name(f), sha);
    }
    if changed {
        if let Some(parent) = memo.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        write_atomic(memo, serde_json::to_string_pretty(&remembered)?.as_bytes())?;
    }
    let mut h = Sha256::new();
    for (name, sha) in &weights {
        h.update(format!("{name}\0{sha}\n"));
    }
    for name in SIDE_FILES {
        let p = dir.join(name);
        if let Ok(bytes) = std::fs::read(&p) {
            h.update(format!("{name}\0{}\n", hex(&Sha256::digest(&bytes))));
        }
    }
    Ok(ModelChecksum { checksum: hex(&h.finalize()), weights })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Writes through a temporary file and a rename, so that readers never see half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
