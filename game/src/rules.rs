//! Rule rewards (`reward.kind = "rule"`): checks on the answer's text that need no model, in
//! the spirit of the reward functions TRL and veRL users write. Each rule scores 1 when it
//! holds and 0 when not; R is the weighted sum over the rules.
use crate::config::{RuleConfig, RuleKind};
use crate::error::{GameError, Result};
use crate::reward::RewardSource;
use selfplay_policy::Policy;
use std::collections::HashMap;
use std::path::Path;

enum Check {
    Length { words: u64, tolerance: u64 },
    Regex(regex::Regex),
    Contains { text: String, ignore_case: bool, negate: bool },
    Json { keys: Vec<String> },
    Exact,
}

pub struct RuleReward {
    checks: Vec<(f64, Check)>,
    /// GRPO prompt -> reference answer (only when an `exact` rule is present).
    answers: HashMap<String, String>,
}

impl RuleReward {
    /// `answers` maps each GRPO prompt to its reference answer; `exact` rules need it.
    pub fn new(rules: &[RuleConfig], answers: HashMap<String, String>) -> Result<Self> {
        let mut checks = vec![];
        for (i, r) in rules.iter().enumerate() {
            r.check().map_err(|e| GameError::Config(format!("reward rule {i} ({}): {e}", r.rule.name())))?;
            let check = match r.rule {
                RuleKind::Length => Check::Length { words: r.words.unwrap_or(0), tolerance: r.tolerance.unwrap_or(0) },
                RuleKind::Regex => Check::Regex(
                    regex::Regex::new(r.pattern.as_deref().unwrap_or_default())
                        .map_err(|e| GameError::Config(format!("reward rule {i} (regex): {e}")))?,
                ),
                RuleKind::Contains | RuleKind::NotContains => {
                    let ignore_case = r.ignore_case.unwrap_or(false);
                    let text = r.text.clone().unwrap_or_default();
                    Check::Contains {
                        text: if ignore_case { text.to_lowercase() } else { text },
                        ignore_case,
                        negate: r.rule == RuleKind::NotContains,
                    }
                }
                RuleKind::Json => Check::Json { keys: r.keys.clone().unwrap_or_default() },
                RuleKind::Exact => Check::Exact,
            };
            checks.push((r.weight, check));
        }
        Ok(RuleReward { checks, answers })
    }

    /// The reference answers of a prompt file, keyed by prompt. Every row must carry one, and a
    /// prompt that appears twice must carry the same one.
    pub fn load_answers(prompts_file: &Path) -> Result<HashMap<String, String>> {
        let mut answers = HashMap::new();
        for (i, row) in crate::data::load_prompt_rows(prompts_file)?.into_iter().enumerate() {
            let Some(a) = row.answer else {
                return Err(GameError::Config(format!(
                    "{}: prompt {i} has no \"answer\" field, which the exact rule needs",
                    prompts_file.display()
                )));
            };
            if let Some(prev) = answers.insert(row.prompt.clone(), a.clone()) {
                if prev != a {
                    return Err(GameError::Config(format!(
                        "{}: prompt {i} repeats an earlier prompt with another answer ({prev:?} vs {a:?})",
                        prompts_file.display()
                    )));
                }
            }
        }
        Ok(answers)
    }

    /// The weighted sum of the rules on one (query, answer) pair.
    pub fn score_one(&self, query: &str, answer: &str) -> Result<f64> {
        let mut total = 0.0;
        for (w, c) in &self.checks {
            let pass = match c {
                Check::Length { words, tolerance } => {
                    answer.split_whitespace().count().abs_diff(*words as usize) <= *tolerance as usize
                }
                Check::Regex(re) => re.is_match(answer),
                Check::Contains { text, ignore_case, negate } => {
                    let found = if *ignore_case {
                        answer.to_lowercase().contains(text.as_str())
                    } else {
                        answer.contains(text.as_str())
                    };
                    found != *negate
                }
                Check::Json { keys } => json_passes(answer, keys),
                Check::Exact => {
                    let want = self.answers.get(query).ok_or_else(|| {
                        GameError::Reward(format!(
                            "exact rule: no reference answer for the prompt {:?} (it is not in game.prompts_file)",
                            truncate(query, 80)
                        ))
                    })?;
                    final_answer_matches(answer, want)
                }
            };
            if pass {
                total += w;
            }
        }
        Ok(total)
    }
}

