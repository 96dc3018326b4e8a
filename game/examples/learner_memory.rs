//! Resident memory of the learner, measured on the CPU, against the formulas of
//! `selfplay_game::sizing`: after loading the weights, after building AdamW, and the peak of
//! two learner steps (the first allocates the gradients; the second finds them resident).
//! Prints one JSON object. Run through scripts/learner_memory.sh, which sets the allocator up
//! so that freed tensors go back to the system and the peak follows live tensors.
//!
//! learner_memory table   (prints the sizing table of docs/operations.md)
//! learner_memory MODEL DTYPE SEQUENCES PROMPT_TOKENS COMPLETION_TOKENS CHUNK [CHECKPOINTING]
//!   MODEL: a Hugging Face model directory, or `tiny` for a random 28M-parameter Llama
//!   DTYPE: f32 or bf16; CHUNK: optim.logprob_chunk_tokens; CHECKPOINTING: 1 to set
//!   optim.gradient_checkpointing (default 0)
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::{sizing, Config, Trainer};
use selfplay_policy::generate::SplitMix64;
use selfplay_policy::{ModelConfig, Policy};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A field of /proc/self/status in bytes (VmRSS: now, VmHWM: the peak since the last reset).
fn status_bytes(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux only)");
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB");
    kb * 1024
}

/// Resets VmHWM to the current resident size (Linux: clear_refs 5).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("cannot reset the peak (needs Linux >= 4.0)");
}

/// A random Llama of 28M parameters with the tests' word-level tokenizer.
fn tiny_model(dir: &Path) {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mc = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    tch::manual_seed(0);
    let tensors: Vec<(String, Tensor)> = selfplay_policy::model::expected_tensors(&mc)
        .into_iter()
        .map(|(n, shape)| (n, Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02))
        .collect();
    selfplay_policy::weights::save_tensors(
        &dir.join("model.safetensors"),
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
    )
    .unwrap();
    selfplay_tests::tiny_tokenizer(dir);
}

