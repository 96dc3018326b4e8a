//! Reward sources behind one trait: the built-in reward model (a Llama sequence classifier in
//! the format of Skywork-Reward-V2), a judge language model prompted with the rubric, none,
//! and (in the actor crate) a remote `Reward` service.
use crate::config::SelfRewardMode;
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

/// LlamaForSequenceClassification: the chat-rendered (query, answer) conversation, scored by
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
