#!/usr/bin/env python3
"""Offline checks of selfplay's deploy files (run by tests/deploy/check.sh).

  validate.py k8s --k8s-version 1.28 --k8s-version 1.37 [--expect-gpu] [--external-secret N] FILE...
      Every object of each rendered kustomize output FILE against the Kubernetes JSON schemas
      (kubernetes-validate's bundled schemas, strict: unknown fields are errors), every error
      listed. ServiceMonitor and PrometheusRule (Prometheus Operator CRDs, not in those schemas)
      against the minimal schemas below; the PrometheusRule's groups must equal
      deploy/prometheus/alerts.yml. Then consistency rules of our own: non-root pods, pinned
      image, probes on /health, references to ConfigMaps/Secrets/PVCs/ports that exist.
  validate.py rule-groups FILE OUT
      Writes the PrometheusRule groups of a rendered FILE as a Prometheus rule file (for promtool).
  validate.py cli BIN FILE...
      Every container's args in the rendered FILEs parse with the selfplay binary BIN (runs
      `BIN <args> --help`: clap stops at the first unknown flag or bad value, else prints help).
  validate.py metrics
      Every selfplay_* metric name used by the dashboard, the alerts and the manifests is
      documented in docs/metrics.md.
  validate.py links
      Relative links of README.md, BENCHMARKS.md, docs/ and deploy/ Markdown resolve to files
      inside the repository (the repository stands alone).
  validate.py names [--bin BIN] [--extra FILE]...
      Every selfplay flag and config key named in README.md, BENCHMARKS.md, docs/ and deploy/
      exists: flags per command from `BIN <command> --help` (without BIN, from the clap
      definitions in cli/src, against all commands at once), config keys from the serde structs
      of game/src/config.rs (run configs in deploy/ are parsed whole). With BIN, also that every
      flag of the role commands reads an environment variable, as the README says.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/selfplay/selfplay:0.1.0"
# One credential Secret per role. Which flag names which role's credential, and which Secrets
# each component may mount: least privilege, so actors (the many, most exposed pods) hold only
# their own, and a reward server only the reward clients'.
ROLE_SECRET = {r: f"selfplay-{r}-token" for r in ("learner", "actor", "operator", "reward-client")}
CREDENTIAL_FLAGS = {  # flag -> role whose credential it names; None: the component's own
    "--token-file": None,
    "--learner-tokens-file": "learner",
    "--actor-tokens-file": "actor",
    "--operator-tokens-file": "operator",
    "--reward-client-tokens-file": "reward-client",
    "--reward-token-file": "reward-client",
}
COMPONENT_CREDENTIALS = {  # component -> (its own role or None, roles it must mount, roles it may)
    "coordinator": (None, {"learner", "actor"}, {"learner", "actor", "operator"}),
    "learner": ("learner", {"learner", "actor"}, {"learner", "actor", "operator"}),
    "actor": ("actor", {"actor"}, {"actor", "reward-client"}),
    "reward": (None, {"reward-client"}, {"reward-client"}),
}

# ---------------------------------------------------------------------------------------------
# Minimal schemas for the two Prometheus Operator CRDs (monitoring.coreos.com/v1): the fields we
# use, their types, and no unknown fields where a typo would silently do nothing.
# ---------------------------------------------------------------------------------------------
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                   "namespace": {"type": "string"}, "labels": STR_MAP, "annotations": STR_MAP},
}
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": STR_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array",
                                                                    "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": DURATION, "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "tlsConfig": {"type": "object"},
                        "bearerTokenSecret": {"type": "object"},
                        "authorization": {"type": "object"},
                        "relabelings": {"type": "array", "items": {"type": "object"}},
                        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                    }}},
            },
        },
    },
}
PROMETHEUS_RULE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "limit": {"type": "integer"},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "minLength": 1},
                            "record": {"type": "string", "minLength": 1},
                            "expr": {"type": ["string", "integer"]},
                            "for": DURATION, "keep_firing_for": DURATION,
                            "labels": STR_MAP, "annotations": STR_MAP,
                        }}},
                }}}},
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
               ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kn(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def fmt_error(e):
    where = ".".join(str(p) for p in e.absolute_path) or "(root)"
    return f"{where}: {e.message[:300]}"


class K8sSchemas:
    """kubernetes-validate's bundled JSON schemas, used directly so that every error shows."""

    def __init__(self, version):
        import importlib_resources
        import kubernetes_validate.utils as kv

        versions = [v for v in kv.all_versions() if kv.major_minor(v) == version]
        if not versions:
            raise SystemExit(f"kubernetes-validate has no schemas for {version} "
                             f"(it has {', '.join(kv.all_versions())})")
        self.version = version
        self.dir = importlib_resources.files("kubernetes_validate").joinpath(
            "kubernetes-json-schema", f"v{versions[-1]}-local-strict")
        defs = json.loads(self.dir.joinpath("_definitions.json").read_text())
        self.registry = Resource.from_contents(defs) @ Registry()

    def errors(self, obj):
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
        f = self.dir.joinpath(f"{obj['kind'].lower()}-{api}.json")
        if not f.is_file():
            return None
        schema = json.loads(f.read_text())
        registry = Resource.from_contents(schema) @ self.registry
        v = jsonschema.Draft202012Validator(schema, registry=registry)
        return sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path))


