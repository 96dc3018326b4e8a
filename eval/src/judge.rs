//! Judges of a pair of answers: a reward model (the higher score wins, equal scores tie) or a
//! judge language model asked which of two responses is better, read from its next-token
//! probabilities of "A" and "B" so that it always answers, in both orders to cancel its
//! position bias (a win needs both orders, a loss both, anything else is a tie).
use crate::error::{EvalError, Result};
use crate::stats::Outcome;
use selfplay_game::reward::RewardModel;
use selfplay_policy::model::PaddedBatch;
use selfplay_policy::{ChatMessage, ModelConfig, Policy, Tokenizer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The pairwise question put to a judge LM. Placeholders: {instruction}, {response_a},
/// {response_b}.
pub const PAIRWISE_PROMPT: &str = "\
Two AI assistants were given the same instruction from a user. Read the instruction and both \
responses, then decide which response serves the user better: the one that is more helpful, \
more accurate and better at doing what was asked. Do not let the order in which the responses \
appear, their length or the names of the assistants sway you.

<Instruction>
{instruction}
</Instruction>

<Response A>
{response_a}
</Response A>

<Response B>
{response_b}
</Response B>

Which response is better? Reply with a single letter: A or B.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JudgeSpec {
    RewardModel(PathBuf),
    JudgeLm(PathBuf),
}

impl std::str::FromStr for JudgeSpec {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            EvalError::Input(format!(
                "unknown judge {s:?}: use reward-model:DIR (a sequence-classifier reward model) or judge-lm:DIR (a chat model)"
            ))
        };
        let (kind, dir) = s.split_once(':').ok_or_else(bad)?;
        if dir.trim().is_empty() {
            return Err(EvalError::Input(format!("judge {s:?} names no directory after {kind:?}")));
        }
        match kind {
            "reward-model" | "rm" => Ok(JudgeSpec::RewardModel(PathBuf::from(dir))),
            "judge-lm" | "lm" => Ok(JudgeSpec::JudgeLm(PathBuf::from(dir))),
            _ => Err(bad()),
        }
    }
}

impl JudgeSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JudgeSpec::RewardModel(_) => "reward-model",
            JudgeSpec::JudgeLm(_) => "judge-lm",
        }
    }
    pub fn dir(&self) -> &Path {
        match self {
            JudgeSpec::RewardModel(d) | JudgeSpec::JudgeLm(d) => d,
        }
    }
    /// Cheap checks before any generation, so that a bad judge fails in seconds, not after
    /// an hour of answers.
    pub fn check(&self) -> Result<()> {
        let d = self.dir();
        if !d.is_dir() {
            return Err(EvalError::Input(format!("{} judge directory {} not found", self.kind(), d.display())));
        }
        let cfg = ModelConfig::from_file(&d.join("config.json")).map_err(|e| EvalError::Load {
            role: "the judge",
            path: d.to_path_buf(),
            cause: Box::new(e),
        })?;
        let classifier = cfg.architecture.is_classifier();
        match (self, classifier) {
            (JudgeSpec::RewardModel(_), false) => Err(EvalError::Input(format!(
                "reward-model judge {} is a language model, not a reward model (use judge-lm:{0})",
                d.display()
            ))),
            (JudgeSpec::JudgeLm(_), true) => Err(EvalError::Input(format!(
                "judge-lm judge {} is a reward model (sequence classifier), not a chat model (use reward-model:{0})",
                d.display()
            ))),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for JudgeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind(), self.dir().display())
    }
}

/// How a verdict was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Detail {
    /// The two answers are the same text: a tie without asking the judge.
    Identical,
    RewardModel {
        model_score: f64,
        baseline_score: f64,
    },
    /// The judge's probability of preferring the model's answer (of "A" vs "B",
    /// renormalised over the two letters) when it is shown first and when it is shown second.
    JudgeLm {
        p_model_first: f64,
        p_model_second: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub outcome: Outcome,
    #[serde(flatten)]
    pub detail: Detail,
}

/// One pair to judge.
pub struct Pair<'a> {
    pub instruction: &'a str,
    pub model: &'a str,
    pub baseline: &'a str,
}

