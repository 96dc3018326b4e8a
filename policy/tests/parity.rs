//! Parity with Hugging Face transformers on tiny random models of every supported family
//! (Llama, Qwen2/2.5, Qwen3, Mistral): logits of unequal-length prompts in one padded batch
//! within 1e-4 (f32), identical greedy continuations, generation's log-probs equal to the
//! training-side scoring, and reward-model scores.
use selfplay_policy::model::{Llama, PaddedBatch};
use selfplay_policy::{generate, scoring, GenRequest, Generator, Grad, SamplingConfig, Scorer, Tokenizer};
use tch::{Device, Kind, Tensor};

const VARIANTS: [&str; 4] = ["gqa_tied", "mha_untied", "llama3_rope", "head_dim"];

/// The other families: Qwen2 (q/k/v biases; and per-layer sliding windows), Qwen3 (q/k norms,
/// explicit head_dim; and attention biases), Mistral (sliding window of 5, shorter than most
/// prompts plus their continuations).
const FAMILIES: [&str; 5] = ["qwen2", "qwen2_window", "qwen3", "qwen3_bias", "mistral"];

fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![1, 5, 9, 33, 17, 101, 7],
        vec![1, 44],
        vec![1, 200, 150, 3, 3, 3, 88, 91, 12, 60, 61, 62, 63],
        vec![1, 77, 78, 79],
    ]
}

fn tiny(variant: &str, dir: &std::path::Path) -> Llama {
    selfplay_tests::run_python("hf_reference.py", &["make-tiny", dir.to_str().unwrap(), variant, "3"]);
    Llama::load(dir, Device::Cpu, Kind::Float).expect("load tiny model")
}

/// A tokenizer is needed by generate() only for stop strings and text; a tiny word-level one.
fn tiny_tokenizer(dir: &std::path::Path) -> Tokenizer {
    selfplay_tests::tiny_tokenizer(dir);
    Tokenizer::load(dir).unwrap()
}

#[test]
fn logits_and_greedy_match_transformers() {
    for variant in VARIANTS {
        logits_and_greedy_match(variant);
    }
}

#[test]
fn other_families_match_transformers() {
    for variant in FAMILIES {
        logits_and_greedy_match(variant);
    }
}

fn logits_and_greedy_match(variant: &str) {
    {
        let tmp = tempfile::tempdir().unwrap();
        let model = tiny(variant, tmp.path());
        let prompts = prompts();
        let spec = serde_json::json!({"prompts": prompts, "max_new_tokens": 12});
        let inp = tmp.path().join("in.json");
        let outp = tmp.path().join("out.json");
        std::fs::write(&inp, spec.to_string()).unwrap();
        selfplay_tests::run_python(
            "hf_reference.py",
            &["logits", tmp.path().to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
        );
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();

        // One right-padded batch of all prompts against per-prompt unpadded references.
        let batch = PaddedBatch::right_padded(&prompts, 0, Device::Cpu).unwrap();
        let logits = tch::no_grad(|| {
            let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None).unwrap();
            model.logits(&h).unwrap()
        });
        let mut worst = 0f64;
        for (i, p) in prompts.iter().enumerate() {
            let want: Vec<Vec<f64>> = serde_json::from_value(reference["logits"][i].clone()).unwrap();
            let want = Tensor::from_slice2(&want).to_kind(Kind::Float);
            let got = logits.get(i as i64).narrow(0, 0, p.len() as i64);
            let diff = (got - want).abs().max().double_value(&[]);
            worst = worst.max(diff);
        }
        assert!(worst < 1e-4, "{variant}: max |logit diff| = {worst:e}");

        // Greedy generation of all prompts in one left-padded batch.
        let tok = tiny_tokenizer(tmp.path());
        let greedy = SamplingConfig::greedy(12);
        let out = Generator::new(&model, &tok, &[]).run(&GenRequest::from_prompts(&prompts, 0), &greedy).unwrap().0;
        for (i, c) in out.iter().enumerate() {
            let want: Vec<i64> = serde_json::from_value(reference["greedy"][i].clone()).unwrap();
            assert_eq!(c.completion_ids, want, "{variant}: greedy continuation of prompt {i}");
        }
        eprintln!("{variant}: max |logit diff| {worst:e}, greedy identical");
    }
}

