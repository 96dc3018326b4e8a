#!/usr/bin/env bash
# Offline checks of deploy/: renders the Kubernetes overlays and validates every object against
# the Kubernetes schemas (the overlays without components hold no custom resources, so they apply
# on clusters without the Prometheus Operator), checks the Prometheus config and rules with
# promtool (and unit-tests the alerts), checks that the generated files are up to date, that
# every metric name the dashboard, alerts and manifests use is documented in docs/metrics.md,
# that the docs' relative links stay inside the repository, that every selfplay flag and config
# key named in README.md, BENCHMARKS.md, docs/ and deploy/ exists (and that this check refuses
# invented ones), and lints the Slurm script. Exits non-zero
# on any failure.
#
# Tools (installed on first use, reused after; nothing is downloaded at check time once cached):
#   kustomize  - `kustomize` on PATH, else `kubectl kustomize` (kustomize v4+ built in), else
#                Debian's `kustomize` package if the distribution has one.
#   schemas    - the PyPI package kubernetes-validate (bundles the Kubernetes JSON schemas, so
#                validation needs no network), in a venv under $SELFPLAY_TOOLS.
#   promtool   - Debian's `prometheus` package.
#   lint       - Debian's shellcheck when present; skipped otherwise.
#
# Environment: SELFPLAY_TOOLS (default $SELFPLAY_CACHE/tools; the cache defaults to
# ~/.cache/selfplay), K8S_VERSIONS (Kubernetes versions to validate against, default
# "1.28 1.37": the oldest and newest we claim),
# SELFPLAY_BIN (a selfplay binary to check the manifests' command lines with; default: the
# release build in $CARGO_TARGET_DIR or $SELFPLAY_CACHE/target, skipped when there is none).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root" || exit 2
CACHE="${SELFPLAY_CACHE:-$HOME/.cache/selfplay}"
TOOLS="${SELFPLAY_TOOLS:-$CACHE/tools}"
K8S_VERSIONS="${K8S_VERSIONS:-1.28 1.37}"
KV_VERSION="1.37.0" # kubernetes-validate
start_ms=$(($(date +%s%N) / 1000000))
passed=0
failed=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { printf '[deploy-check] %s\n' "$*" >&2; }
ok() { passed=$((passed + 1)); printf 'ok   %s\n' "$*"; }
bad() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
die() { printf 'FATAL %s\n' "$*"; exit 2; }

apt_install() {
  command -v apt-get >/dev/null || return 1
  [ "$(id -u)" = 0 ] || { log "not root: cannot apt-get install $*"; return 1; }
  local i
  for i in 1 2; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
      && return 0
    # Package lists missing or stale: refresh once and retry.
    [ "$i" = 1 ] && { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true; }
  done
  return 1
}

# --- tools ------------------------------------------------------------------------------------
mkdir -p "$TOOLS"
KUSTOMIZE=()
kubectl_has_kustomize() {
  # kubectl >= 1.21 embeds kustomize v4+ (components, labels, inline patches need it).
  command -v kubectl >/dev/null || return 1
  local v
  v=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
  [ -n "$v" ] && [ "$v" -ge 4 ]
}
if command -v kustomize >/dev/null; then
  KUSTOMIZE=(kustomize build)
elif kubectl_has_kustomize; then
  KUSTOMIZE=(kubectl kustomize)
else
  log "no kustomize; trying Debian's kustomize package"
  if apt_install kustomize && command -v kustomize >/dev/null; then
    KUSTOMIZE=(kustomize build)
  else
    die "no kustomize: install kustomize, or a kubectl >= 1.21 (its 'kubectl kustomize'), then rerun"
  fi
fi

if ! command -v promtool >/dev/null; then
  log "installing Debian's prometheus package for promtool (once)"
  apt_install prometheus || die "cannot install promtool (Debian package prometheus)"
fi

venv="$TOOLS/venv"
py="$venv/bin/python"
if ! "$py" -c "import kubernetes_validate, yaml, jsonschema; from kubernetes_validate import version; assert version.__version__ == '$KV_VERSION'" 2>/dev/null; then
  log "creating $venv with kubernetes-validate==$KV_VERSION (once, ~25 MB)"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$py" -m pip install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
    || die "pip install kubernetes-validate==$KV_VERSION failed"
fi

# --- 1. generated files are current -----------------------------------------------------------
if out=$("$py" deploy/generate.py --check 2>&1); then
  ok "deploy/grafana/selfplay.json and the PrometheusRule are up to date with deploy/generate.py"
else
  bad "generated files: $out"
fi

