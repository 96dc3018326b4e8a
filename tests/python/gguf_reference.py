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
      and write {"ids": [[...], ...]}: the ids of each string of the JSON list STRINGS_JSON,
      encoded with add_special_tokens=False.
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


def tokenize(gguf_path, strings_json, out_json):
    from transformers import AutoTokenizer

    directory, name = _split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    with open(strings_json, encoding="utf-8") as f:
        strings = json.load(f)
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in strings]
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"ids": ids}, f)


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
    else:
        sys.exit(usage)


if __name__ == "__main__":
    main(sys.argv)
