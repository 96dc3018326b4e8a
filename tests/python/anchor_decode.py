"""The same-card anchor of `selfplay device-check decode`: transformers decoding the same model
directory (random weights), the same batch sizes, prompt and new-token counts, in two modes:

  eager    the model as loaded (SDPA attention), a DynamicCache that grows each step
  compile  a StaticCache and the model's forward under torch.compile(mode="reduce-overhead"),
           which replays CUDA graphs on a GPU (on the CPU it compiles C++ kernels, no graphs)

Each (mode, batch) is timed as selfplay's decode is: a warm-up, then the prefill alone (the
prompt's forward, the first token's arg-max and its read to the host) and, separately, the
decode steps (one token per row each: forward, arg-max, one read of the ids to the host, as a
generator that watches for EOS does). Decode-only ms per step = decode time / (new_tokens - 1).
The warm-up of the compile mode includes its compilation and graph recording: `compile_s`.

The attention kernel: in eager mode, the arguments each SDPA call of one decode step gets are
recorded and `torch._fused_sdp_choice` names the kernel; under compile, the attention ops of
the post-grad graph that inductor compiles (the kernel SDPA was lowered to).

One JSON line per result on --out (and stdout), written as soon as it is known, so that a run
cut short by a time limit keeps what it measured. A mode that cannot run records its error
instead of stopping the others; compile configurations that would pass --deadline-s are
skipped and say so.

  anchor_decode.py --model DIR --device cuda --dtype bf16 --batch 1,8,64,256 \
      --prompt-len 128 --new-tokens 128 --compile-batch 1,64 --deadline-s 240 --out anchor.jsonl

Works with transformers 4.5x (past_key_values=, cache_position=) and 5.x (cache=).
"""
import argparse
import inspect
import json
import sys
import time
import traceback

import torch
import torch._dynamo
import transformers

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# Memory bandwidth (TB/s) by card name, as cli/src/device_check.rs's hbm_tb_s.
def hbm_tb_s(name):
    n = (name or "").upper()
    if "H200" in n:
        return 4.8
    if "H100" in n:
        if "PCIE" in n:
            return 2.0
        if "NVL" in n:
            return None
        return 3.35
    if "A100" in n:
        if "80GB" in n:
            return 2.0
        if "40GB" in n:
            return 1.55
    return None


def sdp_name(i):
    try:
        return torch.nn.attention.SDPBackend(i).name.lower()
    except Exception:
        return {0: "math", 1: "flash_attention", 2: "efficient_attention", 3: "cudnn_attention",
                4: "overrideable"}.get(i, f"unknown({i})")


def op_kernel(names):
    """The SDPA kernel named by the attention ops of a compiled graph."""
    joined = " ".join(names)
    if "flash_attention_for_cpu" in joined:
        return "flash_attention"
    for key, kernel in (("cudnn_attention", "cudnn_attention"), ("efficient_attention", "efficient_attention"),
                        ("flash_attention", "flash_attention"), ("attention_math", "math")):
        if key in joined:
            return kernel
    return "math (decomposed: no SDPA op in the graph)" if names is not None else "unknown"


