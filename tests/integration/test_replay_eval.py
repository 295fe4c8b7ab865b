"""`recstream replay-eval`: online (producer -> Kafka -> worker -> recommendations topic)
and offline answers of one version agree, user by user, on generated data; through a
running worker on Apache Kafka, and with --local (a broker and a worker of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recstream_tools.kafka import KafkaCluster
from stream_worker.produce import generated_log
from stream_worker.store import run_migrations
from tests.integration.worker_harness import (
    WorkerProcess,
    new_topics,
    publish_tiny_model,
    worker_env,
)

pytestmark = pytest.mark.integration


def write_log(path: Path) -> Path:
    """Walks over the tiny model's catalogue; another seed than its training data."""
    sequences = generated_log(users=50, items=40, length=18, seed=11)
    path.write_text("".join(f"{u} {i}\n" for u, items in sequences.items() for i in items))
    return path


def replay_eval(*args: str, env: dict[str, str]) -> tuple[dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "replay-eval", "--format", "sasrec", *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_online_and_offline_agree_through_a_running_worker(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    tiny = publish_tiny_model(tmp_path / "artifacts")
    topics = new_topics(broker.bootstrap_servers, "re-")
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = worker_env(broker.bootstrap_servers, db_url, tiny.root, topics, tmp_path,
                     RECSTREAM_WORKER__TOP_K="10")  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        doc, table = replay_eval(
            "--data", str(write_log(tmp_path / "walks.txt")), "--artifacts", str(tiny.root),
            "--users", "40", env=env,
        )  # fmt: skip
    finally:
        assert worker.stop() == 0
    assert doc["version"] == tiny.version and doc["users"] == 40
    assert doc["online"] == doc["offline"], (doc, table)
    # Exactly equal lists, or lists that differ only among tied scores.
    assert set(doc["differing_by_reason"]) <= {"tie"}, table  # type: ignore[arg-type]
    hr = doc["online"]["hr@10"]  # type: ignore[index]
    assert 0 < hr <= 1


def test_replay_eval_local_runs_its_own_broker_and_worker(tmp_path: Path) -> None:
    tiny = publish_tiny_model(tmp_path / "artifacts")
    doc, _ = replay_eval(
        "--data", str(write_log(tmp_path / "walks.txt")), "--artifacts", str(tiny.root),
        "--local", "--users", "20", env=dict(os.environ),
    )  # fmt: skip
    assert doc["users"] == 20 and doc["online"] == doc["offline"]
    assert doc["differing_users"] == 0 or set(doc["differing_by_reason"]) <= {"tie"}  # type: ignore[arg-type]
