//! What the learner has received and consumed: validation, deduplication by unit id, the
//! staleness bound, and the choice of the N groups of the next step. Pure state, no I/O.
use selfplay_coordinator::state::parse_unit_id;
use selfplay_game::rollout::GroupLimits;
use selfplay_game::RolloutGroup;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Already pending or consumed: the unit was re-issued; not an error.
    Duplicate,
    Rejected {
        reason: String,
        kind: RejectKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    Invalid,
    Stale,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Invalid => "invalid",
            RejectKind::Stale => "stale",
        }
    }
}

pub struct Inbox {
    /// Weights version the learner holds (= completed steps).
    pub version: u64,
    /// The learner epoch: only groups of units leased in this epoch are taken.
    pub epoch: u64,
    pub max_policy_lag: u64,
    pub n: usize,
    pub limits: GroupLimits,
    /// Unit ids trained on (of steps >= `consumed_floor`); every unit of an older step counts
    /// as consumed.
    pub consumed: HashSet<String>,
    pub consumed_floor: u64,
    pending: BTreeMap<(u64, u32), RolloutGroup>,
    pub accepted_total: u64,
    pub rejected_total: u64,
}

impl Inbox {
    pub fn new(version: u64, max_policy_lag: u64, n: usize, limits: GroupLimits) -> Self {
        Inbox {
            version,
            epoch: 0,
            max_policy_lag,
            n,
            limits,
            consumed: HashSet::new(),
            consumed_floor: 0,
            pending: BTreeMap::new(),
            accepted_total: 0,
            rejected_total: 0,
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn is_consumed(&self, id: &str, step: u64) -> bool {
        step < self.consumed_floor || self.consumed.contains(id)
    }

    /// Takes in one group: the verdict says whether it was stored.
    pub fn offer(&mut self, g: RolloutGroup) -> Verdict {
        let reject = |reason: String, kind| Verdict::Rejected { reason, kind };
        let Some((step, index)) = parse_unit_id(&g.unit_id) else {
            self.rejected_total += 1;
            return reject(format!("unit_id {:?} is not a unit id (s<step>-u<index>)", g.unit_id), RejectKind::Invalid);
        };
        if self.is_consumed(&g.unit_id, step) || self.pending.contains_key(&(step, index)) {
            return Verdict::Duplicate;
        }
        if step != g.step {
            self.rejected_total += 1;
            return reject(format!("step {} does not match unit_id {}", g.step, g.unit_id), RejectKind::Invalid);
        }
        if g.epoch != self.epoch {
            self.rejected_total += 1;
            return reject(
                format!(
                    "{}: the group's lease is of epoch {}, the learner is at {} (the unit was re-issued)",
                    selfplay_proto::error::SUPERSEDED_EPOCH,
                    g.epoch,
                    self.epoch
                ),
                RejectKind::Stale,
            );
        }
        // Only the steps the learner has open can arrive: this bounds what it holds.
        let newest = self.version + self.max_policy_lag;
        if step > newest || (self.max_policy_lag == 0 && step < self.version) {
            self.rejected_total += 1;
            return reject(
                format!("step {step} is not open (the learner takes steps {}..={newest})", self.version),
                RejectKind::Stale,
            );
        }
        if index as usize >= self.n {
            self.rejected_total += 1;
            return reject(format!("unit index {index} is outside the step's N = {}", self.n), RejectKind::Invalid);
        }
        if let Err(reason) = g.validate(&self.limits) {
            self.rejected_total += 1;
            return reject(reason, RejectKind::Invalid);
        }
        if g.weights_version > self.version {
            self.rejected_total += 1;
            return reject(
                format!("weights_version {} is newer than the learner's {}", g.weights_version, self.version),
                RejectKind::Invalid,
            );
        }
        if self.version - g.weights_version > self.max_policy_lag {
            self.rejected_total += 1;
            return reject(
                format!(
                    "weights_version {} is {} versions behind the learner's {} (max_policy_lag {})",
                    g.weights_version,
                    self.version - g.weights_version,
                    self.version,
                    self.max_policy_lag
                ),
                RejectKind::Stale,
            );
        }
        self.pending.insert((step, index), g);
        self.accepted_total += 1;
        Verdict::Accepted
    }

    /// Drops pending groups that became too stale; returns the steps they belonged to (their
    /// units must be re-issued).
    pub fn drop_stale(&mut self) -> Vec<u64> {
        let (version, lag) = (self.version, self.max_policy_lag);
        let stale: Vec<(u64, u32)> = self
            .pending
            .iter()
            .filter(|(_, g)| version - g.weights_version.min(version) > lag)
            .map(|(k, _)| *k)
            .collect();
        let mut steps: Vec<u64> = stale.iter().map(|(s, _)| *s).collect();
        for k in stale {
            self.pending.remove(&k);
        }
        steps.dedup();
        steps
    }

    /// The N groups of the next step, oldest units first, once N are in. In synchronous mode
    /// (lag 0) only units of the step being trained qualify.
    pub fn take_step(&mut self) -> Option<Vec<RolloutGroup>> {
        let keys: Vec<(u64, u32)> = self
            .pending
            .keys()
            .filter(|(s, _)| self.max_policy_lag > 0 || *s == self.version)
            .take(self.n)
            .copied()
            .collect();
        if keys.len() < self.n {
            return None;
        }
        let groups: Vec<RolloutGroup> =
            keys.into_iter().map(|k| self.pending.remove(&k).expect("key listed")).collect();
        // Consumed from now on, not from the commit after the step: a re-issued copy that
        // arrives while the step trains is a duplicate, never pending again.
        for g in &groups {
            self.consumed.insert(g.unit_id.clone());
        }
        Some(groups)
    }

    /// Undoes [`Inbox::take_step`] for a step that was not trained because some of its groups
    /// were refused as corrupt: none of `groups` is consumed any more, the ones not listed in
    /// `refused` (indices into `groups`) are pending again, and the refused ones are gone, so
    /// a copy of their units played again is taken like any new group.
    pub fn put_back(&mut self, groups: Vec<RolloutGroup>, refused: &[usize]) {
        for (i, g) in groups.into_iter().enumerate() {
            self.consumed.remove(&g.unit_id);
            if refused.contains(&i) {
                self.rejected_total += 1;
                continue;
            }
            if let Some(key) = parse_unit_id(&g.unit_id) {
                self.pending.insert(key, g);
            }
        }
    }

    /// Forgets every group not trained yet (a new epoch: the coordinator reissues them).
    pub fn clear_pending(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// Records a trained step: its units are consumed, the version moves on, and consumed ids
    /// below the oldest step that can still arrive are folded into the floor.
    pub fn commit(&mut self, groups: &[RolloutGroup], new_version: u64, oldest_open_step: u64) {
        for g in groups {
            self.consumed.insert(g.unit_id.clone());
        }
        self.version = new_version;
        if oldest_open_step > self.consumed_floor {
            self.consumed_floor = oldest_open_step;
            let floor = self.consumed_floor;
            self.consumed.retain(|id| parse_unit_id(id).is_some_and(|(s, _)| s >= floor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use selfplay_game::rollout::{AnswerData, SequenceData};

    fn lim() -> GroupLimits {
        GroupLimits {
            group_size: 2,
            vocab_size: 100,
            max_prompt_tokens: 50,
            max_completion_tokens: 10,
            needs_challenger: true,
        }
    }
    fn seq() -> SequenceData {
        SequenceData {
            prompt_ids: vec![1, 2],
            completion_ids: vec![3],
            behaviour_logprobs: vec![-0.5],
            ref_logprobs: vec![-0.7],
            text: String::new(),
        }
    }
    fn group(step: u64, i: u32, version: u64) -> RolloutGroup {
        RolloutGroup {
            unit_id: format!("s{step}-u{i}"),
            step,
            weights_version: version,
            challenger: Some(seq()),
            answers: vec![AnswerData { sequence: seq(), reward: 1.0, ..Default::default() }; 2],
            ..Default::default()
        }
    }

    #[test]
    fn sync_step_dedup_and_staleness() {
        let mut b = Inbox::new(0, 0, 2, lim());
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Accepted);
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Duplicate);
        assert!(b.take_step().is_none());
        assert_eq!(b.offer(group(0, 0, 0)), Verdict::Accepted);
        let step = b.take_step().unwrap();
        assert_eq!(step.iter().map(|g| g.unit_id.as_str()).collect::<Vec<_>>(), ["s0-u0", "s0-u1"]);
        b.commit(&step, 1, 1);
        // A re-issued unit of a consumed step is a duplicate, never trained twice.
        assert_eq!(b.offer(group(0, 0, 0)), Verdict::Duplicate);
        // Sampled with version 0 while the learner is at 1: stale in synchronous mode.
        assert!(matches!(b.offer(group(1, 0, 0)), Verdict::Rejected { kind: RejectKind::Stale, .. }));
        assert!(matches!(b.offer(group(1, 0, 2)), Verdict::Rejected { kind: RejectKind::Invalid, .. }));
        assert!(matches!(b.offer(group(1, 5, 1)), Verdict::Rejected { kind: RejectKind::Invalid, .. }));
        let mut bad = group(1, 0, 1);
        bad.answers[1].reward = f32::NAN;
        assert!(matches!(b.offer(bad), Verdict::Rejected { reason, .. } if reason.contains("answers[1].reward")));
        assert_eq!(b.pending_len(), 0);
    }

    #[test]
    fn only_open_steps_of_the_current_epoch_are_taken() {
        // Synchronous, at version 3: only step 3 is open; a future step never displaces it.
        let mut b = Inbox::new(3, 0, 2, lim());
        assert!(matches!(b.offer(group(4, 0, 3)), Verdict::Rejected { kind: RejectKind::Stale, .. }));
        assert!(matches!(b.offer(group(9, 0, 3)), Verdict::Rejected { kind: RejectKind::Stale, .. }));
        assert_eq!(b.offer(group(3, 0, 3)), Verdict::Accepted);
        // A group leased in another learner epoch is refused.
        let mut g = group(3, 1, 3);
        g.epoch = 7;
        assert!(matches!(b.offer(g), Verdict::Rejected { reason, .. } if reason.contains("superseded learner epoch")));
        assert_eq!(b.pending_len(), 1);
    }

    #[test]
    fn a_copy_arriving_while_its_step_trains_is_a_duplicate() {
        let mut b = Inbox::new(0, 1, 2, lim());
        assert_eq!(b.offer(group(0, 0, 0)), Verdict::Accepted);
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Accepted);
        let step = b.take_step().unwrap();
        // The step is training; the unit was re-issued and another actor's copy comes in.
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Duplicate);
        b.commit(&step, 1, 0);
        assert_eq!(b.pending_len(), 0);
        assert!(b.take_step().is_none());
    }

    #[test]
    fn a_refused_step_is_put_back_and_its_corrupt_unit_can_come_again() {
        let mut b = Inbox::new(0, 0, 2, lim());
        assert_eq!(b.offer(group(0, 0, 0)), Verdict::Accepted);
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Accepted);
        let step = b.take_step().unwrap();
        // While the step trains, copies are duplicates.
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Duplicate);
        // s0-u1 was refused: s0-u0 is pending again, s0-u1 neither pending nor consumed.
        b.put_back(step, &[1]);
        assert_eq!(b.pending_len(), 1);
        assert!(b.consumed.is_empty());
        assert_eq!(b.rejected_total, 1);
        assert!(b.take_step().is_none());
        assert_eq!(b.offer(group(0, 0, 0)), Verdict::Duplicate);
        // An honest replay of the refused unit is taken, and the step is whole again, in order.
        assert_eq!(b.offer(group(0, 1, 0)), Verdict::Accepted);
        let again = b.take_step().unwrap();
        assert_eq!(again.iter().map(|g| g.unit_id.as_str()).collect::<Vec<_>>(), ["s0-u0", "s0-u1"]);
    }

    #[test]
    fn async_takes_oldest_and_drops_too_stale() {
        let mut b = Inbox::new(2, 1, 2, lim());
        assert_eq!(b.offer(group(3, 0, 1)), Verdict::Accepted);
        assert_eq!(b.offer(group(2, 1, 2)), Verdict::Accepted);
        assert_eq!(b.offer(group(3, 1, 2)), Verdict::Accepted);
        let s = b.take_step().unwrap();
        assert_eq!(s.iter().map(|g| g.unit_id.as_str()).collect::<Vec<_>>(), ["s2-u1", "s3-u0"]);
        b.commit(&s, 3, 2);
        b.version = 4;
        // s3-u1 was sampled by version 2, now 2 behind with lag 1.
        assert_eq!(b.drop_stale(), vec![3]);
        assert_eq!(b.pending_len(), 0);
    }
}
