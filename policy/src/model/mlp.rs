//! The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).
use super::names::{LayerPart, Part, Store};
use super::proj::{Fused, Proj};
use tch::Tensor;

pub struct Mlp {
    /// gate and up, stacked.
    gate_up: Fused,
    down: Proj,
}

impl Mlp {
    pub fn new(store: &mut Store, l: i64) -> Self {
        let p = |x| Part::Layer(l, x);
        use LayerPart::*;
        Mlp {
            gate_up: Fused::new(store, &[(p(Gate), p(GateBias)), (p(Up), p(UpBias))]),
            down: Proj::new(store, p(Down), p(DownBias)),
        }
    }

    pub fn forward(&self, x: &Tensor, few_rows: bool) -> Tensor {
        let gu = self.gate_up.forward(x, few_rows);
        // down_proj stays a plain linear: the weight-on-the-left form measured slower for it.
        self.down.forward(&(gu[0].silu() * &gu[1]))
    }
}
