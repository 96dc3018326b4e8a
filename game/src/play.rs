//! The actor side of the game: one work unit played into a [`RolloutGroup`]: a challenger
//! query (or a data prompt in GRPO mode), G solver answers, rewards, self-rewards (LSP) and
//! the reference model's log-probs of every sequence.
use crate::config::Config;
use crate::error::{io_err, GameError, Result};
use crate::judge::Judge;
use crate::prompts::{challenger_prompt, DEFAULT_CHALLENGER_PROMPT, DEFAULT_JUDGE_PROMPT};
use crate::reward::RewardSource;
use crate::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_policy::generate::{row_seed, GenRequest, Generator};
use selfplay_policy::{ChatMessage, Policy, Scorer};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// A work unit as the game sees it (the coordinator's `WorkUnit` without transport fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub unit_id: String,
    pub step: u64,
    pub seed: u64,
    pub task: String,
    pub template: String,
    /// GRPO: the data prompt.
    pub prompt: String,
}

/// Seed of unit `index` of `step`: the one definition every role uses
/// ([`selfplay_proto::unit::unit_seed`]), so the in-process driver and the distributed runtime
/// sample the same draws for the same unit.
pub use selfplay_proto::unit::unit_seed;

/// What playing a unit cost, for the actor's metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlayStats {
    pub generated_tokens: u64,
    pub generation_seconds: f64,
    pub reward_seconds: f64,
    pub judge_seconds: f64,
    pub reference_seconds: f64,
    pub parse_failures: u64,
    /// Written judgements without a score, graded by the expected score after their text.
    #[serde(default)]
    pub judge_fallbacks: u64,
}

pub struct Player {
    pub policy: Policy,
    /// The frozen initial policy: reference log-probs and the self-reward judge.
    pub reference: Policy,
    pub reward: Box<dyn RewardSource>,
    pub judge: Option<Judge>,
    pub challenger_prompt: String,
    pub cfg: Config,
}

pub(crate) fn read_prompt(file: &Path, default: &str) -> Result<String> {
    if file.as_os_str().is_empty() {
        Ok(default.to_string())
    } else {
        std::fs::read_to_string(file).map_err(io_err(file))
    }
}

impl Player {
    /// Builds the actor's side from a loaded policy. The reference is the given model, else the
    /// one at `model.reference_path`, else a frozen deep copy of the policy (the initial weights).
    pub fn new(policy: Policy, reference: Option<Policy>, cfg: Config) -> Result<Self> {
        Self::new_with_remote(policy, reference, cfg, None)
    }

    /// As [`Player::new`]; `remote` is the reward source when `reward.kind = remote` (a client
    /// of a `Reward` service, which the actor runtime builds).
    pub fn new_with_remote(
        policy: Policy,
        reference: Option<Policy>,
        cfg: Config,
        remote: Option<Box<dyn RewardSource>>,
    ) -> Result<Self> {
        let reference = match reference {
            Some(r) => r,
            None if !cfg.model.reference_path.as_os_str().is_empty() => {
                let dev = cfg.reference_device(policy.model.device())?;
                Policy::load(&cfg.model.reference_path, dev, policy.model.kind())?
            }
            None => policy.frozen_copy_on(cfg.reference_device(policy.model.device())?)?,
        };
        // KL terms compare log-probs of the same token ids: the two must share a vocabulary.
        let (pv, rv) = (policy.model.config().vocab_size, reference.model.config().vocab_size);
        if pv != rv {
            return Err(GameError::Config(format!(
                "the reference model has a vocabulary of {rv} tokens, the policy {pv}: they must share a tokenizer"
            )));
        }
        let judge_prompt = read_prompt(&cfg.game.judge_prompt_file, DEFAULT_JUDGE_PROMPT)?;
        let judge = if cfg.game.mode.uses_self_reward() {
            Some(Judge::new(&reference, judge_prompt.clone(), cfg.self_reward.mode, cfg.self_reward.max_new_tokens)?)
        } else {
            None
        };
        let reward = crate::reward::build(&cfg, &policy, &reference, remote)?;
        Self::with_reward(policy, reference, reward, judge, cfg)
    }

