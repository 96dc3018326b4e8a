//! GGUF import against independent references:
//!
//! * every supported ggml type dequantizes bit-identically to the `gguf` Python package;
//! * importing SmolLM2-135M-Instruct (Q4_1) gives the same tensors as transformers' own GGUF load;
//! * the rebuilt `tokenizer.json` gives the same ids as transformers' GGUF tokenizer;
//! * bad input gives the expected `GgufError`.
//!
//! Needs `SELFPLAY_PYTHON` (a python with torch, transformers, gguf, accelerate) and
//! `SELFPLAY_GGUF` (the SmolLM2 gguf); `source scripts/env.sh` sets both.

#![allow(clippy::manual_is_multiple_of)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};
use selfplay_policy::gguf::{self, GgmlType, GgufError, GgufFile};

fn python() -> PathBuf {
    PathBuf::from(std::env::var("SELFPLAY_PYTHON").unwrap_or_else(|_| {
        panic!("SELFPLAY_PYTHON is not set: point it at the python with torch, transformers and gguf (source scripts/env.sh)")
    }))
}

fn smollm_gguf() -> PathBuf {
    let p = PathBuf::from(std::env::var("SELFPLAY_GGUF").unwrap_or_else(|_| {
        panic!("SELFPLAY_GGUF is not set: point it at SmolLM2-135M-Instruct.Q4_1.gguf (source scripts/env.sh)")
    }));
    assert!(p.is_file(), "SELFPLAY_GGUF={} is not a file", p.display());
    p
}

fn reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/gguf_reference.py")
}