def pod_spec(obj):
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def credential_errors(cname, o, c, volumes):
    """Every credential comes from a file on its role's Secret, mounted whole (no subPath, so an
    updated Secret reaches the pod: rotation), and each component mounts only the credential
    Secrets its role needs."""
    errs = []
    args = c.get("args", [])
    if any(a.startswith("--token=") or a == "--token" for a in args):
        errs.append(f"{cname}: a token must come from a file, not an argument")
    if any(e.get("name") == "SELFPLAY_TOKEN" for e in c.get("env", [])):
        errs.append(f"{cname}: a token must come from a file, not the environment")
    component = o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    own, must, may = COMPONENT_CREDENTIALS.get(component, (None, set(), set()))
    secret_of = {v: k for k, v in ROLE_SECRET.items()}
    mounted = {}  # mount path -> role of the credential Secret there
    for m in c.get("volumeMounts", []):
        sec = volumes.get(m["name"], {}).get("secret")
        if sec is None:
            continue
        role = secret_of.get(sec["secretName"])
        if role is None:
            continue
        if m.get("subPath"):
            errs.append(f"{cname}: Secret {sec['secretName']} mounted with subPath (a rotated Secret never arrives)")
        if role not in may:
            errs.append(f"{cname}: {component} pods must not mount the {role} credential ({sec['secretName']})")
        mounted[m["mountPath"].rstrip("/") + "/"] = role
    for role in must - set(mounted.values()):
        errs.append(f"{cname}: {component} pods need the {role} credential ({ROLE_SECRET[role]}) mounted")
    for a in args:
        flag, _, path = a.partition("=")
        if flag not in CREDENTIAL_FLAGS:
            continue
        want = CREDENTIAL_FLAGS[flag] or own
        on = [r for p, r in mounted.items() if path.startswith(p)]
        if not on:
            errs.append(f"{cname}: {flag} {path} is not on a mounted credential Secret")
        elif want is None or on[0] != want:
            errs.append(f"{cname}: {flag} {path} is on the {on[0]} credential, expected {want}")
    if own and not any(a.startswith("--token-file=") for a in args):
        errs.append(f"{cname}: no --token-file (the {own} credential)")
    return errs


