//! `selfplay device-check`: the pieces scripts/gpu_check.sh runs on an accelerator, each a
//! small command that writes its result as JSON (or safetensors) for the script to compare
//! against the CPU and transformers. They need only a model directory, so the check can run
//! with nothing but the binary and a Python that makes random models.
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::trainer::Trainer;
use selfplay_game::Config;
use selfplay_policy::generate::{GenRequest, GenStats, Generator, SplitMix64};
use selfplay_policy::model::{Llama, PaddedBatch};
use selfplay_policy::{parse_device, parse_kind_on, weights, Policy, SamplingConfig, Tokenizer};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum DeviceCheck {
    /// What libtorch sees: CUDA, its devices, cuDNN, and whether libtorch_cuda is loaded.
    Info,
    /// Logits of a right-padded batch (safetensors) and greedy continuations with continuous
    /// batching (JSON).
    Logits(LogitsArgs),
    /// One learner step on fixed synthetic groups; writes the updated weights and the stats.
    TrainStep(TrainStepArgs),
    /// Decoding throughput at several batch sizes on random prompts (sampling, no EOS): the
    /// whole call, prefill alone, decode-only ms per step, the attention kernels SDPA picks,
    /// and the share of the HBM floor when the card's bandwidth is known.
    Decode(DecodeArgs),
    /// Learner step throughput on synthetic groups.
    LearnerStep(LearnerStepArgs),
    /// Decoding in CUDA graphs against eager decoding on the same device: the same ids and
    /// log-probs within 1e-5 (f32), with refills and a finish probe, before and after an in-place
    /// weight update (JSON). On the CPU both sides are eager (the dry run).
    Graphs(GraphsArgs),
}

#[derive(Args)]
pub struct GraphsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the comparison goes (JSON).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 6)]
    prompts: usize,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: i64,
}

#[derive(Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

impl ModelArgs {
    fn device(&self) -> Result<(Device, Kind)> {
        let dev = parse_device(&self.device)?;
        Ok((dev, parse_kind_on(&self.dtype, dev)?))
    }
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSON list of prompts, each a list of token ids.
    #[arg(long)]
    prompts: PathBuf,
    /// Where the [B, T, V] f32 logits go (safetensors, tensor "logits").
    #[arg(long)]
    out_logits: PathBuf,
    /// Where the greedy continuations go (JSON).
    #[arg(long)]
    out_greedy: PathBuf,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: i64,
}

#[derive(Args)]
pub struct TrainStepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory: model.safetensors after the step and stats.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,64,256", value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: i64,
    /// Timed calls per batch size (prefill alone, then the whole call); the fastest counts.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// The card's name (nvidia-smi's or torch.cuda.get_device_name's), to look up its memory
    /// bandwidth for the HBM floor.
    #[arg(long)]
    device_name: Option<String>,
    /// The memory bandwidth in TB/s, instead of the lookup by name.
    #[arg(long)]
    hbm_tb_s: Option<f64>,
}

#[derive(Args)]
pub struct LearnerStepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Groups per step (the game's N).
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Answers per group (G).
    #[arg(long, default_value_t = 4)]
    group_size: usize,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    completion_len: usize,
    /// Sequences per micro-batch (the learner's grad_accum splits a step into this many).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

pub fn run(cmd: DeviceCheck) -> Result<()> {
    match cmd {
        DeviceCheck::Info => info(),
        DeviceCheck::Logits(a) => logits(a),
        DeviceCheck::TrainStep(a) => train_step(a),
        DeviceCheck::Decode(a) => decode(a),
        DeviceCheck::LearnerStep(a) => learner_step(a),
        DeviceCheck::Graphs(a) => graphs(a),
    }
}

fn info() -> Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let cuda = tch::Cuda::is_available();
    let mut v = serde_json::json!({
        "cuda_available": cuda,
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "libtorch_cuda_loaded": maps.contains("libtorch_cuda"),
    });
    if cuda {
        // A real kernel on the device, read back.
        let x = Tensor::arange(1024, (Kind::Float, Device::Cuda(0)));
        v["cuda_sum_ok"] = serde_json::json!((x.sum(Kind::Float).double_value(&[]) - 523776.0).abs() < 1e-3);
    }
    println!("{v}");
    Ok(())
}