fn run_reference(args: &[&str]) {
    let out = Command::new(python()).arg(reference_script()).args(args).output().expect("cannot run SELFPLAY_PYTHON");
    assert!(
        out.status.success(),
        "gguf_reference.py {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn dequantization_matches_gguf_python_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    run_reference(&["write-types", s(dir.path())]);
    let file = GgufFile::open(dir.path().join("types.gguf")).unwrap();
    let mut seen = BTreeSet::new();
    for t in &file.tensors {
        let ours = file.dequantize_tensor(t).unwrap();
        let bytes = std::fs::read(dir.path().join(format!("{}.f32", t.name))).unwrap();
        let theirs: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(ours.len(), theirs.len(), "{}: element count", t.name);
        let mismatches: Vec<_> =
            ours.iter().zip(&theirs).enumerate().filter(|(_, (a, b))| a.to_bits() != b.to_bits()).take(5).collect();
        assert!(mismatches.is_empty(), "{} differs from gguf.quants.dequantize: {mismatches:?}", t.name);
        assert_eq!(t.ty.name(), t.name);
        println!("{}: {} values bit-identical", t.name, ours.len());
        seen.insert(t.ty);
    }
    for ty in gguf::SUPPORTED_TYPES {
        assert!(seen.contains(ty), "no reference tensor for {ty}");
    }
}

fn f32s(data: &[u8]) -> impl Iterator<Item = f32> + '_ {
    data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[test]
fn smollm_import_matches_transformers() {
    let gguf_path = smollm_gguf();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let summary = gguf::import_gguf(&gguf_path, &out).unwrap();
    println!("{summary:?}");
    let types: Vec<String> = summary.types.keys().map(|t| t.name()).collect();
    println!("types in the SmolLM2 file: {types:?}");
    assert!(summary.tied_embeddings);
    assert_eq!(summary.n_tensors, 272);
    for ty in summary.types.keys() {
        assert!(ty.is_supported());
    }

    run_reference(&["dump-model", s(&gguf_path), s(dir.path())]);

    let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs_bytes = std::fs::read(dir.path().join("reference.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&ours_bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let our_names: BTreeSet<&str> = ours.names().into_iter().collect();
    let their_names: BTreeSet<&str> = theirs.names().into_iter().collect();
    assert_eq!(our_names, their_names, "tensor names differ");

    let mut max_diff = 0f32;
    let mut worst = String::new();
    let mut n_params = 0u64;
    let mut n_differing = 0usize;
    for name in &our_names {
        let a = ours.tensor(name).unwrap();
        let b = theirs.tensor(name).unwrap();
        assert_eq!(a.dtype(), Dtype::F32, "{name}");
        assert_eq!(b.dtype(), Dtype::F32, "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}: shapes differ");
        for (x, y) in f32s(a.data()).zip(f32s(b.data())) {
            n_params += 1;
            if x.to_bits() != y.to_bits() {
                n_differing += 1;
                let d = (x - y).abs();
                if d.is_nan() || d > max_diff {
                    max_diff = d;
                    worst = name.to_string();
                }
            }
        }
    }
    println!(
        "compared {} tensors, {n_params} values: {n_differing} differ in bits, max abs diff {max_diff:e} ({worst})",
        our_names.len()
    );
    assert_eq!(n_params, summary.n_parameters);
    assert!(max_diff <= 1e-6, "max abs diff {max_diff:e} in {worst}");

    // config.json agrees with the config transformers derived from the same file.
    let read =
        |p: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap() };
    let ours = read(out.join("config.json"));
    let theirs = read(dir.path().join("reference_config.json"));
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "model_type",
    ] {
        assert_eq!(ours[key], theirs[key], "config.json {key}");
    }
    let eps = ours["rms_norm_eps"].as_f64().unwrap();
    assert_eq!(eps as f32, theirs["rms_norm_eps"].as_f64().unwrap() as f32);
    let theta = theirs["rope_theta"].as_f64().or_else(|| theirs["rope_parameters"]["rope_theta"].as_f64()).unwrap();
    assert_eq!(ours["rope_theta"].as_f64().unwrap(), theta);
    assert_eq!(ours["rope_scaling"], serde_json::Value::Null);
    assert_eq!(ours["torch_dtype"], "float32");

    let tc = read(out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    let gc = read(out.join("generation_config.json"));
    assert_eq!(gc["bos_token_id"], 1);
    assert_eq!(gc["eos_token_id"], 2);

    // The directory loads in plain transformers and computes what the GGUF load computes.
    let check = dir.path().join("check.json");
    run_reference(&["check-hf-dir", s(&gguf_path), s(&out), s(&check)]);
    let check = read(check);
    println!(
        "transformers on the imported directory: max abs logit diff {} vs the GGUF load; greedy completion {:?}",
        check["max_abs_logit_diff"], check["completion"]
    );
    assert_eq!(check["max_abs_logit_diff"].as_f64(), Some(0.0));
    assert!(check["text"].as_str().unwrap().starts_with("<|im_start|>system\n"));
    assert_eq!(check["ids"][0], 1, "the chat prompt starts with <|im_start|>");
}

/// ~300 strings covering ASCII, unicode, digit runs, whitespace, code and special tokens.
fn tokenizer_strings() -> Vec<String> {
    let base: Vec<&str> = vec![
        // ASCII sentences
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure you'll agree it's what we've wanted, isn't it?",
        "SHOUTING IN ALL CAPS and MixedCase words",
        "Don't stop; keep going -- almost there...",
        "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e",
        "Mr. Smith's dog isn't called 'Rex'.",
        "A sentence with (parentheses) [brackets] {braces} <angles>.",
        "Question? Answer! Exclamation!!! Ellipsis…",
        "tab\tseparated\tvalues",
        // unicode
        "café naïve résumé coöperate",
        "e\u{301} vs é (combining accent)",
        "日本語のテキストです。",
        "中文分词测试，标点符号！",
        "한국어 문장입니다",
        "Привет, мир! Как дела?",
        "Ελληνικά γράμματα",
        "עברית מימין לשמאל",
        "العربية من اليمين",
        "emoji 🙂🚀👍🏽 and more 🎉",
        "family 👨‍👩‍👧‍👦 zwj",
        "flags 🇫🇷🇯🇵",
        "math ∑∫√∞ ≤ ≥ ≠ ±",
        "ß ẞ ﬁ ligature Å Ω µ",
        "\u{00a0}non-breaking\u{00a0}space\u{200b}zero-width",
        // digits
        "12345",
        "1234567890123",
        " 12345 ",
        "3.14159 and 2.71828",
        "1,000,000 dollars",
        "2024-06-11T12:34:56Z",
        "x=42; y=-7; z=0.001",
        "007 0x1F 0b1010 1e-5",
        "Call 555-0100 ext. 99",
        "٣٤٥ ١٢ (Arabic-Indic digits) ４５６ (full-width)",
        // whitespace
        " ",
        "  ",
        "   leading spaces",
        "trailing spaces   ",
        "a  b   c    d",
        "\n",
        "\n\n\n",
        "line1\nline2\r\nline3",
        "\t\t\tindented",
        " \n \n ",
        "  \n\n\t x",
        "end with newline\n",
        // code
        "fn main() { println!(\"hi {}\", 1 + 2); }",
        "def f(x):\n    return x ** 2\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "<div class=\"a\">Text &amp; more</div>",
        "SELECT id, name FROM users WHERE age >= 18;",
        "#include <stdio.h>\nint main(void) { return 0; }",
        "const f = (a, b) => a ?? b || c && d;",
        "    if x:\n        pass\n    else:\n\tpass",
        "{\"key\": [1, 2, {\"nested\": null}], \"b\": true}",
        "$ echo $HOME | grep -v '^#' > /dev/null 2>&1",
        // special tokens embedded in text
        "<|im_start|>user\nHello!<|im_end|>\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "a<|endoftext|>b",
        "<|im_start|><|im_end|>",
        " <|im_start|> spaced <|im_end|> ",
        "text<|im_end|>more text",
        "<repo_name>selfplay<file_sep>main.rs",
        "<|im_start|",
        "<|im_end|>!",
        "<jupyter_code>print(1)<jupyter_output>1",
    ];
    let seps = ["", " ", "\n", "  ", "\t", ". ", "123"];
    let mut out: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    // Deterministic combinations of the base strings.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    while out.len() < 300 {
        let k = 2 + next(2);
        let mut s = String::new();
        for i in 0..k {
            if i > 0 {
                s.push_str(seps[next(seps.len())]);
            }
            s.push_str(base[next(base.len())]);
        }
        out.push(s);
    }
    out
}

#[test]
fn smollm_tokenizer_matches_transformers() {
    let gguf_path = smollm_gguf();
    let dir = tempfile::tempdir().unwrap();
    let file = GgufFile::open(&gguf_path).unwrap();
    let tokenizer_json = gguf::build_tokenizer_json(&file).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json.to_string()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).unwrap();

    let strings = tokenizer_strings();
    let strings_path = dir.path().join("strings.json");
    std::fs::write(&strings_path, serde_json::to_string(&strings).unwrap()).unwrap();
    let ids_path = dir.path().join("ids.json");
    run_reference(&["tokenize", s(&gguf_path), s(&strings_path), s(&ids_path)]);
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ids_path).unwrap()).unwrap();
    assert_eq!(reference["pre"], "smollm");
    let ids_of = |key: &str| -> Vec<Vec<u32>> {
        let v: Vec<Vec<u32>> = serde_json::from_value(reference[key].clone()).unwrap();
        assert_eq!(v.len(), strings.len(), "{key}");
        v
    };
    // transformers' GGUF tokenizer with llama.cpp's "smollm" pre-tokenizer (digits split off
    // first, as in SmolLM2's own tokenizer.json): must match exactly.
    let reference = ids_of("ids");
    // transformers' GGUF tokenizer as it loads: it ignores "smollm" and uses plain GPT-2
    // splitting, which differs only where whitespace directly precedes a digit.
    let as_loaded = ids_of("ids_transformers");

    let mut failures = Vec::new();
    let mut differ_from_as_loaded = 0;
    for ((text, want), loaded) in strings.iter().zip(&reference).zip(&as_loaded) {
        let got = tokenizer.encode(text.as_str(), false).unwrap();
        if got.get_ids() != want.as_slice() {
            failures.push(format!("{text:?}:\n  ours   {:?}\n  theirs {want:?}", got.get_ids()));
        }
        if got.get_ids() != loaded.as_slice() {
            differ_from_as_loaded += 1;
            let ws_before_digit =
                text.chars().zip(text.chars().skip(1)).any(|(a, b)| a.is_whitespace() && b.is_numeric());
            assert!(
                ws_before_digit,
                "{text:?} differs from transformers' GGUF tokenizer without whitespace before a digit:\n  ours   {:?}\n  theirs {loaded:?}",
                got.get_ids()
            );
        }
    }
    println!(
        "{} of {} strings tokenize identically to transformers' GGUF tokenizer with llama.cpp's smollm pre-tokenizer; \
         {differ_from_as_loaded} differ from it as loaded (all with whitespace before a digit)",
        strings.len() - failures.len(),
        strings.len()
    );
    assert!(
        failures.is_empty(),
        "{} strings differ:\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );

    // Special tokens are single tokens, and decoding round-trips.
    let enc = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    for text in strings.iter().take(60) {
        let ids = tokenizer.encode(text.as_str(), false).unwrap();
        let back = tokenizer.decode(ids.get_ids(), false).unwrap();
        assert_eq!(&back, text);
    }
}