impl RewardSource for RuleReward {
    fn name(&self) -> &str {
        "rule"
    }
    fn score(&mut self, pairs: &[(String, String)], _reference: &Policy) -> Result<Vec<f64>> {
        pairs.iter().map(|(q, a)| self.score_one(q, a)).collect()
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The answer without surrounding whitespace and without one surrounding ``` fence (with or
/// without a language tag), as chat models often wrap JSON.
fn strip_fence(answer: &str) -> &str {
    let t = answer.trim();
    if let Some(rest) = t.strip_prefix("```") {
        if let (Some(nl), true) = (rest.find('\n'), rest.trim_end().ends_with("```")) {
            let body = &rest[nl + 1..];
            return body.trim_end().strip_suffix("```").unwrap_or(body).trim();
        }
    }
    t
}

fn json_passes(answer: &str, keys: &[String]) -> bool {
    match serde_json::from_str::<serde_json::Value>(strip_fence(answer)) {
        Ok(v) if keys.is_empty() => {
            let _ = v;
            true
        }
        Ok(serde_json::Value::Object(m)) => keys.iter().all(|k| m.contains_key(k)),
        _ => false,
    }
}

/// Where a response states its final answer: the last `\boxed{...}`, else the text after the
/// last `####` (GSM8K's marker), else the text after the last "answer is" / "answer:", else
/// the whole response.
fn final_answer_text(response: &str) -> &str {
    if let Some(b) = last_boxed(response) {
        return b;
    }
    if let Some(i) = response.rfind("####") {
        return &response[i + 4..];
    }
    let lower = response.to_lowercase();
    // Lowercasing keeps byte offsets only for ASCII; fall back to the whole text otherwise.
    if lower.len() == response.len() {
        let at = ["answer is", "answer:"].iter().filter_map(|m| lower.rfind(m).map(|i| i + m.len())).max();
        if let Some(i) = at {
            return &response[i..];
        }
    }
    response
}

