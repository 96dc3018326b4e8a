//! Every knob of a run, in one TOML file; each can be overridden on the command line with
//! `--set section.key=value`. Unknown keys and impossible values are errors.
//!
//! Defaults follow the paper's Table 1 (N = 8 queries per step, beta = 0.05, lr 3e-6 for LSP and
//! LSP-Zero and 1e-6 for GRPO, gradient accumulation 2). Where the paper is silent:
//! - G = 4 answers per query: the smallest group whose mean is a usable baseline at 4x the
//!   solver cost of one answer; 8 x 4 = 32 answers per step.
//! - alpha_ch = 1: both roles weigh the same, as in L = L_sol + L_ch without a factor.
//! - temperature 1.0 and top-p 1.0 for both roles: sampling from pi itself keeps the policy
//!   gradient unbiased (a sharpened sampler would not be the policy being differentiated).
//! - challenger 96 new tokens (one instruction), solver 256, judge 256: ~100 words of
//!   justification (~140 tokens) plus `<Calculation>..</Calculation>` and `<Score>N</Score>`
//!   (~30 tokens), with room for a judge that overruns its word limit (160 cut off the tag).
//! - KL as the per-token k3 estimator summed over each sequence (see docs/method.md: the literal
//!   log-ratio has zero expected gradient on-policy).
use crate::error::{io_err, GameError, Result};
use crate::prompts::ParseFailure;
use crate::rewards::Mode;
use selfplay_policy::{PolicyError, SamplingConfig, DEVICE_WORDS};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub game: GameConfig,
    pub challenger: RoleSampling,
    pub solver: RoleSampling,
    pub self_reward: SelfRewardConfig,
    pub reward: RewardConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub actor: ActorConfig,
    pub learner: LearnerConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Names the run: the coordinator, the learner and the actors must agree on it, so a
    /// learner or actor of another run is refused. Empty: the learner makes one at its first
    /// start and keeps it in `<out_dir>/run.json`; actors then accept any.
    pub id: String,
    pub seed: u64,
    /// Learner steps to run (0 = until stopped).
    pub steps: u64,
    /// Where checkpoints and logs go.
    pub out_dir: PathBuf,
    /// Checkpoint every M steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep (0 = all).
    pub keep_checkpoints: usize,
    /// Also write every trained group's texts (query, answers, rewards) to
    /// `<out_dir>/samples.jsonl`: what the challenger asked and how the solver answered.
    pub log_samples: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hugging Face directory of the initial policy, or a Hub id (`org/name`) fetched into
    /// the Hugging Face cache (empty = the embedded default model).
    pub path: PathBuf,
    /// Revision (branch, tag or commit) of `path` when it is a Hub id.
    pub revision: String,
    /// The frozen reference pi_ref (KL terms, self-reward judge); empty = `path`, the initial
    /// policy. Set it when a run starts from other weights (`--init-from`) but should stay
    /// close to another model. It must share the policy's tokenizer.
    pub reference_path: PathBuf,
    /// cpu, cuda, cuda:N, or "auto" (cuda when available).
    pub device: String,
    /// auto (bf16 on CUDA, f32 on the CPU), f32 or bf16 (f16 trains poorly without loss
    /// scaling and is refused for training). The actors' policy and reference use it too.
    pub dtype: String,
    /// The actors' reference model (reference log-probs, self-reward judge): cpu, cuda,
    /// cuda:N or auto; empty = beside the policy on `device`.
    pub reference_device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GameConfig {
    pub mode: Mode,
    /// N: queries (work units) per learner step.
    pub queries_per_step: usize,
    /// G: solver answers per query.
    pub group_size: usize,
    /// Weight of the challenger loss.
    pub alpha_ch: f64,
    /// Challenger tasks, used round-robin over a step's units ("" = free choice).
    pub tasks: Vec<String>,
    /// Fill-in pattern the challenger's instruction must follow ("" = none).
    pub template: String,
    /// Files replacing the built-in prompts (empty = built-in).
    pub challenger_prompt_file: PathBuf,
    pub judge_prompt_file: PathBuf,
    /// GRPO mode: the training prompts, a JSON list or JSONL of objects with "instruction"
    /// (or "prompt"), or of strings.
    pub prompts_file: PathBuf,
}

/// How an actor plays: how many units it plays together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorConfig {
    /// K: units an actor leases and plays at once (their queries in one batch, their K x G
    /// answers in one, and so on). 0 = the device's default ([`ActorConfig::units_for`]);
    /// 1 = one unit at a time.
    pub units_in_flight: usize,
}

