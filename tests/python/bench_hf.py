"""Transformers side of `selfplay bench generate|score`: the same workload, the same JSON line.

  python bench_hf.py generate [options]   batched sampling with `model.generate` (KV cache on)
  python bench_hf.py score [options]      forward + backward of completion log-probs

The workload mirrors bench/src/generate.rs exactly:
  * model: the Hugging Face directory --model (default $SELFPLAY_MODEL), --dtype, --device;
  * prompts: the first --batch AlpacaEval instructions (field "instruction"), each rendered as
    one user turn with the tokenizer's chat template (add_generation_prompt=True);
  * generate: left padding, do_sample, temperature --temperature, top_p 1.0, top_k 0, exactly
    --max-new-tokens new tokens per row (min_new_tokens = max_new_tokens: EOS never stops a row,
    as `selfplay bench generate` passes no EOS ids), use_cache=True; tokens = generated tokens;
  * score: prompt + --max-new-tokens pseudo-random completion ids per row (SplitMix64 seeded 7,
    id = next_u64 % vocab_size, drawn row after row: the ids `selfplay bench score` uses),
    right padding; the hidden states at the completion positions go through the output head,
    then log_softmax + gather, sum, backward, gradients zeroed in place; tokens = prompt +
    completion tokens. (`--full-logits` instead computes logits at every position and slices,
    the plain `model(input_ids).logits` way; it is not the default because selfplay only runs
    the head on completion positions, and the comparison is meant to be on equal work.)
  * --warmup runs, then --repeats timed runs; tokens_per_s = tokens / secs_mean.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

MASK64 = (1 << 64) - 1


class SplitMix64:
    """The generator of policy/src/generate.rs, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["generate", "score"])
    ap.add_argument("--model", default=os.environ.get("SELFPLAY_MODEL"))
    ap.add_argument("--prompts", default=os.environ.get("SELFPLAY_BENCH_PROMPTS"),
                    help="AlpacaEval-style JSON (default $SELFPLAY_BENCH_PROMPTS, "
                         "else $SELFPLAY_DATA/alpaca_eval/alpaca_eval.json)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    ap.add_argument("--full-logits", action="store_true", help="score: logits at every position, then slice")
    a = ap.parse_args()
    if not a.model:
        ap.error("--model or $SELFPLAY_MODEL is required")
    if not a.prompts:
        data = os.environ.get("SELFPLAY_DATA")
        if not data:
            ap.error("--prompts, $SELFPLAY_BENCH_PROMPTS or $SELFPLAY_DATA is required")
        a.prompts = os.path.join(data, "alpaca_eval", "alpaca_eval.json")
    return a


def load_prompts(path, n):
    rows = json.load(open(path))
    out = [r["instruction"] for r in rows if isinstance(r, dict) and isinstance(r.get("instruction"), str)][:n]
    if len(out) < n:
        sys.exit(f"{path} has {len(out)} prompts, need {n}")
    return out


def chat_ids(tok, texts):
    ids = []
    for t in texts:
        rendered = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True)
        ids.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return ids


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(a, tokens, secs, extra):
    print(json.dumps({
        "bench": "generate" if a.bench == "generate" else "score_fwd_bwd",
        "impl": "transformers", "batch": a.batch, "max_new_tokens": a.max_new_tokens,
        "dtype": a.dtype, "device": a.device, "threads": torch.get_num_threads(), "tokens": tokens,
        "secs_mean": statistics.fmean(secs), "secs_best": min(secs),
        "tokens_per_s": tokens / statistics.fmean(secs), "extra": extra,
    }), flush=True)


def bench_generate(a, model, tok, prompts, device):
    pad = tok.pad_token_id if tok.pad_token_id is not None else (model.config.eos_token_id or 0)
    if isinstance(pad, list):
        pad = pad[0]
    plen = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (plen - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (plen - len(p)) + [1] * len(p) for p in prompts], device=device)
    gen = dict(do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0,
               max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
               use_cache=True, pad_token_id=pad)
    secs, tokens = [], 0
    with torch.inference_mode():
        for i in range(a.warmup + a.repeats):
            torch.manual_seed(i)
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=attn, **gen)
            sync(device)
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                secs.append(dt)
                tokens = int((out.shape[1] - plen) * out.shape[0])
    report(a, tokens, secs, {"prompt_tokens": sum(len(p) for p in prompts), "attn": a.attn})


def bench_score(a, model, tok, prompts, device):
    vocab = model.config.vocab_size
    rng = SplitMix64(7)
    comps = [[rng.next_u64() % vocab for _ in range(a.max_new_tokens)] for _ in prompts]
    seqs = [p + c for p, c in zip(prompts, comps)]
    b, t, cmax = len(seqs), max(len(s) for s in seqs), a.max_new_tokens
    ids = torch.tensor([s + [0] * (t - len(s)) for s in seqs], device=device)
    attn = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs], device=device)
    # Hidden state at prompt_len - 1 + j predicts completion token j.
    src = torch.tensor([[len(p) - 1 + j for j in range(cmax)] for p in prompts], device=device)
    tgt = torch.tensor(comps, device=device)
    tokens = sum(len(s) for s in seqs)
    for p in model.parameters():
        p.requires_grad_(True)
    secs = []
    for i in range(a.warmup + a.repeats):
        sync(device)
        t0 = time.perf_counter()
        if a.full_logits:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
            picked = logits.gather(1, src.unsqueeze(-1).expand(b, cmax, logits.shape[-1]))
            logp = picked.log_softmax(-1)
        else:
            hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            picked = hidden.gather(1, src.unsqueeze(-1).expand(b, cmax, hidden.shape[-1]))
            logp = model.lm_head(picked).float().log_softmax(-1)
        lp = logp.gather(2, tgt.unsqueeze(-1)).squeeze(-1)
        loss = -lp.sum()
        loss.backward()
        # Zero in place, as selfplay does (the learner keeps its gradient buffers).
        model.zero_grad(set_to_none=False)
        sync(device)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            secs.append(dt)
    report(a, tokens, secs, {"prompt_tokens": sum(len(p) for p in prompts), "attn": a.attn,
                             "full_logits": a.full_logits})


def main():
    a = parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.model, dtype=DTYPES[a.dtype], attn_implementation=a.attn).to(device)
    model.eval()  # no dropout; gradients still flow in `score`
    prompts = chat_ids(tok, load_prompts(a.prompts, a.batch))
    if a.bench == "generate":
        bench_generate(a, model, tok, prompts, device)
    else:
        bench_score(a, model, tok, prompts, device)


if __name__ == "__main__":
    main()
