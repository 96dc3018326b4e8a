//! The learner side of the game: N rollout groups in, one optimizer step out.
//!
//! Per sequence i with completion tokens t (log-probs lp_t under the current policy, ref_t
//! under the reference, mu_t under the sampler) and advantage A_i:
//!   sequence-sum:  pg_i = exp(S_i - sg(S_i)) * A_i,  S_i = sum_t lp_t
//!   token-mean:    pg_i = mean_t exp(lp_t - sg(lp_t)) * A_i
//!   kl_i (k3)    = agg_t [exp(ref_t - lp_t) - (ref_t - lp_t) - 1]
//!   kl_i (paper) = agg_t [lp_t - ref_t]
//!   kl_i (reward-penalty) = 0; beta * agg_t [mu_t - ref_t] comes off the reward instead
//!   L_sol = -1/|answers| sum_answers (pg_i - beta kl_i),  L_ch = -1/N sum_queries (pg_i - beta kl_i)
//! (kept answers only; a query whose answers were all dropped leaves L_ch and its N).
//!   L = L_sol + alpha_ch L_ch
//! With an importance cap c > 0, pg is weighted by min(pi/mu, c) (per sequence or per token).
//! Groups are split into `grad_accum` micro-batches whose losses use the step's global
//! denominators, so accumulation changes memory use, not the result.
//!
//! The step also compares lp_t with mu_t on every completion token (the training-inference
//! mismatch, [`StepStats::logprob_mismatch_mean`] and `_max`), from the log-probs it computes
//! anyway. With a bound ([`Trainer::train_step_checked`]), a group sampled by the trainer's
//! current weights whose sequences disagree by more than the bound is refused before the
//! optimizer: the gradient is dropped and nothing of the trainer changes.
use crate::config::{Aggregation, Config, KlMode};
use crate::data_parallel::{self, DataParallel};
use crate::error::{io_err, GameError, Result};
use crate::optim::AdamW;
use crate::prompts::ParseFailure;
use crate::rewards::{advantages, Advantages, GroupRewards};
use crate::rollout::{GroupLimits, RolloutGroup, SequenceData};
use selfplay_policy::scoring::{self, Grad, Scorer, TokenLogprobs};
use selfplay_policy::Policy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

/// Mean and standard deviation (population) of a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub mean: f64,
    pub std: f64,
}

impl Moments {
    pub fn of(x: impl IntoIterator<Item = f64>) -> Self {
        let v: Vec<f64> = x.into_iter().collect();
        if v.is_empty() {
            return Moments::default();
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        Moments { mean, std: var.sqrt() }
    }
}

/// What one learner step did: the statistics the metrics and the progress bar show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub loss_solver: f64,
    pub loss_challenger: f64,
    /// Reward-model reward R over all answers.
    pub reward: Moments,
    /// Self-reward R_Q over all answers (LSP).
    pub self_reward: Moments,
    pub solver_reward: Moments,
    pub challenger_reward: Moments,
    pub solver_advantage: Moments,
    pub challenger_advantage: Moments,
    /// Per-sequence KL (k3, aggregated as the loss aggregates) for each role.
    pub kl_solver: f64,
    pub kl_challenger: f64,
    /// Mean per-token entropy of the policy on the sampled tokens' positions.
    pub entropy_solver: f64,
    pub entropy_challenger: f64,
    pub solver_length: Moments,
    pub challenger_length: Moments,
    pub parse_failures: u64,
    pub dropped_answers: u64,
    pub grad_norm: f64,
    /// Mean policy lag (learner version - sampling version) of the groups.
    pub staleness: f64,
    pub step_seconds: f64,
    /// Tokens (prompt + completion) through forward and backward per second.
    pub tokens_per_second: f64,
    /// The loss or the gradient was not finite: the step counted (its groups are consumed,
    /// the version moves on) but the weights and the optimizer state did not change.
    #[serde(default)]
    pub skipped: bool,
    /// Training-inference mismatch: mean over every scored completion token of
    /// |log pi(token) - log mu(token)|, the learner's current log-prob against the behaviour
    /// log-prob the actor sent (nats). Near 0 in synchronous mode (numerical noise only);
    /// in asynchronous mode it also holds the policy's drift over the lag.
    #[serde(default)]
    pub logprob_mismatch_mean: f64,
    /// The largest of those per-token differences (nats).
    #[serde(default)]
    pub logprob_mismatch_max: f64,
}