/// Every family's ...ForSequenceClassification reward head.
#[test]
fn reward_model_scores_match_transformers() {
    for variant in ["llama3_rope", "qwen2", "qwen3", "mistral"] {
        reward_scores_match(variant);
    }
}

fn reward_scores_match(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    selfplay_tests::run_python("hf_reference.py", &["make-tiny-classifier", dir.to_str().unwrap(), variant, "5"]);
    let model = Llama::load(dir, Device::Cpu, Kind::Float).unwrap();
    let seqs = prompts();
    let inp = dir.join("in.json");
    let outp = dir.join("out.json");
    std::fs::write(&inp, serde_json::json!({"sequences": seqs}).to_string()).unwrap();
    selfplay_tests::run_python(
        "hf_reference.py",
        &["scores", dir.to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
    );
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    let got = scoring::sequence_scores(&model, &seqs).unwrap();
    for (i, g) in got.iter().enumerate() {
        let want = reference["scores"][i].as_f64().unwrap();
        assert!((*g as f64 - want).abs() < 1e-4, "{variant} sequence {i}: {g} vs {want}");
    }
    // A reward model has no language-model head.
    assert!(model.logits(&Tensor::zeros([1, 64], (Kind::Float, Device::Cpu))).is_err());
}

#[test]
fn sampling_is_seeded_and_logprobs_match_scoring() {
    for variant in ["gqa_tied", "qwen2", "qwen3", "mistral"] {
        sampling_logprobs_match_scoring(variant);
    }
}

/// Generation (slot cache, windowed decode mask) against the training-side scoring (one
/// right-padded batch, no cache, windowed causal mask).
fn sampling_logprobs_match_scoring(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(variant, tmp.path());
    let tok = tiny_tokenizer(tmp.path());
    let prompts = prompts();
    let cfg = SamplingConfig {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        max_new_tokens: 20,
        seed: 11,
        stop: vec![],
        max_batch: 0,
    };
    let a = Generator::new(&model, &tok, &[2]).run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg).unwrap().0;
    let b = Generator::new(&model, &tok, &[2]).run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg).unwrap().0;
    let c = Generator::new(&model, &tok, &[2]).run(&GenRequest::from_prompts(&prompts, 12), &cfg).unwrap().0;
    let ids = |v: &[selfplay_policy::Completion]| v.iter().map(|c| c.completion_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b), "same seed, same tokens");
    assert_ne!(ids(&a), ids(&c), "another seed, other tokens");

    let pairs: Vec<(Vec<i64>, Vec<i64>)> = a.iter().map(|c| (c.prompt_ids.clone(), c.completion_ids.clone())).collect();
    let scored = tch::no_grad(|| Scorer::new(&model).score(&pairs).unwrap());
    let mut worst = 0f64;
    for (i, c) in a.iter().enumerate() {
        for (t, lp) in c.logprobs.iter().enumerate() {
            let s = scored.logprobs.double_value(&[i as i64, t as i64]);
            worst = worst.max((s - *lp as f64).abs());
            assert!(*lp <= 0.0);
        }
    }
    assert!(worst < 1e-4, "{variant}: generation vs scoring log-prob diff {worst:e}");
}

