//! `selfplay eval`: win rate of a model against a baseline on a prompt set, judged by a reward
//! model or a judge LM; prints the table and writes results.json and winrate.png.
use anyhow::{Context, Result};
use selfplay_eval::{CiMethod, EvalConfig, JudgeSpec, ProgressMode};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model A: the model whose win rate is reported (a Hugging Face directory, or a Hub id
    /// org/name at main).
    #[arg(long)]
    pub model: PathBuf,
    /// Model B: the baseline (for LSP, the base model); a directory or a Hub id at main.
    #[arg(long)]
    pub baseline: PathBuf,
    /// Prompt file: AlpacaEval JSON (subsets from "dataset"), or JSON/JSONL questions (first turn).
    #[arg(long)]
    pub prompts: PathBuf,
    /// reward-model:DIR (higher score wins) or judge-lm:DIR (pairwise "A or B", both orders);
    /// DIR may be a Hub id (org/name, at main).
    #[arg(long)]
    pub judge: String,
    /// Evaluate only N prompts: the first N, or with --stratified a fixed sample.
    #[arg(long)]
    pub limit: Option<usize>,
    /// With --limit: a seeded sample spread over the subsets in proportion (at least one each).
    #[arg(long)]
    pub stratified: bool,
    /// Seeds the sample, the sampling and the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature (0 = greedy; the paper evaluates at 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: i64,
    /// Prompts per generation batch and pairs per judge batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Confidence intervals: wilson or bootstrap (both over prompts, ties count half).
    #[arg(long, default_value = "wilson")]
    pub ci: CiMethod,
    /// Ask the judge about pairs whose answers are the same text too (default: a tie).
    #[arg(long)]
    pub judge_identical: bool,
    /// How a judge LM's two orders make a verdict: both-orders (a win needs both, a verdict
    /// that flips is a tie) or calibrated (the log-odds summed over both orders decide).
    #[arg(long, default_value = "both-orders")]
    pub pairwise_rule: selfplay_eval::judge::PairwiseRule,
    /// Also measure a rule reward on both models' answers: a selfplay config file whose
    /// `reward.rules` give each answer's score; an answer passes with the highest possible
    /// score. Reports both pass rates with 95% Wilson intervals and their paired difference.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Where results.json and winrate.png go.
    #[arg(long)]
    pub out: PathBuf,
    /// Answer cache (default: ~/.cache/selfplay/eval-cache).
    #[arg(long, env = "SELFPLAY_EVAL_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// auto (cuda:0 when available, else cpu), cpu, cuda or cuda:N.
    #[arg(long, env = "SELFPLAY_DEVICE", default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16 (models and judge).
    #[arg(long, env = "SELFPLAY_DTYPE", default_value = "auto")]
    pub dtype: String,
}

fn default_cache_dir() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/selfplay/eval-cache")
}

pub fn run(args: EvalArgs) -> Result<()> {
    let judge = match args.judge.parse()? {
        JudgeSpec::RewardModel(d) => JudgeSpec::RewardModel(selfplay_hub::resolve(&d, "").context("--judge")?),
        JudgeSpec::JudgeLm(d) => JudgeSpec::JudgeLm(selfplay_hub::resolve(&d, "").context("--judge")?),
    };
    let device = selfplay_policy::parse_device(&args.device)?;
    let kind = selfplay_policy::parse_kind_on(&args.dtype, device)?;
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let model = selfplay_hub::resolve(&args.model, "").context("--model")?;
    let baseline = selfplay_hub::resolve(&args.baseline, "").context("--baseline")?;
    let mut cfg = EvalConfig::new(&model, &baseline, &args.prompts, judge, &args.out, &cache_dir);
    cfg.limit = args.limit;
    cfg.stratified = args.stratified;
    cfg.seed = args.seed;
    cfg.temperature = args.temperature;
    cfg.top_p = args.top_p;
    cfg.top_k = args.top_k;
    cfg.max_new_tokens = args.max_new_tokens;
    cfg.batch = args.batch;
    cfg.ci = args.ci;
    cfg.judge_identical = args.judge_identical;
    cfg.pairwise_rule = args.pairwise_rule;
    cfg.rules = args.rules.clone();
    cfg.device = device;
    cfg.kind = kind;
    cfg.progress = ProgressMode::Auto;
    tracing::info!(?device, ?kind, cache = %cache_dir.display(), "eval");
    let report = selfplay_eval::evaluate(&cfg)?;
    print!("{}", selfplay_eval::format_table(&report));
    println!(
        "wrote {} and {}",
        args.out.join(selfplay_eval::RESULTS_FILE).display(),
        args.out.join(selfplay_eval::CHART_FILE).display()
    );
    Ok(())
}
