//! The language model of selfplay: Hugging Face Llama-family checkpoints in tch, with the
//! tokenizer and chat template, batched sampling with a KV cache, exact token log-probs for
//! the learner, reward-model scoring, and GGUF import.
pub mod config;
pub mod decode_step;
pub mod error;
pub mod generate;
pub mod in_process;
pub mod model;
pub mod scoring;
pub mod tokenizer;
pub mod weights;

/// GGUF reading and import live in the tch-free `selfplay-gguf` crate; re-exported here so
/// `selfplay_policy::gguf::...` keeps working.
pub use selfplay_gguf as gguf;

pub use config::{Architecture, Family, ModelConfig};
pub use error::{PolicyError, Result};
pub use generate::{Completion, FinishProbe, FinishReason, GenRequest, GenStats, Generator, SamplingConfig};
pub use in_process::InProcessWeights;
pub use model::Llama;
pub use scoring::{Grad, Scorer};
pub use tokenizer::{ChatMessage, ChatOptions, Tokenizer};

use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// The words `parse_device` accepts (for `--device`, `SELFPLAY_DEVICE` and `model.device`).
pub const DEVICE_WORDS: &str = "auto, cpu, cuda or cuda:N";
/// The words `parse_kind` accepts (for `--dtype`, `SELFPLAY_DTYPE` and `model.dtype`).
pub const KIND_WORDS: &str = "f32, bf16 or f16";

/// The one parser of a device for every command: `auto` (cuda:0 when libtorch sees a CUDA
/// device, else cpu), `cpu`, `cuda` (= cuda:0) or `cuda:N`. A CUDA device that libtorch does
/// not see is refused here, not at the first tensor.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s.trim() {
        "auto" => return Ok(Device::cuda_if_available()),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => match n.parse::<usize>() {
                Ok(i) => Device::Cuda(i),
                Err(_) => return Err(unknown_device(s)),
            },
            _ => return Err(unknown_device(s)),
        },
    };
    let n = tch::Cuda::device_count().max(0) as usize;
    match dev {
        Device::Cuda(i) if i >= n => Err(PolicyError::Device(
            s.into(),
            format!("{n} CUDA device(s) visible to libtorch (use auto or cpu to run without one)"),
        )),
        d => Ok(d),
    }
}

fn unknown_device(s: &str) -> PolicyError {
    PolicyError::InvalidInput(format!("unknown device {s:?}: expected {DEVICE_WORDS}"))
}

/// The one parser of a dtype for every command: `f32`, `bf16` or `f16`.
pub fn parse_kind(s: &str) -> Result<Kind> {
    match s.trim() {
        "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        _ => Err(PolicyError::InvalidInput(format!("unknown dtype {s:?}: expected {KIND_WORDS}"))),
    }
}

/// The words `parse_kind_on` accepts: `auto` (bf16 on CUDA, f32 on the CPU) and `KIND_WORDS`.
pub const KIND_OR_AUTO_WORDS: &str = "auto, f32, bf16 or f16";

