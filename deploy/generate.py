#!/usr/bin/env python3
"""Generates the deploy files that are derived from others, so they never drift apart:

- deploy/grafana/selfplay.json: the Grafana dashboard (defined below, in Python, because
  hand-editing a few thousand lines of dashboard JSON is error-prone);
- deploy/k8s/components/monitoring/prometheusrule.yaml: the PrometheusRule, whose groups are
  deploy/prometheus/alerts.yml verbatim.

    python3 deploy/generate.py          # rewrite both
    python3 deploy/generate.py --check  # exit 1 if either is out of date (CI)

Needs PyYAML for the PrometheusRule (tests/deploy/check.sh provides it).
"""
import argparse
import json
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "selfplay.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

DS = {"type": "prometheus", "uid": "${datasource}"}
# Every selfplay query is narrowed to one run (the `run` label that the scrape configuration
# attaches: deploy/k8s/components/monitoring, deploy/prometheus/prometheus.yml, the Slurm job's
# targets.json), so two runs are never summed together; `${run:regex}` is empty, and so matches
# series without the label, where no run label is set up.
F = 'run=~"${run:regex}",job=~"$job",instance=~"$instance"'
RI = "$__rate_interval"


# ---------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------
class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        self._newline()
        self.panels.append({
            "type": "row", "id": self._id(), "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel, w, h):
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def targets(*exprs):
    """exprs: (expr, legend) pairs."""
    return [
        {"datasource": DS, "expr": e, "legendFormat": legend, "refId": chr(ord("A") + i),
         "range": True}
        for i, (e, legend) in enumerate(exprs)
    ]


def timeseries(title, desc, exprs, unit="short", stack=False, min0=False):
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
              "spanNulls": True}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {
        "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "targets": targets(*exprs),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
    }


def stat(title, desc, expr, unit="short", decimals=None, thresholds=None):
    defaults = {"unit": unit, "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute",
                               "steps": thresholds or [{"color": "green", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": desc, "datasource": DS,
        "targets": [{"datasource": DS, "expr": expr, "refId": "A", "instant": True}],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto",
                    "justifyMode": "auto", "orientation": "auto"},
    }


def heatmap(title, desc, metric, unit="short"):
    return {
        "type": "heatmap", "title": title, "description": desc, "datasource": DS,
        "targets": [{"datasource": DS, "refId": "A", "format": "heatmap", "legendFormat": "{{le}}",
                     "expr": f"sum by (le) (increase({metric}_bucket{{{F}}}[{RI}]))"}],
        "options": {"calculate": False, "yAxis": {"unit": unit},
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "cellGap": 1, "tooltip": {"show": True, "yHistogram": False}},
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def quantiles(metric, qs=(0.5, 0.99), by="", window=RI, extra=""):
    """histogram_quantile expressions over a histogram's _bucket series."""
    sel = f"{metric}_bucket{{{F}{extra}}}"
    grp = f"{by}, le" if by else "le"
    out = []
    for q in qs:
        legend = f"p{int(q * 100)}" + (" {{" + by + "}}" if by else "")
        out.append((f"histogram_quantile({q}, sum by ({grp}) (rate({sel}[{window}])))", legend))
    return out


def mean_of(metric, window=RI, by=""):
    grp = f" by ({by})" if by else ""
    legend = "mean" + (" {{" + by + "}}" if by else "")
    return (f"sum{grp} (rate({metric}_sum{{{F}}}[{window}])) / "
            f"sum{grp} (rate({metric}_count{{{F}}}[{window}]))", legend)


def dashboard():
    L = Layout()

    L.row("Overview")
    L.add(stat("Learner steps / min", "Optimizer steps per minute over the last 5 minutes.",
               f"sum(rate(selfplay_learner_steps_total{{{F}}}[5m])) * 60", decimals=2), 4, 4)
    L.add(stat("Learner weights version", "Version of the learner's current weights.",
               f"max(selfplay_learner_weights_version{{{F}}})"), 4, 4)
    L.add(stat("Actors alive", "Actors holding a live lease at the coordinator.",
               f"max(selfplay_coordinator_actors_alive{{{F}}})",
               thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]), 4, 4)
    L.add(stat("Units pending", "Work units waiting for an actor.",
               f"sum(selfplay_coordinator_units_pending{{{F}}})"), 4, 4)
    L.add(stat("Learner idle", "Share of the learner's time spent waiting for rollout groups.",
               f"avg(selfplay_learner_idle_fraction{{{F}}})", unit="percentunit",
               thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.8}]),
          4, 4)
    L.add(stat("Auth rejections (1h)", "RPCs refused for a missing or wrong token, last hour.",
               f'sum(increase(selfplay_rpc_rejected_total{{{F},reason="unauthenticated"}}[1h]))',
               decimals=0,
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]), 4, 4)

    L.row("Learner")
    L.add(timeseries("Step rate", "Optimizer steps per minute.",
                     [(f"sum by (instance) (rate(selfplay_learner_steps_total{{{F}}}[{RI}])) * 60",
                       "{{instance}}")], unit="short", min0=True), 8, 8)
    L.add(timeseries("Step time", "Seconds per learner step once its groups are in.",
                     quantiles("selfplay_learner_step_seconds")
                     + [mean_of("selfplay_learner_step_seconds")], unit="s", min0=True), 8, 8)
    L.add(timeseries("Idle fraction",
                     "Share of wall time the learner waited for groups since the previous step. "
                     "Near 1: add actors. Near 0: the learner is the bottleneck.",
                     [(f"selfplay_learner_idle_fraction{{{F}}}", "{{instance}}")],
                     unit="percentunit", min0=True), 8, 8)
    L.add(timeseries("Loss", "Loss of the latest step per role.",
                     [(f"selfplay_learner_loss{{{F}}}", "{{role}}")]), 8, 8)
    L.add(timeseries("KL to the reference", "Per-sequence k3 KL to the frozen reference model.",
                     [(f"selfplay_learner_kl{{{F}}}", "{{role}}")]), 8, 8)
    L.add(timeseries("Entropy", "Mean per-token entropy of the policy on its completions.",
                     [(f"selfplay_learner_entropy{{{F}}}", "{{role}}")]), 8, 8)
    L.add(timeseries("Reward mean", "Mean reward of the latest step: R, R_Q, and what each role "
                     "trains on.", [(f"selfplay_learner_reward_mean{{{F}}}", "{{kind}}")]), 8, 8)
    L.add(timeseries("Reward std", "Spread of the same rewards. Near 0: no learning signal.",
                     [(f"selfplay_learner_reward_std{{{F}}}", "{{kind}}")], min0=True), 8, 8)
    L.add(timeseries("Advantages", "Mean and standard deviation of the advantages per role.",
                     [(f"selfplay_learner_advantage_mean{{{F}}}", "mean {{role}}"),
                      (f"selfplay_learner_advantage_std{{{F}}}", "std {{role}}")]), 8, 8)
    L.add(timeseries("Rollout groups", "Groups received, accepted and rejected (by reason), "
                     "per second.",
                     [(f"sum(rate(selfplay_learner_groups_received_total{{{F}}}[{RI}]))",
                       "received"),
                      (f"sum(rate(selfplay_learner_groups_accepted_total{{{F}}}[{RI}]))",
                       "accepted"),
                      (f"sum by (reason) (rate(selfplay_learner_groups_rejected_total{{{F}}}[{RI}]))",
                       "rejected {{reason}}")], unit="reqps", min0=True), 8, 8)
    L.add(timeseries("Staleness", "Learner weights version minus the group's weights version.",
                     quantiles("selfplay_learner_staleness_steps", qs=(0.5, 0.9, 0.99)),
                     min0=True), 8, 8)
    L.add(heatmap("Staleness distribution", "Accepted groups by staleness (steps).",
                  "selfplay_learner_staleness_steps"), 8, 8)
    L.add(timeseries("Gradient norm", "Global gradient norm before clipping.",
                     [(f"selfplay_learner_grad_norm{{{F}}}", "{{instance}}")], min0=True), 8, 8)
    L.add(timeseries("Training throughput", "Tokens per second in the latest step.",
                     [(f"selfplay_learner_tokens_per_second{{{F}}}", "{{instance}}")],
                     unit="short", min0=True), 8, 8)
    L.add(timeseries("Self-reward parse failures", "Unparsable judgements in accepted groups, "
                     "per minute.",
                     [(f"sum(rate(selfplay_learner_parse_failures_total{{{F}}}[{RI}])) * 60",
                       "learner")], min0=True), 8, 8)
    L.add(timeseries("Checkpoint time", "Seconds to write one checkpoint (1h window).",
                     quantiles("selfplay_learner_checkpoint_seconds", qs=(0.5, 0.99), window="1h")
                     + [mean_of("selfplay_learner_checkpoint_seconds", window="1h")],
                     unit="s", min0=True), 8, 8)
    L.add(timeseries("Weight publish time", "Seconds to publish one weights version to the "
                     "coordinator (1h window).",
                     quantiles("selfplay_learner_weight_publish_seconds", qs=(0.5, 0.99),
                               window="1h")
                     + [mean_of("selfplay_learner_weight_publish_seconds", window="1h")],
                     unit="s", min0=True), 8, 8)
    L.add(timeseries("Weight traffic", "Bytes per second: uploaded by the learner, served to "
                     "actors by the coordinator, received by actors.",
                     [(f"sum(rate(selfplay_learner_weight_publish_bytes_total{{{F}}}[{RI}]))",
                       "learner upload"),
                      (f"sum(rate(selfplay_coordinator_weight_bytes_served_total{{{F}}}[{RI}]))",
                       "coordinator served"),
                      (f"sum(rate(selfplay_actor_weight_fetch_bytes_total{{{F}}}[{RI}]))",
                       "actors fetched")], unit="Bps", min0=True), 8, 8)

    L.row("Coordinator")
    L.add(timeseries("Actors alive", "Actors holding a live lease.",
                     [(f"max(selfplay_coordinator_actors_alive{{{F}}})", "alive")], min0=True),
          8, 8)
    L.add(timeseries("Work units", "Units per minute: issued (re-issues included), re-issued, "
                     "done.",
                     [(f"sum(rate(selfplay_coordinator_units_issued_total{{{F}}}[{RI}])) * 60",
                       "issued"),
                      (f"sum(rate(selfplay_coordinator_units_reissued_total{{{F}}}[{RI}])) * 60",
                       "re-issued"),
                      (f"sum(rate(selfplay_coordinator_units_done_total{{{F}}}[{RI}])) * 60",
                       "done")], min0=True), 8, 8)
    L.add(timeseries("Units pending and leases expired",
                     "Units waiting for an actor; actors dropped for a missed heartbeat.",
                     [(f"sum(selfplay_coordinator_units_pending{{{F}}})", "pending"),
                      (f"sum(increase(selfplay_coordinator_leases_expired_total{{{F}}}[{RI}]))",
                       "leases expired")], min0=True), 8, 8)
    L.add(timeseries("Weights versions", "Newest version at the learner and at the coordinator, "
                     "and the oldest and newest held by actors.",
                     [(f"max(selfplay_learner_weights_version{{{F}}})", "learner"),
                      (f"max(selfplay_coordinator_weights_version{{{F}}})", "coordinator"),
                      (f"min(selfplay_actor_weights_version{{{F}}})", "actors min"),
                      (f"max(selfplay_actor_weights_version{{{F}}})", "actors max")]), 8, 8)
    L.add(timeseries("Weight bytes served", "FetchWeights payload bytes per second.",
                     [(f"sum(rate(selfplay_coordinator_weight_bytes_served_total{{{F}}}[{RI}]))",
                       "served B/s")], unit="Bps", min0=True), 8, 8)
    L.add(timeseries("Versions published", "Weight versions accepted from the learner per hour.",
                     [(f"sum(increase(selfplay_coordinator_weight_versions_published_total{{{F}}}[1h]))",
                       "per hour")], min0=True), 8, 8)
    L.add(timeseries("RPC latency p50", "Median time to handle a Coordinator RPC.",
                     quantiles("selfplay_coordinator_rpc_seconds", qs=(0.5,), by="rpc"),
                     unit="s", min0=True), 8, 8)
    L.add(timeseries("RPC latency p99", "99th percentile time to handle a Coordinator RPC.",
                     quantiles("selfplay_coordinator_rpc_seconds", qs=(0.99,), by="rpc"),
                     unit="s", min0=True), 8, 8)
    L.add(timeseries("RPC rate", "Coordinator RPCs handled per second.",
                     [(f"sum by (rpc) (rate(selfplay_coordinator_rpc_seconds_count{{{F}}}[{RI}]))",
                       "{{rpc}}")], unit="reqps", min0=True), 8, 8)

    L.row("Actors")
    L.add(timeseries("Tokens generated / s", "New tokens sampled per second, per actor and in "
                     "total.",
                     [(f"sum by (instance) (rate(selfplay_actor_tokens_generated_total{{{F}}}[{RI}]))",
                       "{{instance}}"),
                      (f"sum(rate(selfplay_actor_tokens_generated_total{{{F}}}[{RI}]))", "total")],
                     min0=True), 8, 8)
    L.add(timeseries("Generation time", "Seconds spent sampling one unit's query and its answers.",
                     quantiles("selfplay_actor_generation_seconds")
                     + [mean_of("selfplay_actor_generation_seconds")], unit="s", min0=True), 8, 8)
    L.add(timeseries("Unit time", "Seconds to play one whole work unit (sampling, rewards, judge, "
                     "reference log-probs).",
                     quantiles("selfplay_actor_play_seconds")
                     + [mean_of("selfplay_actor_play_seconds")], unit="s", min0=True), 8, 8)
    L.add(timeseries("Units done and failed", "Units per minute over all actors; failures by "
                     "reason.",
                     [(f"sum(rate(selfplay_actor_units_done_total{{{F}}}[{RI}])) * 60", "done"),
                      (f"sum by (reason) (rate(selfplay_actor_units_failed_total{{{F}}}[{RI}])) * 60",
                       "failed {{reason}}")], min0=True), 8, 8)
    L.add(timeseries("Actor weights version", "Weights version each actor holds.",
                     [(f"selfplay_actor_weights_version{{{F}}}", "{{instance}}")]), 8, 8)
    L.add(timeseries("Weight fetch time", "Seconds to fetch and load one weights version "
                     "(1h window).",
                     quantiles("selfplay_actor_weight_fetch_seconds", window="1h")
                     + [mean_of("selfplay_actor_weight_fetch_seconds", window="1h")],
                     unit="s", min0=True), 8, 8)
    L.add(timeseries("Weight fetch bytes", "Bytes per second received by actors.",
                     [(f"sum by (instance) (rate(selfplay_actor_weight_fetch_bytes_total{{{F}}}[{RI}]))",
                       "{{instance}}")], unit="Bps", min0=True), 8, 8)
    L.add(timeseries("Reward R distribution", "Quantiles and mean of R per answer, over all "
                     "actors.",
                     quantiles("selfplay_actor_reward", qs=(0.1, 0.5, 0.9), window="5m")
                     + [mean_of("selfplay_actor_reward", window="5m")]), 8, 8)
    L.add(timeseries("Self-reward R_Q distribution", "Quantiles and mean of the judge's score "
                     "(0-7) per answer.",
                     quantiles("selfplay_actor_self_reward", qs=(0.1, 0.5, 0.9), window="5m")
                     + [mean_of("selfplay_actor_self_reward", window="5m")]), 8, 8)
    L.add(heatmap("Self-reward heatmap", "Answers by self-reward score.",
                  "selfplay_actor_self_reward"), 8, 8)
    L.add(timeseries("Generated tokens per unit",
                     "Response length, as far as the metrics tell it: new tokens sampled per "
                     "completed unit, i.e. one challenger query plus its G solver answers (divide "
                     "by G + 1 for the mean length of one output). Tokens of units that failed "
                     "count too. selfplay exports no per-response length or truncation metric.",
                     [(f"sum(rate(selfplay_actor_tokens_generated_total{{{F}}}[{RI}])) / "
                       f"sum(rate(selfplay_actor_units_done_total{{{F}}}[{RI}]))", "tokens / unit")],
                     min0=True), 8, 8)
    L.add(timeseries("Judge parse failures", "Unparsable self-reward judgements per minute, per "
                     "actor.",
                     [(f"sum by (instance) (rate(selfplay_actor_judge_parse_failures_total{{{F}}}[{RI}])) * 60",
                       "{{instance}}")], min0=True), 8, 8)

    L.row("Security")
    L.add(timeseries("Rejected RPCs", "RPCs refused before reaching a service, per second, by "
                     "role and reason (unauthenticated: missing or wrong bearer token).",
                     [(f"sum by (role, reason) (rate(selfplay_rpc_rejected_total{{{F}}}[{RI}]))",
                       "{{role}} {{reason}}")], unit="reqps", min0=True), 24, 8)

    L.row("Processes")
    L.add(timeseries("Process memory", "Resident memory (RSS) of each selfplay process, read "
                     "from /proc/self/statm at every scrape (Linux only).",
                     [(f"selfplay_process_resident_memory_bytes{{{F}}}", "{{job}} {{instance}}")],
                     unit="bytes", min0=True), 24, 8)

    variables = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
         "includeAll": False, "multi": False},
        {"type": "query", "name": "run", "label": "run", "datasource": DS,
         "description": "One run at a time: the run label attached at scrape time (Kubernetes: "
                        "namespace/app.kubernetes.io/instance; Slurm: the run directory; "
                        "prometheus.yml: what you set). Empty when no target carries it.",
         "query": 'label_values({__name__=~"selfplay_.+"}, run)',
         "definition": 'label_values({__name__=~"selfplay_.+"}, run)',
         "refresh": 2, "sort": 1, "multi": False, "includeAll": False,
         "current": {}, "hide": 0, "regex": "", "options": []},
        {"type": "query", "name": "job", "label": "job", "datasource": DS,
         "query": 'label_values({__name__=~"selfplay_.+",run=~"${run:regex}"}, job)',
         "definition": 'label_values({__name__=~"selfplay_.+",run=~"${run:regex}"}, job)',
         "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0,
         "regex": "", "options": []},
        {"type": "query", "name": "instance", "label": "instance", "datasource": DS,
         "query": 'label_values({__name__=~"selfplay_.+",run=~"${run:regex}",job=~"$job"}, instance)',
         "definition": 'label_values({__name__=~"selfplay_.+",run=~"${run:regex}",job=~"$job"}, instance)',
         "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0,
         "regex": "", "options": []},
    ]
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "Language Self-Play training: learner, coordinator and actors "
                       "(generated by deploy/generate.py; edit there).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": L.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["selfplay"],
        "templating": {"list": variables},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "selfplay",
        "uid": "selfplay",
        "version": 1,
        "weekStart": "",
    }


