//! Fuzzing the decode-and-validate path of rollout groups (what the learner runs on every
//! SubmitRollouts message): arbitrary bytes, and valid groups with numeric fields at the edges
//! of their types, decoded and offered to the learner's service (lease ticket, validation,
//! dedup, staleness). Nothing may panic; every accepted group is within the bounds, and the
//! advantages of the accepted groups are finite. Then the loss itself: groups at the extremes
//! that validation still accepts train a real (tiny) model with a finite loss in every loss
//! mode, so no authenticated input can spoil a step. A fixed number of cases
//! (PROPTEST_CASES overrides), so the run takes seconds in CI.

use std::sync::{Arc, Condvar, Mutex};

use proptest::prelude::*;
use prost::Message;
use selfplay_game::config::{Aggregation, KlMode};
use selfplay_game::rewards::{advantages, GroupRewards};
use selfplay_game::rollout::{GroupLimits, MAX_ABS_REWARD, MAX_PLAY_SECONDS, MIN_LOGPROB};
use selfplay_game::Mode;
use selfplay_learner::inbox::Inbox;
use selfplay_learner::service::{LearnerService, Shared};
use selfplay_proto::auth::Credential;
use selfplay_proto::ticket::{Lease, LeaseTickets};
use selfplay_proto::v1::{Answer, RolloutGroup, Sequence};

const G: usize = 2;
const N: usize = 4;

fn limits() -> GroupLimits {
    GroupLimits {
        group_size: G,
        vocab_size: 64,
        max_prompt_tokens: 16,
        max_completion_tokens: 16,
        needs_challenger: true,
    }
}

fn service(tickets: &LeaseTickets) -> LearnerService {
    let inbox = Inbox::new(0, 0, N, limits());
    LearnerService {
        shared: Arc::new(Shared { inbox: Mutex::new(inbox), ready: Condvar::new() }),
        tickets: tickets.clone(),
    }
}

fn seq() -> Sequence {
    Sequence {
        prompt_ids: vec![1, 2, 3],
        completion_ids: vec![4, 5],
        behaviour_logprobs: vec![-0.5, -1.0],
        ref_logprobs: vec![-0.7, -0.9],
        text: "ab".into(),
    }
}

/// A group the learner takes: unit `s0-u<index>`, leased to `actor` in epoch 0.
fn valid(index: u32, tickets: &LeaseTickets) -> RolloutGroup {
    let unit_id = format!("s0-u{index}");
    let ticket = tickets.sign(&Lease { unit_id: &unit_id, epoch: 0, incarnation: 0, actor_id: "actor" });
    RolloutGroup {
        unit_id,
        step: 0,
        weights_version: 0,
        actor_id: "actor".into(),
        challenger: Some(seq()),
        answers: (0..G)
            .map(|i| Answer { sequence: Some(seq()), reward: i as f32, self_reward: 1.0, self_reward_parsed: true })
            .collect(),
        play_seconds: 1.0,
        epoch: 0,
        ticket,
    }
}

fn edgy_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MAX),
        Just(-3e38f32),
        Just(f32::MIN_POSITIVE),
        Just(-0.0f32),
        Just(0.0f32),
        Just(MIN_LOGPROB),
        Just(MIN_LOGPROB * 1.0001),
        Just(MAX_ABS_REWARD),
        Just(-MAX_ABS_REWARD),
        Just(MAX_ABS_REWARD * 1.0001),
        -20.0f32..0.0,
        any::<f32>(),
    ]
}

fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), Just(u64::MAX), 0u64..8, any::<u64>()]
}

fn edgy_i64() -> impl Strategy<Value = i64> {
    prop_oneof![Just(-1i64), Just(i64::MIN), Just(i64::MAX), Just(64), 0i64..64, any::<i64>()]
}

/// One change to a valid group.
#[derive(Debug, Clone)]
enum Mutation {
    Float { answer: usize, which: u8, at: usize, v: f32 },
    Id { answer: usize, prompt: bool, at: usize, v: i64 },
    Length { answer: usize, which: u8, len: usize },
    Number { which: u8, v: u64 },
    PlaySeconds(f64),
    Ticket(u8),
    Text(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..=G, 0u8..4, 0usize..3, edgy_f32()).prop_map(|(answer, which, at, v)| Mutation::Float {
            answer,
            which,
            at,
            v
        }),
        (0..=G, any::<bool>(), 0usize..4, edgy_i64()).prop_map(|(answer, prompt, at, v)| Mutation::Id {
            answer,
            prompt,
            at,
            v
        }),
        (0..=G, 0u8..4, 0usize..40).prop_map(|(answer, which, len)| Mutation::Length { answer, which, len }),
        (0u8..4, edgy_u64()).prop_map(|(which, v)| Mutation::Number { which, v }),
        prop_oneof![Just(f64::NAN), Just(-1.0), Just(f64::INFINITY), Just(MAX_PLAY_SECONDS * 2.0), 0.0f64..10.0]
            .prop_map(Mutation::PlaySeconds),
        (0u8..4).prop_map(Mutation::Ticket),
        (0usize..100_000).prop_map(Mutation::Text),
    ]
}

