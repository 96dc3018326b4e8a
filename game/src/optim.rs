//! AdamW with global gradient-norm clipping, written out so that its state can be saved and
//! restored exactly (resuming is bit-identical on CPU). Same arithmetic as torch.optim.AdamW
//! (decoupled weight decay, bias-corrected moments) and torch.nn.utils.clip_grad_norm_.
//! Parameters held in bf16 get f32 master copies, or updates of lr ~ 1e-6 would round away.
use crate::error::{GameError, Result};
use selfplay_policy::weights;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

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
                .map(|g| g.to_kind(Kind::Float).norm())
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

    /// One update from the parameters' gradients, then clears them.
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
                let gf = g.to_kind(Kind::Float);
                let mut target = match &self.master[i] {
                    Some(m) => m.shallow_clone(),
                    None => p.shallow_clone(),
                };
                let _ = target.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
                let m = &mut self.exp_avg[i];
                let _ = m.g_mul_scalar_(self.beta1);
                let _ = m.g_add_(&(&gf * (1.0 - self.beta1)));
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(&gf * &gf * (1.0 - self.beta2)));
                let denom = v.sqrt() / bc2_sqrt + self.eps;
                let _ = target.g_sub_(&(&*m / denom * step_size));
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

    /// Restores the state written by [`AdamW::save`] for the same parameters.
    pub fn load(&mut self, path: &Path, t: u64, device: Device) -> Result<()> {
        let mut map: HashMap<String, Tensor> =
            weights::load_tensors(&[path.to_path_buf()], Kind::Float, device, |_| true)?;
        let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
            let t = map.remove(&name).ok_or_else(|| GameError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("optimizer state has no {name}"),
            })?;
            if t.size() != like.size() {
                return Err(GameError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("{name} has shape {:?}, parameter has {:?}", t.size(), like.size()),
                });
            }
            Ok(t)
        };
        for i in 0..self.names.len() {
            let n = self.names[i].clone();
            self.exp_avg[i] = take(format!("{n}.exp_avg"), &self.exp_avg[i])?;
            self.exp_avg_sq[i] = take(format!("{n}.exp_avg_sq"), &self.exp_avg_sq[i])?;
            if let Some(m) = &self.master[i] {
                let loaded = take(format!("{n}.master"), m)?;
                self.master[i] = Some(loaded);
            }
        }
        self.t = t;
        Ok(())
    }
}
