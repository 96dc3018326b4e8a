#!/usr/bin/env bash
# Checks the learner's memory formulas (game/src/sizing.rs, the sizing table of
# docs/operations.md) against the peak resident memory of real learner steps on the CPU: a
# random 28M-parameter Llama and SmolLM2-135M, in f32 and bf16. Prints one JSON line per run
# and a markdown table of measured against predicted.
#
#   scripts/learner_memory.sh            # the runs of docs/operations.md (about 5 min on 2 cores)
#   scripts/learner_memory.sh table      # only the sizing table, from the formulas
#   SELFPLAY_MEMORY_QUICK=1 scripts/learner_memory.sh   # the tiny model only
#   scripts/learner_memory.sh checkpointing   # the tiny model with and without
#                                             # optim.gradient_checkpointing (about 2 min)
#
# The allocator is told to hand every freed block of 64 kB or more back to the system, so that
# resident memory follows live tensors (glibc otherwise keeps freed memory and the peak
# measures its heap, not the learner).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release -q -p selfplay-game --example learner_memory
bin="$CARGO_TARGET_DIR/release/examples/learner_memory"
if [ "${1:-}" = table ]; then
  exec "$bin" table
fi
export MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0
runs=(
  "tiny f32 4 96 32 1024"
  "tiny f32 8 224 32 64"
  "tiny bf16 8 224 32 64"
  "tiny f32 2 16 240 0"
)
if [ "${1:-}" = checkpointing ]; then
  runs=(
    "tiny f32 8 224 32 64 0" "tiny f32 8 224 32 64 1"
    "tiny bf16 8 224 32 64 0" "tiny bf16 8 224 32 64 1"
  )
elif [ -z "${SELFPLAY_MEMORY_QUICK:-}" ]; then
  runs+=("$SELFPLAY_MODEL f32 4 192 64 1024" "$SELFPLAY_MODEL bf16 4 192 64 1024")
fi
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for r in "${runs[@]}"; do
  # shellcheck disable=SC2086
  "$bin" $r | tee -a "$out"
done
"$SELFPLAY_PYTHON" - "$out" <<'EOF'
import json, sys
mb = lambda b: f"{b / 2**20:.0f}"
print("\n| model | dtype | tokens | head chunk | checkpointing | weights | AdamW state | gradients | step peak over resident | ratio | step seconds |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for line in open(sys.argv[1]):
    d = json.loads(line)
    m, p = d["measured"], d["predicted"]
    name = "tiny (28M)" if d["model"] == "tiny" else d["model"].rstrip("/").split("/")[-1]
    chunk = min(d["logprob_chunk_tokens"] or 10**9, d["sequences"] * d["completion_tokens"])
    cell = lambda a, b: f"{mb(a)} / {mb(b)}"
    ckpt = "on" if d.get("gradient_checkpointing") else "off"
    print(f"| {name} | {d['dtype']} | {d['tokens']} | {chunk} | {ckpt} | {cell(m['weights'], p['weights'])} "
          f"| {cell(m['optimizer_state'], p['optimizer_state'])} "
          f"| {cell(m['gradients_kept_after_step1'], p['gradients'])} "
          f"| {cell(m['step2_peak_over_before'], p['step2_peak_over_before'])} "
          f"| {d['step2_measured_over_predicted']:.2f} | {d['steps'][1]['seconds']:.1f} |")
EOF