/// What the learner checks in the groups actors send, beyond their validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    /// Synchronous mode: a group is refused as corrupt when one of its sequences' mean
    /// per-token |log pi - log mu| (the learner's current log-prob against the behaviour
    /// log-prob the actor sent) exceeds this many nats. Unset = derived from the dtypes
    /// ([`LearnerConfig::mismatch_bound`]); `inf` = never refuse.
    pub max_logprob_mismatch: Option<f64>,
    /// Share of groups (0..=1, chosen by a hash of the run seed and unit id) whose reference
    /// log-probs the learner recomputes with its own copy of the reference model, refusing
    /// a group that disagrees by more than the mismatch bound. 0 = off: no reference model
    /// is loaded on the learner.
    pub reference_check_fraction: f64,
}

impl LearnerConfig {
    /// The bound in effect: `max_logprob_mismatch`, else [`crate::trainer::MISMATCH_BOUND_F32`]
    /// when every side certainly computes in f32 (`model_dtype` is f32 on any device, so
    /// actors on CUDA too, and weights travel in f32), else the half-precision bound.
    pub fn mismatch_bound(&self, model_dtype: &str, weights_travel_in_f32: bool) -> f64 {
        if let Some(b) = self.max_logprob_mismatch {
            return b;
        }
        let f32_everywhere = selfplay_policy::parse_kind_on(model_dtype, Device::Cuda(0)).ok() == Some(Kind::Float)
            && selfplay_policy::parse_kind_on(model_dtype, Device::Cpu).ok() == Some(Kind::Float);
        if f32_everywhere && weights_travel_in_f32 {
            crate::trainer::MISMATCH_BOUND_F32
        } else {
            crate::trainer::MISMATCH_BOUND_HALF
        }
    }
}

impl ActorConfig {
    /// Default K on a CPU: one unit at a time, the only setting under which a run disturbed by
    /// kills ends bit-identical to an undisturbed one (batch composition depends on timing, and
    /// batching changes numbers by rounding). On two quiet cores K = 8 plays 1.92x as fast
    /// (BENCHMARKS.md); set `actor.units_in_flight` for that throughput.
    pub const CPU_UNITS_IN_FLIGHT: usize = 1;
    /// Default K on a CUDA device: K x G = 128 answers in flight keeps a GPU busy with a small
    /// model, and the generator caps what runs at once anyway.
    pub const CUDA_UNITS_IN_FLIGHT: usize = 32;

