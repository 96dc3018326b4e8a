//! `selfplay device-check`: the pieces scripts/gpu_check.sh runs on an accelerator, each a
//! small command that writes its result as JSON (or safetensors) for the script to compare
//! against the CPU and transformers. They need only a model directory, so the check can run
//! with nothing but the binary and a Python that makes random models.
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use selfplay_game::rollout::{AnswerData, RolloutGroup, SequenceData};
use selfplay_game::trainer::Trainer;
use selfplay_game::Config;
use selfplay_policy::generate::{generate_requests_stats, GenRequest, SplitMix64};
use selfplay_policy::model::{Llama, PaddedBatch};
use selfplay_policy::{parse_device, parse_kind_on, scoring, weights, Policy, SamplingConfig, Tokenizer};
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
    /// Decoding throughput at several batch sizes on random prompts (greedy, no EOS).
    Decode(DecodeArgs),
    /// Learner step throughput on synthetic groups.
    LearnerStep(LearnerStepArgs),
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
    let (out, stats) = generate_requests_stats(&model, &tok, &reqs, &cfg, &[])?;
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

fn decode(a: DecodeArgs) -> Result<()> {
    let (dev, kind) = a.model.device()?;
    let t0 = Instant::now();
    let model = Llama::load(&a.model.model, dev, kind)?;
    let tok = Tokenizer::load(&a.model.model).with_context(|| format!("tokenizer in {}", a.model.model.display()))?;
    eprintln!("loaded {} parameters in {:.1} s", model.num_parameters(), t0.elapsed().as_secs_f64());
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
        // Warm-up (allocator, kernels), then one timed call.
        let warm = SamplingConfig { temperature: 1.0, ..SamplingConfig::greedy(8) };
        generate_requests_stats(&model, &tok, &reqs, &warm, &[])?;
        sync(dev);
        let cfg = SamplingConfig { temperature: 1.0, ..SamplingConfig::greedy(a.new_tokens) };
        let t = Instant::now();
        let (out, stats) = generate_requests_stats(&model, &tok, &reqs, &cfg, &[])?;
        sync(dev);
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|c| c.completion_ids.len()).sum();
        println!(
            "{}",
            serde_json::json!({
                "what": "decode", "device": a.model.device, "dtype": a.model.dtype, "batch": b,
                "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "seconds": secs,
                "tokens_per_s": tokens as f64 / secs, "ms_per_step": 1e3 * secs / stats.steps.max(1) as f64,
                "device_to_host_per_step": stats.device_to_host as f64 / stats.steps.max(1) as f64,
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
    let lp = tch::no_grad(|| scoring::completion_logprobs(&t.policy.model, &pairs, false))?;
    if !bool::try_from(lp.logprobs.isfinite().all())? {
        bail!("non-finite log-probs after the learner steps");
    }
    Ok(())
}
