//! Reward sources and staged starts on tiny random models, through a real `Player`:
//! a combined reward is the weighted sum of its sources; the `exact` rule checks GRPO answers
//! against the prompt file's `answer` field; `model.reference_path` replaces the reference;
//! `Trainer::init_from` starts a new run from a checkpoint with a fresh or a kept optimizer.
use selfplay_game::driver::{run_local, units_for_step};
use selfplay_game::reward::RewardModel;
use selfplay_game::rules::{final_answer_matches, RuleReward};
use selfplay_game::{Config, Player, Trainer};
use selfplay_policy::{Policy, Scorer};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

fn models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (policy, other, rm) = (dir.join("policy"), dir.join("other"), dir.join("rm"));
    for d in [&policy, &other, &rm] {
        std::fs::create_dir_all(d).unwrap();
    }
    selfplay_tests::tiny_model(&policy, "gqa_tied", 31);
    selfplay_tests::tiny_model(&other, "gqa_tied", 32);
    selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 33);
    (policy, other, rm)
}

fn load(dir: &Path) -> Policy {
    Policy::load(dir, Device::Cpu, Kind::Float).unwrap()
}

fn config(policy: &Path, extra: &[String]) -> Config {
    let mut o = vec![
        format!("model.path={:?}", policy.to_str().unwrap()),
        "model.device=cpu".into(),
        "game.queries_per_step=2".into(),
        "game.group_size=4".into(),
        "challenger.max_new_tokens=6".into(),
        "solver.max_new_tokens=8".into(),
        "optim.lr=1e-3".into(),
        "optim.grad_accum=1".into(),
        "run.seed=5".into(),
    ];
    o.extend(extra.iter().cloned());
    Config::load(None, &o).unwrap()
}

#[test]
fn a_combined_reward_is_the_weighted_sum_of_its_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, _, rm) = models(tmp.path());
    let rule = r#"{ rule = "regex", pattern = '\bt(1|2|3)\d\b' }"#;
    let sources = format!(
        "reward.sources=[{{ kind = \"model\", path = {:?}, weight = 0.5 }}, {{ kind = \"rule\", weight = 2.0, rules = [{rule}] }}]",
        rm.to_str().unwrap()
    );
    let cfg = config(&policy, &["game.mode=\"lsp-zero\"".into(), "reward.kind=\"combined\"".into(), sources]);
    let mut player = Player::new(load(&policy), None, cfg.clone()).unwrap();
    let rm = RewardModel::load(&rm, Device::Cpu, Kind::Float).unwrap();
    let rules = RuleReward::new(&cfg.reward.sources[1].rules, Default::default()).unwrap();
    let mut rule_hits = 0;
    for unit in units_for_step(&cfg, 0, &[]) {
        let (group, _) = player.play(&unit, 0, "t").unwrap();
        let query = group.challenger.as_ref().unwrap().text.trim().to_string();
        let pairs: Vec<(String, String)> =
            group.answers.iter().map(|a| (query.clone(), a.sequence.text.clone())).collect();
        let model = rm.score_pairs(&pairs).unwrap();
        for ((a, m), (q, text)) in group.answers.iter().zip(model).zip(&pairs) {
            let r = rules.score_one(q, text).unwrap();
            rule_hits += (r > 0.0) as usize;
            let want = 0.5 * m + 2.0 * r;
            assert!((a.reward as f64 - want).abs() < 1e-4, "{} vs 0.5 x {m} + 2 x {r}", a.reward);
        }
    }
    assert!(rule_hits > 0, "the rule never held, so its weight was not checked");
}

