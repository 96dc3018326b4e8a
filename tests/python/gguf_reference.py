#!/usr/bin/env python3
"""Reference outputs for the GGUF import tests (policy/tests/gguf_import.rs).

Sub-commands:

  write-types OUT_DIR
      Write OUT_DIR/types.gguf holding one seeded random tensor (4 x 256 values) of each ggml type
      the Rust importer dequantizes, quantized with gguf.quants.quantize (the K-quants, which that
      package cannot quantize, get random blocks with finite scales). For each type, write the
      gguf package's own dequantization (gguf.quants.dequantize) as raw little-endian f32 to
      OUT_DIR/<TYPE>.f32, and a manifest OUT_DIR/types.json.

  dump-model GGUF OUT_DIR
      Load the model with transformers (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)),
      an independent dequantize + unpermute path, and save its state dict in float32 as
      OUT_DIR/reference.safetensors (without lm_head.weight when it is tied to the embeddings).

  tokenize GGUF STRINGS_JSON OUT_JSON
      Load transformers' tokenizer from the GGUF (AutoTokenizer.from_pretrained(dir, gguf_file=...))
      and write the ids of each string of the JSON list STRINGS_JSON, encoded with
      add_special_tokens=False: "ids_transformers" from that tokenizer as loaded, and "ids" from
      the same tokenizer with the pre-tokenizer llama.cpp uses for the file's tokenizer.ggml.pre
      where transformers does not model it (see _llama_cpp_pre_tokenizer).

  write-model HF_DIR OUT_GGUF
      Write the Hugging Face model of HF_DIR (a tiny Qwen2 or Qwen3 from hf_reference.py
      make-tiny) as a GGUF file of its architecture with the gguf package: f32 tensors under
      llama.cpp's names, the hyper-parameters under `<arch>.*`, and a byte-level BPE vocabulary
      ("a".."z", "Ġ", one merge "a b", fillers) with the qwen2 pre-tokenizer.

  check-hf-dir GGUF HF_DIR OUT_JSON
      Load the imported HF_DIR with plain transformers and write to OUT_JSON the largest logit
      difference from transformers' GGUF load on a chat prompt, the prompt's ids and a short
      greedy completion.
"""

import json
import os
import sys

import numpy as np

SEED = 20240611
ROWS, COLS = 4, 256


