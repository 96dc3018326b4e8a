#!/usr/bin/env bash
# Generation and training-side scoring throughput: `selfplay bench generate|score` beside the
# transformers side (tests/python/bench_hf.py), same model, prompts, threads, device and dtype,
# in one run. Prints a markdown table and writes the raw JSON lines to --out.
#
# Assumes scripts/setup.sh ran (or, on another machine, SELFPLAY_BIN, SELFPLAY_MODEL, PYTHON and
# SELFPLAY_DATA / SELFPLAY_BENCH_PROMPTS point at a built binary, a model, a Python with
# torch 2.11 + transformers, and the AlpacaEval prompts).
#
# Usage: scripts/bench.sh [--threads N] [--device cpu|cuda|cuda:N] [--dtype f32|bf16|f16]
#          [--out FILE] [--only generate|score] [--batch 8] [--max-new-tokens 128]
#          [--warmup 1] [--repeats 3] [--rounds 1] [--wait-quiet SECS] [--with-full-logits]
#   --rounds R         run the pair (selfplay, transformers) R times, alternating, so that both
#                      see the same machine; the table pools the rounds (mean of the means,
#                      best of the bests)
#   --wait-quiet SECS  first wait (up to SECS) until the 1-minute load average is below 0.8
#   --with-full-logits also time transformers' score with logits at every position (info only)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# Keep what the caller set; env.sh fills in the local defaults.
user_bin="${SELFPLAY_BIN:-}"
user_python="${PYTHON:-}"
source "$here/env.sh"
BIN="${user_bin:-$CARGO_TARGET_DIR/release/selfplay}"
if [ -n "$user_python" ]; then PY="$user_python"
elif [ -x "${SELFPLAY_PYTHON:-}" ]; then PY="$SELFPLAY_PYTHON"
else PY=python3; fi

threads=2 device=cpu dtype=f32 out="" only="" batch=8 max_new=128 warmup=1 repeats=3 rounds=1 wait_quiet=0 full_logits=0
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --max-new-tokens) max_new="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --wait-quiet) wait_quiet="$2"; shift 2 ;;
    --with-full-logits) full_logits=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$only" in ""|generate|score) ;; *) echo "bench.sh: --only generate|score" >&2; exit 2 ;; esac
[ -n "$out" ] || out="$SELFPLAY_CACHE/bench/bench-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
mkdir -p "$(dirname "$out")"
: > "$out"

export SELFPLAY_BENCH_PROMPTS="${SELFPLAY_BENCH_PROMPTS:-$SELFPLAY_DATA/alpaca_eval/alpaca_eval.json}"
[ -x "$BIN" ] || { echo "bench.sh: no selfplay binary at $BIN (run scripts/setup.sh or set SELFPLAY_BIN)" >&2; exit 1; }
[ -s "$SELFPLAY_MODEL/config.json" ] || { echo "bench.sh: no model at $SELFPLAY_MODEL (set SELFPLAY_MODEL)" >&2; exit 1; }
[ -s "$SELFPLAY_BENCH_PROMPTS" ] || { echo "bench.sh: no prompts at $SELFPLAY_BENCH_PROMPTS" >&2; exit 1; }
# The binary links the libtorch of the Python torch install: make sure the loader finds it.
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
case ":${LD_LIBRARY_PATH:-}:" in *":$torch_lib:"*) ;; *) export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
# Same thread count on both sides, for libtorch's intra-op pool and for OpenMP/MKL.
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
export TOKENIZERS_PARALLELISM=false

log() { printf '[bench] %s\n' "$*" >&2; }

if [ "$wait_quiet" -gt 0 ]; then
  waited=0
  while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" 'BEGIN{exit !(l < 0.8)}'; then log "load $load: quiet"; break; fi
    if [ "$waited" -ge "$wait_quiet" ]; then log "load still $load after ${waited}s: measuring anyway"; break; fi
    log "load $load, waiting (${waited}s of ${wait_quiet}s)"
    sleep 20; waited=$((waited + 20))
  done
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