/// The sizing table of docs/operations.md, from the formulas: bf16 (the CUDA default), head
/// chunks of 1,024 positions, micro-batches of 4,096 tokens.
fn print_table() {
    let gb = |b: u64| format!("{:.2}", b as f64 / 1e9);
    let mb = |b: u64| format!("{:.2}", b as f64 / 1e6);
    println!("| model | P | weights | gradients | f32 master | moments | resident | activations per micro-batch token (MB) | log-prob chunk | AdamW scratch | learner peak at 4,096 tokens | actor: policy + reference | KV cache per token (MB) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for shape in sizing::Shape::known() {
        let l = sizing::learner(&shape, 2, 1024);
        let a = sizing::actor(&shape, 2);
        println!(
            "| {} | {:.3} B | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            shape.name,
            l.params as f64 / 1e9,
            gb(l.weights),
            gb(l.grads),
            gb(l.master),
            gb(l.moments),
            gb(l.resident),
            mb(l.activations_per_token),
            gb(l.logprob_chunk),
            gb(l.update_scratch),
            gb(l.peak(4096)),
            gb(a.policy + a.reference),
            mb(a.kv_cache_per_token),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("table") {
        return print_table();
    }
    assert!(
        matches!(args.len(), 6 | 7),
        "usage: learner_memory MODEL DTYPE SEQUENCES PROMPT_TOKENS COMPLETION_TOKENS CHUNK [CHECKPOINTING]"
    );
    let num = |i: usize| -> usize { args[i].parse().unwrap_or_else(|_| panic!("argument {} is not a number", i + 1)) };
    let (dtype, b, plen, clen, chunk) = (args[1].as_str(), num(2), num(3), num(4), num(5));
    let checkpointing = args.len() == 7 && num(6) == 1;
    let kind = selfplay_policy::parse_kind(dtype).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = if args[0] == "tiny" {
        tiny_model(tmp.path());
        tmp.path().to_path_buf()
    } else {
        PathBuf::from(&args[0])
    };

    // libtorch's own start-up (thread pools, kernels) is not part of any formula.
    let _ = (Tensor::ones([64, 64], (Kind::Float, Device::Cpu))
        .matmul(&Tensor::ones([64, 64], (Kind::Float, Device::Cpu))))
    .sum(Kind::Float)
    .double_value(&[]);
    let rss0 = status_bytes("VmRSS:");
    let policy = Policy::load(&dir, Device::Cpu, kind).unwrap();
    let rss_weights = status_bytes("VmRSS:");
    let shape = sizing::Shape::from_config("measured", policy.model.config());
    let vocab = policy.model.config().vocab_size as u64;
    let cfg = Config::load(
        None,
        &[
            "model.device=cpu".into(),
            format!("model.dtype={dtype}"),
            "game.mode=grpo".into(),
            "game.prompts_file=unused.json".into(),
            "game.queries_per_step=1".into(),
            format!("game.group_size={b}"),
            "optim.grad_accum=1".into(),
            "optim.lr=1e-5".into(),
            format!("optim.logprob_chunk_tokens={chunk}"),
            format!("optim.gradient_checkpointing={checkpointing}"),
        ],
    )
    .unwrap();
    let mut trainer = Trainer::new(policy, cfg).unwrap();
    let rss_opt = status_bytes("VmRSS:");

    let mut rng = SplitMix64::new(7);
    let mut ids = |n: usize| (0..n).map(|_| 5 + (rng.next_u64() % (vocab - 5)) as i64).collect::<Vec<_>>();
    let group = RolloutGroup {
        unit_id: "s0-u0".into(),
        answers: (0..b)
            .map(|j| AnswerData {
                sequence: SequenceData {
                    prompt_ids: ids(plen),
                    completion_ids: ids(clen),
                    behaviour_logprobs: vec![-2.0; clen],
                    ref_logprobs: vec![-2.1; clen],
                    text: String::new(),
                },
                reward: j as f32,
                self_reward: 0.0,
                self_reward_parsed: true,
            })
            .collect(),
        ..Default::default()
    };
    let mut steps = vec![];
    for _ in 0..2 {
        reset_peak();
        let before = status_bytes("VmRSS:");
        let t = std::time::Instant::now();
        let stats = trainer.train_step(std::slice::from_ref(&group)).unwrap();
        let peak = status_bytes("VmHWM:");
        let after = status_bytes("VmRSS:");
        steps.push(serde_json::json!({
            "rss_before": before, "peak": peak, "rss_after": after,
            "peak_over_before": peak - before, "seconds": t.elapsed().as_secs_f64(), "loss": stats.loss,
        }));
    }

    let s = kind.elt_size_in_bytes() as u64;
    let tokens = (b * (plen + clen)) as u64;
    let rows = (b * clen) as u64;
    let chunk_rows = if chunk == 0 { rows } else { rows.min(chunk as u64) };
    let f = sizing::learner(&shape, s, chunk_rows);
    let f = if checkpointing { f.with_checkpointing(&shape, s) } else { f };
    let act = f.activations_per_token * tokens;
    let head = f.logprob_chunk;
    // The first step also allocates the gradients; the largest (the tied embedding) is made by
    // the output head's backward pass, while every activation is still alive.
    let first_grad = s * shape.largest_param();
    let measured_step2 = steps[1]["peak_over_before"].as_u64().unwrap();
    let predicted_step2 = f.step_peak(tokens);
    let out = serde_json::json!({
        "model": args[0], "dtype": dtype, "params": f.params, "sequences": b, "prompt_tokens": plen,
        "completion_tokens": clen, "tokens": tokens, "logprob_chunk_tokens": chunk,
        "gradient_checkpointing": checkpointing,
        "threads": tch::get_num_threads(),
        "measured": {
            "weights": rss_weights - rss0,
            "optimizer_state": rss_opt - rss_weights,
            "gradients_kept_after_step1": steps[0]["rss_after"].as_u64().unwrap() as i64 - steps[0]["rss_before"].as_u64().unwrap() as i64,
            "step1_peak_over_before": steps[0]["peak_over_before"],
            "step2_peak_over_before": measured_step2,
        },
        "predicted": {
            "weights": f.weights,
            "optimizer_state": f.master + f.moments,
            "gradients": f.grads,
            "activations": act,
            "activations_per_token": f.activations_per_token,
            "logprob_chunk": head,
            "update_scratch": f.update_scratch,
            "step1_peak_over_before": act + first_grad + head,
            "step2_peak_over_before": predicted_step2,
        },
        "step2_measured_over_predicted": measured_step2 as f64 / predicted_step2 as f64,
        "steps": steps,
    });
    println!("{out}");
}