def policy_errors(objs, expect_gpu, external_secrets):
    """Rules the schemas cannot express."""
    errs = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    namespaces = set(by_kind.get("Namespace", {}))
    for o in objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] != "Namespace" and ns not in namespaces:
            errs.append(f"{kn(o)}: namespace {ns!r} is not one of the rendered namespaces")

    pods = {}
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        name = kn(o)
        pods[name] = (o, spec)
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            errs.append(f"{name}: pod securityContext.runAsNonRoot must be true")
        if not psc.get("runAsUser"):
            errs.append(f"{name}: pod securityContext.runAsUser must be a non-zero uid")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errs.append(f"{name}: pod seccompProfile must be RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            errs.append(f"{name}: automountServiceAccountToken must be false (no API access needed)")
        if spec.get("enableServiceLinks") is not False:
            errs.append(f"{name}: enableServiceLinks must be false (SELFPLAY_* variables)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if o["kind"] == "StatefulSet":
            for t in o["spec"].get("volumeClaimTemplates", []):
                volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "template": True}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                errs.append(f"{name}: volume {v['name']} names a missing ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                s = v["secret"]["secretName"]
                if s not in by_kind.get("Secret", {}) and s not in external_secrets:
                    errs.append(f"{name}: volume {v['name']} names a missing Secret {s}")
            if "persistentVolumeClaim" in v:
                c = v["persistentVolumeClaim"]["claimName"]
                if c not in by_kind.get("PersistentVolumeClaim", {}):
                    errs.append(f"{name}: volume {v['name']} names a missing PVC {c}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cname = f"{name}/{c.get('name', '?')}"
            if c.get("image") != IMAGE:
                errs.append(f"{cname}: image {c.get('image')!r}, expected {IMAGE!r}")
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                errs.append(f"{cname}: allowPrivilegeEscalation must be false")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                errs.append(f"{cname}: capabilities must drop ALL")
            if csc.get("readOnlyRootFilesystem") is not True:
                errs.append(f"{cname}: readOnlyRootFilesystem must be true")
            if csc.get("privileged") or csc.get("runAsUser") == 0:
                errs.append(f"{cname}: must not run privileged or as root")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errs.append(f"{cname}: mounts unknown volume {m['name']}")
            ports = {p.get("name") for p in c.get("ports", [])}
            for p in c.get("ports", []):
                if not 1 <= int(p.get("containerPort", 0)) <= 65535:
                    errs.append(f"{cname}: containerPort {p.get('containerPort')} out of range")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if p is None:
                    if probe != "startupProbe":
                        errs.append(f"{cname}: no {probe}")
                    continue
                get = p.get("httpGet")
                # Liveness asks whether the main loop makes progress; startup and readiness
                # whether the role serves with its model and state loaded.
                want = "/health/live" if probe == "livenessProbe" else "/health/ready"
                if not get or get.get("path") != want:
                    errs.append(f"{cname}: {probe} must be an HTTP GET of {want}")
                elif isinstance(get.get("port"), str) and get["port"] not in ports:
                    errs.append(f"{cname}: {probe} uses unknown port {get['port']}")
            args = c.get("args", [])
            errs += credential_errors(cname, o, c, volumes)
            if "metrics" not in ports:
                errs.append(f"{cname}: no port named metrics")
            if not any(a.startswith("--metrics-addr=0.0.0.0:") for a in args):
                errs.append(f"{cname}: --metrics-addr must listen on 0.0.0.0 in a pod")
            gpu = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            role = o["metadata"]["labels"].get("app.kubernetes.io/component")
            if expect_gpu and role in ("learner", "actor") and str(gpu) != "1":
                errs.append(f"{cname}: expected nvidia.com/gpu: 1, got {gpu!r}")
            if not expect_gpu and gpu is not None:
                errs.append(f"{cname}: requests a GPU in a CPU overlay")

    # Services select pods, and their named target ports exist there.
    for s in by_kind.get("Service", {}).values():
        sel = s["spec"].get("selector", {})
        matched = [(n, sp) for n, (o, sp) in pods.items()
                   if sel and all(o["spec"]["template"]["metadata"]["labels"].get(k) == v
                                  for k, v in sel.items())]
        if not matched:
            errs.append(f"{kn(s)}: selector {sel} matches no pod template")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort")
            if isinstance(tp, str) and matched and not any(
                    tp in {cp.get("name") for c in sp["containers"] for cp in c.get("ports", [])}
                    for _, sp in matched):
                errs.append(f"{kn(s)}: targetPort {tp} is not a container port of the selected pods")
    # Every Service names its run (the ServiceMonitor turns it into the metrics' run label).
    for s in by_kind.get("Service", {}).values():
        if not s["metadata"].get("labels", {}).get("app.kubernetes.io/instance"):
            errs.append(f"{kn(s)}: no app.kubernetes.io/instance label (the run's name; set it "
                        "in the overlay's labels)")
    # StatefulSets have their governing Service, and it is headless.
    for st in by_kind.get("StatefulSet", {}).values():
        svc = by_kind.get("Service", {}).get(st["spec"]["serviceName"])
        if svc is None or svc["spec"].get("clusterIP") != "None":
            errs.append(f"{kn(st)}: serviceName {st['spec']['serviceName']} must be a headless Service")
    # HPAs target something rendered.
    for h in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = h["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            errs.append(f"{kn(h)}: scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
    # ServiceMonitors select Services that have the scraped port.
    for sm in by_kind.get("ServiceMonitor", {}).values():
        sel = sm["spec"]["selector"]
        svcs = [s for s in by_kind.get("Service", {}).values() if selector_matches(sel, s["metadata"].get("labels", {}))]
        if not svcs:
            errs.append(f"{kn(sm)}: selects no Service")
        for ep in sm["spec"]["endpoints"]:
            for s in svcs:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    errs.append(f"{kn(sm)}: Service {s['metadata']['name']} has no port {ep.get('port')}")
    # The PrometheusRule carries exactly the alerts in deploy/prometheus/alerts.yml.
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for pr in by_kind.get("PrometheusRule", {}).values():
        if pr["spec"]["groups"] != alerts["groups"]:
            errs.append(f"{kn(pr)}: groups differ from deploy/prometheus/alerts.yml "
                        "(run python3 deploy/generate.py)")
    # The coordinator reads no run.toml: its --seed must be the run config's run.seed.
    seeds = set()
    for cm in by_kind.get("ConfigMap", {}).values():
        if "run.toml" in cm.get("data", {}):
            seeds.add(toml_loads(cm["data"]["run.toml"]).get("run", {}).get("seed", 0))
    for o, spec in pods.values():
        if o["metadata"]["labels"].get("app.kubernetes.io/component") != "coordinator":
            continue
        for c in spec["containers"]:
            given = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--seed=")]
            if not given:
                errs.append(f"{kn(o)}/{c['name']}: no --seed= (the run config's run.seed)")
            elif seeds and {int(given[0])} != seeds:
                errs.append(f"{kn(o)}/{c['name']}: --seed={given[0]} but run.toml has run.seed "
                            f"{', '.join(map(str, sorted(seeds)))}")
    # The dashboard ConfigMap holds the dashboard.
    for cm in by_kind.get("ConfigMap", {}).values():
        if "selfplay.json" in cm.get("data", {}):
            if json.loads(cm["data"]["selfplay.json"]) != json.loads(
                    (ROOT / "deploy/grafana/selfplay.json").read_text()):
                errs.append(f"{kn(cm)}: differs from deploy/grafana/selfplay.json")
    return errs


def toml_loads(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the few plain keys these checks need.
        out = {}
        cur = out
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                cur = out.setdefault(line.strip("[] "), {})
            elif "=" in line:
                k, v = (x.strip() for x in line.split("=", 1))
                cur[k] = int(v) if re.fullmatch(r"-?[0-9]+", v) else v.strip('"')
        return out
    return tomllib.loads(text)


def selector_matches(sel, labels):
    for k, v in sel.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions", []):
        have = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and have not in e.get("values", []):
            return False
        if op == "NotIn" and have in e.get("values", []):
            return False
        if op == "Exists" and have is None:
            return False
        if op == "DoesNotExist" and have is not None:
            return False
    return True


def cmd_k8s(args):
    schemas = [K8sSchemas(v) for v in args.k8s_version]
    failed = 0
    for path in args.files:
        objs = load_docs(path)
        if not objs:
            print(f"FAIL {path}: no objects")
            failed += 1
            continue
        errs = []
        kinds = {}
        for o in objs:
            kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            crd = CRD_SCHEMAS.get((o.get("apiVersion"), o.get("kind")))
            if crd is not None:
                for e in jsonschema.Draft202012Validator(crd).iter_errors(o):
                    errs.append(f"{kn(o)} [minimal CRD schema]: {fmt_error(e)}")
                continue
            for s in schemas:
                found = s.errors(o)
                if found is None:
                    errs.append(f"{kn(o)}: no schema for {o['apiVersion']} {o['kind']} "
                                f"in Kubernetes {s.version}")
                    continue
                errs += [f"{kn(o)} [k8s {s.version}]: {fmt_error(e)}" for e in found]
        if args.no_crds:
            errs += [f"{kn(o)}: a custom resource ({o['apiVersion']}) in a render that must apply "
                     "on any cluster (move it to a component)"
                     for o in objs if (o.get("apiVersion"), o.get("kind")) in CRD_SCHEMAS]
        try:
            errs += policy_errors(objs, args.expect_gpu, set(args.external_secret))
        except (KeyError, TypeError, AttributeError) as e:
            errs.append(f"consistency checks stopped on a malformed object: {e!r}")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        if errs:
            failed += 1
            print(f"FAIL {path} ({summary})")
            for e in errs:
                print(f"  - {e}")
        else:
            print(f"ok   {path}: {len(objs)} objects valid against Kubernetes "
                  f"{', '.join(args.k8s_version)} ({summary})")
    return 1 if failed else 0


def cmd_rule_groups(args):
    for o in load_docs(args.file):
        if o["kind"] == "PrometheusRule":
            Path(args.out).write_text(yaml.safe_dump({"groups": o["spec"]["groups"]}, sort_keys=False))
            return 0
    print(f"FAIL {args.file}: no PrometheusRule")
    return 1


def cmd_cli(args):
    import subprocess

    seen = set()
    errs = []
    for path in args.files:
        for o in load_docs(path):
            spec = pod_spec(o)
            if spec is None:
                continue
            for c in spec["containers"]:
                env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
                        for a in c.get("args", [])]
                if tuple(argv) in seen:
                    continue
                seen.add(tuple(argv))
                r = subprocess.run([args.bin, *argv, "--help"], capture_output=True, text=True,
                                   timeout=60)
                if r.returncode != 0:
                    first = (r.stderr or r.stdout).strip().splitlines()[:1]
                    errs.append(f"{kn(o)}/{c['name']}: `selfplay {' '.join(argv)}`: "
                                f"{first[0] if first else 'exit ' + str(r.returncode)}")
    if errs:
        print("FAIL container args the selfplay CLI does not accept:")
        for e in errs:
            print(f"  - {e}")
        return 1
    print(f"ok   {len(seen)} distinct container command lines parse with {args.bin}")
    return 0


# ---------------------------------------------------------------------------------------------
# names: every selfplay flag and config key that the docs and deploy files name exists.
# ---------------------------------------------------------------------------------------------
SECTIONS = ("run", "model", "game", "challenger", "solver", "self_reward", "reward", "loss", "optim")
# `model.safetensors`, `run.toml`: file names, not config keys.
FILE_SUFFIXES = {"toml", "sh", "json", "jsonl", "yaml", "yml", "safetensors", "md", "py", "rs", "proto",
                 "gguf", "png", "log", "out", "txt", "pem", "key", "bin", "pt", "sbatch", "env"}
# section.key, not part of a longer name (host.example.org, model.model(...), a/run.sh).
CONFIG_KEY = re.compile(r"(?<![\w./$-])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)(?![\w(-]|\.\w)")
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
# Tokens that invoke selfplay in a command line: the binary, and the scripts' variables for it.
# (A container image named selfplay counts: `docker run ... ghcr.io/selfplay/selfplay:0.1.0 train`.)
SELFPLAY_CMD = re.compile(r"^(\./|\S*/(bin|release|debug)/)?selfplay$|^[\w.-]+(:\d+)?(/[\w.-]+)*/selfplay:[\w.-]+$"
                          r"|^\$\{?(BIN|bin|0|SELFPLAY_BIN)\}?$")
# Options of other programs whose value may be the word selfplay (kubectl -n selfplay).
VALUE_OPTIONS = {"-n", "--namespace", "-u", "--user", "-g", "--group", "--name", "--shell",
                 "--network", "-t", "--tag"}
# Flags of other programs that the docs name on their own (not in a command line of theirs).
OTHER_FLAGS = {
    # srun/sbatch (docs/deploy.md, the Slurm script)
    "--gpus-per-task", "--gpus", "--gres", "--overlap", "--het-group", "--ntasks-per-node",
    "--ntasks", "--nodes", "--container-image", "--container-mounts", "--kill-on-bad-exit",
    "--signal", "--time", "--mem", "--cpus-per-task", "--partition", "--account", "--gpu-bind",
    # kubectl / kustomize
    "--replicas", "--from-literal", "--overrides", "--image", "--restart", "--namespace",
    # docker
    "--user", "--network", "--rm",
    # cargo, pip, python scripts of this repository
    "--release", "--locked", "--workspace", "--build-arg", "--check", "--target", "--no-deps",
    "--k8s-version", "--expect-gpu", "--external-secret", "--no-crds",
}


def config_keys():
    """{section: {key}} from the serde structs of game/src/config.rs."""
    structs = config_structs()
    return {sec: {f for f, _ in structs.get(ty, [])} for sec, ty in structs["Config"]}


def config_structs():
    """{struct name: [(field, type)]} of the serde structs of game/src/config.rs (the type is
    the innermost name: Vec<RuleConfig> gives RuleConfig)."""
    src = (ROOT / "game/src/config.rs").read_text()
    structs = {}
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", src, re.S):
        fields = []
        for line in m.group(2).splitlines():
            f = re.match(r"\s*pub (\w+)\s*:\s*([\w:<>]+)", line)
            if f:
                inner = re.findall(r"\w+", f.group(2).split("::")[-1])
                fields.append((f.group(1), inner[-1] if inner else f.group(2)))
        structs[m.group(1)] = fields
    if "rename =" in src or "serde(alias" in src:
        raise SystemExit("game/src/config.rs renames a field: teach validate.py names about it")
    return structs


def toml_blocks(path):
    """(line, text) of the ```toml fences of a Markdown file."""
    out, block = [], None
    for i, line in enumerate(path.read_text().splitlines(), 1):
        t = line.strip()
        if block is None and t.startswith("```toml"):
            block = (i + 1, [])
        elif block is not None and t.startswith("```"):
            out.append((block[0], "\n".join(block[1])))
            block = None
        elif block is not None:
            block[1].append(line)
    return out


def check_table(table, struct, structs, where):
    """Every key of a parsed TOML table is a field of `struct`, recursively through tables and
    lists of tables whose field type is another config struct. Returns (keys checked, errors)."""
    fields = dict(structs.get(struct, []))
    n, errs = 0, []
    for k, v in table.items():
        n += 1
        if k not in fields:
            errs.append(f"{where}{k} is not a config key")
            continue
        sub = fields[k] if fields[k] in structs else None
        items = v if isinstance(v, list) else [v]
        for j, item in enumerate(items):
            if sub and isinstance(item, dict):
                m, e = check_table(item, sub, structs, f"{where}{k}{f'[{j}]' if isinstance(v, list) else ''}.")
                n, errs = n + m, errs + e
    return n, errs


def cli_flags(bin_path):
    """({command path: {flags}}, {global flags}) from `selfplay ... --help`."""
    import subprocess

    def help_of(path):
        r = subprocess.run([bin_path, *path, "--help"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"`{bin_path} {' '.join(path)} --help` failed: {r.stderr.strip()[:300]}")
        return r.stdout

    def parse(text):
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text, re.M))
        subs = []
        if "Commands:" in text:
            block = text.split("Commands:", 1)[1].split("\n\n", 1)[0]
            subs = [m for m in re.findall(r"^\s{2}([a-z0-9-]+)\s", block, re.M) if m != "help"]
        return flags, subs

    top, subs = parse(help_of([]))
    out = {(): top}
    no_env = {}
    todo = [(s,) for s in subs]
    while todo:
        path = todo.pop()
        text = help_of(list(path))
        flags, more = parse(text)
        out[path] = flags
        no_env[path] = flags_without_env(text)
        todo += [path + (m,) for m in more]
    return out, top, no_env


def flags_without_env(help_text):
    """Long flags of one --help whose entry shows no [env: ...] (wrapped entries joined)."""
    entries = re.split(r"\n(?=\s+(?:-\w, )?--)", help_text.split("Options:", 1)[-1])
    out = set()
    for e in entries:
        m = re.match(r"\s+(?:-\w, )?(--[a-z0-9-]+)", e)
        if m and "[env: " not in e and m.group(1) not in ("--help", "--version"):
            out.add(m.group(1))
    return out


# README: every flag of these commands reads an environment variable, except --set.
ENV_COMMANDS = ("train", "coordinator", "learner", "actor", "reward-server", "status")
ENV_EXCEPTIONS = {"--set"}


def source_flags():
    """Every long flag declared in cli/src (no binary at hand: one set for all commands)."""
    flags = {"--help", "--version"}
    for f in sorted([*(ROOT / "cli/src").glob("*.rs"), *(ROOT / "bench/src").glob("*.rs")]):
        for m in re.finditer(r"#\[arg\((.*?)\)\]\s*(?:pub\s+)?(\w+)\s*:", f.read_text(), re.S):
            if not re.search(r"\blong\b", m.group(1)):
                continue
            named = re.search(r'\blong\s*=\s*"([^"]+)"', m.group(1))
            flags.add("--" + (named.group(1) if named else m.group(2).replace("_", "-")))
    return flags


def code_chunks(path):
    """(line, text) pieces of a file that hold commands, flags and keys: in Markdown the fenced
    blocks and the inline code spans, elsewhere the whole file."""
    text = path.read_text()
    if path.suffix != ".md":
        return [(1, text)]
    chunks = []
    block = None  # (first line, lines) inside a fence
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if block is None:
                block = (i + 1, [])
            else:
                chunks.append((block[0], "\n".join(block[1])))
                block = None
        elif block is not None:
            block[1].append(line)
        else:
            chunks += [(i, span.replace("\\|", "|")) for span in re.findall(r"`([^`]+)`", line)]
    return chunks


def commands(text):
    """Shell-ish command lines of a text: continuations joined, split at ; && || | and newlines."""
    import shlex

    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else line.lstrip("# ")
        for part in re.split(r"\s(?:&&|\|\||\||;|&)\s|;$", line):
            try:
                toks = shlex.split(part, comments=False)
            except ValueError:
                toks = part.split()
            toks = [t.strip("[](),") for t in toks]
            yield [t for t in toks if t]
            for t in toks:  # bash -c '...': the inner command line too
                if " " in t and ("--" in t):
                    yield from commands(t)


def invokes_selfplay(toks, i, subcommands):
    """Whether toks[i] starts a selfplay command line (not, say, `kubectl -n selfplay`)."""
    if not SELFPLAY_CMD.match(toks[i]) or (i > 0 and toks[i - 1] in VALUE_OPTIONS):
        return False
    nxt = toks[i + 1] if i + 1 < len(toks) else ""
    return nxt in subcommands or nxt.startswith(("--", "<"))


def check_flags(toks, per_cmd, globals_, union, subcommands):
    """Flags of one command line that selfplay does not have: [(flag, command)]. A line that
    does not run selfplay is checked only when it is nothing but flags (`--wire-dtype bf16` in
    prose); other programs' command lines are theirs."""
    bad = []
    start = next((i for i in range(len(toks)) if invokes_selfplay(toks, i, subcommands)), None)
    if start is None:
        if not toks or not toks[0].startswith("--"):
            return bad
        for t in toks:
            f = FLAG.match(t)
            if f and t.startswith("--") and f.group(1) not in union and f.group(1) not in OTHER_FLAGS:
                bad.append((f.group(1), "any selfplay command"))
        return bad
    rest = toks[start + 1:]
    path = ()
    if per_cmd is not None:
        # Global flags (and their values) may come before the subcommand.
        i = 0
        while i < len(rest):
            t = rest[i]
            if path + (t,) in per_cmd:
                path += (t,)
                i += 1
            elif not path and t.startswith("--"):
                i += 1
                if "=" not in t and i < len(rest) and not rest[i].startswith("-") \
                        and (rest[i],) not in per_cmd:
                    i += 1
            else:
                break
    allowed = union if per_cmd is None else (per_cmd.get(path, set()) | globals_)
    where = "selfplay " + " ".join(path) if path else "selfplay"
    for t in rest:
        f = FLAG.match(t)
        if f and t.startswith("--") and f.group(1) not in allowed:
            bad.append((f.group(1), where))
    return bad


def cmd_names(args):
    keys = config_keys()
    structs = config_structs()
    if args.bin:
        per_cmd, globals_, no_env = cli_flags(args.bin)
        union = set().union(*per_cmd.values())
        subcommands = {p[0] for p in per_cmd if p}
        how = f"`{args.bin} <command> --help` of {len(per_cmd) - 1} commands"
    else:
        per_cmd, globals_ = None, set()
        union = source_flags()
        enum = re.search(r"enum Command \{(.*?)\n\}", (ROOT / "cli/src/main.rs").read_text(), re.S).group(1)
        subcommands = {re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower()
                       for v in re.findall(r"^    ([A-Z]\w*)", enum, re.M)}
        how = "the clap definitions in cli/src (no binary: flags checked against all commands)"
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"] + sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "examples").rglob("*.md"))
    files += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file()
                    and p.suffix in (".md", ".yaml", ".yml", ".toml", ".sbatch", "")
                    and p.name != "Dockerfile.dockerignore")
    files += [Path(f).resolve() for f in args.extra]
    errs = []
    if args.bin:
        for c in ENV_COMMANDS:
            for f in sorted(no_env.get((c,), set()) - ENV_EXCEPTIONS):
                errs.append(f"selfplay {c} {f} reads no environment variable (README says every "
                            "flag of this command does, except --set)")
    n_flags = n_keys = 0
    for path in files:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if path.suffix == ".toml":  # a run config: every section and key must exist
            for sec, table in toml_loads(path.read_text()).items():
                if sec not in keys:
                    errs.append(f"{rel}: [{sec}] is not a config section")
                    continue
                for k in table:
                    n_keys += 1
                    if k not in keys[sec]:
                        errs.append(f"{rel}: {sec}.{k} is not a config key")
        if path.suffix == ".md":  # TOML examples: every key, down to reward rules and sources
            for line, text in toml_blocks(path):
                try:
                    doc = toml_loads(text)
                except Exception as e:
                    errs.append(f"{rel}:{line}: a TOML example does not parse: {e}")
                    continue
                m, e = check_table(doc, "Config", structs, "")
                n_keys += m
                errs += [f"{rel}:{line}: {x}" for x in e]
        for line, text in code_chunks(path):
            for sec, key in CONFIG_KEY.findall(text):
                if key in FILE_SUFFIXES:
                    continue
                n_keys += 1
                if key not in keys[sec]:
                    errs.append(f"{rel}:{line}: config key {sec}.{key} does not exist")
            if path.suffix in (".yaml", ".yml"):
                # Container args (one flag per item): the subcommand is the first item when given.
                for doc in yaml.safe_load_all(text):
                    for a in yaml_args(doc):
                        toks = ["selfplay"] + [x.split("=", 1)[0] if x.startswith("--") else x for x in a]
                        n_flags += sum(t.startswith("--") for t in toks)
                        errs += [f"{rel}: {f} is not a flag of {w}" for f, w in
                                 check_flags(toks, per_cmd if a and not a[0].startswith("-") else None,
                                             globals_, union, subcommands)]
                text = "\n".join(l.split("#", 1)[1] for l in text.splitlines() if "#" in l)
            for toks in commands(text):
                n_flags += sum(t.startswith("--") for t in toks)
                errs += [f"{rel}:{line}: {f} is not a flag of {w}"
                         for f, w in check_flags(toks, per_cmd, globals_, union, subcommands)]
    if errs:
        print("FAIL flags or config keys named in the docs and deploy files that do not exist:")
        for e in sorted(set(errs)):
            print(f"  - {e}")
        return 1
    env = (f"; every flag of {', '.join(ENV_COMMANDS)} but --set reads an environment variable"
           if args.bin else "")
    print(f"ok   {n_flags} flags and {n_keys} config keys named in README.md, BENCHMARKS.md, docs/, examples/ "
          f"and deploy/ exist (TOML examples down to reward rules and sources) (flags from {how}; keys from game/src/config.rs){env}")
    return 0


def cmd_links(args):
    """Relative links of the Markdown files resolve to files inside the repository."""
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"] + sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "examples").rglob("*.md"))
    files += sorted((ROOT / "deploy").rglob("*.md"))
    errs = []
    n = 0
    for path in files:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address, or an anchor on the same page
            n += 1
            dest = (path.parent / target.split("#", 1)[0]).resolve()
            rel = path.relative_to(ROOT)
            if not dest.is_relative_to(ROOT):
                errs.append(f"{rel}: ({target}) points outside the repository")
            elif not dest.exists():
                errs.append(f"{rel}: ({target}) does not exist")
    if errs:
        print("FAIL links in the docs:")
        for e in errs:
            print(f"  - {e}")
        return 1
    print(f"ok   {n} relative links in README.md, BENCHMARKS.md, docs/ and deploy/ stay in the "
          "repository and resolve")
    return 0


def yaml_args(node):
    """Every `args:` list of strings in a YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "args" and isinstance(v, list) and all(isinstance(x, str) for x in v):
                yield v
            else:
                yield from yaml_args(v)
    elif isinstance(node, list):
        for x in node:
            yield from yaml_args(x)


METRIC = re.compile(r"\bselfplay_[a-z0-9_]*[a-z0-9]")


def cmd_metrics(args):
    documented = set(re.findall(r"^\|\s*`(selfplay_[a-z0-9_]+)`", (ROOT / "docs/metrics.md").read_text(), re.M))
    if not documented:
        print("FAIL docs/metrics.md documents no metric")
        return 1
    sources = [ROOT / "deploy/grafana/selfplay.json", ROOT / "deploy/prometheus/alerts.yml"]
    sources += sorted((ROOT / "deploy/k8s").rglob("*.yaml"))
    missing = {}
    used = set()
    for src in sources:
        for name in METRIC.findall(src.read_text()):
            base = name
            if base not in documented:
                for suffix in ("_bucket", "_sum", "_count"):
                    if base.endswith(suffix) and base[: -len(suffix)] in documented:
                        base = base[: -len(suffix)]
                        break
            used.add(base)
            if base not in documented:
                missing.setdefault(name, set()).add(str(src.relative_to(ROOT)))
    if missing:
        print("FAIL metric names used but not documented in docs/metrics.md:")
        for name, where in sorted(missing.items()):
            print(f"  - {name} (in {', '.join(sorted(where))})")
        return 1
    unused = sorted(documented - used)
    print(f"ok   {len(used)} metric names used by the dashboard, alerts and manifests are documented"
          + (f"; documented but shown nowhere: {', '.join(unused)}" if unused else ""))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("k8s")
    k.add_argument("--k8s-version", action="append", required=True)
    k.add_argument("--expect-gpu", action="store_true")
    k.add_argument("--external-secret", action="append", default=[])
    k.add_argument("--no-crds", action="store_true",
                   help="fail on Prometheus Operator objects (the render must apply anywhere)")
    k.add_argument("files", nargs="+")
    r = sub.add_parser("rule-groups")
    r.add_argument("file")
    r.add_argument("out")
    c = sub.add_parser("cli")
    c.add_argument("bin")
    c.add_argument("files", nargs="+")
    sub.add_parser("metrics")
    n = sub.add_parser("names")
    n.add_argument("--bin", help="a selfplay binary (else the clap definitions in cli/src)")
    n.add_argument("--extra", action="append", default=[], help="another file to check")
    sub.add_parser("links")
    args = ap.parse_args()
    return {"k8s": cmd_k8s, "rule-groups": cmd_rule_groups, "cli": cmd_cli,
            "metrics": cmd_metrics, "names": cmd_names, "links": cmd_links}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
