//! One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
use super::attention::{Attention, Step};
use super::cache::KvCache;
use super::mlp::Mlp;
use super::names::{LayerPart, Part, Store};
use super::rms_norm;
use crate::config::ModelConfig;
use crate::error::Result;
use tch::Tensor;

pub struct Block {
    index: usize,
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl Block {
    pub fn new(cfg: &ModelConfig, store: &mut Store, l: i64) -> Self {
        Block {
            index: l as usize,
            input_norm: store.get(Part::Layer(l, LayerPart::InputNorm)),
            attn: Attention::new(cfg, store, l),
            post_norm: store.get(Part::Layer(l, LayerPart::PostNorm)),
            mlp: Mlp::new(store, l),
            eps: cfg.rms_norm_eps,
        }
    }

    pub fn forward(&self, x: &Tensor, step: &Step, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_norm, self.eps);
        let x = x + self.attn.forward(&h, step, cache.map(|c| (c, self.index)))?;
        let h = rms_norm(&x, &self.post_norm, self.eps);
        Ok(&x + self.mlp.forward(&h, step.few_rows))
    }
}
