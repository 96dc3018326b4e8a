//! Decoder-only transformers in tch: the Llama family and its relatives (Mistral, Qwen2/2.5,
//! Qwen3). Grouped-query attention, RMSNorm, SwiGLU, rotary embeddings (with Llama-3 frequency
//! scaling), optional q/k/v and o biases, optional per-head q/k norms, optional sliding-window
//! attention, tied or untied output, an optional `score` head for sequence-classifier reward
//! models, and a preallocated KV cache for generation.
//!
//! The parts: [`proj`] (linear projections, stacked for inference), [`attention`], [`mlp`],
//! [`block`] (one decoder layer), [`rope`], [`cache`], and [`names`], the one place where tensor
//! names are built and checked.
//!
//! Numerics follow transformers' implementation (RMSNorm and rotary tables in f32, logits
//! returned in f32) so that logits match it to 1e-4 in f32.
mod attention;
mod block;
mod cache;
mod mlp;
pub mod names;
mod proj;
mod rope;

pub use cache::KvCache;
pub use names::expected_tensors;

use crate::config::ModelConfig;
use crate::error::{PolicyError, Result};
use crate::weights;
use attention::Step;
use block::Block;
use names::{Part, Store};
use proj::{linear_few_rows, FEW_ROWS};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// RMSNorm over the last dimension with transformers' rounding: normalised in f32, rounded to
/// the input's dtype, then scaled by the weight in that dtype. libtorch's fused `rms_norm` does
/// the first part in one kernel (it computes in f32 and rounds back); with the weight inside it
/// too the f32 result is the same bit for bit, but in bf16 the weight must come after the
/// rounding to match (checked against the 8-op form in the tests). One or two kernels instead
/// of eight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let last = [*x.size().last().expect("normalised tensors have a last dimension")];
    if x.kind() == Kind::Float && w.kind() == Kind::Float {
        x.rms_norm(last, Some(w), eps)
    } else {
        w * x.rms_norm(last, None::<Tensor>, eps)
    }
}

/// Sequences share their first tokens through the trunk only from this many on: below it the
/// extra pass costs more than it saves.
pub const MIN_SHARED_PREFIX: usize = 16;

/// The number of leading tokens all `seqs` have in common.
pub fn common_prefix<S: AsRef<[i64]>>(seqs: &[S]) -> usize {
    let Some(first) = seqs.first().map(|s| s.as_ref()) else { return 0 };
    seqs[1..].iter().fold(first.len(), |n, s| first[..n].iter().zip(s.as_ref()).take_while(|(a, b)| a == b).count())
}

