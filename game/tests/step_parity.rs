//! One full learner step on a tiny random model, for every mode and every KL option, against
//! an independent PyTorch autograd reference (tests/python/step_reference.py): the parameters
//! after the step must agree.
use selfplay_game::config::{Aggregation, KlMode};
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::{Config, Mode, Trainer};
use selfplay_policy::generate::SplitMix64;
use selfplay_policy::{scoring, Policy};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind};

const N: usize = 4;
const G: usize = 3;

fn seq(rng: &mut SplitMix64, policy: &Policy, plen: usize, clen: usize) -> SequenceData {
    let ids = |n: usize, rng: &mut SplitMix64| (0..n).map(|_| 5 + (rng.next_u64() % 200) as i64).collect::<Vec<_>>();
    let prompt_ids = ids(plen, rng);
    let completion_ids = ids(clen, rng);
    // Behaviour log-probs: the policy's own (on-policy); reference: the policy's plus noise,
    // so that the KL terms are not zero.
    let lp = tch::no_grad(|| {
        scoring::completion_logprobs(&policy.model, &[(prompt_ids.clone(), completion_ids.clone())], false).unwrap()
    });
    let beh: Vec<f32> = Vec::<Vec<f32>>::try_from(lp.logprobs).unwrap().remove(0);
    let ref_lp: Vec<f32> = beh.iter().map(|v| (v - 0.3 + 0.6 * rng.next_f64() as f32).min(-1e-3)).collect();
    SequenceData { prompt_ids, completion_ids, behaviour_logprobs: beh, ref_logprobs: ref_lp, text: String::new() }
}

