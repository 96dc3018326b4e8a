#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine that needs only the selfplay binary and a Python
# with torch 2.11 (CUDA) and transformers. It makes its models there from random weights, runs
# every check and benchmark, and writes one JSON file of results (RESULTS/gpu_check.json) with
# the full log beside it (RESULTS/gpu_check.log). About 5 minutes on one H100/H200.
#
#   scripts/gpu_check.sh [RESULTS]
#
#   SELFPLAY_BIN  the binary (default: dist/selfplay from scripts/build_dist.sh, else the cache's
#                 release build)
#   PYTHON        python with torch + transformers (default: python3)
#   DEVICE        cuda or cuda:N (default: cuda)
#   WORK          scratch space for models (~7 GB; default: a temporary directory)
#   SKIP_3B=1     skip the Llama-3.2-3B-shape benchmarks
#
# Checks (exit 1 if one fails): CUDA really used (libtorch_cuda loaded, a kernel ran); a padded
# batch's logits on CUDA f32 within 1e-4 of transformers (CUDA and CPU) and of selfplay on the
# CPU, bf16 within a stated tolerance; greedy continuations with continuous batching equal on
# CUDA and CPU, with one device read per token; one learner step CUDA against CPU (f32);
# 3 steps of `selfplay train` in bf16 on CUDA. Benchmarks: decode tokens/s of the 3B shape at
# batch 1, 8, 64, 256 (bf16), and the learner's step tokens/s and peak device memory.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
RESULTS="${1:-$root/gpu_check_results}"
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
  return $rc
}

[ -x "$BIN" ] || { log "no selfplay binary at $BIN (set SELFPLAY_BIN)"; exit 1; }
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { log "$PY cannot import torch (set PYTHON)"; exit 1; }
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
SP() { "$BIN" --log warn "$@"; }

# The machine. DEVICE=cpu is a dry run of the whole script (its CUDA check is skipped).
[ "$DEVICE" = cpu ] && SKIP_3B=1
"$PY" - "$DEVICE" > "$WORK/machine.json" <<'PY' || { log "no usable CUDA device"; cat "$WORK/machine.json" >>"$LOG"; exit 1; }
import json, sys, torch, transformers
m = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
if sys.argv[1] != "cpu":
    p = torch.cuda.get_device_properties(torch.device(sys.argv[1]))
    m.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
             bf16=torch.cuda.is_bf16_supported())
print(json.dumps(m))
PY
cat "$WORK/machine.json" | tee -a "$LOG"
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

# Performance on the Llama-3.2-3B shape (random weights, bf16).
if [ "${SKIP_3B:-0}" != 1 ]; then
  big="$WORK/llama3b"; mkdir -p "$big"
  if run make_3b 300 "$PY" "$here/gpu_check.py" make-3b "$big"; then
    run decode_3b 300 sh -c "\"$BIN\" --log warn device-check decode --model \"$big\" --device \"$DEVICE\" --dtype bf16 \
      --batch 1,8,64,256 --prompt-len 128 --new-tokens 128 > \"$WORK/decode_3b.jsonl\"" || bad "3B decode benchmark"
    cat "$WORK/decode_3b.jsonl" >>"$LOG"
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

"$PY" "$here/gpu_check.py" summarize "$WORK"
cp "$WORK/gpu_check.json" "$RESULTS/gpu_check.json"
log "results: $RESULTS/gpu_check.json"
if [ $fail = 0 ]; then log "all checks passed"; else log "some checks FAILED"; fi
exit $fail
