//! The learner's chunked log-probs (scoring.rs) against one graph through the whole head, on
//! tiny random models in f32: the same log-probs, entropies and parameter gradients, for any
//! chunk size; and inference split into batches by tokens gives the same rows.
use selfplay_policy::model::expected_tensors;
use selfplay_policy::scoring::{Grad, ScoreLimits, Scorer};
use selfplay_policy::{Llama, ModelConfig, PolicyError};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn tiny(tied: bool, seed: i64) -> Llama {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": tied, "hidden_act": "silu",
    });
    let cfg = ModelConfig::from_json(&json.to_string()).unwrap().unwrap();
    tch::manual_seed(seed);
    let mut tensors: HashMap<String, Tensor> = expected_tensors(&cfg)
        .into_iter()
        .map(|(n, shape)| {
            let t = if n.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
                    + Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.1
            } else {
                Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.2
            };
            (n, t)
        })
        .collect();
    Llama::from_tensors(cfg, &mut tensors, Device::Cpu, Kind::Float, Path::new("<random>")).unwrap()
}

/// Prompts and completions of different lengths, so that padding is on every side.
fn pairs() -> Vec<(Vec<i64>, Vec<i64>)> {
    let ids = |n: usize, k: i64| (0..n as i64).map(|i| (i * 7 + k * 13) % 97).collect::<Vec<i64>>();
    vec![(ids(5, 1), ids(4, 2)), (ids(2, 3), ids(9, 4)), (ids(8, 5), ids(1, 6)), (ids(3, 7), ids(6, 8))]
}

/// A loss that is not linear in the log-probs (like the trainer's ratios and k3 terms).
fn loss_of(lp: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(Kind::Float);
    let w = Tensor::arange(lp.size()[1], (Kind::Float, Device::Cpu)) * 0.1 + 0.5;
    let seq = (lp * &m).sum_dim_intlist(1, false, Kind::Float);
    ((lp * 0.3).exp() * &m * &w).sum(Kind::Float) + (seq * 0.05).exp().sum(Kind::Float) - (lp * &m).sum(Kind::Float)
}

fn grads(model: &Llama) -> Vec<(String, Tensor)> {
    model.parameters().iter().map(|(n, p)| (n.clone(), p.grad().copy())).collect()
}

fn zero_grads(model: &Llama) {
    for (_, p) in model.parameters() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn chunked_gradients_equal_one_graph() {
    for tied in [true, false] {
        let mut model = tiny(tied, 3);
        model.set_requires_grad(true);
        let pairs = pairs();

        let one = Scorer::new(&model).grad(Grad::Graph).entropy(true).score(&pairs).unwrap();
        let want_loss = loss_of(&one.logprobs, &one.mask);
        want_loss.backward();
        let want = grads(&model);
        let want_lp = one.logprobs.detach();
        let want_ent = one.entropy.unwrap();

        let ways = [("chunked", Grad::Chunked), ("checkpointed", Grad::Checkpointed)];
        for ((way, grad), chunk) in ways.into_iter().flat_map(|w| [1usize, 3, 7, 0].map(|c| (w, c))) {
            zero_grads(&model);
            let scored = Scorer::new(&model).grad(grad).entropy(true).chunk_positions(chunk).score(&pairs).unwrap();
            assert!(scored.logprobs.is_leaf() && scored.logprobs.requires_grad());
            assert!(scored.mask.equal(&one.mask));
            let label = format!("{way}, tied {tied}, chunk {chunk}");
            let lp_diff = max_abs(&(&scored.logprobs.detach() - &want_lp));
            assert!(lp_diff < 1e-5, "{label}: log-probs differ by {lp_diff:e}");
            let ent_diff = max_abs(&(scored.entropy.as_ref().unwrap() - &want_ent));
            assert!(ent_diff < 1e-5, "{label}: entropies differ by {ent_diff:e}");
            let loss = loss_of(&scored.logprobs, &scored.mask);
            // Relative: the loss sums every token's log-prob, each allowed 1e-5 above, and MKL may
            // split its reductions differently from run to run when the machine is loaded.
            let (got_l, want_l) = (loss.double_value(&[]), want_loss.double_value(&[]));
            assert!((got_l - want_l).abs() <= 1e-6 * want_l.abs() + 1e-5, "{label}: loss {got_l} vs {want_l}");
            loss.backward();
            scored.backward(&model).unwrap();
            for ((name, got), (_, w)) in grads(&model).iter().zip(&want) {
                assert!(got.defined(), "{label}: {name} got no gradient");
                let scale = max_abs(w);
                assert!(scale > 0.0, "{label}: {name} has a zero gradient, nothing is compared");
                let diff = max_abs(&(got - w));
                assert!(diff <= 1e-5 * scale + 1e-7, "{label}: {name}: |diff| {diff:e} vs |grad| {scale:e}");
            }
        }
    }
}

/// The model's block-by-block entry points (what checkpointing recomputes with) are the
/// forward pass, bit for bit.
#[test]
fn blocks_one_at_a_time_are_the_forward_pass() {
    let model = tiny(false, 6);
    let seqs: Vec<Vec<i64>> = pairs().into_iter().map(|(p, c)| [p, c].concat()).collect();
    let batch = selfplay_policy::model::PaddedBatch::right_padded(&seqs, 0, Device::Cpu).unwrap();
    let want = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None).unwrap();
    let pass = model.block_pass(&batch.positions, &batch.mask).unwrap();
    let mut x = model.embed(&batch.ids).unwrap();
    for l in 0..model.num_layers() {
        x = model.forward_block(l, &x, &pass).unwrap();
    }
    assert!(model.final_norm(&x).equal(&want));
    assert!(matches!(model.forward_block(model.num_layers(), &x, &pass), Err(PolicyError::InvalidInput(_))));
}

