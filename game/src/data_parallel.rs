//! Data-parallel learner ranks with sharded optimizer state (ZeRO stages 1 and 2), over
//! libtorch's own c10d (Gloo on the CPU, NCCL on CUDA; selfplay-torch-ext binds it).
//!
//! Every rank holds the whole model (bf16 or f32 weights) and runs forward and backward on its
//! share of the step's sequences ([`assign`]: balanced by tokens, in an order fixed by the
//! step, so a run is reproducible). The losses use the step's global denominators, so the
//! ranks' gradients sum to the one-process gradient. Then, per step:
//!
//! 1. the gradients, flattened into one f32 buffer of W equal shards, are reduce-scattered:
//!    rank r receives the sum of shard r only (ZeRO-2: no rank ever holds the whole reduced
//!    gradient);
//! 2. the global norm is the all-reduced sum of the shards' squared norms, and clipping
//!    scales each shard by the same factor;
//! 3. each rank updates its shard of the f32 master weights with its shard of the AdamW
//!    moments (ZeRO-1: 1/W of the 12 bytes per parameter of optimizer state per rank), with
//!    the same fused kernel as one process;
//! 4. the updated shards are all-gathered and copied into every rank's weights.
//!
//! Resident per rank: weights (2 or 4 bytes per parameter) + gradients (same) + 12/W bytes of
//! f32 master and moments, against 16 bytes (bf16) for one process. The optimizer state is
//! saved in [`crate::optim::AdamW`]'s format (gathered to rank 0), so a run resumes under any
//! number of ranks, or one.
use crate::error::{GameError, Result};
use selfplay_policy::weights;
use selfplay_torch_ext::dist::{ProcessGroup, ReduceOp};
use selfplay_torch_ext::foreach::{self, AdamWHyper};
use std::path::Path;
use tch::{Kind, Tensor};

fn dist_err(e: selfplay_torch_ext::ExtError) -> GameError {
    GameError::Distributed(e.to_string())
}

