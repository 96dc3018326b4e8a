//! The Llama family in tch: grouped-query attention, RMSNorm, SwiGLU, rotary embeddings
//! (with Llama-3 frequency scaling), tied or untied output, an optional `score` head for
//! sequence-classifier reward models, and a preallocated KV cache for generation.
//!
//! Numerics follow transformers' implementation (RMSNorm and rotary tables in f32, logits
//! returned in f32) so that logits match it to 1e-4 in f32.
use crate::config::{Architecture, ModelConfig};
use crate::error::{PolicyError, Result};
use crate::weights;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_b: Option<Tensor>,
    k_b: Option<Tensor>,
    v_b: Option<Tensor>,
    o_b: Option<Tensor>,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    gate_b: Option<Tensor>,
    up_b: Option<Tensor>,
    down_b: Option<Tensor>,
    /// q, k and v stacked [q_out + 2 kv_out, H], and gate and up [2 I, H]: the per-name
    /// parameters above are row ranges (views) of these, so every in-place update (optimizer,
    /// weight sync, checkpoint load) reaches both. None with biases.
    qkv: Option<Tensor>,
    gate_up: Option<Tensor>,
}

/// Per-layer key/value tensors of shape [batch, kv_heads, capacity, head_dim], with the rotary
/// tables for positions 0..capacity built once when the cache is made.
///
/// A contiguous cache appends every call's keys after the cached ones (all rows share one
/// length). A slot cache (decoding with continuous batching) writes each row's keys at that
/// row's own positions and attends over the whole capacity under the caller's mask, so that
/// every decoding step has the same shapes and rows can be refilled independently.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
    slotted: bool,
    cos: Tensor,
    sin: Tensor,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    pub fn is_slotted(&self) -> bool {
        self.slotted
    }

    /// Copies the first `len` cached positions of `src`'s row `src_row` into row `row` (how a
    /// prefilled sequence enters a decoding slot).
    pub fn copy_row_from(&mut self, row: i64, src: &KvCache, src_row: i64, len: i64) -> Result<()> {
        if self.keys.len() != src.keys.len() || len > self.capacity || len > src.capacity {
            return Err(PolicyError::InvalidInput(format!(
                "cannot copy {len} cached positions between caches of capacity {} and {}",
                src.capacity, self.capacity
            )));
        }
        tch::no_grad(|| {
            for (dst, s) in self.keys.iter().zip(&src.keys).chain(self.values.iter().zip(&src.values)) {
                dst.narrow(0, row, 1).narrow(2, 0, len).copy_(&s.narrow(0, src_row, 1).narrow(2, 0, len));
            }
        });
        Ok(())
    }
}

/// How the queries of one forward pass may attend.
pub enum AttnMask {
    /// Causal over this call's own keys, with no mask tensor: right-padded batches (padding
    /// comes after every real token, so no real query sees it) and prefill into an empty cache.
    /// Without a mask the fused kernels (flash attention on CUDA) apply.
    Causal,
    /// A bool mask [B, 1, T, S], true = may attend, where S is the number of keys after this
    /// call (the cache length plus T, or the whole capacity of a slot cache).
    Explicit(Tensor),
}

pub struct Llama {
    cfg: ModelConfig,
    device: Device,
    kind: Kind,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    score: Option<Tensor>,
    inv_freq: Tensor,
    /// Every parameter under its Hugging Face name (shallow handles onto the same storage).
    params: Vec<(String, Tensor)>,
}

/// The tensors a config needs, with their shapes, in Hugging Face naming.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q_out, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_out, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_out, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_out]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q_out]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv_out]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv_out]));
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        if cfg.mlp_bias {
            out.push((format!("{p}.mlp.gate_proj.bias"), vec![i]));
            out.push((format!("{p}.mlp.up_proj.bias"), vec![i]));
            out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    match cfg.architecture {
        Architecture::LlamaForCausalLM if !cfg.tie_word_embeddings => {
            out.push(("lm_head.weight".to_string(), vec![v, h]))
        }
        Architecture::LlamaForCausalLM => {}
        Architecture::LlamaForSequenceClassification => out.push(("score.weight".to_string(), vec![cfg.num_labels, h])),
    }
    out
}