fn apply(g: &mut RolloutGroup, m: &Mutation) {
    // answer == G means the challenger.
    fn sequence(g: &mut RolloutGroup, answer: usize) -> &mut Sequence {
        if answer < g.answers.len() {
            g.answers[answer].sequence.get_or_insert_with(Sequence::default)
        } else {
            g.challenger.get_or_insert_with(Sequence::default)
        }
    }
    match m.clone() {
        Mutation::Float { answer, which, at, v } => match which {
            0 if answer < g.answers.len() => g.answers[answer].reward = v,
            1 if answer < g.answers.len() => g.answers[answer].self_reward = v,
            2 => {
                let s = sequence(g, answer);
                if let Some(x) = s.behaviour_logprobs.get_mut(at) {
                    *x = v
                }
            }
            _ => {
                let s = sequence(g, answer);
                if let Some(x) = s.ref_logprobs.get_mut(at) {
                    *x = v
                }
            }
        },
        Mutation::Id { answer, prompt, at, v } => {
            let s = sequence(g, answer);
            let ids = if prompt { &mut s.prompt_ids } else { &mut s.completion_ids };
            if let Some(x) = ids.get_mut(at) {
                *x = v
            }
        }
        Mutation::Length { answer, which, len } => {
            let s = sequence(g, answer);
            match which {
                0 => s.prompt_ids.resize(len, 1),
                1 => s.completion_ids.resize(len, 1),
                2 => s.behaviour_logprobs.resize(len, -1.0),
                _ => s.ref_logprobs.resize(len, -1.0),
            }
        }
        Mutation::Number { which, v } => match which {
            0 => g.step = v,
            1 => g.weights_version = v,
            2 => g.epoch = v,
            _ => g.unit_id = format!("s{v}-u{}", v % 8),
        },
        Mutation::PlaySeconds(v) => g.play_seconds = v,
        Mutation::Ticket(k) => match k {
            0 => g.ticket.clear(),
            1 => g.actor_id = "someone-else".into(),
            2 => g.ticket = g.ticket.replacen('0', "1", 1),
            _ => g.ticket.push('0'),
        },
        Mutation::Text(n) => sequence(g, 0).text = "x".repeat(n),
    }
}

/// Every value of an accepted group is one the loss can take.
fn check_accepted(g: &RolloutGroup) {
    let plain: selfplay_game::RolloutGroup = g.clone().into();
    plain.validate(&limits()).expect("an accepted group validates");
    let seqs = g.challenger.iter().chain(g.answers.iter().filter_map(|a| a.sequence.as_ref()));
    for s in seqs {
        for &v in s.behaviour_logprobs.iter().chain(&s.ref_logprobs) {
            assert!(v.is_finite() && (MIN_LOGPROB..=0.0).contains(&v), "log-prob {v}");
        }
    }
    for a in &g.answers {
        assert!(a.reward.abs() <= MAX_ABS_REWARD && a.self_reward.abs() <= MAX_ABS_REWARD);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Arbitrary bytes as a RolloutGroup: decoding fails cleanly, or the group is refused or
    /// taken consistently.
    #[test]
    fn arbitrary_bytes_are_refused_or_taken_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let tickets = LeaseTickets::new(Credential::generate());
        let svc = service(&tickets);
        if let Ok(g) = RolloutGroup::decode(bytes.as_slice()) {
            let ack = svc.offer(g.clone());
            if ack.accepted {
                check_accepted(&g);
            }
        }
    }

    /// Valid groups with hostile numbers: only groups within every bound are taken, and the
    /// advantages of what was taken are finite in every mode.
    #[test]
    fn hostile_numbers_never_reach_the_step(
        muts in proptest::collection::vec((0u32..N as u32, proptest::collection::vec(mutation(), 0..3)), 1..6),
    ) {
        let tickets = LeaseTickets::new(Credential::generate());
        let svc = service(&tickets);
        let mut taken = vec![];
        for (index, ms) in muts {
            let mut g = valid(index, &tickets);
            for m in &ms {
                apply(&mut g, m);
            }
            // Off the wire, as the service gets it.
            let g = RolloutGroup::decode(g.encode_to_vec().as_slice()).unwrap();
            let ack = svc.offer(g.clone());
            prop_assert!(!(ack.accepted && ack.duplicate));
            if ack.accepted {
                check_accepted(&g);
                taken.push(g);
            }
        }
        let rewards: Vec<GroupRewards> = taken
            .iter()
            .map(|g| {
                GroupRewards::new(
                    g.answers.iter().map(|a| a.reward as f64).collect(),
                    g.answers.iter().map(|a| a.self_reward as f64).collect(),
                )
            })
            .collect();
        for mode in [Mode::Lsp, Mode::LspZero, Mode::Grpo] {
            let adv = advantages(mode, &rewards, 1e-6);
            for a in adv.solver.iter().flatten().chain(&adv.challenger) {
                prop_assert!(a.is_finite() && (*a as f32).is_finite(), "{:?}: advantage {}", mode, a);
            }
        }
    }
}

