#!/usr/bin/env bash
# Every test: set up (first run only), then the whole workspace's tests in release mode
# (the same build as the binary, so nothing compiles twice), then the deployment checks.
set -Eeuo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
trap 'printf "[test] FAILED (exit %s) at scripts/test.sh line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
"$here/setup.sh"
source "$here/env.sh"
cd "$here/.."
# The evaluation sets are data beside the clone (SELFPLAY_DATA, default ../shared/data); the
# tests that read them fail with this same explanation when they are missing.
if [ ! -d "$SELFPLAY_DATA" ]; then
  printf '[test] SELFPLAY_DATA=%s does not exist: the tests that read the evaluation sets will fail (README: Evaluation sets)\n' "$SELFPLAY_DATA" >&2
fi
# Two cores: run test binaries one at a time, each with libtorch on two threads.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
cargo test --release --locked --workspace "$@"
# Deployment files: kustomize renders, offline schema validation, promtool, metric names, and
# every flag and config key the docs and deploy files name.
bash tests/deploy/check.sh
