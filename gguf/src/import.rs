//! Import a `llama`, `qwen2` or `qwen3` GGUF as a Hugging Face model directory:
//! `model.safetensors` (f32, Hugging Face names, Llama's rotary row order restored for Q and K),
//! `config.json`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{GgufError, Result};
use crate::tokenizer::{build_tokenizer_config, build_tokenizer_json, special_id};
use crate::{GgmlType, GgufFile, TensorInfo};

/// Undo llama.cpp's rotary row permutation of a Q or K projection.
///
/// `data` is a row-major `[rows, cols]` matrix (PyTorch order) with `rows = n_head * head_dim`.
/// llama.cpp's converter reordered the rows of each head as
/// `reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2)`, i.e. GGUF row `h*hd + 2*i + j`
/// holds Hugging Face row `h*hd + j*hd/2 + i`. This puts them back. Returns `None` when the
/// shape does not fit `n_head`.
pub fn unpermute_qk(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || rows % n_head != 0 || data.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / n_head;
    if head_dim % 2 != 0 {
        return None;
    }
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

// Import
// ---------------------------------------------------------------------------------------------

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// `general.architecture`: `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Total number of values in those tensors.
    pub n_parameters: u64,
    /// ggml types of the source tensors, with how many tensors had each.
    pub types: BTreeMap<GgmlType, usize>,
    /// True when the GGUF has no `output.weight`, so `lm_head` is tied to the embeddings.
    pub tied_embeddings: bool,
    /// The files written, relative to `out_dir`.
    pub files: Vec<String>,
}

/// The GGUF architectures the importer reads (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    /// Qwen2 and Qwen2.5: q/k/v biases.
    Qwen2,
    /// Qwen3: per-head q/k norms, optional attention biases.
    Qwen3,
}

