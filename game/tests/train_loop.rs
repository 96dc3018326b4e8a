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
