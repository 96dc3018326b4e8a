//! Reward sources behind one trait: a reward model (a Llama, Mistral, Qwen2 or Qwen3 sequence
//! classifier in the format of Skywork-Reward-V2), a judge language model prompted with the rubric, none,
//! rules on the text ([`crate::rules`]), a weighted sum of several, and (in the actor crate) a
//! remote `Reward` service.
use crate::config::{Config, RewardKind, RewardSourceConfig, SelfRewardMode};
use crate::error::{GameError, Result};
use crate::judge::Judge;
use selfplay_policy::{scoring, ChatMessage, Llama, Policy, Tokenizer};
use std::path::Path;
use tch::{Device, Kind};

pub trait RewardSource: Send {
    fn name(&self) -> &str;
    /// One finite score per (query, answer) pair. `reference` is the frozen reference model,
    /// which judge-style sources may grade with.
    fn score(&mut self, pairs: &[(String, String)], reference: &Policy) -> Result<Vec<f64>>;
}

fn check_finite(name: &str, scores: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    if scores.len() != n {
        return Err(GameError::Reward(format!("{name} returned {} scores for {n} pairs", scores.len())));
    }
    if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(GameError::Reward(format!("{name} gave a non-finite score {s} to pair {i}")));
    }
    Ok(scores)
}

/// A `*ForSequenceClassification` model (Llama, Mistral, Qwen2, Qwen3): the chat-rendered (query, answer) conversation, scored by
/// the `score` head at its last token.
pub struct RewardModel {
    model: Llama,
    tokenizer: Tokenizer,
    /// Pairs per forward pass.
    pub batch_size: usize,
}

impl RewardModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let model = Llama::load(dir, device, kind)?;
        if !model.config().architecture.is_classifier() {
            return Err(GameError::Reward(format!(
                "{} is not a reward model (architecture {:?})",
                dir.display(),
                model.config().architecture
            )));
        }
        Ok(RewardModel { model, tokenizer: Tokenizer::load(dir)?, batch_size: 8 })
    }

    pub fn score_pairs(&self, pairs: &[(String, String)]) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.batch_size.max(1)) {
            let seqs = chunk
                .iter()
                .map(|(q, a)| {
                    self.tokenizer
                        .encode_chat(&[ChatMessage::user(q.clone()), ChatMessage::assistant(a.clone())], false)
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.extend(scoring::sequence_scores(&self.model, &seqs)?.into_iter().map(f64::from));
        }
        Ok(out)
    }
}

impl RewardSource for RewardModel {
    fn name(&self) -> &str {
        "reward-model"
    }
    fn score(&mut self, pairs: &[(String, String)], _reference: &Policy) -> Result<Vec<f64>> {
        let s = self.score_pairs(pairs)?;
        check_finite(self.name(), s, pairs.len())
    }
}

/// A causal LM grading with the rubric: its own model, or the reference model when `model` is
/// None. Unparsable judgements score 0.
pub struct JudgeReward {
    model: Option<Policy>,
    judge: Judge,
}

impl JudgeReward {
    pub fn new(
        model: Option<Policy>,
        reference: &Policy,
        prompt: String,
        mode: SelfRewardMode,
        max_new_tokens: i64,
    ) -> Result<Self> {
        let judge = Judge::new(model.as_ref().unwrap_or(reference), prompt, mode, max_new_tokens)?;
        Ok(JudgeReward { model, judge })
    }
}

impl RewardSource for JudgeReward {
    fn name(&self) -> &str {
        "judge"
    }
    fn score(&mut self, pairs: &[(String, String)], reference: &Policy) -> Result<Vec<f64>> {
        let m = self.model.as_ref().unwrap_or(reference);
        let s = self.judge.judge(m, pairs)?.into_iter().map(|j| j.score.unwrap_or(0.0)).collect();
        check_finite(self.name(), s, pairs.len())
    }
}

/// R = 0 for every pair.
pub struct NoReward;

impl RewardSource for NoReward {
    fn name(&self) -> &str {
        "none"
    }
    fn score(&mut self, pairs: &[(String, String)], _reference: &Policy) -> Result<Vec<f64>> {
        Ok(vec![0.0; pairs.len()])
    }
}

/// R = sum of weight x source over several sources (`reward.kind = "combined"`).
pub struct CombinedReward {
    parts: Vec<(f64, Box<dyn RewardSource>)>,
}

impl RewardSource for CombinedReward {
    fn name(&self) -> &str {
        "combined"
    }
    fn score(&mut self, pairs: &[(String, String)], reference: &Policy) -> Result<Vec<f64>> {
        let mut total = vec![0.0; pairs.len()];
        for (w, source) in &mut self.parts {
            let s = source.score(pairs, reference)?;
            let s = check_finite(source.name(), s, pairs.len())?;
            for (t, v) in total.iter_mut().zip(s) {
                *t += *w * v;
            }
        }
        Ok(total)
    }
}

/// The reward source a config asks for. `remote` is the client of the remote source when R has
/// one (the actor runtime connects it); `reference` is the frozen reference model.
pub fn build(
    cfg: &Config,
    policy: &Policy,
    reference: &Policy,
    mut remote: Option<Box<dyn RewardSource>>,
) -> Result<Box<dyn RewardSource>> {
    let answers = if cfg.reward.needs_answers() {
        crate::rules::RuleReward::load_answers(&cfg.game.prompts_file)?
    } else {
        Default::default()
    };
    let mut one = |p: &RewardSourceConfig| -> Result<Box<dyn RewardSource>> {
        Ok(match p.kind {
            RewardKind::None => Box::new(NoReward),
            RewardKind::Model => Box::new(RewardModel::load(&p.path, policy.model.device(), policy.model.kind())?),
            RewardKind::Judge => {
                let own = if p.path.as_os_str().is_empty() {
                    None
                } else {
                    Some(Policy::load(&p.path, policy.model.device(), policy.model.kind())?)
                };
                let prompt = crate::play::read_prompt(&p.prompt_file, crate::prompts::DEFAULT_REWARD_PROMPT)?;
                Box::new(JudgeReward::new(own, reference, prompt, p.judge_mode, cfg.self_reward.max_new_tokens)?)
            }
            RewardKind::Rule => Box::new(crate::rules::RuleReward::new(&p.rules, answers.clone())?),
            RewardKind::Remote => remote.take().ok_or_else(|| {
                GameError::Config("a remote reward needs a reward client (the actor runtime builds it)".into())
            })?,
            RewardKind::Combined => {
                return Err(GameError::Config("reward sources of kind \"combined\" cannot be nested".into()))
            }
        })
    };
    if cfg.reward.kind != RewardKind::Combined {
        return one(&cfg.reward.parts()[0]);
    }
    let parts = cfg.reward.parts().iter().map(|p| Ok((p.weight, one(p)?))).collect::<Result<Vec<_>>>()?;
    Ok(Box::new(CombinedReward { parts }))
}
