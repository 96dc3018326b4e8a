//! Generated answers on disk, one small JSON file per (model checksum, prompt, sampling
//! settings), so that re-judging or re-running an evaluation costs no generation.
use crate::checksum::{hex, write_atomic};
use crate::error::{io_err, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bumped when the way answers are made changes, so that old entries stop matching.
pub const CACHE_FORMAT: u32 = 1;

/// Everything besides the model and the prompt that decides an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenSettings {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub max_new_tokens: i64,
    pub seed: u64,
    pub stop: Vec<String>,
    /// f32, bf16 or f16: the weights' precision changes the numbers.
    pub dtype: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub format: u32,
    pub model: String,
    pub prompt: String,
    pub settings: GenSettings,
    pub text: String,
    pub tokens: usize,
    pub finish_reason: String,
}

pub struct AnswerCache {
    dir: PathBuf,
}

impl AnswerCache {
    /// Answers live under `root/answers/`.
    pub fn new(root: &Path) -> Self {
        AnswerCache { dir: root.join("answers") }
    }

    pub fn key(model: &str, prompt: &str, settings: &GenSettings) -> String {
        let id = serde_json::json!({"format": CACHE_FORMAT, "model": model, "prompt": prompt, "settings": settings});
        hex(&Sha256::digest(id.to_string().as_bytes()))
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The cached answer, if there is a readable one that matches exactly.
    pub fn get(&self, model: &str, prompt: &str, settings: &GenSettings) -> Option<CachedAnswer> {
        let key = Self::key(model, prompt, settings);
        let text = std::fs::read_to_string(self.path(&key)).ok()?;
        let a: CachedAnswer = serde_json::from_str(&text).ok()?;
        (a.format == CACHE_FORMAT && a.model == model && a.prompt == prompt && &a.settings == settings).then_some(a)
    }

    pub fn put(&self, answer: &CachedAnswer) -> Result<()> {
        let key = Self::key(&answer.model, &answer.prompt, &answer.settings);
        let path = self.path(&key);
        let parent = path.parent().expect("cache entries sit in a folder");
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        write_atomic(&path, serde_json::to_string(answer)?.as_bytes())
    }
}