/// One seeded sampling run with refills (two slots) and a finish probe that feeds two tokens
/// and reads three logits.
fn probed_run(
    model: &Llama,
    tok: &Tokenizer,
    prompts: &[Vec<i64>],
    max_new: i64,
) -> Result<Vec<selfplay_policy::Completion>> {
    let vocab = model.config().vocab_size;
    let probe = selfplay_policy::generate::FinishProbe {
        ids: vec![1, 2, vocab - 1],
        max_suffix: 2,
        suffix: Box::new(move |row, _, _| Ok((row % 2 == 0).then(|| vec![3, 4]))),
    };
    let cfg = SamplingConfig { max_batch: 2, seed: 7, ..SamplingConfig::greedy(max_new) };
    let cfg = SamplingConfig { temperature: 1.0, ..cfg };
    let reqs = GenRequest::from_prompts(prompts, cfg.seed);
    Ok(tch::no_grad(|| Generator::new(model, tok, &[]).probe(probe).run(&reqs, &cfg))?.0)
}

fn graphs(a: GraphsArgs) -> Result<()> {
    let (dev, kind) = a.model.device()?;
    let tok = Tokenizer::load(&a.model.model).with_context(|| format!("tokenizer in {}", a.model.model.display()))?;
    // Two models of the same weights: one decodes eagerly, one in graphs (the mode is fixed
    // when a model makes its decode step).
    // Safety of set_var: nothing else runs in this process yet.
    std::env::set_var("SELFPLAY_CUDA_GRAPHS", "0");
    let eager = Llama::load(&a.model.model, dev, kind)?;
    let mut rng = SplitMix64::new(11);
    let vocab = eager.config().vocab_size;
    let prompts: Vec<Vec<i64>> = (0..a.prompts)
        .map(|i| (0..(5 + 3 * i)).map(|_| (rng.next_u64() % (vocab as u64 - 10)) as i64 + 5).collect())
        .collect();
    let want = probed_run(&eager, &tok, &prompts, a.max_new_tokens)?;
    std::env::set_var("SELFPLAY_CUDA_GRAPHS", "1");
    let graphed = Llama::load(&a.model.model, dev, kind)?;
    let got = probed_run(&graphed, &tok, &prompts, a.max_new_tokens)?;
    // A second call replays the graphs captured by the first.
    let again = probed_run(&graphed, &tok, &prompts, a.max_new_tokens)?;
    let compare = |x: &[selfplay_policy::Completion], y: &[selfplay_policy::Completion]| {
        let ids = x
            .iter()
            .zip(y)
            .all(|(a, b)| a.completion_ids == b.completion_ids && a.probe.is_some() == b.probe.is_some());
        let lp = x
            .iter()
            .zip(y)
            .flat_map(|(a, b)| a.logprobs.iter().zip(&b.logprobs).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max);
        let probe = x
            .iter()
            .zip(y)
            .filter_map(|(a, b)| {
                Some(a.probe.as_ref()?.iter().zip(b.probe.as_ref()?).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max))
            })
            .fold(0f32, f32::max);
        (ids, lp, probe)
    };
    let before = compare(&want, &got);
    let replayed = compare(&want, &again);
    // The same in-place update of both models' weights: a graph must follow it.
    tch::no_grad(|| {
        for ((_, p), (_, q)) in eager.parameters().iter().zip(graphed.parameters()) {
            let delta = p.randn_like() * 0.02;
            let _ = p.shallow_clone().g_add_(&delta);
            let _ = q.shallow_clone().g_add_(&delta);
        }
    });
    let want2 = probed_run(&eager, &tok, &prompts, a.max_new_tokens)?;
    let got2 = probed_run(&graphed, &tok, &prompts, a.max_new_tokens)?;
    let after = compare(&want2, &got2);
    let moved = want2.iter().zip(&want).any(|(a, b)| a.completion_ids != b.completion_ids);
    let stats = graphed.decode_step_stats();
    let (mode, captures, replays) = match stats {
        Some((m, c, r)) => (format!("{m:?}"), c, r),
        None => ("eager (not kept: CPU)".to_string(), 0, 0),
    };
    let tol = if kind == Kind::Float { 1e-5 } else { 5e-2 };
    let ok = |c: (bool, f32, f32)| c.0 && c.1 <= tol && c.2 <= tol;
    let v = serde_json::json!({
        "device": format!("{dev:?}"),
        "dtype": a.model.dtype,
        "mode": mode,
        "captures": captures,
        "replays": replays,
        "tolerance": tol,
        "first_call": {"same_ids": before.0, "max_logprob_diff": before.1, "max_probe_diff": before.2},
        "replayed_call": {"same_ids": replayed.0, "max_logprob_diff": replayed.1, "max_probe_diff": replayed.2},
        "after_weight_update": {"same_ids": after.0, "max_logprob_diff": after.1, "max_probe_diff": after.2, "weights_changed_the_samples": moved},
        "ok": ok(before) && ok(replayed) && ok(after) && (dev == Device::Cpu || replays > 0),
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let (dev, kind) = a.model.device()?;
    let model = Llama::load(&a.model.model, dev, kind)?;
    let tok = Tokenizer::load(&a.model.model).with_context(|| format!("tokenizer in {}", a.model.model.display()))?;
    let prompts: Vec<Vec<i64>> = serde_json::from_slice(&std::fs::read(&a.prompts)?)?;
    let batch = PaddedBatch::right_padded(&prompts, 0, dev)?;
    let logits = tch::no_grad(|| -> Result<Tensor> {
        let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?;
        Ok(model.logits(&h)?.to_kind(Kind::Float).to_device(Device::Cpu))
    })?;
    weights::save_tensors(&a.out_logits, [("logits", &logits)])?;
    // Two slots for all prompts: continuous batching with refills on this device.
    let reqs: Vec<GenRequest> =
        prompts.iter().enumerate().map(|(i, p)| GenRequest { prompt_ids: p.clone(), seed: i as u64 }).collect();
    let cfg = SamplingConfig { max_batch: 2, ..SamplingConfig::greedy(a.max_new_tokens) };
    let (out, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg)?;
    let v = serde_json::json!({
        "ids": out.iter().map(|c| &c.completion_ids).collect::<Vec<_>>(),
        "logprobs": out.iter().map(|c| &c.logprobs).collect::<Vec<_>>(),
        "refills": stats.refills,
        "device_to_host": stats.device_to_host,
        "steps": stats.steps,
    });
    std::fs::write(&a.out_greedy, v.to_string())?;
    Ok(())
}

/// Deterministic synthetic groups: `n` LSP-Zero groups of `g` answers with fixed ids, rewards
/// and log-probs, so that two devices train on exactly the same input.
fn synthetic_groups(vocab: i64, n: usize, g: usize, prompt_len: usize, completion_len: usize) -> Vec<RolloutGroup> {
    let mut rng = SplitMix64::new(42);
    let mut ids =
        |len: usize| -> Vec<i64> { (0..len).map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as i64).collect() };
    let seq = |p: Vec<i64>, c: Vec<i64>| {
        let n = c.len();
        // Behaviour and reference log-probs near a real model's (uniform-ish), identical on
        // both devices.
        let lp: Vec<f32> = (0..n).map(|t| -((vocab as f32).ln()) + 0.01 * (t % 7) as f32).collect();
        SequenceData {
            prompt_ids: p,
            completion_ids: c,
            behaviour_logprobs: lp.clone(),
            ref_logprobs: lp,
            text: String::new(),
        }
    };
    (0..n)
        .map(|u| {
            let query = ids(completion_len.min(32).max(1));
            let challenger = seq(ids(prompt_len.max(1)), query.clone());
            let answers = (0..g)
                .map(|j| AnswerData {
                    sequence: seq([ids(prompt_len.max(1) / 2), query.clone()].concat(), ids(completion_len.max(1))),
                    reward: ((u * g + j) % 5) as f32 / 4.0,
                    self_reward: 0.0,
                    self_reward_parsed: true,
                })
                .collect();
            RolloutGroup {
                unit_id: format!("synthetic-{u}"),
                step: 0,
                weights_version: 0,
                actor_id: "device-check".into(),
                challenger: Some(challenger),
                answers,
                play_seconds: 0.0,
                epoch: 0,
            }
        })
        .collect()
}