fn inv_freq(cfg: &ModelConfig) -> Tensor {
    let dim = cfg.head_dim;
    let base = cfg.rope.theta;
    // Same arithmetic as transformers: base ** (arange(0, dim, 2) / dim) in f32.
    let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / (dim as f64);
    let inv = Tensor::from(base as f32).to_kind(Kind::Float).pow(&exps).reciprocal();
    match &cfg.rope.scaling {
        None => inv,
        Some(s) => {
            let low_wl = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wl = s.original_max_position_embeddings / s.high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_wl), &(&inv / s.factor));
            let smooth = (wavelen.reciprocal() * s.original_max_position_embeddings - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / s.factor + &smooth * &scaled;
            let medium = wavelen.ge(high_wl).logical_and(&wavelen.le(low_wl));
            smoothed.where_self(&medium, &scaled)
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[x2.neg(), x1], 3)
}

fn linear(x: &Tensor, w: &Tensor, b: &Option<Tensor>) -> Tensor {
    x.linear(w, b.as_ref())
}

/// Decoding steps on the CPU with at most this many rows use [`linear_few_rows`].
const FEW_ROWS: i64 = 16;

/// `x W^T` for a few rows, computed as `(W x^T)^T`. With the weight as the left operand MKL
/// streams it once instead of re-packing the whole matrix on every call, which is what a
/// decoding step with a handful of rows spends most of its time on (BENCHMARKS.md). The result
/// is made contiguous: attention's fast kernels want it so.
fn linear_few_rows(x: &Tensor, w: &Tensor) -> Tensor {
    let mut shape = x.size();
    let last = shape.len() - 1;
    let x2 = x.reshape([-1, shape[last]]);
    shape[last] = w.size()[0];
    w.matmul(&x2.tr()).tr().contiguous().view(shape.as_slice())
}

/// Stacks weights along their output rows and returns the stack with views of its row ranges.
fn stack_rows(parts: &[&Tensor]) -> (Tensor, Vec<Tensor>) {
    let stacked = Tensor::cat(parts, 0);
    let mut views = Vec::new();
    let mut at = 0;
    for p in parts {
        let n = p.size()[0];
        views.push(stacked.narrow(0, at, n));
        at += n;
    }
    (stacked, views)
}