# --- 2. dashboard JSON is well-formed and templated --------------------------------------------
if out=$("$py" - "$work/dashboard-rules.yml" <<'PY' 2>&1
import json, re, sys
d = json.load(open("deploy/grafana/selfplay.json"))
names = [v["name"] for v in d["templating"]["list"]]
assert names == ["datasource", "run", "job", "instance"], names
run = d["templating"]["list"][1]
assert not run["multi"] and not run["includeAll"], "the run variable must select one run"
assert 36 <= d["schemaVersion"] <= 41, d["schemaVersion"]
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
n = 0
for p in d["panels"]:
    if p["type"] == "row":
        continue
    assert p["datasource"]["uid"] == "${datasource}", p["title"]
    for t in p["targets"]:
        n += 1
        e = t["expr"]
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), (p["title"], e)
        if "selfplay_" in e:
            sel = r"selfplay_\w+\{((?:[^{}]|\$\{[^{}]*\})*)\}"  # ${run:regex} inside
            for m in re.finditer(sel, e):
                assert all(v in m.group(1) for v in ('run=~"${run:regex}"', "$job", "$instance")), \
                    ("a selector without run, job and instance", p["title"], e)
            assert "selfplay_" not in re.sub(sel, "", e), \
                ("a selfplay metric without a selector", p["title"], e)
# Every query as a recording rule, so that promtool parses its PromQL.
import yaml
subst = {"$__rate_interval": "1m", "${run:regex}": ".*", "$job": ".*", "$instance": ".*"}
rules = []
for p in d["panels"]:
    for t in p.get("targets", []):
        e = t["expr"]
        for k, v in subst.items():
            e = e.replace(k, v)
        rules.append({"record": f"dashboard:query:{len(rules)}", "expr": e})
with open(sys.argv[1], "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
print(f"{len(d['panels'])} panels, {n} queries")
PY
); then
  if perr=$(promtool check rules "$work/dashboard-rules.yml" 2>&1); then
    ok "dashboard: $out, all on \${datasource}, every selfplay selector filtered by one \$run, \$job and \$instance, PromQL parses"
  else
    bad "dashboard PromQL: $perr"
  fi
else
  bad "dashboard: $out"
fi

# --- 3. metric names are documented -----------------------------------------------------------
if out=$("$py" tests/deploy/validate.py metrics 2>&1); then
  ok "${out#ok   }"
else
  bad "metric names: $out"
fi

# --- 4. promtool -------------------------------------------------------------------------------
if out=$(promtool check config deploy/prometheus/prometheus.yml 2>&1); then
  ok "promtool check config deploy/prometheus/prometheus.yml"
else
  bad "promtool check config: $out"
fi
if out=$(promtool check rules deploy/prometheus/alerts.yml 2>&1); then
  ok "promtool check rules deploy/prometheus/alerts.yml ($(grep -o '[0-9]* rules found' <<<"$out"))"
else
  bad "promtool check rules: $out"
fi
if out=$(cd deploy/prometheus && promtool test rules alerts_test.yml 2>&1); then
  ok "promtool test rules deploy/prometheus/alerts_test.yml"
else
  bad "promtool test rules: $out"
fi

