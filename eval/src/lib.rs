//! Evaluation of a model against a baseline, the way the Language Self-Play paper reports it:
//! both answer the same prompts (AlpacaEval or any prompt file), a judge compares each pair,
//! and the win rate (ties count half) is reported overall and per subset with 95% confidence
//! intervals, as a table, `results.json` and `winrate.png`.
//!
//! Answers are cached on disk by (model checksum, prompt, sampling settings): a second run with
//! another judge, or the same run again, generates nothing. A prompt sample is fixed by
//! `--limit` and `--stratified` with a seed ([`sample::select`]).
pub mod cache;
pub mod checksum;
pub mod curves;
pub mod error;
pub mod judge;
pub mod plot;
pub mod progress;
pub mod rules;
pub mod sample;
pub mod stats;

pub use error::{EvalError, Result};
pub use judge::JudgeSpec;
pub use progress::ProgressMode;
pub use stats::{CiMethod, Outcome, Tally};

use cache::{AnswerCache, CachedAnswer, GenSettings};
use checksum::model_checksum;
use judge::{Detail, Judge, Pair, Verdict};
use progress::Progress;
use selfplay_game::data::load_prompt_rows;
use selfplay_policy::{ModelConfig, Policy, SamplingConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Model A: the one whose win rate is reported.
    pub model: PathBuf,
    /// Model B: the baseline.
    pub baseline: PathBuf,
    /// AlpacaEval JSON, or a JSON/JSONL prompt file (first turn).
    pub prompts: PathBuf,
    pub judge: JudgeSpec,
    /// Evaluate only this many prompts: the first N, or a stratified sample.
    pub limit: Option<usize>,
    pub stratified: bool,
    /// Seeds the stratified sample, the generation and the bootstrap.
    pub seed: u64,
    /// 0 = greedy; the paper evaluates at 0.01.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub max_new_tokens: i64,
    /// Prompts per generation batch, pairs per judge batch.
    pub batch: usize,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub device: Device,
    pub kind: Kind,
    pub ci: CiMethod,
    /// Ask the judge even when both answers are the same text (otherwise a tie, as in
    /// AlpacaEval).
    pub judge_identical: bool,
    /// How a judge LM's two orders become one verdict.
    pub pairwise_rule: judge::PairwiseRule,
    /// A selfplay config whose `reward.rules` are also measured on both models' answers.
    pub rules: Option<PathBuf>,
    pub progress: ProgressMode,
}

