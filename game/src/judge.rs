//! The self-reward judge: the reference model grades (instruction, response) pairs with the
//! 7-point rubric, either by writing a judgement (the paper's way) or by one forward pass that
//! reads the expected score from the next-token distribution after `<Score>`. A written
//! judgement without a readable score (small judges often omit the tag, or run out of tokens
//! before it) falls back to the expected score after its own text plus `<Score>`.
use crate::config::SelfRewardMode;
use crate::error::{GameError, Result};
use crate::prompts::{judge_prompt, parse_score};
use selfplay_policy::{ChatMessage, FinishProbe, FinishReason, GenRequest, Policy, SamplingConfig};
use tch::Kind;

#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// None when the judgement could not be parsed.
    pub score: Option<f64>,
    /// The judge's text (empty in expected mode).
    pub text: String,
    /// Generate mode: the text held no score, and `score` is the expected score read after it.
    pub fallback: bool,
}

pub struct Judge {
    pub prompt: String,
    pub mode: SelfRewardMode,
    pub max_new_tokens: i64,
    /// Ids of the single-token digits "0".."7" (expected mode).
    digit_ids: Vec<i64>,
}

impl Judge {
    pub fn new(judge: &Policy, prompt: String, mode: SelfRewardMode, max_new_tokens: i64) -> Result<Self> {
        let digit_ids = (0..=7)
            .map(|d| {
                let ids = judge.tokenizer.encode(&d.to_string(), false)?;
                match ids.as_slice() {
                    [id] => Ok(*id),
                    _ => Err(GameError::Config(format!(
                        "expected self-reward needs single-token digits; {d:?} is {ids:?}"
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>();
        let digit_ids = match (mode, digit_ids) {
            (SelfRewardMode::Expected, Err(e)) => return Err(e),
            (_, ids) => ids.unwrap_or_default(),
        };
        Ok(Judge { prompt, mode, max_new_tokens, digit_ids })
    }

    fn prompt_ids(&self, judge: &Policy, instruction: &str, response: &str) -> Result<Vec<i64>> {
        let text = judge_prompt(&self.prompt, instruction, response);
        Ok(judge.tokenizer.encode_chat(&[ChatMessage::user(text)], true)?)
    }

    pub fn judge(&self, judge: &Policy, pairs: &[(String, String)]) -> Result<Vec<Judgement>> {
        if pairs.is_empty() {
            return Ok(vec![]);
        }
        match self.mode {
            SelfRewardMode::Generate => self.judge_generate(judge, pairs),
            SelfRewardMode::Expected => self.judge_expected(judge, pairs),
        }
    }

    fn judge_generate(&self, judge: &Policy, pairs: &[(String, String)]) -> Result<Vec<Judgement>> {
        let prompts = pairs.iter().map(|(q, a)| self.prompt_ids(judge, q, a)).collect::<Result<Vec<_>>>()?;
        let cfg = SamplingConfig { stop: vec!["</Score>".into()], ..SamplingConfig::greedy(self.max_new_tokens) };
        // A judgement without a readable score is graded by the expected score after its own
        // text plus the tag it did not write (nothing when it wrote the tag and stopped before
        // the number), read while the judgement is still in the generator's cache.
        let tag_ids = judge.tokenizer.encode("\n<Score>", false)?;
        let tokenizer = &judge.tokenizer;
        let probe = (!self.digit_ids.is_empty()).then(|| FinishProbe {
            ids: self.digit_ids.clone(),
            max_suffix: tag_ids.len(),
            suffix: Box::new(|_, ids: &[i64], reason: FinishReason| {
                let mut text = tokenizer.decode(ids, true)?;
                if reason == FinishReason::Stop {
                    // As the generator cuts the completion's text.
                    if let Some(cut) = text.find("</Score>") {
                        text.truncate(cut);
                    }
                }
                let text = judgement_text(&text, reason);
                Ok(match parse_score(&text) {
                    Some(_) => None,
                    None if text.trim_end().ends_with("<Score>") => Some(vec![]),
                    None => Some(tag_ids.clone()),
                })
            }),
        });
        let mut generator = judge.generator();
        if let Some(p) = probe {
            generator = generator.probe(p);
        }
        let (out, _) = generator.run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg)?;
        Ok(out
            .into_iter()
            .map(|c| {
                let text = judgement_text(&c.text, c.finish_reason);
                let parsed = parse_score(&text);
                let fallback = parsed.is_none().then(|| c.probe.as_deref().and_then(expected_digit)).flatten();
                Judgement { score: parsed.or(fallback), text, fallback: fallback.is_some() }
            })
            .collect())
    }

    fn judge_expected(&self, judge: &Policy, pairs: &[(String, String)]) -> Result<Vec<Judgement>> {
        let score_tag = judge.tokenizer.encode("<Score>", false)?;
        let seqs: Vec<Vec<i64>> = pairs
            .iter()
            .map(|(q, a)| Ok([self.prompt_ids(judge, q, a)?, score_tag.clone()].concat()))
            .collect::<Result<_>>()?;
        Ok(self
            .expected_at_end(judge, &seqs)?
            .into_iter()
            .map(|score| Judgement { score, text: String::new(), fallback: false })
            .collect())
    }

    /// The probability-weighted mean over the digits 0..7 of the next token after each
    /// sequence (None when not finite).
    fn expected_at_end(&self, judge: &Policy, seqs: &[Vec<i64>]) -> Result<Vec<Option<f64>>> {
        let model = &judge.model;
        let digits = tch::Tensor::from_slice(&self.digit_ids).to_device(model.device());
        let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut out = vec![None; seqs.len()];
        // Sequences of similar length together, so that short answers are not padded to the
        // longest.
        for bucket in selfplay_policy::scoring::length_buckets(&lengths, 0) {
            let part: Vec<Vec<i64>> = bucket.iter().map(|&i| seqs[i].clone()).collect();
            let probs = tch::no_grad(|| -> Result<tch::Tensor> {
                // The judge prompt's opening (system prompt, rubric) goes through the trunk once.
                let shortest = part.iter().map(|s| s.len()).min().unwrap_or(1);
                let (hidden, offset) = model.forward_hidden_shared(&part, shortest - 1)?;
                let last: Vec<i64> = part.iter().map(|s| s.len() as i64 - 1 - offset).collect();
                let idx = tch::Tensor::from_slice(&last).to_device(model.device());
                let h = hidden.size()[2];
                let b = part.len() as i64;
                let picked = hidden.gather(1, &idx.view([b, 1, 1]).expand([b, 1, h], true), false).squeeze_dim(1);
                let logits = model.logits(&picked)?;
                Ok(logits.index_select(1, &digits).softmax(-1, Kind::Float).to_device(tch::Device::Cpu))
            })?;
            let probs: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(probs)?;
            for (&i, p) in bucket.iter().zip(&probs) {
                out[i] = expected_of(p);
            }
        }
        Ok(out)
    }
}

/// The score-weighted mean of probabilities over the digits 0..7 (None when not finite).
fn expected_of(probs: &[f32]) -> Option<f64> {
    let s: f64 = probs.iter().enumerate().map(|(k, v)| k as f64 * *v as f64).sum();
    s.is_finite().then_some(s)
}

/// The expected score under the softmax of the digits' logits.
fn expected_digit(logits: &[f32]) -> Option<f64> {
    let probs = tch::Tensor::from_slice(logits).softmax(-1, Kind::Float);
    expected_of(&Vec::<f32>::try_from(probs).ok()?)
}

/// A judgement's text as the parser sees it: the stop string, cut by the generator, put back.
fn judgement_text(text: &str, reason: FinishReason) -> String {
    if reason == FinishReason::Stop {
        format!("{text}</Score>")
    } else {
        text.to_string()
    }
}
