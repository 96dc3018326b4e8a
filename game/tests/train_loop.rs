//! The in-process loop on tiny random models (a policy and a reward model): checkpoint then
//! resume equals the uninterrupted run bit for bit, and bad groups change nothing.
use selfplay_game::driver::{run_local, units_for_step};
use selfplay_game::{Config, Player, Trainer};
use selfplay_policy::Policy;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn setup(dir: &Path) -> Config {
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
            "game.mode=lsp-zero".into(),
            "game.queries_per_step=2".into(),
            "game.group_size=3".into(),
            "optim.grad_accum=2".into(),
            "optim.lr=1e-3".into(),
            "challenger.max_new_tokens=6".into(),
            "solver.max_new_tokens=8".into(),
            "reward.kind=model".into(),
            format!("reward.path={:?}", rm.to_str().unwrap()),
            "run.seed=9".into(),
        ],
    )
    .unwrap()
}

fn load(_cfg: &Config, from: &Path) -> Policy {
    Policy::load(from, Device::Cpu, Kind::Float).unwrap()
}

fn params(t: &Trainer) -> Vec<(String, Tensor)> {
    t.policy.model.parameters().iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect()
}

#[test]
fn resume_from_checkpoint_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let initial = cfg.model.path.clone();

    // Uninterrupted: 3 steps.
    let mut trainer = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
    let straight = run_local(&mut player, &mut trainer, 3, &[], |_| {}).unwrap();
    let want = params(&trainer);

    // Interrupted: 2 steps, checkpoint, everything dropped, resume, 1 step.
    let ckpt = tmp.path().join("ckpt");
    {
        let mut trainer = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
        let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
        run_local(&mut player, &mut trainer, 2, &[], |_| {}).unwrap();
        trainer.save_checkpoint(&ckpt, serde_json::json!({"note": "kept"})).unwrap();
    }
    let (mut trainer, extra) = Trainer::resume(&ckpt, None, Device::Cpu).unwrap();
    assert_eq!(extra["note"], "kept");
    assert_eq!(trainer.step, 2);
    // The actor restarts from the checkpoint's weights, with the initial model as reference.
    let mut player = Player::new(load(&cfg, &ckpt), Some(load(&cfg, &initial)), cfg.clone()).unwrap();
    let resumed = run_local(&mut player, &mut trainer, 1, &[], |_| {}).unwrap();

    assert_eq!(resumed[0].loss.to_bits(), straight[2].loss.to_bits(), "step 3 loss");
    for ((n, a), (_, b)) in params(&trainer).iter().zip(&want) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    // Something did move, so the comparison is not trivially true.
    let first = load(&cfg, &initial);
    let moved = first.model.parameters().iter().zip(&want).any(|((_, a), (_, b))| !a.equal(b));
    assert!(moved);
    // The checkpoint is a model directory selfplay (and transformers) can load.
    assert!(ckpt.join("config.json").exists() && ckpt.join("tokenizer.json").exists());
    // A checkpoint written after the one the run resumed from was pruned is complete too,
    // and resumes in turn.
    std::fs::remove_dir_all(&ckpt).unwrap();
    let next = tmp.path().join("ckpt-next");
    trainer.save_checkpoint(&next, serde_json::json!({})).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(next.join(f)).unwrap(),
            std::fs::read(initial.join(f)).unwrap(),
            "{f} of the second checkpoint"
        );
    }
    let (again, _) = Trainer::resume(&next, None, Device::Cpu).unwrap();
    assert_eq!(again.step, 3);
}

