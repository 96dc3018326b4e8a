//! The learner's memory settings change memory, not results: a step cut into token-bounded
//! micro-batches with its head in small chunks equals the plain step (f32, tight tolerance);
//! bf16 training (f32 master weights and moments) resumes bit for bit on the CPU; and the
//! actors' reference model goes where `model.reference_device` says, or is refused by name.
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::{Config, Player, Trainer};
use selfplay_policy::generate::SplitMix64;
use selfplay_policy::{Policy, Scorer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const N: usize = 2;
const G: usize = 3;

fn seq(rng: &mut SplitMix64, policy: &Policy, plen: usize, clen: usize) -> SequenceData {
    let ids = |n: usize, rng: &mut SplitMix64| (0..n).map(|_| 5 + (rng.next_u64() % 200) as i64).collect::<Vec<_>>();
    let prompt_ids = ids(plen, rng);
    let completion_ids = ids(clen, rng);
    let lp = Scorer::new(&policy.model).score(&[(prompt_ids.clone(), completion_ids.clone())]).unwrap();
    let beh: Vec<f32> = Vec::<Vec<f32>>::try_from(lp.logprobs).unwrap().remove(0);
    let ref_lp: Vec<f32> = beh.iter().map(|v| (v - 0.3 + 0.6 * rng.next_f64() as f32).min(-1e-3)).collect();
    SequenceData { prompt_ids, completion_ids, behaviour_logprobs: beh, ref_logprobs: ref_lp, text: String::new() }
}

fn groups(policy: &Policy, seed: u64, step: u64) -> Vec<RolloutGroup> {
    let mut rng = SplitMix64::new(seed);
    (0..N)
        .map(|i| RolloutGroup {
            unit_id: format!("s{step}-u{i}"),
            step,
            weights_version: step,
            challenger: Some(seq(&mut rng, policy, 6, 5)),
            answers: (0..G)
                .map(|j| {
                    let len = 3 + (rng.next_u64() % 6) as usize;
                    AnswerData {
                        sequence: seq(&mut rng, policy, 4 + i + j, len),
                        reward: (rng.next_f64() * 4.0 - 2.0) as f32,
                        self_reward: (rng.next_u64() % 8) as f32,
                        self_reward_parsed: true,
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

fn config(dir: &Path, extra: &[&str]) -> Config {
    let mut o: Vec<String> = vec![
        format!("model.path={:?}", dir.to_str().unwrap()),
        "model.device=cpu".into(),
        format!("game.queries_per_step={N}"),
        format!("game.group_size={G}"),
        "game.mode=lsp".into(),
        "optim.lr=1e-3".into(),
        "optim.weight_decay=0.01".into(),
        "optim.grad_accum=2".into(),
        "optim.eps=1e-4".into(),
        "loss.beta=0.2".into(),
        "reward.kind=none".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &o).unwrap()
}

fn params(t: &Trainer) -> Vec<(String, Tensor)> {
    t.policy.model.parameters().iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect()
}

#[test]
fn token_bounded_micro_batches_and_head_chunks_leave_the_step_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 2);
    let policy = || Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let groups = groups(&policy(), 17, 0);
    let longest = groups
        .iter()
        .flat_map(|g| g.answers.iter().map(|a| &a.sequence).chain(g.challenger.as_ref()))
        .map(|s| s.prompt_ids.len() + s.completion_ids.len())
        .max()
        .unwrap();

    let mut plain = Trainer::new(policy(), config(tmp.path(), &["optim.logprob_chunk_tokens=0"])).unwrap();
    let want = plain.train_step(&groups).unwrap();
    // At most two sequences per forward pass, two positions per head chunk.
    let bounded_cfg =
        config(tmp.path(), &[&format!("optim.micro_batch_tokens={}", 2 * longest), "optim.logprob_chunk_tokens=2"]);
    let mut bounded = Trainer::new(policy(), bounded_cfg).unwrap();
    let got = bounded.train_step(&groups).unwrap();

    assert!((got.loss - want.loss).abs() < 1e-6 * (1.0 + want.loss.abs()), "loss {} vs {}", got.loss, want.loss);
    assert!((got.grad_norm - want.grad_norm).abs() < 1e-5 * want.grad_norm, "{} vs {}", got.grad_norm, want.grad_norm);
    assert!((got.entropy_solver - want.entropy_solver).abs() < 1e-5);
    assert!((got.kl_challenger - want.kl_challenger).abs() < 1e-6);
    let initial = policy();
    let mut moved = 0f64;
    for (((name, a), (_, b)), (_, p0)) in params(&bounded).iter().zip(&params(&plain)).zip(initial.model.parameters()) {
        let diff = (a - b).abs().max().double_value(&[]);
        moved = moved.max((b - p0).abs().max().double_value(&[]));
        assert!(diff < 1e-6, "{name}: {diff:e}");
    }
    assert!(moved > 1e-4, "the step did not move the weights ({moved:e})");
}

#[test]
fn bf16_training_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    selfplay_tests::tiny_model(&model, "gqa_tied", 3);
    let cfg = config(&model, &["model.dtype=bf16", "optim.micro_batch_tokens=40", "optim.logprob_chunk_tokens=3"]);
    let load = || Policy::load(&model, Device::Cpu, Kind::BFloat16).unwrap();
    let steps: Vec<Vec<RolloutGroup>> = {
        let p = load();
        (0..3).map(|s| groups(&p, 100 + s, s)).collect()
    };

    let mut straight = Trainer::new(load(), cfg.clone()).unwrap();
    let mut losses = vec![];
    for g in &steps {
        losses.push(straight.train_step(g).unwrap().loss);
    }

    let ckpt = tmp.path().join("ckpt");
    {
        let mut t = Trainer::new(load(), cfg.clone()).unwrap();
        for g in &steps[..2] {
            t.train_step(g).unwrap();
        }
        t.save_checkpoint(&ckpt, serde_json::json!({})).unwrap();
    }
    let (mut resumed, _) = Trainer::resume(&ckpt, None, Device::Cpu).unwrap();
    assert_eq!(resumed.policy.model.kind(), Kind::BFloat16, "the checkpoint's dtype");
    let last = resumed.train_step(&steps[2]).unwrap();

    assert_eq!(last.loss.to_bits(), losses[2].to_bits(), "step 3 loss");
    let first = load();
    let mut moved = false;
    for (((n, a), (_, b)), (_, p0)) in params(&resumed).iter().zip(&params(&straight)).zip(first.model.parameters()) {
        assert_eq!(a.kind(), Kind::BFloat16);
        assert!(a.equal(b), "{n} differs after resume");
        moved |= !b.equal(p0);
    }
    assert!(moved, "three steps did not move any bf16 weight");
    // The optimizer state (f32 masters and moments) matches too: one more identical step on
    // both gives identical weights only if it does.
    let more = groups(&first, 999, 3);
    straight.train_step(&more).unwrap();
    resumed.train_step(&more).unwrap();
    for ((n, a), (_, b)) in params(&resumed).iter().zip(&params(&straight)) {
        assert!(a.equal(b), "{n} differs one step after resume");
    }
}

#[test]
fn the_reference_goes_to_model_reference_device() {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 4);
    let load = || Policy::load(tmp.path(), Device::Cpu, Kind::BFloat16).unwrap();
    let cfg = config(tmp.path(), &["model.dtype=bf16", "model.reference_device=cpu", "game.mode=lsp-zero"]);
    let player = Player::new(load(), None, cfg).unwrap();
    assert_eq!(player.reference.model.device(), Device::Cpu);
    assert_eq!(player.reference.model.kind(), Kind::BFloat16);
    for ((n, a), (_, b)) in player.reference.model.parameters().iter().zip(player.policy.model.parameters()) {
        assert!(a.equal(b), "{n}: the reference is not a copy of the policy");
        assert_ne!(a.data_ptr(), b.data_ptr(), "{n}: the reference shares the policy's storage");
    }
    // A device this machine does not have: refused with the key named, before any copy.
    let n = tch::Cuda::device_count().max(0);
    let word = format!("cuda:{n}");
    let cfg = config(tmp.path(), &["game.mode=lsp-zero", &format!("model.reference_device={word:?}")]);
    let e = Player::new(load(), None, cfg).err().expect("an unavailable reference device").to_string();
    assert!(e.contains("model.reference_device") && e.contains(&word), "{e}");
}

/// Gradient checkpointing (each block recomputed in the backward pass from its kept input)
/// gives the gradient of the plain step, also with token-bounded micro-batches and small head
/// chunks, for the LSP loss (challenger and solver, KL) and the GRPO loss.
#[test]
fn gradient_checkpointing_leaves_the_gradient_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    selfplay_tests::tiny_model(tmp.path(), "gqa_tied", 2);
    let policy = || Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let groups = groups(&policy(), 23, 0);
    let longest = groups
        .iter()
        .flat_map(|g| g.answers.iter().map(|a| &a.sequence).chain(g.challenger.as_ref()))
        .map(|s| s.prompt_ids.len() + s.completion_ids.len())
        .max()
        .unwrap();
    let bounded = format!("optim.micro_batch_tokens={}", 2 * longest);
    for mode in [&["game.mode=lsp"][..], &["game.mode=grpo", "game.prompts_file=\"unused.json\""]] {
        // GRPO groups have no challenger.
        let grpo = mode[0].ends_with("grpo");
        let groups: Vec<RolloutGroup> =
            groups.iter().cloned().map(|g| RolloutGroup { challenger: g.challenger.filter(|_| !grpo), ..g }).collect();
        for memory in [&["optim.logprob_chunk_tokens=0"][..], &[bounded.as_str(), "optim.logprob_chunk_tokens=2"]] {
            let settings: Vec<&str> = mode.iter().chain(memory).copied().collect();
            let want = Trainer::new(policy(), config(tmp.path(), &settings)).unwrap().gradients(&groups).unwrap();
            let mut ckpt = settings.clone();
            ckpt.push("optim.gradient_checkpointing=true");
            let mut trainer = Trainer::new(policy(), config(tmp.path(), &ckpt)).unwrap();
            let got = trainer.gradients(&groups).unwrap();
            assert_eq!(got.len(), want.len());
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let scale = w.abs().max().double_value(&[]);
                assert!(scale > 0.0, "{settings:?}: {name} has a zero gradient, nothing is compared");
                let diff = (g - w).abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale, "{settings:?}: {name}: |diff| {diff:e} vs |grad| {scale:e}");
            }
            // Computing a gradient applied nothing: a second call gives it again.
            let again = trainer.gradients(&groups).unwrap();
            assert!(again.iter().zip(&got).all(|((_, a), (_, b))| a.equal(b)), "{settings:?}");
            assert_eq!(trainer.step, 0);
        }
    }
}
