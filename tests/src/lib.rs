//! Shared by every test: the reference Python, tiny random models made by transformers, and
//! the real SmolLM2 model made by the setup.
pub mod hub_server;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter with torch and transformers (set by scripts/env.sh). A missing
/// interpreter fails the test: a parity test that silently passes checks nothing.
pub fn python() -> PathBuf {
    PathBuf::from(
        std::env::var("SELFPLAY_PYTHON")
            .expect("SELFPLAY_PYTHON is not set: run the tests through scripts/test.sh (see README)"),
    )
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python").join(name)
}

/// Runs a script of tests/python and panics with its stderr when it fails.
pub fn run_python(script_name: &str, args: &[&str]) {
    let out = Command::new(python()).arg(script(script_name)).args(args).output().expect("cannot start python");
    assert!(out.status.success(), "python {script_name} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Writes a tiny random Llama (transformers' own init, widened) and a word-level tokenizer
/// with the 211 tokens "t0".."t210" and a ChatML template, so that it loads as a Policy.
pub fn tiny_model(dir: &Path, variant: &str, seed: u64) {
    run_python("hf_reference.py", &["make-tiny", dir.to_str().unwrap(), variant, &seed.to_string()]);
    tiny_tokenizer(dir);
}

/// A reward model (LlamaForSequenceClassification) of the same family, with the tokenizer.
pub fn tiny_reward_model(dir: &Path, variant: &str, seed: u64) {
    run_python("hf_reference.py", &["make-tiny-classifier", dir.to_str().unwrap(), variant, &seed.to_string()]);
    tiny_tokenizer(dir);
}

pub fn tiny_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..211).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    // Every word outside the vocabulary maps to t0, so any text renders to valid ids.
    let cfg = serde_json::json!({
        "eos_token": "t2", "bos_token": "t1", "pad_token": "t0",
        "chat_template": "{% for m in messages %}t3 {{ m['role'] }} {{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3 assistant {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

/// The imported SmolLM2-135M-Instruct directory (made by the setup).
pub fn smollm2_dir() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("SELFPLAY_MODEL")
            .expect("SELFPLAY_MODEL is not set: run the tests through scripts/test.sh (see README)"),
    );
    assert!(p.join("model.safetensors").exists(), "{} has no imported model", p.display());
    p
}

/// The public evaluation sets (AlpacaEval, MT-bench, Vicuna-80): `$SELFPLAY_DATA`, which
/// scripts/env.sh points at `../shared/data` beside the clone. They are data the user provides,
/// not part of the repository, so a missing directory fails the test with what to do.
pub fn shared_data() -> PathBuf {
    let dir = std::env::var("SELFPLAY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    assert!(
        dir.is_dir(),
        "the evaluation sets are missing: SELFPLAY_DATA={} is not a directory. Point SELFPLAY_DATA at a \
         folder holding alpaca_eval/alpaca_eval.json, mt_bench/question.jsonl and vicuna_bench/question.jsonl \
         (README, \"Evaluation sets\", says where to get them); scripts/test.sh defaults it to \
         ../shared/data beside the clone",
        dir.display()
    );
    dir
}

/// One file of [`shared_data`], e.g. `alpaca_eval/alpaca_eval.json`; fails the test with what to
/// do when it is missing.
pub fn shared_data_file(rel: &str) -> PathBuf {
    let p = shared_data().join(rel);
    assert!(
        p.is_file(),
        "{} is missing from SELFPLAY_DATA (README, \"Evaluation sets\", says where to get it)",
        p.display()
    );
    p
}

/// A test CA (`ca.pem`) and a server certificate it signed for localhost and 127.0.0.1
/// (`cert.pem`, `key.pem`) in `dir`, made with the openssl command.
pub fn make_certificates(dir: &Path) {
    let ext = dir.join("leaf.ext");
    std::fs::write(&ext, "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let runs: Vec<Vec<String>> = vec![
        [&["req", "-x509"][..], &ec, &["-days", "1", "-subj", "/CN=selfplay-test-ca", "-keyout"]]
            .concat()
            .into_iter()
            .map(String::from)
            .chain([p("ca.key"), "-out".into(), p("ca.pem")])
            .collect(),
        [&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout"]]
            .concat()
            .into_iter()
            .map(String::from)
            .chain([p("key.pem"), "-out".into(), p("leaf.csr")])
            .collect(),
        ["x509", "-req", "-days", "1", "-in"]
            .into_iter()
            .map(String::from)
            .chain([p("leaf.csr"), "-CA".into(), p("ca.pem"), "-CAkey".into(), p("ca.key"), "-CAcreateserial".into()])
            .chain(["-extfile".into(), p("leaf.ext"), "-out".into(), p("cert.pem")])
            .collect(),
    ];
    for args in runs {
        let out = Command::new("openssl").args(&args).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