#[test]
fn the_exact_rule_checks_grpo_answers_against_the_prompt_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, _, _) = models(tmp.path());
    // The tiny model answers in words t0..t210: the reference answer is one such word, so some
    // answers end on it and some do not.
    let file = tmp.path().join("prompts.jsonl");
    std::fs::write(&file, "{\"prompt\": \"t50 t51\", \"answer\": \"t9\"}\n{\"prompt\": \"t60 t61\", \"answer\": 7}\n")
        .unwrap();
    let cfg = config(
        &policy,
        &[
            "game.mode=\"grpo\"".into(),
            format!("game.prompts_file={:?}", file.to_str().unwrap()),
            "reward.kind=\"rule\"".into(),
            r#"reward.rules=[{ rule = "exact" }]"#.into(),
        ],
    );
    let mut player = Player::new(load(&policy), None, cfg.clone()).unwrap();
    let prompts = selfplay_game::data::load_prompts(&file).unwrap();
    for unit in units_for_step(&cfg, 0, &prompts) {
        let (group, _) = player.play(&unit, 0, "t").unwrap();
        let want = if unit.prompt == "t50 t51" { "t9" } else { "7" };
        for a in &group.answers {
            let expect = final_answer_matches(&a.sequence.text, want) as u8 as f32;
            assert_eq!(a.reward, expect, "{:?} against {want:?}", a.sequence.text);
        }
    }
    // A prompt file without answers is refused when the player is built.
    std::fs::write(&file, "{\"prompt\": \"t50 t51\"}\n").unwrap();
    let e = Player::new(load(&policy), None, cfg).err().unwrap().to_string();
    assert!(e.contains("has no \"answer\" field"), "{e}");
}

#[test]
fn reference_path_replaces_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, other, _) = models(tmp.path());
    let base = ["game.mode=\"lsp-zero\"".to_string(), "reward.kind=\"none\"".into()];
    let cfg = config(&policy, &base);
    let unit = units_for_step(&cfg, 0, &[]).remove(0);
    // Default: the reference is the initial policy, so its log-probs equal the sampler's.
    let (g, _) = Player::new(load(&policy), None, cfg.clone()).unwrap().play(&unit, 0, "t").unwrap();
    let a = &g.answers[0].sequence;
    for (r, b) in a.ref_logprobs.iter().zip(&a.behaviour_logprobs) {
        assert!((r - b).abs() < 1e-4, "{r} vs {b}");
    }
    // reference_path: the other model's log-probs of the same tokens.
    let cfg =
        config(&policy, &[base.to_vec(), vec![format!("model.reference_path={:?}", other.to_str().unwrap())]].concat());
    let (g, _) = Player::new(load(&policy), None, cfg).unwrap().play(&unit, 0, "t").unwrap();
    let a = &g.answers[0].sequence;
    let want = Scorer::new(&load(&other).model).score(&[(a.prompt_ids.clone(), a.completion_ids.clone())]).unwrap();
    let want: Vec<f32> = Vec::<Vec<f32>>::try_from(want.logprobs).unwrap().remove(0);
    for (r, w) in a.ref_logprobs.iter().zip(&want) {
        assert!((r - w).abs() < 1e-4, "{r} vs {w}");
    }
    assert!(a.ref_logprobs.iter().zip(&a.behaviour_logprobs).any(|(r, b)| (r - b).abs() > 1e-2));
}

#[test]
fn init_from_starts_a_new_run_from_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (policy, _, rm) = models(tmp.path());
    let cfg = config(
        &policy,
        &[
            "game.mode=\"lsp-zero\"".into(),
            "reward.kind=\"model\"".into(),
            format!("reward.path={:?}", rm.to_str().unwrap()),
        ],
    );
    let mut trainer = Trainer::new(load(&policy), cfg.clone()).unwrap();
    let mut player = Player::new(load(&policy), None, cfg.clone()).unwrap();
    run_local(&mut player, &mut trainer, 2, &[], |_| {}).unwrap();
    let ckpt = tmp.path().join("step-2");
    trainer.save_checkpoint(&ckpt, serde_json::json!({})).unwrap();
    for keep in [false, true] {
        let t = Trainer::init_from(&ckpt, cfg.clone(), Device::Cpu, keep).unwrap();
        assert_eq!(t.step, 0, "a new run counts its own steps");
        assert_eq!(t.opt.t, if keep { 2 } else { 0 }, "keep_optimizer = {keep}");
        for ((n, a), (_, b)) in t.policy.model.parameters().iter().zip(trainer.policy.model.parameters()) {
            assert!(a.equal(b), "{n} is not the checkpoint's");
        }
    }
    // A Hugging Face directory without optimizer state starts fresh, and refuses `keep`.
    assert!(Trainer::init_from(&policy, cfg.clone(), Device::Cpu, false).is_ok());
    let e = Trainer::init_from(&policy, cfg, Device::Cpu, true).err().unwrap().to_string();
    assert!(e.contains("trainer.json"), "{e}");
}