class Anchor:
    def __init__(self, a):
        self.a = a
        self.dev = torch.device(a.device)
        self.dtype = DTYPES[a.dtype]
        kw = dict(attn_implementation="sdpa")
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=self.dtype, **kw)
        except TypeError:
            m = transformers.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=self.dtype, **kw)
        self.model = m.to(self.dev).eval()
        self.cfg = self.model.config
        sig = inspect.signature(self.model.forward).parameters
        # transformers 5.x names the cache `cache`; 4.x `past_key_values` and needs `cache_position`
        # with a StaticCache.
        self.cache_kw = "cache" if "cache" in sig else "past_key_values"
        self.cache_position = "cache_position" in sig
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in sig else (
            "num_logits_to_keep" if "num_logits_to_keep" in sig else None)
        self.compiled = None
        self.fullgraph = True
        self.ids = {}
        self.post_grad_ops = None
        self.first_compile_s = None

    # -- caches -----------------------------------------------------------------------------
    def dynamic_cache(self):
        try:
            return transformers.DynamicCache(config=self.cfg)
        except TypeError:
            return transformers.DynamicCache()

    def static_cache(self, batch, length):
        try:  # 4.4x-4.5x
            return transformers.StaticCache(config=self.cfg, max_batch_size=batch, max_cache_len=length,
                                            device=self.dev, dtype=self.dtype)
        except TypeError:  # 5.x: lazily sized by the first update
            return transformers.StaticCache(config=self.cfg, max_cache_len=length)

    # -- one forward --------------------------------------------------------------------------
    def kwargs(self, cache, start, length):
        kw = {self.cache_kw: cache, "use_cache": True}
        if self.cache_position:
            kw["cache_position"] = torch.arange(start, start + length, device=self.dev)
        if self.keep_kw:
            kw[self.keep_kw] = 1
        return kw

    def prefill(self, ids, cache):
        with torch.no_grad():
            logits = self.model(input_ids=ids, **self.kwargs(cache, 0, ids.shape[1])).logits
            tok = logits[:, -1:].argmax(-1)
        tok.cpu()  # the first ids on the host (also a synchronisation)
        return tok

    def decode(self, tok, cache, start, steps, fn, ids=None):
        for i in range(steps):
            if fn is not self.model:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                logits = fn(input_ids=tok, **self.kwargs(cache, start + i, 1)).logits
                tok = logits[:, -1:].argmax(-1)
            host = tok.cpu()  # one read of the ids per step
            if ids is not None:
                ids.append(host)
        return tok

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    # -- the attention kernel ------------------------------------------------------------------
    def eager_kernel(self, tok, cache, start):
        """Runs one decode step with SDPA wrapped: the arguments of each call, and the kernel
        `_fused_sdp_choice` picks for them."""
        F = torch.nn.functional
        orig = F.scaled_dot_product_attention
        calls = []

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
            try:
                choice = sdp_name(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                          enable_gqa=enable_gqa))
            except Exception as e:  # noqa: BLE001
                choice = f"unknown ({type(e).__name__}: {e})"
            calls.append(dict(kernel=choice, q=list(q.shape), k=list(k.shape),
                              mask=None if attn_mask is None else [list(attn_mask.shape), str(attn_mask.dtype)],
                              is_causal=bool(is_causal), enable_gqa=bool(enable_gqa)))
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, **kw)

        F.scaled_dot_product_attention = spy
        try:
            tok = self.decode(tok, cache, start, 1, self.model)
        finally:
            F.scaled_dot_product_attention = orig
        kernels = sorted({c["kernel"] for c in calls})
        return tok, dict(attention_kernel=kernels[0] if len(kernels) == 1 else kernels,
                         attention_kernel_source="_fused_sdp_choice on the arguments of the decode step's SDPA calls",
                         sdpa_calls_per_step=len(calls), sdpa_call=calls[0] if calls else None)

    def compile_fn(self):
        if self.compiled is None:
            import torch._inductor.config as ic
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)
            ops = []

            def post_grad(graph):  # read-only: which attention op each compiled graph runs
                for n in graph.nodes:
                    t = str(n.target)
                    if n.op == "call_function" and ("attention" in t or "sdpa" in t):
                        ops.append(t)
            ic.post_grad_custom_post_pass = post_grad
            self.post_grad_ops = ops
            # One graph per batch size (dynamic=False): no symbolic batch dimension.
            self.compiled = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=self.fullgraph,
                                          dynamic=False)
        return self.compiled

    # -- one (mode, batch) ----------------------------------------------------------------------
    def run(self, mode, batch):
        a = self.a
        P, N = a.prompt_len, a.new_tokens
        g = torch.Generator().manual_seed(7 + batch)
        ids = torch.randint(3, self.cfg.vocab_size, (batch, P), generator=g).to(self.dev)
        res = dict(what="anchor_decode", mode=mode, batch=batch, prompt_len=P, new_tokens=N,
                   device=a.device, dtype=a.dtype, host_read_per_step=True)
        t0 = time.time()
        if mode == "eager":
            res["cache"] = "dynamic"
            fn = self.model
            # Warm-up: the prefill and a few steps, the last of them with SDPA watched.
            cache = self.dynamic_cache()
            tok = self.prefill(ids, cache)
            tok = self.decode(tok, cache, P, 2, fn)
            tok, kern = self.eager_kernel(tok, cache, P + 2)
            res.update(kern)
            new_cache = self.dynamic_cache
        else:
            res["cache"] = "static"
            res["compile"] = (f"torch.compile(model.forward, mode='reduce-overhead', fullgraph={self.fullgraph}, "
                              "dynamic=False)")
            fn = self.compile_fn()
            cache = self.static_cache(batch, P + N)
            before = len(self.post_grad_ops)
            tok = self.prefill(ids, cache)  # the prefill stays eager (not compiled), as in generate()
            # Compilation, then cudagraph warm-up and recording, then replays.
            tok = self.decode(tok, cache, P, 4, fn)
            self.sync()
            ops = self.post_grad_ops[before:]
            res.update(attention_kernel=op_kernel(ops), attention_ops=sorted(set(ops)),
                       attention_kernel_source="attention ops of the post-grad graph inductor compiled")

            def new_cache():
                cache.reset()
                return cache
        self.sync()
        res["warmup_s" if mode == "eager" else "compile_s"] = time.time() - t0
        best = None
        for _ in range(max(1, a.repeats)):
            c = new_cache()
            self.sync()
            t1 = time.perf_counter()
            tok = self.prefill(ids, c)
            self.sync()
            t2 = time.perf_counter()
            out = [tok.cpu()]
            self.decode(tok, c, P, N - 1, fn, out)
            self.sync()
            t3 = time.perf_counter()
            if best is None or (t3 - t1) < best[0]:
                best = (t3 - t1, t2 - t1, t3 - t2)
        total, pre, dec = best
        # Greedy ids of the last run: eager and compiled decoding should agree (exactly in f32;
        # in bf16 a near tie can flip, and the rows go their own ways from there).
        out = torch.cat(out, dim=1)
        self.ids[(mode, batch)] = out
        other = self.ids.get(("eager", batch)) if mode == "compile" else None
        if other is not None:
            same = (out == other).int().cumprod(dim=1).sum(dim=1)
            res.update(ids_equal_to_eager_rows=int((same == N).sum()),
                       ids_equal_to_eager_min_prefix=int(same.min()))
        ms = 1e3 * dec / (N - 1)
        res.update(seconds=total, tokens_per_s=batch * N / total, prefill_ms=1e3 * pre, decode_steps=N - 1,
                   decode_ms_per_step=ms, decode_tokens_per_s=batch * 1e3 / ms, repeats=max(1, a.repeats))
        res.update(self.floor(batch, ms))
        return res

    def floor(self, batch, ms):
        """Bytes a decode step must read (weights, and each row's keys and values up to its
        position, prompt + new/2 on average) over the card's bandwidth, as selfplay reports it."""
        elt = torch.finfo(self.dtype).bits // 8
        params = {id(p): p for p in self.model.parameters()}
        n = sum(p.numel() for p in params.values())
        emb = self.model.get_input_embeddings().weight
        out = self.model.get_output_embeddings()
        if out is None or out.weight is not emb:
            n -= emb.numel()  # an untied table is only gathered
        c = self.cfg
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        span = self.a.prompt_len + self.a.new_tokens / 2
        weights = n * elt
        kv = batch * span * 2 * c.num_hidden_layers * kvh * hd * elt
        bw = self.a.hbm_tb_s or hbm_tb_s(self.a.device_name)
        floor_ms = None if bw is None else (weights + kv) / (bw * 1e12) * 1e3
        return dict(device_name=self.a.device_name, hbm_tb_s=bw, weight_bytes_per_step=weights,
                    kv_bytes_per_step=kv, mean_span=span, hbm_floor_ms_per_step=floor_ms,
                    hbm_floor_share=None if floor_ms is None else floor_ms / ms)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", default="1,8,64,256")
    p.add_argument("--compile-batch", default=None,
                   help="batch sizes run under compile (default: all of --batch); 'none' for none")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration; the fastest counts")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip a configuration that would start after this many seconds (compile ones when the "
                        "time left is below the first compilation's)")
    p.add_argument("--device-name", default=None, help="the card's name (default: torch.cuda.get_device_name)")
    p.add_argument("--hbm-tb-s", type=float, default=None, help="memory bandwidth in TB/s instead of the lookup")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="JSON lines file (appended)")
    a = p.parse_args()
    if a.new_tokens < 2:
        sys.exit("--new-tokens must be at least 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    out = open(a.out, "a") if a.out else None

    def emit(d):
        line = json.dumps(d)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    dev = torch.device(a.device)
    if a.device_name is None and dev.type == "cuda":
        a.device_name = torch.cuda.get_device_name(dev)
    env = dict(what="anchor_env", torch=torch.__version__, transformers=transformers.__version__,
               python=sys.version.split()[0], device=a.device, device_name=a.device_name,
               threads=torch.get_num_threads())
    if dev.type == "cuda":
        b = torch.backends.cuda
        env["sdpa_enabled"] = dict(flash=b.flash_sdp_enabled(), efficient=b.mem_efficient_sdp_enabled(),
                                   math=b.math_sdp_enabled(),
                                   cudnn=b.cudnn_sdp_enabled() if hasattr(b, "cudnn_sdp_enabled") else None)
    t0 = time.time()
    try:
        anchor = Anchor(a)
    except Exception as e:  # noqa: BLE001
        env.update(error=f"{type(e).__name__}: {e}")
        emit(env)
        sys.exit(1)
    env.update(load_s=time.time() - t0, cache_kwarg=anchor.cache_kw, passes_cache_position=anchor.cache_position)
    emit(env)

    batches = [int(x) for x in a.batch.split(",") if x]
    cb = a.compile_batch
    compile_batches = batches if cb is None else ([] if cb in ("", "none") else [int(x) for x in cb.split(",")])
    modes = [m for m in a.modes.split(",") if m]
    failed = False
    for mode in modes:
        if mode not in ("eager", "compile"):
            sys.exit(f"unknown mode {mode}")
        for batch in (batches if mode == "eager" else compile_batches):
            elapsed = time.time() - t_start
            if a.deadline_s is not None:
                need = (anchor.first_compile_s or 0.0) if mode == "compile" else 0.0
                if elapsed + need > a.deadline_s:
                    emit(dict(what="anchor_decode", mode=mode, batch=batch, skipped=(
                        f"time budget: {elapsed:.0f} s used of {a.deadline_s:.0f} s"
                        + (f", a compilation took {need:.0f} s" if need else ""))))
                    continue
            try:
                try:
                    r = anchor.run(mode, batch)
                except Exception as e:  # noqa: BLE001
                    if mode != "compile" or not anchor.fullgraph:
                        raise
                    # A graph break under fullgraph=True: once more with breaks allowed.
                    first = f"{type(e).__name__}: {str(e)[:500]}"
                    torch._dynamo.reset()
                    anchor.fullgraph, anchor.compiled = False, None
                    r = anchor.run(mode, batch)
                    r["fullgraph_error"] = first
                if mode == "compile" and anchor.first_compile_s is None:
                    anchor.first_compile_s = r.get("compile_s")
                emit(r)
            except Exception as e:  # noqa: BLE001
                failed = True
                emit(dict(what="anchor_decode", mode=mode, batch=batch, error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc()[-2000:]))
                if mode == "compile" and dev.type == "cuda":
                    torch.cuda.empty_cache()
    for mode in ("eager", "compile"):
        if mode not in modes:
            for batch in batches:
                emit(dict(what="anchor_decode", mode=mode, batch=batch, skipped="mode not requested"))
        elif mode == "compile":
            for batch in batches:
                if batch not in compile_batches:
                    emit(dict(what="anchor_decode", mode=mode, batch=batch,
                              skipped="not compiled: not in --compile-batch (ANCHOR_COMPILE_BATCH)"))
    emit(dict(what="anchor_done", seconds=time.time() - t_start, errors=failed))


if __name__ == "__main__":
    main()
