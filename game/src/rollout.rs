//! The plain value an actor produces for one work unit, and its validation.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SequenceData {
    pub prompt_ids: Vec<i64>,
    pub completion_ids: Vec<i64>,
    /// log mu(token | prefix) under the sampling policy, one per completion id.
    pub behaviour_logprobs: Vec<f32>,
    /// log pi_ref(token | prefix), one per completion id.
    pub ref_logprobs: Vec<f32>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AnswerData {
    pub sequence: SequenceData,
    pub reward: f32,
    pub self_reward: f32,
    pub self_reward_parsed: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RolloutGroup {
    pub unit_id: String,
    pub step: u64,
    pub weights_version: u64,
    pub actor_id: String,
    /// None in GRPO mode.
    pub challenger: Option<SequenceData>,
    pub answers: Vec<AnswerData>,
    pub play_seconds: f64,
    /// The learner epoch of the unit's lease (0 in process).
    pub epoch: u64,
}

/// The lowest log-prob a group may carry. A float32 log-softmax over any real vocabulary stays
/// far above it; values below cannot come from a model and would overflow the loss.
pub const MIN_LOGPROB: f32 = -1.0e4;

/// The largest reward or self-reward magnitude a group may carry. Reward models give scores of
/// order 10 and the self-reward is at most 7; a bound far above both keeps every sum of a
/// step's rewards, advantages and their squares (f64, then f32 in the loss) finite, where a
/// finite but huge value (3e38) would overflow and spoil the step.
pub const MAX_ABS_REWARD: f32 = 1.0e4;

/// The longest a unit may claim to have taken (a week), in seconds; only logged.
pub const MAX_PLAY_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// What a valid group must satisfy.
#[derive(Debug, Clone)]
pub struct GroupLimits {
    pub group_size: usize,
    pub vocab_size: i64,
    pub max_prompt_tokens: usize,
    pub max_completion_tokens: usize,
    pub needs_challenger: bool,
}

fn check_sequence(s: &SequenceData, field: &str, lim: &GroupLimits) -> Result<(), String> {
    if s.prompt_ids.is_empty() {
        return Err(format!("{field}.prompt_ids is empty"));
    }
    if s.completion_ids.is_empty() {
        return Err(format!("{field}.completion_ids is empty"));
    }
    if s.prompt_ids.len() > lim.max_prompt_tokens {
        return Err(format!("{field}.prompt_ids has {} tokens, limit {}", s.prompt_ids.len(), lim.max_prompt_tokens));
    }
    if s.completion_ids.len() > lim.max_completion_tokens {
        return Err(format!(
            "{field}.completion_ids has {} tokens, limit {}",
            s.completion_ids.len(),
            lim.max_completion_tokens
        ));
    }
    for (name, ids) in [("prompt_ids", &s.prompt_ids), ("completion_ids", &s.completion_ids)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id >= lim.vocab_size) {
            return Err(format!("{field}.{name}[{i}] = {id} is outside the vocabulary (0..{})", lim.vocab_size));
        }
    }
    let n = s.completion_ids.len();
    for (name, lps) in [("behaviour_logprobs", &s.behaviour_logprobs), ("ref_logprobs", &s.ref_logprobs)] {
        if lps.len() != n {
            return Err(format!("{field}.{name} has {} values for {n} completion tokens", lps.len()));
        }
        if let Some((i, v)) = lps.iter().enumerate().find(|(_, v)| !v.is_finite() || **v > 0.0 || **v < MIN_LOGPROB) {
            return Err(format!("{field}.{name}[{i}] = {v} (log-probs must be finite and in [{MIN_LOGPROB}, 0])"));
        }
    }
    Ok(())
}

impl RolloutGroup {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self, lim: &GroupLimits) -> Result<(), String> {
        if self.unit_id.is_empty() {
            return Err("unit_id is empty".into());
        }
        if self.answers.len() != lim.group_size {
            return Err(format!("answers has {} entries, expected G = {}", self.answers.len(), lim.group_size));
        }
        match (&self.challenger, lim.needs_challenger) {
            (None, true) => return Err("challenger is missing".into()),
            (Some(c), true) => check_sequence(c, "challenger", lim)?,
            (Some(_), false) => return Err("challenger must be empty in grpo mode".into()),
            (None, false) => {}
        }
        for (j, a) in self.answers.iter().enumerate() {
            check_sequence(&a.sequence, &format!("answers[{j}].sequence"), lim)?;
            if !a.reward.is_finite() {
                return Err(format!("answers[{j}].reward = {} is not finite", a.reward));
            }
            if !a.self_reward.is_finite() {
                return Err(format!("answers[{j}].self_reward = {} is not finite", a.self_reward));
            }
            for (name, v) in [("reward", a.reward), ("self_reward", a.self_reward)] {
                if v.abs() > MAX_ABS_REWARD {
                    return Err(format!("answers[{j}].{name} = {v} is outside [-{MAX_ABS_REWARD}, {MAX_ABS_REWARD}]"));
                }
            }
        }
        if !(0.0..=MAX_PLAY_SECONDS).contains(&self.play_seconds) {
            return Err(format!("play_seconds = {} is outside [0, {MAX_PLAY_SECONDS}]", self.play_seconds));
        }
        Ok(())
    }
}