/// [1, 1, T, P + T]: T queries after a cached prefix of P positions (right-padded rows) see the
/// whole prefix and their own keys causally.
pub fn prefix_causal_mask(p: i64, t: i64, device: Device) -> Tensor {
    let keys = Tensor::arange(p + t, (Kind::Int64, device)).view([1, p + t]);
    let queries = Tensor::arange(t, (Kind::Int64, device)).view([t, 1]) + p;
    keys.le_tensor(&queries).view([1, 1, t, p + t])
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

/// The shared context of one pass run block by block ([`Llama::block_pass`]).
pub struct BlockPass(Step);

/// A model of any supported family (the name is historical: Llama is the family the others
/// extend).
pub struct Llama {
    cfg: ModelConfig,
    device: Device,
    kind: Kind,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    score: Option<Tensor>,
    inv_freq: Tensor,
    /// Every parameter under its Hugging Face name (shallow handles onto the same storage).
    params: Vec<(String, Tensor)>,
    /// CUDA: the decode step of the last generation (its cache and graphs), kept for the next
    /// generation of the same shape.
    decode_step: std::sync::Mutex<Option<crate::decode_step::DecodeStep>>,
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
        let mut store = Store::take(&cfg, tensors, device, kind, source)?;
        // Blocks stack q/k/v and gate/up; the store's entries become views of the stacks.
        let blocks = (0..cfg.num_hidden_layers).map(|l| Block::new(&cfg, &mut store, l)).collect();
        Ok(Llama {
            embed: store.get(Part::Embed),
            norm: store.get(Part::FinalNorm),
            lm_head: store.opt(Part::LmHead),
            score: store.opt(Part::Score),
            inv_freq: rope::inv_freq(&cfg).to_device(device),
            blocks,
            params: store.named(),
            decode_step: std::sync::Mutex::new(None),
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

    /// Runs `f` with a decode step of `slots` slots and a cache of `capacity` positions. On
    /// CUDA the step (its cache and captured graphs) is kept for the next call of the same
    /// shape; on the CPU, or while another generation holds it, a fresh step is made.
    pub fn with_decode_step<R>(
        &self,
        slots: i64,
        capacity: i64,
        f: impl FnOnce(&mut crate::decode_step::DecodeStep) -> R,
    ) -> R {
        use crate::decode_step::DecodeStep;
        if self.device == Device::Cpu {
            return f(&mut DecodeStep::new(self, slots, capacity));
        }
        let Ok(mut kept) = self.decode_step.try_lock() else {
            return f(&mut DecodeStep::new(self, slots, capacity));
        };
        if !kept.as_ref().is_some_and(|s| s.slots() == slots && s.capacity() == capacity) {
            // Free the old cache and graphs before the new cache is allocated.
            *kept = None;
            *kept = Some(DecodeStep::new(self, slots, capacity));
        }
        f(kept.as_mut().expect("just made"))
    }

    /// The kept decode step's mode, graph captures and replays (CUDA; `None` before the first
    /// generation, and always on the CPU, where steps are not kept).
    pub fn decode_step_stats(&self) -> Option<(crate::decode_step::StepMode, u64, u64)> {
        let kept = self.decode_step.lock().ok()?;
        kept.as_ref().map(|s| (s.mode(), s.captures, s.replays))
    }

    /// Copies every parameter's values from a model of the same shape (weight sync).
    pub fn copy_weights_from(&mut self, other: &Llama) -> Result<()> {
        if other.params.len() != self.params.len() {
            return Err(PolicyError::InvalidInput("weight sync between different models".into()));
        }
        self.copy_named_from(&other.params)
    }

    /// Copies named tensors, one per parameter in [`parameters`](Self::parameters)' order with
    /// the same names and shapes, into the parameters: device to device, converting the dtype,
    /// without recording gradients.
    pub fn copy_named_from(&mut self, src: &[(String, Tensor)]) -> Result<()> {
        if src.len() != self.params.len() {
            return Err(PolicyError::InvalidInput(format!(
                "weight copy: {} tensors for {} parameters",
                src.len(),
                self.params.len()
            )));
        }
        tch::no_grad(|| {
            for ((n, dst), (m, src)) in self.params.iter().zip(src) {
                if n != m || dst.size() != src.size() {
                    return Err(PolicyError::WeightMismatch {
                        name: n.clone(),
                        message: format!("cannot copy from {m} {:?}", src.size()),
                    });
                }
                let mut d = dst.shallow_clone();
                d.f_copy_(src)?;
            }
            Ok(())
        })
    }

    /// SHA-256 over every parameter's name, shape, dtype and bytes, in a fixed order: equal
    /// digests mean bit-identical weights (one full read of the weights through host memory).
    pub fn weights_digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (n, t) in &self.params {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let numel = t.numel();
            let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, numel)?;
            h.update(format!("{n}:{:?}:{:?}:", t.size(), t.kind()).as_bytes());
            h.update(&bytes);
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
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
            shared: false,
            span: capacity,
            cos: cos.view([capacity, hd]),
            sin: sin.view([capacity, hd]),
        }
    }

    /// Rotary tables for positions [B, T]: cos and sin of shape [B, 1, T, head_dim].
    fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        rope::tables(&self.inv_freq, positions, self.kind)
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
        let hd = self.cfg.head_dim;
        if let Some(c) = cache.as_deref() {
            c.check_room(t)?;
            if matches!(mask, AttnMask::Causal) && (c.slotted || c.len > 0) {
                return Err(PolicyError::InvalidInput(
                    "causal attention without a mask needs an empty contiguous cache".into(),
                ));
            }
        }
        let mut x = self.embed(ids)?;
        let (cos, sin) = match cache.as_deref() {
            // Tables built once per cache; a lookup per step instead of trigonometry.
            Some(c) if !c.shared => {
                let flat = positions.reshape([-1]);
                let pick = |tab: &Tensor| tab.index_select(0, &flat).view([b, 1, t, hd]);
                (pick(&c.cos), pick(&c.sin))
            }
            _ => self.rope_tables(positions),
        };
        // Projections without gradients use the stacked q/k/v and gate/up weights (one GEMM
        // each instead of three and two). Decoding a few rows on the CPU uses the
        // weight-on-the-left GEMM. Training keeps the per-name weights, which own the gradients.
        let few_rows = self.device == Device::Cpu && b * t <= FEW_ROWS && cache.is_some();
        let step = Step::new(&self.cfg, mask, positions, cos, sin, b, t, few_rows);
        for block in &self.blocks {
            x = block.forward(&x, &step, cache.as_deref_mut())?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(self.final_norm(&x))
    }

    /// The trunk over sequences that may begin alike: when at least [`MIN_SHARED_PREFIX`] of
    /// their first tokens (and at most `max_prefix`) are common to all of them, those go
    /// through the trunk once, as a batch of one, and every row's remainder attends to their
    /// keys ([`KvCache::share_rows`]). Returns the hidden states [B, T - P, H] of the
    /// right-padded remainders and P (0 when nothing is shared: then this is
    /// [`forward_hidden`](Self::forward_hidden) over the right-padded batch). Without gradients:
    /// for inference (judges, reward and reference scoring), where many prompts open with the
    /// same system prompt and rubric.
    pub fn forward_hidden_shared(&self, seqs: &[Vec<i64>], max_prefix: usize) -> Result<(Tensor, i64)> {
        // Every row keeps at least one token of its own.
        let shortest = seqs.iter().map(|s| s.len()).min().unwrap_or(0);
        let p = common_prefix(seqs).min(max_prefix).min(shortest.saturating_sub(1));
        if seqs.len() < 2 || p < MIN_SHARED_PREFIX {
            let batch = PaddedBatch::right_padded(seqs, 0, self.device)?;
            return Ok((self.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?, 0));
        }
        let p64 = p as i64;
        let mut cache = self.new_cache(1, p64);
        let head = Tensor::from_slice(&seqs[0][..p]).view([1, p64]).to_device(self.device);
        let pos = Tensor::arange(p64, (Kind::Int64, self.device)).unsqueeze(0);
        let _ = self.forward_hidden(&head, &pos, &AttnMask::Causal, Some(&mut cache))?;
        let mut shared = cache.share_rows()?;
        let rest: Vec<Vec<i64>> = seqs.iter().map(|s| s[p..].to_vec()).collect();
        let batch = PaddedBatch::right_padded(&rest, 0, self.device)?;
        let t = batch.ids.size()[1];
        let mask = AttnMask::Explicit(prefix_causal_mask(p64, t, self.device));
        let hidden = self.forward_hidden(&batch.ids, &(&batch.positions + p64), &mask, Some(&mut shared))?;
        Ok((hidden, p64))
    }

    /// The token embeddings [B, T, H] of `ids` [B, T]: the first block's input.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(&self.embed, ids, -1, false, false)?)
    }

    /// The number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// What every block of one pass without a cache shares (rotary tables, masks), for running
    /// the blocks one at a time with [`forward_block`](Self::forward_block): gradient
    /// checkpointing keeps each block's input and recomputes the block in the backward pass.
    /// `positions` [B, T] int64.
    pub fn block_pass(&self, positions: &Tensor, mask: &AttnMask) -> Result<BlockPass> {
        let (b, t) = positions.size2()?;
        let (cos, sin) = self.rope_tables(positions);
        Ok(BlockPass(Step::new(&self.cfg, mask, positions, cos, sin, b, t, false)))
    }

    /// Block `layer` applied to its input `x` [B, T, H]; the blocks in order, between
    /// [`embed`](Self::embed) and [`final_norm`](Self::final_norm), are
    /// [`forward_hidden`](Self::forward_hidden) without a cache, bit for bit.
    pub fn forward_block(&self, layer: usize, x: &Tensor, pass: &BlockPass) -> Result<Tensor> {
        let block = self.blocks.get(layer).ok_or_else(|| {
            PolicyError::InvalidInput(format!("block {layer} of a model with {} blocks", self.blocks.len()))
        })?;
        block.forward(x, &pass.0, None)
    }

    /// The final RMSNorm, applied to the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' LlamaRMSNorm, op by op.
    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        w * (xf * (var + eps).rsqrt()).to_kind(x.kind())
    }

    #[test]
    fn fused_rms_norm_rounds_as_transformers_does() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = (Tensor::randn([3, 7, 96], (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind);
            let w = (Tensor::randn([96], (Kind::Float, Device::Cpu)) * 0.3 + 1.0).to_kind(kind);
            assert!(rms_norm(&x, &w, 1e-5).equal(&reference(&x, &w, 1e-5)), "{kind:?}");
        }
    }

    #[test]
    fn fused_rms_norm_has_the_reference_gradients() {
        let x = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = (Tensor::randn([32], (Kind::Float, Device::Cpu)) * 0.3 + 1.0).set_requires_grad(true);
        let up = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        let grads = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let gs = Tensor::run_backward(&[(f(&x, &w) * &up).sum(Kind::Float)], &[&x, &w], false, false);
            (gs[0].shallow_clone(), gs[1].shallow_clone())
        };
        let (gx, gw) = grads(&|x, w| rms_norm(x, w, 1e-5));
        let (rx, rw) = grads(&|x, w| reference(x, w, 1e-5));
        assert!(gx.allclose(&rx, 1e-5, 1e-6, false) && gw.allclose(&rw, 1e-5, 1e-6, false));
    }
}
