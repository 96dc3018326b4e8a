//! Hugging Face `config.json` for the supported families (Llama, Mistral, Qwen2/Qwen2.5,
//! Qwen3), each as a causal LM or a sequence classifier. Keys absent from the file take
//! transformers' defaults for that family.
use crate::error::{io_err, PolicyError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
}

/// The transformer body an architecture uses; the head is the other half of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// Every architecture, for parsing and for error messages.
pub const ARCHITECTURES: [Architecture; 8] = [
    Architecture::LlamaForCausalLM,
    Architecture::LlamaForSequenceClassification,
    Architecture::MistralForCausalLM,
    Architecture::MistralForSequenceClassification,
    Architecture::Qwen2ForCausalLM,
    Architecture::Qwen2ForSequenceClassification,
    Architecture::Qwen3ForCausalLM,
    Architecture::Qwen3ForSequenceClassification,
];

impl Architecture {
    pub fn family(self) -> Family {
        use Architecture::*;
        match self {
            LlamaForCausalLM | LlamaForSequenceClassification => Family::Llama,
            MistralForCausalLM | MistralForSequenceClassification => Family::Mistral,
            Qwen2ForCausalLM | Qwen2ForSequenceClassification => Family::Qwen2,
            Qwen3ForCausalLM | Qwen3ForSequenceClassification => Family::Qwen3,
        }
    }
    /// A reward model: a `score` head instead of the language-model head.
    pub fn is_classifier(self) -> bool {
        use Architecture::*;
        matches!(
            self,
            LlamaForSequenceClassification
                | MistralForSequenceClassification
                | Qwen2ForSequenceClassification
                | Qwen3ForSequenceClassification
        )
    }
    pub fn is_causal_lm(self) -> bool {
        !self.is_classifier()
    }
    /// The name transformers gives it in `architectures`.
    pub fn name(self) -> &'static str {
        use Architecture::*;
        match self {
            LlamaForCausalLM => "LlamaForCausalLM",
            LlamaForSequenceClassification => "LlamaForSequenceClassification",
            MistralForCausalLM => "MistralForCausalLM",
            MistralForSequenceClassification => "MistralForSequenceClassification",
            Qwen2ForCausalLM => "Qwen2ForCausalLM",
            Qwen2ForSequenceClassification => "Qwen2ForSequenceClassification",
            Qwen3ForCausalLM => "Qwen3ForCausalLM",
            Qwen3ForSequenceClassification => "Qwen3ForSequenceClassification",
        }
    }
}

impl Family {
    /// `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
    fn causal_lm(self) -> Architecture {
        match self {
            Family::Llama => Architecture::LlamaForCausalLM,
            Family::Mistral => Architecture::MistralForCausalLM,
            Family::Qwen2 => Architecture::Qwen2ForCausalLM,
            Family::Qwen3 => Architecture::Qwen3ForCausalLM,
        }
    }
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
    /// Biases on q_proj, k_proj and v_proj (Qwen2; Llama and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama and Qwen3 with `attention_bias`; never Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// The sliding attention window of each layer (a query at position p sees keys at
    /// positions p - w + 1 ..= p), or None for full causal attention.
    pub layer_windows: Vec<Option<i64>>,
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
    // Optional and null-tolerant: transformers writes null for keys a family does not use.
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
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
        // Absent and null differ for `sliding_window` (absent = the family's default).
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let family_of = |t: &str| {
            [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3].into_iter().find(|f| f.model_type() == t)
        };
        let architecture = match (&raw.architectures, &raw.model_type) {
            (Some(a), _) if !a.is_empty() => match ARCHITECTURES.into_iter().find(|x| x.name() == a[0]) {
                Some(x) => x,
                None => return Ok(Err(a[0].clone())),
            },
            (_, Some(t)) => match family_of(t) {
                Some(f) => f.causal_lm(),
                None => return Ok(Err(format!("model_type {t}"))),
            },
            (_, None) => return Ok(Err("<none>".into())),
        };
        let family = architecture.family();
        if let Some(t) = &raw.model_type {
            if t != family.model_type() {
                return Ok(Err(format!("{} (model_type {t})", architecture.name())));
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
            // Qwen3Config's default, not hidden_size / heads.
            None if family == Family::Qwen3 => 128,
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
        let layers = positive("num_hidden_layers", raw.num_hidden_layers)?;
        let layer_windows = layer_windows(family, &raw, &value, layers)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (attention_bias, attention_bias, raw.mlp_bias.unwrap_or(false)),
            Family::Mistral => (false, false, false),
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 => (attention_bias, attention_bias, false),
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
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: family == Family::Qwen3,
            layer_windows,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            num_labels: positive("num_labels", num_labels)?,
        }))
    }
}

