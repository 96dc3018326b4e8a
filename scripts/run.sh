#!/usr/bin/env bash
# The main job: set up (first run only) and run selfplay on the embedded default model.
# Extra arguments replace the default command, e.g. `scripts/run.sh generate --prompt "Hi"`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
source "$here/env.sh"
if [ $# -eq 0 ]; then
  set -- generate --prompt "Write a short poem about learning by playing against yourself." --max-new-tokens 96
fi
exec "$CARGO_TARGET_DIR/release/selfplay" "$@"