# --- 5. Kubernetes: render and validate -------------------------------------------------------
versions=()
for v in $K8S_VERSIONS; do versions+=(--k8s-version "$v"); done
render() { # name dir
  if "${KUSTOMIZE[@]}" "$2" >"$work/$1.yaml" 2>"$work/$1.err"; then
    return 0
  fi
  bad "render $1 with ${KUSTOMIZE[*]}: $(cat "$work/$1.err")"
  return 1
}
# The gpu overlay plus every optional component, as a user would enable them.
full="$work/gpu-full"
mkdir -p "$full"
cp deploy/k8s/overlays/gpu/* "$full/"
rel=$(realpath --relative-to="$full" deploy/k8s)
sed -i "s#\.\./\.\./base#$rel/base#" "$full/kustomization.yaml"
printf 'components:\n  - %s/components/monitoring\n  - %s/components/reward-server\n  - %s/components/actors-hpa\n' \
  "$rel" "$rel" "$rel" >>"$full/kustomization.yaml"

validate() { # name [flags...]
  local name=$1; shift
  if out=$("$py" tests/deploy/validate.py k8s "${versions[@]}" "$@" "$work/$name.yaml" 2>&1); then
    ok "$name: ${out#*: }"
  else
    bad "$name: $out"
  fi
}
# The gpu overlay ships no credential: the operator creates one Secret per role.
role_secrets=()
for role in learner actor operator; do role_secrets+=(--external-secret "selfplay-$role-token"); done
# Without components: only built-in kinds (kubectl apply works without the Prometheus Operator).
if render cpu-smoke deploy/k8s/overlays/cpu-smoke; then validate cpu-smoke --no-crds; fi
if render gpu deploy/k8s/overlays/gpu; then
  validate gpu --no-crds --expect-gpu "${role_secrets[@]}"
fi
if render gpu-full "$full"; then
  validate gpu-full --expect-gpu "${role_secrets[@]}" --external-secret selfplay-reward-client-token
fi

# The PrometheusRule as rendered (by the monitoring component) is a valid Prometheus rule file.
if [ -s "$work/gpu-full.yaml" ] && "$py" tests/deploy/validate.py rule-groups "$work/gpu-full.yaml" "$work/rules.yml" \
  && out=$(promtool check rules "$work/rules.yml" 2>&1); then
  ok "rendered PrometheusRule passes promtool check rules"
else
  bad "rendered PrometheusRule: ${out:-not rendered}"
fi

# The manifests' command lines against the selfplay CLI, when a build is at hand
# ($SELFPLAY_BIN, else the release build of scripts/setup.sh).
bin="${SELFPLAY_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/release/selfplay}"
if [ -x "$bin" ] && [ -s "$work/gpu-full.yaml" ] && [ -s "$work/cpu-smoke.yaml" ]; then
  if out=$("$py" tests/deploy/validate.py cli "$bin" "$work/cpu-smoke.yaml" "$work/gpu-full.yaml" 2>&1); then
    ok "${out#ok   }"
  else
    bad "$out"
  fi
else
  echo "skip container command lines: no selfplay binary at $bin (set SELFPLAY_BIN)"
fi

# The docs' relative links stay inside the repository.
if out=$("$py" tests/deploy/validate.py links 2>&1); then
  ok "${out#ok   }"
else
  bad "${out#FAIL }"
fi

# Every flag and config key the docs and deploy files name exists: flags from the binary's
# --help per command when there is one, else from the clap definitions in cli/src; config keys
# from game/src/config.rs.
names_bin=()
[ -x "$bin" ] && names_bin=(--bin "$bin")
if out=$("$py" tests/deploy/validate.py names "${names_bin[@]}" 2>&1); then
  ok "${out#ok   }"
else
  bad "${out#FAIL }"
fi
# ... and that check refuses names that do not exist.
# shellcheck disable=SC2016 # backquotes are Markdown here
printf '%s\n' 'Run `selfplay learner --config run.toml --no-such-flag` with `--set game.no_such_key=1`.' \
  '```toml' '[reward]' 'kind = "rule"' 'rules = [{ rule = "length", no_such_rule_key = 3 }]' '```' \
  >"$work/invented.md"
if out=$("$py" tests/deploy/validate.py names "${names_bin[@]}" --extra "$work/invented.md" 2>&1); then
  bad "the names check accepted an invented flag and config key"
elif grep -q -- "--no-such-flag is not a flag of selfplay" <<<"$out" && grep -q "game.no_such_key does not exist" <<<"$out" \
  && grep -qF "reward.rules[0].no_such_rule_key is not a config key" <<<"$out"; then
  ok "the names check refuses an invented flag (--no-such-flag), config key (game.no_such_key) and rule key (reward.rules[0].no_such_rule_key)"
else
  bad "the names check on invented names: $out"
fi

# --- 6. Slurm and container files --------------------------------------------------------------
if out=$(bash -n deploy/slurm/selfplay.sbatch 2>&1); then
  if command -v shellcheck >/dev/null; then
    if out=$(shellcheck -s bash deploy/slurm/selfplay.sbatch tests/deploy/check.sh 2>&1); then
      ok "deploy/slurm/selfplay.sbatch parses and passes shellcheck"
    else
      bad "shellcheck: $out"
    fi
  else
    ok "deploy/slurm/selfplay.sbatch parses (shellcheck not installed: lint skipped)"
  fi
else
  bad "bash -n deploy/slurm/selfplay.sbatch: $out"
fi
if out=$("$py" - <<'PY' 2>&1
import re
d = open("deploy/docker/Dockerfile").read()
stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", d, re.M | re.I)
assert len(stages) >= 2, f"multi-stage build expected, stages: {stages}"
assert re.search(r"^USER\s+(?!0\b|root\b)\S+", d, re.M), "no non-root USER"
assert re.search(r'^ENTRYPOINT\s+\["selfplay"\]', d, re.M), "ENTRYPOINT must be [\"selfplay\"]"
assert "torch==${TORCH_VERSION}" in d and re.search(r"ARG TORCH_VERSION=2\.11\.0", d), "torch 2.11.0"
assert "cargo build --release --locked -p selfplay" in d
print(f"stages {', '.join(stages)}")
PY
); then
  ok "deploy/docker/Dockerfile: $out, non-root, ENTRYPOINT selfplay"
else
  bad "Dockerfile: $out"
fi

ms=$(($(date +%s%N) / 1000000 - start_ms))
secs="$((ms / 1000)).$(((ms % 1000) / 100))"
echo "deploy checks took ${secs}s (kustomize: ${KUSTOMIZE[*]}; schemas: kubernetes-validate $KV_VERSION, Kubernetes $K8S_VERSIONS; $(promtool --version 2>&1 | head -n1))"
echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