common=(--batch "$batch" --max-new-tokens "$max_new" --warmup "$warmup" --repeats "$repeats")
# Appends one JSON result line to $out with the round and the 1-minute load before and after.
record() { # round load_before
  "$PY" -c 'import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
r["round"] = int(sys.argv[1]); r["load1_before"] = float(sys.argv[2])
r["load1_after"] = float(open("/proc/loadavg").read().split()[0])
print(json.dumps(r))' "$1" "$2" | tee -a "$out"
}
run_ours() { # bench round
  local l0; l0=$(cut -d' ' -f1 /proc/loadavg)
  log "selfplay bench $1 ($device, $dtype, $threads threads), round $2, load $l0"
  "$BIN" --log warn --threads "$threads" bench "$1" --model "$SELFPLAY_MODEL" --device "$device" \
    --dtype "$dtype" --prompts "$SELFPLAY_BENCH_PROMPTS" "${common[@]}" | record "$2" "$l0"
}
run_hf() { # bench round [extra args]
  local b="$1" r="$2" l0; shift 2; l0=$(cut -d' ' -f1 /proc/loadavg)
  log "transformers $b $* ($device, $dtype, $threads threads), round $r, load $l0"
  "$PY" "$root/tests/python/bench_hf.py" "$b" --model "$SELFPLAY_MODEL" --device "$device" \
    --dtype "$dtype" --threads "$threads" --prompts "$SELFPLAY_BENCH_PROMPTS" "${common[@]}" "$@" \
    2> >(grep -v -e '^Loading weights' -e 'it/s]' >&2) | record "$r" "$l0"
}

for b in generate score; do
  [ -z "$only" ] || [ "$only" = "$b" ] || continue
  for r in $(seq 1 "$rounds"); do
    run_ours "$b" "$r"
    run_hf "$b" "$r"
    if [ "$b" = score ] && [ "$full_logits" = 1 ]; then run_hf score "$r" --full-logits; fi
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

"$PY" - "$out" "$load_before" "$load_after" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
targets = {"generate": 1.5, "score_fwd_bwd": 1.0}
def key(r):
    return r["impl"] + (" (full logits)" if r.get("extra", {}).get("full_logits") else "")
print()
print("| bench | impl | tokens | runs | secs mean / best | tokens/s (mean) | tokens/s (best) "
      "| vs transformers (mean) | vs transformers (best) | target |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
for bench in ["generate", "score_fwd_bwd"]:
    rs = [r for r in rows if r["bench"] == bench]
    agg = {}
    for r in rs:
        a = agg.setdefault(key(r), {"tokens": r["tokens"], "means": [], "bests": [], "prompt_tokens": r.get("extra", {}).get("prompt_tokens")})
        a["means"].append(r["secs_mean"]); a["bests"].append(r["secs_best"])
    base = agg.get("transformers")
    for name, a in agg.items():
        mean, best = statistics.fmean(a["means"]), min(a["bests"])
        tm, tb = a["tokens"] / mean, a["tokens"] / best
        rm = tm / (base["tokens"] / statistics.fmean(base["means"])) if base else float("nan")
        rb = tb / (base["tokens"] / min(base["bests"])) if base else float("nan")
        tgt = ""
        if name == "selfplay":
            tgt = f">= {targets[bench]}x: " + ("met" if rm >= targets[bench] else "missed")
        print(f"| {bench} | {name} | {a['tokens']} | {len(a['means'])} | {mean:.2f} / {best:.2f} | {tm:.1f} | {tb:.1f} "
              f"| {rm:.2f}x | {rb:.2f}x | {tgt} |")
    ours = agg.get("selfplay")
    if base and ours and ours["prompt_tokens"] is not None and ours["prompt_tokens"] != base["prompt_tokens"]:
        print(f"\nWARNING: {bench}: prompt token counts differ (selfplay {ours['prompt_tokens']}, "
              f"transformers {base['prompt_tokens']})")
print(f"\nload average before: {sys.argv[2]}, after: {sys.argv[3]}")
busy = [r for r in rows if max(r.get("load1_before", 0), r.get("load1_after", 0)) >= 2.5]
if busy:
    print("WARNING: the machine was busy during " + ", ".join(f"{r['impl']} {r['bench']} round {r['round']}" for r in busy)
          + " (1-minute load >= 2.5): those figures are not reliable")
PY
log "raw results: $out"