    /// K in effect on `device`.
    pub fn units_for(&self, device: tch::Device) -> usize {
        match (self.units_in_flight, device) {
            (0, tch::Device::Cpu) => Self::CPU_UNITS_IN_FLIGHT,
            (0, _) => Self::CUDA_UNITS_IN_FLIGHT,
            (k, _) => k,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoleSampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub max_new_tokens: i64,
}

impl RoleSampling {
    pub fn to_sampling(&self, seed: u64) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            seed,
            stop: vec![],
            max_batch: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelfRewardMode {
    /// The paper's: the judge writes a justification and `<Score>N</Score>` (greedy).
    Generate,
    /// One forward pass over the judge prompt ending at `<Score>`: the probability-weighted
    /// mean over the tokens 0..7.
    Expected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfRewardConfig {
    pub mode: SelfRewardMode,
    pub max_new_tokens: i64,
    pub parse_failure: ParseFailure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardKind {
    /// A LlamaForSequenceClassification reward model (Skywork-Reward-V2 format).
    Model,
    /// A causal LM prompted with the rubric (when no reward model exists).
    Judge,
    /// No external reward: R = 0 (LSP then trains on the self-reward alone).
    None,
    /// A remote `Reward` gRPC service.
    Remote,
    /// Built-in rules on the answer's text (`reward.rules`), no model.
    Rule,
    /// A weighted sum of several sources (`reward.sources`).
    Combined,
}

/// One check of a `rule` reward. Each scores 1 (satisfied) or 0, times its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    /// The answer has `words` words, give or take `tolerance`.
    Length,
    /// The answer matches the regular expression `pattern` (anywhere, unless anchored).
    Regex,
    /// The answer contains `text`.
    Contains,
    /// The answer does not contain `text`.
    NotContains,
    /// The answer (without a surrounding ``` fence) parses as JSON; with `keys`, as an object
    /// holding each of them.
    Json,
    /// GRPO: the answer's final answer equals the prompt row's `answer` field.
    Exact,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub rule: RuleKind,
    /// Multiplies the rule's 0 or 1 (default 1; negative weights penalise).
    #[serde(default = "one")]
    pub weight: f64,
    /// `length`: the target number of words (whitespace-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<u64>,
    /// `length`: how many words off the target still pass (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<u64>,
    /// `regex`: the pattern (Rust regex syntax; `(?i)` for case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `contains`, `not-contains`: the text to look for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `contains`, `not-contains`: compare case-insensitively (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_case: Option<bool>,
    /// `json`: keys the top-level object must have (empty: any JSON value passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

fn one() -> f64 {
    1.0
}

/// One part of a `combined` reward: a source like the top-level ones, and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSourceConfig {
    pub kind: RewardKind,
    pub weight: f64,
    pub path: PathBuf,
    pub address: String,
    pub judge_mode: SelfRewardMode,
    pub prompt_file: PathBuf,
    pub rules: Vec<RuleConfig>,
}

impl Default for RewardSourceConfig {
    fn default() -> Self {
        let r = RewardConfig::default();
        RewardSourceConfig {
            kind: r.kind,
            weight: 1.0,
            path: r.path,
            address: r.address,
            judge_mode: r.judge_mode,
            prompt_file: r.prompt_file,
            rules: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    pub kind: RewardKind,
    /// Model directory for `model` and `judge` (empty for `judge` = the reference model).
    pub path: PathBuf,
    /// Address of the reward service for `remote`.
    pub address: String,
    /// Multiplies R (reward models have arbitrary scales; R and R_Q are added unscaled).
    pub scale: f64,
    /// `judge`: how the judge model grades (generate or expected).
    pub judge_mode: SelfRewardMode,
    /// `judge`: a file replacing the built-in grading prompt (empty = built-in).
    pub prompt_file: PathBuf,
    /// `rule`: the checks, summed with their weights.
    pub rules: Vec<RuleConfig>,
    /// `combined`: the sources, summed with their weights.
    pub sources: Vec<RewardSourceConfig>,
}

impl RewardConfig {
    /// The weighted sources R sums: the `combined` list, or the top-level source alone.
    pub fn parts(&self) -> Vec<RewardSourceConfig> {
        if self.kind == RewardKind::Combined {
            return self.sources.clone();
        }
        vec![RewardSourceConfig {
            kind: self.kind,
            weight: 1.0,
            path: self.path.clone(),
            address: self.address.clone(),
            judge_mode: self.judge_mode,
            prompt_file: self.prompt_file.clone(),
            rules: self.rules.clone(),
        }]
    }

    /// The address of the remote source, if R has one (the actor connects to it).
    pub fn remote_address(&self) -> Option<String> {
        self.parts().into_iter().find(|p| p.kind == RewardKind::Remote).map(|p| p.address)
    }

    /// Whether a rule needs the prompt rows' `answer` field.
    pub fn needs_answers(&self) -> bool {
        self.parts().iter().any(|p| p.kind == RewardKind::Rule && p.rules.iter().any(|r| r.rule == RuleKind::Exact))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlMode {
    /// Per-token k3 = exp(ref - logp) - (ref - logp) - 1 in the loss (default).
    K3,
    /// beta * detached sequence log-ratio subtracted from each reward; no KL term in the loss.
    RewardPenalty,
    /// The paper's literal term: beta * (log pi(y|x) - log pi_ref(y|x)) with its gradient.
    Paper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Sum over a sequence's tokens (the paper's sequence-level pi(y|x)).
    SequenceSum,
    /// Mean over a sequence's tokens.
    TokenMean,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub beta: f64,
    pub kl: KlMode,
    pub aggregation: Aggregation,
    /// GRPO: advantage = (R - mean) / (std + grpo_eps).
    pub grpo_eps: f64,
    /// Truncated importance weights min(pi/mu, c) for stale (asynchronous) groups; 0 = off.
    pub importance_cap: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// 0 = the mode's default (3e-6 LSP / LSP-Zero, 1e-6 GRPO).
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Micro-batches per step: the step's groups are split into this many backward passes.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    /// Cuts each micro-batch further so that its padded tokens (sequences x longest sequence)
    /// stay within this bound: activation memory follows it. 0 = no bound. The step's result
    /// does not depend on it.
    pub micro_batch_tokens: usize,
    /// Completion positions whose full-vocabulary logits exist at once, in the forward pass
    /// and in the gradient (0 = all). The step's result does not depend on it.
    pub logprob_chunk_tokens: usize,
    /// Keep only each decoder block's input in the forward pass and recompute the block in
    /// the backward pass: activation memory for one block at a time instead of every block's,
    /// for a second forward pass through the trunk. The gradient is the same up to the order
    /// of floating-point sums.
    pub gradient_checkpointing: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            id: String::new(),
            seed: 0,
            steps: 100,
            out_dir: PathBuf::from("runs/selfplay"),
            checkpoint_every: 50,
            keep_checkpoints: 3,
            log_samples: false,
        }
    }
}
impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::new(),
            revision: "main".into(),
            reference_path: PathBuf::new(),
            device: "auto".into(),
            dtype: "auto".into(),
            reference_device: String::new(),
        }
    }
}
impl Default for GameConfig {
    fn default() -> Self {
        GameConfig {
            mode: Mode::Lsp,
            queries_per_step: 8,
            group_size: 4,
            alpha_ch: 1.0,
            tasks: vec![],
            template: String::new(),
            challenger_prompt_file: PathBuf::new(),
            judge_prompt_file: PathBuf::new(),
            prompts_file: PathBuf::new(),
        }
    }
}
impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig { units_in_flight: 0 }
    }
}
impl Default for RoleSampling {
    fn default() -> Self {
        RoleSampling { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256 }
    }
}
impl Default for SelfRewardConfig {
    fn default() -> Self {
        SelfRewardConfig { mode: SelfRewardMode::Generate, max_new_tokens: 256, parse_failure: ParseFailure::Zero }
    }
}
impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            kind: RewardKind::Judge,
            path: PathBuf::new(),
            address: String::new(),
            scale: 1.0,
            judge_mode: SelfRewardMode::Expected,
            prompt_file: PathBuf::new(),
            rules: vec![],
            sources: vec![],
        }
    }
}
impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            beta: 0.05,
            kl: KlMode::K3,
            aggregation: Aggregation::SequenceSum,
            grpo_eps: 1e-4,
            importance_cap: 0.0,
        }
    }
}
impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_accum: 2,
            max_grad_norm: 1.0,
            micro_batch_tokens: 0,
            logprob_chunk_tokens: selfplay_policy::scoring::DEFAULT_CHUNK_POSITIONS,
            gradient_checkpointing: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut challenger = RoleSampling::default();
        challenger.max_new_tokens = 96;
        Config {
            run: RunConfig::default(),
            model: ModelConfig::default(),
            game: GameConfig::default(),
            challenger,
            solver: RoleSampling::default(),
            self_reward: SelfRewardConfig::default(),
            reward: RewardConfig::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            actor: ActorConfig::default(),
            learner: LearnerConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file (None = defaults) and applies `key=value` overrides in order.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(io_err(p))?;
                Self::from_toml_str(&text, overrides).map_err(|e| match e {
                    GameError::Config(m) => GameError::Config(format!("{}: {m}", p.display())),
                    e => e,
                })
            }
            None => Self::from_toml_str("", overrides),
        }
    }

    /// Parses TOML text and applies `key=value` overrides in order.
    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value = text.parse::<toml::Table>().map_err(|e| GameError::Config(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Config =
            toml::Value::Table(value).try_into().map_err(|e: toml::de::Error| GameError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// The learning rate in effect (the mode's default when lr = 0).
    pub fn lr(&self) -> f64 {
        match (self.optim.lr, self.game.mode) {
            (lr, _) if lr > 0.0 => lr,
            (_, Mode::Grpo) => 1e-6,
            _ => 3e-6,
        }
    }

    /// The dtype of the models on `device`: `model.dtype`, with auto = bf16 on CUDA and f32
    /// on the CPU.
    pub fn kind_on(&self, device: Device) -> Result<Kind> {
        selfplay_policy::parse_kind_on(&self.model.dtype, device)
            .map_err(|e| GameError::Config(format!("model.dtype: {e}")))
    }

    /// The device of the actors' reference model: `model.reference_device`, or `policy`'s
    /// when it is empty. A device libtorch does not see is refused here, with the key named.
    pub fn reference_device(&self, policy: Device) -> Result<Device> {
        match self.model.reference_device.trim() {
            "" => Ok(policy),
            word => selfplay_policy::parse_device(word)
                .map_err(|e| GameError::Config(format!("model.reference_device: {e}"))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let mut errs = vec![];
        let mut need = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        let g = &self.game;
        need(g.queries_per_step >= 1, format!("game.queries_per_step must be >= 1, got {}", g.queries_per_step));
        // Every mode's solver baseline is the group mean: with one answer the advantage is
        // always 0 and only the challenger (LSP, LSP-Zero) or nothing (GRPO) would learn.
        need(
            g.group_size >= 2,
            format!(
                "game.group_size must be >= 2 in {} mode (the baseline is the group's mean reward: one answer always has advantage 0), got {}",
                g.mode.name(),
                g.group_size
            ),
        );
        need(g.alpha_ch.is_finite() && g.alpha_ch >= 0.0, format!("game.alpha_ch must be >= 0, got {}", g.alpha_ch));
        need(
            g.mode != Mode::Grpo || !g.prompts_file.as_os_str().is_empty(),
            "game.prompts_file is required in grpo mode".into(),
        );
        for (name, s) in [("challenger", &self.challenger), ("solver", &self.solver)] {
            need(
                s.temperature.is_finite() && s.temperature >= 0.0,
                format!("{name}.temperature must be >= 0, got {}", s.temperature),
            );
            need(s.top_p > 0.0 && s.top_p <= 1.0, format!("{name}.top_p must be in (0, 1], got {}", s.top_p));
            need(s.top_k >= 0, format!("{name}.top_k must be >= 0, got {}", s.top_k));
            need(s.max_new_tokens >= 1, format!("{name}.max_new_tokens must be >= 1, got {}", s.max_new_tokens));
        }
        need(self.self_reward.max_new_tokens >= 1, "self_reward.max_new_tokens must be >= 1".into());
        let l = &self.loss;
        need(l.beta.is_finite() && l.beta >= 0.0, format!("loss.beta must be >= 0, got {}", l.beta));
        need(l.grpo_eps.is_finite() && l.grpo_eps >= 0.0, format!("loss.grpo_eps must be >= 0, got {}", l.grpo_eps));
        need(
            l.importance_cap.is_finite() && l.importance_cap >= 0.0,
            format!("loss.importance_cap must be >= 0, got {}", l.importance_cap),
        );
        let lc = &self.learner;
        if let Some(b) = lc.max_logprob_mismatch {
            // inf is allowed: it turns the check off.
            need(b > 0.0, format!("learner.max_logprob_mismatch must be > 0 (inf = no check), got {b}"));
        }
        need(
            (0.0..=1.0).contains(&lc.reference_check_fraction),
            format!("learner.reference_check_fraction must be in [0, 1], got {}", lc.reference_check_fraction),
        );
        let o = &self.optim;
        need(o.lr.is_finite() && o.lr >= 0.0, format!("optim.lr must be >= 0, got {}", o.lr));
        need(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!("optim.weight_decay must be >= 0, got {}", o.weight_decay),
        );
        need(
            (0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2),
            "optim.beta1 and beta2 must be in [0, 1)".into(),
        );
        need(o.eps > 0.0, format!("optim.eps must be > 0, got {}", o.eps));
        need(
            o.grad_accum >= 1 && o.grad_accum <= g.queries_per_step,
            format!("optim.grad_accum must be in 1..=queries_per_step ({}), got {}", g.queries_per_step, o.grad_accum),
        );
        need(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0, "optim.max_grad_norm must be >= 0".into());
        need(
            matches!(self.model.dtype.as_str(), "auto" | "f32" | "bf16"),
            format!("model.dtype must be auto, f32 or bf16, got {:?}", self.model.dtype),
        );
        // The word only: whether that device exists is known where the actor starts.
        let r = &self.model.reference_device;
        need(
            r.is_empty() || !matches!(selfplay_policy::parse_device(r), Err(PolicyError::InvalidInput(_))),
            format!("model.reference_device must be empty, {DEVICE_WORDS}; got {r:?}"),
        );
        need(self.reward.scale.is_finite(), "reward.scale must be finite".into());
        need(
            self.actor.units_in_flight <= MAX_UNITS_IN_FLIGHT,
            format!("actor.units_in_flight must be in 0..={MAX_UNITS_IN_FLIGHT}, got {}", self.actor.units_in_flight),
        );
        errs.extend(self.reward_errors());
        if errs.is_empty() {
            Ok(())
        } else {
            Err(GameError::Config(errs.join("; ")))
        }
    }
}

impl Config {
    fn reward_errors(&self) -> Vec<String> {
        let r = &self.reward;
        let mut errs = vec![];
        if r.kind == RewardKind::Combined {
            if r.sources.is_empty() {
                errs.push("reward.kind = \"combined\" needs at least one [[reward.sources]]".into());
            }
            if !r.rules.is_empty() {
                errs.push("reward.rules belong in a [[reward.sources]] entry of kind \"rule\" when reward.kind = \"combined\"".into());
            }
        } else if !r.sources.is_empty() {
            errs.push("reward.sources are only read with reward.kind = \"combined\"".into());
        }
        let parts = r.parts();
        let remotes = parts.iter().filter(|p| p.kind == RewardKind::Remote).count();
        if remotes > 1 {
            errs.push(format!("reward.sources has {remotes} remote sources; at most one is supported"));
        }
        for (i, p) in parts.iter().enumerate() {
            let at = if r.kind == RewardKind::Combined { format!("reward.sources[{i}]") } else { "reward".into() };
            match p.kind {
                RewardKind::Combined => errs.push(format!("{at}.kind = \"combined\" cannot be nested")),
                RewardKind::Model if p.path.as_os_str().is_empty() => {
                    errs.push(format!("{at}.path is required for kind = \"model\""))
                }
                RewardKind::Remote if p.address.is_empty() => {
                    errs.push(format!("{at}.address is required for kind = \"remote\""))
                }
                RewardKind::Rule if p.rules.is_empty() => {
                    errs.push(format!("{at}.rules: kind = \"rule\" needs at least one rule"))
                }
                _ => {}
            }
            if p.kind != RewardKind::Rule && !p.rules.is_empty() {
                errs.push(format!("{at}.rules are only read with kind = \"rule\""));
            }
            if !p.weight.is_finite() {
                errs.push(format!("{at}.weight must be finite, got {}", p.weight));
            }
            for (j, rule) in p.rules.iter().enumerate() {
                if let Err(e) = rule.check() {
                    errs.push(format!("{at}.rules[{j}] ({}): {e}", rule.rule.name()));
                }
                if rule.rule == RuleKind::Exact && self.game.mode != Mode::Grpo {
                    errs.push(format!(
                        "{at}.rules[{j}] (exact) needs game.mode = \"grpo\": only data prompts carry an answer"
                    ));
                }
            }
        }
        errs
    }
}

impl RuleKind {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            RuleKind::Length => "length",
            RuleKind::Regex => "regex",
            RuleKind::Contains => "contains",
            RuleKind::NotContains => "not-contains",
            RuleKind::Json => "json",
            RuleKind::Exact => "exact",
        }
    }
}

impl RuleConfig {
    /// The rule's parameters are the ones its kind reads, and valid.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !self.weight.is_finite() {
            return Err(format!("weight must be finite, got {}", self.weight));
        }
        let given: Vec<&str> = [
            ("words", self.words.is_some()),
            ("tolerance", self.tolerance.is_some()),
            ("pattern", self.pattern.is_some()),
            ("text", self.text.is_some()),
            ("ignore_case", self.ignore_case.is_some()),
            ("keys", self.keys.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| k)
        .collect();
        let (required, allowed): (&[&str], &[&str]) = match self.rule {
            RuleKind::Length => (&["words"], &["words", "tolerance"]),
            RuleKind::Regex => (&["pattern"], &["pattern"]),
            RuleKind::Contains | RuleKind::NotContains => (&["text"], &["text", "ignore_case"]),
            RuleKind::Json => (&[], &["keys"]),
            RuleKind::Exact => (&[], &[]),
        };
        if let Some(k) = required.iter().find(|k| !given.contains(k)) {
            return Err(format!("needs {k}"));
        }
        if let Some(k) = given.iter().find(|k| !allowed.contains(k)) {
            return Err(format!("{k} is not read by this rule (it reads {})", allowed.join(", ")));
        }
        if let Some(p) = &self.pattern {
            regex::Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}"))?;
        }
        if self.text.as_deref() == Some("") {
            return Err("text is empty".into());
        }
        Ok(())
    }
}
/// The most units one actor may hold at once (the coordinator's per-step limit is larger;
/// this bounds the memory of one batch).
pub const MAX_UNITS_IN_FLIGHT: usize = 1024;