impl Llama {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = weights::weight_files(dir)?;
        let mut tensors = weights::load_tensors(&files, kind, device, |_| true)?;
        Self::from_tensors(cfg, &mut tensors, device, kind, dir)
    }

    /// Builds the model from named tensors, checking every name and shape against the config.
    pub fn from_tensors(
        cfg: ModelConfig,
        tensors: &mut HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
        source: &Path,
    ) -> Result<Self> {
        let mut params = Vec::new();
        for (name, shape) in expected_tensors(&cfg) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| PolicyError::MissingTensor { name: name.clone(), path: source.to_path_buf() })?;
            if t.size() != shape {
                return Err(PolicyError::WeightMismatch {
                    message: format!("config implies shape {shape:?}, file has {:?}", t.size()),
                    name,
                });
            }
            params.push((name, t.to_device(device).to_kind(kind)));
        }
        // Stack q/k/v and gate/up once; the named parameters become views of the stacks.
        let mut stacks: Vec<[Option<Tensor>; 2]> = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let groups = [
                (!cfg.attention_bias)
                    .then(|| ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}.weight")).to_vec()),
                (!cfg.mlp_bias).then(|| ["gate_proj", "up_proj"].map(|n| format!("{p}.mlp.{n}.weight")).to_vec()),
            ];
            stacks.push(groups.map(|names| {
                let names = names?;
                let at: Vec<usize> =
                    names.iter().map(|n| params.iter().position(|(k, _)| k == n).expect("checked above")).collect();
                let parts: Vec<&Tensor> = at.iter().map(|&i| &params[i].1).collect();
                let (stacked, views) = stack_rows(&parts);
                for (i, v) in at.into_iter().zip(views) {
                    params[i].1 = v;
                }
                Some(stacked)
            }));
        }
        let get = |n: &str| -> Tensor {
            params.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone()).expect("checked above")
        };
        let opt = |n: String, on: bool| on.then(|| get(&n));
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Layer {
                    input_norm: get(&format!("{p}.input_layernorm.weight")),
                    q: get(&format!("{p}.self_attn.q_proj.weight")),
                    k: get(&format!("{p}.self_attn.k_proj.weight")),
                    v: get(&format!("{p}.self_attn.v_proj.weight")),
                    o: get(&format!("{p}.self_attn.o_proj.weight")),
                    q_b: opt(format!("{p}.self_attn.q_proj.bias"), cfg.attention_bias),
                    k_b: opt(format!("{p}.self_attn.k_proj.bias"), cfg.attention_bias),
                    v_b: opt(format!("{p}.self_attn.v_proj.bias"), cfg.attention_bias),
                    o_b: opt(format!("{p}.self_attn.o_proj.bias"), cfg.attention_bias),
                    post_norm: get(&format!("{p}.post_attention_layernorm.weight")),
                    gate: get(&format!("{p}.mlp.gate_proj.weight")),
                    up: get(&format!("{p}.mlp.up_proj.weight")),
                    down: get(&format!("{p}.mlp.down_proj.weight")),
                    gate_b: opt(format!("{p}.mlp.gate_proj.bias"), cfg.mlp_bias),
                    up_b: opt(format!("{p}.mlp.up_proj.bias"), cfg.mlp_bias),
                    down_b: opt(format!("{p}.mlp.down_proj.bias"), cfg.mlp_bias),
                    qkv: stacks[l as usize][0].take(),
                    gate_up: stacks[l as usize][1].take(),
                }
            })
            .collect();
        let is_lm = cfg.architecture == Architecture::LlamaForCausalLM;
        Ok(Llama {
            embed: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            lm_head: (is_lm && !cfg.tie_word_embeddings).then(|| get("lm_head.weight")),
            score: (!is_lm).then(|| get("score.weight")),
            inv_freq: inv_freq(&cfg).to_device(device),
            layers,
            params,
            cfg,
            device,
            kind,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Every parameter with its Hugging Face name, in a fixed order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }
    pub fn num_parameters(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Marks every parameter as trainable (or frozen).
    pub fn set_requires_grad(&mut self, on: bool) {
        for (_, t) in &self.params {
            let _ = t.set_requires_grad(on);
        }
    }

    /// A deep copy on the same device: used for the frozen reference model.
    pub fn deep_clone(&self) -> Result<Self> {
        let mut tensors: HashMap<String, Tensor> =
            self.params.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        Self::from_tensors(self.cfg.clone(), &mut tensors, self.device, self.kind, Path::new("<copy>"))
    }

    /// Copies every parameter's values from a model of the same shape (weight sync).
    pub fn copy_weights_from(&mut self, other: &Llama) -> Result<()> {
        if other.params.len() != self.params.len() {
            return Err(PolicyError::InvalidInput("weight sync between different models".into()));
        }
        tch::no_grad(|| {
            for ((n, dst), (m, src)) in self.params.iter().zip(&other.params) {
                if n != m || dst.size() != src.size() {
                    return Err(PolicyError::WeightMismatch {
                        name: n.clone(),
                        message: format!("cannot copy from {m} {:?}", src.size()),
                    });
                }
                let mut d = dst.shallow_clone();
                d.copy_(src);
            }
            Ok(())
        })
    }

    /// Sets named parameters from tensors (any dtype or device); every parameter must be given.
    pub fn set_weights(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| {
            for (n, dst) in &self.params {
                let src = tensors
                    .get(n)
                    .ok_or_else(|| PolicyError::MissingTensor { name: n.clone(), path: "<weights update>".into() })?;
                if src.size() != dst.size() {
                    return Err(PolicyError::WeightMismatch {
                        name: n.clone(),
                        message: format!("update has shape {:?}, model {:?}", src.size(), dst.size()),
                    });
                }
                let mut d = dst.shallow_clone();
                d.copy_(src);
            }
            Ok(())
        })
    }

    /// Saves the weights as a Hugging Face safetensors file (tied weights stored once).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        weights::save_tensors(path, self.params.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// A contiguous cache (see [`KvCache`]).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        self.make_cache(batch, capacity, false)
    }

    /// A slot cache for decoding (see [`KvCache`]): the caller passes per-row positions below
    /// `capacity` and an explicit mask over all `capacity` keys.
    pub fn new_slot_cache(&self, batch: i64, capacity: i64) -> KvCache {
        self.make_cache(batch, capacity, true)
    }

    fn make_cache(&self, batch: i64, capacity: i64, slotted: bool) -> KvCache {
        let shape = [batch, self.cfg.num_key_value_heads, capacity, self.cfg.head_dim];
        // Zeros, not uninitialised memory: masked keys get weight 0, and 0 * NaN would be NaN.
        let mk = || Tensor::zeros(shape, (self.kind, self.device));
        let n = self.cfg.num_hidden_layers as usize;
        let positions = Tensor::arange(capacity, (Kind::Int64, self.device)).unsqueeze(0);
        let (cos, sin) = self.rope_tables(&positions);
        let hd = self.cfg.head_dim;
        KvCache {
            keys: (0..n).map(|_| mk()).collect(),
            values: (0..n).map(|_| mk()).collect(),
            len: 0,
            capacity,
            slotted,
            cos: cos.view([capacity, hd]),
            sin: sin.view([capacity, hd]),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.cfg.rms_norm_eps).rsqrt();
        w * normed.to_kind(self.kind)
    }

    /// Rotary tables for positions [B, T]: cos and sin of shape [B, 1, T, head_dim].
    fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(self.kind), emb.sin().to_kind(self.kind))
    }

    /// The transformer body. `ids` [B, T] and `positions` [B, T] are int64; `mask` says what
    /// each query may attend to (see [`AttnMask`]). Returns hidden states [B, T, H] after the
    /// final norm.
    ///
    /// With a slot cache, row r's new keys go to cache positions `positions[r]`, which the
    /// caller keeps below the capacity.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &AttnMask,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.size2()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        if let Some(c) = cache.as_deref() {
            if !c.slotted && c.len + t > c.capacity {
                return Err(PolicyError::InvalidInput(format!(
                    "KV cache full: {} cached + {t} new > capacity {}",
                    c.len, c.capacity
                )));
            }
            if c.slotted && t > c.capacity {
                return Err(PolicyError::InvalidInput(format!("{t} new positions > slot capacity {}", c.capacity)));
            }
            if matches!(mask, AttnMask::Causal) && (c.slotted || c.len > 0) {
                return Err(PolicyError::InvalidInput(
                    "causal attention without a mask needs an empty contiguous cache".into(),
                ));
            }
        }
        let mut x = Tensor::f_embedding(&self.embed, ids, -1, false, false)?;
        let (cos, sin) = match cache.as_deref() {
            // Tables built once per cache; a lookup per step instead of trigonometry.
            Some(c) => {
                let flat = positions.reshape([-1]);
                let pick = |tab: &Tensor| tab.index_select(0, &flat).view([b, 1, t, hd]);
                (pick(&c.cos), pick(&c.sin))
            }
            None => self.rope_tables(positions),
        };
        let rope = |v: &Tensor| v * &cos + rotate_half(v) * &sin;
        // Grouped-query attention under a mask: the query heads that share a key/value head go
        // into the query-length dimension, so the cache is never repeated and no `enable_gqa`
        // kernel restriction applies. Built once for all layers.
        let group = nh / nkv;
        let grouped_mask = match mask {
            AttnMask::Explicit(m) if group > 1 => {
                let s = m.size()[3];
                Some(m.unsqueeze(2).expand([b, 1, group, t, s], false).reshape([b, 1, group * t, s]))
            }
            _ => None,
        };
        // Projections without gradients use the stacked q/k/v and gate/up weights (one GEMM
        // each instead of three and two). Decoding a few rows on the CPU uses the
        // weight-on-the-left GEMM. Training keeps the per-name weights, which own the gradients.
        let few_rows = self.device == Device::Cpu && b * t <= FEW_ROWS && cache.is_some();
        let project =
            |h: &Tensor, w: &Tensor| if few_rows { linear_few_rows(h, w) } else { h.linear(w, None::<Tensor>) };
        let scale = Some(1.0 / (hd as f64).sqrt());
        for (l, layer) in self.layers.iter().enumerate() {
            let frozen = !layer.q.requires_grad();
            let h = self.rms_norm(&x, &layer.input_norm);
            let (q, k, v) = match (&layer.qkv, frozen) {
                (Some(qkv), true) => {
                    let y = project(&h, qkv);
                    let split =
                        |at: i64, heads: i64| y.narrow(2, at, heads * hd).view([b, t, heads, hd]).transpose(1, 2);
                    (split(0, nh), split(nh * hd, nkv), split((nh + nkv) * hd, nkv))
                }
                _ => (
                    linear(&h, &layer.q, &layer.q_b).view([b, t, nh, hd]).transpose(1, 2),
                    linear(&h, &layer.k, &layer.k_b).view([b, t, nkv, hd]).transpose(1, 2),
                    linear(&h, &layer.v, &layer.v_b).view([b, t, nkv, hd]).transpose(1, 2),
                ),
            };
            let (q, k) = (rope(&q), rope(&k));
            let (k, v) = match cache.as_deref_mut() {
                Some(c) if c.slotted => {
                    let idx = positions.view([b, 1, t, 1]).expand([b, nkv, t, hd], false);
                    let _ = c.keys[l].scatter_(2, &idx, &k);
                    let _ = c.values[l].scatter_(2, &idx, &v);
                    (c.keys[l].shallow_clone(), c.values[l].shallow_clone())
                }
                Some(c) => {
                    c.keys[l].narrow(2, c.len, t).copy_(&k);
                    c.values[l].narrow(2, c.len, t).copy_(&v);
                    (c.keys[l].narrow(2, 0, c.len + t), c.values[l].narrow(2, 0, c.len + t))
                }
                None => (k, v),
            };
            let attn = match (mask, &grouped_mask) {
                (AttnMask::Causal, _) => {
                    Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, scale, group > 1)?
                }
                (AttnMask::Explicit(_), Some(gm)) => {
                    let qg = q.reshape([b, nkv, group * t, hd]);
                    Tensor::f_scaled_dot_product_attention(&qg, &k, &v, Some(gm), 0.0, false, scale, false)?
                        .reshape([b, nh, t, hd])
                }
                (AttnMask::Explicit(m), None) => {
                    Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false)?
                }
            };
            let attn = attn.transpose(1, 2).reshape([b, t, nh * hd]);
            x = x + match (few_rows && frozen, &layer.o_b) {
                (true, None) => linear_few_rows(&attn, &layer.o),
                _ => linear(&attn, &layer.o, &layer.o_b),
            };
            let h = self.rms_norm(&x, &layer.post_norm);
            let (gate, up) = match (&layer.gate_up, frozen) {
                (Some(gu), true) => {
                    let y = project(&h, gu);
                    let i = self.cfg.intermediate_size;
                    (y.narrow(2, 0, i), y.narrow(2, i, i))
                }
                _ => (linear(&h, &layer.gate, &layer.gate_b), linear(&h, &layer.up, &layer.up_b)),
            };
            // down_proj stays `linear`: the left form measured slower for it.
            x = x + linear(&(gate.silu() * up), &layer.down, &layer.down_b);
        }
        if let Some(c) = cache {
            if !c.slotted {
                c.len += t;
            }
        }
        Ok(self.rms_norm(&x, &self.norm))
    }

    /// Language-model logits in f32 for hidden states [.., H].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = match (&self.lm_head, &self.score) {
            (Some(w), _) => w,
            (None, None) => &self.embed,
            (None, Some(_)) => {
                return Err(PolicyError::InvalidInput("a sequence classifier has no language-model head".into()))
            }
        };
        Ok(hidden.linear(w, None::<Tensor>).to_kind(Kind::Float))
    }

    /// [`logits`](Self::logits) for generation's next-token step: with a few rows on the CPU
    /// and no gradients, the weight-on-the-left GEMM. Scoring keeps `logits`, whose rows do not
    /// depend on what else is in the batch.
    pub fn decode_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let rows = hidden.numel() as i64 / self.cfg.hidden_size.max(1);
        let head = match (&self.lm_head, &self.score) {
            (Some(w), _) => Some(w),
            (None, None) => Some(&self.embed),
            (None, Some(_)) => None,
        };
        match head {
            Some(w)
                if self.device == Device::Cpu && rows <= FEW_ROWS && !hidden.requires_grad() && !w.requires_grad() =>
            {
                Ok(linear_few_rows(hidden, w).to_kind(Kind::Float))
            }
            _ => self.logits(hidden),
        }
    }

    /// Sequence-classifier scores in f32 for hidden states [.., H]: [.., num_labels].
    pub fn scores(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self
            .score
            .as_ref()
            .ok_or_else(|| PolicyError::InvalidInput("this model has no score head (not a reward model)".into()))?;
        Ok(hidden.linear(w, None::<Tensor>).to_kind(Kind::Float))
    }

    /// Checks that every id is inside the vocabulary before it reaches an embedding lookup.
    pub fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.numel() == 0 {
            return Ok(());
        }
        let lo = ids.min().int64_value(&[]);
        let hi = ids.max().int64_value(&[]);
        for id in [lo, hi] {
            if id < 0 || id >= self.cfg.vocab_size {
                return Err(PolicyError::TokenOutOfRange { id, vocab_size: self.cfg.vocab_size });
            }
        }
        Ok(())
    }
}