fn trainer(m: &ModelArgs, g: usize, n: usize, grad_accum: usize, lr: f64) -> Result<Trainer> {
    let (dev, kind) = m.device()?;
    let policy = Policy::load(&m.model, dev, kind)?;
    let toml = format!(
        "[run]\nseed = 0\n[model]\npath = {:?}\ndevice = {:?}\ndtype = {:?}\n[game]\nmode = \"lsp-zero\"\n\
         queries_per_step = {n}\ngroup_size = {g}\n[reward]\nkind = \"none\"\n[optim]\nlr = {lr}\ngrad_accum = {grad_accum}\n",
        m.model.to_string_lossy(),
        m.device,
        m.dtype
    );
    let cfg = Config::from_toml_str(&toml, &[])?;
    Ok(Trainer::new(policy, cfg)?)
}

fn train_step(a: TrainStepArgs) -> Result<()> {
    let mut t = trainer(&a.model, 2, 3, 1, 1e-3)?;
    let vocab = t.policy.model.config().vocab_size;
    let groups = synthetic_groups(vocab, 3, 2, 12, 10);
    let stats = t.train_step(&groups)?;
    std::fs::create_dir_all(&a.out)?;
    let cpu: Vec<(String, Tensor)> = t
        .policy
        .model
        .parameters()
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().to_kind(Kind::Float).to_device(Device::Cpu)))
        .collect();
    weights::save_tensors(&a.out.join("model.safetensors"), cpu.iter().map(|(n, p)| (n.as_str(), p)))?;
    std::fs::write(a.out.join("stats.json"), serde_json::to_string(&stats)?)?;
    Ok(())
}

fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Memory bandwidth in TB/s of the cards whose figures are published, from the name that
/// nvidia-smi or torch.cuda.get_device_name gives ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
/// "NVIDIA H200", "NVIDIA A100-SXM4-80GB", ...). None for any other card (H100 NVL included).
pub fn hbm_tb_s(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    if n.contains("H200") {
        Some(4.8)
    } else if n.contains("H100") {
        if n.contains("PCIE") {
            Some(2.0)
        } else if n.contains("NVL") {
            None
        } else {
            Some(3.35) // SXM: "H100 80GB HBM3", "H100 SXM5 80GB"
        }
    } else if n.contains("A100") {
        if n.contains("80GB") {
            Some(2.0)
        } else if n.contains("40GB") {
            Some(1.55)
        } else {
            None
        }
    } else {
        None
    }
}

/// What one decoding step must read from device memory at least: every weight the step
/// multiplies by (an untied embedding table is only gathered, a few rows), and the keys and
/// values of each row up to its position. `span` is the mean number of cached positions a step
/// attends over.
pub fn decode_bytes_per_step(model: &Llama, batch: usize, span: f64) -> (f64, f64) {
    let cfg = model.config();
    let elt = model.kind().elt_size_in_bytes() as f64;
    let gathered: i64 = if cfg.tie_word_embeddings {
        0
    } else {
        model
            .parameters()
            .iter()
            .filter(|(n, _)| n.ends_with("embed_tokens.weight"))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    };
    let weights = (model.num_parameters() - gathered) as f64 * elt;
    let kv_per_position = 2.0 * (cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim) as f64 * elt;
    (weights, batch as f64 * span * kv_per_position)
}

/// The kernel `scaled_dot_product_attention` picks for the shapes of the model's attention
/// calls: a decode step (one query per row over `span` cached keys, under the slot cache's
/// boolean mask; grouped-query heads folded into the query length as `model::attention` does)
/// and a prefill (causal, no mask).
fn attention_kernels(model: &Llama, batch: i64, prompt_len: i64, span: i64) -> (String, String) {
    let cfg = model.config();
    let (dev, kind) = (model.device(), model.kind());
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let group = nh / nkv;
    let name = |r: selfplay_torch_ext::Result<&'static str>| match r {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    tch::no_grad(|| {
        let k = Tensor::zeros([batch, nkv, span, hd], (kind, dev));
        let decode = if group > 1 {
            let q = Tensor::zeros([batch, nkv, group, hd], (kind, dev));
            let m = Tensor::ones([batch, 1, group, span], (Kind::Bool, dev));
            name(selfplay_torch_ext::sdp_backend(&q, &k, &k, Some(&m), false, false))
        } else {
            let q = Tensor::zeros([batch, nh, 1, hd], (kind, dev));
            let m = Tensor::ones([batch, 1, 1, span], (Kind::Bool, dev));
            name(selfplay_torch_ext::sdp_backend(&q, &k, &k, Some(&m), false, false))
        };
        let q = Tensor::zeros([batch, nh, prompt_len, hd], (kind, dev));
        let kp = Tensor::zeros([batch, nkv, prompt_len, hd], (kind, dev));
        let prefill = name(selfplay_torch_ext::sdp_backend(&q, &kp, &kp, None, true, group > 1));
        (decode, prefill)
    })
}