// --- bad input ---------------------------------------------------------------------------------

/// A minimal GGUF v3 writer for hand-made bad files.
struct MiniGguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl MiniGguf {
    fn new() -> Self {
        MiniGguf { kv: vec![], n_kv: 0, infos: vec![], n_tensors: 0, data: vec![] }
    }
    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    fn key(&mut self, k: &str, ty: u32) {
        Self::string(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k, 8);
        Self::string(&mut self.kv, v);
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn f32(mut self, k: &str, v: f32) -> Self {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: usize) -> Self {
        while self.data.len() % 32 != 0 {
            self.data.push(0);
        }
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.resize(self.data.len() + bytes, 0);
        self.n_tensors += 1;
        self
    }
    fn write(self, path: &Path) {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(self.kv);
        b.extend(self.infos);
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(self.data);
        std::fs::write(path, b).unwrap();
    }
}

fn llama_header() -> MiniGguf {
    MiniGguf::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 256)
        .u32("llama.feed_forward_length", 512)
        .u32("llama.attention.head_count", 4)
        .u32("llama.context_length", 128)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
}

#[test]
fn bad_input_gives_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    // missing file
    let missing = dir.path().join("does-not-exist.gguf");
    let e = gguf::import_gguf(&missing, &out).unwrap_err();
    println!("missing file: {e}");
    assert!(matches!(&e, GgufError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{e:?}");
    assert!(e.to_string().contains("does-not-exist.gguf"), "{e}");

    // bad magic
    let bad_magic = dir.path().join("bad-magic.gguf");
    std::fs::write(&bad_magic, b"PK\x03\x04 this is a zip, not a gguf file").unwrap();
    let e = gguf::import_gguf(&bad_magic, &out).unwrap_err();
    println!("bad magic: {e}");
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e:?}");
    assert!(e.to_string().contains("bad magic") && e.to_string().contains("bad-magic.gguf"), "{e}");

    // truncated: the real file cut in half (tensor data missing)
    let real = std::fs::read(smollm_gguf()).unwrap();
    let half = dir.path().join("half.gguf");
    std::fs::write(&half, &real[..real.len() / 2]).unwrap();
    let e = gguf::import_gguf(&half, &out).unwrap_err();
    println!("cut in half: {e}");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated") && e.to_string().contains("extends past the end"), "{e}");

    // truncated inside the header (in the vocabulary)
    let short = dir.path().join("short.gguf");
    std::fs::write(&short, &real[..100_000]).unwrap();
    let e = gguf::import_gguf(&short, &out).unwrap_err();
    println!("header cut: {e}");
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    assert!(e.to_string().contains("header cut short"), "{e}");

    // not llama
    let gpt2 = dir.path().join("gpt2.gguf");
    MiniGguf::new().str("general.architecture", "gpt2").write(&gpt2);
    let e = gguf::import_gguf(&gpt2, &out).unwrap_err();
    println!("architecture: {e}");
    assert!(matches!(&e, GgufError::UnsupportedArchitecture { found, .. } if found == "gpt2"), "{e:?}");
    assert!(e.to_string().contains("'gpt2'") && e.to_string().contains("llama"), "{e}");

    // no architecture at all
    let none = dir.path().join("none.gguf");
    MiniGguf::new().u32("general.alignment", 32).write(&none);
    let e = gguf::import_gguf(&none, &out).unwrap_err();
    println!("no architecture: {e}");
    assert!(matches!(&e, GgufError::MissingKey { key, .. } if key == "general.architecture"), "{e:?}");

    // a missing hyper-parameter
    let no_layers = dir.path().join("no-layers.gguf");
    MiniGguf::new().str("general.architecture", "llama").write(&no_layers);
    let e = gguf::import_gguf(&no_layers, &out).unwrap_err();
    println!("missing key: {e}");
    assert!(matches!(&e, GgufError::MissingKey { key, .. } if key == "llama.block_count"), "{e:?}");
    assert!(e.to_string().contains("llama.block_count"), "{e}");

    // an unsupported tensor type (IQ2_XXS = 16, 66 bytes per 256 values)
    let iq = dir.path().join("iq2.gguf");
    llama_header().tensor("token_embd.weight", &[256, 8], 16, 8 * 66).write(&iq);
    let e = gguf::import_gguf(&iq, &out).unwrap_err();
    println!("tensor type: {e}");
    assert!(
        matches!(&e, GgufError::UnsupportedTensorType { tensor, ty: GgmlType::IQ2_XXS, .. } if tensor == "token_embd.weight"),
        "{e:?}"
    );
    assert!(e.to_string().contains("IQ2_XXS") && e.to_string().contains("token_embd.weight"), "{e}");

    // an unknown tensor type id
    let unknown = dir.path().join("unknown.gguf");
    llama_header().tensor("token_embd.weight", &[256, 8], 200, 0).write(&unknown);
    let e = gguf::import_gguf(&unknown, &out).unwrap_err();
    println!("unknown type: {e}");
    assert!(matches!(&e, GgufError::UnsupportedTensorType { ty: GgmlType::Unknown(200), .. }), "{e:?}");
    assert!(e.to_string().contains("200"), "{e}");

    // nothing was written for any of them
    assert!(!out.join("model.safetensors").exists());
}

/// Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms, explicit head_dim) and Qwen3 with attention
/// biases: a random tiny model written as a GGUF of its architecture by the gguf package,
/// imported, loads with the same config and bit-identical weights as the model it came from,
/// and generates the same tokens.
#[test]
fn qwen_gguf_import_round_trips() {
    use selfplay_policy::{GenRequest, Generator, Llama, SamplingConfig, Tokenizer};
    use tch::{Device, Kind};
    for (variant, arch) in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen3_bias", "qwen3")] {
        let tmp = tempfile::tempdir().unwrap();
        let (orig, out) = (tmp.path().join("orig"), tmp.path().join("out"));
        let file = tmp.path().join("model.gguf");
        selfplay_tests::run_python("hf_reference.py", &["make-tiny", s(&orig), variant, "7"]);
        run_reference(&["write-model", s(&orig), s(&file)]);
        let summary = gguf::import_gguf(&file, &out).unwrap();
        assert_eq!(summary.architecture, arch);
        assert_eq!(summary.tied_embeddings, variant == "qwen2" || variant == "qwen3");

        let a = Llama::load(&orig, Device::Cpu, Kind::Float).unwrap();
        let b = Llama::load(&out, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(a.config(), b.config(), "{variant}: config");
        assert_eq!(a.parameters().len(), b.parameters().len());
        for ((n, x), (m, y)) in a.parameters().iter().zip(b.parameters()) {
            assert_eq!(n, m);
            assert!(x.equal(y), "{variant}: tensor {n} differs");
        }
        let tok = Tokenizer::load(&out).unwrap();
        assert_eq!(tok.encode("ab a", false).unwrap(), vec![27, 26, 0], "{variant}: tokenizer");
        assert_eq!(tok.decode(&[27, 26, 0], false).unwrap(), "ab a");
        let prompts = vec![vec![1, 5, 9, 33, 17, 101, 7], vec![1, 44]];
        let cfg = SamplingConfig::greedy(8);
        let ga = Generator::new(&a, &tok, &[]).run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg).unwrap().0;
        let gb = Generator::new(&b, &tok, &[]).run(&GenRequest::from_prompts(&prompts, cfg.seed), &cfg).unwrap().0;
        for (x, y) in ga.iter().zip(&gb) {
            assert_eq!(x.completion_ids, y.completion_ids, "{variant}");
        }
    }
}
