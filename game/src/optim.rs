//! AdamW with global gradient-norm clipping, with its state held here so that it can be saved
//! and restored exactly (resuming is bit-identical on CPU). The update is torch.optim.AdamW's
//! fused kernel (`_fused_adamw_`, through selfplay-torch-ext): decoupled weight decay and
//! bias-corrected moments for every parameter in one call, where the written-out update was
//! eight kernels per parameter (~3,000 launches per step for a 3B model on CUDA). Clipping is
//! torch.nn.utils.clip_grad_norm_ with foreach norms and scaling. Parameters held in bf16 get
//! f32 master copies, or updates of lr ~ 1e-6 would round away.
use crate::error::{GameError, Result};
use selfplay_policy::weights;
use selfplay_torch_ext::foreach::{self, AdamWHyper};
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
    /// The step count the fused kernel reads, one f32 element per parameter's device.
    steps: Vec<Tensor>,
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
            steps: params.iter().map(|(_, p)| Tensor::zeros([1], (Kind::Float, p.device()))).collect(),
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max_norm` (0 = no clipping)
    /// and returns the norm before clipping.
    pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
            if grads.is_empty() {
                return 0.0;
            }
            // Each norm accumulated in f32 (a bf16 gradient without an f32 copy of it).
            let norms = foreach::norms_f32(&grads).expect("gradient norms of defined gradients");
            // The norms combined in f64 (as learner ranks combine their shards), then f32.
            let total = norms.to_kind(Kind::Double).square().sum(Kind::Double).sqrt().to_kind(Kind::Float);
            if max_norm > 0.0 {
                let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
                // Grouped by dtype: the foreach scaling takes one scale tensor per list.
                for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
                    let group: Vec<Tensor> =
                        grads.iter().filter(|g| g.kind() == kind).map(|g| g.shallow_clone()).collect();
                    foreach::mul_(&group, &coef.to_kind(kind)).expect("gradient scaling");
                }
            }
            total.double_value(&[])
        })
    }

    /// One update from the parameters' gradients, then clears them: one fused AdamW call over
    /// every parameter that has a gradient (the f32 masters where a parameter is bf16, with its
    /// gradient widened into one f32 temporary), then the bf16 copies of the masters and the
    /// zeroing of the gradients, each one foreach call.
    pub fn step(&mut self, params: &[(String, Tensor)]) {
        self.t += 1;
        let h = AdamWHyper {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        };
        tch::no_grad(|| {
            for s in &self.steps {
                let _ = s.shallow_clone().fill_(self.t as f64);
            }
            let (mut targets, mut grads, mut m, mut v, mut steps) = (vec![], vec![], vec![], vec![], vec![]);
            let (mut low, mut masters, mut all_grads) = (vec![], vec![], vec![]);
            for (i, (_, p)) in params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                match &self.master[i] {
                    Some(master) => {
                        targets.push(master.shallow_clone());
                        grads.push(g.to_kind(Kind::Float));
                        low.push(p.shallow_clone());
                        masters.push(master.shallow_clone());
                    }
                    None => {
                        targets.push(p.shallow_clone());
                        grads.push(g.shallow_clone());
                    }
                }
                m.push(self.exp_avg[i].shallow_clone());
                v.push(self.exp_avg_sq[i].shallow_clone());
                steps.push(self.steps[i].shallow_clone());
                all_grads.push(g);
            }
            foreach::fused_adamw(&targets, &grads, &m, &v, &steps, h).expect("AdamW over the model's own parameters");
            foreach::copy_(&low, &masters).expect("bf16 weights from their masters");
            foreach::zero_(&all_grads).expect("clearing gradients");
        });
    }

    /// The moments and master weights (`None` where the parameter itself is f32), per
    /// parameter in the order given to [`AdamW::new`].
    pub fn state(&self) -> (&[Tensor], &[Tensor], &[Option<Tensor>]) {
        (&self.exp_avg, &self.exp_avg_sq, &self.master)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32], kind: Kind) -> Tensor {
        Tensor::from_slice(values).to_kind(kind).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        // A backward pass of sum(p * g) leaves exactly g (in p's kind) as p's gradient.
        let g = Tensor::from_slice(g).to_kind(p.kind());
        let mut old = p.grad();
        if old.defined() {
            let _ = old.zero_();
        }
        (p * g).sum(p.kind()).backward();
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach().to_kind(Kind::Float)).unwrap()
    }

    /// torch.optim.AdamW's update written out in f64 for one parameter.
    fn textbook(p0: &[f32], grads: &[Vec<f32>], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) -> Vec<f64> {
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                let g = g[i] as f64;
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
                p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
        }
        p
    }

    #[test]
    fn in_place_update_is_adamw() {
        let p0 = [0.5f32, -1.25, 3.0, 0.0, -0.001];
        let grads: Vec<Vec<f32>> =
            (0..5).map(|s| (0..5).map(|i| ((s * 7 + i * 3) % 11) as f32 * 0.1 - 0.45).collect()).collect();
        let p = param(&p0, Kind::Float);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let mut opt = AdamW::new(&params, 1e-2, 0.9, 0.999, 1e-8, 0.1);
        for g in &grads {
            set_grad(&p, g);
            opt.step(&params);
            assert!(floats(&p.grad()).iter().all(|&x| x == 0.0), "the step clears the gradient");
        }
        let want = textbook(&p0, &grads, 1e-2, 0.9, 0.999, 1e-8, 0.1);
        for (got, want) in floats(&p).iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "{got} vs {want}");
        }
        assert_eq!(opt.t, grads.len() as u64);
    }

    #[test]
    fn bf16_parameters_keep_f32_masters() {
        // Updates of about lr = 1e-5 on weights near 1: far below bf16's resolution there
        // (2^-7), so a bf16 parameter updated directly would never move.
        let p0 = [1.0f32, -1.0, 0.75, 2.0];
        let grads: Vec<Vec<f32>> = (0..300).map(|_| vec![0.5, -0.25, 1.0, -0.5]).collect();
        let (lr, wd) = (1e-5, 0.0);
        let p16 = param(&p0, Kind::BFloat16);
        let p32 = param(&p0, Kind::Float);
        let (params16, params32) =
            (vec![("w".to_string(), p16.shallow_clone())], vec![("w".to_string(), p32.shallow_clone())]);
        let mut o16 = AdamW::new(&params16, lr, 0.9, 0.999, 1e-8, wd);
        let mut o32 = AdamW::new(&params32, lr, 0.9, 0.999, 1e-8, wd);
        assert!(o16.master[0].is_some() && o32.master[0].is_none());
        for g in &grads {
            set_grad(&p16, g);
            set_grad(&p32, g);
            assert_eq!(p16.grad().kind(), Kind::BFloat16);
            o16.step(&params16);
            o32.step(&params32);
        }
        // The gradients are exact in bf16, so the master follows the f32 run bit for bit...
        let master = o16.master[0].as_ref().unwrap();
        assert_eq!(master.kind(), Kind::Float);
        assert!(master.equal(&p32), "master {:?} vs f32 run {:?}", floats(master), floats(&p32));
        // ... the moments are f32 ...
        assert_eq!(o16.exp_avg[0].kind(), Kind::Float);
        assert_eq!(o16.exp_avg_sq[0].kind(), Kind::Float);
        // ... and the bf16 weights are the masters rounded, which moved by about 300 x 1e-5.
        assert!(p16.detach().equal(&master.to_kind(Kind::BFloat16)));
        assert!(floats(master).iter().zip(&p0).all(|(m, p)| (m - p).abs() > 2e-4));
        assert!(!p16.detach().to_kind(Kind::Float).equal(&Tensor::from_slice(&p0)), "the bf16 weights moved");
    }

    #[test]
    fn load_writes_into_place_and_a_mismatch_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = param(&[0.5, -1.0, 2.0], Kind::BFloat16);
        let q = param(&[1.0, 2.0], Kind::Float);
        let params = vec![("p".to_string(), p.shallow_clone()), ("q".to_string(), q.shallow_clone())];
        let mut opt = AdamW::new(&params, 1e-2, 0.9, 0.999, 1e-8, 0.0);
        for g in [[0.25f32, -0.5, 1.0], [1.0, 0.5, -0.25]] {
            set_grad(&p, &g);
            set_grad(&q, &g[..2]);
            opt.step(&params);
        }
        let path = tmp.path().join("opt.safetensors");
        opt.save(&path).unwrap();

        let mut fresh = AdamW::new(&params, 1e-2, 0.9, 0.999, 1e-8, 0.0);
        let ptrs = |o: &AdamW| {
            let mut v: Vec<usize> = o.exp_avg.iter().chain(&o.exp_avg_sq).map(|t| t.data_ptr() as usize).collect();
            v.extend(o.master.iter().flatten().map(|t| t.data_ptr() as usize));
            v
        };
        let before = ptrs(&fresh);
        fresh.load(&path, opt.t).unwrap();
        assert_eq!(ptrs(&fresh), before, "the state was loaded into the tensors already there");
        for i in 0..2 {
            assert!(fresh.exp_avg[i].equal(&opt.exp_avg[i]) && fresh.exp_avg_sq[i].equal(&opt.exp_avg_sq[i]));
        }
        assert!(fresh.master[0].as_ref().unwrap().equal(opt.master[0].as_ref().unwrap()));
        assert_eq!(fresh.t, 2);

        // A file of another model: the error names the entry, and nothing was overwritten.
        let other = vec![("p".to_string(), param(&[0.0, 0.0], Kind::BFloat16)), ("q".to_string(), q.shallow_clone())];
        let wrong = AdamW::new(&other, 1e-2, 0.9, 0.999, 1e-8, 0.0);
        let wrong_path = tmp.path().join("wrong.safetensors");
        wrong.save(&wrong_path).unwrap();
        let mut third = AdamW::new(&params, 1e-2, 0.9, 0.999, 1e-8, 0.0);
        third.load(&path, 2).unwrap();
        let e = third.load(&wrong_path, 7).unwrap_err().to_string();
        assert!(e.contains("p.exp_avg") && e.contains("shape"), "{e}");
        assert_eq!(third.t, 2);
        assert!(third.exp_avg[1].equal(&opt.exp_avg[1]), "q's moments were overwritten by a refused file");
        let missing = tmp.path().join("missing.safetensors");
        weights::save_tensors(&missing, [("q.exp_avg", &opt.exp_avg[1])]).unwrap();
        let e = third.load(&missing, 7).unwrap_err().to_string();
        assert!(e.contains("p.exp_avg"), "{e}");
        assert!(third.exp_avg[1].equal(&opt.exp_avg[1]));
        let _ = Device::Cpu;
    }
}
