//! Conversions between the game's plain values and the selfplay.v1 wire messages.
use crate::play::Unit;
use crate::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_proto::v1;

impl From<SequenceData> for v1::Sequence {
    fn from(s: SequenceData) -> Self {
        v1::Sequence {
            prompt_ids: s.prompt_ids,
            completion_ids: s.completion_ids,
            behaviour_logprobs: s.behaviour_logprobs,
            ref_logprobs: s.ref_logprobs,
            text: s.text,
        }
    }
}

impl From<v1::Sequence> for SequenceData {
    fn from(s: v1::Sequence) -> Self {
        SequenceData {
            prompt_ids: s.prompt_ids,
            completion_ids: s.completion_ids,
            behaviour_logprobs: s.behaviour_logprobs,
            ref_logprobs: s.ref_logprobs,
            text: s.text,
        }
    }
}

impl From<RolloutGroup> for v1::RolloutGroup {
    fn from(g: RolloutGroup) -> Self {
        v1::RolloutGroup {
            unit_id: g.unit_id,
            step: g.step,
            weights_version: g.weights_version,
            actor_id: g.actor_id,
            challenger: g.challenger.map(Into::into),
            answers: g
                .answers
                .into_iter()
                .map(|a| v1::Answer {
                    sequence: Some(a.sequence.into()),
                    reward: a.reward,
                    self_reward: a.self_reward,
                    self_reward_parsed: a.self_reward_parsed,
                })
                .collect(),
            play_seconds: g.play_seconds,
            epoch: g.epoch,
            // The lease's ticket is the actor's to add: the game never sees it.
            ticket: String::new(),
        }
    }
}

impl From<v1::RolloutGroup> for RolloutGroup {
    /// A missing answer sequence becomes an empty one, which validation then refuses by name.
    fn from(g: v1::RolloutGroup) -> Self {
        RolloutGroup {
            unit_id: g.unit_id,
            step: g.step,
            weights_version: g.weights_version,
            actor_id: g.actor_id,
            challenger: g.challenger.map(Into::into),
            answers: g
                .answers
                .into_iter()
                .map(|a| AnswerData {
                    sequence: a.sequence.map(Into::into).unwrap_or_default(),
                    reward: a.reward,
                    self_reward: a.self_reward,
                    self_reward_parsed: a.self_reward_parsed,
                })
                .collect(),
            play_seconds: g.play_seconds,
            epoch: g.epoch,
        }
    }
}

impl From<v1::WorkUnit> for Unit {
    fn from(u: v1::WorkUnit) -> Self {
        Unit { unit_id: u.unit_id, step: u.step, seed: u.seed, task: u.task, template: u.template, prompt: u.prompt }
    }
}