#[test]
fn stop_strings_and_eos_end_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("mha_untied", tmp.path());
    let tok = tiny_tokenizer(tmp.path());
    let prompts = prompts();
    let greedy = SamplingConfig::greedy(10);
    let free = Generator::new(&model, &tok, &[]).run(&GenRequest::from_prompts(&prompts, 0), &greedy).unwrap().0;
    // Stop on the third token of the first row's greedy continuation.
    let stop_id = free[0].completion_ids[2];
    let eos =
        Generator::new(&model, &tok, &[stop_id]).run(&GenRequest::from_prompts(&prompts[..1], 0), &greedy).unwrap().0;
    assert_eq!(eos[0].completion_ids.last(), Some(&stop_id));
    assert!(eos[0].completion_ids.len() <= 3);
    assert_eq!(eos[0].finish_reason, selfplay_policy::FinishReason::Eos);
    let word = format!("t{stop_id}");
    let cfg = SamplingConfig { stop: vec![word.clone()], ..SamplingConfig::greedy(10) };
    let st = Generator::new(&model, &tok, &[]).run(&GenRequest::from_prompts(&prompts[..1], cfg.seed), &cfg).unwrap().0;
    assert_eq!(st[0].finish_reason, selfplay_policy::FinishReason::Stop);
    assert!(!st[0].text.contains(&word), "text cut before the stop string: {:?}", st[0].text);
}

/// Decoding uses stacked q/k/v and gate/up weights whose named parameters are views; a weight
/// update through the named parameters must reach the decoding path.
#[test]
fn decoding_follows_weight_updates() {
    let (ta, tb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = tiny("gqa_tied", ta.path());
    selfplay_tests::run_python("hf_reference.py", &["make-tiny", tb.path().to_str().unwrap(), "gqa_tied", "5"]);
    let b = Llama::load(tb.path(), Device::Cpu, Kind::Float).unwrap();
    let tok = tiny_tokenizer(ta.path());
    let cfg = SamplingConfig::greedy(12);
    let ids = |v: &[selfplay_policy::Completion]| v.iter().map(|c| c.completion_ids.clone()).collect::<Vec<_>>();
    let before = Generator::new(&a, &tok, &[]).run(&GenRequest::from_prompts(&prompts(), cfg.seed), &cfg).unwrap().0;

    let update = b.parameters().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    a.set_weights(&update).unwrap();
    let after = Generator::new(&a, &tok, &[]).run(&GenRequest::from_prompts(&prompts(), cfg.seed), &cfg).unwrap().0;
    assert_ne!(ids(&before), ids(&after), "the update changed nothing");
    // Against the other model's own training-side scoring (plain linears, no cache).
    let pairs: Vec<(Vec<i64>, Vec<i64>)> =
        after.iter().map(|c| (c.prompt_ids.clone(), c.completion_ids.clone())).collect();
    let scored = tch::no_grad(|| Scorer::new(&b).score(&pairs).unwrap());
    for (i, c) in after.iter().enumerate() {
        for (t, lp) in c.logprobs.iter().enumerate() {
            let s = scored.logprobs.double_value(&[i as i64, t as i64]);
            assert!((s - *lp as f64).abs() < 1e-4, "row {i} token {t}: {lp} vs {s}");
        }
    }
    assert_eq!(
        ids(&after),
        ids(&Generator::new(&b, &tok, &[]).run(&GenRequest::from_prompts(&prompts(), cfg.seed), &cfg).unwrap().0)
    );
}

/// Continuous batching: with fewer slots than requests, finished rows are refilled at once, and
/// every request still gets what it would get alone (same tokens, log-probs within 1e-4), also
/// when sampling, since each request has its own random stream.
#[test]
fn continuous_batching_equals_generating_alone() {
    for variant in ["gqa_tied", "mha_untied", "mistral", "qwen2_window"] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tiny(variant, tmp.path());
        let tok = tiny_tokenizer(tmp.path());
        let mut prompts = prompts();
        // Two prompts twice (a unit's answers share theirs): one prefill row each.
        prompts.extend([vec![1, 9, 9, 12, 40], vec![1, 3], vec![1, 120, 121, 122, 123, 124, 125, 126, 127]]);
        prompts.extend([vec![1, 3], vec![1, 44]]);
        let reqs: Vec<generate::GenRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| generate::GenRequest { prompt_ids: p.clone(), seed: 1000 + i as u64 })
            .collect();
        for temperature in [0.0, 0.9] {
            let base = SamplingConfig { temperature, top_k: 40, max_new_tokens: 16, ..Default::default() };
            // Mixed lengths: end rows on the token the first free run samples most often.
            let free = Generator::new(&model, &tok, &[]).run(&reqs, &base).unwrap().0;
            let mut counts = std::collections::HashMap::new();
            for c in &free {
                for &id in &c.completion_ids {
                    *counts.entry(id).or_insert(0) += 1;
                }
            }
            let eos = *counts.iter().max_by_key(|(id, n)| (**n, -**id)).unwrap().0;
            let alone: Vec<_> = reqs
                .iter()
                .map(|r| Generator::new(&model, &tok, &[eos]).run(std::slice::from_ref(r), &base).unwrap().0.remove(0))
                .collect();
            let lens: Vec<usize> = alone.iter().map(|c| c.completion_ids.len()).collect();
            assert!(lens.iter().min() < lens.iter().max(), "{variant}: the workload needs mixed lengths: {lens:?}");
            for max_batch in [0, 2, 3] {
                let cfg = SamplingConfig { max_batch, ..base.clone() };
                let (got, stats) = Generator::new(&model, &tok, &[eos]).run(&reqs, &cfg).unwrap();
                if max_batch > 0 {
                    assert!(stats.refills > 0, "{variant} max_batch {max_batch}: no slot was refilled");
                } else {
                    assert_eq!(stats.prefill_rows, reqs.len() as u64 - 2, "{variant}: shared prompts");
                }
                for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
                    assert_eq!(
                        g.completion_ids, a.completion_ids,
                        "{variant} t={temperature} batch {max_batch} row {i}"
                    );
                    assert_eq!(g.finish_reason, a.finish_reason);
                    for (x, y) in g.logprobs.iter().zip(&a.logprobs) {
                        assert!((x - y).abs() < 1e-4, "{variant} row {i}: log-prob {x} vs {y}");
                    }
                }
            }
        }
    }
}