def _split(path):
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def write_types(out_dir):
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    writer = gguf.GGUFWriter(os.path.join(out_dir, "types.gguf"), arch="llama")
    manifest = []

    quantizable = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
    k_quants = [T.Q4_K, T.Q5_K, T.Q6_K]
    # Where the f16 scale fields live in each K-quant block: (offset, is_min)
    k_scale_fields = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}

    for qtype in quantizable:
        data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        data[0, :8] *= 1000.0  # a few outliers
        data[1, :32] = 0.0  # an all-zero block
        data[2, :32] = 0.75  # a constant block
        if qtype in (T.F32, T.F16, T.BF16):
            data[3, :7] = [np.inf, -np.inf, 1e-6, -0.0, 65504.0, 6e-8, np.nan]
        quantized = gguf.quants.quantize(data, qtype)
        raw_dtype = None if qtype in (T.F32, T.F16) else qtype
        writer.add_tensor(qtype.name, quantized, raw_dtype=raw_dtype)
        deq = gguf.quants.dequantize(quantized, qtype).astype(np.float32, copy=False)
        assert deq.shape == (ROWS, COLS), (qtype.name, deq.shape)
        deq.astype("<f4").tofile(os.path.join(out_dir, f"{qtype.name}.f32"))
        manifest.append({"name": qtype.name, "shape": [ROWS, COLS]})

    for qtype in k_quants:
        block, size = GGML_QUANT_SIZES[qtype]
        n_blocks = ROWS * COLS // block
        blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for off in k_scale_fields[qtype]:
            scale = rng.uniform(0.001, 0.05, size=n_blocks).astype(np.float16)
            blocks[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
        quantized = blocks.reshape(ROWS, COLS // block * size)
        writer.add_tensor(qtype.name, quantized, raw_dtype=qtype)
        deq = gguf.quants.dequantize(quantized, qtype).astype(np.float32, copy=False)
        assert deq.shape == (ROWS, COLS), (qtype.name, deq.shape)
        deq.astype("<f4").tofile(os.path.join(out_dir, f"{qtype.name}.f32"))
        manifest.append({"name": qtype.name, "shape": [ROWS, COLS]})

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(os.path.join(out_dir, "types.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def dump_model(gguf_path, out_dir):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory, name = _split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in state:
        if state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr():
            del state["lm_head.weight"]
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "reference_config.json"), "w") as f:
        f.write(model.config.to_json_string())


def _llama_cpp_pre_tokenizer(pre):
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, where transformers' GGUF loader
    does not model it (None: keep transformers' own).

    llama.cpp's "smollm" splits every digit off first (regex \\p{N}) and then applies the GPT-2
    regex, which is Digits(individual_digits=True) + ByteLevel, as in SmolLM2's own
    tokenizer.json. transformers (5.24) builds a plain GPT-2 ByteLevel for it, which differs on
    whitespace directly before a digit ("\\n\\t1" -> "\\n\\t" + "1" vs "\\n" + "\\t" + "1").
    """
    from tokenizers import pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return None


def tokenize(gguf_path, strings_json, out_json):
    """ids: transformers' GGUF tokenizer with llama.cpp's pre-tokenizer for the file's
    `tokenizer.ggml.pre` (vocabulary, merges, added tokens and BPE all transformers' own);
    ids_transformers: transformers' GGUF tokenizer exactly as it loads."""
    import gguf
    from transformers import AutoTokenizer

    directory, name = _split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    with open(strings_json, encoding="utf-8") as f:
        strings = json.load(f)
    as_is = [tokenizer.encode(s, add_special_tokens=False) for s in strings]

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    replacement = _llama_cpp_pre_tokenizer(pre)
    if replacement is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = replacement
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in strings]
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"pre": pre, "ids": ids, "ids_transformers": as_is}, f)


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_model(hf_dir, out_gguf):
    import gguf
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    arch = cfg["model_type"]
    assert arch in ("qwen2", "qwen3"), arch
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    writer = gguf.GGUFWriter(out_gguf, arch=arch)
    writer.add_name("tiny " + arch)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    vocab = cfg["vocab_size"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    # "a".."z" (ids 0-25), "Ġ" (26, a byte-level space), the merge "a b" -> "ab" (27), fillers.
    tokens = [chr(ord("a") + i) for i in range(26)] + ["\u0120", "ab"]
    tokens += [f"<filler{i}>" for i in range(vocab - len(tokens))]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            g = f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"
        writer.add_tensor(g, t.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_hf_dir(gguf_path, hf_dir, out_json):
    """Load the imported directory with plain transformers (no GGUF involved) and compare it with
    transformers' GGUF load: logits on a chat prompt, and the tokenizer's ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = _split(gguf_path)
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        a = ours(ids).logits
        b = ref(ids).logits
        greedy = ours.generate(ids, max_new_tokens=12, do_sample=False)
    result = {
        "text": text,
        "ids": ids[0].tolist(),
        "max_abs_logit_diff": float((a - b).abs().max()),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "completion": tok.decode(greedy[0, ids.shape[1]:]),
    }
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(result, f)


def main(argv):
    usage = __doc__
    if len(argv) < 2:
        sys.exit(usage)
    cmd, args = argv[1], argv[2:]
    if cmd == "write-types" and len(args) == 1:
        write_types(*args)
    elif cmd == "dump-model" and len(args) == 2:
        dump_model(*args)
    elif cmd == "tokenize" and len(args) == 3:
        tokenize(*args)
    elif cmd == "write-model" and len(args) == 2:
        write_model(*args)
    elif cmd == "check-hf-dir" and len(args) == 3:
        check_hf_dir(*args)
    else:
        sys.exit(usage)


if __name__ == "__main__":
    main(sys.argv)
