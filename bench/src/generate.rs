//! `selfplay bench generate|score`: generation and training-side scoring throughput, printed
//! as JSON so that scripts/bench.sh can put them beside transformers' figures.
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use selfplay_policy::{GenRequest, Generator, Grad, SamplingConfig, Scorer};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// AlpacaEval-style JSON (a list of objects with "instruction").
    #[arg(long, env = "SELFPLAY_BENCH_PROMPTS")]
    pub prompts: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: i64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

fn load_prompts(path: &PathBuf, n: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let out: Vec<String> =
        rows.iter().filter_map(|r| r.get("instruction").and_then(|i| i.as_str()).map(str::to_string)).take(n).collect();
    if out.len() < n {
        bail!("{} has {} prompts, need {n}", path.display(), out.len());
    }
    Ok(out)
}

fn report(name: &str, a: &BenchGenerateArgs, tokens: usize, secs: &[f64], extra: serde_json::Value) {
    let best = secs.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = secs.iter().sum::<f64>() / secs.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": name, "impl": "selfplay", "batch": a.batch, "max_new_tokens": a.max_new_tokens,
            "dtype": a.model.dtype, "device": a.model.device,
            "threads": tch::get_num_threads(), "tokens": tokens,
            "secs_mean": mean, "secs_best": best, "tokens_per_s": tokens as f64 / mean, "extra": extra,
        })
    );
}

pub fn bench_generate(a: BenchGenerateArgs) -> Result<()> {
    let policy = a.model.load()?;
    let prompts: Vec<Vec<i64>> =
        load_prompts(&a.prompts, a.batch)?.iter().map(|p| policy.user_prompt(p)).collect::<Result<_, _>>()?;
    let mut secs = vec![];
    let mut tokens = 0;
    for i in 0..a.warmup + a.repeats {
        let cfg = SamplingConfig {
            temperature: a.temperature,
            max_new_tokens: a.max_new_tokens,
            seed: i as u64,
            ..Default::default()
        };
        let t0 = Instant::now();
        let out = Generator::new(&policy.model, &policy.tokenizer, &[])
            .run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg)?
            .0;
        if i >= a.warmup {
            secs.push(t0.elapsed().as_secs_f64());
            tokens = out.iter().map(|c| c.completion_ids.len()).sum();
        }
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    report("generate", &a, tokens, &secs, serde_json::json!({"prompt_tokens": prompt_tokens}));
    Ok(())
}

pub fn bench_score(a: BenchGenerateArgs) -> Result<()> {
    let mut policy = a.model.load()?;
    let prompts: Vec<Vec<i64>> =
        load_prompts(&a.prompts, a.batch)?.iter().map(|p| policy.user_prompt(p)).collect::<Result<_, _>>()?;
    // Fixed pseudo-random completions: the work depends on lengths, not on which tokens.
    let vocab = policy.model.config().vocab_size;
    let mut rng = selfplay_policy::generate::SplitMix64::new(7);
    let pairs: Vec<(Vec<i64>, Vec<i64>)> = prompts
        .into_iter()
        .map(|p| {
            let c = (0..a.max_new_tokens).map(|_| (rng.next_u64() % vocab as u64) as i64).collect();
            (p, c)
        })
        .collect();
    policy.model.set_requires_grad(true);
    let tokens: usize = pairs.iter().map(|(p, c)| p.len() + c.len()).sum();
    let prompt_tokens: usize = pairs.iter().map(|(p, _)| p.len()).sum();
    let mut secs = vec![];
    for i in 0..a.warmup + a.repeats {
        let t0 = Instant::now();
        let lp = Scorer::new(&policy.model).grad(Grad::Graph).score(&pairs)?;
        let loss = -(lp.logprobs.sum(tch::Kind::Float));
        loss.backward();
        for (_, p) in policy.model.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        // CUDA runs asynchronously: wait for the backward pass before reading the clock.
        if let tch::Device::Cuda(d) = policy.model.device() {
            tch::Cuda::synchronize(d as i64);
        }
        if i >= a.warmup {
            secs.push(t0.elapsed().as_secs_f64());
        }
    }
    report("score_fwd_bwd", &a, tokens, &secs, serde_json::json!({"prompt_tokens": prompt_tokens}));
    Ok(())
}