/// A finish probe reads the logits after a finished row plus its suffix from the generator's
/// cache: they equal a fresh forward pass over prompt + completion + suffix, rows that ask
/// for nothing get nothing, and no row's tokens change, with and without refills.
#[test]
fn finish_probe_equals_a_fresh_forward_pass() {
    for variant in ["gqa_tied", "mistral", "qwen3"] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tiny(variant, tmp.path());
        let tok = tiny_tokenizer(tmp.path());
        let mut prompts = prompts();
        prompts.extend([vec![1, 9, 9, 12, 40], vec![1, 3]]);
        let probe_ids: Vec<i64> = vec![3, 17, 40, 101, 5];
        // Row by row: a two-token suffix, an empty one, or none; rows end early on the token
        // the free run samples most.
        let suffix_for = |row: usize| match row % 3 {
            0 => Some(vec![60, 61]),
            1 => Some(vec![]),
            _ => None,
        };
        let base = SamplingConfig { temperature: 0.9, top_k: 40, max_new_tokens: 10, seed: 4, ..Default::default() };
        let free =
            Generator::new(&model, &tok, &[]).run(&GenRequest::from_prompts(&prompts, base.seed), &base).unwrap().0;
        let mut counts = std::collections::HashMap::new();
        for &id in free.iter().flat_map(|c| &c.completion_ids) {
            *counts.entry(id).or_insert(0) += 1;
        }
        let eos = *counts.iter().max_by_key(|(id, n)| (**n, -**id)).unwrap().0;
        let plain =
            Generator::new(&model, &tok, &[eos]).run(&GenRequest::from_prompts(&prompts, base.seed), &base).unwrap().0;
        let mut kinds = std::collections::HashSet::new();
        for max_batch in [0, 2] {
            let cfg = SamplingConfig { max_batch, ..base.clone() };
            let probe = generate::FinishProbe {
                ids: probe_ids.clone(),
                max_suffix: 2,
                suffix: Box::new(move |row, _, _| Ok(suffix_for(row))),
            };
            let (got, _) = Generator::new(&model, &tok, &[eos])
                .probe(probe)
                .run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg)
                .unwrap();
            for (i, (g, p)) in got.iter().zip(&plain).enumerate() {
                assert_eq!(g.completion_ids, p.completion_ids, "{variant} batch {max_batch} row {i}");
                let Some(suffix) = suffix_for(i) else {
                    assert!(g.probe.is_none(), "{variant} row {i} asked for no probe");
                    continue;
                };
                kinds.insert(suffix.len());
                let seq = [g.prompt_ids.clone(), g.completion_ids.clone(), suffix].concat();
                let want = tch::no_grad(|| {
                    let batch = PaddedBatch::right_padded(&[seq.clone()], 0, Device::Cpu).unwrap();
                    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None).unwrap();
                    let last = model.logits(&h.get(0).get(seq.len() as i64 - 1)).unwrap();
                    Vec::<f32>::try_from(last.index_select(0, &Tensor::from_slice(&probe_ids))).unwrap()
                });
                let have = g.probe.as_ref().expect("a probed row carries its logits");
                for (x, y) in have.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{variant} batch {max_batch} row {i}: probe {x} vs fresh {y}");
                }
            }
        }
        assert_eq!(kinds.len(), 2);
        eprintln!("{variant}: probes equal fresh passes");
    }
}

