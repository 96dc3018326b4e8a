//! The game's prompts, in the project's own words, following the structure of docs/method.md:
//! the challenger prompt (with `{task}` and `{template}` placeholders), and the self-reward
//! judge prompt (7 additive binary criteria, a short justification, `<Score>N</Score>`).
//! Both can be replaced by files named in the config.
use serde::{Deserialize, Serialize};

pub const DEFAULT_CHALLENGER_PROMPT: &str = "\
You are setting a test for another AI assistant. Write ONE instruction or question that a \
user might send to an assistant like it.

Rules:
- Write only the instruction itself: no answer, no hints, no explanation, no preamble.
- It must be something a text-only assistant can do (no browsing, no images, no actions in \
the world).
- It may be easy, hard, unusual or slightly noisy: the goal is to find out where the \
assistant is weak.
{task_rule}{template_rule}
Instruction:";

pub const DEFAULT_JUDGE_PROMPT: &str = "\
Review the user's instruction and the assistant's response below and grade them with this \
additive 7-point rubric. Award one point for each statement that is true:
1. The user's task can be identified from the instruction.
2. The instruction is clear, specific and well structured.
3. The user will be able to understand the response.
4. The response addresses a substantial part of the user's question.
5. The response answers the core of the question usefully and comprehensively.
6. The response is clearly written, concise, well organised and helpful.
7. The user would most likely be pleased with the form and style of the response.

<Instruction>
{instruction}
</Instruction>

<Response>
{response}
</Response>

First justify your grade briefly (at most 100 words). Then write the sum of the points \
inside <Calculation></Calculation> and the total score (0 to 7) as <Score>N</Score>.";

/// The judge-model reward (`reward.kind = judge`), for when no reward model exists: one overall
/// grade, deliberately unlike the self-reward rubric so that R and R_Q measure different things.
pub const DEFAULT_REWARD_PROMPT: &str = "\
How well does the response below answer the instruction? Consider correctness, helpfulness \
and completeness. Grade it from 0 (useless or wrong) to 7 (excellent).

<Instruction>
{instruction}
</Instruction>

<Response>
{response}
</Response>

Give the grade as <Score>N</Score>.";

/// Fills the challenger prompt. Empty `task` and `template` leave the choice to the model.
pub fn challenger_prompt(prompt: &str, task: &str, template: &str) -> String {
    let task_rule = if task.trim().is_empty() {
        String::new()
    } else {
        format!("- The instruction must be about this task: {}.\n", task.trim())
    };
    let template_rule = if template.trim().is_empty() {
        String::new()
    } else {
        format!("- The instruction must follow this pattern, filling in the blanks: {}\n", template.trim())
    };
    fill(
        prompt,
        &[("task_rule", &task_rule), ("template_rule", &template_rule), ("task", task), ("template", template)],
    )
}

pub fn judge_prompt(prompt: &str, instruction: &str, response: &str) -> String {
    fill(prompt, &[("instruction", instruction), ("response", response)])
}

/// Substitutes every `{name}` of `vars` in one pass over `prompt`: substituted text is never
/// scanned again, so a task, query or answer that contains `{response}` or `{template}` stays
/// literal. Braces around any other word are left as they are.
pub fn fill(prompt: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let name = &after[..close];
            vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v, close))
        });
        match value {
            Some((v, close)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// What an unparsable judgement gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParseFailure {
    /// Score 0: the answer still trains, as a bad one.
    Zero,
    /// The answer is left out of the step (no gradient, not in the baselines).
    Drop,
}

/// Reads the score of a judgement: the last `<Score>N</Score>` (tolerating spaces, a fraction
/// like `5/7` and a missing closing tag), else a trailing "Score: N". Scores outside 0..=7
/// are rejected.
pub fn parse_score(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let tagged = lower.rfind("<score>").and_then(|i| leading_number(&lower[i + "<score>".len()..]));
    let score = tagged.or_else(|| {
        let i = lower.rfind("score:")?;
        leading_number(&lower[i + "score:".len()..])
    })?;
    (0.0..=7.0).contains(&score).then_some(score)
}

fn leading_number(s: &str) -> Option<f64> {
    let s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '*');
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let num = s[..end].trim_end_matches('.');
    if num.is_empty() {
        return None;
    }
    num.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores() {
        assert_eq!(parse_score("ok <Calculation>1+1+1</Calculation> <Score>3</Score>"), Some(3.0));
        assert_eq!(parse_score("<Score> 7 </Score>"), Some(7.0));
        assert_eq!(parse_score("<score>5/7</score>"), Some(5.0));
        assert_eq!(parse_score("first <Score>2</Score> then <Score>4</Score>"), Some(4.0));
        assert_eq!(parse_score("Score: 6"), Some(6.0));
        assert_eq!(parse_score("<Score>6"), Some(6.0));
        assert_eq!(parse_score("<Score>8</Score>"), None);
        assert_eq!(parse_score("<Score>abc</Score>"), None);
        assert_eq!(parse_score("no score at all"), None);
        assert_eq!(parse_score(""), None);
    }

    #[test]
    fn prompts_fill_placeholders() {
        let p = challenger_prompt(DEFAULT_CHALLENGER_PROMPT, "", "");
        assert!(!p.contains('{') && !p.contains("task:"));
        let p = challenger_prompt(DEFAULT_CHALLENGER_PROMPT, "Pure & Applied Mathematics", "Prove that ___.");
        assert!(p.contains("Pure & Applied Mathematics") && p.contains("Prove that ___."));
        let j = judge_prompt(DEFAULT_JUDGE_PROMPT, "Say {response}", "I said {instruction}");
        assert!(j.contains("Say {response}") && j.contains("I said {instruction}"));
        // One pass: a task naming another placeholder stays literal, in any order of the
        // placeholders in a custom prompt, and every occurrence is filled.
        let p = challenger_prompt("{template} / {task} / {task}", "write {template} {task_rule}", "T {task}");
        assert_eq!(p, "T {task} / write {template} {task_rule} / write {template} {task_rule}");
        let j = judge_prompt("A: {response} Q: {instruction} {other} {", "q {response}", "a {instruction}");
        assert_eq!(j, "A: a {instruction} Q: q {response} {other} {");
    }
}
