//! Does training improve what it optimises? On a tiny random model, GRPO and LSP-Zero train
//! with a rule reward the initial model rarely earns (its answer holds the word "t7": about 4%
//! of answers of 8 random words), and the pass rate on held-out prompts, sampled the same
//! seeded way before and after, must rise far beyond its sampling noise. Seeded and
//! deterministic; a sign error in the advantages or a detached ratio makes it fail.
use selfplay_game::driver::run_local;
use selfplay_game::{Config, Mode, Player, Trainer};
use selfplay_policy::{ChatMessage, Policy};
use std::path::Path;
use tch::{Device, Kind};

/// The rule: the word t7 (not t70, t17...) appears in the answer.
const RULE: &str = r#"reward.rules=[{ rule = "regex", pattern = '\bt7\b' }]"#;
/// Held-out prompts: words the training prompts (GRPO) never use.
const HELD_OUT: usize = 16;
/// Answers sampled per held-out prompt.
const SAMPLES: usize = 16;

fn prompts(from: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| (0..4).map(|k| format!("t{}", 20 + (from + i * 4 + k) % 180)).collect::<Vec<_>>().join(" "))
        .collect()
}

fn config(dir: &Path, mode: Mode) -> Config {
    let prompts_file = dir.join("prompts.json");
    std::fs::write(&prompts_file, serde_json::to_string(&prompts(0, 32)).unwrap()).unwrap();
    Config::load(
        None,
        &[
            format!("model.path={:?}", dir.to_str().unwrap()),
            "model.device=cpu".into(),
            format!("game.mode={:?}", mode.name()),
            format!("game.prompts_file={:?}", prompts_file.to_str().unwrap()),
            "game.queries_per_step=4".into(),
            "game.group_size=4".into(),
            "challenger.max_new_tokens=6".into(),
            "solver.max_new_tokens=8".into(),
            "reward.kind=rule".into(),
            RULE.into(),
            "optim.lr=2e-3".into(),
            "optim.grad_accum=1".into(),
            "run.seed=11".into(),
        ],
    )
    .unwrap()
}

/// Pass rate of the rule over SAMPLES answers to each held-out prompt, sampled with a fixed
/// seed, and its standard error.
fn held_out_pass_rate(player: &mut Player) -> (f64, f64) {
    let cfg = player.cfg.solver.to_sampling(12345);
    let mut pairs = vec![];
    for p in prompts(1000, HELD_OUT) {
        let ids = player.policy.tokenizer.encode_chat(&[ChatMessage::user(p.clone())], true).unwrap();
        for c in player.policy.generate(&vec![ids; SAMPLES], &cfg).unwrap() {
            pairs.push((p.clone(), c.text));
        }
    }
    let scores = player.reward.score(&pairs, &player.reference).unwrap();
    let n = scores.len() as f64;
    let p = scores.iter().sum::<f64>() / n;
    (p, (p * (1.0 - p) / n).sqrt().max(0.5 / n))
}

fn learns(mode: Mode, steps: u64) {
    tch::manual_seed(0);
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 21);
    let cfg = config(tmp.path(), mode);
    let load = || Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let mut trainer = Trainer::new(load(), cfg.clone()).unwrap();
    let mut player = Player::new(load(), None, cfg.clone()).unwrap();
    let (before, se_before) = held_out_pass_rate(&mut player);
    let train_prompts = if mode == Mode::Grpo { prompts(0, 32) } else { vec![] };
    let stats = run_local(&mut player, &mut trainer, steps, &train_prompts, |s| {
        eprintln!("{mode:?} step {}: reward {:.3}, kl {:.4}", s.step, s.reward.mean, s.kl_solver)
    })
    .unwrap();
    let (after, se_after) = held_out_pass_rate(&mut player);
    let noise = (se_before.powi(2) + se_after.powi(2)).sqrt();
    let z = (after - before) / noise;
    eprintln!("{mode:?}: held-out pass rate {before:.3} -> {after:.3} (noise {noise:.3}, z = {z:.1})");
    assert!(before < 0.15, "{mode:?}: the initial model already passes {before:.3}: the rule is too easy");
    assert!(after >= before + 0.3 && z > 6.0, "{mode:?}: no learning: {before:.3} -> {after:.3} (z = {z:.1})");
    assert!(stats.iter().all(|s| s.loss.is_finite() && !s.skipped));
}

#[test]
fn grpo_learns_a_rule_reward() {
    learns(Mode::Grpo, 30);
}

#[test]
fn lsp_zero_learns_a_rule_reward() {
    learns(Mode::LspZero, 30);
}
