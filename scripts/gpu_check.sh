#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine that needs only the selfplay binary and a Python
# with torch 2.11 (CUDA) and transformers. It makes its models there from random weights, runs
# every check and benchmark, and writes one JSON file of results (RESULTS/gpu_check.json) with
# the full log beside it (RESULTS/gpu_check.log). It must finish in under 9 minutes on one
# H100/H200 (GPU_CHECK_BUDGET_S); each section's time is logged and kept in sections.jsonl.
#
#   scripts/gpu_check.sh [RESULTS]
#
#   SELFPLAY_BIN  the binary (default: dist/selfplay from scripts/build_dist.sh, else the cache's
#                 release build)
#   PYTHON        python with torch + transformers (default: python3)
#   DEVICE        cuda or cuda:N (default: cuda); cpu is a dry run of the whole script on
#                 tiny models (the 3B parts skipped, a CPU-size anchor instead)
#   WORK          scratch space for models (~7 GB; default: a temporary directory)
#   SKIP_3B=1     skip the Llama-3.2-3B-shape benchmarks
#   SKIP_ANCHOR=1 skip transformers on the same card
#   ANCHOR_COMPILE_BATCH  batch sizes the anchor runs under torch.compile (default 1,64: each
#                 batch size is one more compilation; 1,8,64,256 for the full sweep)
#   ANCHOR_TIMEOUT_S      the most the anchor may take (default 330 s, less if the budget is short)
#   GPU_CHECK_BUDGET_S    the whole script's budget (default 540 s); the anchor yields to it
#
# Checks (exit 1 if one fails): CUDA really used (libtorch_cuda loaded, a kernel ran); a padded
# batch's logits on CUDA f32 within 1e-4 of transformers (CUDA and CPU) and of selfplay on the
# CPU, bf16 within a stated tolerance; greedy continuations with continuous batching equal on
# CUDA and CPU, with one device read per token; one learner step CUDA against CPU (f32);
# 3 steps of `selfplay train` in bf16 on CUDA. Benchmarks: decode of the 3B shape at batch 1,
# 8, 64, 256 (bf16; decode-only ms per step with prefill apart, the attention kernel, the share
# of the HBM floor), the same-card anchor (tests/python/anchor_decode.py: transformers eager
# with a dynamic cache, and a static cache under torch.compile(mode="reduce-overhead")) with
# the ratios per batch (decode_vs_transformers.json), and the learner's step tokens/s and peak
# device memory.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
RESULTS="${1:-$root/gpu_check_results}"
T_START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
if [ -n "${SELFPLAY_BIN:-}" ]; then BIN="$SELFPLAY_BIN"
elif [ -x "$root/dist/selfplay" ]; then BIN="$root/dist/selfplay"
else BIN="${CARGO_TARGET_DIR:-$HOME/.cache/selfplay/target}/release/selfplay"; fi
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
fail=0
log() { printf '[gpu_check] %s\n' "$*" | tee -a "$LOG" >&2; }
bad() { log "FAIL: $*"; fail=1; }
run() { # name timeout cmd...: logs the command and its output, never stops the script
  local name="$1" secs="$2"; shift 2
  log "$name: $*"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$LOG" 2>&1; local rc=$?
  log "$name: exit $rc in $((SECONDS - t0)) s"
  section "$name" $((SECONDS - t0)) "$rc"
  return $rc
}
section() { # name seconds rc: one line of sections.jsonl (the per-section timings)
  printf '{"section": "%s", "seconds": %s, "rc": %s, "at_s": %s}\n' "$1" "$2" "$3" $((SECONDS - T_START)) >> "$WORK/sections.jsonl"
}
left() { echo $((BUDGET - (SECONDS - T_START))); } # seconds of the budget still left

[ -x "$BIN" ] || { log "no selfplay binary at $BIN (set SELFPLAY_BIN)"; exit 1; }
: > "$WORK/sections.jsonl"
# The binary links libtorch dynamically: it takes the one of this machine's Python torch.
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { log "$PY cannot import torch (set PYTHON)"; exit 1; }
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if command -v ldd >/dev/null && ldd "$BIN" | grep -q "not found"; then
  log "the binary misses libraries with LD_LIBRARY_PATH=$LD_LIBRARY_PATH:"; ldd "$BIN" | grep "not found" | tee -a "$LOG" >&2
  exit 1
fi
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
SP() { "$BIN" --log warn "$@"; }

# The machine. DEVICE=cpu is a dry run of the whole script (its CUDA check is skipped).
[ "$DEVICE" = cpu ] && SKIP_3B=1
"$PY" - "$DEVICE" > "$WORK/machine.json" <<'PY' || { log "no usable CUDA device"; cat "$WORK/machine.json" >>"$LOG"; exit 1; }
import json, sys, torch, transformers
import shutil
m = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
     "c_compiler": shutil.which("cc") or shutil.which("gcc")}  # torch.compile (inductor, Triton) needs one