/// Default bound of [`Trainer::train_step_checked`] when actors and learner all compute in
/// f32: the mean per-token mismatch of a sequence, in nats. An honest f32 run on the CPU
/// measures about 3e-6 on average and 3e-5 on its worst token (docs/operations.md); a corrupt
/// or mis-weighted group is off by whole nats.
pub const MISMATCH_BOUND_F32: f64 = 1e-3;
/// Default bound when any side computes in bf16 or f16 (or may: `model.dtype = "auto"` is
/// bf16 on CUDA actors), or weights travel in bf16: rounding moves log-probs by a few
/// hundredths of a nat on average (0.044 measured on the CPU), with single tokens much
/// further (0.37), hence the sequence's mean, not its largest token, is what is bounded.
pub const MISMATCH_BOUND_HALF: f64 = 1.0;

/// Which log-probs of a group disagreed with the learner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagreement {
    /// The behaviour log-probs, against the learner's current policy.
    Behaviour,
    /// The reference log-probs, against the learner's own reference model.
    Reference,
}

impl Disagreement {
    pub fn as_str(self) -> &'static str {
        match self {
            Disagreement::Behaviour => "behaviour",
            Disagreement::Reference => "reference",
        }
    }
}

/// A group refused because its log-probs disagree with the learner's
/// ([`Trainer::train_step_checked`], [`reference_refusals`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Position of the group in the step's list.
    pub index: usize,
    pub unit_id: String,
    pub actor_id: String,
    pub which: Disagreement,
    /// The largest mean per-token mismatch among the group's sequences (what was bounded).
    pub mean: f64,
    /// The largest single-token mismatch in the group.
    pub max: f64,
    pub bound: f64,
}

/// What [`Trainer::train_step_checked`] did.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per step, moved once
pub enum StepResult {
    /// The step was taken (or skipped as not finite, which also counts).
    Trained(StepStats),
    /// Some groups disagree with the current policy beyond the bound: nothing was applied,
    /// the step count, weights, optimizer state and gradients are as before the call.
    Refused(Vec<Refusal>),
}

/// One sequence in the loss, with its advantage and its weight in the loss.
struct LossItem<'a> {
    seq: &'a SequenceData,
    advantage: f64,
    weight: f64,
    challenger: bool,
    /// Index of the item's group in the step.
    group: usize,
}