#[test]
fn bad_groups_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let initial = cfg.model.path.clone();
    let mut trainer = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
    let good: Vec<_> = units_for_step(&cfg, 0, &[]).iter().map(|u| player.play(u, 0, "t").unwrap().0).collect();
    let before = params(&trainer);

    let mut cases: Vec<(&str, Vec<selfplay_game::RolloutGroup>)> = vec![];
    let mut g = good.clone();
    g[1].answers[0].reward = f32::NAN;
    cases.push(("reward = NaN", g));
    let mut g = good.clone();
    g[0].answers[2].self_reward = f32::INFINITY;
    cases.push(("self_reward = inf", g));
    let mut g = good.clone();
    g[0].answers[1].sequence.completion_ids.clear();
    cases.push(("completion_ids is empty", g));
    let mut g = good.clone();
    g[1].answers.pop();
    cases.push(("expected G = 3", g));
    let mut g = good.clone();
    g[0].answers[0].sequence.completion_ids[0] = 100_000;
    cases.push(("outside the vocabulary", g));
    let mut g = good.clone();
    g[0].answers[0].sequence.ref_logprobs[0] = 0.5;
    cases.push(("must be finite and in", g));
    let mut g = good.clone();
    g[0].answers[0].sequence.ref_logprobs[0] = -3e38;
    cases.push(("must be finite and in", g));
    let mut g = good.clone();
    g[0].challenger = None;
    cases.push(("challenger is missing", g));
    cases.push(("needs N = 2", good[..1].to_vec()));

    for (want, groups) in cases {
        let err = trainer.train_step(&groups).unwrap_err().to_string();
        assert!(err.contains(want), "expected an error containing {want:?}, got {err:?}");
    }
    assert_eq!(trainer.step, 0);
    for ((n, a), (_, b)) in params(&trainer).iter().zip(&before) {
        assert!(a.equal(b), "{n} changed after a refused step");
    }
    // And the good step still works afterwards.
    trainer.train_step(&good).unwrap();
    assert_eq!(trainer.step, 1);
}

/// The hostile group of issue 23 (valid credential, in-bounds extremes: behaviour log-probs 0,
/// reference log-probs -1e4) among honest ones. Unchecked it drives the step's loss far off;
/// checked, it is refused before the optimizer, the trainer is untouched (weights, AdamW, step
/// count), and the step then taken on honest groups equals the undisturbed one bit for bit.
/// The honest groups' own mismatch (f32, sampled with the same weights) stays far below the
/// f32 bound.
#[test]
fn a_group_whose_logprobs_disagree_with_the_learner_is_refused_and_changes_nothing() {
    use selfplay_game::trainer::MISMATCH_BOUND_F32;
    use selfplay_game::StepResult;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let initial = cfg.model.path.clone();
    let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
    let honest: Vec<_> = units_for_step(&cfg, 0, &[]).iter().map(|u| player.play(u, 0, "t").unwrap().0).collect();
    let bound = Some(MISMATCH_BOUND_F32);

    let mut straight = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    let want = match straight.train_step_checked(&honest, bound).unwrap() {
        StepResult::Trained(s) => s,
        r => panic!("an honest step was refused: {r:?}"),
    };
    eprintln!("honest f32 mismatch: mean {:e}, max {:e} nats", want.logprob_mismatch_mean, want.logprob_mismatch_max);
    assert!(want.logprob_mismatch_max < MISMATCH_BOUND_F32 / 10.0, "{want:?}");
    let line = serde_json::to_value(&want).unwrap();
    assert!(line["logprob_mismatch_mean"].is_f64() && line["logprob_mismatch_max"].is_f64(), "{line}");

    let mut hostile = honest.clone();
    hostile[1].actor_id = "hostile".into();
    let g = &mut hostile[1];
    for s in g.challenger.iter_mut().chain(g.answers.iter_mut().map(|a| &mut a.sequence)) {
        s.behaviour_logprobs.iter_mut().for_each(|x| *x = 0.0);
        s.ref_logprobs.iter_mut().for_each(|x| *x = selfplay_game::rollout::MIN_LOGPROB);
    }
    let mut unchecked = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    hostile[1].validate(&unchecked.limits()).expect("extreme but valid");
    let spoiled = unchecked.train_step(&hostile).unwrap();
    eprintln!("loss: honest {}, with the hostile group unchecked {}", want.loss, spoiled.loss);
    assert!(spoiled.loss.abs() > 100.0 * want.loss.abs().max(1e-3), "{spoiled:?}");
    assert!(spoiled.logprob_mismatch_max > 1.0, "{spoiled:?}");

    let mut trainer = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    let before = params(&trainer);
    let refused = match trainer.train_step_checked(&hostile, bound).unwrap() {
        StepResult::Refused(r) => r,
        StepResult::Trained(s) => panic!("the hostile group was trained on: {s:?}"),
    };
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = &refused[0];
    assert_eq!((r.index, r.unit_id.as_str(), r.actor_id.as_str()), (1, hostile[1].unit_id.as_str(), "hostile"));
    assert!(r.mean > MISMATCH_BOUND_F32 && r.max >= r.mean, "{r:?}");
    assert_eq!((trainer.step, trainer.opt.t), (0, 0));
    for ((n, a), (_, b)) in params(&trainer).iter().zip(&before) {
        assert!(a.equal(b), "{n} changed in a refused step");
    }
    // A group sampled by older weights is not held to the bound (asynchronous mode).
    let mut older = hostile.clone();
    for g in &mut older {
        g.weights_version = 0;
    }
    let mut later = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    later.step = 1;
    assert!(matches!(later.train_step_checked(&older, bound).unwrap(), StepResult::Trained(_)));

    // An honest replay of the unit arrives: the step is the undisturbed one, bit for bit.
    let got = match trainer.train_step_checked(&honest, bound).unwrap() {
        StepResult::Trained(s) => s,
        r => panic!("{r:?}"),
    };
    assert_eq!(got.loss.to_bits(), want.loss.to_bits());
    assert_eq!(trainer.step, 1);
    for ((n, a), (_, b)) in params(&trainer).iter().zip(&params(&straight)) {
        assert!(a.equal(b), "{n} differs from the undisturbed step");
    }
}

