"""Reference side of the parity tests: tiny random models (Llama, Mistral, Qwen2, Qwen3) through
transformers.

Subcommands (all paths explicit, output as JSON so the Rust tests need no Python parsing):
  make-tiny OUT_DIR VARIANT SEED     write a random model (config.json + model.safetensors)
  logits MODEL_DIR IN_JSON OUT_JSON  per-prompt logits (no padding) and greedy continuations
  scores MODEL_DIR IN_JSON OUT_JSON  sequence-classifier scores, one per sequence
"""
import json
import sys

import torch
import transformers

VARIANTS = {
    # grouped-query attention, tied embeddings (the SmolLM2 shape family)
    "gqa_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # multi-head attention, untied output head
    "mha_untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    # Llama-3.2 shape family: GQA, tied, llama3 rope scaling, large theta
    "llama3_rope": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    # head_dim different from hidden_size / num_attention_heads
    "head_dim": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                     tie_word_embeddings=False),
    # Qwen2/Qwen2.5: q/k/v biases (no o_proj bias), GQA, tied (the small Qwen2.5 shape)
    "qwen2": dict(family="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen2 with use_sliding_window: layers from max_window_layers on attend through a window of 5
    "qwen2_window": dict(family="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
                         max_window_layers=1),
    # Qwen3: per-head q/k RMSNorm, head_dim not hidden_size / heads
    "qwen3": dict(family="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen3 with attention_bias (biases on q, k, v and o), multi-head, untied
    "qwen3_bias": dict(family="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                       attention_bias=True, tie_word_embeddings=False),
    # Mistral: sliding-window attention (window 5, shorter than most prompts), GQA, untied
    "mistral": dict(family="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=5, tie_word_embeddings=False),
}

CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def make_tiny(out_dir, variant, seed, classifier=False):
    torch.manual_seed(int(seed))
    kw = dict(vocab_size=211, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(VARIANTS[variant])
    cfg = CONFIGS[kw.pop("family", "llama")](**kw)
    if classifier:
        cfg.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # Random init has tiny weights; widen them so that mistakes show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)


def load(model_dir, cls):
    m = cls.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def logits(model_dir, in_json, out_json):
    spec = json.load(open(in_json))
    m = load(model_dir, transformers.AutoModelForCausalLM)
    out = {"logits": [], "greedy": []}
    with torch.no_grad():
        for ids in spec["prompts"]:
            x = torch.tensor([ids])
            out["logits"].append(m(x).logits[0].tolist())
            g = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=spec["max_new_tokens"], eos_token_id=None, pad_token_id=0)
            out["greedy"].append(g[0, len(ids):].tolist())
    json.dump(out, open(out_json, "w"))


def scores(model_dir, in_json, out_json):
    spec = json.load(open(in_json))
    m = load(model_dir, transformers.AutoModelForSequenceClassification)
    with torch.no_grad():
        res = [m(torch.tensor([ids])).logits[0, 0].item() for ids in spec["sequences"]]
    json.dump({"scores": res}, open(out_json, "w"))


def chat(model_dir, in_json, out_json):
    """Chat templates rendered by transformers for each conversation of IN_JSON, with its optional
    `tools` and further template `kwargs` (such as enable_thinking)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    spec = json.load(open(in_json))
    out = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g, tools=spec.get("tools"),
                                   **spec.get("kwargs", {}))
           for c in spec["conversations"] for g in (True, False)]
    json.dump({"rendered": out}, open(out_json, "w"))


def greedy(model_dir, in_json, out_json):
    """Greedy continuations of chat prompts (ids) with transformers, KV cache on."""
    spec = json.load(open(in_json))
    m = load(model_dir, transformers.AutoModelForCausalLM)
    res = []
    with torch.no_grad():
        for ids in spec["prompts"]:
            x = torch.tensor([ids])
            g = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=spec["max_new_tokens"], eos_token_id=spec["eos"], pad_token_id=spec["eos"][0])
            res.append(g[0, len(ids):].tolist())
    json.dump({"greedy": res}, open(out_json, "w"))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "make-tiny":
        make_tiny(*args)
    elif cmd == "make-tiny-classifier":
        make_tiny(*args, classifier=True)
    elif cmd == "logits":
        logits(*args)
    elif cmd == "scores":
        scores(*args)
    elif cmd == "chat":
        chat(*args)
    elif cmd == "greedy":
        greedy(*args)
    else:
        sys.exit(f"unknown command {cmd}")