impl GgufArch {
    /// The metadata key prefix, which is also the name in `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
        }
    }
    fn hf_architecture(self) -> &'static str {
        match self {
            GgufArch::Llama => "LlamaForCausalLM",
            GgufArch::Qwen2 => "Qwen2ForCausalLM",
            GgufArch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Hyper-parameters read from the `<arch>.*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub arch: GgufArch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    pub rope_scaling: Value,
}

/// The shortest decimal that round-trips through f32: keeps `1e-5` as written in the original
/// config instead of the f32's exact binary value.
fn f32_decimal(v: f64) -> f64 {
    let f = v as f32;
    if (f as f64) == v {
        format!("{f}").parse::<f64>().unwrap_or(v)
    } else {
        v
    }
}

fn usize_of(g: &GgufFile, key: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| GgufError::Malformed {
        path: g.path.clone(),
        what: format!("metadata key '{key}' value {v} is too large"),
    })
}

impl LlamaParams {
    /// Read the hyper-parameters of a `llama`, `qwen2` or `qwen3` GGUF.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let found = g.architecture()?;
        let arch = [GgufArch::Llama, GgufArch::Qwen2, GgufArch::Qwen3]
            .into_iter()
            .find(|a| a.name() == found)
            .ok_or_else(|| GgufError::UnsupportedArchitecture { path: g.path.clone(), found: found.to_string() })?;
        let a = arch.name();
        let req = |k: &str| -> Result<usize> {
            let key = format!("{a}.{k}");
            usize_of(g, &key, g.req_u64(&key)?)
        };
        let opt = |k: &str| -> Result<Option<usize>> {
            let key = format!("{a}.{k}");
            g.opt_u64(&key)?.map(|v| usize_of(g, &key, v)).transpose()
        };
        let n_layer = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        let context_length = req("context_length")?;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("head counts {n_head} (query) and {n_head_kv} (key/value) do not fit"),
            });
        }
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(GgufError::Malformed {
                        path: g.path.clone(),
                        what: format!("embedding length {n_embd} is not a multiple of the head count {n_head}"),
                    });
                }
                n_embd / n_head
            }
        };
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("value head size {v} differs from key head size {head_dim}"),
                });
            }
        }
        if let Some(rot) = opt("rope.dimension_count")? {
            if rot != head_dim {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("partial rotary embeddings ({a}.rope.dimension_count {rot} < head size {head_dim})"),
                });
            }
        }
        if g.tensor("rope_freqs.weight").is_some() {
            return Err(GgufError::Unsupported {
                path: g.path.clone(),
                what: "Llama-3-style rope scaling stored as the tensor 'rope_freqs.weight' (its parameters are not in the metadata)".into(),
            });
        }
        if let Some(n) = opt("expert_count")? {
            if n > 0 {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("mixture of experts ({a}.expert_count = {n})"),
                });
            }
        }
        let rms_norm_eps = g.opt_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            GgufError::MissingKey { path: g.path.clone(), key: format!("{a}.attention.layer_norm_rms_epsilon") }
        })?;
        let rope_theta = g.opt_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10000.0);
        let rope_scaling = match g.opt_str(&format!("{a}.rope.scaling.type"))? {
            None | Some("none") => Value::Null,
            Some(kind @ ("linear" | "yarn")) => {
                let factor = g.opt_f64(&format!("{a}.rope.scaling.factor"))?.ok_or_else(|| GgufError::MissingKey {
                    path: g.path.clone(),
                    key: format!("{a}.rope.scaling.factor"),
                })?;
                let mut m = Map::new();
                m.insert("rope_type".into(), json!(kind));
                m.insert("factor".into(), json!(f32_decimal(factor)));
                if kind == "yarn" {
                    if let Some(orig) = opt("rope.scaling.original_context_length")? {
                        m.insert("original_max_position_embeddings".into(), json!(orig));
                    }
                }
                Value::Object(m)
            }
            Some(other) => {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("rope scaling type '{other}'"),
                })
            }
        };
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor { path: g.path.clone(), name: "token_embd.weight".into() })?;
        let vocab_size = match embd.dims.as_slice() {
            [cols, rows] if *cols as usize == n_embd => *rows as usize,
            _ => {
                return Err(GgufError::Malformed {
                    path: g.path.clone(),
                    what: format!("token_embd.weight has GGUF dims {:?}, expected [{n_embd}, vocab]", embd.dims),
                })
            }
        };
        Ok(LlamaParams {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rms_norm_eps: f32_decimal(rms_norm_eps),
            rope_theta: f32_decimal(rope_theta),
            context_length,
            vocab_size,
            rope_scaling,
        })
    }
}

/// What to do to a tensor on the way out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fix {
    None,
    /// Undo the rotary permutation with this many heads.
    Unpermute(usize),
}

/// The Hugging Face name of a GGUF tensor, and the fix it needs.
fn hf_name(name: &str, p: &LlamaParams) -> Option<(String, Fix)> {
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), Fix::None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), Fix::None)),
        "output.weight" => return Some(("lm_head.weight".into(), Fix::None)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= p.n_layer || layer.to_string() != rest.split_once('.')?.0 {
        return None;
    }
    // llama.cpp permutes the rows of Llama's q and k for its rotary layout; Qwen's use the
    // same (NeoX) layout as transformers and are stored as they are.
    let (q_fix, k_fix) = match p.arch {
        GgufArch::Llama => (Fix::Unpermute(p.n_head), Fix::Unpermute(p.n_head_kv)),
        GgufArch::Qwen2 | GgufArch::Qwen3 => (Fix::None, Fix::None),
    };
    let qwen3 = p.arch == GgufArch::Qwen3;
    let (hf, fix) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", Fix::None),
        "attn_q.weight" => ("self_attn.q_proj.weight", q_fix),
        "attn_k.weight" => ("self_attn.k_proj.weight", k_fix),
        "attn_q.bias" if p.arch != GgufArch::Llama => ("self_attn.q_proj.bias", Fix::None),
        "attn_k.bias" if p.arch != GgufArch::Llama => ("self_attn.k_proj.bias", Fix::None),
        "attn_v.bias" if p.arch != GgufArch::Llama => ("self_attn.v_proj.bias", Fix::None),
        "attn_output.bias" if qwen3 => ("self_attn.o_proj.bias", Fix::None),
        "attn_q_norm.weight" if qwen3 => ("self_attn.q_norm.weight", Fix::None),
        "attn_k_norm.weight" if qwen3 => ("self_attn.k_norm.weight", Fix::None),
        "attn_v.weight" => ("self_attn.v_proj.weight", Fix::None),
        "attn_output.weight" => ("self_attn.o_proj.weight", Fix::None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", Fix::None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", Fix::None),
        "ffn_up.weight" => ("mlp.up_proj.weight", Fix::None),
        "ffn_down.weight" => ("mlp.down_proj.weight", Fix::None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), fix))
}

/// The PyTorch shape each Hugging Face tensor must have.
fn expected_shape(hf: &str, p: &LlamaParams) -> Option<Vec<usize>> {
    let q = p.n_head.saturating_mul(p.head_dim);
    let kv = p.n_head_kv.saturating_mul(p.head_dim);
    let suffix = hf.rsplit_once("layers.").map(|(_, s)| s.split_once('.').map(|x| x.1).unwrap_or(""));
    Some(match (hf, suffix) {
        ("model.embed_tokens.weight", _) | ("lm_head.weight", _) => vec![p.vocab_size, p.n_embd],
        ("model.norm.weight", _) => vec![p.n_embd],
        (_, Some("input_layernorm.weight")) | (_, Some("post_attention_layernorm.weight")) => {
            vec![p.n_embd]
        }
        (_, Some("self_attn.q_proj.weight")) => vec![q, p.n_embd],
        (_, Some("self_attn.k_proj.weight")) | (_, Some("self_attn.v_proj.weight")) => {
            vec![kv, p.n_embd]
        }
        (_, Some("self_attn.o_proj.weight")) => vec![p.n_embd, q],
        (_, Some("self_attn.q_proj.bias")) => vec![q],
        (_, Some("self_attn.k_proj.bias")) | (_, Some("self_attn.v_proj.bias")) => vec![kv],
        (_, Some("self_attn.o_proj.bias")) => vec![p.n_embd],
        (_, Some("self_attn.q_norm.weight")) | (_, Some("self_attn.k_norm.weight")) => vec![p.head_dim],
        (_, Some("mlp.gate_proj.weight")) | (_, Some("mlp.up_proj.weight")) => {
            vec![p.n_ff, p.n_embd]
        }
        (_, Some("mlp.down_proj.weight")) => vec![p.n_embd, p.n_ff],
        _ => return None,
    })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io { path: path.to_path_buf(), source }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| GgufError::Json { path: path.to_path_buf(), source })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Import a llama GGUF as a Hugging Face model directory (see the module docs).
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let p = LlamaParams::from_gguf(&g)?;

    // Plan every tensor before writing anything, so bad input leaves no half-written directory.
    struct Planned<'a> {
        hf: String,
        info: &'a TensorInfo,
        shape: Vec<usize>,
        fix: Fix,
    }
    let mut plan: Vec<Planned> = Vec::with_capacity(g.tensors.len());
    let mut types = BTreeMap::new();
    for t in &g.tensors {
        if !t.ty.is_supported() {
            return Err(GgufError::UnsupportedTensorType { path: g.path.clone(), tensor: t.name.clone(), ty: t.ty });
        }
        let (hf, fix) = hf_name(&t.name, &p).ok_or_else(|| GgufError::Unsupported {
            path: g.path.clone(),
            what: format!("tensor '{}' has no Hugging Face Llama equivalent", t.name),
        })?;
        let shape = t.shape();
        let want = expected_shape(&hf, &p).unwrap_or_default();
        if shape != want {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!(
                    "tensor '{}' has shape {shape:?} (PyTorch order), expected {want:?} from the metadata",
                    t.name
                ),
            });
        }
        if plan.iter().any(|x| x.hf == hf) {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("tensor '{}' appears twice", t.name),
            });
        }
        *types.entry(t.ty).or_insert(0) += 1;
        plan.push(Planned { hf, info: t, shape, fix });
    }
    let mut required = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    for l in 0..p.n_layer {
        for part in
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        {
            required.push(format!("blk.{l}.{part}.weight"));
        }
        match p.arch {
            GgufArch::Llama => {}
            GgufArch::Qwen2 => required.extend(["attn_q", "attn_k", "attn_v"].map(|x| format!("blk.{l}.{x}.bias"))),
            GgufArch::Qwen3 => {
                required.extend(["attn_q_norm", "attn_k_norm"].map(|x| format!("blk.{l}.{x}.weight")));
                // Qwen3's attention_bias puts biases on all four projections, or none.
                let biases = ["attn_q", "attn_k", "attn_v", "attn_output"].map(|x| format!("blk.{l}.{x}.bias"));
                let present = biases.iter().filter(|n| g.tensor(n).is_some()).count();
                if present != 0 && present != 4 {
                    return Err(GgufError::Malformed {
                        path: g.path.clone(),
                        what: format!("layer {l} has {present} of the 4 attention biases (all or none)"),
                    });
                }
            }
        }
    }
    for name in required {
        if g.tensor(&name).is_none() {
            return Err(GgufError::MissingTensor { path: g.path.clone(), name });
        }
    }
    let tied = g.tensor("output.weight").is_none();
    let attention_bias = g.tensor("blk.0.attn_output.bias").is_some();
    plan.sort_by(|a, b| a.hf.cmp(&b.hf));

    // Build the text files first too: a tokenizer problem should fail before the big write.
    let tokenizer = build_tokenizer_json(&g)?;
    let tokenizer_config = build_tokenizer_config(&g, &p)?;
    let config = build_config(&g, &p, tied, attention_bias)?;
    let generation_config = build_generation_config(&g)?;

    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;

    // model.safetensors, streamed one tensor at a time.
    let st_path = out_dir.join("model.safetensors");
    let tmp_path = out_dir.join("model.safetensors.partial");
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in &plan {
        let bytes = t.info.n_elements() * 4;
        header
            .insert(t.hf.clone(), json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut header_text = serde_json::to_string(&Value::Object(header))
        .map_err(|source| GgufError::Json { path: st_path.clone(), source })?;
    while header_text.len() % 8 != 0 {
        header_text.push(' ');
    }
    let mut n_parameters = 0u64;
    {
        let file = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let werr = io_err(&tmp_path);
        w.write_all(&(header_text.len() as u64).to_le_bytes()).map_err(&werr)?;
        w.write_all(header_text.as_bytes()).map_err(&werr)?;
        let mut bytes = Vec::new();
        for t in &plan {
            let mut values = g.dequantize_tensor(t.info)?;
            if let Fix::Unpermute(n_head) = t.fix {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                values = unpermute_qk(&values, rows, cols, n_head).ok_or_else(|| GgufError::Malformed {
                    path: g.path.clone(),
                    what: format!(
                        "tensor '{}' with {rows} rows cannot be split into {n_head} rotary heads",
                        t.info.name
                    ),
                })?;
            }
            n_parameters += values.len() as u64;
            bytes.clear();
            bytes.reserve(values.len() * 4);
            for v in &values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&bytes).map_err(&werr)?;
        }
        w.flush().map_err(&werr)?;
    }
    std::fs::rename(&tmp_path, &st_path).map_err(io_err(&st_path))?;

    write_json(&out_dir.join("config.json"), &config)?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&out_dir.join("generation_config.json"), &generation_config)?;

    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        architecture: p.arch.name().into(),
        n_tensors: plan.len(),
        n_parameters,
        types,
        tied_embeddings: tied,
        files: [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    })
}

/// `config.json` for `LlamaForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`;
/// `attention_bias` (Qwen3) when the file has biases on the attention projections.
pub fn build_config(g: &GgufFile, p: &LlamaParams, tied: bool, attention_bias: bool) -> Result<Value> {
    let mut c = Map::new();
    c.insert("architectures".into(), json!([p.arch.hf_architecture()]));
    c.insert("model_type".into(), json!(p.arch.name()));
    c.insert("hidden_size".into(), json!(p.n_embd));
    c.insert("intermediate_size".into(), json!(p.n_ff));
    c.insert("num_hidden_layers".into(), json!(p.n_layer));
    c.insert("num_attention_heads".into(), json!(p.n_head));
    c.insert("num_key_value_heads".into(), json!(p.n_head_kv));
    c.insert("head_dim".into(), json!(p.head_dim));
    c.insert("rms_norm_eps".into(), json!(p.rms_norm_eps));
    c.insert("rope_theta".into(), json!(p.rope_theta));
    c.insert("rope_scaling".into(), p.rope_scaling.clone());
    c.insert("max_position_embeddings".into(), json!(p.context_length));
    c.insert("vocab_size".into(), json!(p.vocab_size));
    c.insert("tie_word_embeddings".into(), json!(tied));
    for name in ["bos", "eos", "pad"] {
        if let Some(id) = special_id(g, name)? {
            c.insert(format!("{name}_token_id"), json!(id));
        } else if name != "pad" {
            c.insert(format!("{name}_token_id"), Value::Null);
        }
    }
    c.insert("torch_dtype".into(), json!("float32"));
    c.insert("hidden_act".into(), json!("silu"));
    match p.arch {
        GgufArch::Llama => {
            c.insert("attention_bias".into(), json!(false));
            c.insert("mlp_bias".into(), json!(false));
            c.insert("pretraining_tp".into(), json!(1));
        }
        // Qwen2's q/k/v biases are implied by the architecture.
        GgufArch::Qwen2 => {
            c.insert("use_sliding_window".into(), json!(false));
        }
        GgufArch::Qwen3 => {
            c.insert("attention_bias".into(), json!(attention_bias));
            c.insert("use_sliding_window".into(), json!(false));
        }
    }
    c.insert("attention_dropout".into(), json!(0.0));
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("use_cache".into(), json!(true));
    Ok(Value::Object(c))
}

/// `generation_config.json`.
pub fn build_generation_config(g: &GgufFile) -> Result<Value> {
    let mut c = Map::new();
    for name in ["bos", "eos", "pad"] {
        if let Some(id) = special_id(g, name)? {
            c.insert(format!("{name}_token_id"), json!(id));
        }
    }
    c.insert("_from_model_config".into(), json!(true));
    Ok(Value::Object(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward permutation: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = vec![0f32; w.len()];
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    // permuted index (h, i, j) takes original index (h, j, i)
                    let dst = h * hd + i * 2 + j;
                    let src = h * hd + j * half + i;
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_small_example() {
        // one head of 4 rows: HF rows [0,1,2,3] are stored as [0,2,1,3]
        assert_eq!(unpermute_qk(&[0., 2., 1., 3.], 4, 1, 1).unwrap(), vec![0., 1., 2., 3.]);
        // two heads of 6 rows, 2 columns
        let rows = 12;
        let cols = 2;
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, cols, 2);
        // head 0, permuted row 1 = original row 3 (j = 1, i = 0 with half = 3)
        assert_eq!(&p[2..4], &w[6..8]);
        assert_eq!(unpermute_qk(&p, rows, cols, 2).unwrap(), w);
    }

    #[test]
    fn unpermute_inverts_permute_for_q_and_k_shapes() {
        // SmolLM2-like: 9 query heads, 3 kv heads, head_dim 64, 8 columns
        for (n_head, rows) in [(9usize, 576usize), (3, 192)] {
            let cols = 8;
            let w: Vec<f32> = (0..rows * cols).map(|x| (x as f32).sin()).collect();
            let p = permute(&w, rows, cols, n_head);
            assert_ne!(p, w);
            assert_eq!(unpermute_qk(&p, rows, cols, n_head).unwrap(), w);
        }
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 4).is_none());
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 2).is_none()); // odd head_dim
    }

    #[test]
    fn hf_names() {
        let p = LlamaParams {
            arch: GgufArch::Llama,
            n_layer: 2,
            n_embd: 8,
            n_ff: 16,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            context_length: 16,
            vocab_size: 10,
            rope_scaling: Value::Null,
        };
        assert_eq!(
            hf_name("blk.1.attn_k.weight", &p),
            Some(("model.layers.1.self_attn.k_proj.weight".into(), Fix::Unpermute(1)))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", &p),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), Fix::Unpermute(2)))
        );
        assert_eq!(hf_name("blk.2.attn_q.weight", &p), None);
        assert_eq!(hf_name("blk.01.attn_q.weight", &p), None);
        assert_eq!(hf_name("blk.0.ffn_gate_exps.weight", &p), None);
        assert_eq!(expected_shape("model.layers.0.self_attn.k_proj.weight", &p), Some(vec![4, 8]));
        assert_eq!(expected_shape("model.layers.1.mlp.down_proj.weight", &p), Some(vec![8, 16]));
        assert_eq!(f32_decimal(9.999999747378752e-06), 1e-5);
    }
}
