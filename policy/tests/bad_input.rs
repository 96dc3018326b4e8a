//! Bad model files give clear errors that name the problem; nothing panics.
use selfplay_policy::{Llama, Policy, PolicyError};
use std::path::Path;
use tch::{Device, Kind};

fn tiny(dir: &Path) {
    selfplay_tests::tiny_model(dir, "gqa_tied", 2);
}

fn load_err(dir: &Path) -> String {
    match Policy::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_directory_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(&tmp.path().join("nope"));
    assert!(e.contains("nope") && e.contains("not found"), "{e}");
    tiny(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
    tiny(tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let f = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
    std::fs::write(&f, b"garbage").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("invalid safetensors"), "{e}");
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
    cfg["model_type"] = serde_json::json!("gemma");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = Llama::load(tmp.path(), Device::Cpu, Kind::Float).err().expect("refused");
    assert!(matches!(e, PolicyError::UnsupportedArchitecture { .. }), "{e}");
    assert!(e.to_string().contains("GemmaForCausalLM"), "{e}");
    // A supported architecture under another family's model_type.
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["model_type"] = serde_json::json!("llama");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = Llama::load(tmp.path(), Device::Cpu, Kind::Float).err().expect("refused");
    assert!(matches!(e, PolicyError::UnsupportedArchitecture { .. }), "{e}");
}

/// Llama weights under a Qwen2 config: Qwen2 needs q/k/v biases, which the file lacks.
#[test]
fn family_whose_tensors_the_file_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["model_type"] = serde_json::json!("qwen2");
    std::fs::write(&p, cfg.to_string()).unwrap();
    match Llama::load(tmp.path(), Device::Cpu, Kind::Float).err().expect("refused") {
        PolicyError::MissingTensor { name, .. } => assert_eq!(name, "model.layers.0.self_attn.q_proj.bias"),
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn config_that_does_not_match_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let p = tmp.path().join("config.json");
    let orig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // Wrong width: shapes differ.
    let mut cfg = orig.clone();
    cfg["intermediate_size"] = serde_json::json!(128);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]"), "{e}");
    // More layers than the file has: a tensor is missing.
    let mut cfg = orig.clone();
    cfg["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("missing tensor model.layers.2"), "{e}");
    // Untied config over tied weights: lm_head is missing.
    let mut cfg = orig.clone();
    cfg["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("lm_head.weight"), "{e}");
    // Nonsense values.
    let mut cfg = orig.clone();
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("num_key_value_heads"), "{e}");
    std::fs::write(&p, "{not json").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn token_ids_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    tiny(tmp.path());
    let p = Policy::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let e = p.generate(&[vec![1, 5, 999]], &selfplay_policy::SamplingConfig::greedy(3)).unwrap_err();
    assert!(e.to_string().contains("999"), "{e}");
    let e = selfplay_policy::Scorer::new(&p.model).score(&[(vec![1], vec![-4])]).err().unwrap();
    assert!(e.to_string().contains("-4"), "{e}");
    let e = p.generate(&[vec![]], &selfplay_policy::SamplingConfig::greedy(3)).unwrap_err();
    assert!(e.to_string().contains("non-empty"), "{e}");
}
