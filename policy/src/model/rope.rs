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

/// Rotary tables for positions [B, T]: cos and the signed sin of shape [B, 1, T, head_dim] in
/// `kind`. The sin table's first half is negated, so that rotating is `x * cos + roll(x) * sin`
/// ([`apply`]): one roll instead of two slices, a negation and a concatenation per call.
pub fn tables(inv_freq: &Tensor, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    let sin = freqs.sin();
    let signed = Tensor::cat(&[-&sin, sin], -1).unsqueeze(1);
    (emb.cos().to_kind(kind), signed.to_kind(kind))
}

/// Rotates `x` [B, heads, T, head_dim] by tables [B, 1, T, head_dim] from [`tables`]:
/// transformers' `x * cos + rotate_half(x) * sin`, bit for bit (rotate_half(x) is roll(x) with
/// its first half negated, and the negation sits in the table; IEEE products are exact under
/// a sign change).
pub fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let mut out = x * cos;
    let _ = out.g_add_(&(x.roll([half], [3]) * signed_sin));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotate_half(x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3)
    }

    #[test]
    fn roll_with_a_signed_table_is_rotate_half_bit_for_bit() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let x = Tensor::randn([2, 3, 5, 16], (Kind::Float, Device::Cpu)).to_kind(kind);
            let inv = Tensor::rand([8], (Kind::Float, Device::Cpu));
            let positions = Tensor::arange(10, (Kind::Int64, Device::Cpu)).view([2, 5]) * 37;
            let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv.view([1, 1, -1]);
            let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
            let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
            let want = &x * &cos + rotate_half(&x) * &sin;
            let (c, s) = tables(&inv, &positions, kind);
            assert!(c.equal(&cos));
            assert!(apply(&x, &c, &s).equal(&want), "{kind:?}");
        }
    }
}
