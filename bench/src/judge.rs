//! `selfplay bench judge`: the two self-reward modes on the same SmolLM2 judgements: how often
//! `generate` (the paper's) parses, how well `expected` agrees with it, and how much faster it is.
use crate::ModelArgs;
use anyhow::Result;
use selfplay_game::config::SelfRewardMode;
use selfplay_game::judge::Judge;
use selfplay_game::prompts::DEFAULT_JUDGE_PROMPT;
use selfplay_policy::SamplingConfig;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchJudgeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// AlpacaEval-style JSON: the instructions to answer and judge.
    #[arg(long, env = "SELFPLAY_BENCH_PROMPTS")]
    pub prompts: PathBuf,
    /// Number of (instruction, answer) pairs.
    #[arg(long, default_value_t = 32)]
    pub pairs: usize,
    #[arg(long, default_value_t = 64)]
    pub answer_tokens: i64,
    #[arg(long, default_value_t = 160)]
    pub judge_tokens: i64,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt())
}

pub fn run(a: BenchJudgeArgs) -> Result<()> {
    let policy = a.model.load()?;
    let rows = selfplay_game::data::load_prompt_rows(&a.prompts)?;
    let queries: Vec<String> = rows.into_iter().map(|r| r.prompt).take(a.pairs).collect();
    // Answers sampled by the model itself, as the solver would.
    let mut pairs = vec![];
    for (i, chunk) in queries.chunks(a.batch).enumerate() {
        let prompts = chunk.iter().map(|q| policy.user_prompt(q)).collect::<Result<Vec<_>, _>>()?;
        let cfg = SamplingConfig { max_new_tokens: a.answer_tokens, seed: i as u64, ..Default::default() };
        for (q, c) in chunk.iter().zip(policy.generate(&prompts, &cfg)?) {
            pairs.push((q.clone(), c.text));
        }
    }
    let judge = |mode| -> Result<(Vec<Option<f64>>, f64)> {
        let j = Judge::new(&policy, DEFAULT_JUDGE_PROMPT.to_string(), mode, a.judge_tokens)?;
        let t0 = Instant::now();
        let mut out = vec![];
        for chunk in pairs.chunks(a.batch) {
            out.extend(j.judge(&policy, chunk)?.into_iter().map(|x| x.score));
        }
        Ok((out, t0.elapsed().as_secs_f64()))
    };
    let (gen, gen_s) = judge(SelfRewardMode::Generate)?;
    let (exp, exp_s) = judge(SelfRewardMode::Expected)?;
    let both: Vec<(f64, f64)> = gen.iter().zip(&exp).filter_map(|(g, e)| Some(((*g)?, (*e)?))).collect();
    let parsed = both.len();
    let within1 = both.iter().filter(|(g, e)| (g - e).abs() <= 1.0).count();
    let exact = both.iter().filter(|(g, e)| (g - e.round()).abs() < 0.5).count();
    let (gs, es): (Vec<f64>, Vec<f64>) = both.iter().cloned().unzip();
    println!(
        "{}",
        serde_json::json!({
            "bench": "judge", "pairs": pairs.len(), "generate_parsed": parsed,
            "generate_parse_rate": parsed as f64 / pairs.len() as f64,
            "agree_within_1": if parsed > 0 { within1 as f64 / parsed as f64 } else { f64::NAN },
            "agree_exact_rounded": if parsed > 0 { exact as f64 / parsed as f64 } else { f64::NAN },
            "pearson": if parsed > 2 { pearson(&gs, &es) } else { f64::NAN },
            "generate_mean": if parsed > 0 { gs.iter().sum::<f64>() / parsed as f64 } else { f64::NAN },
            "expected_mean_all": exp.iter().flatten().sum::<f64>() / exp.len().max(1) as f64,
            "generate_seconds_per_pair": gen_s / pairs.len() as f64,
            "expected_seconds_per_pair": exp_s / pairs.len() as f64,
            "speedup": gen_s / exp_s,
        })
    );
    Ok(())
}
