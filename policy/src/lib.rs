//! The language model of selfplay: Hugging Face Llama-family checkpoints in tch, with the
//! tokenizer and chat template, batched sampling with a KV cache, exact token log-probs for
//! the learner, reward-model scoring, and GGUF import.
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod scoring;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{PolicyError, Result};
pub use generate::{Completion, FinishReason, SamplingConfig};
pub use model::Llama;
pub use tokenizer::{ChatMessage, Tokenizer};

use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Parses "cpu", "cuda" or "cuda:N".
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(PolicyError::Device(s.into(), "expected cpu, cuda or cuda:N".into())),
        },
    };
    let n = tch::Cuda::device_count() as usize;
    match dev {
        Device::Cuda(i) if i >= n => {
            Err(PolicyError::Device(s.into(), format!("{n} CUDA device(s) visible to libtorch")))
        }
        d => Ok(d),
    }
}

/// Parses "f32", "bf16" or "f16" (also the torch names).
pub fn parse_kind(s: &str) -> Result<Kind> {
    match s.trim() {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        other => Err(PolicyError::InvalidInput(format!("unknown dtype {other:?} (f32, bf16, f16)"))),
    }
}

/// A causal language model together with its tokenizer: what the actors and the learner hold.
pub struct Policy {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<i64>,
    pub dir: PathBuf,
}

impl Policy {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.is_dir() {
            return Err(PolicyError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            });
        }
        let model = Llama::load(dir, device, kind)?;
        let tokenizer = Tokenizer::load(dir)?;
        let eos_ids = eos_ids(dir, &model, &tokenizer);
        Ok(Policy { model, tokenizer, eos_ids, dir: dir.to_path_buf() })
    }

    /// A frozen deep copy (the reference model): same weights, no gradients.
    pub fn frozen_copy(&self) -> Result<Self> {
        let model = self.model.deep_clone()?;
        Ok(Policy {
            model,
            tokenizer: Tokenizer::load(&self.dir)?,
            eos_ids: self.eos_ids.clone(),
            dir: self.dir.clone(),
        })
    }

    /// Chat-renders one user turn and returns its token ids (generation prompt appended).
    pub fn user_prompt(&self, text: &str) -> Result<Vec<i64>> {
        self.tokenizer.encode_chat(&[ChatMessage::user(text)], true)
    }

    pub fn generate(&self, prompts: &[Vec<i64>], cfg: &SamplingConfig) -> Result<Vec<Completion>> {
        generate::generate(&self.model, &self.tokenizer, prompts, cfg, &self.eos_ids)
    }
}

/// End-of-sequence ids: generation_config.json, else config.json, plus the tokenizer's EOS.
fn eos_ids(dir: &Path, model: &Llama, tok: &Tokenizer) -> Vec<i64> {
    let mut ids: Vec<i64> = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => n.as_i64().map(|i| vec![i]),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_i64()).collect()),
            _ => None,
        })
        .unwrap_or_else(|| model.config().eos_token_ids.clone());
    if let Some(id) = tok.eos_token().and_then(|t| tok.token_id(t)) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}