/// Which rank trains which sequence: sequences (by their token counts, in the step's order)
/// go longest first to the rank with the fewest tokens so far, ties to the lower index and
/// the lower rank. Every rank computes the same answer from the same step.
pub fn assign(tokens: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| tokens[b].cmp(&tokens[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world.max(1)];
    let mut owner = vec![0usize; tokens.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("at least one rank");
        load[r] += tokens[i];
        owner[i] = r;
    }
    owner
}

/// One rank's sharded AdamW and the collectives of a step.
pub struct DataParallel {
    pg: ProcessGroup,
    pub hyper: AdamWHyper,
    /// Updates done so far.
    pub t: u64,
    names: Vec<String>,
    /// Each parameter's (offset, elements, shape, kind) in the flat buffer.
    layout: Vec<(i64, i64, Vec<i64>, Kind)>,
    /// Elements per shard (the flat buffer is W shards, zero-padded at the end).
    shard: i64,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
}

impl DataParallel {
    /// Shards the optimizer state of `params` (the same parameters, in the same order, on every
    /// rank) over `pg`. The master shard starts from this rank's weights.
    pub fn new(pg: ProcessGroup, params: &[(String, Tensor)], hyper: AdamWHyper) -> Result<Self> {
        let mut layout = vec![];
        let mut offset = 0i64;
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(tch::Device::Cpu);
        for (_, p) in params {
            let n = p.numel() as i64;
            layout.push((offset, n, p.size(), p.kind()));
            offset += n;
        }
        let world = pg.size() as i64;
        let shard = (offset + world - 1) / world;
        let full = tch::no_grad(|| Self::flatten(params.iter().map(|(_, p)| p.detach()), shard * world, device));
        let master = full.narrow(0, pg.rank() as i64 * shard, shard).copy();
        Ok(DataParallel {
            hyper,
            t: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            layout,
            shard,
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            step: Tensor::zeros([1], (Kind::Float, device)),
            master,
            pg,
        })
    }

    pub fn rank(&self) -> usize {
        self.pg.rank()
    }
    pub fn world(&self) -> usize {
        self.pg.size()
    }
    pub fn group(&self) -> &ProcessGroup {
        &self.pg
    }

    /// The tensors, as f32, end to end in one buffer of `len` elements (zero-padded).
    fn flatten(ts: impl Iterator<Item = Tensor>, len: i64, device: tch::Device) -> Tensor {
        let mut parts: Vec<Tensor> = ts.map(|t| t.to_kind(Kind::Float).reshape([-1])).collect();
        let used: i64 = parts.iter().map(|t| t.numel() as i64).sum();
        if used < len {
            parts.push(Tensor::zeros([len - used], (Kind::Float, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Sums `values` over the ranks (f64 statistics of the step).
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.reduce(values, ReduceOp::Sum)
    }

    /// The largest of `values` over the ranks.
    pub fn max(&self, values: &mut [f64]) -> Result<()> {
        self.reduce(values, ReduceOp::Max)
    }

    fn reduce(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        // Statistics travel on the CPU with Gloo; on NCCL they go through the device.
        let dev = self.master.device();
        let t = Tensor::from_slice(values).to_device(dev);
        self.pg.all_reduce(&t, op).map_err(dist_err)?;
        let out =
            Vec::<f64>::try_from(t.to_device(tch::Device::Cpu)).map_err(|e| GameError::Distributed(e.to_string()))?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// Reduce-scatters the ranks' gradients of `params` and returns this rank's shard of their
    /// sum with the global gradient norm (before clipping). The gradients are cleared.
    pub fn reduce_gradients(&self, params: &[(String, Tensor)]) -> Result<(Tensor, f64)> {
        tch::no_grad(|| {
            let world = self.world() as i64;
            let dev = self.master.device();
            let grads = params.iter().zip(&self.layout).map(|((_, p), (_, n, _, _))| {
                let g = p.grad();
                if g.defined() {
                    g
                } else {
                    Tensor::zeros([*n], (Kind::Float, dev))
                }
            });
            let flat = Self::flatten(grads, self.shard * world, dev);
            let mine = Tensor::zeros([self.shard], (Kind::Float, dev));
            self.pg.reduce_scatter(&mine, &flat, ReduceOp::Sum).map_err(dist_err)?;
            let mut sq = [mine.square().sum(Kind::Double).double_value(&[])];
            self.sum(&mut sq)?;
            let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
            foreach::zero_(&grads).map_err(dist_err)?;
            Ok((mine, sq[0].sqrt()))
        })
    }

    /// Clips this rank's gradient shard to the global `norm` (`max_norm` 0 = no clipping),
    /// updates the shard of the masters, and all-gathers the updated weights into `params`.
    pub fn apply(&mut self, params: &[(String, Tensor)], grad_shard: &Tensor, norm: f64, max_norm: f64) -> Result<()> {
        tch::no_grad(|| {
            if max_norm > 0.0 {
                // As clip_grad_norm_: the factor computed in f32 from the f32 norm.
                let coef = (max_norm / (Tensor::from(norm as f32) + 1e-6)).clamp_max(1.0);
                let _ = grad_shard.shallow_clone().g_mul_(&coef.to_device(grad_shard.device()));
            }
            self.t += 1;
            let _ = self.step.fill_(self.t as f64);
            foreach::fused_adamw(
                &[self.master.shallow_clone()],
                &[grad_shard.shallow_clone()],
                &[self.exp_avg.shallow_clone()],
                &[self.exp_avg_sq.shallow_clone()],
                &[self.step.shallow_clone()],
                self.hyper,
            )
            .map_err(dist_err)?;
            let full = Tensor::zeros([self.shard * self.world() as i64], (Kind::Float, self.master.device()));
            self.pg.all_gather(&full, &self.master).map_err(dist_err)?;
            for ((_, p), (off, n, shape, _)) in params.iter().zip(&self.layout) {
                let _ = p.detach().copy_(&full.narrow(0, *off, *n).view(shape.as_slice()));
            }
            Ok(())
        })
    }

    /// Takes this rank's shard of a whole optimizer state held in memory (one process's
    /// [`crate::optim::AdamW::state`], identical on every rank) after `t` updates.
    pub fn take_shard(
        &mut self,
        exp_avg: &[Tensor],
        exp_avg_sq: &[Tensor],
        master: &[Option<Tensor>],
        params: &[(String, Tensor)],
        t: u64,
    ) {
        let len = self.shard * self.world() as i64;
        let start = self.rank() as i64 * self.shard;
        let dev = self.master.device();
        let mine = |parts: Vec<Tensor>| Self::flatten(parts.into_iter(), len, dev).narrow(0, start, self.shard).copy();
        let masters: Vec<Tensor> = master
            .iter()
            .zip(params)
            .map(|(m, (_, p))| m.as_ref().map_or_else(|| p.detach(), |m| m.shallow_clone()))
            .collect();
        tch::no_grad(|| {
            self.exp_avg.copy_(&mine(exp_avg.iter().map(|t| t.shallow_clone()).collect()));
            self.exp_avg_sq.copy_(&mine(exp_avg_sq.iter().map(|t| t.shallow_clone()).collect()));
            self.master.copy_(&mine(masters));
        });
        self.t = t;
    }

    /// Every rank's shard of `t`, gathered into the whole flat buffer.
    fn gather(&self, t: &Tensor) -> Result<Tensor> {
        let full = Tensor::zeros([self.shard * self.world() as i64], (Kind::Float, t.device()));
        self.pg.all_gather(&full, t).map_err(dist_err)?;
        Ok(full)
    }

    /// Writes the optimizer state in [`crate::optim::AdamW`]'s format (moments, and masters
    /// of parameters that are not f32) at `path`. Collective: every rank calls it; rank 0
    /// writes.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (m, v, w) = (self.gather(&self.exp_avg)?, self.gather(&self.exp_avg_sq)?, self.gather(&self.master)?);
        if self.rank() != 0 {
            return Ok(());
        }
        let mut named: Vec<(String, Tensor)> = vec![];
        for (name, (off, n, shape, kind)) in self.names.iter().zip(&self.layout) {
            let part = |t: &Tensor| t.narrow(0, *off, *n).view(shape.as_slice());
            named.push((format!("{name}.exp_avg"), part(&m)));
            named.push((format!("{name}.exp_avg_sq"), part(&v)));
            if *kind != Kind::Float {
                named.push((format!("{name}.master"), part(&w)));
            }
        }
        weights::save_tensors(path, named.iter().map(|(n, t)| (n.as_str(), t)))?;
        Ok(())
    }

    /// Takes this rank's shard of the state [`save`](Self::save) (or one process's AdamW)
    /// wrote, for the same parameters; `params` supplies the masters of f32 parameters (their
    /// weights are their masters). A file that does not match changes nothing.
    pub fn load(&mut self, path: &Path, t: u64, params: &[(String, Tensor)]) -> Result<()> {
        let dev = self.master.device();
        let mut m_parts = vec![];
        let mut v_parts = vec![];
        let mut w_parts = vec![];
        for ((name, p), (_, _, shape, kind)) in params.iter().zip(&self.layout) {
            let z = || Tensor::zeros(shape.as_slice(), (Kind::Float, dev));
            m_parts.push((format!("{name}.exp_avg"), z()));
            v_parts.push((format!("{name}.exp_avg_sq"), z()));
            w_parts.push(if *kind != Kind::Float {
                (Some(format!("{name}.master")), z())
            } else {
                (None, p.detach().copy())
            });
        }
        let mut dst: Vec<(String, &Tensor)> = vec![];
        for ((m, v), w) in m_parts.iter().zip(&v_parts).zip(&w_parts) {
            dst.push((m.0.clone(), &m.1));
            dst.push((v.0.clone(), &v.1));
            if let (Some(n), t) = w {
                dst.push((n.clone(), t));
            }
        }
        weights::read_into(path, &dst).map_err(|e| GameError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("optimizer state: {e}"),
        })?;
        let len = self.shard * self.world() as i64;
        let start = self.rank() as i64 * self.shard;
        let mine = |parts: Vec<Tensor>| Self::flatten(parts.into_iter(), len, dev).narrow(0, start, self.shard).copy();
        tch::no_grad(|| {
            self.exp_avg.copy_(&mine(m_parts.into_iter().map(|(_, t)| t).collect()));
            self.exp_avg_sq.copy_(&mine(v_parts.into_iter().map(|(_, t)| t).collect()));
            self.master.copy_(&mine(w_parts.into_iter().map(|(_, t)| t).collect()));
        });
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_balances_tokens_and_is_fixed_by_the_step() {
        let tokens = [10, 40, 30, 20, 25, 5];
        let a = assign(&tokens, 2);
        assert_eq!(a, assign(&tokens, 2));
        let load = |r| tokens.iter().zip(&a).filter(|(_, &o)| o == r).map(|(t, _)| t).sum::<usize>();
        assert_eq!(load(0) + load(1), 130);
        assert!(load(0).abs_diff(load(1)) <= 10, "{a:?}");
        assert!(assign(&tokens, 1).iter().all(|&r| r == 0));
        // More ranks than sequences: some ranks get none.
        assert_eq!(assign(&[3, 1], 4), vec![0, 1]);
    }
}
