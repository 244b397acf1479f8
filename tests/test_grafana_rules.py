"""The Grafana dashboard (etc/grafana/ccpd.json) and the Prometheus alerting rules
(etc/prometheus/ccpd-rules.yml, with their promtool unit tests in ccpd-rules.test.yml).

promtool checks the rules, runs their unit tests and parses the dashboard's queries; every
metric the dashboard and the rules query must be in ccpd's real /metrics exposition, read from
a ccpd that served a request; and the dashboard must be a JSON model Grafana can import.
promtool is the Debian package ``prometheus``; without it those tests are skipped.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import MESSAGE

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana" / "ccpd.json"
RULES = ROOT / "etc" / "prometheus" / "ccpd-rules.yml"
RULES_TESTS = ROOT / "etc" / "prometheus" / "ccpd-rules.test.yml"

ALERTS = {"CcpdLaneDown", "CcpdQuotaWarn", "CcpdQuotaBlocked", "CcpdReroutesHappening",
          "CcpdStoreWriteErrors", "CcpdLogWriteErrors", "CcpdLaneUnusable",
          "CcpdScrapeMissing"}
# What the dashboard must show (series names as Prometheus stores them).
DASHBOARD_METRICS = {
    "ccp_requests_total", "ccp_tokens_total", "ccp_request_duration_seconds_bucket",
    "ccp_ttft_seconds_bucket", "ccp_quota_headroom_ratio", "ccp_plan_headroom_ratio",
    "ccp_provider_utilization_ratio", "ccp_provider_reset_timestamp_seconds",
    "ccp_rerouted_on_limit_total", "ccp_limit_answers_total", "ccp_lane_up",
    "ccp_lane_probe_seconds", "ccp_lane_unusable", "ccp_store_writes_total",
    "ccp_store_write_errors_total", "ccp_store_size_bytes", "ccp_rollup_duration_seconds_bucket",
    "ccp_log_write_errors_total", "ccp_log_spooled_lines", "ccp_requests_refused_total",
    "process_resident_memory_bytes"}
# Grafana's variables, as they would be expanded for "All" and a 15 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$lane": ".*",
                     "$model": ".*"}
METRIC_NAME = re.compile(r"\b((?:ccp|process)_[A-Za-z0-9_]*[A-Za-z0-9])\b")


# -- reading the files --------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs(dashboard: dict) -> list[str]:
    """The PromQL of every panel's targets and of every query variable."""
    exprs = [target["expr"] for panel in dashboard_panels(dashboard)
             for target in panel.get("targets", []) if target.get("expr")]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs() -> list[str]:
    """The ``expr`` of every rule: a one-line scalar or a block scalar (``>-``, ``|``)."""
    exprs = []
    lines = RULES.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*?)\s*$", line)
        if not match:
            continue
        indent, value = len(match.group(1)), match.group(2)
        if value[:1] in (">", "|"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        exprs.append(value.strip("'\""))
    return exprs


def alert_names(path: Path, key: str) -> list[str]:
    return re.findall(rf"^\s*-?\s*{key}:\s*(\w+)\s*$", path.read_text(encoding="utf-8"),
                      re.MULTILINE)


def metric_names(exprs) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def exposed_names(text: str) -> set[str]:
    """The series names a scrape of ``text`` gives Prometheus: every sample's name, and for
    families without samples yet (labelled metrics nothing has set) the names their type
    gives them (the parser drops a counter's ``_total`` from the family name)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "gaugehistogram": ("_bucket", "_gsum",
                                                                       "_gcount")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian package 'prometheus'; .ci/run installs "
                    "it when it can)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


# -- the rules ----------------------------------------------------------------------------------

def test_the_rules_pass_promtool_check():
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout, checked.stdout


def test_the_rules_pass_their_promtool_unit_tests():
    tested = run_promtool("test", "rules", str(RULES_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def test_every_alert_is_there_once_and_has_unit_tests():
    alerts = alert_names(RULES, "alert")
    assert sorted(alerts) == sorted(ALERTS)
    assert len(rule_exprs()) == len(alerts)
    assert set(alert_names(RULES_TESTS, "alertname")) == ALERTS


# -- the dashboard ------------------------------------------------------------------------------

def test_the_dashboard_is_an_importable_grafana_model():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "ccpd" and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None  # so an import never overwrites another dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("lane", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":  # a row only groups panels: it queries nothing
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        targets = [target for target in panel.get("targets", []) if target.get("expr")]
        assert targets, f"panel {panel['title']!r} has no target with an expr"
        assert all(target["datasource"] == panel["datasource"] for target in targets)
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_the_dashboard_shows_every_metric_it_should():
    assert DASHBOARD_METRICS <= metric_names(dashboard_exprs(load_dashboard()))


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """Each query, its Grafana variables expanded, as a recording rule promtool parses."""
    rules = []
    for i, expr in enumerate(dashboard_exprs(load_dashboard())):
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            match = re.fullmatch(r"label_values\((.+), *\w+\)", expr)
            assert match, expr
            expr = match.group(1)
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable is left in {expr!r}"
        rules.append({"record": f"ccpd_dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    # JSON is YAML: promtool reads it as a rules file
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- both against ccpd's real exposition ----------------------------------------------------------

def test_every_queried_metric_is_in_ccpds_exposition(memory_ccpd):
    ccpd = memory_ccpd()
    sent = ccpd.send_post("/v1/messages", MESSAGE, {"x-fake-input-tokens": "5",
                                                    "x-fake-events": "3"})
    ccpd.advance(0.1)
    assert ccpd.settle(sent).code == 200
    assert ccpd.get("/readyz").code == 200
    answer = ccpd.get("/metrics")
    assert answer.code == 200
    exposed = exposed_names(answer.body.decode())
    assert "ccp_requests_total" in exposed and "ccp_ttft_seconds_bucket" in exposed

    used = {"dashboard": metric_names(dashboard_exprs(load_dashboard())),
            "rules": metric_names(rule_exprs())}
    assert used["dashboard"] and used["rules"]
    missing = {where: sorted(names - exposed) for where, names in used.items()
               if names - exposed}
    assert not missing, f"queried but not in ccpd's /metrics: {missing}"
