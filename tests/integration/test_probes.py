"""/live and /ready of a real worker on Apache Kafka and PostgreSQL.

A PostgreSQL outage makes the worker unready (its batch waits for the database) and
ready again when the server is back, live throughout; a batch wedged on a lock makes
it unlive, and live again once the lock is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import page
from stream_worker.store import run_migrations
from tests.integration.reliability_harness import pg_cluster, wait_for_database
from tests.integration.worker_harness import (
    TinyModel,
    WorkerProcess,
    new_topics,
    publish_tiny_model,
    send,
    walk_events,
    worker_env,
)

pytestmark = pytest.mark.integration

LIVENESS_S = 12.0  # above the longest database retry backoff (10 s plus jitter)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


def start_worker(
    broker: KafkaCluster, tiny: TinyModel, db_url: str, tmp_path: Path, **extra: str
) -> tuple[WorkerProcess, dict[str, str], int]:
    topics = new_topics(broker.bootstrap_servers, "probe-")
    env = worker_env(broker.bootstrap_servers, db_url, tiny.root, topics, tmp_path, **extra)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    return worker, topics, int(env["RECSTREAM_WORKER__WEB_PORT"])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> float:
    """Seconds until ``check()`` holds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not {what} within {timeout}s"
        time.sleep(0.25)
    return time.monotonic() - started


def status(port: int, path: str) -> tuple[int, Any]:
    return page(port, path, timeout_s=10)


def test_a_postgres_outage_makes_the_worker_unready_not_unlive_and_ready_again(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    run_migrations(pg_schema_url)
    worker, topics, port = start_worker(
        broker, tiny, pg_schema_url, tmp_path,
        RECSTREAM_WORKER__LIVENESS_BATCH_S=str(LIVENESS_S),
    )  # fmt: skip
    try:
        assert status(port, "/ready")[0] == 200 and status(port, "/live")[0] == 200
        pg_cluster("stop")
        try:
            # Events arrive: a batch waits for the database, retrying.
            send(broker.bootstrap_servers, topics["events"], walk_events("out", 5, 4))
            wait_for(lambda: status(port, "/ready")[0] == 503, "unready")
            _, body = status(port, "/ready")
            assert any("database" in p for p in body["problems"]), body
            # Live throughout: retries are progress (checked past the liveness limit).
            deadline = time.monotonic() + LIVENESS_S + 4
            while time.monotonic() < deadline:
                assert status(port, "/live")[0] == 200, status(port, "/live")
                time.sleep(1.0)
        finally:
            pg_cluster("start")
            wait_for_database(pg_schema_url)
        wait_for(lambda: status(port, "/ready")[0] == 200, "ready again")
        metrics = status(port, "/metrics")[1]
        assert "recstream_ready 1.0" in metrics
    finally:
        assert worker.stop() == 0


def test_a_batch_wedged_on_a_lock_makes_the_worker_unlive_until_it_is_released(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    run_migrations(pg_schema_url)
    worker, topics, port = start_worker(
        broker, tiny, pg_schema_url, tmp_path, RECSTREAM_WORKER__LIVENESS_BATCH_S="3",
    )  # fmt: skip
    admin = create_engine(pg_schema_url, poolclass=NullPool)
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with admin.connect() as conn, conn.begin():
            conn.exec_driver_sql("LOCK TABLE partition_offsets IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(120)

    holder = threading.Thread(target=hold_lock)
    try:
        holder.start()
        assert locked.wait(30)
        send(broker.bootstrap_servers, topics["events"], walk_events("wedge", 5, 2))
        wait_for(lambda: status(port, "/live")[0] == 503, "unlive")
        _, body = status(port, "/live")
        assert body["status"] == "wedged" and "no progress" in body["detail"], body
        # Still answering, and the database itself answers: ready.
        assert status(port, "/ready")[0] == 200
        release.set()
        holder.join(30)
        wait_for(lambda: status(port, "/live")[0] == 200, "live again")
    finally:
        release.set()
        holder.join(30)
        admin.dispose()
        assert worker.stop() == 0