pub struct Trainer {
    pub policy: Policy,
    pub cfg: Config,
    pub opt: AdamW,
    /// Completed steps.
    pub step: u64,
    /// Learner ranks: this one's share of each step and of the optimizer state
    /// ([`Trainer::into_data_parallel`]); `None` trains alone with [`Trainer::opt`].
    dp: Option<DataParallel>,
    /// The model directory's config and tokenizer files, read once at the start: every
    /// checkpoint carries them, even after the directory the run started from (for instance
    /// the checkpoint it resumed from) has been pruned.
    side_files: Vec<(&'static str, Vec<u8>)>,
}

/// The files besides the weights that make a checkpoint a loadable Hugging Face directory.
const SIDE_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

impl Trainer {
    pub fn new(mut policy: Policy, cfg: Config) -> Result<Self> {
        cfg.validate()?;
        policy.model.set_requires_grad(true);
        let o = &cfg.optim;
        let opt = AdamW::new(policy.model.parameters(), cfg.lr(), o.beta1, o.beta2, o.eps, o.weight_decay);
        let mut side_files = vec![];
        for name in SIDE_FILES {
            let path = policy.dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => side_files.push((name, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(Trainer { policy, cfg, opt, step: 0, side_files, dp: None })
    }

    /// Makes this trainer one rank of a data-parallel learner over `pg` (every rank holds the
    /// same weights, optimizer state and step, and is given the same groups each step). Each
    /// rank then trains on its share of a step's sequences and keeps 1/W of the optimizer
    /// state ([`crate::data_parallel`]); its shard is taken from the state it has now, which
    /// is then released.
    pub fn into_data_parallel(mut self, pg: selfplay_torch_ext::dist::ProcessGroup) -> Result<Self> {
        let o = &self.cfg.optim;
        let hyper = selfplay_torch_ext::foreach::AdamWHyper {
            lr: self.opt.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        };
        let params = self.policy.model.parameters();
        let mut dp = DataParallel::new(pg, params, hyper)?;
        if self.opt.t > 0 {
            let (exp_avg, exp_avg_sq, master) = self.opt.state();
            dp.take_shard(exp_avg, exp_avg_sq, master, params, self.opt.t);
        }
        self.opt = AdamW::new(&[], self.opt.lr, o.beta1, o.beta2, o.eps, o.weight_decay);
        self.dp = Some(dp);
        Ok(self)
    }

    /// This learner's rank and the number of ranks ((0, 1) alone).
    pub fn rank(&self) -> (usize, usize) {
        self.dp.as_ref().map_or((0, 1), |d| (d.rank(), d.world()))
    }

    /// Limits a group must satisfy to enter a step.
    pub fn limits(&self) -> GroupLimits {
        let longest_prompt = self.policy.model.config().max_position_embeddings.max(4096) as usize;
        GroupLimits {
            group_size: self.cfg.game.group_size,
            vocab_size: self.policy.model.config().vocab_size,
            max_prompt_tokens: longest_prompt,
            max_completion_tokens: self.cfg.solver.max_new_tokens.max(self.cfg.challenger.max_new_tokens).max(1)
                as usize,
            needs_challenger: self.cfg.game.mode.has_challenger(),
        }
    }

    fn agg(&self, x: &Tensor, mask: &Tensor, n: &Tensor) -> Tensor {
        let s = (x * mask).sum_dim_intlist(1, false, Kind::Float);
        match self.cfg.loss.aggregation {
            Aggregation::SequenceSum => s,
            Aggregation::TokenMean => s / n,
        }
    }

    fn agg_f64(&self, x: &[f32]) -> f64 {
        let s: f64 = x.iter().map(|v| *v as f64).sum();
        match self.cfg.loss.aggregation {
            Aggregation::SequenceSum => s,
            Aggregation::TokenMean => s / x.len().max(1) as f64,
        }
    }

    /// Rewards and advantages of a step (also used by tests and the learner's metrics).
    pub fn advantages(&self, groups: &[RolloutGroup]) -> (Advantages, u64, u64) {
        let mode = self.cfg.game.mode;
        let penalty = self.cfg.loss.kl == KlMode::RewardPenalty;
        let beta = self.cfg.loss.beta;
        let mut parse_failures = 0;
        let mut dropped = 0;
        let rewards: Vec<GroupRewards> = groups
            .iter()
            .map(|g| {
                let mut r = GroupRewards::new(
                    g.answers.iter().map(|a| a.reward as f64).collect(),
                    g.answers.iter().map(|a| a.self_reward as f64).collect(),
                );
                if mode.uses_self_reward() {
                    for (j, a) in g.answers.iter().enumerate() {
                        if !a.self_reward_parsed {
                            parse_failures += 1;
                            match self.cfg.self_reward.parse_failure {
                                ParseFailure::Zero => r.self_reward[j] = 0.0,
                                ParseFailure::Drop => {
                                    r.keep[j] = false;
                                    dropped += 1;
                                }
                            }
                        }
                    }
                }
                if penalty {
                    let kl = |s: &SequenceData| {
                        let d: Vec<f32> =
                            s.behaviour_logprobs.iter().zip(&s.ref_logprobs).map(|(m, r)| m - r).collect();
                        beta * self.agg_f64(&d)
                    };
                    r.solver_penalty = g.answers.iter().map(|a| kl(&a.sequence)).collect();
                    r.challenger_penalty = g.challenger.as_ref().map(kl).unwrap_or(0.0);
                }
                r
            })
            .collect();
        (advantages(mode, &rewards, self.cfg.loss.grpo_eps), parse_failures, dropped)
    }

    /// One optimizer step on N groups. Validates everything first: a bad group changes nothing.
    /// The log-prob mismatch is measured, not bounded ([`Trainer::train_step_checked`]).
    pub fn train_step(&mut self, groups: &[RolloutGroup]) -> Result<StepStats> {
        match self.step_on(groups, true, None)? {
            Outcome::Stats(s) => Ok(s),
            _ => unreachable!("an applied step without a bound returns its statistics"),
        }
    }

    /// [`Trainer::train_step`], refusing the groups sampled by the current weights
    /// (`weights_version == self.step`) whose log-probs disagree with the trainer's: any of
    /// their sequences with a mean per-token |log pi - log mu| above `max_mismatch`. The check
    /// reuses the step's own forward pass and runs before the optimizer; on a refusal the
    /// accumulated gradient is zeroed and nothing else was touched, so the same step can be
    /// taken again, bit for bit, once honest groups replace the refused ones.
    pub fn train_step_checked(&mut self, groups: &[RolloutGroup], max_mismatch: Option<f64>) -> Result<StepResult> {
        match self.step_on(groups, true, max_mismatch)? {
            Outcome::Stats(s) => Ok(StepResult::Trained(s)),
            Outcome::Refused(r) => Ok(StepResult::Refused(r)),
            Outcome::Gradients(_) => unreachable!("an applied step does not return its gradient"),
        }
    }

    /// The gradient a step on these groups would apply (summed over its micro-batches, before
    /// clipping), one tensor per parameter, without applying it: weights, optimizer state and
    /// step count stay as they are. For tests and diagnostics.
    pub fn gradients(&mut self, groups: &[RolloutGroup]) -> Result<Vec<(String, Tensor)>> {
        match self.step_on(groups, false, None)? {
            Outcome::Gradients(g) => Ok(g),
            _ => unreachable!("a step not applied returns its gradient"),
        }
    }

    fn step_on(&mut self, groups: &[RolloutGroup], apply: bool, max_mismatch: Option<f64>) -> Result<Outcome> {
        let t0 = Instant::now();
        let n = self.cfg.game.queries_per_step;
        if groups.len() != n {
            return Err(GameError::InvalidGroup {
                unit_id: String::new(),
                reason: format!("a step needs N = {n} groups, got {}", groups.len()),
            });
        }
        let lim = self.limits();
        for g in groups {
            g.validate(&lim).map_err(|reason| GameError::InvalidGroup { unit_id: g.unit_id.clone(), reason })?;
        }
        let (adv, parse_failures, dropped) = self.advantages(groups);
        let kept_answers: usize = groups.len() * self.cfg.game.group_size - dropped as usize;
        let alpha = self.cfg.game.alpha_ch;
        let has_ch = self.cfg.game.mode.has_challenger();
        // A challenger whose answers were all dropped is left out: L_ch averages the others.
        let kept_challengers = adv.challenger_keep.iter().filter(|&&k| k).count();

        // Every sequence of the step with its advantage and its weight in the loss.
        let mut items_per_group: Vec<Vec<LossItem>> = vec![];
        for (i, g) in groups.iter().enumerate() {
            let mut items = vec![];
            if let (true, true, Some(c)) = (has_ch, adv.challenger_keep[i], &g.challenger) {
                items.push(LossItem {
                    seq: c,
                    advantage: adv.challenger[i],
                    weight: alpha / kept_challengers as f64,
                    challenger: true,
                    group: i,
                });
            }
            for (j, a) in g.answers.iter().enumerate() {
                if self.cfg.game.mode.uses_self_reward()
                    && !a.self_reward_parsed
                    && self.cfg.self_reward.parse_failure == ParseFailure::Drop
                {
                    continue;
                }
                items.push(LossItem {
                    seq: &a.sequence,
                    advantage: adv.solver[i][j],
                    weight: 1.0 / kept_answers.max(1) as f64,
                    challenger: false,
                    group: i,
                });
            }
            items_per_group.push(items);
        }

        // Learner ranks: this rank trains only the sequences assigned to it; the weights in
        // the loss stay the step's global ones, so the ranks' gradients sum to the whole.
        if let Some(dp) = &self.dp {
            let lens: Vec<usize> = items_per_group
                .iter()
                .flatten()
                .map(|it| it.seq.prompt_ids.len() + it.seq.completion_ids.len())
                .collect();
            let owner = data_parallel::assign(&lens, dp.world());
            let mut k = 0;
            for items in items_per_group.iter_mut() {
                items.retain(|_| {
                    k += 1;
                    owner[k - 1] == dp.rank()
                });
            }
        }
        let mut acc = Accum { group_mismatch: vec![(0.0, 0.0); groups.len()], ..Accum::default() };
        let k = self.cfg.optim.grad_accum.max(1);
        let per = groups.len().div_ceil(k);
        let mut tokens = 0usize;
        // A non-finite loss or gradient (a numerical blow-up, a kernel's NaN) skips the
        // update: nothing is applied, the step still counts, the learner stays up.
        let mut skipped = false;
        'micro: for chunk in items_per_group.chunks(per) {
            let items: Vec<&LossItem> = chunk.iter().flatten().collect();
            // Each micro-batch is cut further so that its padded tokens stay within
            // `optim.micro_batch_tokens`: the losses use the step's global weights, so this
            // bounds activations without changing the result.
            let lens = items.iter().map(|it| it.seq.prompt_ids.len() + it.seq.completion_ids.len());
            for range in scoring::token_batches(lens, self.cfg.optim.micro_batch_tokens) {
                let items = &items[range];
                tokens += items.iter().map(|it| it.seq.prompt_ids.len() + it.seq.completion_ids.len()).sum::<usize>();
                let (loss, scored) = self.micro_batch_loss(items, &mut acc)?;
                if !loss.double_value(&[]).is_finite() {
                    tracing::warn!(
                        step = self.step + 1,
                        "the loss is not finite; the update is skipped, weights unchanged"
                    );
                    skipped = true;
                    break 'micro;
                }
                loss.backward();
                scored.backward(&self.policy.model)?;
            }
        }
        if let Some(dp) = &self.dp {
            // Every rank leaves with the step's totals (and all skip if one did).
            acc.all_reduce(dp, &mut tokens, &mut skipped)?;
        }
        if let (true, Some(bound)) = (apply, max_mismatch) {
            let refused: Vec<Refusal> = groups
                .iter()
                .zip(&acc.group_mismatch)
                .enumerate()
                // Only the groups sampled by these very weights must agree with them; a NaN
                // disagrees.
                .filter(|(_, (g, (mean, _)))| g.weights_version == self.step && (mean.is_nan() || *mean > bound))
                .map(|(index, (g, &(mean, max)))| Refusal {
                    index,
                    unit_id: g.unit_id.clone(),
                    actor_id: g.actor_id.clone(),
                    which: Disagreement::Behaviour,
                    mean,
                    max,
                    bound,
                })
                .collect();
            if !refused.is_empty() {
                // Before clipping and the optimizer: dropping the accumulated gradient leaves
                // the trainer exactly as it was (gradients are zeroed after every step).
                self.zero_grad();
                return Ok(Outcome::Refused(refused));
            }
        }
        if !apply && self.dp.is_none() {
            let grads = self
                .policy
                .model
                .parameters()
                .iter()
                .map(|(n, p)| {
                    let g = p.grad();
                    (n.clone(), if g.defined() { g.copy() } else { p.detach().zeros_like() })
                })
                .collect();
            self.zero_grad();
            return Ok(Outcome::Gradients(grads));
        }
        let mut grad_norm = f64::NAN;
        if let (Some(dp), false) = (&mut self.dp, skipped) {
            let params = self.policy.model.parameters();
            let (shard, norm) = dp.reduce_gradients(params)?;
            grad_norm = norm;
            if !apply {
                return Err(GameError::Config("gradients() is not available on learner ranks".into()));
            }
            if norm.is_finite() {
                dp.apply(params, &shard, norm, self.cfg.optim.max_grad_norm)?;
            } else {
                tracing::warn!(
                    step = self.step + 1,
                    "the gradient norm is not finite; the update is skipped, weights unchanged"
                );
                skipped = true;
            }
        } else if !skipped {
            let params = self.policy.model.parameters();
            grad_norm = AdamW::clip_grad_norm(params, self.cfg.optim.max_grad_norm);
            if grad_norm.is_finite() {
                self.opt.step(params);
            } else {
                tracing::warn!(
                    step = self.step + 1,
                    "the gradient norm is not finite; the update is skipped, weights unchanged"
                );
                skipped = true;
            }
        }
        if skipped {
            self.zero_grad();
        }
        self.step += 1;

        let all_answers = || groups.iter().flat_map(|g| g.answers.iter());
        let secs = t0.elapsed().as_secs_f64();
        Ok(Outcome::Stats(StepStats {
            step: self.step,
            loss: acc.loss_sol + alpha * acc.loss_ch,
            loss_solver: acc.loss_sol,
            loss_challenger: acc.loss_ch,
            reward: Moments::of(all_answers().map(|a| a.reward as f64)),
            self_reward: Moments::of(all_answers().map(|a| a.self_reward as f64)),
            solver_reward: Moments::of(adv.solver_reward.iter().flatten().copied()),
            challenger_reward: Moments::of(
                adv.challenger_reward.iter().zip(&adv.challenger_keep).filter(|(_, &k)| k && has_ch).map(|(r, _)| *r),
            ),
            solver_advantage: Moments::of(adv.solver.iter().flatten().copied()),
            challenger_advantage: Moments::of(
                adv.challenger.iter().zip(&adv.challenger_keep).filter(|(_, &k)| k).map(|(a, _)| *a),
            ),
            kl_solver: acc.kl_sol / acc.n_sol.max(1) as f64,
            kl_challenger: acc.kl_ch / acc.n_ch.max(1) as f64,
            entropy_solver: acc.ent_sol / acc.tok_sol.max(1) as f64,
            entropy_challenger: acc.ent_ch / acc.tok_ch.max(1) as f64,
            solver_length: Moments::of(all_answers().map(|a| a.sequence.completion_ids.len() as f64)),
            challenger_length: Moments::of(
                groups.iter().filter_map(|g| g.challenger.as_ref()).map(|c| c.completion_ids.len() as f64),
            ),
            parse_failures,
            dropped_answers: dropped,
            grad_norm,
            staleness: Moments::of(groups.iter().map(|g| (self.step - 1).saturating_sub(g.weights_version) as f64))
                .mean,
            step_seconds: secs,
            tokens_per_second: tokens as f64 / secs,
            skipped,
            logprob_mismatch_mean: acc.mismatch_sum / acc.mismatch_tokens.max(1) as f64,
            logprob_mismatch_max: acc.mismatch_max,
        }))
    }

    fn zero_grad(&self) {
        for (_, p) in self.policy.model.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The loss of one micro-batch, built on the chunked log-probs' leaf: the caller runs
    /// `loss.backward()` and then the log-probs' own backward (scoring.rs).
    fn micro_batch_loss(&self, items: &[&LossItem], acc: &mut Accum) -> Result<(Tensor, TokenLogprobs)> {
        let dev = self.policy.model.device();
        let pairs: Vec<(Vec<i64>, Vec<i64>)> =
            items.iter().map(|it| (it.seq.prompt_ids.clone(), it.seq.completion_ids.clone())).collect();
        let grad = if self.cfg.optim.gradient_checkpointing { Grad::Checkpointed } else { Grad::Chunked };
        let scored = Scorer::new(&self.policy.model)
            .grad(grad)
            .entropy(true)
            .chunk_positions(self.cfg.optim.logprob_chunk_tokens)
            .score(&pairs)?;
        let (lp, mask) = (&scored.logprobs, scored.mask.to_kind(Kind::Float));
        let c = lp.size()[1] as usize;
        let pad = |v: &[f32]| {
            let mut x = v.to_vec();
            x.resize(c, 0.0);
            x
        };
        let b = items.len() as i64;
        let refs: Vec<f32> = items.iter().flat_map(|it| pad(&it.seq.ref_logprobs)).collect();
        let behs: Vec<f32> = items.iter().flat_map(|it| pad(&it.seq.behaviour_logprobs)).collect();
        let refs = Tensor::from_slice(&refs).view([b, c as i64]).to_device(dev);
        let behs = Tensor::from_slice(&behs).view([b, c as i64]).to_device(dev);
        let adv: Vec<f32> = items.iter().map(|it| it.advantage as f32).collect();
        let adv = Tensor::from_slice(&adv).to_device(dev);
        let w: Vec<f32> = items.iter().map(|it| it.weight as f32).collect();
        let w = Tensor::from_slice(&w).to_device(dev);
        let ntok: Vec<f32> = items.iter().map(|it| it.seq.completion_ids.len() as f32).collect();
        let ntok = Tensor::from_slice(&ntok).to_device(dev);

        let cap = self.cfg.loss.importance_cap;
        let pg = match self.cfg.loss.aggregation {
            Aggregation::SequenceSum => {
                let s = (lp * &mask).sum_dim_intlist(1, false, Kind::Float);
                let ratio = (&s - s.detach()).exp();
                let mut pg = ratio * &adv;
                if cap > 0.0 {
                    let mu = (&behs * &mask).sum_dim_intlist(1, false, Kind::Float);
                    pg = pg * (s.detach() - mu).exp().clamp_max(cap);
                }
                pg
            }
            Aggregation::TokenMean => {
                let mut ratio = (lp - lp.detach()).exp();
                if cap > 0.0 {
                    ratio = ratio * (lp.detach() - &behs).exp().clamp_max(cap);
                }
                self.agg(&(ratio * adv.unsqueeze(1)), &mask, &ntok)
            }
        };
        let k3 = {
            // log(pi_ref / pi) capped at 50 before exp: a reference log-prob near 0 on a token
            // the policy finds very unlikely would otherwise overflow f32 (exp > 88.7) from
            // finite inputs. exp(50) ~ 5e21 summed over any step stays finite, and no honest
            // pair of models is e^50 apart on a sampled token.
            let d = (&refs - lp).clamp_max(50.0);
            d.exp() - &d - 1.0
        };
        let kl = match self.cfg.loss.kl {
            KlMode::K3 => Some(self.agg(&k3, &mask, &ntok)),
            KlMode::Paper => Some(self.agg(&(lp - &refs), &mask, &ntok)),
            KlMode::RewardPenalty => None,
        };
        let objective = match &kl {
            Some(kl) => &pg - kl * self.cfg.loss.beta,
            None => pg.shallow_clone(),
        };
        let per_seq = -(objective * &w);
        let loss = per_seq.sum(Kind::Float);

        // Statistics, detached.
        let k3_seq: Vec<f64> = Vec::<f64>::try_from(
            self.agg(&k3.detach(), &mask, &ntok).to_kind(Kind::Double).to_device(tch::Device::Cpu),
        )?;
        let per_seq_v: Vec<f64> =
            Vec::<f64>::try_from(per_seq.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
        let ent = scored.entropy.as_ref().expect("requested").sum_dim_intlist(1, false, Kind::Float);
        let ent_v: Vec<f64> = Vec::<f64>::try_from(ent.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
        // Training-inference mismatch |lp - mu| per completion token (padding masked to 0).
        let diff = (lp.detach().to_kind(Kind::Float) - &behs).abs() * &mask;
        let diff_sum: Vec<f64> =
            Vec::<f64>::try_from(diff.sum_dim_intlist(1, false, Kind::Double).to_device(tch::Device::Cpu))?;
        let diff_max: Vec<f64> =
            Vec::<f64>::try_from(diff.amax(1, false).to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
        for (i, it) in items.iter().enumerate() {
            let ntok = it.seq.completion_ids.len() as u64;
            acc.mismatch_sum += diff_sum[i];
            acc.mismatch_tokens += ntok;
            acc.mismatch_max = acc.mismatch_max.max(diff_max[i]);
            let seq_mean = diff_sum[i] / ntok.max(1) as f64;
            let g = &mut acc.group_mismatch[it.group];
            // NaN-propagating maxima: a NaN log-prob is a mismatch beyond any bound.
            g.0 = if seq_mean.is_nan() || g.0.is_nan() { f64::NAN } else { g.0.max(seq_mean) };
            g.1 = if diff_max[i].is_nan() || g.1.is_nan() { f64::NAN } else { g.1.max(diff_max[i]) };
            if it.challenger {
                acc.loss_ch += per_seq_v[i] / self.cfg.game.alpha_ch.max(f64::MIN_POSITIVE);
                acc.kl_ch += k3_seq[i];
                acc.n_ch += 1;
                acc.ent_ch += ent_v[i];
                acc.tok_ch += ntok;
            } else {
                acc.loss_sol += per_seq_v[i];
                acc.kl_sol += k3_seq[i];
                acc.n_sol += 1;
                acc.ent_sol += ent_v[i];
                acc.tok_sol += ntok;
            }
        }
        Ok((loss, scored))
    }

    /// Writes a checkpoint directory: HF-layout weights (loadable by transformers and by
    /// `selfplay generate`), the tokenizer and config files, the optimizer state, and
    /// `trainer.json` (step, config, and the caller's `extra` state). Written under a
    /// temporary name and renamed, so a crash never leaves a partial checkpoint.
    pub fn save_checkpoint(&self, dir: &Path, extra: serde_json::Value) -> Result<PathBuf> {
        // Learner ranks: every rank gathers its optimizer shard to rank 0, which alone writes.
        if let Some(dp) = self.dp.as_ref().filter(|d| d.rank() != 0) {
            dp.save(dir)?;
            return Ok(dir.to_path_buf());
        }
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        self.policy.model.save_safetensors(&tmp.join("model.safetensors"))?;
        for (name, bytes) in &self.side_files {
            let path = tmp.join(name);
            std::fs::write(&path, bytes).map_err(io_err(&path))?;
        }
        let adam_t = match &self.dp {
            Some(dp) => {
                dp.save(&tmp.join("optimizer.safetensors"))?;
                dp.t
            }
            None => {
                self.opt.save(&tmp.join("optimizer.safetensors"))?;
                self.opt.t
            }
        };
        let state = TrainerState { step: self.step, adam_t, config: self.cfg.to_toml(), extra };
        let json = serde_json::to_string_pretty(&state).expect("serialisable");
        std::fs::write(tmp.join("trainer.json"), json).map_err(io_err(&tmp))?;
        // Durable before it becomes visible: every file, the directory, then the rename and
        // its parent. A crash at any point leaves this checkpoint whole or absent.
        for e in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = e.map_err(io_err(&tmp))?.path();
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
        // An older copy of this step is moved aside first and removed last: at every moment
        // one complete copy is under the step's name or beside it.
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        let _ = std::fs::remove_dir_all(&old);
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent).and_then(|f| f.sync_all()).map_err(io_err(parent))?;
        }
        Ok(dir.to_path_buf())
    }

    /// Resumes from a checkpoint directory written by [`Trainer::save_checkpoint`]. The
    /// checkpoint's config is used unless `cfg` is given. Returns the caller's extra state.
    pub fn resume(dir: &Path, cfg: Option<Config>, device: tch::Device) -> Result<(Self, serde_json::Value)> {
        let state_path = dir.join("trainer.json");
        let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|e| GameError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
        let cfg = match cfg {
            Some(c) => c,
            None => toml::from_str(&state.config)
                .map_err(|e| GameError::Checkpoint { path: state_path.clone(), message: format!("config: {e}") })?,
        };
        let policy = Policy::load(dir, device, cfg.kind_on(device)?)?;
        let mut t = Trainer::new(policy, cfg)?;
        t.opt.load(&dir.join("optimizer.safetensors"), state.adam_t)?;
        t.step = state.step;
        Ok((t, state.extra))
    }
}

impl Trainer {
    /// Starts a new run (step 0) from the weights of a checkpoint written by
    /// [`Trainer::save_checkpoint`] (or any Hugging Face directory), with a fresh AdamW, or
    /// with the checkpoint's AdamW moments and step count when `keep_optimizer` is set.
    pub fn init_from(dir: &Path, cfg: Config, device: tch::Device, keep_optimizer: bool) -> Result<Self> {
        let kind = cfg.kind_on(device)?;
        let policy = Policy::load(dir, device, kind)?;
        let mut t = Trainer::new(policy, cfg)?;
        if keep_optimizer {
            let state_path = dir.join("trainer.json");
            let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
            let state: TrainerState = serde_json::from_str(&text)
                .map_err(|e| GameError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
            t.opt.load(&dir.join("optimizer.safetensors"), state.adam_t)?;
        }
        Ok(t)
    }
}

/// Recomputes the reference log-probs of the groups `selected` picks with `reference` (the
/// learner's own copy of the reference model, no gradient) and returns those of which a
/// sequence disagrees with what the actor sent by more than `bound` (mean per-token absolute
/// difference, nats). Costs one forward pass of the reference over the selected sequences.
pub fn reference_refusals(
    reference: &Policy,
    groups: &[RolloutGroup],
    selected: impl Fn(&RolloutGroup) -> bool,
    bound: f64,
) -> Result<Vec<Refusal>> {
    let mut refused = vec![];
    for (index, g) in groups.iter().enumerate().filter(|(_, g)| selected(g)) {
        let seqs: Vec<&SequenceData> = g.challenger.iter().chain(g.answers.iter().map(|a| &a.sequence)).collect();
        let pairs: Vec<(Vec<i64>, Vec<i64>)> =
            seqs.iter().map(|s| (s.prompt_ids.clone(), s.completion_ids.clone())).collect();
        let lp = tch::no_grad(|| Scorer::new(&reference.model).score(&pairs))?;
        let rows: Vec<Vec<f32>> =
            Vec::<Vec<f32>>::try_from(lp.logprobs.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
        let (mut mean, mut max) = (0.0f64, 0.0f64);
        for (s, row) in seqs.iter().zip(&rows) {
            let d: Vec<f64> = s.ref_logprobs.iter().zip(row).map(|(a, b)| (*a as f64 - *b as f64).abs()).collect();
            let m = d.iter().sum::<f64>() / d.len().max(1) as f64;
            mean = if m.is_nan() || mean.is_nan() { f64::NAN } else { mean.max(m) };
            max = d.iter().fold(max, |x, y| x.max(*y));
        }
        if mean.is_nan() || mean > bound {
            refused.push(Refusal {
                index,
                unit_id: g.unit_id.clone(),
                actor_id: g.actor_id.clone(),
                which: Disagreement::Reference,
                mean,
                max,
                bound,
            });
        }
    }
    Ok(refused)
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    adam_t: u64,
    config: String,
    extra: serde_json::Value,
}

/// What [`Trainer::step_on`] did: applied the step, only computed its gradient, or refused
/// groups and applied nothing.
enum Outcome {
    Stats(StepStats),
    Gradients(Vec<(String, Tensor)>),
    Refused(Vec<Refusal>),
}

#[derive(Default)]
struct Accum {
    loss_sol: f64,
    loss_ch: f64,
    kl_sol: f64,
    kl_ch: f64,
    n_sol: u64,
    n_ch: u64,
    ent_sol: f64,
    ent_ch: f64,
    tok_sol: u64,
    tok_ch: u64,
    /// Sum, count and largest of the per-token |lp - mu| over the step.
    mismatch_sum: f64,
    mismatch_tokens: u64,
    mismatch_max: f64,
    /// Per group: the largest mean per-token mismatch of its sequences, and its largest
    /// per-token mismatch.
    group_mismatch: Vec<(f64, f64)>,
}

impl Accum {
    /// Sums (and maxima) over the learner ranks, so every rank holds the step's statistics;
    /// `tokens` is summed and `skipped` becomes true everywhere if it is anywhere.
    fn all_reduce(&mut self, dp: &DataParallel, tokens: &mut usize, skipped: &mut bool) -> Result<()> {
        let mut sums = [
            self.loss_sol,
            self.loss_ch,
            self.kl_sol,
            self.kl_ch,
            self.n_sol as f64,
            self.n_ch as f64,
            self.ent_sol,
            self.ent_ch,
            self.tok_sol as f64,
            self.tok_ch as f64,
            self.mismatch_sum,
            self.mismatch_tokens as f64,
            *tokens as f64,
        ];
        dp.sum(&mut sums)?;
        let mut maxes = vec![self.mismatch_max, *skipped as u8 as f64];
        maxes.extend(self.group_mismatch.iter().flat_map(|&(a, b)| [a, b]));
        dp.max(&mut maxes)?;
        [self.loss_sol, self.loss_ch, self.kl_sol, self.kl_ch] = [sums[0], sums[1], sums[2], sums[3]];
        [self.n_sol, self.n_ch] = [sums[4] as u64, sums[5] as u64];
        [self.ent_sol, self.ent_ch] = [sums[6], sums[7]];
        [self.tok_sol, self.tok_ch] = [sums[8] as u64, sums[9] as u64];
        self.mismatch_sum = sums[10];
        self.mismatch_tokens = sums[11] as u64;
        *tokens = sums[12] as usize;
        self.mismatch_max = maxes[0];
        *skipped = maxes[1] > 0.0;
        for (i, g) in self.group_mismatch.iter_mut().enumerate() {
            *g = (maxes[2 + 2 * i], maxes[3 + 2 * i]);
        }
        Ok(())
    }
}