#[test]
fn a_loss_without_the_logprobs_leaves_no_gradient() {
    let mut model = tiny(true, 4);
    model.set_requires_grad(true);
    let scored = Scorer::new(&model).grad(Grad::Chunked).chunk_positions(2).score(&pairs()).unwrap();
    assert!(scored.entropy.is_none());
    scored.backward(&model).unwrap();
    assert!(model.parameters().iter().all(|(_, p)| !p.grad().defined()));
}

#[test]
fn backward_without_trainable_parameters_is_refused() {
    let model = tiny(true, 5);
    let scored = Scorer::new(&model).grad(Grad::Chunked).chunk_positions(2).score(&pairs()).unwrap();
    assert!(!scored.logprobs.requires_grad());
    match scored.backward(&model) {
        Err(PolicyError::InvalidInput(m)) => assert!(m.contains("require grad"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(()) => panic!("backward without trainable parameters accepted"),
    }
}

#[test]
fn inference_split_into_batches_gives_the_same_rows() {
    let model = tiny(false, 6);
    // Longer lists, as the actors send (all of a unit's answers and its challenger at once).
    let pairs: Vec<_> = (0..3).flat_map(|_| pairs()).collect();
    let one = tch::no_grad(|| Scorer::new(&model).grad(Grad::Graph).entropy(true).score(&pairs)).unwrap();
    for (batch_tokens, chunk_positions) in [(1, 1), (12, 5), (30, 2), (0, 0), (10_000, 1)] {
        let limits = ScoreLimits { chunk_positions, batch_tokens };
        let got = Scorer::new(&model).entropy(true).limits(limits).score(&pairs).unwrap();
        let label = format!("{limits:?}");
        assert_eq!(got.logprobs.size(), one.logprobs.size(), "{label}");
        assert!(got.mask.equal(&one.mask), "{label}: mask");
        let d = max_abs(&(&got.logprobs - &one.logprobs));
        assert!(d < 1e-5, "{label}: log-probs differ by {d:e}");
        let d = max_abs(&(got.entropy.unwrap() - one.entropy.as_ref().unwrap()));
        assert!(d < 1e-5, "{label}: entropies differ by {d:e}");
    }
    // The default entry point takes this path for a model without trainable parameters.
    let dflt = Scorer::new(&model).score(&pairs).unwrap();
    assert!(!dflt.logprobs.requires_grad() && dflt.entropy.is_none());
    assert!(max_abs(&(&dflt.logprobs - &one.logprobs)) < 1e-5);
}

#[test]
fn bad_sequences_are_refused_before_any_work() {
    let model = tiny(true, 7);
    let limits = ScoreLimits { chunk_positions: 1, batch_tokens: 1 };
    for (pairs, want) in [
        (vec![], "no sequences"),
        (vec![(vec![1, 2], vec![3]), (vec![], vec![4])], "non-empty"),
        (vec![(vec![1, 2], vec![3]), (vec![5], vec![97])], "97"),
        (vec![(vec![1, 2], vec![3]), (vec![-1], vec![4])], "-1"),
    ] {
        let e = Scorer::new(&model).limits(limits).score(&pairs).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
        let e = Scorer::new(&model).grad(Grad::Chunked).chunk_positions(1).score(&pairs).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
    }
}