fn decode(a: DecodeArgs) -> Result<()> {
    let (dev, kind) = a.model.device()?;
    let t0 = Instant::now();
    let model = Llama::load(&a.model.model, dev, kind)?;
    let tok = Tokenizer::load(&a.model.model).with_context(|| format!("tokenizer in {}", a.model.model.display()))?;
    eprintln!("loaded {} parameters in {:.1} s", model.num_parameters(), t0.elapsed().as_secs_f64());
    if a.new_tokens < 2 {
        bail!("--new-tokens must be at least 2 (decode is timed as the call minus its prefill)");
    }
    let bandwidth = a.hbm_tb_s.or_else(|| a.device_name.as_deref().and_then(hbm_tb_s));
    let vocab = model.config().vocab_size;
    let mut rng = SplitMix64::new(7);
    for &b in &a.batch {
        if b == 0 {
            bail!("batch sizes must be >= 1");
        }
        let reqs: Vec<GenRequest> = (0..b)
            .map(|i| GenRequest {
                prompt_ids: (0..a.prompt_len).map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as i64).collect(),
                seed: i as u64,
            })
            .collect();
        // Warm-up (allocator, kernels), then the timed calls: the fastest of `repeats`.
        let warm = SamplingConfig { temperature: 1.0, ..SamplingConfig::greedy(8) };
        Generator::new(&model, &tok, &[]).run(&reqs, &warm)?;
        sync(dev);
        let timed = |new_tokens: i64| -> Result<(f64, usize, GenStats)> {
            let cfg = SamplingConfig { temperature: 1.0, ..SamplingConfig::greedy(new_tokens) };
            let mut best: Option<(f64, usize, GenStats)> = None;
            for _ in 0..a.repeats.max(1) {
                let t = Instant::now();
                let (out, stats) = Generator::new(&model, &tok, &[]).run(&reqs, &cfg)?;
                sync(dev);
                let secs = t.elapsed().as_secs_f64();
                let tokens: usize = out.iter().map(|c| c.completion_ids.len()).sum();
                if best.as_ref().is_none_or(|(s, _, _)| secs < *s) {
                    best = Some((secs, tokens, stats));
                }
            }
            Ok(best.expect("at least one repeat"))
        };
        // Prefill alone: the same call with one new token (the prefill, its sampling and the
        // read of the first ids). Decode is the rest of the whole call, per added step.
        let (prefill_secs, _, prefill_stats) = timed(1)?;
        let (secs, tokens, stats) = timed(a.new_tokens)?;
        let decode_steps = stats.steps.saturating_sub(prefill_stats.steps);
        let decode_secs = secs - prefill_secs;
        let decode_ms = (decode_steps > 0 && decode_secs > 0.0).then(|| 1e3 * decode_secs / decode_steps as f64);
        let decode_tokens = tokens.saturating_sub(b) as f64;
        // Decode step j (j = 2..=n) attends over prompt + j - 1 positions: prompt + n/2 on average.
        let span = a.prompt_len as f64 + a.new_tokens as f64 / 2.0;
        let (weight_bytes, kv_bytes) = decode_bytes_per_step(&model, b, span);
        let floor_ms = bandwidth.map(|bw| (weight_bytes + kv_bytes) / (bw * 1e12) * 1e3);
        // The slot cache's span at the middle of the call (rounded as the generator rounds it).
        let mid_span = ((span.ceil() as i64 + 63) / 64 * 64).max(64);
        let (kernel, prefill_kernel) = attention_kernels(&model, b as i64, a.prompt_len as i64, mid_span);
        println!(
            "{}",
            serde_json::json!({
                "what": "decode", "device": a.model.device, "dtype": a.model.dtype, "batch": b,
                "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats.max(1),
                // The whole call (prefill, decode, the first token's sampling): as before.
                "seconds": secs, "tokens_per_s": tokens as f64 / secs,
                "ms_per_step": 1e3 * secs / stats.steps.max(1) as f64,
                "device_to_host_per_step": stats.device_to_host as f64 / stats.steps.max(1) as f64,
                "prefills": stats.prefills, "refills": stats.refills, "steps": stats.steps,
                // Prefill alone, and decode only (the call minus its prefill).
                "prefill_ms": 1e3 * prefill_secs,
                "decode_steps": decode_steps,
                "decode_ms_per_step": decode_ms,
                "decode_tokens_per_s": decode_ms.map(|ms| b as f64 * 1e3 / ms),
                "decode_tokens": decode_tokens,
                "attention_kernel": kernel,
                "attention_kernel_prefill": prefill_kernel,
                "attention_kernel_source": format!(
                    "_fused_sdp_choice on the decode step's shapes (span {mid_span}, grouped heads in the query length, bool mask) and the prefill's (causal, no mask)"),
                // The HBM floor: what a step must read, at the card's bandwidth.
                "device_name": a.device_name,
                "hbm_tb_s": bandwidth,
                "weight_bytes_per_step": weight_bytes,
                "kv_bytes_per_step": kv_bytes,
                "mean_span": span,
                "hbm_floor_ms_per_step": floor_ms,
                "hbm_floor_share": floor_ms.zip(decode_ms).map(|(f, d)| f / d),
            })
        );
    }
    Ok(())
}

