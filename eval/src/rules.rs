//! Rule pass rates (`selfplay eval --rules CONFIG`): the `reward.rules` of a training config
//! applied to both models' answers, exactly as the rule reward scores them in training. An
//! answer passes when it gets the rules' highest possible score: every rule of positive weight
//! holds and none of negative weight does.
use crate::error::{EvalError, Result};
use crate::stats::wilson;
use selfplay_game::config::RuleConfig;
use selfplay_game::rules::RuleReward;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The rules of a config file, ready to score answers.
pub struct Rules {
    file: PathBuf,
    configs: Vec<RuleConfig>,
    reward: RuleReward,
    best: f64,
}

impl Rules {
    /// Reads `reward.rules` from a selfplay config file. `answers` maps prompts to reference
    /// answers for `exact` rules (from the prompt file's `answer` fields).
    pub fn load(file: &Path, answers: HashMap<String, String>) -> Result<Rules> {
        let cfg = selfplay_game::Config::load(Some(file), &[])?;
        let configs = cfg.reward.rules.clone();
        if configs.is_empty() {
            return Err(EvalError::Input(format!(
                "--rules {}: the file has no reward.rules to measure",
                file.display()
            )));
        }
        let reward = RuleReward::new(&configs, answers)?;
        let best = configs.iter().map(|r| r.weight.max(0.0)).sum();
        Ok(Rules { file: file.into(), configs, reward, best })
    }

    /// The rule score of one answer, and whether it passes.
    pub fn score(&self, prompt: &str, answer: &str) -> Result<(f64, bool)> {
        let s = self.reward.score_one(prompt, answer)?;
        Ok((s, s >= self.best - 1e-9))
    }

    pub fn best(&self) -> f64 {
        self.best
    }
}

/// How often one model's answers pass, with a 95% Wilson interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassRate {
    pub n: usize,
    pub passes: usize,
    pub rate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// The mean rule score (the reward R of a rule-only config).
    pub mean_score: f64,
}

impl PassRate {
    pub fn of(scores: &[(f64, bool)]) -> PassRate {
        let n = scores.len();
        let passes = scores.iter().filter(|s| s.1).count();
        let rate = if n == 0 { 0.0 } else { passes as f64 / n as f64 };
        let (ci_low, ci_high) = wilson(rate, n, 1.959964);
        let mean_score = if n == 0 { 0.0 } else { scores.iter().map(|s| s.0).sum::<f64>() / n as f64 };
        PassRate { n, passes, rate, ci_low, ci_high, mean_score }
    }
}

/// The rules' verdict on both models over the same prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleReport {
    pub file: String,
    pub rules: Vec<RuleConfig>,
    /// The score an answer needs to pass.
    pub pass_score: f64,
    pub model: PassRate,
    pub baseline: PassRate,
    /// Model minus baseline pass rate, with a 95% interval for paired proportions (Wald on the
    /// per-prompt differences, whose variance already accounts for the pairing).
    pub difference: f64,
    pub difference_ci_low: f64,
    pub difference_ci_high: f64,
}

impl RuleReport {
    pub fn new(rules: &Rules, model: &[(f64, bool)], baseline: &[(f64, bool)]) -> RuleReport {
        let d: Vec<f64> = model.iter().zip(baseline).map(|(a, b)| a.1 as u8 as f64 - b.1 as u8 as f64).collect();
        let n = d.len().max(1) as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = if d.len() > 1 { d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let half = 1.959964 * (var / n).sqrt();
        RuleReport {
            file: rules.file.display().to_string(),
            rules: rules.configs.clone(),
            pass_score: rules.best,
            model: PassRate::of(model),
            baseline: PassRate::of(baseline),
            difference: mean,
            difference_ci_low: (mean - half).max(-1.0),
            difference_ci_high: (mean + half).min(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_file(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("rules.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn pass_needs_every_positive_rule_and_no_negative_one() {
        let d = tempfile::tempdir().unwrap();
        let f = rules_file(
            d.path(),
            "[reward]\nkind = \"rule\"\nrules = [\n  { rule = \"length\", words = 3, tolerance = 1, weight = 7.0 },\n  { rule = \"contains\", text = \"sorry\", weight = -1.0 },\n]\n",
        );
        let r = Rules::load(&f, HashMap::new()).unwrap();
        assert_eq!(r.best(), 7.0);
        assert_eq!(r.score("q", "one two three").unwrap(), (7.0, true));
        assert_eq!(r.score("q", "sorry two three").unwrap(), (6.0, false));
        assert_eq!(r.score("q", "one two three four five").unwrap(), (0.0, false));
    }

    #[test]
    fn a_config_without_rules_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = rules_file(d.path(), "[reward]\nkind = \"judge\"\n");
        let e = Rules::load(&f, HashMap::new()).err().unwrap().to_string();
        assert!(e.contains("no reward.rules"), "{e}");
        assert!(Rules::load(&d.path().join("missing.toml"), HashMap::new()).is_err());
    }

    #[test]
    fn report_counts_passes_and_a_paired_difference() {
        let d = tempfile::tempdir().unwrap();
        let f = rules_file(d.path(), "[reward]\nkind = \"rule\"\nrules = [{ rule = \"length\", words = 1 }]\n");
        let r = Rules::load(&f, HashMap::new()).unwrap();
        let a = [(1.0, true), (1.0, true), (0.0, false), (1.0, true)];
        let b = [(0.0, false), (1.0, true), (0.0, false), (0.0, false)];
        let rep = RuleReport::new(&r, &a, &b);
        assert_eq!((rep.model.passes, rep.baseline.passes), (3, 1));
        assert!((rep.difference - 0.5).abs() < 1e-12);
        assert!(rep.difference_ci_low < 0.5 && rep.difference_ci_high > 0.5);
        assert!(rep.model.ci_low < 0.75 && rep.model.ci_high > 0.75);
        assert!((rep.model.mean_score - 0.75).abs() < 1e-12);
    }
}