/// `a.b.c=value`: value parsed as TOML (numbers, booleans, arrays, quoted strings), else taken
/// as a bare string.
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) =
        spec.split_once('=').ok_or_else(|| GameError::Config(format!("override {spec:?} is not key=value")))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| GameError::Config(format!("override {key}: {p} is not a table")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_paper() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.game.queries_per_step, 8);
        assert_eq!(c.loss.beta, 0.05);
        assert_eq!(c.optim.grad_accum, 2);
        assert_eq!(c.lr(), 3e-6);
        let g = Config::load(None, &["game.mode=\"grpo\"".into(), "game.prompts_file=p.json".into()]).unwrap();
        assert_eq!(g.lr(), 1e-6);
    }

    #[test]
    fn overrides_and_round_trip() {
        let c =
            Config::load(None, &["game.group_size=6".into(), "loss.kl=paper".into(), "game.tasks=[\"math\"]".into()])
                .unwrap();
        assert_eq!(c.game.group_size, 6);
        assert_eq!(c.loss.kl, KlMode::Paper);
        assert_eq!(c.game.tasks, vec!["math".to_string()]);
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn the_logprob_mismatch_bound_follows_the_dtypes() {
        use crate::trainer::{MISMATCH_BOUND_F32, MISMATCH_BOUND_HALF};
        let c = Config::load(None, &[]).unwrap();
        // auto is bf16 on CUDA actors: only an explicit f32 with f32 weights on the wire is tight.
        assert_eq!(c.learner.mismatch_bound("auto", true), MISMATCH_BOUND_HALF);
        assert_eq!(c.learner.mismatch_bound("f32", true), MISMATCH_BOUND_F32);
        assert_eq!(c.learner.mismatch_bound("f32", false), MISMATCH_BOUND_HALF);
        assert_eq!(c.learner.mismatch_bound("bf16", true), MISMATCH_BOUND_HALF);
        let set = Config::load(None, &["learner.max_logprob_mismatch=0.25".into()]).unwrap();
        assert_eq!(set.learner.mismatch_bound("f32", true), 0.25);
        let off = Config::load(None, &["learner.max_logprob_mismatch=inf".into()]).unwrap();
        assert_eq!(off.learner.mismatch_bound("auto", false), f64::INFINITY);
        let back: Config = toml::from_str(&off.to_toml()).unwrap();
        assert_eq!(back, off);
        for bad in
            ["learner.max_logprob_mismatch=0", "learner.max_logprob_mismatch=-1", "learner.max_logprob_mismatch=nan"]
        {
            let e = Config::load(None, &[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("learner.max_logprob_mismatch"), "{bad}: {e}");
        }
        for bad in ["learner.reference_check_fraction=1.5", "learner.reference_check_fraction=-0.1"] {
            let e = Config::load(None, &[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("learner.reference_check_fraction"), "{bad}: {e}");
        }
    }

    #[test]
    fn rule_and_combined_rewards() {
        let text = r#"
[reward]
kind = "combined"
[[reward.sources]]
kind = "model"
path = "rm"
weight = 0.5
[[reward.sources]]
kind = "rule"
weight = 2.0
rules = [
  { rule = "length", words = 50, tolerance = 10 },
  { rule = "regex", pattern = "^\\{", weight = 0.5 },
  { rule = "not-contains", text = "As an AI", ignore_case = true },
  { rule = "json", keys = ["answer"] },
]
[[reward.sources]]
kind = "remote"
address = "http://127.0.0.1:50053"
"#;
        let c = Config::from_toml_str(text, &[]).unwrap();
        let parts = c.reward.parts();
        assert_eq!(
            parts.iter().map(|p| (p.kind, p.weight)).collect::<Vec<_>>(),
            vec![(RewardKind::Model, 0.5), (RewardKind::Rule, 2.0), (RewardKind::Remote, 1.0)]
        );
        assert_eq!(parts[1].rules[0].words, Some(50));
        assert_eq!(parts[1].rules[1].weight, 0.5);
        assert_eq!(c.reward.remote_address().as_deref(), Some("http://127.0.0.1:50053"));
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);

        let rule =
            Config::from_toml_str("[reward]\nkind = \"rule\"\nrules = [{ rule = \"contains\", text = \"yes\" }]", &[])
                .unwrap();
        assert_eq!(rule.reward.parts()[0].rules.len(), 1);
        assert!(!rule.reward.needs_answers() && rule.reward.remote_address().is_none());

        for (bad, want) in [
            ("[reward]\nkind = \"rule\"", "reward.rules: kind = \"rule\" needs at least one rule"),
            ("[reward]\nkind = \"combined\"", "needs at least one [[reward.sources]]"),
            ("[reward]\nkind = \"rule\"\nrules = [{ rule = \"length\" }]", "reward.rules[0] (length): needs words"),
            (
                "[reward]\nkind = \"rule\"\nrules = [{ rule = \"exact\" }]",
                "reward.rules[0] (exact) needs game.mode = \"grpo\"",
            ),
            (
                "[reward]\nkind = \"combined\"\n[[reward.sources]]\nkind = \"combined\"",
                "reward.sources[0].kind = \"combined\" cannot be nested",
            ),
            (
                "[reward]\nkind = \"combined\"\n[[reward.sources]]\nkind = \"model\"",
                "reward.sources[0].path is required",
            ),
            (
                "[reward]\nkind = \"model\"\npath = \"rm\"\n[[reward.sources]]\nkind = \"none\"",
                "reward.sources are only read",
            ),
            (
                "[reward]\nkind = \"none\"\nrules = [{ rule = \"json\" }]",
                "reward.rules are only read with kind = \"rule\"",
            ),
            ("[reward]\nkind = \"rule\"\nrules = [{ rule = \"json\", pattern = \"x\" }]", "pattern is not read"),
            ("[reward]\nkind = \"rule\"\nrules = [{ rule = \"jsn\" }]", "jsn"),
            ("[reward]\nkind = \"rule\"\nrules = [{ rule = \"json\", keyz = [] }]", "keyz"),
        ] {
            let e = Config::from_toml_str(bad, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}:\n{e}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_the_key_named() {
        let e = Config::load(None, &["game.group_sise=4".into()]).unwrap_err().to_string();
        assert!(e.contains("group_sise"), "{e}");
        let e = Config::load(None, &["loss.beta=-1".into()]).unwrap_err().to_string();
        assert!(e.contains("loss.beta"), "{e}");
        let e = Config::load(None, &["optim.grad_accum=9".into()]).unwrap_err().to_string();
        assert!(e.contains("grad_accum"), "{e}");
        let e = Config::load(None, &["loss.kl=\"k4\"".into()]).unwrap_err().to_string();
        assert!(e.contains("k4"), "{e}");
        let e = Config::load(None, &["game.mode=grpo".into()]).unwrap_err().to_string();
        assert!(e.contains("prompts_file"), "{e}");
        for mode in ["lsp", "lsp-zero"] {
            let e = Config::load(None, &[format!("game.mode={mode:?}"), "game.group_size=1".into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("game.group_size must be >= 2") && e.contains(mode), "{e}");
        }
        let e = Config::load(None, &["model.dtype=f16".into()]).unwrap_err().to_string();
        assert!(e.contains("model.dtype") && e.contains("f16"), "{e}");
        for word in ["gpu", "cuda:x", "CPU"] {
            let e = Config::load(None, &[format!("model.reference_device={word:?}")]).unwrap_err().to_string();
            assert!(e.contains("model.reference_device") && e.contains(word), "{e}");
        }
    }

    #[test]
    fn dtype_auto_follows_the_device() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.model.dtype, "auto");
        assert_eq!(c.kind_on(Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(c.kind_on(Device::Cuda(0)).unwrap(), Kind::BFloat16);
        let f = Config::load(None, &["model.dtype=f32".into()]).unwrap();
        assert_eq!(f.kind_on(Device::Cuda(0)).unwrap(), Kind::Float);
        let b = Config::load(None, &["model.dtype=bf16".into()]).unwrap();
        assert_eq!(b.kind_on(Device::Cpu).unwrap(), Kind::BFloat16);
    }

    #[test]
    fn reference_device_defaults_to_the_policy_device() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.reference_device(Device::Cpu).unwrap(), Device::Cpu);
        assert_eq!(c.reference_device(Device::Cuda(1)).unwrap(), Device::Cuda(1));
        let c = Config::load(None, &["model.reference_device=cpu".into()]).unwrap();
        assert_eq!(c.reference_device(Device::Cuda(0)).unwrap(), Device::Cpu);
        // A well-formed word for a device this machine does not have passes the config check
        // (the config is shared by every role) and is refused where the reference is placed.
        let n = tch::Cuda::device_count().max(0);
        let c = Config::load(None, &[format!("model.reference_device=\"cuda:{n}\"")]).unwrap();
        let e = c.reference_device(Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("model.reference_device") && e.contains(&format!("cuda:{n}")), "{e}");
        let e = Config::load(None, &["actor.units_in_flight=5000".into()]).unwrap_err().to_string();
        assert!(e.contains("actor.units_in_flight"), "{e}");
    }

    #[test]
    fn units_in_flight_defaults_per_device() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.actor.units_for(tch::Device::Cpu), ActorConfig::CPU_UNITS_IN_FLIGHT);
        assert_eq!(c.actor.units_for(tch::Device::Cuda(0)), ActorConfig::CUDA_UNITS_IN_FLIGHT);
        let one = Config::load(None, &["actor.units_in_flight=1".into()]).unwrap();
        assert_eq!(one.actor.units_for(tch::Device::Cpu), 1);
        assert_eq!(one.actor.units_for(tch::Device::Cuda(0)), 1);
    }
}
