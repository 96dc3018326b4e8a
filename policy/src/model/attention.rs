//! Grouped-query self-attention with rotary embeddings, optional per-head q/k RMSNorm (Qwen3)
//! and an optional sliding window (Mistral; Qwen2/Qwen3 with `use_sliding_window`).
use super::cache::KvCache;
use super::names::{LayerPart, Part, Store};
use super::proj::{Fused, Proj};
use super::{rms_norm, rope, AttnMask};
use crate::config::ModelConfig;
use crate::error::Result;
use tch::{Kind, Tensor};

/// A mask ready for the attention kernel.
pub enum LayerMask {
    /// Causal over the call's own keys, no mask tensor (the fused kernels apply).
    Causal,
    /// [B or 1, 1, T, S], true = may attend.
    Plain(Tensor),
    /// The same with the query heads that share a key/value head folded into the query
    /// dimension: [B, 1, group * T, S].
    Grouped(Tensor),
}

/// What every layer of one forward pass shares: shapes, rotary tables, masks.
pub struct Step {
    pub b: i64,
    pub t: i64,
    pub cos: Tensor,
    pub sin: Tensor,
    pub positions: Tensor,
    /// Decoding a few rows on the CPU: projections use the weight-on-the-left GEMM.
    pub few_rows: bool,
    full: LayerMask,
    windowed: Vec<(i64, LayerMask)>,
}

impl Step {
    /// Prepares the caller's mask once for all layers, and a windowed copy for each window
    /// size the layers use.
    ///
    /// Sliding windows count positions: a query at position p sees keys at p - w + 1 ..= p.
    /// Under [`AttnMask::Causal`] key j of the call is at position j (as in every right-padded
    /// batch and every prefill from position 0); under [`AttnMask::Explicit`] key index j is
    /// taken to be position j, which holds in a slot cache, and the queries are at `positions`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &ModelConfig,
        mask: &AttnMask,
        positions: &Tensor,
        cos: Tensor,
        sin: Tensor,
        b: i64,
        t: i64,
        few_rows: bool,
    ) -> Self {
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let prepare = |m: Option<Tensor>| match m {
            None => LayerMask::Causal,
            Some(m) if group > 1 => {
                // Grouped-query attention under a mask: the query heads that share a key/value
                // head go into the query-length dimension, so the cache is never repeated and no
                // `enable_gqa` kernel restriction applies.
                let s = m.size()[3];
                let mb = m.size()[0].max(b);
                LayerMask::Grouped(m.unsqueeze(2).expand([mb, 1, group, t, s], false).reshape([mb, 1, group * t, s]))
            }
            Some(m) => LayerMask::Plain(m),
        };
        let dev = positions.device();
        let mut windows: Vec<i64> = cfg.layer_windows.iter().flatten().copied().collect();
        windows.sort_unstable();
        windows.dedup();
        let windowed = windows
            .into_iter()
            .map(|w| {
                let m = match mask {
                    // Within the window already: the mask-free causal path stays.
                    AttnMask::Causal if t <= w => None,
                    AttnMask::Causal => {
                        let q = Tensor::arange(t, (Kind::Int64, dev)).view([t, 1]);
                        let k = Tensor::arange(t, (Kind::Int64, dev)).view([1, t]);
                        Some(k.le_tensor(&q).logical_and(&k.gt_tensor(&(q - w))).view([1, 1, t, t]))
                    }
                    AttnMask::Explicit(m) => {
                        let s = m.size()[3];
                        let k = Tensor::arange(s, (Kind::Int64, dev)).view([1, 1, 1, s]);
                        let q = positions.view([b, 1, t, 1]);
                        Some(m.logical_and(&k.gt_tensor(&(q - w))))
                    }
                };
                (w, prepare(m))
            })
            .collect();
        let full = prepare(match mask {
            AttnMask::Causal => None,
            AttnMask::Explicit(m) => Some(m.shallow_clone()),
        });
        Step { b, t, cos, sin, positions: positions.shallow_clone(), few_rows, full, windowed }
    }

    fn mask(&self, window: Option<i64>) -> &LayerMask {
        match window {
            None => &self.full,
            Some(w) => &self.windowed.iter().find(|(x, _)| *x == w).expect("every layer's window is prepared").1,
        }
    }
}

pub struct Attention {
    /// q, k and v, stacked.
    qkv: Fused,
    o: Proj,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    window: Option<i64>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    eps: f64,
}

impl Attention {
    pub fn new(cfg: &ModelConfig, store: &mut Store, l: i64) -> Self {
        use LayerPart::*;
        let p = |x| Part::Layer(l, x);
        Attention {
            qkv: Fused::new(store, &[(p(Q), p(QBias)), (p(K), p(KBias)), (p(V), p(VBias))]),
            o: Proj::new(store, p(O), p(OBias)),
            q_norm: store.opt(p(QNorm)),
            k_norm: store.opt(p(KNorm)),
            window: cfg.layer_windows[l as usize],
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
        }
    }

    /// Attention output [B, T, H] for normed hidden states `h` [B, T, H]; with a cache, this
    /// layer's (cache, index) receives the new keys and values.
    pub fn forward(&self, h: &Tensor, step: &Step, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let (b, t, nh, nkv, hd) = (step.b, step.t, self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv.forward(h, step.few_rows);
        let split = |y: &Tensor, n: i64, norm: &Option<Tensor>| {
            let y = y.view([b, t, n, hd]);
            let y = match norm {
                Some(w) => rms_norm(&y, w, self.eps),
                None => y,
            };
            y.transpose(1, 2)
        };
        let q = rope::apply(&split(&qkv[0], nh, &self.q_norm), &step.cos, &step.sin);
        let k = rope::apply(&split(&qkv[1], nkv, &self.k_norm), &step.cos, &step.sin);
        let v = split(&qkv[2], nkv, &None);
        let (k, v) = match cache {
            Some((c, l)) => c.store(l, &k, &v, &step.positions),
            None => (k, v),
        };
        let scale = Some(1.0 / (hd as f64).sqrt());
        let group = nh / nkv;
        let attn = match step.mask(self.window) {
            LayerMask::Causal => {
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, scale, group > 1)?
            }
            LayerMask::Grouped(gm) => {
                let qg = q.reshape([b, nkv, group * t, hd]);
                Tensor::f_scaled_dot_product_attention(&qg, &k, &v, Some(gm), 0.0, false, scale, false)?
                    .reshape([b, nh, t, hd])
            }
            LayerMask::Plain(m) => {
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false)?
            }
        };
        let attn = attn.transpose(1, 2).reshape([b, t, nh * hd]);
        Ok(self.o.forward_rows(&attn, step.few_rows && self.o.frozen()))
    }
}
