"""The Python half of scripts/gpu_check.sh: makes the random models with transformers and
compares what the selfplay binary wrote. Needs torch (CUDA build) and transformers only.

  make-tiny DIR SEED [classifier]   tiny random Llama (or reward model) + word-level tokenizer
  make-3b DIR                       Llama-3.2-3B shape, random, bf16 (made on the GPU)
  prompts FILE                      the token-id prompts of the correctness checks
  logits OUT MODEL DEVICE           transformers' logits of each prompt alone (f32)
  compare OUT                       every comparison; writes OUT/checks.json, exits 1 on a failure
  decode-vs-anchor SP ANCHOR OUT    per batch: selfplay's decode (device-check decode JSON lines)
                                    beside transformers eager and compiled (anchor_decode.py's),
                                    with the ratios; writes OUT (JSON) and prints a table
  summarize OUT                     merges OUT/*.json and *.jsonl into OUT/gpu_check.json
"""
import glob
import json
import os
import sys

import torch
import transformers

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# meta-llama/Llama-3.2-3B's config.json (the shape only; weights are random).
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192),
                bos_token_id=128000, eos_token_id=128001)


def tokenizer_files(out_dir):
    """A word-level tokenizer "t0".."t210" with a ChatML-like template: enough for selfplay to
    load a Policy and play the game on a random model."""
    vocab = {f"t{i}": i for i in range(211)}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    json.dump(tok, open(os.path.join(out_dir, "tokenizer.json"), "w"))
    cfg = {"eos_token": "t2", "bos_token": "t1", "pad_token": "t0",
           "chat_template": "{% for m in messages %}t3 {{ m['role'] }} {{ m['content'] }} t4 {% endfor %}"
                            "{% if add_generation_prompt %}t3 assistant {% endif %}"}
    json.dump(cfg, open(os.path.join(out_dir, "tokenizer_config.json"), "w"))


def widen(model):
    # transformers' init has tiny weights; wider ones make mistakes show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))


def make_tiny(out_dir, seed, classifier=False):
    torch.manual_seed(int(seed))
    cfg = transformers.LlamaConfig(**TINY)
    if classifier:
        cfg.num_labels = 1
        model = transformers.LlamaForSequenceClassification(cfg)
    else:
        model = transformers.LlamaForCausalLM(cfg)
    widen(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_files(out_dir)


def make_3b(out_dir):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA_3B)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_files(out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"what": "made_3b", "parameters": n}))


PROMPTS = [[1, 5, 9, 33, 17, 101, 7], [1, 44], [1, 200, 150, 3, 3, 3, 88, 91, 12, 60, 61, 62, 63],
           [1, 77, 78, 79], [1, 9, 9, 12, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55]]


def hf_logits(out, model_dir, device):
    m = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m = m.to(device).eval()
    res = []
    with torch.no_grad():
        for p in PROMPTS:
            res.append(m(torch.tensor([p], device=device)).logits[0].float().cpu())
    torch.save(res, out)


def load_st(path):
    from safetensors.torch import load_file
    return load_file(path)