/// Which layers attend through a sliding window, as transformers decides it: every layer of a
/// Mistral (`sliding_window`, default 4096, null = none); for Qwen2 and Qwen3 only with
/// `use_sliding_window`, on the layers `layer_types` marks `sliding_attention` (or, without
/// `layer_types`, the layers from `max_window_layers` on).
fn layer_windows(
    family: Family,
    raw: &RawConfig,
    value: &serde_json::Value,
    layers: i64,
) -> std::result::Result<Vec<Option<i64>>, String> {
    let window = match value.get("sliding_window") {
        None => Some(4096),
        Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(w) if w > 0 => Some(w),
            _ => return Err(format!("sliding_window must be a positive integer or null, got {v}")),
        },
    };
    let n = layers as usize;
    match family {
        Family::Llama => Ok(vec![None; n]),
        Family::Mistral => Ok(vec![window; n]),
        Family::Qwen2 | Family::Qwen3 => {
            let window = if raw.use_sliding_window.unwrap_or(false) { window } else { None };
            match &raw.layer_types {
                Some(types) => {
                    if types.len() != n {
                        return Err(format!("layer_types has {} entries for {layers} layers", types.len()));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "full_attention" => Ok(None),
                            "sliding_attention" => Ok(window),
                            other => Err(format!("layer type {other:?} is not supported")),
                        })
                        .collect()
                }
                None => {
                    let from = raw.max_window_layers.unwrap_or(28);
                    Ok((0..layers).map(|l| if l >= from { window } else { None }).collect())
                }
            }
        }
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

#[cfg(test)]
mod family_tests {
    use super::*;

    fn parse(extra: serde_json::Value) -> std::result::Result<std::result::Result<ModelConfig, String>, String> {
        let mut v = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 4,
            "num_attention_heads": 2
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v.to_string())
    }

    fn ok(extra: serde_json::Value) -> ModelConfig {
        parse(extra).unwrap().unwrap()
    }

    #[test]
    fn family_defaults_follow_transformers() {
        let q2 = ok(serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}));
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm && !q2.mlp_bias);
        assert_eq!(q2.layer_windows, vec![None; 4]);
        assert_eq!(q2.head_dim, 4);
        // A Qwen3 without head_dim: Qwen3Config's 128, not hidden_size / heads.
        let q3 = ok(serde_json::json!({"model_type": "qwen3"}));
        assert_eq!(q3.architecture, Architecture::Qwen3ForCausalLM);
        assert!(q3.qk_norm && !q3.qkv_bias && !q3.o_bias);
        assert_eq!(q3.head_dim, 128);
        let q3b = ok(serde_json::json!({"model_type": "qwen3", "attention_bias": true, "head_dim": 4}));
        assert!(q3b.qkv_bias && q3b.o_bias);
        // Mistral: sliding_window absent = 4096, null = none.
        let m = ok(serde_json::json!({"architectures": ["MistralForSequenceClassification"]}));
        assert!(m.architecture.is_classifier());
        assert_eq!(m.architecture.family(), Family::Mistral);
        assert_eq!(m.layer_windows, vec![Some(4096); 4]);
        let m = ok(serde_json::json!({"model_type": "mistral", "sliding_window": null}));
        assert_eq!(m.layer_windows, vec![None; 4]);
        // Llama ignores sliding_window; null biases read as none.
        let l = ok(serde_json::json!({"model_type": "llama", "sliding_window": 3, "attention_bias": null}));
        assert_eq!(l.layer_windows, vec![None; 4]);
        assert!(!l.qkv_bias);
    }

    #[test]
    fn qwen_windows_per_layer() {
        // Without layer_types: the layers from max_window_layers on.
        let q = ok(serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 6,
                                     "max_window_layers": 2}));
        assert_eq!(q.layer_windows, vec![None, None, Some(6), Some(6)]);
        // layer_types decides when present; without use_sliding_window there is no window.
        let types = serde_json::json!(["sliding_attention", "full_attention", "sliding_attention", "full_attention"]);
        let q = ok(serde_json::json!({"model_type": "qwen3", "head_dim": 4, "use_sliding_window": true,
                                     "sliding_window": 6, "layer_types": types}));
        assert_eq!(q.layer_windows, vec![Some(6), None, Some(6), None]);
        let q =
            ok(serde_json::json!({"model_type": "qwen3", "head_dim": 4, "sliding_window": 6, "layer_types": types}));
        assert_eq!(q.layer_windows, vec![None; 4]);
    }

    #[test]
    fn bad_windows_are_refused() {
        for extra in [
            serde_json::json!({"model_type": "mistral", "sliding_window": 0}),
            serde_json::json!({"model_type": "mistral", "sliding_window": "big"}),
            serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "layer_types": ["full_attention"]}),
            serde_json::json!({"model_type": "qwen2", "layer_types": ["chunked_attention", "full_attention",
                                                                   "full_attention", "full_attention"]}),
        ] {
            assert!(parse(extra.clone()).is_err(), "{extra} accepted");
        }
        // Known layout, unknown family: an unsupported architecture, not a malformed config.
        assert_eq!(parse(serde_json::json!({"model_type": "gemma"})).unwrap().unwrap_err(), "model_type gemma");
    }
}