fn last_boxed(s: &str) -> Option<&str> {
    let start = s.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// A number as written in an answer: sign, digits with optional thousands commas, decimals.
fn parse_number(s: &str) -> Option<f64> {
    let t = s.trim().trim_start_matches('$').trim_end_matches(['.', '%']);
    let plain: String = t.chars().filter(|c| *c != ',').collect();
    if plain.is_empty() || !plain.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.')) {
        return None;
    }
    plain.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn last_number(s: &str) -> Option<f64> {
    let re = regex::Regex::new(r"[-+]?\d[\d,]*(?:\.\d+)?").expect("valid pattern");
    re.find_iter(s).last().and_then(|m| parse_number(m.as_str()))
}

fn normalize(s: &str) -> String {
    let t = s.trim_matches(|c: char| c.is_whitespace() || matches!(c, ':' | '.' | '!' | '*' | '"' | '\'' | '`'));
    t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The `exact` rule: when the reference parses as a number, the last number of the response's
/// final answer equals it (to 1e-6 relative); otherwise the final answer's last non-empty line
/// equals the reference, ignoring case, surrounding quotes and punctuation, and spacing.
pub fn final_answer_matches(response: &str, reference: &str) -> bool {
    let reference = match reference.rfind("####") {
        Some(i) => &reference[i + 4..],
        None => reference,
    };
    let text = final_answer_text(response);
    match parse_number(reference) {
        Some(want) => last_number(text).is_some_and(|got| (got - want).abs() <= 1e-6 * want.abs().max(1.0)),
        None => {
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            let want = normalize(reference);
            !want.is_empty() && normalize(last) == want
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml: &str) -> RuleConfig {
        toml::from_str(toml).unwrap()
    }

    fn score(rules: &[RuleConfig], q: &str, a: &str) -> f64 {
        let answers = HashMap::from([("What is 6 x 7?".to_string(), "42".to_string())]);
        RuleReward::new(rules, answers).unwrap().score_one(q, a).unwrap()
    }

    #[test]
    fn each_rule_by_hand() {
        let len = rule("rule = \"length\"\nwords = 5\ntolerance = 1");
        assert_eq!(score(&[len.clone()], "", "one two three four"), 1.0);
        assert_eq!(score(&[len.clone()], "", "one two three four five six"), 1.0);
        assert_eq!(score(&[len.clone()], "", "one two three"), 0.0);
        assert_eq!(score(&[len], "", "a b c d e f g"), 0.0);
        let re = rule("rule = \"regex\"\npattern = \"^[A-Z].*\\\\.$\"\nweight = 2.5");
        assert_eq!(score(&[re.clone()], "", "Fine."), 2.5);
        assert_eq!(score(&[re], "", "fine."), 0.0);
        let c = rule("rule = \"contains\"\ntext = \"Because\"");
        assert_eq!(score(&[c.clone()], "", "because"), 0.0);
        assert_eq!(score(&[c], "", "Because it is."), 1.0);
        let ci = rule("rule = \"contains\"\ntext = \"Because\"\nignore_case = true");
        assert_eq!(score(&[ci], "", "BECAUSE"), 1.0);
        let nc = rule("rule = \"not-contains\"\ntext = \"As an AI\"\nweight = -1");
        assert_eq!(score(&[nc.clone()], "", "As an AI, I cannot."), 0.0);
        assert_eq!(score(&[nc], "", "Sure."), -1.0);
        let js = rule("rule = \"json\"\nkeys = [\"name\", \"age\"]");
        assert_eq!(score(&[js.clone()], "", "{\"name\": \"A\", \"age\": 3}"), 1.0);
        assert_eq!(score(&[js.clone()], "", "```json\n{\"name\": \"A\", \"age\": 3}\n```"), 1.0);
        assert_eq!(score(&[js.clone()], "", "{\"name\": \"A\"}"), 0.0);
        assert_eq!(score(&[js.clone()], "", "[1, 2]"), 0.0);
        assert_eq!(score(&[js], "", "name: A"), 0.0);
        let any = rule("rule = \"json\"");
        assert_eq!(score(&[any.clone()], "", " [1, 2] "), 1.0);
        assert_eq!(score(&[any], "", "[1, 2"), 0.0);
        let ex = rule("rule = \"exact\"");
        assert_eq!(score(&[ex.clone()], "What is 6 x 7?", "6 x 7 = 42."), 1.0);
        assert_eq!(score(&[ex.clone()], "What is 6 x 7?", "It is 41, not 42... no: 41"), 0.0);
        let e = RuleReward::new(&[ex], HashMap::new()).unwrap().score_one("unknown", "1").unwrap_err();
        assert!(e.to_string().contains("no reference answer"), "{e}");
    }

    #[test]
    fn rules_add_up_with_their_weights() {
        let rules = [
            rule("rule = \"length\"\nwords = 3\ntolerance = 0\nweight = 0.5"),
            rule("rule = \"contains\"\ntext = \"yes\"\nweight = 2"),
            rule("rule = \"not-contains\"\ntext = \"no\"\nweight = 1"),
        ];
        assert_eq!(score(&rules, "", "yes yes yes"), 3.5);
        assert_eq!(score(&rules, "", "yes or no"), 2.5);
        assert_eq!(score(&rules, "", "no"), 0.0);
    }

    #[test]
    fn final_answers() {
        assert!(final_answer_matches("The total is 1,234 apples.", "1234"));
        assert!(final_answer_matches("So x = \\boxed{-3.50}. Check: 7", "-3.5"));
        assert!(final_answer_matches("3 + 4 = 7\n#### 7", "Natalia sold 7 clips.\n#### 7"));
        assert!(final_answer_matches("First 12, then the answer is: 13", "13"));
        assert!(!final_answer_matches("The answer is 13. Or 14", "13"));
        assert!(!final_answer_matches("no number here", "13"));
        assert!(final_answer_matches("Let me think.\nThe answer is: \"Paris\".", "paris"));
        assert!(final_answer_matches("Thinking...\n**Paris**", "Paris"));
        assert!(!final_answer_matches("Paris is not it.\nLyon", "Paris"));
        assert!(!final_answer_matches("", ""));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (toml, want) in [
            ("rule = \"length\"", "needs words"),
            ("rule = \"regex\"\npattern = \"(\"", "pattern \"(\""),
            ("rule = \"contains\"\ntext = \"\"", "text is empty"),
            ("rule = \"json\"\nwords = 3", "words is not read by this rule"),
            ("rule = \"exact\"\nweight = nan", "weight must be finite"),
        ] {
            let e = rule(toml).check().unwrap_err();
            assert!(e.contains(want), "{toml}: {e}");
        }
        assert!(toml::from_str::<RuleConfig>("rule = \"lenght\"").is_err());
        assert!(toml::from_str::<RuleConfig>("rule = \"length\"\nword = 3").is_err());
    }
}