    pub fn with_reward(
        policy: Policy,
        reference: Policy,
        reward: Box<dyn RewardSource>,
        judge: Option<Judge>,
        cfg: Config,
    ) -> Result<Self> {
        let challenger_prompt = read_prompt(&cfg.game.challenger_prompt_file, DEFAULT_CHALLENGER_PROMPT)?;
        Ok(Player { policy, reference, reward, judge, challenger_prompt, cfg })
    }

    fn reference_logprobs(&self, seqs: &[(Vec<i64>, Vec<i64>)]) -> Result<Vec<Vec<f32>>> {
        let lp = tch::no_grad(|| Scorer::new(&self.reference.model).score(seqs))?;
        let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(lp.logprobs.to_device(tch::Device::Cpu))?;
        Ok(rows
            .into_iter()
            .zip(seqs)
            .map(|(mut r, (_, c))| {
                r.truncate(c.len());
                r
            })
            .collect())
    }

    /// Plays one unit with the current policy weights (`weights_version`): a batch of one.
    pub fn play(&mut self, unit: &Unit, weights_version: u64, actor_id: &str) -> Result<(RolloutGroup, PlayStats)> {
        let (mut groups, stats) = self.play_batch(std::slice::from_ref(unit), weights_version, actor_id)?;
        Ok((groups.pop().expect("one unit, one group"), stats))
    }

