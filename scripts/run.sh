#!/usr/bin/env bash
# The main job: set up (first run only), then `selfplay train` on the embedded default (LSP on
# SmolLM2-135M-Instruct, configs/smollm2-cpu.toml): coordinator, learner and one actor in one
# process on 127.0.0.1, checkpoints in runs/smollm2-lsp, metrics on 127.0.0.1:9464.
# Extra arguments replace the default command, e.g. `scripts/run.sh generate --prompt "Hi"`.
set -Eeuo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
trap 'printf "[run] FAILED (exit %s) at scripts/run.sh line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
"$here/setup.sh"
source "$here/env.sh"
if [ $# -eq 0 ]; then
  # Continue an earlier run of the default when there is one.
  resume=()
  [ -d runs/smollm2-lsp/checkpoints ] && resume=(--resume)
  set -- train "${resume[@]}"
fi
exec "$CARGO_TARGET_DIR/release/selfplay" "$@"