if sys.argv[1] != "cpu":
    p = torch.cuda.get_device_properties(torch.device(sys.argv[1]))
    m.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
             bf16=torch.cuda.is_bf16_supported())
print(json.dumps(m))
PY
cat "$WORK/machine.json" | tee -a "$LOG"
# The card's name, for its memory bandwidth (the HBM floor): nvidia-smi's, else torch's.
card=""
if [ "$DEVICE" != cpu ]; then
  command -v nvidia-smi >/dev/null && card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$card" ] || card=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("device", ""))' "$WORK/machine.json")
  log "card: $card"
fi
section setup $((SECONDS - T_START)) 0
"$BIN" --version > "$WORK/version.txt"
SP device-check info > "$WORK/info.json" 2>>"$LOG" || bad "device-check info"
cat "$WORK/info.json" >>"$LOG"

# Correctness on a tiny random Llama.
tiny="$WORK/tiny"; rm_dir="$WORK/rm"; mkdir -p "$tiny" "$rm_dir"
run make_tiny 120 "$PY" "$here/gpu_check.py" make-tiny "$tiny" 7 || bad "make tiny model"
run make_rm 120 "$PY" "$here/gpu_check.py" make-tiny "$rm_dir" 8 classifier || bad "make tiny reward model"
"$PY" "$here/gpu_check.py" prompts "$WORK/prompts.json"
for dev_kind in "ref cpu f32" "dev_f32 $DEVICE f32" "dev_bf16 $DEVICE bf16"; do
  set -- $dev_kind
  tag=$1; shift
  run "logits_$tag" 120 "$BIN" --log warn device-check logits --model "$tiny" --device "$1" --dtype "$2" \
    --prompts "$WORK/prompts.json" --out-logits "$WORK/logits_$tag.safetensors" --out-greedy "$WORK/greedy_$tag.json" \
    || bad "selfplay logits on $1 $2"
done
run hf_logits_cpu 120 "$PY" "$here/gpu_check.py" logits "$WORK/hf_logits_cpu.pt" "$tiny" cpu || bad "transformers cpu"
run hf_logits_dev 120 "$PY" "$here/gpu_check.py" logits "$WORK/hf_logits_dev.pt" "$tiny" "$DEVICE" || bad "transformers on $DEVICE"
run train_step_ref 120 "$BIN" --log warn device-check train-step --model "$tiny" --device cpu --dtype f32 --out "$WORK/train_ref" \
  || bad "train step on cpu"
run train_step_dev 120 "$BIN" --log warn device-check train-step --model "$tiny" --device "$DEVICE" --dtype f32 --out "$WORK/train_dev" \
  || bad "train step on $DEVICE"
# Decoding in CUDA graphs against eager decoding (f32): the same ids, log-probs within 1e-5,
# with refills and a finish probe, and again after an in-place weight update.
run graphs_f32 120 "$BIN" --log warn device-check graphs --model "$tiny" --device "$DEVICE" --dtype f32 \
  --out "$WORK/graphs_f32.json" || bad "device-check graphs"
mkdir -p "$WORK/train_run"
cat > "$WORK/train_run/run.toml" <<TOML
[run]
seed = 3
steps = 3
out_dir = "$WORK/train_run/run"
checkpoint_every = 3
[model]
path = "$tiny"
device = "$DEVICE"
dtype = "bf16"
[game]
mode = "lsp-zero"
queries_per_step = 4
group_size = 2
[challenger]
max_new_tokens = 12
[solver]
max_new_tokens = 16
[reward]
kind = "model"
path = "$rm_dir"
[optim]
lr = 1e-4
grad_accum = 1
TOML
run train_3_steps 240 "$BIN" --log info train --config "$WORK/train_run/run.toml" || bad "selfplay train on $DEVICE bf16"
run compare 120 "$PY" "$here/gpu_check.py" compare "$WORK" "$DEVICE" || bad "a correctness check failed (see checks in gpu_check.json)"

# The same-card anchor: transformers decoding the same model directory (eager with a dynamic
# cache; a static cache under torch.compile(mode="reduce-overhead")), then selfplay beside it.
anchor() { # tag model dtype batches compile_batches prompt_len new_tokens seconds_left
  local tag="$1" model="$2" dtype="$3" batches="$4" cbatches="$5" plen="$6" ntok="$7" avail="$8"
  if [ "${SKIP_ANCHOR:-0}" = 1 ]; then log "anchor_$tag: skipped (SKIP_ANCHOR=1)"; return 0; fi
  local secs="${ANCHOR_TIMEOUT_S:-330}"
  [ "$avail" -lt "$secs" ] && secs="$avail"
  if [ "$secs" -lt 60 ]; then
    log "anchor_$tag: skipped, $avail s left of the budget"
    echo "{\"what\": \"anchor_decode\", \"skipped\": \"time budget: $avail s left\"}" > "$WORK/anchor_$tag.jsonl"
    return 0
  fi
  : > "$WORK/anchor_$tag.jsonl"
  # Its own deadline 30 s before the timeout: a compilation it cannot finish is skipped (and
  # said so in the JSON) rather than killed.
  run "anchor_$tag" "$secs" "$PY" "$root/tests/python/anchor_decode.py" --model "$model" --device "$DEVICE" \
    --dtype "$dtype" --batch "$batches" --compile-batch "$cbatches" --prompt-len "$plen" --new-tokens "$ntok" \
    --deadline-s $((secs - 30)) ${card:+--device-name "$card"} --out "$WORK/anchor_$tag.jsonl"
  local rc=$?
  [ $rc = 0 ] || log "anchor_$tag: exit $rc (what it measured is kept; see anchor_$tag.jsonl)"
  "$PY" "$here/gpu_check.py" decode-vs-anchor "$WORK/decode_$tag.jsonl" "$WORK/anchor_$tag.jsonl" \
    "$WORK/decode_vs_transformers_$tag.json" 2>&1 | tee -a "$LOG" >&2
  grep -q '"error"' "$WORK/anchor_$tag.jsonl" && log "anchor_$tag: some configurations recorded an error (see anchor_$tag.jsonl)"
  return 0
}

