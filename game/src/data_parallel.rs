//! Data-parallel learner ranks with sharded optimizer state (ZeRO stages 1 and 2), over
//! libtorch's own c10d (Gloo on the CPU, NCCL on CUDA; selfplay-torch-ext binds it).
//!
//! Every rank holds the whole model (bf16 or f32 weights) and runs forward and backward on its
//! share of the step's sequences ([`assign`]: balanced by tokens, in an order fixed by the
//! step, so a run is reproducible). The losses use the step's global denominators, so the
//! ranks' gradients sum to the one-process gradient. Then, per step:
//!
//! 1. the gradients, flattened into f32 buckets (128 MB by default) each cut into W equal
//!    slices, are reduce-scattered bucket by bucket: rank r receives the sum of slice r of
//!    every bucket only (ZeRO-2: no rank ever holds the whole reduced gradient, nor more than
//!    one bucket of the flat buffer);
//! 2. the global norm is the all-reduced sum of the shards' squared norms, and clipping
//!    scales each shard by the same factor;
//! 3. each rank updates its shard of the f32 master weights with its shard of the AdamW
//!    moments (ZeRO-1: 1/W of the 12 bytes per parameter of optimizer state per rank), with
//!    the same fused kernel as one process;
//! 4. the updated shards are all-gathered, bucket by bucket, into every rank's weights.
//!
//! Resident per rank: weights (2 or 4 bytes per parameter) + gradients (same) + 12/W bytes of
//! f32 master and moments, against 16 bytes (bf16) for one process; during the update, two
//! f32 buckets more. The optimizer state is
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

/// Elements per bucket (f32) unless `SELFPLAY_DP_BUCKET_ELEMENTS` says otherwise: 128 MB, the
/// most the update allocates at once beyond the resident state.
pub const BUCKET_ELEMENTS: i64 = 1 << 25;

/// Where each parameter sits in the flat f32 buffer, cut into buckets of equal size (a multiple
/// of W; the last one zero-padded). Rank r owns slice r of every bucket: its shard is those
/// slices end to end. Collectives go bucket by bucket, so the update never holds more than one
/// bucket of the flat buffer.
struct Layout {
    /// Per parameter: (offset, elements, shape, kind).
    params: Vec<(i64, i64, Vec<i64>, Kind)>,
    bucket: i64,
    buckets: i64,
    world: i64,
}

