"""deploy/prometheus (alert rules) and deploy/grafana (a dashboard): valid for promtool and
Grafana, and every query names a metric the app really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "authapp-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "authapp-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "authapp-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (.ci/run unpacks it from Debian's prometheus package)"
)
METRIC_NAME = re.compile(r"\b(authapp_[a-z_]+)")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_queries() -> list[str]:
    return re.findall(r"^\s+expr: (?:\|\n)?((?:.+\n)+?)(?=\s+(?:for|labels):)", RULES.read_text(), re.M)


def exported_names(client) -> set[str]:
    """The sample names of /metrics, once a request has made every labelled series."""
    client.get("/health/live")
    client.post("/auth/login", json={"username": "nobody", "password": "wrong-password-1"})
    text = client.get("/metrics").get_data(as_text=True)
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    """The alerts fire on the series that should fire them and stay quiet otherwise."""
    result = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each of the dashboard's queries (as recording rules)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{n}", "expr": expr} for n, expr in enumerate(dashboard_queries())
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "authapp" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in dashboard["panels"]:
        assert panel["type"] in ("timeseries", "stat") and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


def test_every_query_names_a_metric_the_app_exports(client):
    exported = exported_names(client)
    queries = dashboard_queries() + rule_queries()
    assert len(rule_queries()) == 10
    named = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert named and named <= exported, sorted(named - exported)
    # every family the app exports is on the dashboard
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported if n.startswith("authapp_")}
    on_dashboard = {
        re.sub(r"_(total|bucket|count|sum)$", "", n) for q in dashboard_queries() for n in METRIC_NAME.findall(q)
    }
    assert families <= on_dashboard, sorted(families - on_dashboard)
