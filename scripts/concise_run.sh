#!/usr/bin/env bash
# The "Concise answers" run of docs/results.md: SmolLM2-135M-Instruct trained with LSP,
# LSP-Zero and GRPO on configs/smollm2-concise.toml (a rule reward: answers of 10 to 50 words),
# the three at once on this CPU (one libtorch thread each) for MINUTES of wall time, each
# stopped by SIGINT (which writes a final checkpoint). Then:
#   - the curves (docs/results/concise-curves.png);
#   - each trained model against the base on a stratified sample of LIMIT AlpacaEval prompts:
#     the rule's pass rate for both (--rules) and the SmolLM2 judge's calibrated win rate;
#   - the challenger's queries (LSP, LSP-Zero) of the first and last STEPS_WINDOW steps, and
#     the base model's pass rate on them.
# GRPO trains on the MT-bench and Vicuna prompts (first turns), never on AlpacaEval.
# MODES picks the modes (default "lsp lsp-zero grpo"); STAGES picks what runs (default
# "train curves eval queries"; curves are drawn for every mode that has a step log). A mode whose run directory
# already holds a checkpoint continues from it (--resume). MALLOC_ARENA_MAX=2 keeps each
# process's heap compact (three training processes share this machine's 24 GiB).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
cd "$here/.."
bin="${SELFPLAY_BIN:-$CARGO_TARGET_DIR/release/selfplay}"
minutes="${MINUTES:-55}"
read -r -a modes <<< "${MODES:-lsp lsp-zero grpo}"
stages="${STAGES:-train curves eval queries}"
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
limit="${LIMIT:-200}"
window="${STEPS_WINDOW:-10}"
cfg=configs/smollm2-concise.toml
out=docs/results/concise
mkdir -p runs "$out"
cat "$SELFPLAY_DATA/mt_bench/question.jsonl" "$SELFPLAY_DATA/vicuna_bench/question.jsonl" > runs/concise-grpo-prompts.jsonl
if [[ " $stages " == *" train "* ]]; then
  for mode in "${modes[@]}"; do
    resume=""
    if ls -d runs/concise-$mode/checkpoints/step-* > /dev/null 2>&1; then resume="--resume"; fi
    echo "$mode: $(date -u) start ${resume:-fresh}, $minutes minutes" >> runs/concise-times.txt
    timeout -s INT "$((minutes * 60))" "$bin" --threads 1 train --config "$cfg" $resume \
      --set game.mode=$mode --set run.out_dir=runs/concise-$mode \
      --set game.prompts_file=runs/concise-grpo-prompts.jsonl \
      --metrics-addr 127.0.0.1:0 >> runs/concise-$mode.log 2>&1 &
  done
  wait || true
  echo "${modes[*]}: $(date -u) stopped" >> runs/concise-times.txt
fi
if [[ " $stages " == *" curves "* ]]; then
  runs=()
  for m in lsp lsp-zero grpo; do [ -f runs/concise-$m/steps.jsonl ] && runs+=(--run "$m=runs/concise-$m"); done
  "$bin" plot-curves "${runs[@]}" --out "$out/curves.png"
fi
if [[ " $stages " == *" eval "* ]]; then for mode in "${modes[@]}"; do
  ckpt=$(ls -d runs/concise-$mode/checkpoints/step-* | sort | tail -n1)
  "$bin" --threads 2 eval --model "$ckpt" --baseline "$SELFPLAY_MODEL" \
    --prompts "$SELFPLAY_DATA/alpaca_eval/alpaca_eval.json" --limit "$limit" --stratified --seed 0 \
    --judge "judge-lm:$SELFPLAY_MODEL" --max-new-tokens 96 --pairwise-rule calibrated \
    --rules "$cfg" --out "$out/eval-$mode" | tee "$out/eval-$mode.txt"
done; fi
# The challenger's queries: first and last steps, and the base model's pass rate on them.
if [[ " $stages " == *" queries "* ]]; then for mode in "${modes[@]}"; do
  if [ "$mode" = grpo ]; then continue; fi
  "$SELFPLAY_PYTHON" "$here/concise_queries.py" runs/concise-$mode/samples.jsonl "$window" "$out/queries-$mode" 7
  for part in first last; do
    "$bin" --threads 2 eval --model "$SELFPLAY_MODEL" --baseline "$SELFPLAY_MODEL" \
      --prompts "$out/queries-$mode/$part.jsonl" --seed 0 --judge "judge-lm:$SELFPLAY_MODEL" \
      --max-new-tokens 96 --rules "$cfg" --out "$out/queries-$mode/base-on-$part" \
      | tee "$out/queries-$mode/base-on-$part.txt"
  done
done; fi
