#!/usr/bin/env bash
# The real run of docs/results.md: LSP and LSP-Zero on SmolLM2-135M-Instruct on this CPU
# machine (both at once, one libtorch thread each, MINUTES of wall time each), then each
# checkpoint against the base model on a stratified AlpacaEval sample, and the curves.
# A mode whose run directory already holds a checkpoint continues from it (--resume), so the
# training time adds up over several invocations.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
cd "$here/.."
bin="$CARGO_TARGET_DIR/release/selfplay"
minutes="${MINUTES:-25}"
limit="${LIMIT:-100}"
# MINUTES=0: no training, only the curves and the evaluation of the newest checkpoints.
[ "$minutes" -gt 0 ] && for mode in lsp lsp-zero; do
  resume=""
  if ls -d runs/real-$mode/checkpoints/step-* > /dev/null 2>&1; then resume="--resume"; fi
  echo "$mode: $(date -u) start ${resume:-fresh}, $minutes minutes" >> runs/real-times.txt
  timeout -s INT "$((minutes * 60))" "$bin" --threads 1 train $resume --set game.mode=$mode \
    --set run.out_dir=runs/real-$mode --set run.steps=0 --set run.checkpoint_every=5 \
    --metrics-addr 127.0.0.1:0 >> runs/real-$mode.log 2>&1 &
done
wait
[ "$minutes" -gt 0 ] && echo "both: $(date -u) stopped" >> runs/real-times.txt
"$bin" plot-curves --run lsp=runs/real-lsp --run lsp-zero=runs/real-lsp-zero --out docs/results/curves.png
for mode in lsp lsp-zero; do
  ckpt=$(ls -d runs/real-$mode/checkpoints/step-* | sort | tail -n1)
  "$bin" --threads 2 eval --model "$ckpt" --baseline "$SELFPLAY_MODEL" \
    --prompts "$SELFPLAY_DATA/alpaca_eval/alpaca_eval.json" --limit "$limit" --stratified --seed 0 \
    --judge "judge-lm:$SELFPLAY_MODEL" --max-new-tokens 128 --out docs/results/eval-$mode
  # The same answers (from the cache) under the calibrated pairwise rule.
  "$bin" --threads 2 eval --model "$ckpt" --baseline "$SELFPLAY_MODEL" \
    --prompts "$SELFPLAY_DATA/alpaca_eval/alpaca_eval.json" --limit "$limit" --stratified --seed 0 \
    --judge "judge-lm:$SELFPLAY_MODEL" --max-new-tokens 128 --pairwise-rule calibrated \
    --out docs/results/eval-$mode-calibrated
done