pub enum Judge {
    Reward(RewardModel),
    Lm(PairwiseJudge),
}

impl Judge {
    pub fn load(spec: &JudgeSpec, device: Device, kind: Kind, batch: usize) -> Result<Judge> {
        let load_err = |e: Box<dyn std::error::Error + Send + Sync>| EvalError::Load {
            role: "the judge",
            path: spec.dir().to_path_buf(),
            cause: e,
        };
        match spec {
            JudgeSpec::RewardModel(dir) => {
                let mut rm = RewardModel::load(dir, device, kind).map_err(|e| load_err(Box::new(e)))?;
                rm.batch_size = batch.max(1);
                Ok(Judge::Reward(rm))
            }
            JudgeSpec::JudgeLm(dir) => {
                let policy = Policy::load(dir, device, kind).map_err(|e| load_err(Box::new(e)))?;
                Ok(Judge::Lm(PairwiseJudge::new(policy, PAIRWISE_PROMPT.to_string(), batch)?))
            }
        }
    }

    pub fn judge(&self, pairs: &[Pair]) -> Result<Vec<Verdict>> {
        if pairs.is_empty() {
            return Ok(vec![]);
        }
        match self {
            Judge::Reward(rm) => {
                let qa: Vec<(String, String)> = pairs
                    .iter()
                    .flat_map(|p| {
                        [
                            (p.instruction.to_string(), p.model.to_string()),
                            (p.instruction.to_string(), p.baseline.to_string()),
                        ]
                    })
                    .collect();
                let s = rm.score_pairs(&qa)?;
                if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
                    return Err(EvalError::Input(format!("the reward model gave a non-finite score {bad}")));
                }
                Ok(s.chunks(2)
                    .map(|c| Verdict {
                        outcome: reward_outcome(c[0], c[1]),
                        detail: Detail::RewardModel { model_score: c[0], baseline_score: c[1] },
                    })
                    .collect())
            }
            Judge::Lm(j) => j.judge(pairs),
        }
    }
}

/// Higher score wins; equal scores tie.
pub fn reward_outcome(model: f64, baseline: f64) -> Outcome {
    match model.partial_cmp(&baseline) {
        Some(std::cmp::Ordering::Greater) => Outcome::Win,
        Some(std::cmp::Ordering::Less) => Outcome::Loss,
        _ => Outcome::Tie,
    }
}

/// From the judge's log-odds of "A" over "B" in the two orders: `first` with the model's
/// answer as A, `second` with it as B. A win needs the model preferred in both.
pub fn pairwise_outcome(first: f64, second: f64) -> Outcome {
    if first > 0.0 && second < 0.0 {
        Outcome::Win
    } else if first < 0.0 && second > 0.0 {
        Outcome::Loss
    } else {
        Outcome::Tie
    }
}

/// How a judge LM's two orders become one verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairwiseRule {
    /// A win needs the model preferred in both orders, a loss the baseline in both; a verdict
    /// that flips with the order is a tie ([`pairwise_outcome`]).
    #[default]
    BothOrders,
    /// The sum of the model's log-odds over the two orders decides ([`calibrated_outcome`]):
    /// a constant preference for one position cancels out, and a judge with a strong position
    /// bias still yields wins and losses from the rest of its preference.
    Calibrated,
}

impl std::str::FromStr for PairwiseRule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "both-orders" => Ok(PairwiseRule::BothOrders),
            "calibrated" => Ok(PairwiseRule::Calibrated),
            other => Err(format!("unknown pairwise rule {other:?} (both-orders or calibrated)")),
        }
    }
}

impl PairwiseRule {
    pub fn describe(self) -> &'static str {
        match self {
            PairwiseRule::BothOrders => {
                "P(\"A\") vs P(\"B\") as the next token, in both orders: a win needs both, a loss both, otherwise a tie"
            }
            PairwiseRule::Calibrated => {
                "P(\"A\") vs P(\"B\") as the next token, in both orders: the model's log-odds summed over the two orders decides (position bias cancels); exactly 0 is a tie"
            }
        }
    }
}

