#!/usr/bin/env bash
# One command to check selfplay on a CUDA machine:
#   1. CUDA correctness: `selfplay generate --json` greedy on "What is the capital of France?"
#      on CUDA in f32 must answer with "Paris", give the same ids as on the CPU and as
#      transformers on CUDA, and log-probs within 1e-3 of transformers'; bf16 must still say
#      "Paris" (its ids and log-probs are reported, not required to match).
#   2. The benchmarks (scripts/bench.sh: selfplay vs transformers, generate and score
#      fwd+bwd) on CUDA in f32 and in bf16.
#   3. Optionally (RUN_CARGO_TESTS=1, needs the source tree and cargo): the parity tests
#      `cargo test --release -p selfplay-policy --test parity --test smollm2` (these run on the
#      CPU; they check that this machine's build is the tested one).
#
# Works with a prebuilt binary and a Python that has torch 2.11 (the CUDA build that the
# binary was linked against, e.g. torch==2.11.0 from PyPI = cu130) and transformers:
#   SELFPLAY_BIN    the selfplay binary   (default: $CARGO_TARGET_DIR/release/selfplay)
#   SELFPLAY_MODEL  HF model directory    (default: the imported SmolLM2-135M-Instruct)
#   PYTHON          python with torch     (default: the setup's venv if present, else python3)
#   SELFPLAY_DATA   folder with alpaca_eval/alpaca_eval.json (or SELFPLAY_BENCH_PROMPTS=FILE)
#   DEVICE          cuda or cuda:N        (default: cuda)
#   OUT             results folder        (default: $SELFPLAY_CACHE/gpu_check/<UTC time>)
#   THREADS         CPU threads for the CPU reference run (default: nproc)
# Exit status: 0 when every check passed; the benchmark figures are printed for BENCHMARKS.md.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
user_bin="${SELFPLAY_BIN:-}"
user_python="${PYTHON:-}"
source "$here/env.sh"
BIN="${user_bin:-$CARGO_TARGET_DIR/release/selfplay}"
if [ -n "$user_python" ]; then PY="$user_python"
elif [ -x "${SELFPLAY_PYTHON:-}" ]; then PY="$SELFPLAY_PYTHON"
else PY=python3; fi
DEVICE="${DEVICE:-cuda}"
THREADS="${THREADS:-$(nproc)}"
OUT="${OUT:-$SELFPLAY_CACHE/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
export SELFPLAY_BENCH_PROMPTS="${SELFPLAY_BENCH_PROMPTS:-$SELFPLAY_DATA/alpaca_eval/alpaca_eval.json}"
mkdir -p "$OUT"
fail=0
log() { printf '[gpu_check] %s\n' "$*" >&2; }
bad() { printf '[gpu_check] FAIL: %s\n' "$*" >&2; fail=1; }

[ -x "$BIN" ] || { log "no selfplay binary at $BIN (set SELFPLAY_BIN)"; exit 1; }
[ -s "$SELFPLAY_MODEL/config.json" ] || { log "no model at $SELFPLAY_MODEL (set SELFPLAY_MODEL)"; exit 1; }
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { log "$PY cannot import torch (set PYTHON)"; exit 1; }
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TOKENIZERS_PARALLELISM=false

# 0. The machine.
"$PY" - "$DEVICE" <<'PY' | tee "$OUT/machine.txt" || { log "no usable CUDA device"; exit 1; }
import sys, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
d = torch.device(sys.argv[1])
p = torch.cuda.get_device_properties(d)
print(f"device {d}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
if not torch.__version__.startswith("2.11."):
    print(f"WARNING: selfplay links libtorch 2.11 (tch 0.24); this torch is {torch.__version__}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/machine.txt"
"$BIN" --version | tee -a "$OUT/machine.txt"

# 1. CUDA correctness.
prompt="What is the capital of France?"
gen() { # device dtype out
  "$BIN" --log warn --threads "$THREADS" generate --model "$SELFPLAY_MODEL" --device "$1" --dtype "$2" \
    --prompt "$prompt" --max-new-tokens 32 --temperature 0 --json > "$3"
}
gen cpu f32 "$OUT/greedy_cpu_f32.json" || bad "selfplay generate on cpu f32 failed"
gen "$DEVICE" f32 "$OUT/greedy_cuda_f32.json" || bad "selfplay generate on $DEVICE f32 failed"
gen "$DEVICE" bf16 "$OUT/greedy_cuda_bf16.json" || bad "selfplay generate on $DEVICE bf16 failed"
"$PY" - "$SELFPLAY_MODEL" "$DEVICE" "$prompt" "$OUT" <<'PY' || fail=1
import json, os, sys
import torch, transformers
model_dir, device, prompt, out = sys.argv[1:]
ok = True
def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p))
    except Exception as e:
        print(f"FAIL: {name}: {e}"); return None