/// `learner.reference_check_fraction`: the learner's own reference model agrees with the honest
/// actor's reference log-probs (f32 bound) and refuses a group whose reference log-probs were
/// lowered to -1e4, naming it; unselected groups are not looked at.
#[test]
fn reference_logprobs_that_disagree_with_the_learners_reference_are_refused() {
    use selfplay_game::trainer::{reference_refusals, MISMATCH_BOUND_F32};
    use selfplay_game::Disagreement;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path());
    let initial = cfg.model.path.clone();
    let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
    let honest: Vec<_> = units_for_step(&cfg, 0, &[]).iter().map(|u| player.play(u, 0, "t").unwrap().0).collect();
    let reference = load(&cfg, &initial);
    assert!(reference_refusals(&reference, &honest, |_| true, MISMATCH_BOUND_F32).unwrap().is_empty());
    let mut hostile = honest.clone();
    hostile[0].actor_id = "hostile".into();
    for a in &mut hostile[0].answers {
        a.sequence.ref_logprobs.iter_mut().for_each(|x| *x = selfplay_game::rollout::MIN_LOGPROB);
    }
    let refused = reference_refusals(&reference, &hostile, |_| true, MISMATCH_BOUND_F32).unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!((refused[0].index, refused[0].actor_id.as_str()), (0, "hostile"));
    assert_eq!(refused[0].which, Disagreement::Reference);
    assert!(refused[0].mean > 1.0, "{refused:?}");
    let skip_first = |g: &selfplay_game::RolloutGroup| g.unit_id != hostile[0].unit_id;
    assert!(reference_refusals(&reference, &hostile, skip_first, MISMATCH_BOUND_F32).unwrap().is_empty());
}

/// A step whose loss is not finite (here: a KL weight so large that beta * KL overflows) is
/// skipped: the step counts and its groups are consumed, the weights and the optimizer state do
/// not change, and the next step trains normally. The learner stays up.
#[test]
fn a_non_finite_step_is_skipped_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path());
    let initial = cfg.model.path.clone();
    cfg.loss.beta = 1e308;
    let mut trainer = Trainer::new(load(&cfg, &initial), cfg.clone()).unwrap();
    let mut player = Player::new(load(&cfg, &initial), None, cfg.clone()).unwrap();
    let groups: Vec<_> = units_for_step(&cfg, 0, &[]).iter().map(|u| player.play(u, 0, "t").unwrap().0).collect();
    let before = params(&trainer);
    let adam_t = trainer.opt.t;
    let stats = trainer.train_step(&groups).unwrap();
    assert!(stats.skipped, "{stats:?}");
    assert_eq!((trainer.step, trainer.opt.t), (1, adam_t));
    for ((n, a), (_, b)) in params(&trainer).iter().zip(&before) {
        assert!(a.equal(b), "{n} changed in a skipped step");
    }
    // With a sane beta the next step updates the weights.
    trainer.cfg.loss.beta = 0.05;
    let stats = trainer.train_step(&groups).unwrap();
    assert!(!stats.skipped && trainer.step == 2);
    assert!(params(&trainer).iter().zip(&before).any(|((_, a), (_, b))| !a.equal(b)));
}
