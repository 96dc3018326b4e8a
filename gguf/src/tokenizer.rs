//! The tokenizer files rebuilt from a GGUF's `tokenizer.ggml.*` metadata: `tokenizer.json`
//! (byte-level BPE) and `tokenizer_config.json` (special tokens, chat template).

use serde_json::{json, Map, Value};

use crate::error::{GgufError, Result};
use crate::import::LlamaParams;
use crate::GgufFile;

/// The id of a special token: `name` is bos, eos, unk or pad (GGUF spells the last two
/// `unknown` and `padding`).
pub(crate) fn special_id(g: &GgufFile, name: &str) -> Result<Option<u64>> {
    let key = match name {
        "unk" => "unknown",
        "pad" => "padding",
        other => other,
    };
    g.opt_u64(&format!("tokenizer.ggml.{key}_token_id"))
}

/// llama.cpp token types.
const TOKEN_CONTROL: i128 = 3;
const TOKEN_USER_DEFINED: i128 = 4;

/// The Llama-3 pre-tokenizer split regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer split regex (as Llama-3's, but one digit at a time).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn token_text<'a>(g: &GgufFile, tokens: &[&'a str], id: Option<u64>, key: &str) -> Result<Option<&'a str>> {
    match id {
        None => Ok(None),
        Some(i) => tokens.get(i as usize).copied().map(Some).ok_or_else(|| GgufError::Malformed {
            path: g.path.clone(),
            what: format!("tokenizer.ggml.{key}_token_id {i} is outside the vocabulary of {} tokens", tokens.len()),
        }),
    }
}

/// `tokenizer.json` rebuilt from the GGUF vocabulary (byte-level BPE only).
pub fn build_tokenizer_json(g: &GgufFile) -> Result<Value> {
    let unsupported = |what: String| GgufError::UnsupportedTokenizer { path: g.path.clone(), what };
    let model = g.req_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(unsupported(format!(
            "tokenizer.ggml.model is '{model}'; only 'gpt2' (byte-level BPE) is supported"
        )));
    }
    let pre = g
        .opt_str("tokenizer.ggml.pre")?
        .ok_or_else(|| unsupported("tokenizer.ggml.pre is missing, so the pre-tokenizer is unknown".into()))?;
    let pre_tokenizer = match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true),
            ],
        }),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT},
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level(false, true, false),
            ],
        }),
        // Qwen2, Qwen2.5 and Qwen3: the Llama-3 split with single digits.
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_SPLIT},
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level(false, false, false),
            ],
        }),
        "gpt-2" | "gpt2" => byte_level(false, true, true),
        other => {
            return Err(unsupported(format!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported; supported: smollm, llama-bpe, llama3, llama-v3, smaug-bpe, qwen2, gpt-2"
            )))
        }
    };
    let tokens = g.req_str_array("tokenizer.ggml.tokens")?;
    let merges = g.req_str_array("tokenizer.ggml.merges")?;
    let types = g.opt_int_array("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != tokens.len() {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("tokenizer.ggml.token_type has {} entries for {} tokens", t.len(), tokens.len()),
            });
        }
    }

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
    }
    let mut merge_list = Vec::with_capacity(merges.len());
    for m in &merges {
        let (a, b) = m.split_once(' ').ok_or_else(|| GgufError::Malformed {
            path: g.path.clone(),
            what: format!("merge '{m}' in tokenizer.ggml.merges is not two tokens separated by a space"),
        })?;
        merge_list.push(json!([a, b]));
    }
    let mut added = Vec::new();
    if let Some(types) = &types {
        for (id, (&tok, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                added.push(json!({
                    "id": id,
                    "content": tok,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": ty == TOKEN_CONTROL,
                }));
            }
        }
    }

    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = token_text(g, &tokens, special_id(g, "bos")?, "bos")?;
    let eos = token_text(g, &tokens, special_id(g, "eos")?, "eos")?;
    let mut post_processor = byte_level(true, false, true);
    if add_bos || add_eos {
        let mut specials = Map::new();
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let special = |name: &str, tok: Option<&str>, id: Option<u64>| -> Result<(Value, Value)> {
            let tok = tok.ok_or_else(|| GgufError::MissingKey {
                path: g.path.clone(),
                key: format!("tokenizer.ggml.{name}_token_id"),
            })?;
            Ok((json!({"SpecialToken": {"id": tok, "type_id": 0}}), json!({"id": tok, "ids": [id], "tokens": [tok]})))
        };
        let bos_parts = if add_bos { Some(special("bos", bos, special_id(g, "bos")?)?) } else { None };
        let eos_parts = if add_eos { Some(special("eos", eos, special_id(g, "eos")?)?) } else { None };
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let target = if seq == "A" { &mut single } else { &mut pair };
            if let Some((piece, def)) = &bos_parts {
                let mut piece = piece.clone();
                piece["SpecialToken"]["type_id"] = json!(type_id);
                target.push(piece);
                specials.insert(bos.unwrap_or_default().to_string(), def.clone());
            }
            target.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((piece, def)) = &eos_parts {
                let mut piece = piece.clone();
                piece["SpecialToken"]["type_id"] = json!(type_id);
                target.push(piece);
                specials.insert(eos.unwrap_or_default().to_string(), def.clone());
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        post_processor = json!({
            "type": "Sequence",
            "processors": [
                byte_level(true, false, true),
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
            ],
        });
    }

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_list,
        },
    }))
}

/// `tokenizer_config.json`: special tokens, BOS/EOS flags, chat template.
pub fn build_tokenizer_config(g: &GgufFile, p: &LlamaParams) -> Result<Value> {
    let tokens = g.req_str_array("tokenizer.ggml.tokens")?;
    let types = g.opt_int_array("tokenizer.ggml.token_type")?;
    let mut c = Map::new();
    c.insert("add_bos_token".into(), json!(g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false)));
    c.insert("add_eos_token".into(), json!(g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false)));
    let mut decoder = Map::new();
    if let Some(types) = &types {
        for (id, (&tok, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                decoder.insert(
                    id.to_string(),
                    json!({
                        "content": tok,
                        "lstrip": false,
                        "normalized": false,
                        "rstrip": false,
                        "single_word": false,
                        "special": ty == TOKEN_CONTROL,
                    }),
                );
            }
        }
    }
    c.insert("added_tokens_decoder".into(), Value::Object(decoder));
    for name in ["bos", "eos", "unk", "pad"] {
        let text = token_text(g, &tokens, special_id(g, name)?, name)?;
        c.insert(format!("{name}_token"), json!(text));
    }
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        c.insert("chat_template".into(), json!(t));
    }
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    c.insert("model_max_length".into(), json!(p.context_length));
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(Value::Object(c))
}
