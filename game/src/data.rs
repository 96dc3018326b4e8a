//! Prompt files: a JSON list or JSONL, of strings or of objects with "instruction", "prompt",
//! "question", "text" or "turns" (the first turn). AlpacaEval rows keep their "dataset" as the
//! subset. A row's `answer` (a string or a number) is what the `exact` rule reward checks.
use crate::error::{io_err, GameError, Result};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt: String,
    /// AlpacaEval's `dataset`, MT-bench's `category`, else empty.
    pub subset: String,
    /// The reference answer (`answer` field), for the `exact` rule; None when absent.
    pub answer: Option<String>,
}

fn row_of(v: &serde_json::Value, where_: &str) -> Result<PromptRow> {
    if let Some(s) = v.as_str() {
        return Ok(PromptRow { prompt: s.to_string(), subset: String::new(), answer: None });
    }
    let text = ["instruction", "prompt", "question", "text"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
        .or_else(|| v.get("turns").and_then(|t| t.get(0)).and_then(|x| x.as_str()))
        .ok_or_else(|| GameError::Config(format!("{where_}: no instruction, prompt, question, text or turns field")))?;
    let subset =
        ["dataset", "category"].iter().find_map(|k| v.get(*k).and_then(|x| x.as_str())).unwrap_or("").to_string();
    let answer = match v.get("answer") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(a)) => Some(a.clone()),
        Some(n @ serde_json::Value::Number(_)) => Some(n.to_string()),
        Some(other) => {
            return Err(GameError::Config(format!("{where_}: answer must be a string or a number, got {other}")))
        }
    };
    Ok(PromptRow { prompt: text.to_string(), subset, answer })
}

pub fn load_prompt_rows(path: &Path) -> Result<Vec<PromptRow>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let trimmed = text.trim_start();
    let rows: Vec<PromptRow> = if trimmed.starts_with('[') {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(trimmed).map_err(|e| GameError::Config(format!("{}: {e}", path.display())))?;
        list.iter()
            .enumerate()
            .map(|(i, v)| row_of(v, &format!("{} row {i}", path.display())))
            .collect::<Result<_>>()?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .map_err(|e| GameError::Config(format!("{} line {}: {e}", path.display(), i + 1)))?;
                row_of(&v, &format!("{} line {}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?
    };
    if rows.is_empty() {
        return Err(GameError::Config(format!("{} holds no prompts", path.display())));
    }
    if let Some(i) = rows.iter().position(|r| r.prompt.trim().is_empty()) {
        return Err(GameError::Config(format!("{}: prompt {i} is empty", path.display())));
    }
    Ok(rows)
}

pub fn load_prompts(path: &Path) -> Result<Vec<String>> {
    Ok(load_prompt_rows(path)?.into_iter().map(|r| r.prompt).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.json");
        std::fs::write(&a, r#"[{"instruction": "x", "dataset": "koala"}, "y"]"#).unwrap();
        let r = load_prompt_rows(&a).unwrap();
        assert_eq!(r[0], PromptRow { prompt: "x".into(), subset: "koala".into(), answer: None });
        assert_eq!(r[1].prompt, "y");
        let b = d.path().join("b.jsonl");
        std::fs::write(&b, "{\"turns\": [\"t1\", \"t2\"], \"category\": \"math\"}\n\n{\"prompt\": \"p\"}\n").unwrap();
        assert_eq!(load_prompts(&b).unwrap(), vec!["t1".to_string(), "p".to_string()]);
        let c = d.path().join("c.jsonl");
        std::fs::write(
            &c,
            "{\"prompt\": \"2+2?\", \"answer\": 4}\n{\"prompt\": \"Capital?\", \"answer\": \"Paris\"}\n",
        )
        .unwrap();
        let r = load_prompt_rows(&c).unwrap();
        assert_eq!((r[0].answer.as_deref(), r[1].answer.as_deref()), (Some("4"), Some("Paris")));
        std::fs::write(&c, "{\"prompt\": \"x\", \"answer\": [1]}\n").unwrap();
        assert!(load_prompt_rows(&c).unwrap_err().to_string().contains("line 1: answer must be"));
        let e = d.path().join("e.json");
        std::fs::write(&e, "[]").unwrap();
        assert!(load_prompts(&e).unwrap_err().to_string().contains("no prompts"));
        std::fs::write(&e, "[{\"foo\": 1}]").unwrap();
        assert!(load_prompts(&e).unwrap_err().to_string().contains("row 0"));
        assert!(load_prompts(&d.path().join("missing.json")).is_err());
    }
}