impl EvalConfig {
    /// The defaults of `selfplay eval`: every prompt, temperature 0.01, 256 new tokens, batch
    /// 8, Wilson intervals, f32 on the CPU.
    pub fn new(
        model: &Path,
        baseline: &Path,
        prompts: &Path,
        judge: JudgeSpec,
        out_dir: &Path,
        cache_dir: &Path,
    ) -> Self {
        EvalConfig {
            model: model.into(),
            baseline: baseline.into(),
            prompts: prompts.into(),
            judge,
            limit: None,
            stratified: false,
            seed: 0,
            temperature: 0.01,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            batch: 8,
            out_dir: out_dir.into(),
            cache_dir: cache_dir.into(),
            device: Device::Cpu,
            kind: Kind::Float,
            ci: CiMethod::Wilson,
            judge_identical: false,
            pairwise_rule: judge::PairwiseRule::default(),
            rules: None,
            progress: ProgressMode::Auto,
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self.kind {
            Kind::BFloat16 => "bf16",
            Kind::Half => "f16",
            _ => "f32",
        }
    }

    pub fn gen_settings(&self) -> GenSettings {
        GenSettings {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            stop: vec![],
            dtype: self.dtype_name().into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeInfo {
    pub kind: String,
    pub path: String,
    /// The pairwise prompt of a judge LM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// How a verdict is read.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptInfo {
    pub file: String,
    /// Prompts in the file.
    pub rows: usize,
    /// Prompts evaluated.
    pub evaluated: usize,
    pub limit: Option<usize>,
    pub stratified: bool,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CiInfo {
    pub method: CiMethod,
    pub level: f64,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetTally {
    pub subset: String,
    #[serde(flatten)]
    pub tally: Tally,
}

/// Work done by one run: what came from the cache and what had to be generated or judged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub model_generated: usize,
    pub model_cached: usize,
    pub baseline_generated: usize,
    pub baseline_cached: usize,
    /// Pairs put to the judge.
    pub judged: usize,
    /// Pairs with the same answer text on both sides (ties, unless --judge-identical).
    pub identical: usize,
    /// Judge-LM pairs where the preferred letter stayed the same in both orders (the judge's
    /// position bias): ties under the both-orders rule, decided by the margin when calibrated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_bias_ties: Option<usize>,
    /// Judge LM: the mean over judged pairs of its probability of preferring the model's
    /// answer, averaged over both orders (0.5 = no preference; a soft, bias-cancelled signal
    /// that moves even when the verdicts are all ties).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_preference: Option<f64>,
    pub generation_seconds: f64,
    pub judge_seconds: f64,
}

impl RunStats {
    pub fn generated(&self) -> usize {
        self.model_generated + self.baseline_generated
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// Row of the prompt file.
    pub index: usize,
    pub subset: String,
    pub prompt: String,
    pub model_answer: String,
    pub baseline_answer: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// With --rules: each answer's rule score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_rule_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_rule_score: Option<f64>,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: ModelInfo,
    pub baseline: ModelInfo,
    pub judge: JudgeInfo,
    pub prompts: PromptInfo,
    pub sampling: GenSettings,
    pub ci: CiInfo,
    pub overall: Tally,
    /// Per subset, by name; empty when the prompt file has no subsets.
    pub subsets: Vec<SubsetTally>,
    pub stats: RunStats,
    /// With --rules: both models' pass rates under the config's rule reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<rules::RuleReport>,
    pub pairs: Vec<PairRecord>,
}

pub const RESULTS_FILE: &str = "results.json";
pub const CHART_FILE: &str = "winrate.png";
/// The subset name of rows that have none, in a file where others do.
pub const NO_SUBSET: &str = "(none)";

/// Runs the evaluation, writes `results.json` and `winrate.png` into `cfg.out_dir`, and
/// returns the report.
pub fn evaluate(cfg: &EvalConfig) -> Result<EvalReport> {
    if cfg.batch == 0 {
        return Err(EvalError::Input("--batch must be at least 1".into()));
    }
    let settings = cfg.gen_settings();
    SamplingConfig {
        temperature: settings.temperature,
        top_p: settings.top_p,
        top_k: settings.top_k,
        max_new_tokens: settings.max_new_tokens,
        seed: settings.seed,
        stop: vec![],
        max_batch: 0,
    }
    .validate()?;
    // Cheap checks first: a bad judge, model or prompt file fails before any generation.
    cfg.judge.check()?;
    for (role, dir) in [("the model", &cfg.model), ("the baseline", &cfg.baseline)] {
        check_model_dir(role, dir)?;
    }
    let rows = load_prompt_rows(&cfg.prompts)?;
    let has_subsets = rows.iter().any(|r| !r.subset.is_empty());
    let subsets: Vec<String> = rows
        .iter()
        .map(|r| if r.subset.is_empty() && has_subsets { NO_SUBSET.to_string() } else { r.subset.clone() })
        .collect();
    let chosen = sample::select(&subsets, cfg.limit, cfg.stratified, cfg.seed)?;
    let prompts: Vec<&str> = chosen.iter().map(|&i| rows[i].prompt.as_str()).collect();
    let rules = match &cfg.rules {
        Some(file) => {
            let answers = rows.iter().filter_map(|r| Some((r.prompt.clone(), r.answer.clone()?))).collect();
            Some(rules::Rules::load(file, answers)?)
        }
        None => None,
    };
    tracing::info!(rows = rows.len(), evaluated = chosen.len(), "prompts");

    let memo = cfg.cache_dir.join("checksums.json");
    let sum_a = model_checksum(&cfg.model, &memo)?.checksum;
    let sum_b = model_checksum(&cfg.baseline, &memo)?.checksum;
    let cache = AnswerCache::new(&cfg.cache_dir);
    let mut stats = RunStats::default();
    let t0 = Instant::now();
    let (answers_a, gen_a, hit_a) = answers(cfg, "the model", &cfg.model, &sum_a, &prompts, &settings, &cache)?;
    let (answers_b, gen_b, hit_b) = answers(cfg, "the baseline", &cfg.baseline, &sum_b, &prompts, &settings, &cache)?;
    stats.generation_seconds = t0.elapsed().as_secs_f64();
    (stats.model_generated, stats.model_cached, stats.baseline_generated, stats.baseline_cached) =
        (gen_a, hit_a, gen_b, hit_b);

    // Judge the pairs whose answers differ (or all, with judge_identical).
    let t1 = Instant::now();
    let mut verdicts: Vec<Option<Verdict>> = vec![None; prompts.len()];
    let to_judge: Vec<usize> = (0..prompts.len())
        .filter(|&i| {
            let same = answers_a[i] == answers_b[i];
            stats.identical += same as usize;
            if same && !cfg.judge_identical {
                verdicts[i] = Some(Verdict { outcome: Outcome::Tie, detail: Detail::Identical });
                false
            } else {
                true
            }
        })
        .collect();
    let mut judge_prompt = None;
    if !to_judge.is_empty() {
        let mut judge = Judge::load(&cfg.judge, cfg.device, cfg.kind, cfg.batch)?;
        if let Judge::Lm(j) = &mut judge {
            j.set_rule(cfg.pairwise_rule);
            judge_prompt = Some(j.prompt().to_string());
        }
        let mut bar = Progress::new(cfg.progress, "judge", to_judge.len() as u64);
        for chunk in to_judge.chunks(cfg.batch) {
            let pairs: Vec<Pair> = chunk
                .iter()
                .map(|&i| Pair { instruction: prompts[i], model: &answers_a[i], baseline: &answers_b[i] })
                .collect();
            for (&i, v) in chunk.iter().zip(judge.judge(&pairs)?) {
                verdicts[i] = Some(v);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
    } else if matches!(cfg.judge, JudgeSpec::JudgeLm(_)) {
        judge_prompt = Some(judge::PAIRWISE_PROMPT.to_string());
    }
    stats.judged = to_judge.len();
    stats.judge_seconds = t1.elapsed().as_secs_f64();
    let verdicts: Vec<Verdict> = verdicts.into_iter().map(|v| v.expect("every pair has a verdict")).collect();
    if matches!(cfg.judge, JudgeSpec::JudgeLm(_)) {
        stats.position_bias_ties = Some(
            verdicts
                .iter()
                .filter(|v| match v.detail {
                    Detail::JudgeLm { p_model_first, p_model_second } => {
                        (p_model_first > 0.5) != (p_model_second > 0.5)
                    }
                    _ => false,
                })
                .count(),
        );
    }

    let prefs: Vec<f64> = verdicts
        .iter()
        .filter_map(|v| match v.detail {
            Detail::JudgeLm { p_model_first, p_model_second } => Some(0.5 * (p_model_first + p_model_second)),
            _ => None,
        })
        .collect();
    if !prefs.is_empty() {
        stats.mean_preference = Some(prefs.iter().sum::<f64>() / prefs.len() as f64);
    }

    let rule_scores = match &rules {
        Some(r) => {
            let score = |answers: &[String]| -> Result<Vec<(f64, bool)>> {
                prompts.iter().zip(answers).map(|(p, a)| r.score(p, a)).collect()
            };
            let (a, b) = (score(&answers_a)?, score(&answers_b)?);
            Some((rules::RuleReport::new(r, &a, &b), a, b))
        }
        None => None,
    };

    // Tallies.
    let outcomes: Vec<Outcome> = verdicts.iter().map(|v| v.outcome).collect();
    let overall = Tally::of(&outcomes, cfg.ci, cfg.seed);
    let mut by_subset: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
    if has_subsets {
        for (k, &i) in chosen.iter().enumerate() {
            by_subset.entry(subsets[i].as_str()).or_default().push(outcomes[k]);
        }
    }
    let subset_tallies: Vec<SubsetTally> = by_subset
        .into_iter()
        .map(|(name, o)| SubsetTally {
            subset: name.to_string(),
            tally: Tally::of(&o, cfg.ci, cfg.seed ^ sample::fnv1a(name.as_bytes())),
        })
        .collect();

    let report = EvalReport {
        model: ModelInfo { path: cfg.model.display().to_string(), checksum: sum_a },
        baseline: ModelInfo { path: cfg.baseline.display().to_string(), checksum: sum_b },
        judge: JudgeInfo {
            kind: cfg.judge.kind().into(),
            path: cfg.judge.dir().display().to_string(),
            prompt: judge_prompt,
            rule: match cfg.judge {
                JudgeSpec::RewardModel(_) => "higher reward-model score wins; equal scores tie".into(),
                JudgeSpec::JudgeLm(_) => cfg.pairwise_rule.describe().into(),
            },
        },
        prompts: PromptInfo {
            file: cfg.prompts.display().to_string(),
            rows: rows.len(),
            evaluated: chosen.len(),
            limit: cfg.limit,
            stratified: cfg.stratified,
            seed: cfg.seed,
        },
        sampling: settings,
        ci: CiInfo { method: cfg.ci, level: 0.95, description: cfg.ci.describe().into() },
        overall,
        subsets: subset_tallies,
        stats,
        rules: rule_scores.as_ref().map(|r| r.0.clone()),
        pairs: chosen
            .iter()
            .enumerate()
            .map(|(k, &i)| PairRecord {
                index: i,
                subset: rows[i].subset.clone(),
                prompt: rows[i].prompt.clone(),
                model_answer: answers_a[k].clone(),
                baseline_answer: answers_b[k].clone(),
                verdict: verdicts[k].clone(),
                model_rule_score: rule_scores.as_ref().map(|r| r.1[k].0),
                baseline_rule_score: rule_scores.as_ref().map(|r| r.2[k].0),
            })
            .collect(),
    };
    write_outputs(&report, &cfg.out_dir)?;
    Ok(report)
}

/// A model directory that cannot be a model fails here, before anything is generated.
fn check_model_dir(role: &'static str, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(EvalError::Input(format!("{role}: model directory {} not found", dir.display())));
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| EvalError::Load {
        role,
        path: dir.into(),
        cause: Box::new(e),
    })?;
    if !cfg.architecture.is_causal_lm() {
        return Err(EvalError::Input(format!(
            "{role}: {} is a {:?}, not a language model that can answer",
            dir.display(),
            cfg.architecture
        )));
    }
    checksum::weight_files(dir).map_err(|e| EvalError::Input(format!("{role}: {e}")))?;
    Ok(())
}

/// One answer per prompt from the model at `dir`: from the cache, else generated in batches
/// (and cached). Returns the answers, how many were generated and how many came cached.
fn answers(
    cfg: &EvalConfig,
    role: &'static str,
    dir: &Path,
    checksum: &str,
    prompts: &[&str],
    settings: &GenSettings,
    cache: &AnswerCache,
) -> Result<(Vec<String>, usize, usize)> {
    let mut out: Vec<Option<String>> =
        prompts.iter().map(|p| cache.get(checksum, p, settings).map(|a| a.text)).collect();
    let cached = out.iter().filter(|a| a.is_some()).count();
    // Each distinct missing prompt once.
    let mut missing: Vec<&str> = out.iter().zip(prompts).filter(|(a, _)| a.is_none()).map(|(_, p)| *p).collect();
    missing.sort_unstable();
    missing.dedup();
    let mut generated = 0;
    if !missing.is_empty() {
        let t0 = Instant::now();
        let policy = Policy::load(dir, cfg.device, cfg.kind).map_err(|e| EvalError::Load {
            role,
            path: dir.into(),
            cause: Box::new(e),
        })?;
        tracing::info!(model = %dir.display(), secs = t0.elapsed().as_secs_f64(), missing = missing.len(), cached, "generating");
        let encoded = missing.iter().map(|p| policy.user_prompt(p)).collect::<std::result::Result<Vec<_>, _>>()?;
        // Similar lengths in one batch: less padding.
        let mut order: Vec<usize> = (0..missing.len()).collect();
        order.sort_by_key(|&i| (encoded[i].len(), i));
        let label = if role == "the model" { "generate model" } else { "generate baseline" };
        let mut bar = Progress::new(cfg.progress, label, missing.len() as u64);
        let mut fresh: BTreeMap<&str, String> = BTreeMap::new();
        for chunk in order.chunks(cfg.batch) {
            // The batch's seed comes from its first prompt, so that a batch always samples
            // the same way whatever ran before it.
            let key = AnswerCache::key(checksum, missing[chunk[0]], settings);
            let seed = settings.seed ^ u64::from_str_radix(&key[..16], 16).unwrap_or(0);
            let sampling = SamplingConfig {
                temperature: settings.temperature,
                top_p: settings.top_p,
                top_k: settings.top_k,
                max_new_tokens: settings.max_new_tokens,
                seed,
                stop: settings.stop.clone(),
                max_batch: 0,
            };
            let ids: Vec<Vec<i64>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let completions = policy.generate(&ids, &sampling)?;
            for (&i, c) in chunk.iter().zip(completions) {
                cache.put(&CachedAnswer {
                    format: cache::CACHE_FORMAT,
                    model: checksum.to_string(),
                    prompt: missing[i].to_string(),
                    settings: settings.clone(),
                    text: c.text.clone(),
                    tokens: c.completion_ids.len(),
                    finish_reason: format!("{:?}", c.finish_reason).to_lowercase(),
                })?;
                fresh.insert(missing[i], c.text);
            }
            generated += chunk.len();
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
        for (a, p) in out.iter_mut().zip(prompts) {
            if a.is_none() {
                *a = fresh.get(p).cloned();
            }
        }
    }
    Ok((out.into_iter().map(|a| a.expect("every prompt has an answer")).collect(), generated, cached))
}

/// Writes `results.json` and `winrate.png` into `out_dir`.
pub fn write_outputs(report: &EvalReport, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(error::io_err(out_dir))?;
    let results = out_dir.join(RESULTS_FILE);
    std::fs::write(&results, serde_json::to_string_pretty(report)?).map_err(error::io_err(&results))?;
    let mut groups: Vec<(String, Tally)> = report.subsets.iter().map(|s| (s.subset.clone(), s.tally.clone())).collect();
    groups.push(("overall".into(), report.overall.clone()));
    let title = format!(
        "{} vs {} (judge: {})",
        short_name(&report.model.path),
        short_name(&report.baseline.path),
        report.judge.kind
    );
    plot::win_rate_chart(&out_dir.join(CHART_FILE), &title, &groups)
}

fn short_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_string())
}

/// The win-rate table: one row per subset, then all prompts.
pub fn format_table(report: &EvalReport) -> String {
    let mut s = String::new();
    s.push_str(&format!("model    A: {}\nbaseline B: {}\n", report.model.path, report.baseline.path));
    s.push_str(&format!(
        "judge: {}:{}   prompts: {} of {} in {}\n",
        report.judge.kind, report.judge.path, report.prompts.evaluated, report.prompts.rows, report.prompts.file
    ));
    s.push_str(&format!("95% CI: {}\n\n", report.ci.description));
    let w = report.subsets.iter().map(|t| t.subset.len()).max().unwrap_or(0).max(7);
    s.push_str(&format!(
        "{:<w$}  {:>5}  {:>5}  {:>5}  {:>5}  {:>8}  {:>17}\n",
        "subset", "n", "win", "tie", "loss", "win rate", "95% CI"
    ));
    let row = |name: &str, t: &Tally| {
        format!(
            "{:<w$}  {:>5}  {:>5}  {:>5}  {:>5}  {:>7.1}%  [{:>5.1}%, {:>5.1}%]\n",
            name,
            t.n,
            t.wins,
            t.ties,
            t.losses,
            t.win_rate * 100.0,
            t.ci_low * 100.0,
            t.ci_high * 100.0
        )
    };
    for t in &report.subsets {
        s.push_str(&row(&t.subset, &t.tally));
    }
    if !report.subsets.is_empty() {
        s.push_str(&format!("{}\n", "-".repeat(w + 60)));
    }
    s.push_str(&row("overall", &report.overall));
    if let Some(r) = &report.rules {
        let rate = |p: &rules::PassRate| {
            format!(
                "{:>5.1}% [{:>5.1}%, {:>5.1}%] ({} of {}, mean score {:.3})",
                p.rate * 100.0,
                p.ci_low * 100.0,
                p.ci_high * 100.0,
                p.passes,
                p.n,
                p.mean_score
            )
        };
        s.push_str(&format!(
            "\nrule pass rate (score {} under {}):\n  model    A: {}\n  baseline B: {}\n  A - B     : {:+.1} points [{:+.1}, {:+.1}]\n",
            r.pass_score,
            r.file,
            rate(&r.model),
            rate(&r.baseline),
            r.difference * 100.0,
            r.difference_ci_low * 100.0,
            r.difference_ci_high * 100.0
        ));
    }
    let st = &report.stats;
    s.push_str(&format!(
        "\ngenerated {} + {} answers ({} + {} from the cache) in {:.1}s; judged {} pairs in {:.1}s; {} identical pairs{}\n",
        st.model_generated,
        st.baseline_generated,
        st.model_cached,
        st.baseline_cached,
        st.generation_seconds,
        st.judged,
        st.judge_seconds,
        st.identical,
        match (st.position_bias_ties, st.mean_preference) {
            (Some(n), Some(p)) => format!(
                "; {n} judged pairs with the same letter in both orders (position bias); judge's mean preference for model A (both orders) {:.1}%",
                p * 100.0
            ),
            (Some(n), None) => format!("; {n} judged pairs with the same letter in both orders (position bias)"),
            _ => String::new(),
        }
    ));
    s
}