cpu, f32, bf16 = load("greedy_cpu_f32.json"), load("greedy_cuda_f32.json"), load("greedy_cuda_bf16.json")
for name, r in [("cpu f32", cpu), (f"{device} f32", f32), (f"{device} bf16", bf16)]:
    if r is None:
        ok = False; continue
    has = "Paris" in r["text"]
    ok &= has
    print(f"{'ok  ' if has else 'FAIL'} selfplay {name}: {r['text']!r}")
# transformers on the same device, f32, greedy: ids and per-token log-probs.
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
with torch.inference_mode():
    g = m.generate(ids, do_sample=False, max_new_tokens=32, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2)
hf_ids = g.sequences[0, ids.shape[1]:].tolist()
hf_lp = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, hf_ids)]
print(f"     transformers {device} f32: {tok.decode(hf_ids, skip_special_tokens=True)!r}")
if f32 is not None:
    if f32["prompt_ids"] != ids[0].tolist():
        ok = False; print("FAIL selfplay and transformers prompt ids differ")
    n = min(len(hf_ids), len(f32["completion_ids"]))
    same = f32["completion_ids"] == hf_ids
    ok &= same
    print(f"{'ok  ' if same else 'FAIL'} {device} f32 greedy ids == transformers {device} f32 ids")
    d = max(abs(a - b) for a, b in zip(f32["logprobs"][:n], hf_lp[:n])) if n else float("nan")
    ok &= d <= 1e-3
    print(f"{'ok  ' if d <= 1e-3 else 'FAIL'} {device} f32 log-probs vs transformers: max |diff| {d:.2e} (tol 1e-3)")
if f32 is not None and cpu is not None:
    same = f32["completion_ids"] == cpu["completion_ids"]
    ok &= same
    print(f"{'ok  ' if same else 'FAIL'} {device} f32 greedy ids == cpu f32 greedy ids")
    n = min(len(cpu["logprobs"]), len(f32["logprobs"]))
    d = max(abs(a - b) for a, b in zip(cpu["logprobs"][:n], f32["logprobs"][:n])) if n else float("nan")
    ok &= d <= 1e-3
    print(f"{'ok  ' if d <= 1e-3 else 'FAIL'} {device} f32 log-probs vs cpu f32: max |diff| {d:.2e} (tol 1e-3)")
if bf16 is not None and cpu is not None:
    k = next((i for i, (a, b) in enumerate(zip(bf16["completion_ids"], cpu["completion_ids"])) if a != b), None)
    print(f"info {device} bf16 ids {'equal cpu f32' if k is None and len(bf16['completion_ids']) == len(cpu['completion_ids']) else f'diverge from cpu f32 at token {k}'}")
sys.exit(0 if ok else 1)
PY
[ $fail = 0 ] && log "CUDA correctness: passed" || log "CUDA correctness: FAILED (see above)"

# 2. Benchmarks on CUDA, f32 and bf16 (threads only matter for the CPU-side work).
for dtype in f32 bf16; do
  "$here/bench.sh" --device "$DEVICE" --dtype "$dtype" --threads "$THREADS" \
    --out "$OUT/bench_${dtype}.jsonl" 2>&1 | tee "$OUT/bench_${dtype}.md" \
    || bad "bench.sh on $DEVICE $dtype failed"
done

# 3. The parity tests (CPU), when the source tree and cargo are here and asked for.
if [ "${RUN_CARGO_TESTS:-0}" = 1 ]; then
  if command -v cargo >/dev/null && [ -f "$root/Cargo.toml" ]; then
    (cd "$root" && RUST_TEST_THREADS=1 cargo test --release -p selfplay-policy --test parity --test smollm2) \
      2>&1 | tee "$OUT/parity_tests.txt" | tail -n 30
    [ "${PIPESTATUS[0]}" = 0 ] || bad "parity tests failed"
  else
    bad "RUN_CARGO_TESTS=1 but no cargo or no source tree"
  fi
fi

log "results in $OUT"
if [ $fail = 0 ]; then log "all checks passed"; else log "some checks FAILED"; fi
exit $fail
