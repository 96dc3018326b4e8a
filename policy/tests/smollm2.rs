//! The real default model, SmolLM2-135M-Instruct imported from its GGUF: it answers, its chat
//! template renders as transformers renders it, and batched greedy decoding of unequal-length
//! prompts equals transformers' one-prompt-at-a-time decoding.
use selfplay_policy::{ChatMessage, Policy, SamplingConfig};
use tch::{Device, Kind};

fn policy() -> Policy {
    Policy::load(&selfplay_tests::smollm2_dir(), Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn answers_the_capital_of_france() {
    let p = policy();
    let prompt = p.user_prompt("What is the capital of France?").unwrap();
    let out = p.generate(&[prompt], &SamplingConfig::greedy(32)).unwrap();
    assert!(out[0].text.contains("Paris"), "answer: {:?}", out[0].text);
    assert_eq!(out[0].finish_reason, selfplay_policy::FinishReason::Eos);
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::user("Hello!")],
        vec![ChatMessage::system("You are terse."), ChatMessage::user("  spaces  and\ttabs\n")],
        vec![
            ChatMessage::user("Héllo wörld — 你好 🎉"),
            ChatMessage::assistant("Hi."),
            ChatMessage::user("Count: 1 22 333"),
        ],
    ]
}

#[test]
fn chat_template_renders_like_transformers() {
    let p = policy();
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.json");
    let outp = tmp.path().join("out.json");
    std::fs::write(&inp, serde_json::json!({"conversations": conversations()}).to_string()).unwrap();
    let dir = selfplay_tests::smollm2_dir();
    selfplay_tests::run_python(
        "hf_reference.py",
        &["chat", dir.to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    let mut k = 0;
    for c in conversations() {
        for gen in [true, false] {
            let got = p.tokenizer.render_chat(&c, gen).unwrap();
            assert_eq!(got, want["rendered"][k].as_str().unwrap(), "conversation {k}");
            k += 1;
        }
    }
}

/// A template of our own that uses what HF templates use: trim/lstrip blocks, Python string
/// methods, loop controls, tojson, raise_exception. transformers must render it identically.
#[test]
fn template_engine_matches_transformers_features() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(selfplay_tests::smollm2_dir().join(f), dir.join(f)).unwrap();
    }
    let template = r#"{%- if messages[0]['role'] == 'system' %}
    {%- set sys = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set sys = "default" %}
    {%- set rest = messages %}
{%- endif %}
<<{{ sys.upper() }}>>
{% for m in rest %}
    {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
    {% if loop.index0 > 5 %}{% break %}{% endif %}
    [{{ m['role'] | upper }}] {{ m['content'].strip() }} {{ {'len': m['content'] | length, 'r': m['role']} | tojson }}
{% endfor %}
{%- if add_generation_prompt %}[ASSISTANT]{% endif %}"#;
    let cfg = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = selfplay_policy::Tokenizer::load(dir).unwrap();
    let inp = dir.join("in.json");
    let outp = dir.join("out.json");
    std::fs::write(&inp, serde_json::json!({"conversations": conversations()}).to_string()).unwrap();
    selfplay_tests::run_python(
        "hf_reference.py",
        &["chat", dir.to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    let mut k = 0;
    for c in conversations() {
        for gen in [true, false] {
            assert_eq!(tok.render_chat(&c, gen).unwrap(), want["rendered"][k].as_str().unwrap(), "conversation {k}");
            k += 1;
        }
    }
    let err = tok.render_chat(&[ChatMessage { role: "tool".into(), content: "x".into() }], true).unwrap_err();
    assert!(err.to_string().contains("bad role"), "{err}");
}

#[test]
fn batched_greedy_equals_transformers() {
    let p = policy();
    let prompts: Vec<Vec<i64>> = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers greater than 100 and explain why each is prime.",
    ]
    .iter()
    .map(|q| p.user_prompt(q).unwrap())
    .collect();
    let got = p.generate(&prompts, &SamplingConfig::greedy(24)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.json");
    let outp = tmp.path().join("out.json");
    std::fs::write(&inp, serde_json::json!({"prompts": prompts, "max_new_tokens": 24, "eos": p.eos_ids}).to_string())
        .unwrap();
    let dir = selfplay_tests::smollm2_dir();
    selfplay_tests::run_python(
        "hf_reference.py",
        &["greedy", dir.to_str().unwrap(), inp.to_str().unwrap(), outp.to_str().unwrap()],
    );
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&outp).unwrap()).unwrap();
    for (i, c) in got.iter().enumerate() {
        let w: Vec<i64> = serde_json::from_value(want["greedy"][i].clone()).unwrap();
        // transformers pads finished rows with EOS; compare up to and including the first EOS.
        let end = w.iter().position(|t| p.eos_ids.contains(t)).map(|e| e + 1).unwrap_or(w.len());
        assert_eq!(c.completion_ids, w[..end].to_vec(), "prompt {i}: {:?}", c.text);
    }
}
