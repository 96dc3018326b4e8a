#!/usr/bin/env bash
# After scripts/gpu_check.sh (same WORK): the rollout benchmark on the 3B-shape model at
# K = 1, 8, 32 units in flight, and 3 steps of `selfplay train` on CUDA with K = 16.
# Figures are one JSON line each in RESULTS/gpu_extra.jsonl.
set -uo pipefail
RESULTS="$1"; WORK="${WORK:?set WORK to the gpu_check.sh work directory}"; BIN="${SELFPLAY_BIN:-dist/selfplay}"; PY="${PYTHON:-python3}"
torch_lib=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OMP_WAIT_POLICY=PASSIVE
out="$RESULTS/gpu_extra.jsonl"; : > "$out"
# Random weights never write EOS, so every row runs to its token limit: the batched K first, on
# 32 units, then K = 1 on 8 (one unit after another; 32 of them did not fit in 200 s on an H200).
# units_per_s is comparable across the two.
timeout 150 "$BIN" --log warn bench rollout --model "$WORK/llama3b" --device cuda --dtype bf16 \
  --units-in-flight 32,8 --units 32 >> "$out" 2>> "$RESULTS/gpu_extra.log"
echo "{\"what\": \"rollout_exit\", \"k\": \"32,8\", \"rc\": $?}" >> "$out"
timeout 120 "$BIN" --log warn bench rollout --model "$WORK/llama3b" --device cuda --dtype bf16 \
  --units-in-flight 1 --units 8 >> "$out" 2>> "$RESULTS/gpu_extra.log"
echo "{\"what\": \"rollout_exit\", \"k\": \"1\", \"rc\": $?}" >> "$out"
sed -e "s|out_dir = .*|out_dir = \"$WORK/train_k16/run\"|" -e 's|queries_per_step = 4|queries_per_step = 16|' \
  "$WORK/train_run/run.toml" > "$WORK/k16.toml"
printf '[actor]\nunits_in_flight = 16\n' >> "$WORK/k16.toml"
t0=$SECONDS
timeout 200 "$BIN" --log warn train --config "$WORK/k16.toml" >> "$RESULTS/gpu_extra.log" 2>&1
rc=$?
steps=$(wc -l < "$WORK/train_k16/run/steps.jsonl" 2>/dev/null || echo 0)
echo "{\"what\": \"train_cuda_bf16_k16\", \"rc\": $rc, \"steps\": $steps, \"seconds\": $((SECONDS - t0))}" >> "$out"
cat "$out"
