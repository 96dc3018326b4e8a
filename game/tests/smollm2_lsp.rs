//! SmolLM2-135M-Instruct, three LSP steps on CPU end to end with the in-process driver:
//! finite losses, KL rising from 0, weights changed.
use selfplay_game::driver::run_local;
use selfplay_game::{Config, Player, Trainer};
use selfplay_policy::Policy;
use tch::{Device, Kind};

#[test]
fn three_lsp_steps_on_smollm2() {
    tch::set_num_threads(2);
    let dir = selfplay_tests::smollm2_dir();
    let cfg = Config::load(
        None,
        &[
            format!("model.path={:?}", dir.to_str().unwrap()),
            "model.device=cpu".into(),
            "game.mode=lsp".into(),
            "game.queries_per_step=2".into(),
            "game.group_size=2".into(),
            "challenger.max_new_tokens=24".into(),
            "solver.max_new_tokens=32".into(),
            "self_reward.mode=expected".into(),
            "reward.kind=judge".into(),
            "reward.judge_mode=expected".into(),
            "optim.lr=2e-5".into(),
            "optim.grad_accum=1".into(),
            "run.seed=1".into(),
        ],
    )
    .unwrap();
    let load = || Policy::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let mut trainer = Trainer::new(load(), cfg.clone()).unwrap();
    let before: Vec<tch::Tensor> = trainer.policy.model.parameters().iter().map(|(_, p)| p.detach().copy()).collect();
    let mut player = Player::new(load(), None, cfg).unwrap();
    let stats =
        run_local(&mut player, &mut trainer, 3, &[], |s| eprintln!("{}", serde_json::to_string(s).unwrap())).unwrap();

    for s in &stats {
        assert!(s.loss.is_finite() && s.grad_norm.is_finite(), "step {}: {s:?}", s.step);
        // Expected-mode judgements always parse and lie in [0, 7].
        assert!((0.0..=7.0).contains(&s.self_reward.mean) && (0.0..=7.0).contains(&s.reward.mean));
        assert_eq!(s.parse_failures, 0);
    }
    // Step 1 samples from the reference itself: KL 0 (up to float noise); then it grows.
    assert!(stats[0].kl_solver.abs() < 1e-3 && stats[0].kl_challenger.abs() < 1e-3, "{:?}", stats[0]);
    assert!(
        stats[2].kl_solver > stats[0].kl_solver + 1e-5,
        "KL did not rise: {} -> {}",
        stats[0].kl_solver,
        stats[2].kl_solver
    );
    let moved = trainer
        .policy
        .model
        .parameters()
        .iter()
        .zip(&before)
        .map(|((_, p), b)| (p - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 0.0, "weights unchanged");
}
