"""deploy/monitoring: the alert rules pass promtool's unit tests, every alert has a test
and a runbook, and the Grafana dashboard's queries parse and read metrics that exist.

promtool comes from Debian's ``prometheus`` package, which ``scripts/run test``
installs when missing; without it these tests fail, saying so.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_worker.metrics import metrics_table

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
OPERATIONS_MD = REPO / "docs" / "operations.md"
# Metrics the rules and dashboard may read that the worker does not expose itself.
KUBE_STATE_METRICS = {"kube_job_status_failed"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `scripts/run test` installs it (apt: prometheus)")
    return found


def rule_spec() -> dict[str, Any]:
    rule = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [r for group in rule_spec()["groups"] for r in group["rules"] if "alert" in r]


def worker_metrics() -> set[str]:
    """Metric names the worker exposes, with the series suffixes of each type."""
    names = set()
    for row in metrics_table().splitlines()[2:]:
        name, kind = re.match(r"\| `([^`]+)` \| (\w+) \|", row).groups()  # type: ignore[union-attr]
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def referenced_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers followed by a selector, a range
    or an operator, that are not functions or keywords)."""
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", expr))
    keywords = {"by", "without", "and", "or", "unless", "offset", "on", "ignoring", "le",
                "bool", "group_left", "group_right"}  # fmt: skip
    labels = set(re.findall(r"\b([a-z_]+)\s*[=!~]", expr)) | set(
        re.findall(r"(?:by|without)\s*\(([^)]*)\)", expr)
    )
    label_names = {name.strip() for group in labels for name in group.split(",")}
    return {w for w in words - keywords - label_names if "_" in w}


def test_the_alert_rules_check_and_pass_their_unit_tests(tmp_path: Path) -> None:
    tool = promtool()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_spec()))
    shutil.copy(MONITORING / "tests" / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    checked = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", str(tmp_path / "alerts.test.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_fires_in_a_test_and_has_a_runbook_section() -> None:
    tests = yaml.safe_load((MONITORING / "tests" / "alerts.test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    names = {rule["alert"] for rule in alerts()}
    assert names == fired, "every alert needs a test in which it fires"
    assert names == quiet, "and one in which it stays quiet"
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", OPERATIONS_MD.read_text(), re.MULTILINE)
    }
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/operations.md#"), url
        assert url.split("#", 1)[1] in headings, f"{rule['alert']}: no section {url}"


def test_the_rules_read_only_metrics_that_exist() -> None:
    exposed = worker_metrics() | KUBE_STATE_METRICS
    for rule in alerts():
        unknown = referenced_metrics(rule["expr"]) - exposed
        assert not unknown, f"{rule['alert']} reads {unknown}"


def test_the_dashboard_queries_parse_and_read_metrics_that_exist(tmp_path: Path) -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert all(panel["title"] for panel in dashboard["panels"])
    # promtool parses each query as a recording rule's expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr} for n, expr in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    exposed = worker_metrics()
    for expr in exprs:
        assert referenced_metrics(expr) <= exposed, (expr, referenced_metrics(expr) - exposed)
    used = set().union(*(referenced_metrics(e) for e in exprs))
    # The panels cover the worker's headline metrics.
    assert {"recstream_consumer_lag", "recstream_ready", "recstream_events_total",
            "recstream_end_to_end_ms_bucket", "recstream_dead_letters_total"} <= used  # fmt: skip


def test_the_monitoring_kustomization_renders_the_rule_and_the_dashboard() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `scripts/run test` installs it")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, check=True
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds == {("PrometheusRule", "recstream"), ("ConfigMap", "recstream-dashboard")}
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["dashboard.json"])["uid"] == "recstream-workers"