def compare(out, dry_run=False):
    checks = []

    def check(name, ok, **kw):
        checks.append(dict(check=name, ok=bool(ok), **kw))
        print(f"{'ok  ' if ok else 'FAIL'} {name} {json.dumps(kw)}", flush=True)

    info = json.load(open(os.path.join(out, "info.json")))
    if dry_run:
        checks.append(dict(check="cuda_used", ok=True, skipped="DEVICE=cpu: a dry run of the script", **info))
    else:
        check("cuda_used", info.get("cuda_available") and info.get("libtorch_cuda_loaded") and info.get("cuda_sum_ok"),
              **info)

    # Logits of one right-padded batch: selfplay CPU f32, CUDA f32, CUDA bf16, against
    # transformers' per-prompt (unpadded) f32 logits on the CPU and on CUDA.
    sp = {k: load_st(os.path.join(out, f"logits_{k}.safetensors"))["logits"] for k in ("ref", "dev_f32", "dev_bf16")}
    hf = {k: torch.load(os.path.join(out, f"hf_logits_{k}.pt")) for k in ("cpu", "dev")}

    def worst(a, ref):
        return max((a[i, : len(p)] - ref[i]).abs().max().item() for i, p in enumerate(PROMPTS))

    d = worst(sp["dev_f32"], hf["dev"])
    check("logits_dev_f32_vs_transformers_dev", d <= 1e-4, max_abs_diff=d, tol=1e-4)
    d = worst(sp["dev_f32"], hf["cpu"])
    check("logits_dev_f32_vs_transformers_cpu", d <= 1e-4, max_abs_diff=d, tol=1e-4)
    d = worst(sp["dev_f32"], [sp["ref"][i, : len(p)] for i, p in enumerate(PROMPTS)])
    check("logits_dev_f32_vs_selfplay_cpu_f32", d <= 1e-4, max_abs_diff=d, tol=1e-4)
    # bf16 keeps 8 bits of mantissa, and the error grows through the layers: the stated
    # tolerance is 6% of the largest logit, and the arg-max must agree on at least 90% of
    # positions (bf16 on the CPU, measured: 3.8% and 97%).
    scale = max(r.abs().max().item() for r in hf["cpu"])
    d = worst(sp["dev_bf16"], hf["cpu"])
    agree = [(sp["dev_bf16"][i, : len(p)].argmax(-1) == hf["cpu"][i].argmax(-1)).float().mean().item()
             for i, p in enumerate(PROMPTS)]
    agree = sum(agree) / len(agree)
    check("logits_dev_bf16_vs_transformers_cpu_f32", d <= 0.06 * scale and agree >= 0.9,
          max_abs_diff=d, tol=0.06 * scale, argmax_agreement=agree)

    # Greedy continuations with continuous batching (2 slots, refills) on both devices.
    g = {k: json.load(open(os.path.join(out, f"greedy_{k}.json"))) for k in ("ref", "dev_f32", "dev_bf16")}
    check("greedy_dev_f32_equals_cpu_f32", g["dev_f32"]["ids"] == g["ref"]["ids"],
          refills=g["dev_f32"]["refills"])
    d = max(abs(a - b) for x, y in zip(g["dev_f32"]["logprobs"], g["ref"]["logprobs"]) for a, b in zip(x, y))
    check("greedy_logprobs_dev_f32_vs_cpu_f32", d <= 1e-4, max_abs_diff=d, tol=1e-4)
    per_token = g["dev_f32"]["device_to_host"] / max(1, g["dev_f32"]["steps"])
    check("one_read_per_token_on_dev", g["dev_f32"]["device_to_host"] == g["dev_f32"]["steps"] + 1,
          reads_per_step=per_token)
    same = sum(a == b for x, y in zip(g["dev_bf16"]["ids"], g["ref"]["ids"]) for a, b in zip(x, y))
    total = sum(len(x) for x in g["ref"]["ids"])
    checks.append(dict(check="info_greedy_bf16_tokens_equal_to_f32", ok=True, equal=same, of=total))

    # One learner step (forward, backward, AdamW) on CUDA f32 against the CPU.
    s = {k: json.load(open(os.path.join(out, f"train_{k}", "stats.json"))) for k in ("ref", "dev")}
    rel = abs(s["dev"]["loss"] - s["ref"]["loss"]) / max(1e-12, abs(s["ref"]["loss"]))
    check("train_step_loss_dev_vs_cpu", rel <= 1e-4, cpu=s["ref"]["loss"], cuda=s["dev"]["loss"], rel_diff=rel)
    rel = abs(s["dev"]["grad_norm"] - s["ref"]["grad_norm"]) / max(1e-12, s["ref"]["grad_norm"])
    check("train_step_grad_norm_dev_vs_cpu", rel <= 1e-3, cpu=s["ref"]["grad_norm"], cuda=s["dev"]["grad_norm"],
          rel_diff=rel)
    w = {k: load_st(os.path.join(out, f"train_{k}", "model.safetensors")) for k in ("ref", "dev")}
    diffs = torch.cat([(w["dev"][n] - w["ref"][n]).abs().flatten() for n in w["ref"]])
    frac = (diffs <= 1e-5).float().mean().item()
    # Adam's first step moves each weight by about lr * sign(g): a gradient within rounding of
    # zero can flip sign between devices, so the bound is 2 lr for the worst element and 1e-5
    # for 99.9% of them.
    check("train_step_weights_dev_vs_cpu", frac >= 0.999 and diffs.max().item() <= 2e-3,
          max_abs_diff=diffs.max().item(), frac_within_1e_5=frac)

    # CUDA graphs: decoding captured per span equals eager decoding on the same device.
    gr = json.load(open(os.path.join(out, "graphs_f32.json")))
    check("decode_cuda_graphs_equal_eager_f32", gr["ok"], **{k: gr[k] for k in gr if k != "ok"})

    steps = [json.loads(l) for l in open(os.path.join(out, "train_run", "run", "steps.jsonl"))]
    losses = [x["stats"]["loss"] for x in steps]
    finite = all(abs(v) < float("inf") for v in losses)
    skipped = sum(bool(x["stats"].get("skipped")) for x in steps)
    check("selfplay_train_3_steps_bf16", len(steps) >= 3 and finite and skipped == 0, steps=len(steps), losses=losses,
          skipped=skipped)

    json.dump(checks, open(os.path.join(out, "checks.json"), "w"), indent=1)
    sys.exit(0 if all(c["ok"] for c in checks) else 1)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def decode_vs_anchor(sp_path, anchor_path, out):
    """Per batch: selfplay's decode-only figures, transformers' in each mode, and the ratios
    selfplay / transformers (decode tokens/s; > 1 means selfplay is faster)."""
    sp = {r["batch"]: r for r in read_jsonl(sp_path) if r.get("what") == "decode"}
    anchor = read_jsonl(anchor_path)
    env = next((r for r in anchor if r.get("what") == "anchor_env"), {})
    hf = {(r["mode"], r["batch"]): r for r in anchor if r.get("what") == "anchor_decode"}
    done = any(r.get("what") == "anchor_done" for r in anchor)
    rows = []
    for b in sorted(set(sp) | {k[1] for k in hf}):
        s = sp.get(b, {})
        row = dict(batch=b,
                   selfplay_decode_tokens_per_s=s.get("decode_tokens_per_s"),
                   selfplay_decode_ms_per_step=s.get("decode_ms_per_step"),
                   selfplay_prefill_ms=s.get("prefill_ms"),
                   selfplay_attention_kernel=s.get("attention_kernel"),
                   selfplay_hbm_floor_share=s.get("hbm_floor_share"),
                   hbm_floor_ms_per_step=s.get("hbm_floor_ms_per_step"),
                   hbm_tb_s=s.get("hbm_tb_s"))
        for mode in ("eager", "compile"):
            h = hf.get((mode, b))
            if h is None:
                row[f"transformers_{mode}_missing"] = "no result (the anchor did not reach it: time limit or crash)" \
                    if not done else "no result"
                continue
            if "decode_tokens_per_s" not in h:
                row[f"transformers_{mode}_missing"] = h.get("skipped") or h.get("error") or "no figures"
                continue
            row.update({f"transformers_{mode}_decode_tokens_per_s": h["decode_tokens_per_s"],
                        f"transformers_{mode}_decode_ms_per_step": h["decode_ms_per_step"],
                        f"transformers_{mode}_prefill_ms": h.get("prefill_ms"),
                        f"transformers_{mode}_attention_kernel": h.get("attention_kernel"),
                        f"transformers_{mode}_hbm_floor_share": h.get("hbm_floor_share")})
            if mode == "compile":
                row["transformers_compile_s"] = h.get("compile_s")
            if row["selfplay_decode_tokens_per_s"]:
                row[f"ratio_selfplay_over_{mode}"] = row["selfplay_decode_tokens_per_s"] / h["decode_tokens_per_s"]
        rows.append(row)
    res = dict(what="decode_vs_transformers", torch=env.get("torch"), transformers=env.get("transformers"),
               device_name=env.get("device_name"), anchor_finished=done, rows=rows,
               note="decode only (prefill timed apart), tokens/s = batch / decode ms per step; "
                    "ratio = selfplay tokens/s / transformers tokens/s")
    json.dump(res, open(out, "w"), indent=1)

    def f(x, fmt="{:.1f}"):
        return "-" if x is None else (fmt.format(x) if isinstance(x, (int, float)) else str(x))
    print(f"decode only, device {env.get('device_name') or env.get('device')}: tokens/s (ms/step) [kernel]")
    print(f"{'batch':>5} | {'selfplay':>26} | {'transformers eager':>34} | {'transformers compile':>34} "
          f"| {'x eager':>7} | {'x compile':>9} | {'HBM floor share':>15}")
    for r in rows:
        def cell(prefix):
            t = r.get(f"{prefix}_decode_tokens_per_s")
            if t is None:
                return r.get(f"{prefix}_missing", "-")[:34]
            return f"{t:.0f} ({r[prefix + '_decode_ms_per_step']:.2f}) [{r.get(prefix + '_attention_kernel')}]"
        sp_cell = "-" if r["selfplay_decode_tokens_per_s"] is None else \
            f"{r['selfplay_decode_tokens_per_s']:.0f} ({r['selfplay_decode_ms_per_step']:.2f}) [{r['selfplay_attention_kernel']}]"
        share = "/".join(f(r.get(k), "{:.0%}") for k in ("selfplay_hbm_floor_share", "transformers_eager_hbm_floor_share",
                                                          "transformers_compile_hbm_floor_share"))
        print(f"{r['batch']:>5} | {sp_cell:>26} | {cell('transformers_eager'):>34} | {cell('transformers_compile'):>34} "
              f"| {f(r.get('ratio_selfplay_over_eager'), '{:.2f}x'):>7} | {f(r.get('ratio_selfplay_over_compile'), '{:.2f}x'):>9} "
              f"| {share:>15}")


