//! Rotary position embeddings, with Llama-3 frequency scaling, in transformers' arithmetic.
use crate::config::ModelConfig;
use tch::{Device, Kind, Tensor};

/// The inverse frequencies [head_dim / 2] in f32 on the CPU.
pub fn inv_freq(cfg: &ModelConfig) -> Tensor {
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

/// Rotary tables for positions [B, T]: cos and sin of shape [B, 1, T, head_dim] in `kind`.
pub fn tables(inv_freq: &Tensor, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[x2.neg(), x1], 3)
}

/// Rotates `x` [B, heads, T, head_dim] by tables [B, 1, T, head_dim].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}
