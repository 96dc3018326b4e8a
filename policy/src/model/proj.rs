//! Linear projections: one weight with an optional bias, and projections of the same input
//! stacked along their output rows so that inference runs one GEMM instead of several.
use super::names::{Part, Store};
use tch::Tensor;

/// Decoding steps on the CPU with at most this many rows use [`linear_few_rows`].
pub const FEW_ROWS: i64 = 64;

/// `x W^T` for a few rows, computed as `(W x^T)^T`. With the weight as the left operand MKL
/// streams it once instead of re-packing the whole matrix on every call, which is what a
/// decoding step with a handful of rows spends most of its time on (BENCHMARKS.md). The result
/// is made contiguous: attention's fast kernels want it so.
pub fn linear_few_rows(x: &Tensor, w: &Tensor) -> Tensor {
    let mut shape = x.size();
    let last = shape.len() - 1;
    let x2 = x.reshape([-1, shape[last]]);
    shape[last] = w.size()[0];
    w.matmul(&x2.tr()).tr().contiguous().view(shape.as_slice())
}

/// `y = x W^T + b`.
pub struct Proj {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Proj {
    pub fn new(store: &Store, weight: Part, bias: Part) -> Self {
        Proj { weight: store.get(weight), bias: store.opt(bias) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// As [`forward`](Self::forward), through [`linear_few_rows`] when `few_rows`.
    pub fn forward_rows(&self, x: &Tensor, few_rows: bool) -> Tensor {
        if !few_rows {
            return self.forward(x);
        }
        let y = linear_few_rows(x, &self.weight);
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }

    /// Whether gradients are off (the stacked weights of [`Fused`] hold none).
    pub fn frozen(&self) -> bool {
        !self.weight.requires_grad()
    }
}

/// Projections of one input stacked along their output rows. The per-name parameters are row
/// ranges (views) of the stack, so that every in-place update (optimizer, weight sync,
/// checkpoint load) reaches both. Without gradients one GEMM computes all parts; with them the
/// per-name weights, which own the gradients, compute each part.
pub struct Fused {
    stacked: Proj,
    parts: Vec<Proj>,
    widths: Vec<i64>,
}

/// Stacks tensors along dimension 0 and returns the stack with views of its row ranges.
fn stack_rows(parts: &[Tensor]) -> (Tensor, Vec<Tensor>) {
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

impl Fused {
    /// Stacks the given (weight, bias) parts; the store's entries become views of the stack.
    /// Biases are stacked when every part has one (a config gives all or none).
    pub fn new(store: &mut Store, parts: &[(Part, Part)]) -> Self {
        let weights: Vec<Tensor> = parts.iter().map(|(w, _)| store.get(*w)).collect();
        let (w_stack, w_views) = stack_rows(&weights);
        let biases: Option<Vec<Tensor>> = parts.iter().map(|(_, b)| store.opt(*b)).collect();
        let b_stack = biases.map(|biases| {
            let (b_stack, b_views) = stack_rows(&biases);
            for ((_, b), v) in parts.iter().zip(b_views) {
                store.replace(*b, v);
            }
            b_stack
        });
        let widths = w_views.iter().map(|v| v.size()[0]).collect();
        for ((w, _), v) in parts.iter().zip(w_views) {
            store.replace(*w, v);
        }
        Fused {
            stacked: Proj { weight: w_stack, bias: b_stack },
            parts: parts.iter().map(|(w, b)| Proj::new(store, *w, *b)).collect(),
            widths,
        }
    }

    /// Each part's output, along the last dimension of `x`.
    pub fn forward(&self, x: &Tensor, few_rows: bool) -> Vec<Tensor> {
        if !self.parts[0].frozen() {
            return self.parts.iter().map(|p| p.forward(x)).collect();
        }
        let y = self.stacked.forward_rows(x, few_rows);
        let last = y.dim() as i64 - 1;
        let mut at = 0;
        self.widths
            .iter()
            .map(|&w| {
                let part = y.narrow(last, at, w);
                at += w;
                part
            })
            .collect()
    }
}