impl Layout {
    fn new(params: &[(String, Tensor)], world: i64) -> Layout {
        let mut offset = 0i64;
        let params: Vec<(i64, i64, Vec<i64>, Kind)> = params
            .iter()
            .map(|(_, p)| {
                let n = p.numel() as i64;
                offset += n;
                (offset - n, n, p.size(), p.kind())
            })
            .collect();
        let total = offset.max(1);
        let want =
            std::env::var("SELFPLAY_DP_BUCKET_ELEMENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(BUCKET_ELEMENTS);
        // At most the whole model, at least one element per rank; a multiple of W.
        let bucket = (want.min(total).max(world) + world - 1) / world * world;
        Layout { params, bucket, buckets: (total + bucket - 1) / bucket, world }
    }

    /// Elements of one rank's slice of a bucket.
    fn slice(&self) -> i64 {
        self.bucket / self.world
    }

    /// Elements of one rank's shard.
    fn shard(&self) -> i64 {
        self.buckets * self.slice()
    }

    /// Bucket `b` of the flat buffer made of `tensors` (one per parameter, any dtype; `None`
    /// reads as zeros), as f32 on `dev`.
    fn bucket_of(&self, b: i64, tensors: &[Option<Tensor>], dev: tch::Device) -> Tensor {
        let (start, end) = (b * self.bucket, (b + 1) * self.bucket);
        let mut parts = vec![];
        let mut filled = 0;
        for ((off, n, _, _), t) in self.params.iter().zip(tensors) {
            let (lo, hi) = (start.max(*off), end.min(off + n));
            if lo >= hi {
                continue;
            }
            parts.push(match t {
                Some(t) => t.reshape([-1]).narrow(0, lo - off, hi - lo).to_kind(Kind::Float).to_device(dev),
                None => Tensor::zeros([hi - lo], (Kind::Float, dev)),
            });
            filled += hi - lo;
        }
        if filled < self.bucket {
            parts.push(Tensor::zeros([self.bucket - filled], (Kind::Float, dev)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Copies bucket `b` (f32) into the parameters' elements it covers.
    fn write_bucket(&self, b: i64, flat: &Tensor, params: &[(String, Tensor)]) {
        let (start, end) = (b * self.bucket, (b + 1) * self.bucket);
        for ((off, n, _, _), (_, p)) in self.params.iter().zip(params) {
            let (lo, hi) = (start.max(*off), end.min(off + n));
            if lo < hi {
                p.detach().reshape([-1]).narrow(0, lo - off, hi - lo).copy_(&flat.narrow(0, lo - start, hi - lo));
            }
        }
    }
}

/// One rank's sharded AdamW and the collectives of a step.
pub struct DataParallel {
    pg: ProcessGroup,
    pub hyper: AdamWHyper,
    /// Updates done so far.
    pub t: u64,
    names: Vec<String>,
    layout: Layout,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
}

impl DataParallel {
    /// Shards the optimizer state of `params` (the same parameters, in the same order, on every
    /// rank) over `pg`. The master shard starts from this rank's weights.
    pub fn new(pg: ProcessGroup, params: &[(String, Tensor)], hyper: AdamWHyper) -> Result<Self> {
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(tch::Device::Cpu);
        if let Some((name, _)) = params.iter().find(|(_, p)| !p.is_contiguous()) {
            // Updated weights are written back through flat views of the parameters.
            return Err(GameError::Distributed(format!("parameter {name} is not contiguous")));
        }
        let layout = Layout::new(params, pg.size() as i64);
        let master = Tensor::zeros([layout.shard()], (Kind::Float, device));
        let mut dp = DataParallel {
            hyper,
            t: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            step: Tensor::zeros([1], (Kind::Float, device)),
            master,
            layout,
            pg,
        };
        let weights: Vec<Option<Tensor>> = params.iter().map(|(_, p)| Some(p.detach())).collect();
        tch::no_grad(|| dp.take_slices(&weights, Part::Master));
        Ok(dp)
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

    fn state(&self, part: Part) -> &Tensor {
        match part {
            Part::Master => &self.master,
            Part::ExpAvg => &self.exp_avg,
            Part::ExpAvgSq => &self.exp_avg_sq,
        }
    }

    /// Sets this rank's slices of a state tensor from whole per-parameter tensors.
    fn take_slices(&mut self, whole: &[Option<Tensor>], part: Part) {
        let (slice, dev) = (self.layout.slice(), self.master.device());
        let at = self.rank() as i64 * slice;
        for b in 0..self.layout.buckets {
            let flat = self.layout.bucket_of(b, whole, dev);
            self.state(part).narrow(0, b * slice, slice).copy_(&flat.narrow(0, at, slice));
        }
    }

    /// Reduce-scatters the ranks' gradients of `params`, bucket by bucket, and returns this
    /// rank's shard of their sum with the global gradient norm (before clipping). The gradients
    /// are cleared.
    pub fn reduce_gradients(&self, params: &[(String, Tensor)]) -> Result<(Tensor, f64)> {
        tch::no_grad(|| {
            let dev = self.master.device();
            let slice = self.layout.slice();
            let grads: Vec<Option<Tensor>> = params
                .iter()
                .map(|(_, p)| {
                    let g = p.grad();
                    g.defined().then_some(g)
                })
                .collect();
            let mine = Tensor::zeros([self.layout.shard()], (Kind::Float, dev));
            for b in 0..self.layout.buckets {
                let flat = self.layout.bucket_of(b, &grads, dev);
                self.pg.reduce_scatter(&mine.narrow(0, b * slice, slice), &flat, ReduceOp::Sum).map_err(dist_err)?;
            }
            let mut sq = [mine.square().sum(Kind::Double).double_value(&[])];
            self.sum(&mut sq)?;
            let defined: Vec<Tensor> = grads.into_iter().flatten().collect();
            foreach::zero_(&defined).map_err(dist_err)?;
            Ok((mine, sq[0].sqrt()))
        })
    }

    /// Clips this rank's gradient shard to the global `norm` (`max_norm` 0 = no clipping),
    /// updates the shard of the masters, and all-gathers the updated weights into `params`,
    /// bucket by bucket.
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
            let slice = self.layout.slice();
            let full = Tensor::zeros([self.layout.bucket], (Kind::Float, self.master.device()));
            for b in 0..self.layout.buckets {
                self.pg.all_gather(&full, &self.master.narrow(0, b * slice, slice)).map_err(dist_err)?;
                self.layout.write_bucket(b, &full, params);
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
        let some = |ts: &[Tensor]| ts.iter().map(|t| Some(t.shallow_clone())).collect::<Vec<_>>();
        let masters: Vec<Option<Tensor>> = master
            .iter()
            .zip(params)
            .map(|(m, (_, p))| Some(m.as_ref().map_or_else(|| p.detach(), |m| m.shallow_clone())))
            .collect();
        tch::no_grad(|| {
            self.take_slices(&some(exp_avg), Part::ExpAvg);
            self.take_slices(&some(exp_avg_sq), Part::ExpAvgSq);
            self.take_slices(&masters, Part::Master);
        });
        self.t = t;
    }

    /// A state tensor gathered from every rank into the whole flat buffer, on the CPU (bucket by
    /// bucket: the device never holds more than one bucket of it).
    fn gather(&self, part: Part) -> Result<Tensor> {
        let slice = self.layout.slice();
        let full = Tensor::zeros([self.layout.bucket], (Kind::Float, self.master.device()));
        let mut out = vec![];
        for b in 0..self.layout.buckets {
            self.pg.all_gather(&full, &self.state(part).narrow(0, b * slice, slice)).map_err(dist_err)?;
            // A copy: on the CPU `to_device` would hand back the buffer the next bucket overwrites.
            out.push(if full.device() == tch::Device::Cpu { full.copy() } else { full.to_device(tch::Device::Cpu) });
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// Writes the optimizer state in [`crate::optim::AdamW`]'s format (moments, and masters
    /// of parameters that are not f32) at `path`. Collective: every rank calls it; rank 0
    /// writes.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (m, v, w) = (self.gather(Part::ExpAvg)?, self.gather(Part::ExpAvgSq)?, self.gather(Part::Master)?);
        if self.rank() != 0 {
            return Ok(());
        }
        let mut named: Vec<(String, Tensor)> = vec![];
        for (name, (off, n, shape, kind)) in self.names.iter().zip(&self.layout.params) {
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
    /// weights are their masters). The file is read on the CPU; one that does not match
    /// changes nothing.
    pub fn load(&mut self, path: &Path, t: u64, params: &[(String, Tensor)]) -> Result<()> {
        let cpu = tch::Device::Cpu;
        let mut m_parts = vec![];
        let mut v_parts = vec![];
        let mut w_parts = vec![];
        for ((name, p), (_, _, shape, kind)) in params.iter().zip(&self.layout.params) {
            let z = || Tensor::zeros(shape.as_slice(), (Kind::Float, cpu));
            m_parts.push((format!("{name}.exp_avg"), z()));
            v_parts.push((format!("{name}.exp_avg_sq"), z()));
            w_parts.push(if *kind != Kind::Float { (Some(format!("{name}.master")), z()) } else { (None, p.detach()) });
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
        let whole = |parts: Vec<(String, Tensor)>| parts.into_iter().map(|(_, t)| Some(t)).collect::<Vec<_>>();
        let masters: Vec<Option<Tensor>> = w_parts.into_iter().map(|(_, t)| Some(t)).collect();
        tch::no_grad(|| {
            self.take_slices(&whole(m_parts), Part::ExpAvg);
            self.take_slices(&whole(v_parts), Part::ExpAvgSq);
            self.take_slices(&masters, Part::Master);
        });
        self.t = t;
        Ok(())
    }
}

/// The three state tensors of the sharded optimizer.
#[derive(Clone, Copy)]
enum Part {
    Master,
    ExpAvg,
    ExpAvgSq,
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