    /// Plays several units at once, one group per unit in order: the K challenger queries in
    /// one generation, then all K x G answers in one, then the rewards, the self-reward
    /// judgements and the reference log-probs of every sequence, each over the whole batch.
    ///
    /// Every sampled row draws from its own random stream, derived from its unit's seed alone
    /// ([`challenger_seed`], [`answer_seed`]), so which units share a batch changes a unit's
    /// tokens only through floating-point effects, and a batch of one is exactly [`Self::play`].
    /// `play_seconds` of each group is the wall time of the whole batch.
    pub fn play_batch(
        &mut self,
        units: &[Unit],
        weights_version: u64,
        actor_id: &str,
    ) -> Result<(Vec<RolloutGroup>, PlayStats)> {
        let t_start = Instant::now();
        let mut stats = PlayStats::default();
        if units.is_empty() {
            return Ok((vec![], stats));
        }
        let g = self.cfg.game.group_size;
        let mode = self.cfg.game.mode;
        let (model, tok, eos) = (&self.policy.model, &self.policy.tokenizer, self.policy.eos_ids.as_slice());

        // 1. The queries: the challengers' instructions in one batch, or the data prompts.
        let t = Instant::now();
        let (challengers, queries): (Vec<Option<SequenceData>>, Vec<String>) = if mode.has_challenger() {
            let reqs = units
                .iter()
                .map(|u| {
                    let text = challenger_prompt(&self.challenger_prompt, &u.task, &u.template);
                    let prompt_ids = tok.encode_chat(&[ChatMessage::user(text)], true)?;
                    Ok(GenRequest { prompt_ids, seed: challenger_seed(u.seed) })
                })
                .collect::<Result<Vec<_>>>()?;
            let out = Generator::new(model, tok, eos).run(&reqs, &self.cfg.challenger.to_sampling(0))?.0;
            out.into_iter()
                .map(|c| {
                    stats.generated_tokens += c.completion_ids.len() as u64;
                    let query = c.text.trim().to_string();
                    let seq = SequenceData {
                        prompt_ids: c.prompt_ids,
                        completion_ids: c.completion_ids,
                        behaviour_logprobs: c.logprobs,
                        ref_logprobs: vec![],
                        text: c.text,
                    };
                    (Some(seq), query)
                })
                .unzip()
        } else {
            if let Some(u) = units.iter().find(|u| u.prompt.trim().is_empty()) {
                return Err(GameError::Config(format!("unit {} has no prompt (grpo mode)", u.unit_id)));
            }
            (vec![None; units.len()], units.iter().map(|u| u.prompt.clone()).collect())
        };

        // 2. G answers per unit, all in one batch.
        let mut reqs = Vec::with_capacity(units.len() * g);
        for (u, query) in units.iter().zip(&queries) {
            let prompt_ids = tok.encode_chat(&[ChatMessage::user(query.clone())], true)?;
            reqs.extend((0..g).map(|j| GenRequest { prompt_ids: prompt_ids.clone(), seed: answer_seed(u.seed, j) }));
        }
        let answers = Generator::new(model, tok, eos).run(&reqs, &self.cfg.solver.to_sampling(0))?.0;
        stats.generated_tokens += answers.iter().map(|a| a.completion_ids.len() as u64).sum::<u64>();
        stats.generation_seconds = t.elapsed().as_secs_f64();

        // 3. Rewards and self-rewards of every answer of every unit.
        let t = Instant::now();
        let pairs: Vec<(String, String)> =
            answers.iter().enumerate().map(|(i, a)| (queries[i / g].clone(), a.text.clone())).collect();
        let rewards = self.reward.score(&pairs, &self.reference)?;
        stats.reward_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let judgements = match &self.judge {
            Some(j) => j.judge(&self.reference, &pairs)?,
            None => vec![],
        };
        stats.judge_fallbacks = judgements.iter().filter(|j| j.fallback).count() as u64;
        stats.judge_seconds = t.elapsed().as_secs_f64();

        // 4. Reference log-probs of every sequence, in one batch: each unit's answers, then its
        // challenger turn.
        let t = Instant::now();
        let mut seqs: Vec<(Vec<i64>, Vec<i64>)> = Vec::with_capacity(units.len() * (g + 1));
        for (k, c) in challengers.iter().enumerate() {
            seqs.extend(answers[k * g..(k + 1) * g].iter().map(|a| (a.prompt_ids.clone(), a.completion_ids.clone())));
            if let Some(c) = c {
                seqs.push((c.prompt_ids.clone(), c.completion_ids.clone()));
            }
        }
        let mut ref_lps = self.reference_logprobs(&seqs)?.into_iter();
        stats.reference_seconds = t.elapsed().as_secs_f64();

        let scale = self.cfg.reward.scale;
        let play_seconds = t_start.elapsed().as_secs_f64();
        let mut answers = answers.into_iter().enumerate();
        let mut groups = Vec::with_capacity(units.len());
        for (unit, challenger) in units.iter().zip(challengers) {
            let mut group_answers = Vec::with_capacity(g);
            for (i, a) in answers.by_ref().take(g) {
                let (self_reward, parsed) = match judgements.get(i) {
                    Some(jd) => (jd.score.unwrap_or(0.0), jd.score.is_some()),
                    None => (0.0, true),
                };
                if !parsed {
                    stats.parse_failures += 1;
                }
                group_answers.push(AnswerData {
                    sequence: SequenceData {
                        prompt_ids: a.prompt_ids,
                        completion_ids: a.completion_ids,
                        behaviour_logprobs: a.logprobs,
                        ref_logprobs: ref_lps.next().expect("one reference row per answer"),
                        text: a.text,
                    },
                    reward: (rewards[i] * scale) as f32,
                    self_reward: self_reward as f32,
                    self_reward_parsed: parsed,
                });
            }
            let challenger = challenger.map(|mut c| {
                c.ref_logprobs = ref_lps.next().expect("one reference row per challenger turn");
                c
            });
            groups.push(RolloutGroup {
                unit_id: unit.unit_id.clone(),
                step: unit.step,
                weights_version,
                actor_id: actor_id.to_string(),
                challenger,
                answers: group_answers,
                play_seconds,
                epoch: 0,
            });
        }
        Ok((groups, stats))
    }
}

/// The random stream of a unit's challenger turn: row 0 of the unit's seed, as a batch of one
/// sampled with `seed = unit.seed` draws.
pub fn challenger_seed(unit_seed: u64) -> u64 {
    row_seed(unit_seed, 0)
}

/// The random stream of answer `j` of a unit: row `j` of the unit's seed + 1, as the G answers
/// sampled together with `seed = unit.seed + 1` draw.
pub fn answer_seed(unit_seed: u64, j: usize) -> u64 {
    row_seed(unit_seed.wrapping_add(1), j)
}
