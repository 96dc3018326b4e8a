#!/usr/bin/env bash
# The binary to carry to another machine: the release build without debug information
# (~20 MB instead of ~200 MB), at dist/selfplay. It links libtorch dynamically: the target
# machine needs PyTorch 2.11 (its torch/lib on LD_LIBRARY_PATH, as scripts/gpu_check.sh sets).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
source "$here/env.sh"
cd "$here/.."
cargo build --release --locked --bin selfplay
mkdir -p dist
objcopy --strip-debug "$CARGO_TARGET_DIR/release/selfplay" dist/selfplay.tmp
mv dist/selfplay.tmp dist/selfplay
ls -l dist/selfplay
