//! `selfplay bench batching`: continuous against static batching on one sampled workload.
//! Both runs generate the same requests (same prompts, same per-request seeds, EOS on, so the
//! lengths are mixed) with at most --batch rows at once: static batching runs them in fixed
//! batches that wait for their longest row; continuous batching refills a finished row at once.
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use selfplay_policy::generate::{GenRequest, GenStats, Generator};
use selfplay_policy::SamplingConfig;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BatchingArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// AlpacaEval-style JSON (a list of objects with "instruction").
    #[arg(long, env = "SELFPLAY_BENCH_PROMPTS")]
    pub prompts: PathBuf,
    /// Requests in the workload.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Rows decoding at once.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 192)]
    pub max_new_tokens: i64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
}

pub fn run(a: BatchingArgs) -> Result<()> {
    if a.batch == 0 || a.requests == 0 {
        bail!("--batch and --requests must be >= 1");
    }
    let policy = a.model.load()?;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(&a.prompts).with_context(|| format!("reading {}", a.prompts.display()))?,
    )?;
    let reqs: Vec<GenRequest> = rows
        .iter()
        .filter_map(|r| r.get("instruction").and_then(|i| i.as_str()))
        .take(a.requests)
        .enumerate()
        .map(|(i, p)| Ok(GenRequest { prompt_ids: policy.user_prompt(p)?, seed: 1000 + i as u64 }))
        .collect::<Result<_>>()?;
    if reqs.len() < a.requests {
        bail!("{} has only {} prompts", a.prompts.display(), reqs.len());
    }
    let cfg = SamplingConfig { temperature: a.temperature, max_new_tokens: a.max_new_tokens, ..Default::default() };
    let eos = &policy.eos_ids;
    let report = |mode: &str, secs: f64, tokens: usize, stats: &GenStats| {
        let fill = stats.active_row_steps as f64 / stats.slot_steps.max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "what": "batching", "mode": mode, "batch": a.batch, "requests": reqs.len(),
                "max_new_tokens": a.max_new_tokens, "seconds": secs, "tokens": tokens,
                "tokens_per_s": tokens as f64 / secs, "batch_fill": fill, "steps": stats.steps,
            })
        );
        tokens as f64 / secs
    };
    // Static: fixed batches, each decoding until its longest row ends.
    let t0 = Instant::now();
    let mut tokens = 0;
    let mut total = GenStats::default();
    for chunk in reqs.chunks(a.batch) {
        let (out, s) = Generator::new(&policy.model, &policy.tokenizer, eos).run(chunk, &cfg)?;
        tokens += out.iter().map(|c| c.completion_ids.len()).sum::<usize>();
        total.steps += s.steps;
        total.active_row_steps += s.active_row_steps;
        total.slot_steps += s.slot_steps;
    }
    let static_rate = report("static", t0.elapsed().as_secs_f64(), tokens, &total);
    // Continuous: the same requests, --batch slots, refilled as rows finish.
    let t0 = Instant::now();
    let cont = SamplingConfig { max_batch: a.batch, ..cfg.clone() };
    let (out, s) = Generator::new(&policy.model, &policy.tokenizer, eos).run(&reqs, &cont)?;
    let tokens_c: usize = out.iter().map(|c| c.completion_ids.len()).sum();
    let cont_rate = report("continuous", t0.elapsed().as_secs_f64(), tokens_c, &s);
    println!(
        "{}",
        serde_json::json!({"what": "batching_speedup", "continuous_over_static": cont_rate / static_rate,
                           "same_tokens": tokens == tokens_c})
    );
    Ok(())
}