fn learner_step(a: LearnerStepArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut t = trainer(&a.model, a.group_size, a.groups, a.grad_accum, 1e-6)?;
    eprintln!("trainer ready in {:.1} s", t0.elapsed().as_secs_f64());
    let dev = t.policy.model.device();
    let vocab = t.policy.model.config().vocab_size;
    let groups = synthetic_groups(vocab, a.groups, a.group_size, a.prompt_len, a.completion_len);
    let tokens: usize = groups
        .iter()
        .flat_map(|g| g.challenger.iter().chain(g.answers.iter().map(|x| &x.sequence)))
        .map(|s| s.prompt_ids.len() + s.completion_ids.len())
        .sum();
    for i in 0..a.steps + 1 {
        let t1 = Instant::now();
        let stats = t.train_step(&groups)?;
        sync(dev);
        let secs = t1.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "what": "learner_step", "device": a.model.device, "dtype": a.model.dtype, "warmup": i == 0,
                "groups": a.groups, "group_size": a.group_size, "grad_accum": a.grad_accum,
                "tokens": tokens, "seconds": secs, "tokens_per_s": tokens as f64 / secs,
                "loss": stats.loss, "grad_norm": stats.grad_norm, "skipped": stats.skipped,
            })
        );
    }
    // Keep the scoring path honest too: a no-grad forward over the same sequences.
    let pairs: Vec<(Vec<i64>, Vec<i64>)> = groups
        .iter()
        .flat_map(|g| g.answers.iter().map(|x| (x.sequence.prompt_ids.clone(), x.sequence.completion_ids.clone())))
        .take(8)
        .collect();
    let lp = tch::no_grad(|| selfplay_policy::scoring::Scorer::new(&t.policy.model).score(&pairs))?;
    if !bool::try_from(lp.logprobs.isfinite().all())? {
        bail!("non-finite log-probs after the learner steps");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::hbm_tb_s;

    #[test]
    fn bandwidth_by_card_name() {
        // Names as nvidia-smi and torch.cuda.get_device_name give them.
        assert_eq!(hbm_tb_s("NVIDIA H100 80GB HBM3"), Some(3.35));
        assert_eq!(hbm_tb_s("NVIDIA H100 PCIe"), Some(2.0));
        assert_eq!(hbm_tb_s("NVIDIA H200"), Some(4.8));
        assert_eq!(hbm_tb_s("NVIDIA A100-SXM4-80GB"), Some(2.0));
        assert_eq!(hbm_tb_s("NVIDIA A100-PCIE-40GB"), Some(1.55));
        assert_eq!(hbm_tb_s("NVIDIA H100 NVL"), None);
        assert_eq!(hbm_tb_s("NVIDIA L4"), None);
        assert_eq!(hbm_tb_s(""), None);
    }
}