/// [`parse_kind`] for a model placed on `device`, also accepting `auto`: bf16 on a CUDA
/// device (half the memory and the tensor cores' rate; the learner keeps f32 master weights),
/// f32 on the CPU (where bf16 matmuls are slower than f32 ones).
pub fn parse_kind_on(s: &str, device: Device) -> Result<Kind> {
    match s.trim() {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" => Ok(Kind::Float),
        other => parse_kind(other)
            .map_err(|_| PolicyError::InvalidInput(format!("unknown dtype {s:?}: expected {KIND_OR_AUTO_WORDS}"))),
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
        self.frozen_copy_on(self.model.device())
    }

    /// A frozen deep copy on `device` (the reference model on another GPU, or on the CPU),
    /// in the same dtype. Tensors are copied one at a time, so the source device never holds
    /// a second model.
    pub fn frozen_copy_on(&self, device: Device) -> Result<Self> {
        let model = if device == self.model.device() {
            self.model.deep_clone()?
        } else {
            let mut tensors: std::collections::HashMap<String, tch::Tensor> =
                self.model.parameters().iter().map(|(n, t)| (n.clone(), t.detach().to_device(device))).collect();
            Llama::from_tensors(
                self.model.config().clone(),
                &mut tensors,
                device,
                self.model.kind(),
                Path::new("<reference copy>"),
            )?
        };
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

    /// A [`Generator`] over this policy's model, tokenizer and EOS ids.
    pub fn generator(&self) -> Generator<'_> {
        Generator::new(&self.model, &self.tokenizer, &self.eos_ids)
    }

    /// One completion per prompt, row r seeded with `row_seed(cfg.seed, r)`: the common case
    /// of [`Policy::generator`].
    pub fn generate(&self, prompts: &[Vec<i64>], cfg: &SamplingConfig) -> Result<Vec<Completion>> {
        Ok(self.generator().run(&GenRequest::from_prompts(prompts, cfg.seed), cfg)?.0)
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

#[cfg(test)]
mod vocabulary_tests {
    use super::*;

    fn cuda_count() -> usize {
        tch::Cuda::device_count().max(0) as usize
    }

    #[test]
    fn device_words_accepted() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" cpu ").unwrap(), Device::Cpu);
        let auto = parse_device("auto").unwrap();
        if tch::Cuda::is_available() {
            assert_eq!(auto, Device::Cuda(0));
        } else {
            assert_eq!(auto, Device::Cpu);
        }
        let n = cuda_count();
        for (word, want) in [("cuda", Device::Cuda(0)), ("cuda:0", Device::Cuda(0))] {
            match parse_device(word) {
                Ok(d) => {
                    assert!(n > 0, "{word} accepted without a CUDA device");
                    assert_eq!(d, want);
                }
                Err(PolicyError::Device(v, why)) => {
                    assert_eq!(n, 0, "{word} refused with {n} CUDA device(s): {why}");
                    assert_eq!(v, word);
                }
                Err(e) => panic!("{word}: wrong error {e}"),
            }
        }
    }

    #[test]
    fn device_beyond_the_visible_ones_is_refused() {
        let word = format!("cuda:{}", cuda_count());
        match parse_device(&word) {
            Err(PolicyError::Device(v, why)) => {
                assert_eq!(v, word);
                assert!(why.contains("visible"), "{why}");
            }
            other => panic!("{word}: {other:?}"),
        }
    }

    #[test]
    fn device_words_refused() {
        for word in [
            "",
            "gpu",
            "CPU",
            "Cuda",
            "AUTO",
            "mps",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda:0:1",
            "cuda 0",
            "cpu:0",
            "cuda:99999999999999999999999",
        ] {
            match parse_device(word) {
                Err(PolicyError::InvalidInput(m)) => {
                    assert!(m.contains(&format!("{word:?}")), "{word}: {m}");
                    assert!(m.contains(DEVICE_WORDS), "{word}: {m}");
                }
                other => panic!("{word:?} not refused as unknown: {other:?}"),
            }
        }
    }

    #[test]
    fn dtype_words() {
        assert_eq!(parse_kind("f32").unwrap(), Kind::Float);
        assert_eq!(parse_kind("bf16").unwrap(), Kind::BFloat16);
        assert_eq!(parse_kind("f16").unwrap(), Kind::Half);
        for word in ["", "F32", "fp32", "float", "float32", "bfloat16", "half", "float16", "fp16", "f64", "int8"] {
            match parse_kind(word) {
                Err(PolicyError::InvalidInput(m)) => {
                    assert!(m.contains(&format!("{word:?}")), "{word}: {m}");
                    assert!(m.contains(KIND_WORDS), "{word}: {m}");
                }
                other => panic!("{word:?} not refused: {other:?}"),
            }
            match parse_kind_on(word, Device::Cpu) {
                Err(PolicyError::InvalidInput(m)) => {
                    assert!(m.contains(&format!("{word:?}")), "{word}: {m}");
                    assert!(m.contains(KIND_OR_AUTO_WORDS), "{word}: {m}");
                }
                other => panic!("{word:?} not refused on a device: {other:?}"),
            }
        }
        assert!(parse_kind("auto").is_err(), "auto needs a device");
    }

    #[test]
    fn auto_dtype_is_bf16_on_cuda_and_f32_on_the_cpu() {
        assert_eq!(parse_kind_on("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_kind_on("auto", Device::Cuda(0)).unwrap(), Kind::BFloat16);
        assert_eq!(parse_kind_on("auto", Device::Cuda(3)).unwrap(), Kind::BFloat16);
        for dev in [Device::Cpu, Device::Cuda(0)] {
            assert_eq!(parse_kind_on("f32", dev).unwrap(), Kind::Float);
            assert_eq!(parse_kind_on("bf16", dev).unwrap(), Kind::BFloat16);
            assert_eq!(parse_kind_on(" f16 ", dev).unwrap(), Kind::Half);
        }
    }
}
