//! AdamW with global gradient-norm clipping, written out so that its state can be saved and
//! restored exactly (resuming is bit-identical on CPU). Same arithmetic as torch.optim.AdamW
//! (decoupled weight decay, bias-corrected moments) and torch.nn.utils.clip_grad_norm_.
//! Parameters held in bf16 get f32 master copies, or updates of lr ~ 1e-6 would round away.
use crate::error::{GameError, Result};
use selfplay_policy::weights;
use std::path::Path;
use tch::{Kind, Tensor};

pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates done so far.
    pub t: u64,
    names: Vec<String>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    master: Vec<Option<Tensor>>,
}

impl AdamW {
    pub fn new(params: &[(String, Tensor)], lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros(p.size(), (Kind::Float, p.device()));
        AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            exp_avg: params.iter().map(|(_, p)| zeros(p)).collect(),
            exp_avg_sq: params.iter().map(|(_, p)| zeros(p)).collect(),
            master: params
                .iter()
                .map(|(_, p)| (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float)))
                .collect(),
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max_norm` (0 = no clipping)
    /// and returns the norm before clipping.
    pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = params
                .iter()
                .map(|(_, p)| p.grad())
                .filter(|g| g.defined())
                .map(|g| match g.kind() {
                    Kind::Float => g.norm(),
                    // Accumulated in f32 without an f32 copy of the gradient.
                    _ => g.norm_scalaropt_dtype(2, Kind::Float),
                })
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            let total = Tensor::stack(&norms, 0).norm();
            if max_norm > 0.0 {
                let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
                for (_, p) in params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_(&coef.to_kind(g.kind()));
                    }
                }
            }
            total.double_value(&[])
        })
    }

    /// One update from the parameters' gradients, then clears them. Everything is in place:
    /// an f32 gradient is itself the scratch space (it is cleared afterwards anyway), so an
    /// f32 parameter's update allocates nothing of its size; a bf16 gradient is widened into
    /// one f32 temporary, which then serves as the scratch.
    pub fn step(&mut self, params: &[(String, Tensor)]) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step_size = self.lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        tch::no_grad(|| {
            for (i, (_, p)) in params.iter().enumerate() {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut scratch = if g.kind() == Kind::Float { g.shallow_clone() } else { g.to_kind(Kind::Float) };
                let mut target = match &self.master[i] {
                    Some(m) => m.shallow_clone(),
                    None => p.shallow_clone(),
                };
                let _ = target.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
                // m = beta1 m + (1 - beta1) g, as torch.optim.AdamW writes it.
                let m = &mut self.exp_avg[i];
                let _ = m.lerp_(&scratch, 1.0 - self.beta1);
                // v = beta2 v + (1 - beta2) g^2, with g^2 squared in place.
                let _ = scratch.g_mul_(&scratch.shallow_clone());
                let v = &mut self.exp_avg_sq[i];
                let _ = v.lerp_(&scratch, 1.0 - self.beta2);
                // denom = sqrt(v) / sqrt(bc2) + eps, scaled by -1 / step_size so that
                // addcdiv (which has no factor in tch) subtracts step_size * m / denom.
                let _ = v.sqrt_out(&scratch);
                let _ = scratch.g_div_scalar_(bc2_sqrt);
                let _ = scratch.g_add_scalar_(self.eps);
                let _ = scratch.g_div_scalar_(-step_size);
                let _ = target.addcdiv_(m, &scratch);
                if self.master[i].is_some() {
                    let mut pp = p.shallow_clone();
                    let _ = pp.copy_(&target);
                }
                let _ = g.zero_();
            }
        });
    }

    /// Saves the moments (and master weights) as safetensors, keyed by parameter name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, &Tensor)> = vec![];
        for (i, n) in self.names.iter().enumerate() {
            named.push((format!("{n}.exp_avg"), &self.exp_avg[i]));
            named.push((format!("{n}.exp_avg_sq"), &self.exp_avg_sq[i]));
            if let Some(m) = &self.master[i] {
                named.push((format!("{n}.master"), m));
            }
        }
        weights::save_tensors(path, named.iter().map(|(n, t)| (n.as_str(), *t)))?;
        Ok(())
    }

    /// Restores the state written by [`AdamW::save`] for the same parameters, straight into
    /// the tensors this optimizer already holds: the device never has a second copy of the
    /// state, and a file that does not match (a missing or misshapen entry) changes nothing.
    pub fn load(&mut self, path: &Path, t: u64) -> Result<()> {
        let mut dst: Vec<(String, &Tensor)> = vec![];
        for (i, n) in self.names.iter().enumerate() {
            dst.push((format!("{n}.exp_avg"), &self.exp_avg[i]));
            dst.push((format!("{n}.exp_avg_sq"), &self.exp_avg_sq[i]));
            if let Some(m) = &self.master[i] {
                dst.push((format!("{n}.master"), m));
            }
        }
        weights::read_into(path, &dst).map_err(|e| GameError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("optimizer state: {e}"),
        })?;
        self.t = t;
        Ok(())
    }
}
