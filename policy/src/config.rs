//! Hugging Face `config.json` for the Llama family (causal LM and sequence classifier).
use crate::error::{io_err, PolicyError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    LlamaForCausalLM,
    LlamaForSequenceClassification,
}

/// Rotary embedding parameters, normalised from either the `rope_theta` + `rope_scaling`
/// keys (transformers 4) or the `rope_parameters` key (transformers 5).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<Llama3Scaling>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    pub num_labels: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    num_labels: Option<i64>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    2048
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text).map_err(|message| PolicyError::Config { path: path.to_path_buf(), message }).and_then(
            |c| match c {
                Ok(c) => Ok(c),
                Err(found) => Err(PolicyError::UnsupportedArchitecture { path: path.to_path_buf(), found }),
            },
        )
    }

    /// Outer error: malformed config; inner error: a well-formed config of an architecture we
    /// do not implement.
    pub fn from_json(text: &str) -> std::result::Result<std::result::Result<Self, String>, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch_name = match (&raw.architectures, &raw.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) if t == "llama" => "LlamaForCausalLM".to_string(),
            (_, t) => return Ok(Err(t.clone().unwrap_or_else(|| "<none>".into()))),
        };
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::LlamaForCausalLM,
            "LlamaForSequenceClassification" => Architecture::LlamaForSequenceClassification,
            other => return Ok(Err(other.to_string())),
        };
        if let Some(t) = &raw.model_type {
            if t != "llama" {
                return Ok(Err(format!("{arch_name} (model_type {t})")));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not supported (only silu)"));
            }
        }
        let positive = |name: &str, v: i64| {
            if v > 0 {
                Ok(v)
            } else {
                Err(format!("{name} must be positive, got {v}"))
            }
        };
        let heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let hidden = positive("hidden_size", raw.hidden_size)?;
        let kv_heads = positive("num_key_value_heads", raw.num_key_value_heads.unwrap_or(heads))?;
        if heads % kv_heads != 0 {
            return Err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"));
        }
        let head_dim = match raw.head_dim {
            Some(d) => positive("head_dim", d)?,
            None if hidden % heads == 0 => hidden / heads,
            None => return Err(format!("hidden_size {hidden} not divisible by {heads} heads and no head_dim given")),
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be even for rotary embeddings"));
        }
        let rope = parse_rope(raw.rope_theta, raw.rope_scaling.as_ref(), raw.rope_parameters.as_ref())?;
        let num_labels = match (raw.num_labels, &raw.id2label) {
            (Some(n), _) => n,
            (None, Some(m)) => m.len() as i64,
            (None, None) => 1,
        };
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(i)) => vec![i],
            Some(OneOrMany::Many(v)) => v,
        };
        Ok(Ok(ModelConfig {
            architecture,
            vocab_size: positive("vocab_size", raw.vocab_size)?,
            hidden_size: hidden,
            intermediate_size: positive("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: positive("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            num_labels: positive("num_labels", num_labels)?,
        }))
    }
}

fn parse_rope(
    theta: Option<f64>,
    scaling: Option<&serde_json::Value>,
    parameters: Option<&serde_json::Value>,
) -> std::result::Result<Rope, String> {
    // transformers 5 folds theta and scaling into `rope_parameters`.
    let spec = match (parameters, scaling) {
        (Some(p), _) if p.is_object() => Some(p),
        (_, Some(s)) if s.is_object() => Some(s),
        _ => None,
    };
    let theta = spec.and_then(|s| s.get("rope_theta")).and_then(|v| v.as_f64()).or(theta).unwrap_or(10000.0);
    let Some(spec) = spec else {
        return Ok(Rope { theta, scaling: None });
    };
    let kind = spec.get("rope_type").or_else(|| spec.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok(Rope { theta, scaling: None }),
        "llama3" => {
            let num =
                |k: &str| spec.get(k).and_then(|v| v.as_f64()).ok_or_else(|| format!("rope_scaling llama3 needs {k}"));
            Ok(Rope {
                theta,
                scaling: Some(Llama3Scaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }),
            })
        }
        other => Err(format!("rope_scaling type {other:?} is not supported (default, llama3)")),
    }
}