/// A probe with ids outside the vocabulary, or a suffix longer than it declared or holding such
/// ids, is refused with an error that says so.
#[test]
fn a_bad_finish_probe_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("gqa_tied", tmp.path());
    let tok = tiny_tokenizer(tmp.path());
    let vocab = model.config().vocab_size;
    let cfg = SamplingConfig::greedy(3);
    let run = |ids: Vec<i64>, suffix: Vec<i64>| {
        let probe =
            generate::FinishProbe { ids, max_suffix: 2, suffix: Box::new(move |_, _, _| Ok(Some(suffix.clone()))) };
        Generator::new(&model, &tok, &[])
            .probe(probe)
            .run(&GenRequest::from_prompts(&prompts(), cfg.seed), &cfg)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = run(vec![3, vocab], vec![]);
    assert!(e.contains(&vocab.to_string()), "{e}");
    let e = run(vec![3], vec![5, 6, 7]);
    assert!(e.contains("max_suffix"), "{e}");
    let e = run(vec![3], vec![5, -1]);
    assert!(e.contains("-1"), "{e}");
}

/// Sequences that open alike: the opening goes through the trunk once and every row's
/// remainder attends to it. Hidden states, scoring log-probs and generation equal the plain
/// passes (and generating each prompt alone), also with a sliding window shorter than the
/// opening.
#[test]
fn a_shared_opening_equals_the_plain_pass() {
    let opening: Vec<i64> = (0..20).map(|i| 1 + (i * 7) % 90).collect();
    let tails: [&[i64]; 4] = [&[5, 9, 33], &[44], &[200, 150, 3, 3, 88, 91], &[77, 78]];
    let seqs: Vec<Vec<i64>> = tails.iter().map(|t| [opening.as_slice(), t].concat()).collect();
    for variant in ["gqa_tied", "mha_untied", "mistral", "qwen2_window", "qwen3"] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tiny(variant, tmp.path());
        let tok = tiny_tokenizer(tmp.path());
        tch::no_grad(|| {
            let batch = PaddedBatch::right_padded(&seqs, 0, Device::Cpu).unwrap();
            let plain = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None).unwrap();
            let (shared, p) = model.forward_hidden_shared(&seqs, usize::MAX).unwrap();
            assert_eq!(p, opening.len() as i64, "{variant}: the whole opening is shared");
            // A sequence that is the start of another keeps its last token of its own.
            let nested = [seqs[0][..21].to_vec(), seqs[0].clone()];
            assert_eq!(model.forward_hidden_shared(&nested, usize::MAX).unwrap().1, 20);
            for (i, s) in seqs.iter().enumerate() {
                let n = s.len() as i64 - p;
                let want = plain.get(i as i64).narrow(0, p, n);
                let diff = (shared.get(i as i64).narrow(0, 0, n) - want).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{variant} row {i}: |hidden diff| {diff:e}");
            }
        });
        // Scoring: completions after prompts that share the opening.
        let pairs: Vec<(Vec<i64>, Vec<i64>)> =
            seqs.iter().map(|s| (s[..s.len() - 1].to_vec(), vec![s[s.len() - 1], 12, 60])).collect();
        let limited = tch::no_grad(|| Scorer::new(&model).score(&pairs).unwrap());
        let graph = tch::no_grad(|| Scorer::new(&model).grad(Grad::Graph).score(&pairs).unwrap());
        let diff = (limited.logprobs - graph.logprobs).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{variant}: scoring log-probs differ by {diff:e}");
        // Generation: one prefill of the opening, then each prompt's remainder.
        let reqs: Vec<generate::GenRequest> = seqs
            .iter()
            .enumerate()
            .map(|(i, p)| generate::GenRequest { prompt_ids: p.clone(), seed: 70 + i as u64 })
            .collect();
        let cfg = SamplingConfig { temperature: 0.9, top_k: 40, max_new_tokens: 8, ..Default::default() };
        let (together, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg).unwrap();
        assert_eq!(stats.shared_prefix_tokens, opening.len() as u64, "{variant}: {stats:?}");
        same_as_alone(&model, &tok, &reqs, &cfg, &together, variant);
    }
}