/// Groups at every extreme validation still accepts (log-probs at 0 and at the floor on
/// tokens the model finds unlikely, rewards at the bound) train a real tiny model with a
/// finite loss, in every loss and aggregation mode: a valid group cannot spoil a step.
#[test]
fn extreme_but_valid_groups_train_with_a_finite_loss() {
    use selfplay_game::{Config, Player, Trainer};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("policy");
    std::fs::create_dir_all(&model).unwrap();
    selfplay_tests::tiny_model(&model, "gqa_tied", 4);
    // reward.kind = none (R = 0; LSP trains on the self-reward): no reward model to load,
    // and the rewards are set to the extremes below anyway.
    let base = Config::load(
        None,
        &[
            format!("model.path={:?}", model.to_str().unwrap()),
            "model.device=cpu".into(),
            "game.mode=lsp".into(),
            "game.queries_per_step=2".into(),
            "game.group_size=3".into(),
            "challenger.max_new_tokens=6".into(),
            "solver.max_new_tokens=8".into(),
            "reward.kind=none".into(),
            "run.seed=9".into(),
        ],
    )
    .unwrap();
    let load = || selfplay_policy::Policy::load(&model, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let mut player = Player::new(load(), None, base.clone()).unwrap();
    let honest: Vec<_> = selfplay_game::driver::units_for_step(&base, 0, &[])
        .iter()
        .map(|u| player.play(u, 0, "t").unwrap().0)
        .collect();
    for (kl, aggregation, cap) in [
        (KlMode::K3, Aggregation::SequenceSum, 0.0),
        (KlMode::K3, Aggregation::TokenMean, 2.0),
        (KlMode::Paper, Aggregation::SequenceSum, 2.0),
        (KlMode::RewardPenalty, Aggregation::TokenMean, 0.0),
    ] {
        let mut cfg = base.clone();
        cfg.loss.kl = kl;
        cfg.loss.aggregation = aggregation;
        cfg.loss.importance_cap = cap;
        let mut trainer = Trainer::new(load(), cfg.clone()).unwrap();
        // Sharpen the policy (final norm x 1000): the logits spread over thousands, so the
        // policy's log-prob of an unlikely token is far below the -88.7 at which exp(-logp)
        // leaves f32, as a trained model's can be.
        for (name, p) in trainer.policy.model.parameters() {
            if name == "model.norm.weight" {
                tch::no_grad(|| {
                    let _ = p.shallow_clone().f_mul_(&tch::Tensor::from(1000.0f32)).unwrap();
                });
            }
        }
        let vocab = trainer.limits().vocab_size;
        let mut groups = honest.clone();
        for (k, g) in groups.iter_mut().enumerate() {
            let seqs = g.challenger.iter_mut().chain(g.answers.iter_mut().map(|a| &mut a.sequence));
            for s in seqs {
                // The last token id of the vocabulary, at reference log-prob 0 (the
                // reference claims certainty) and behaviour log-prob at the floor.
                for id in s.completion_ids.iter_mut() {
                    *id = vocab - 1;
                }
                s.ref_logprobs.iter_mut().for_each(|x| *x = 0.0);
                s.behaviour_logprobs.iter_mut().for_each(|x| *x = MIN_LOGPROB);
            }
            for (j, a) in g.answers.iter_mut().enumerate() {
                let sign = if (j + k) % 2 == 0 { 1.0 } else { -1.0 };
                a.reward = sign * MAX_ABS_REWARD;
                a.self_reward = -sign * MAX_ABS_REWARD;
            }
            g.validate(&trainer.limits()).expect("extreme but valid");
        }
        let stats = trainer.train_step(&groups).unwrap();
        assert!(!stats.skipped, "{kl:?} {aggregation:?}: a valid step was skipped: {stats:?}");
        assert!(stats.loss.is_finite(), "{kl:?} {aggregation:?}: loss {}", stats.loss);
    }
}
