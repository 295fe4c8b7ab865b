"""A real Prometheus (Debian's package) scrapes a running worker and evaluates the alert
rules of deploy/monitoring: dead-lettered input makes RecstreamDeadLetterRateHigh fire,
and RecstreamNoReadyWorker stays quiet while the worker is ready.

The rules are the PrometheusRule's, unchanged but for their ``for`` hold times, set to
0 s so the test need not wait ten minutes; promtool's unit tests check the holds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import free_port
from stream_worker.store import run_migrations
from tests.integration.worker_harness import (
    WorkerProcess,
    new_topics,
    publish_tiny_model,
    send,
    send_raw,
    walk_events,
    worker_env,
)

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "prometheus-rule.yaml"


def prometheus_api(port: int, what: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{what}", timeout=5) as resp:
        return json.loads(resp.read())["data"]


def query(port: int, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus_api(port, "query?query=" + quote(expr))["result"]
    return result


def prometheus_alerts(port: int) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = prometheus_api(port, "alerts")["alerts"]
    return alerts


def test_prometheus_scrapes_a_worker_and_the_dead_letter_alert_fires(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `scripts/run test` installs it (apt)")
    tiny = publish_tiny_model(tmp_path / "artifacts")
    topics = new_topics(broker.bootstrap_servers, "prom-")
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = worker_env(broker.bootstrap_servers, db_url, tiny.root, topics, tmp_path)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()

    spec = yaml.safe_load(RULES.read_text())["spec"]
    for group in spec["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{
            "job_name": "recstream-worker",
            "static_configs": [{"targets": [f"127.0.0.1:{env['RECSTREAM_WORKER__WEB_PORT']}"]}],
        }],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("w") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Prometheus scrapes the worker before anything is sent.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                if query(port, 'recstream_ready{job="recstream-worker"} == 1'):
                    break
        assert query(port, "recstream_ready"), (tmp_path / "prometheus.log").read_text()[-2000:]
        # Valid events and, among them, one record in ten not even JSON: 10% > 1%. Twice:
        # a counter's series appears with its first increment, and a rate needs it to
        # grow after Prometheus has seen it.
        for wave in range(2):
            send(broker.bootstrap_servers, topics["events"], walk_events(f"prom{wave}", 20, 9))
            send_raw(
                broker.bootstrap_servers, topics["events"],
                [(b"someone", b"not json %d" % n) for n in range(20)],
            )  # fmt: skip
            time.sleep(4.0)
        deadline = time.monotonic() + 90
        firing: list[dict[str, Any]] = []
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not firing:
            time.sleep(1.0)
            try:
                seen = prometheus_alerts(port)
            except OSError:  # not listening yet
                continue
            firing = [a for a in seen if a["labels"]["alertname"] == "RecstreamDeadLetterRateHigh"
                      and a["state"] == "firing"]  # fmt: skip
        assert firing, (seen, query(port, "recstream_dead_letters_total"))
        assert firing[0]["annotations"]["runbook_url"] == "docs/operations.md#dead-letter-rate"
        names = {a["labels"]["alertname"] for a in seen}
        assert "RecstreamNoReadyWorker" not in names  # the worker is ready: recstream_ready 1
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        assert worker.stop() == 0
