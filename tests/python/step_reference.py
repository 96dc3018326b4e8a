"""Independent reference for one learner step, written from docs/method.md with PyTorch autograd.

usage: step_reference.py MODEL_DIR SPEC_JSON OUT_SAFETENSORS

SPEC_JSON: {"config": {...}, "groups": [RolloutGroup as JSON]}. Each sequence is scored on its
own (no batching), the whole step's loss is built at once (no micro-batches), and
torch.optim.AdamW with torch.nn.utils.clip_grad_norm_ takes the step. Writes the parameters
after the step and {"loss": ...} beside them as JSON.
"""
import json
import sys

import torch
import transformers
from safetensors.torch import save_file


def mean(xs):
    return sum(xs) / len(xs)


def advantages(cfg, groups):
    mode, beta = cfg["mode"], cfg["beta"]
    penalty = cfg["kl"] == "reward-penalty"

    def agg(xs):
        return sum(xs) if cfg["aggregation"] == "sequence-sum" else sum(xs) / len(xs)

    def kl_pen(seq):
        return beta * agg([m - r for m, r in zip(seq["behaviour_logprobs"], seq["ref_logprobs"])]) if penalty else 0.0

    sol_adv, ch_rew, keeps = [], [], []
    for g in groups:
        ans = g["answers"]
        keep = [not (mode == "lsp" and not a["self_reward_parsed"] and cfg["parse_failure"] == "drop") for a in ans]
        R = [a["reward"] for a in ans]
        RQ = [(a["self_reward"] if a["self_reward_parsed"] else 0.0) for a in ans]
        r = [x + q for x, q in zip(R, RQ)] if mode == "lsp" else list(R)
        r = [x - kl_pen(a["sequence"]) for x, a in zip(r, ans)]
        kept = [x for x, k in zip(r, keep) if k]
        if not kept:
            # Every answer dropped: no gradient for the answers, and the challenger has no
            # reward and leaves the challengers' baseline and mean.
            sol_adv.append([0.0] * len(ans))
            ch_rew.append(None)
            keeps.append(keep)
            continue
        m = mean(kept)
        if mode == "grpo":
            sd = torch.tensor(kept, dtype=torch.float64).std().item() if len(kept) > 1 else 0.0
            adv = [((x - m) / (sd + cfg["grpo_eps"])) if k else 0.0 for x, k in zip(r, keep)]
        else:
            adv = [(x - m) if k else 0.0 for x, k in zip(r, keep)]
        V = mean([x for x, k in zip(R, keep) if k])
        VQ = mean([x for x, k in zip(RQ, keep) if k])
        c = -V if mode == "lsp-zero" else (-V + VQ)
        if g.get("challenger") is not None:
            c -= kl_pen(g["challenger"])
        ch_rew.append(c)
        sol_adv.append(adv)
        keeps.append(keep)
    kept_ch = [c for c in ch_rew if c is not None]
    cm = mean(kept_ch) if kept_ch else 0.0
    return sol_adv, [None if c is None else c - cm for c in ch_rew], keeps


def seq_terms(model, cfg, seq, adv):
    p, c = seq["prompt_ids"], seq["completion_ids"]
    ids = torch.tensor([p + c])
    logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(c)], -1)
    lp = logp.gather(1, torch.tensor(c)[:, None])[:, 0]
    ref = torch.tensor(seq["ref_logprobs"], dtype=torch.float32)
    mu = torch.tensor(seq["behaviour_logprobs"], dtype=torch.float32)
    seq_sum = cfg["aggregation"] == "sequence-sum"
    agg = (lambda x: x.sum()) if seq_sum else (lambda x: x.mean())
    cap = cfg["importance_cap"]
    if seq_sum:
        s = lp.sum()
        pg = torch.exp(s - s.detach()) * adv
        if cap > 0:
            pg = pg * torch.clamp(torch.exp(s.detach() - mu.sum()), max=cap)
    else:
        ratio = torch.exp(lp - lp.detach())
        if cap > 0:
            ratio = ratio * torch.clamp(torch.exp(lp.detach() - mu), max=cap)
        pg = (ratio * adv).mean()
    if cfg["kl"] == "k3":
        d = ref - lp
        kl = agg(torch.exp(d) - d - 1)
    elif cfg["kl"] == "paper":
        kl = agg(lp - ref)
    else:
        kl = torch.zeros(())
    return pg - cfg["beta"] * kl


def main(model_dir, spec_path, out_path):
    spec = json.load(open(spec_path))
    cfg, groups = spec["config"], spec["groups"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.train()
    sol_adv, ch_adv, keeps = advantages(cfg, groups)
    n = sum(1 for a in ch_adv if a is not None)
    n_kept = sum(sum(k) for k in keeps)
    l_sol, l_ch = 0.0, 0.0
    for i, g in enumerate(groups):
        for j, a in enumerate(g["answers"]):
            if keeps[i][j]:
                l_sol = l_sol - seq_terms(model, cfg, a["sequence"], sol_adv[i][j]) / n_kept
        if cfg["mode"] != "grpo" and ch_adv[i] is not None:
            l_ch = l_ch - seq_terms(model, cfg, g["challenger"], ch_adv[i]) / n
    loss = l_sol + cfg["alpha_ch"] * l_ch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"])
    opt.zero_grad()
    loss.backward()
    if cfg["max_grad_norm"] > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"]).item()
    else:
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    opt.step()
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, out_path)
    json.dump({"loss": loss.item(), "grad_norm": norm}, open(out_path + ".json", "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
