#!/usr/bin/env bash
# Every test: set up (first run only), then the whole workspace's tests in release mode
# (the same build as the binary, so nothing compiles twice).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
source "$here/env.sh"
cd "$here/.."
# Two cores: run test binaries one at a time, each with libtorch on two threads.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
cargo test --release --locked --workspace "$@"
# Deployment files: kustomize renders, offline schema validation, promtool, metric names.
bash tests/deploy/check.sh