/// Each request generated alone gives the batch's tokens, and log-probs within 1e-4.
fn same_as_alone(
    model: &Llama,
    tok: &Tokenizer,
    reqs: &[generate::GenRequest],
    cfg: &SamplingConfig,
    together: &[generate::Completion],
    what: &str,
) {
    for (i, r) in reqs.iter().enumerate() {
        let alone = Generator::new(model, tok, &[]).run(std::slice::from_ref(r), cfg).unwrap().0.remove(0);
        assert_eq!(together[i].completion_ids, alone.completion_ids, "{what} row {i}");
        for (x, y) in together[i].logprobs.iter().zip(&alone.logprobs) {
            assert!((x - y).abs() < 1e-4, "{what} row {i}: log-prob {x} vs {y}");
        }
    }
}

/// Batches past `MIN_SPLIT_TOKENS` padded tokens of mixed lengths run as several passes of
/// similar lengths (scoring, judging and generation prefill): results come back in the
/// caller's order and equal one padded pass, and generating each prompt alone.
#[test]
fn mixed_length_batches_split_by_length() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("gqa_tied", tmp.path());
    let tok = tiny_tokenizer(tmp.path());
    let opening: Vec<i64> = (0..20).map(|i| 1 + (i * 7) % 90).collect();
    let seqs: Vec<Vec<i64>> = (0..12)
        .map(|k| {
            let tail: Vec<i64> = (0..(10 + (k * 83) % 220)).map(|j| 1 + ((k * 31 + j * 13) % 200) as i64).collect();
            [opening.clone(), tail].concat()
        })
        .collect();
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let buckets = scoring::length_buckets(&lengths, 0);
    assert!(buckets.len() > 1, "the workload must split: {lengths:?}");
    let pairs: Vec<(Vec<i64>, Vec<i64>)> =
        seqs.iter().map(|s| (s[..s.len() - 3].to_vec(), s[s.len() - 3..].to_vec())).collect();
    let limited = tch::no_grad(|| Scorer::new(&model).entropy(true).score(&pairs).unwrap());
    let graph = tch::no_grad(|| Scorer::new(&model).grad(Grad::Graph).entropy(true).score(&pairs).unwrap());
    assert!(limited.mask.equal(&graph.mask));
    let diff = (limited.logprobs - graph.logprobs).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "scoring log-probs differ by {diff:e}");
    let diff = (limited.entropy.unwrap() - graph.entropy.unwrap()).abs().max().double_value(&[]);
    assert!(diff < 1e-3, "entropies differ by {diff:e}");
    let reqs: Vec<generate::GenRequest> = seqs
        .iter()
        .enumerate()
        .map(|(i, p)| generate::GenRequest { prompt_ids: p.clone(), seed: 500 + i as u64 })
        .collect();
    let cfg = SamplingConfig { temperature: 0.9, max_new_tokens: 4, ..Default::default() };
    let (together, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg).unwrap();
    assert_eq!(stats.prefills, buckets.len() as u64, "{stats:?}");
    same_as_alone(&model, &tok, &reqs, &cfg, &together, "mixed lengths");
}

