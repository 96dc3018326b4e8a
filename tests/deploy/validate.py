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
TOKEN_SECRET = "selfplay-token"

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
                if not get or get.get("path") != "/health":
                    errs.append(f"{cname}: {probe} must be an HTTP GET of /health")
                elif isinstance(get.get("port"), str) and get["port"] not in ports:
                    errs.append(f"{cname}: {probe} uses unknown port {get['port']}")
            args = c.get("args", [])
            if any(a.startswith("--token=") or a == "--token" for a in args):
                errs.append(f"{cname}: the token must come from --token-file, not an argument")
            if any(e.get("name") == "SELFPLAY_TOKEN" for e in c.get("env", [])):
                errs.append(f"{cname}: the token must come from --token-file, not the environment")
            tf = [a.split("=", 1)[1] for a in args if a.startswith("--token-file=")]
            if not tf:
                errs.append(f"{cname}: no --token-file")
            elif not any(tf[0].startswith(m["mountPath"].rstrip("/") + "/")
                         and "secret" in volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])):
                errs.append(f"{cname}: --token-file {tf[0]} is not on a mounted Secret")
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
    # The dashboard ConfigMap holds the dashboard.
    for cm in by_kind.get("ConfigMap", {}).values():
        if "selfplay.json" in cm.get("data", {}):
            if json.loads(cm["data"]["selfplay.json"]) != json.loads(
                    (ROOT / "deploy/grafana/selfplay.json").read_text()):
                errs.append(f"{kn(cm)}: differs from deploy/grafana/selfplay.json")
    return errs


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
    k.add_argument("files", nargs="+")
    r = sub.add_parser("rule-groups")
    r.add_argument("file")
    r.add_argument("out")
    c = sub.add_parser("cli")
    c.add_argument("bin")
    c.add_argument("files", nargs="+")
    sub.add_parser("metrics")
    args = ap.parse_args()
    return {"k8s": cmd_k8s, "rule-groups": cmd_rule_groups, "cli": cmd_cli,
            "metrics": cmd_metrics}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