/// From the same log-odds as [`pairwise_outcome`]: the model's log-odds of being preferred,
/// summed over both orders (`first - second`), decides.
pub fn calibrated_outcome(first: f64, second: f64) -> Outcome {
    let margin = first - second;
    if margin > 0.0 {
        Outcome::Win
    } else if margin < 0.0 {
        Outcome::Loss
    } else {
        Outcome::Tie
    }
}

/// Fills {instruction}, {response_a} and {response_b} in one pass, so that text inside an
/// answer that looks like a placeholder stays as it is.
pub fn fill_pairwise(template: &str, instruction: &str, a: &str, b: &str) -> String {
    let slots = [("{instruction}", instruction), ("{response_a}", a), ("{response_b}", b)];
    let mut out = String::with_capacity(template.len() + instruction.len() + a.len() + b.len());
    let mut rest = template;
    while !rest.is_empty() {
        match slots.iter().find(|(k, _)| rest.starts_with(k)) {
            Some((k, v)) => {
                out.push_str(v);
                rest = &rest[k.len()..];
            }
            None => {
                let c = rest.chars().next().expect("non-empty");
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// A chat model asked "A or B?", read from one forward pass.
pub struct PairwiseJudge {
    policy: Policy,
    prompt: String,
    batch: usize,
    a_ids: Vec<i64>,
    b_ids: Vec<i64>,
    rule: PairwiseRule,
}

/// The single-token spellings of a letter ("A" and " A" where each is one token).
fn letter_ids(tok: &Tokenizer, letter: &str) -> Result<Vec<i64>> {
    let mut ids = vec![];
    for v in [letter.to_string(), format!(" {letter}")] {
        if let [id] = tok.encode(&v, false)?.as_slice() {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
    }
    Ok(ids)
}

impl PairwiseJudge {
    pub fn new(policy: Policy, prompt: String, batch: usize) -> Result<Self> {
        let a_ids = letter_ids(&policy.tokenizer, "A")?;
        let b_ids = letter_ids(&policy.tokenizer, "B")?;
        if a_ids.is_empty() || b_ids.is_empty() || a_ids.iter().any(|i| b_ids.contains(i)) {
            return Err(EvalError::Input(format!(
                "judge LM {}: its tokenizer has no distinct single tokens for \"A\" ({a_ids:?}) and \"B\" ({b_ids:?})",
                policy.dir.display()
            )));
        }
        Ok(PairwiseJudge { policy, prompt, batch: batch.max(1), a_ids, b_ids, rule: PairwiseRule::default() })
    }

    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    pub fn set_rule(&mut self, rule: PairwiseRule) {
        self.rule = rule;
    }

    /// log P(A) - log P(B) for the next token after each chat-rendered question.
    pub fn log_odds(&self, questions: &[String]) -> Result<Vec<f64>> {
        let seqs = questions
            .iter()
            .map(|q| self.policy.tokenizer.encode_chat(&[ChatMessage::user(q.clone())], true))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Similar lengths together: less padding.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![0.0; seqs.len()];
        let model = &self.policy.model;
        let dev = model.device();
        let a = Tensor::from_slice(&self.a_ids).to_device(dev);
        let b = Tensor::from_slice(&self.b_ids).to_device(dev);
        for chunk in order.chunks(self.batch) {
            let batch_seqs: Vec<Vec<i64>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
            let diff = tch::no_grad(|| -> Result<Vec<f64>> {
                let batch = PaddedBatch::right_padded(&batch_seqs, 0, dev)?;
                model.check_ids(&batch.ids)?;
                let hidden = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?;
                let last: Vec<i64> = batch.lengths.iter().map(|l| l - 1).collect();
                let n = batch_seqs.len() as i64;
                let h = hidden.size()[2];
                let idx = Tensor::from_slice(&last).to_device(dev).view([n, 1, 1]).expand([n, 1, h], true);
                let picked = hidden.gather(1, &idx, false).squeeze_dim(1);
                let logp = model.logits(&picked)?.log_softmax(-1, Kind::Float);
                let la = logp.index_select(1, &a).logsumexp([1], false);
                let lb = logp.index_select(1, &b).logsumexp([1], false);
                let d = (la - lb).to_kind(Kind::Double).to_device(Device::Cpu);
                Ok(Vec::<f64>::try_from(d)?)
            })?;
            for (&i, d) in chunk.iter().zip(diff) {
                out[i] = d;
            }
        }
        Ok(out)
    }

    pub fn judge(&self, pairs: &[Pair]) -> Result<Vec<Verdict>> {
        let questions: Vec<String> = pairs
            .iter()
            .flat_map(|p| {
                [
                    fill_pairwise(&self.prompt, p.instruction, p.model, p.baseline),
                    fill_pairwise(&self.prompt, p.instruction, p.baseline, p.model),
                ]
            })
            .collect();
        let d = self.log_odds(&questions)?;
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        Ok(d.chunks(2)
            .map(|c| Verdict {
                outcome: match self.rule {
                    PairwiseRule::BothOrders => pairwise_outcome(c[0], c[1]),
                    PairwiseRule::Calibrated => calibrated_outcome(c[0], c[1]),
                },
                detail: Detail::JudgeLm { p_model_first: sigmoid(c[0]), p_model_second: sigmoid(-c[1]) },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("reward-model:/x".parse::<JudgeSpec>().unwrap(), JudgeSpec::RewardModel("/x".into()));
        assert_eq!("judge-lm:rel/dir".parse::<JudgeSpec>().unwrap(), JudgeSpec::JudgeLm("rel/dir".into()));
        let e = "gpt4:/x".parse::<JudgeSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown judge") && e.contains("reward-model:DIR"), "{e}");
        assert!("reward-model".parse::<JudgeSpec>().is_err());
        assert!("judge-lm:".parse::<JudgeSpec>().unwrap_err().to_string().contains("no directory"));
    }

    #[test]
    fn outcomes() {
        assert_eq!(reward_outcome(1.0, 0.5), Outcome::Win);
        assert_eq!(reward_outcome(0.5, 1.0), Outcome::Loss);
        assert_eq!(reward_outcome(0.5, 0.5), Outcome::Tie);
        // Model preferred as A (first > 0) and as B (second < 0): a win.
        assert_eq!(pairwise_outcome(2.0, -1.0), Outcome::Win);
        assert_eq!(pairwise_outcome(-2.0, 1.0), Outcome::Loss);
        // Always "A" or always "B": position bias, a tie.
        assert_eq!(pairwise_outcome(2.0, 1.0), Outcome::Tie);
        assert_eq!(pairwise_outcome(-2.0, -1.0), Outcome::Tie);
        assert_eq!(pairwise_outcome(0.0, -1.0), Outcome::Tie);
        // Calibrated: the position bias (a constant added to both) cancels.
        assert_eq!(calibrated_outcome(2.0, 1.0), Outcome::Win);
        assert_eq!(calibrated_outcome(-2.0, -1.0), Outcome::Loss);
        assert_eq!(calibrated_outcome(3.0 + 0.5, 3.0 - 0.5), Outcome::Win);
        assert_eq!(calibrated_outcome(1.5, 1.5), Outcome::Tie);
        assert_eq!("calibrated".parse::<PairwiseRule>(), Ok(PairwiseRule::Calibrated));
        assert_eq!("both-orders".parse::<PairwiseRule>(), Ok(PairwiseRule::BothOrders));
        assert!("majority".parse::<PairwiseRule>().unwrap_err().contains("both-orders or calibrated"));
    }

    #[test]
    fn fill_is_one_pass() {
        let t = fill_pairwise("[{instruction}|{response_a}|{response_b}]", "do {response_b}", "a {instruction}", "b");
        assert_eq!(t, "[do {response_b}|a {instruction}|b]");
        let full = fill_pairwise(PAIRWISE_PROMPT, "Q", "X", "Y");
        assert!(full.contains("<Response A>\nX\n</Response A>") && full.contains("<Response B>\nY\n"));
        assert!(!full.contains('{'));
    }
}