fn groups(policy: &Policy, mode: Mode, seed: u64) -> Vec<RolloutGroup> {
    let mut rng = SplitMix64::new(seed);
    (0..N)
        .map(|i| RolloutGroup {
            unit_id: format!("s0-u{i}"),
            challenger: (mode != Mode::Grpo).then(|| seq(&mut rng, policy, 6, 5)),
            answers: (0..G)
                .map(|j| {
                    let len = 3 + (rng.next_u64() % 6) as usize;
                    AnswerData {
                        sequence: seq(&mut rng, policy, 4 + i, len),
                        reward: (rng.next_f64() * 4.0 - 2.0) as f32,
                        self_reward: (rng.next_u64() % 8) as f32,
                        // One unparsable judgement in the step.
                        self_reward_parsed: !(i == 1 && j == 2),
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

fn config(mode: Mode, kl: KlMode, agg: Aggregation, extra: &[&str]) -> Config {
    let mut o: Vec<String> = vec![
        format!("game.queries_per_step={N}"),
        format!("game.group_size={G}"),
        "game.alpha_ch=0.7".into(),
        "optim.lr=1e-3".into(),
        "optim.weight_decay=0.01".into(),
        "optim.grad_accum=2".into(),
        "optim.max_grad_norm=0.5".into(),
        // With eps = 1e-8 AdamW's first update is lr * g / (|g| + eps), i.e. lr * sign(g) for
        // any gradient far above 1e-8: float noise in near-zero gradients then flips whole
        // updates. A larger eps keeps the update proportional to g, so the comparison tests
        // the gradient itself.
        "optim.eps=1e-4".into(),
        "loss.beta=0.2".into(),
        format!("loss.kl={}", serde_json::to_string(&kl).unwrap()),
        format!("loss.aggregation={}", serde_json::to_string(&agg).unwrap()),
        format!("game.mode={}", serde_json::to_string(&mode).unwrap()),
        "game.prompts_file=unused.json".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &o).unwrap()
}

fn reference_step(dir: &Path, cfg: &Config, groups: &[RolloutGroup]) -> (HashMap<String, tch::Tensor>, f64) {
    let spec = serde_json::json!({
        "config": {
            "mode": cfg.game.mode, "kl": cfg.loss.kl, "aggregation": cfg.loss.aggregation,
            "beta": cfg.loss.beta, "alpha_ch": cfg.game.alpha_ch, "lr": cfg.lr(),
            "beta1": cfg.optim.beta1, "beta2": cfg.optim.beta2, "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "max_grad_norm": cfg.optim.max_grad_norm,
            "grpo_eps": cfg.loss.grpo_eps, "parse_failure": cfg.self_reward.parse_failure,
            "importance_cap": cfg.loss.importance_cap,
        },
        "groups": groups,
    });
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = dir.join("after.safetensors");
    selfplay_tests::run_python(
        "step_reference.py",
        &[dir.to_str().unwrap(), spec_path.to_str().unwrap(), out.to_str().unwrap()],
    );
    let params = selfplay_policy::weights::load_tensors(&[out.clone()], Kind::Float, Device::Cpu, |_| true).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("safetensors.json")).unwrap()).unwrap();
    (params, info["loss"].as_f64().unwrap())
}

fn check(mode: Mode, kl: KlMode, agg: Aggregation, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 1);
    let cfg = config(mode, kl, agg, extra);
    let policy = Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let groups = groups(&policy, mode, 42);
    let (want, want_loss) = reference_step(tmp.path(), &cfg, &groups);
    let mut trainer = Trainer::new(policy, cfg).unwrap();
    let before: Vec<tch::Tensor> = trainer.policy.model.parameters().iter().map(|(_, p)| p.detach().copy()).collect();
    let stats = trainer.train_step(&groups).unwrap();
    let mut worst = 0f64;
    let mut moved = 0f64;
    for ((name, p), b) in trainer.policy.model.parameters().iter().zip(&before) {
        let w = want.get(name).unwrap_or_else(|| panic!("reference has no {name}"));
        worst = worst.max((p - w).abs().max().double_value(&[]));
        moved = moved.max((p - b).abs().max().double_value(&[]));
    }
    let label = format!("{mode:?}/{kl:?}/{agg:?}/{extra:?}");
    eprintln!("{label}: loss {} vs {want_loss}; diff {worst:e}", stats.loss);
    assert!(moved > 1e-4, "{label}: the step did not move the weights ({moved:e})");
    assert!(worst < 2e-6, "{label}: max |param diff| vs PyTorch = {worst:e} (step moved {moved:e})");
    assert!(
        (stats.loss - want_loss).abs() < 1e-4 * (1.0 + want_loss.abs()),
        "{label}: loss {} vs {want_loss}",
        stats.loss
    );
    eprintln!("{label}: max |param diff| {worst:e}, loss {} vs {want_loss}", stats.loss);
}

#[test]
fn lsp_zero_matches_pytorch_for_every_kl_option() {
    for kl in [KlMode::K3, KlMode::RewardPenalty, KlMode::Paper] {
        check(Mode::LspZero, kl, Aggregation::SequenceSum, &[]);
    }
}

#[test]
fn lsp_matches_pytorch_for_every_kl_option() {
    for kl in [KlMode::K3, KlMode::RewardPenalty, KlMode::Paper] {
        check(Mode::Lsp, kl, Aggregation::SequenceSum, &[]);
    }
    // Dropping unparsable judgements instead of scoring them 0.
    check(Mode::Lsp, KlMode::K3, Aggregation::SequenceSum, &["self_reward.parse_failure=drop"]);
}

#[test]
fn grpo_matches_pytorch_for_every_kl_option() {
    for kl in [KlMode::K3, KlMode::RewardPenalty, KlMode::Paper] {
        check(Mode::Grpo, kl, Aggregation::SequenceSum, &[]);
    }
}

#[test]
fn token_mean_and_importance_cap_match_pytorch() {
    check(Mode::Lsp, KlMode::K3, Aggregation::TokenMean, &[]);
    check(Mode::LspZero, KlMode::Paper, Aggregation::TokenMean, &["loss.importance_cap=2.0"]);
    check(Mode::LspZero, KlMode::K3, Aggregation::SequenceSum, &["loss.importance_cap=1.5"]);
}