def summarize(out):
    res = {}
    for p in sorted(glob.glob(os.path.join(out, "*.json"))):
        if os.path.basename(p) != "gpu_check.json":
            try:
                res[os.path.basename(p)[:-5]] = json.load(open(p))
            except Exception as e:
                res[os.path.basename(p)[:-5]] = f"unreadable: {e}"
    for p in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        res[os.path.basename(p)[:-6]] = [json.loads(l) for l in open(p) if l.strip().startswith("{")]
    for p in sorted(glob.glob(os.path.join(out, "*.txt"))):
        res[os.path.basename(p)[:-4]] = open(p).read()
    json.dump(res, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "make-tiny":
        make_tiny(a[0], a[1], len(a) > 2 and a[2] == "classifier")
    elif cmd == "make-3b":
        make_3b(a[0])
    elif cmd == "prompts":
        json.dump(PROMPTS, open(a[0], "w"))
    elif cmd == "logits":
        hf_logits(a[0], a[1], a[2])
    elif cmd == "compare":
        compare(a[0], len(a) > 1 and a[1] == "cpu")
    elif cmd == "decode-vs-anchor":
        decode_vs_anchor(a[0], a[1], a[2])
    elif cmd == "summarize":
        summarize(a[0])
    else:
        sys.exit(f"unknown command {cmd}")
