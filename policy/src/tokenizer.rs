//! Tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`), rendered with a
//! Jinja engine configured the way transformers configures its own (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`, `strftime_now`, `tojson`).
use crate::error::{io_err, PolicyError, Result};
use minijinja::{value::Kwargs, Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".into(), content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage { role: "assistant".into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage { role: "system".into(), content: content.into() }
    }
}

/// What a chat template sees besides the messages: the keyword arguments of transformers'
/// `apply_chat_template`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatOptions {
    pub add_generation_prompt: bool,
    /// Tool (function) schemas, as JSON objects; `none` in the template when absent.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Further template variables, such as Qwen3's `enable_thinking`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    env: Environment<'static>,
    has_template: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    path: PathBuf,
}

/// `bos_token` and friends are either a string or an AddedToken object.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(PolicyError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| PolicyError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
            serde_json::from_str(&text)
                .map_err(|e| PolicyError::Tokenizer { path: cfg_path.clone(), message: e.to_string() })?
        } else {
            serde_json::Value::Null
        };
        // The template may also live in chat_template.jinja (transformers >= 4.43).
        let jinja_path = dir.join("chat_template.jinja");
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ if jinja_path.exists() => Some(std::fs::read_to_string(&jinja_path).map_err(io_err(&jinja_path))?),
            _ => None,
        };
        let mut tok = Tokenizer {
            inner,
            env: new_environment(),
            has_template: false,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
            pad_token: token_string(cfg.get("pad_token")),
            path: dir.to_path_buf(),
        };
        if let Some(t) = template {
            tok.set_chat_template(&t)?;
        }
        Ok(tok)
    }

    /// Replaces the chat template (for example with one read from a file named in the config).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        self.env
            .add_template_owned("chat", source.to_string())
            .map_err(|e| PolicyError::ChatTemplate(format!("cannot parse template: {e:#}")))?;
        self.has_template = true;
        Ok(())
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS and the like).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i)
                    .map_err(|_| PolicyError::TokenOutOfRange { id: i, vocab_size: self.vocab_size() as i64 })
            })
            .collect::<Result<_>>()?;
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| self.err(e))
    }

    fn err(&self, e: impl std::fmt::Display) -> PolicyError {
        PolicyError::Tokenizer { path: self.path.clone(), message: e.to_string() }
    }

    /// Renders messages with the chat template, as `tokenizer.apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` does.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages).map_err(|e| PolicyError::ChatTemplate(e.to_string()))?;
        self.render_chat_json(&messages, &ChatOptions { add_generation_prompt, ..Default::default() })
    }

    /// Renders messages given as JSON objects (so that they may carry `tool_calls`,
    /// `reasoning_content` and the like) with the chat template, as
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
    /// tools=..., **extra)` does.
    pub fn render_chat_json(&self, messages: &serde_json::Value, opts: &ChatOptions) -> Result<String> {
        if !self.has_template {
            return Err(PolicyError::ChatTemplate(format!("{} has no chat_template", self.path.display())));
        }
        if !messages.is_array() {
            return Err(PolicyError::ChatTemplate("messages must be a list".into()));
        }
        for key in ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "pad_token"] {
            if opts.extra.contains_key(key) {
                return Err(PolicyError::ChatTemplate(format!("template variable {key:?} cannot be overridden")));
            }
        }
        let tmpl = self.env.get_template("chat").expect("added in set_chat_template");
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => opts.tools.as_ref().map(Value::from_serialize),
            add_generation_prompt => opts.add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone().unwrap_or_default(),
            ..Value::from_serialize(&opts.extra)
        })
        .map_err(|e| PolicyError::ChatTemplate(format!("{e:#}")))
    }

    /// Rendered chat, tokenized without adding special tokens (the template already holds them).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<i64>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson);
    env
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=...)`, not HTML-escaped.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(&value).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let (open_sep, item_sep, close) = match indent {
        Some(n) => (
            format!("\n{}", " ".repeat(n * (depth + 1))),
            format!(",\n{}", " ".repeat(n * (depth + 1))),
            format!("\n{}", " ".repeat(n * depth)),
        ),
        None => (String::new(), ", ".to_string(), String::new()),
    };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            out.push_str(&open_sep);
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(&close);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            out.push_str(&open_sep);
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(&close);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// The few strftime codes chat templates use (Llama 3's "%d %b %Y"), in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('B') => out.push_str(FULL[(m - 1) as usize]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o)
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's civil calendar algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn python_style_json() {
        let v: serde_json::Value = serde_json::from_str(r#"{"a":[1,2],"b":"<é>"}"#).unwrap();
        let mut s = String::new();
        write_py_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, 2], "b": "<é>"}"#);
        let mut s = String::new();
        write_py_json(&v, Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": \"<é>\"\n}");
    }
}