def dashboard_text():
    return json.dumps(dashboard(), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# PrometheusRule
# ---------------------------------------------------------------------------------------------
RULE_HEADER = """\
# Generated from deploy/prometheus/alerts.yml by deploy/generate.py: do not edit here.
# Needs the Prometheus Operator (monitoring.coreos.com/v1): the optional component
# deploy/k8s/components/monitoring. The `release` label is what many
# kube-prometheus-stack installs select rules by; change it to match your Prometheus's
# ruleSelector.
"""


def prometheus_rule_text():
    import yaml

    alerts = yaml.safe_load(ALERTS.read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "selfplay",
            "labels": {"app.kubernetes.io/name": "selfplay",
                       "app.kubernetes.io/component": "monitoring",
                       "release": "prometheus"},
        },
        "spec": {"groups": alerts["groups"]},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def str_repr(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_repr)
    return RULE_HEADER + yaml.dump(rule, Dumper=Dumper, sort_keys=False, width=4096)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = ap.parse_args()
    stale = []
    import yaml

    for path, text, parse in ((DASHBOARD, dashboard_text(), json.loads),
                              (PROMETHEUS_RULE, prometheus_rule_text(), yaml.safe_load)):
        rel = path.relative_to(DEPLOY.parent)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        # --check compares content, not formatting (which varies across PyYAML versions).
        if args.check and current is not None and parse(current) == parse(text):
            continue
        if args.check:
            stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if stale:
        print("out of date (run python3 deploy/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