/// The decoding loop reads back one thing per generated token (the sampled ids) and uploads
/// nothing per token: inputs, positions and random numbers go up once, or once per refill.
#[test]
fn one_device_read_per_generated_token() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("gqa_tied", tmp.path());
    let tok = tiny_tokenizer(tmp.path());
    let reqs: Vec<generate::GenRequest> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| generate::GenRequest { prompt_ids: p, seed: i as u64 })
        .collect();
    for (temperature, uploads) in [(0.0, 2), (1.0, 3)] {
        let cfg = SamplingConfig { temperature, max_new_tokens: 24, ..Default::default() };
        let (out, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg).unwrap();
        assert!(out.iter().all(|c| c.completion_ids.len() == 24));
        assert_eq!(stats.steps, 24);
        // The ids of every step, and the log-probs once at the end.
        assert_eq!(stats.device_to_host, stats.steps + 1, "{stats:?}");
        // Prompt ids and slot metadata (and the uniforms when sampling), once.
        assert_eq!(stats.host_to_device, uploads, "{stats:?}");
        assert_eq!(stats.prefills, 1);
    }
    // With refills: a constant number of uploads per refill, none per token.
    let cfg = SamplingConfig { max_new_tokens: 24, max_batch: 1, ..SamplingConfig::greedy(24) };
    let (_, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg).unwrap();
    assert_eq!(stats.steps, 24 * reqs.len() as u64);
    assert_eq!(stats.device_to_host, stats.steps + 1, "{stats:?}");
    assert_eq!(stats.prefills, reqs.len() as u64);
    // Per refill: the finished slot, the prompt ids and the slot metadata.
    assert_eq!(stats.host_to_device, 2 + 3 * (reqs.len() as u64 - 1), "{stats:?}");
}

/// The window is not a no-op: the same Mistral weights with `sliding_window: null` (full
/// attention) give other logits exactly from the first position past the window.
#[test]
fn sliding_window_changes_logits_past_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let windowed = tiny("mistral", tmp.path());
    assert_eq!(windowed.config().layer_windows, vec![Some(5), Some(5)]);
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::Value::Null;
    std::fs::write(&p, cfg.to_string()).unwrap();
    let full = Llama::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(full.config().layer_windows, vec![None, None]);
    let seq = prompts()[2].clone();
    let batch = PaddedBatch::right_padded(&[seq.clone()], 0, Device::Cpu).unwrap();
    let logits = |m: &Llama| {
        tch::no_grad(|| m.logits(&m.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None).unwrap()).unwrap())
    };
    let diff = (logits(&windowed) - logits(&full)).abs().amax([0, 2], false);
    for pos in 0..seq.len() as i64 {
        let d = diff.double_value(&[pos]);
        if pos < 5 {
            assert!(d < 1e-5, "position {pos} sees no more than the window ({d:e})");
        } else {
            assert!(d > 1e-3, "position {pos}: the window changed nothing ({d:e})");
        }
    }
}