# Dry run (DEVICE=cpu): the decode benchmark and the anchor at CPU size on the tiny model, so
# that every code path of the 3B section runs here too. The card's name is made up
# (DRY_RUN_CARD) only so that the HBM floor's code runs: its shares mean nothing on a CPU.
if [ "$DEVICE" = cpu ]; then
  run decode_tiny 120 sh -c "\"$BIN\" --log warn device-check decode --model \"$tiny\" --device cpu --dtype f32 \
    --batch 1,4 --prompt-len 16 --new-tokens 16 --device-name \"${DRY_RUN_CARD:-NVIDIA H100 80GB HBM3}\" \
    > \"$WORK/decode_tiny.jsonl\"" || bad "tiny decode benchmark"
  cat "$WORK/decode_tiny.jsonl" >>"$LOG"
  card="${DRY_RUN_CARD:-NVIDIA H100 80GB HBM3}" anchor tiny "$tiny" f32 1,4 "${ANCHOR_COMPILE_BATCH:-1,4}" 16 16 $(( $(left) - 30 ))
fi

# Performance on the Llama-3.2-3B shape (random weights, bf16).
if [ "${SKIP_3B:-0}" != 1 ]; then
  big="$WORK/llama3b"; mkdir -p "$big"
  if run make_3b 300 "$PY" "$here/gpu_check.py" make-3b "$big"; then
    run decode_3b 300 sh -c "\"$BIN\" --log warn device-check decode --model \"$big\" --device \"$DEVICE\" --dtype bf16 \
      --batch 1,8,64,256 --prompt-len 128 --new-tokens 128 --device-name \"$card\" > \"$WORK/decode_3b.jsonl\"" \
      || bad "3B decode benchmark"
    cat "$WORK/decode_3b.jsonl" >>"$LOG"
    # Leave the learner benchmark (~60 s) and the summary their time.
    anchor "3b" "$big" bf16 1,8,64,256 "${ANCHOR_COMPILE_BATCH:-1,64}" 128 128 $(( $(left) - 120 ))
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/memory_used_mib.log" 2>/dev/null &
      smi=$!
    fi
    run learner_3b 300 sh -c "\"$BIN\" --log warn device-check learner-step --model \"$big\" --device \"$DEVICE\" --dtype bf16 \
      --groups 8 --group-size 4 --prompt-len 128 --completion-len 256 --grad-accum 4 --steps 2 > \"$WORK/learner_3b.jsonl\"" \
      || bad "3B learner step benchmark"
    [ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
    cat "$WORK/learner_3b.jsonl" >>"$LOG"
    if [ -s "$WORK/memory_used_mib.log" ]; then
      peak=$(sort -n "$WORK/memory_used_mib.log" | tail -1)
      printf '{"what": "learner_3b_peak_device_memory", "mib": %s, "source": "nvidia-smi memory.used, 100 ms polling"}\n' "$peak" \
        > "$WORK/learner_3b_memory.json"
      log "learner 3B peak device memory (nvidia-smi): $peak MiB"
    fi
  else
    bad "could not make the 3B-shape model"
  fi
fi

section total $((SECONDS - T_START)) "$fail"
log "sections (seconds): $(sed -e 's/.*"section": "\([^"]*\)", "seconds": \([0-9]*\).*/\1 \2/' "$WORK/sections.jsonl" | paste -sd, - | sed 's/,/, /g')"
[ $((SECONDS - T_START)) -gt "$BUDGET" ] && log "over the budget: $((SECONDS - T_START)) s of $BUDGET s"
"$PY" "$here/gpu_check.py" summarize "$WORK"
cp "$WORK/gpu_check.json" "$RESULTS/gpu_check.json"
for f in "$WORK"/decode_vs_transformers_*.json; do [ -e "$f" ] && cp "$f" "$RESULTS/"; done
log "results: $RESULTS/gpu_check.json"
if [ $fail = 0 ]; then log "all checks passed"; else log "some checks FAILED"; fi
exit $fail
