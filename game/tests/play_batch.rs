//! Playing K units together equals playing each alone: every row samples from its unit's own
//! random stream, so batching changes nothing but floating-point rounding. On tiny random
//! models (a policy and a reward model), LSP with the self-reward judge.
use selfplay_game::driver::units_for_step;
use selfplay_game::rollout::SequenceData;
use selfplay_game::{Config, Player, RolloutGroup};
use selfplay_policy::Policy;
use std::path::Path;
use tch::{Device, Kind};

fn setup(dir: &Path, judge_mode: &str) -> Config {
    let policy = dir.join("policy");
    let rm = dir.join("rm");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::create_dir_all(&rm).unwrap();
    selfplay_tests::tiny_model(&policy, "gqa_tied", 4);
    selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 5);
    Config::load(
        None,
        &[
            format!("model.path={:?}", policy.to_str().unwrap()),
            "model.device=cpu".into(),
            "game.mode=lsp".into(),
            "game.queries_per_step=5".into(),
            "game.group_size=3".into(),
            "challenger.max_new_tokens=7".into(),
            "solver.max_new_tokens=9".into(),
            format!("self_reward.mode={judge_mode:?}"),
            "self_reward.max_new_tokens=5".into(),
            "reward.kind=model".into(),
            format!("reward.path={:?}", rm.to_str().unwrap()),
            "run.seed=11".into(),
        ],
    )
    .unwrap()
}

fn player(cfg: &Config) -> Player {
    Player::new(Policy::load(&cfg.model.path, Device::Cpu, Kind::Float).unwrap(), None, cfg.clone()).unwrap()
}

fn close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4, "{what}[{i}]: {x} vs {y}");
    }
}

fn same_sequence(what: &str, a: &SequenceData, b: &SequenceData) {
    assert_eq!(a.prompt_ids, b.prompt_ids, "{what}: prompt");
    assert_eq!(a.completion_ids, b.completion_ids, "{what}: tokens");
    assert_eq!(a.text, b.text, "{what}: text");
    close(&format!("{what}: behaviour log-probs"), &a.behaviour_logprobs, &b.behaviour_logprobs);
    close(&format!("{what}: reference log-probs"), &a.ref_logprobs, &b.ref_logprobs);
}

fn same_group(a: &RolloutGroup, b: &RolloutGroup) {
    let u = &a.unit_id;
    assert_eq!(u, &b.unit_id);
    assert_eq!((a.step, a.weights_version), (b.step, b.weights_version));
    same_sequence(&format!("{u} challenger"), a.challenger.as_ref().unwrap(), b.challenger.as_ref().unwrap());
    assert_eq!(a.answers.len(), b.answers.len());
    for (j, (x, y)) in a.answers.iter().zip(&b.answers).enumerate() {
        same_sequence(&format!("{u} answer {j}"), &x.sequence, &y.sequence);
        close(&format!("{u} answer {j} reward"), &[x.reward], &[y.reward]);
        close(&format!("{u} answer {j} self-reward"), &[x.self_reward], &[y.self_reward]);
        assert_eq!(x.self_reward_parsed, y.self_reward_parsed);
    }
}

fn batch_equals_alone(judge_mode: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), judge_mode);
    let units = units_for_step(&cfg, 2, &[]);
    let mut p = player(&cfg);
    let alone: Vec<RolloutGroup> = units.iter().map(|u| p.play(u, 2, "t").unwrap().0).collect();
    let (together, stats) = p.play_batch(&units, 2, "t").unwrap();
    assert_eq!(together.len(), units.len());
    for (a, b) in alone.iter().zip(&together) {
        same_group(a, b);
    }
    let tokens: usize = together
        .iter()
        .map(|g| {
            g.challenger.as_ref().unwrap().completion_ids.len()
                + g.answers.iter().map(|a| a.sequence.completion_ids.len()).sum::<usize>()
        })
        .sum();
    assert_eq!(stats.generated_tokens, tokens as u64);
    // Another composition and order: still each unit's own draws.
    let (mixed, _) = p.play_batch(&[units[3].clone(), units[0].clone()], 2, "t").unwrap();
    same_group(&mixed[0], &alone[3]);
    same_group(&mixed[1], &alone[0]);
    // The seeds are the units' own: two units do not draw the same challenger turn.
    let firsts: std::collections::BTreeSet<Vec<i64>> =
        alone.iter().map(|g| g.challenger.as_ref().unwrap().completion_ids.clone()).collect();
    assert!(firsts.len() > 1, "every unit sampled the same challenger turn");
}

#[test]
fn a_batch_of_units_plays_as_each_unit_alone_with_an_expected_judge() {
    batch_equals_alone("expected");
}

#[test]
fn a_batch_of_units_plays_as_each_unit_alone_with_a_generating_judge() {
    batch_equals_alone("generate");
}

#[test]
fn an_empty_batch_plays_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "expected");
    let (groups, stats) = player(&cfg).play_batch(&[], 0, "t").unwrap();
    assert!(groups.is_empty());
    assert_eq!(stats.generated_tokens, 0);
}

/// A batch of one samples exactly what one `generate` call per role did before units were
/// batched: the challenger turn with `seed = unit.seed`, the G answers with `unit.seed + 1`.
#[test]
fn one_unit_samples_what_one_generate_call_per_role_does() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "expected");
    let unit = units_for_step(&cfg, 4, &[]).remove(1);
    let mut p = player(&cfg);
    let (group, _) = p.play(&unit, 4, "t").unwrap();
    let prompt = selfplay_game::prompts::challenger_prompt(&p.challenger_prompt, &unit.task, &unit.template);
    let ids = p.policy.user_prompt(&prompt).unwrap();
    let c = p.policy.generate(&[ids], &cfg.challenger.to_sampling(unit.seed)).unwrap().remove(0);
    let ch = group.challenger.as_ref().unwrap();
    assert_eq!((&ch.completion_ids, &ch.behaviour_logprobs), (&c.completion_ids, &c.logprobs));
    let query = p.policy.user_prompt(c.text.trim()).unwrap();
    let answers = p.policy.generate(&vec![query; cfg.game.group_size], &cfg.solver.to_sampling(unit.seed + 1)).unwrap();
    for (a, b) in group.answers.iter().zip(&answers) {
        assert_eq!((&a.sequence.completion_ids, &a.sequence.behaviour_logprobs), (&b.completion_ids, &b.logprobs));
    }
}
