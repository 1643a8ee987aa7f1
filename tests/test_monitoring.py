"""The Grafana dashboard and the Prometheus alerts in deploy/: every metric and label they query is
one the daemon exports (read from worker/metrics.py's registry), every query is valid PromQL, every
alert passes its unit tests (promtool), and the README describes each panel and alert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "mailgun-sync.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"

# The samples each kind of metric is exposed as (prometheus_client), by suffix.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created")}
# Labels Prometheus adds to whatever it scrapes (the target's), beside the daemon's own.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# PromQL's functions and aggregations the queries may call, and its keywords.
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "delta", "deriv", "time",
             "histogram_quantile", "min_over_time", "max_over_time", "avg_over_time", "absent", "changes",
             "resets", "clamp_min", "clamp_max", "vector", "scalar", "topk", "bottomk", "label_values"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
            "bool"}


def exported() -> dict[str, set[str]]:
    """{sample name the daemon exports: its labels}, from the registry the daemon serves /metrics from."""
    metrics = Metrics()
    labels = {collector._name: set(collector._labelnames)  # type: ignore[attr-defined]
              for collector in metrics.registry._collector_to_names}  # type: ignore[attr-defined]
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            samples[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return samples


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query: the panels', the variables' and the alerts'."""
    for panel in panels():
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


def as_promql(query: str) -> str:
    """A Grafana query as Prometheus reads it: its range variables given a value."""
    return query.replace("$__rate_interval", "5m").replace("$__interval", "1m")


def referenced(query: str) -> tuple[set[str], list[tuple[str, set[str]]], set[str]]:
    """(metric names, [(metric, labels its matchers name)], labels grouped or matched on) of a query."""
    query = as_promql(query)
    variable = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query, re.DOTALL)
    grouping: set[str] = set()
    if variable:
        query, label = variable[1], variable[2]
        grouping.add(label)
    selectors = [(m[1], set(re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', m[2])))
                 for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", query)]
    for clause in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", query):
        grouping |= {label.strip() for label in clause[1].split(",") if label.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\boffset\s+\w+", "", bare)
    names: set[str] = set()
    for found in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        name, called = found[1], found[2]
        if called:
            assert name in FUNCTIONS, f"{name}( in {query}"
        elif name not in KEYWORDS:
            names.add(name)
    return names, selectors, grouping


def test_the_daemon_exports_what_the_readme_lists():
    """The registry the checks below read is the one README's /metrics list names."""
    families = {family.name for family in Metrics().registry.collect()}
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`(mailgun_sync_\w+)(?:\{[^}]*\})?`", readme))
    assert {name.removesuffix("_total") for name in listed} - families == set()


def problems(query: str) -> list[str]:
    """What is wrong with a query's metrics and labels, as the daemon exports them."""
    samples = exported()
    names, selectors, grouping = referenced(query)
    found = [f"no metric in {query}"] if not names else []
    found += [f"{name} is not exported" for name in sorted(names - set(samples))]
    for metric, labels in selectors:
        found += [f"{metric} has no label {label}" for label in sorted(labels - samples.get(metric, set()))
                  if label not in TARGET_LABELS]
    known = set().union(*(samples.get(name, set()) for name in names)) | TARGET_LABELS
    found += [f"no metric of it has {label}" for label in sorted(grouping - known)]
    return found


def test_the_check_finds_a_metric_not_exported_and_labels_the_metric_does_not_have():
    assert problems('sum(rate(mailgun_sync_runs_total{status="ok"}[5m]))') == []
    assert problems("mailgun_sync_runs") == ["mailgun_sync_runs is not exported"]
    assert problems('sum by (le) (rate(mailgun_sync_run_duration_seconds_bucket{list="bounces"}[5m]))') == []
    assert problems('mailgun_sync_pending_rows{status="ok"}') == \
        ["mailgun_sync_pending_rows has no label status"]
    assert problems("sum by (domain) (rate(mailgun_sync_http_requests_total[5m]))") == \
        ["no metric of it has domain"]
    assert problems('label_values(mailgun_sync_webhooks_total{namespace=~"$namespace"}, list)') == \
        ["no metric of it has list"]
    assert problems("time() - up") == ["up is not exported"]


@pytest.mark.parametrize(("where", "query"), list(queries()), ids=lambda v: v if " " in v else "")
def test_every_metric_and_label_the_dashboard_and_alerts_query_is_one_the_daemon_exports(where, query):
    assert problems(query) == [], where


def test_the_dashboard_is_well_formed():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "domain", "list"}
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in panels():
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval"}
            assert used <= variables, panel["title"]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not on PATH: .ci/tools.sh puts Debian's on it (CI does), "
                    "or install Debian's `prometheus` package")
    return found


def run_promtool(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_the_alert_rules_pass_promtool_check_rules():
    assert f"SUCCESS: {len(alert_rules())} rules found" in run_promtool("check", "rules", str(ALERTS))


@pytest.mark.slow
def test_every_alert_fires_and_stays_silent_in_its_unit_tests():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == rule["alert"]]
        assert True in outcomes and False in outcomes, f"{rule['alert']}: a firing and a silent case"
    assert "SUCCESS" in run_promtool("test", "rules", str(ALERT_TESTS))


@pytest.mark.slow
def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    """Each query, its Grafana variables given values, as a recording rule promtool parses."""
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(query)}
             for i, (where, query) in enumerate(queries()) if where.startswith("panel")]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", str(path))


def test_the_readme_describes_every_panel_and_alert():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Dashboard and alerts"):]
    section = section[:section.index("\n## ")]
    for panel in panels():
        assert f"**{panel['title']}**" in section, panel["title"]
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
