//! One full learner step on a tiny random model, for every mode and every KL option, against
//! an independent PyTorch autograd reference (tests/python/step_reference.py): the parameters
//! after the step must agree.
use selfplay_game::config::{Aggregation, KlMode};
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::{Config, Mode, Trainer};
use selfplay_policy::generate::SplitMix64;
use selfplay_policy::{Policy, Scorer};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind};

const N: usize = 4;
const G: usize = 3;

/// How the step's groups deviate from the plain on-policy case.
#[derive(Debug, Clone, Copy, Default)]
struct Case {
    /// Behaviour log-probs are the policy's plus noise (a stale sampler), so that
    /// pi/mu ranges over about 0.2..5 and a truncation cap binds on some sequences.
    stale: bool,
    /// Every judgement of query 2 is unparsable: with `drop`, the whole group leaves the step.
    drop_group: bool,
}

fn seq(rng: &mut SplitMix64, policy: &Policy, plen: usize, clen: usize, stale: bool) -> SequenceData {
    let ids = |n: usize, rng: &mut SplitMix64| (0..n).map(|_| 5 + (rng.next_u64() % 200) as i64).collect::<Vec<_>>();
    let prompt_ids = ids(plen, rng);
    let completion_ids = ids(clen, rng);
    // Behaviour log-probs: the policy's own (on-policy); reference: the policy's plus noise,
    // so that the KL terms are not zero.
    let lp =
        tch::no_grad(|| Scorer::new(&policy.model).score(&[(prompt_ids.clone(), completion_ids.clone())]).unwrap());
    let own: Vec<f32> = Vec::<Vec<f32>>::try_from(lp.logprobs).unwrap().remove(0);
    let ref_lp: Vec<f32> = own.iter().map(|v| (v - 0.3 + 0.6 * rng.next_f64() as f32).min(-1e-3)).collect();
    let beh: Vec<f32> =
        if stale { own.iter().map(|v| (v - 0.5 + 0.8 * rng.next_f64() as f32).min(-1e-3)).collect() } else { own };
    SequenceData { prompt_ids, completion_ids, behaviour_logprobs: beh, ref_logprobs: ref_lp, text: String::new() }
}

fn groups(policy: &Policy, mode: Mode, seed: u64, case: Case) -> Vec<RolloutGroup> {
    let mut rng = SplitMix64::new(seed);
    (0..N)
        .map(|i| RolloutGroup {
            unit_id: format!("s0-u{i}"),
            challenger: (mode != Mode::Grpo).then(|| seq(&mut rng, policy, 6, 5, case.stale)),
            answers: (0..G)
                .map(|j| {
                    let len = 3 + (rng.next_u64() % 6) as usize;
                    AnswerData {
                        sequence: seq(&mut rng, policy, 4 + i, len, case.stale),
                        reward: (rng.next_f64() * 4.0 - 2.0) as f32,
                        self_reward: (rng.next_u64() % 8) as f32,
                        // One unparsable judgement in the step.
                        self_reward_parsed: !(i == 1 && j == 2 || case.drop_group && i == 2),
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
    check_case(mode, kl, agg, extra, Case::default())
}

fn check_case(mode: Mode, kl: KlMode, agg: Aggregation, extra: &[&str], case: Case) {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 1);
    let cfg = config(mode, kl, agg, extra);
    let policy = Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let groups = groups(&policy, mode, 42, case);
    if case.stale {
        // The cap must bind on some sequences and not on others, or the case tests nothing.
        let cap = cfg.loss.importance_cap;
        let (mut above, mut below) = (0, 0);
        for g in &groups {
            for s in g.answers.iter().map(|a| &a.sequence).chain(&g.challenger) {
                let own =
                    Scorer::new(&policy.model).score(&[(s.prompt_ids.clone(), s.completion_ids.clone())]).unwrap();
                let own: Vec<f32> = Vec::<Vec<f32>>::try_from(own.logprobs).unwrap().remove(0);
                let ratios: Vec<f64> = match agg {
                    Aggregation::SequenceSum => {
                        vec![own.iter().zip(&s.behaviour_logprobs).map(|(p, m)| (p - m) as f64).sum::<f64>().exp()]
                    }
                    Aggregation::TokenMean => {
                        own.iter().zip(&s.behaviour_logprobs).map(|(p, m)| ((p - m) as f64).exp()).collect()
                    }
                };
                above += ratios.iter().filter(|r| **r > cap).count();
                below += ratios.iter().filter(|r| **r < cap).count();
            }
        }
        assert!(above > 0 && below > 0, "cap {cap}: {above} ratios above, {below} below");
    }
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
    let label = format!("{mode:?}/{kl:?}/{agg:?}/{extra:?}/{case:?}");
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

#[test]
fn a_stale_sampler_with_a_binding_cap_matches_pytorch() {
    // pi/mu spans about 0.2..5 per sequence: caps of 1.5 and 1.2 cut some weights and not others.
    let stale = Case { stale: true, ..Case::default() };
    check_case(Mode::LspZero, KlMode::K3, Aggregation::SequenceSum, &["loss.importance_cap=1.5"], stale);
    check_case(Mode::Lsp, KlMode::K3, Aggregation::TokenMean, &["loss.importance_cap=1.2"], stale);
    check_case(Mode::Grpo, KlMode::RewardPenalty, Aggregation::SequenceSum, &["loss.importance_cap=1.5"], stale);
}

#[test]
fn an_all_dropped_group_matches_pytorch() {
    // LSP with `drop`: query 2's answers all leave the step, and so does its challenger.
    let case = Case { drop_group: true, ..Case::default() };
    for kl in [KlMode::K3, KlMode::RewardPenalty] {
        check_case(Mode::Lsp, kl, Aggregation::SequenceSum, &["self_reward.parse_failure=drop"], case);
    }
}
