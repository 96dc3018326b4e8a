//! The one place where the Hugging Face tensor names of a model are built and checked: which
//! tensors a config needs, their names and shapes, and the checked store the modules are
//! built from.
use crate::config::ModelConfig;
use crate::error::{PolicyError, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A tensor of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerPart {
    InputNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    QNorm,
    KNorm,
    PostNorm,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// A tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Embed,
    Layer(i64, LayerPart),
    FinalNorm,
    LmHead,
    Score,
}

impl Part {
    /// The Hugging Face name.
    pub fn name(self) -> String {
        use LayerPart::*;
        let layer = |l: i64, rest: &str| format!("model.layers.{l}.{rest}");
        match self {
            Part::Embed => "model.embed_tokens.weight".into(),
            Part::FinalNorm => "model.norm.weight".into(),
            Part::LmHead => "lm_head.weight".into(),
            Part::Score => "score.weight".into(),
            Part::Layer(l, p) => layer(
                l,
                match p {
                    InputNorm => "input_layernorm.weight",
                    Q => "self_attn.q_proj.weight",
                    K => "self_attn.k_proj.weight",
                    V => "self_attn.v_proj.weight",
                    O => "self_attn.o_proj.weight",
                    QBias => "self_attn.q_proj.bias",
                    KBias => "self_attn.k_proj.bias",
                    VBias => "self_attn.v_proj.bias",
                    OBias => "self_attn.o_proj.bias",
                    QNorm => "self_attn.q_norm.weight",
                    KNorm => "self_attn.k_norm.weight",
                    PostNorm => "post_attention_layernorm.weight",
                    Gate => "mlp.gate_proj.weight",
                    Up => "mlp.up_proj.weight",
                    Down => "mlp.down_proj.weight",
                    GateBias => "mlp.gate_proj.bias",
                    UpBias => "mlp.up_proj.bias",
                    DownBias => "mlp.down_proj.bias",
                },
            ),
        }
    }
}

/// Every tensor a config needs with its shape, in the model's fixed parameter order.
pub fn parts(cfg: &ModelConfig) -> Vec<(Part, Vec<i64>)> {
    use LayerPart::*;
    let (h, i, v, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim);
    let q_out = cfg.num_attention_heads * hd;
    let kv_out = cfg.num_key_value_heads * hd;
    let mut out = vec![(Part::Embed, vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let mut layer = vec![(InputNorm, vec![h]), (Q, vec![q_out, h]), (K, vec![kv_out, h]), (V, vec![kv_out, h])];
        layer.push((O, vec![h, q_out]));
        if cfg.qkv_bias {
            layer.extend([(QBias, vec![q_out]), (KBias, vec![kv_out]), (VBias, vec![kv_out])]);
        }
        if cfg.o_bias {
            layer.push((OBias, vec![h]));
        }
        if cfg.qk_norm {
            layer.extend([(QNorm, vec![hd]), (KNorm, vec![hd])]);
        }
        layer.extend([(PostNorm, vec![h]), (Gate, vec![i, h]), (Up, vec![i, h]), (Down, vec![h, i])]);
        if cfg.mlp_bias {
            layer.extend([(GateBias, vec![i]), (UpBias, vec![i]), (DownBias, vec![h])]);
        }
        out.extend(layer.into_iter().map(|(p, s)| (Part::Layer(l, p), s)));
    }
    out.push((Part::FinalNorm, vec![h]));
    if cfg.architecture.is_classifier() {
        out.push((Part::Score, vec![cfg.num_labels, h]));
    } else if !cfg.tie_word_embeddings {
        out.push((Part::LmHead, vec![v, h]));
    }
    out
}

/// The tensors a config needs, with their shapes, in Hugging Face naming.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    parts(cfg).into_iter().map(|(p, s)| (p.name(), s)).collect()
}

/// The model's parameters, taken from named tensors after every name and shape was checked,
/// in the fixed order of [`parts`]. The modules take shallow handles from it.
pub struct Store {
    order: Vec<(Part, String)>,
    tensors: HashMap<Part, Tensor>,
}

impl Store {
    /// Takes every tensor the config needs out of `tensors` (extra tensors are left there),
    /// converted to `kind` on `device`.
    pub fn take(
        cfg: &ModelConfig,
        tensors: &mut HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
        source: &Path,
    ) -> Result<Self> {
        let mut order = Vec::new();
        let mut out = HashMap::new();
        for (part, shape) in parts(cfg) {
            let name = part.name();
            let t = tensors
                .remove(&name)
                .ok_or_else(|| PolicyError::MissingTensor { name: name.clone(), path: source.to_path_buf() })?;
            if t.size() != shape {
                return Err(PolicyError::WeightMismatch {
                    message: format!("config implies shape {shape:?}, file has {:?}", t.size()),
                    name,
                });
            }
            out.insert(part, t.to_device(device).to_kind(kind));
            order.push((part, name));
        }
        Ok(Store { order, tensors: out })
    }

    /// A handle on a tensor the config needs.
    pub fn get(&self, part: Part) -> Tensor {
        self.tensors.get(&part).map(Tensor::shallow_clone).unwrap_or_else(|| panic!("{} not in the store", part.name()))
    }

    /// A handle when the config has the tensor.
    pub fn opt(&self, part: Part) -> Option<Tensor> {
        self.tensors.get(&part).map(Tensor::shallow_clone)
    }

    /// Replaces a tensor with another of the same shape (a view of a stacked weight).
    pub fn replace(&mut self, part: Part, t: Tensor) {
        self.tensors.insert(part, t);
    }

    /// Every parameter under its name, in order.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.order.iter().map(|(p, n)| (n.clone(), self.get(*p))).collect()
    }
}