/// Right-padded batch of whole sequences with the masks the model needs.
pub struct PaddedBatch {
    pub ids: Tensor,
    pub positions: Tensor,
    /// Causal, with no mask tensor: padding comes after every real token.
    pub mask: AttnMask,
    /// [B, T] bool: real tokens.
    pub valid: Tensor,
    pub lengths: Vec<i64>,
}

impl PaddedBatch {
    pub fn right_padded(seqs: &[Vec<i64>], pad: i64, device: Device) -> Result<Self> {
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            return Err(PolicyError::InvalidInput("empty batch or empty sequence".into()));
        }
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0) as i64;
        let b = seqs.len() as i64;
        let mut flat = Vec::with_capacity((b * t) as usize);
        let mut valid = Vec::with_capacity((b * t) as usize);
        for s in seqs {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(pad, t as usize - s.len()));
            valid.extend(std::iter::repeat_n(true, s.len()));
            valid.extend(std::iter::repeat_n(false, t as usize - s.len()));
        }
        let ids = Tensor::from_slice(&flat).view([b, t]).to_device(device);
        let valid = Tensor::from_slice(&valid).view([b, t]).to_device(device);
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], true);
        Ok(PaddedBatch {
            ids,
            positions,
            mask: AttnMask::Causal,
            valid,
            lengths: seqs.iter().map(|s| s.len() as i64).collect(),
        })
    }
}
