"""``recstream retrain`` against a database filled by a real worker from a real broker.

One module-scoped worker run fills a SQLite file; each test then runs the console
script on its own copy of the artifact root (the live version is the harness's tiny
model), so the tests do not depend on each other's order.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from model.artifacts import list_versions, load_version, read_current, read_manifest
from model.retrain import LOCK_FILE
from recstream_tools.kafka import KafkaCluster
from stream_worker.store import make_engine, run_migrations
from tests.integration.worker_harness import (
    TINY,
    TinyModel,
    WorkerProcess,
    publish_tiny_model,
    send,
    wait_until_applied,
    walk_events,
    worker_env,
)

pytestmark = pytest.mark.integration

USERS, LENGTH = 40, 8

# The harness's TINY training settings, as the environment of the console script.
TRAIN_ENV = {
    "RECSTREAM_TRAIN__MAX_LEN": str(TINY.max_len),
    "RECSTREAM_TRAIN__DIM": str(TINY.dim),
    "RECSTREAM_TRAIN__BLOCKS": str(TINY.blocks),
    "RECSTREAM_TRAIN__HEADS": str(TINY.heads),
    "RECSTREAM_TRAIN__DROPOUT": str(TINY.dropout),
    "RECSTREAM_TRAIN__EPOCHS": "6",
    "RECSTREAM_TRAIN__LR": str(TINY.lr),
    "RECSTREAM_TRAIN__BATCH_SIZE": str(TINY.batch_size),
    "RECSTREAM_TRAIN__DEVICE": "cpu",
    "RECSTREAM_INDEX__DEVICE": "cpu",
    "RECSTREAM_RETRAIN__MIN_USERS": "10",
}


@dataclass
class FilledDatabase:
    url: str
    tiny: TinyModel
    interactions: int


@pytest.fixture(scope="module")
def filled(broker: KafkaCluster, tmp_path_factory: pytest.TempPathFactory) -> FilledDatabase:
    """A worker consumes walks over the tiny model's catalogue into a SQLite file."""
    workdir = tmp_path_factory.mktemp("retrain-worker")
    tiny = publish_tiny_model(workdir / "artifacts")
    db_url = f"sqlite:///{workdir / 'state.db'}"
    run_migrations(db_url)
    run = os.urandom(4).hex()
    topics = {"events": f"rt-events-{run}", "recommendations": f"rt-recs-{run}"}
    topics["dead_letter"] = f"rt-dlq-{run}"
    env = worker_env(broker.bootstrap_servers, db_url, tiny.root, topics, workdir)
    proc = WorkerProcess(env, workdir / "worker.log").start()
    try:
        events = list(walk_events("rt", users=USERS, length=LENGTH))
        send(broker.bootstrap_servers, topics["events"], events)
        engine = make_engine(db_url)
        total = wait_until_applied(engine, len(events))
        engine.dispose()
        assert total == len(events), f"worker applied {total} of {len(events)} events"
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    return FilledDatabase(db_url, tiny, len(events))


@pytest.fixture
def root(filled: FilledDatabase, tmp_path: Path) -> Path:
    """This test's own copy of the artifact root, CURRENT naming the tiny model."""
    copy = tmp_path / "artifacts"
    shutil.copytree(filled.tiny.root, copy)
    return copy


def retrain(
    db: FilledDatabase, root: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    full_env = {
        **os.environ,
        **TRAIN_ENV,
        "RECSTREAM_DATABASE__URL": db.url,
        "RECSTREAM_ARTIFACTS__ROOT": str(root),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "retrain"],
        capture_output=True, text=True, env=full_env, timeout=300, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    return proc, (json.loads(lines[-1]) if lines else None)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def no_leftovers(root: Path) -> None:
    assert not [p.name for p in root.iterdir() if p.name.startswith(".staging-")]


def test_retrain_publishes_a_gated_version_and_switches_current(
    filled: FilledDatabase, root: Path
) -> None:
    live = filled.tiny.version
    proc, out = retrain(filled, root, RECSTREAM_RETRAIN__QUALITY_MARGIN="1.0")
    assert proc.returncode == 0, proc.stderr
    assert out is not None and out["published"] and out["switched"]
    new = out["version"]
    assert new != live and read_current(root) == new
    assert out["live_version"] == live and out["users"] == USERS
    for key in ("candidate_valid_ndcg@10", "live_valid_ndcg@10"):
        assert 0.0 <= out[key] <= 1.0
    manifest = read_manifest(root / new)
    gate = manifest["retrain"]
    assert gate["live_version"] == live
    assert gate["candidate_valid_ndcg@10"] == out["candidate_valid_ndcg@10"]
    assert gate["live_valid_ndcg@10"] == out["live_valid_ndcg@10"]
    assert manifest["metrics"]["valid"]["ndcg@10"] == out["candidate_valid_ndcg@10"]
    data = manifest["training_data"]
    assert data["format"] == "database" and data["users"] == USERS
    assert data["interactions"] == filled.interactions
    assert data["source"].startswith("sqlite:///")
    assert load_version(root).version == new  # complete and verified
    no_leftovers(root)


def test_the_quality_gate_refuses_a_worse_model_and_keeps_current(
    filled: FilledDatabase, root: Path
) -> None:
    before = list_versions(root)
    # One epoch at a negligible learning rate: an untrained model, far below the live one.
    proc, out = retrain(
        filled, root,
        RECSTREAM_RETRAIN__QUALITY_MARGIN="0.0", RECSTREAM_TRAIN__EPOCHS="1",
        RECSTREAM_TRAIN__LR="0.0000001",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1 and "quality gate" in errors[0], proc.stderr
    assert out is not None and not out["published"] and out["version"] is None
    assert out["candidate_valid_ndcg@10"] < out["live_valid_ndcg@10"]
    assert read_current(root) == filled.tiny.version
    assert list_versions(root) == before
    no_leftovers(root)


def test_a_failed_run_leaves_current_and_the_versions_untouched(
    filled: FilledDatabase, root: Path
) -> None:
    before = list_versions(root)
    # Training succeeds, then building the index fails while publishing.
    proc, out = retrain(
        filled, root,
        RECSTREAM_RETRAIN__QUALITY_MARGIN="1.0", RECSTREAM_INDEX__FACTORY="NoSuchIndex,Flat",
        RECSTREAM_TRAIN__EPOCHS="1",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1, proc.stderr
    assert out is None
    assert read_current(root) == filled.tiny.version
    assert list_versions(root) == before
    no_leftovers(root)


def test_a_second_run_fails_fast_while_the_lock_is_held_or_waits_for_it(
    filled: FilledDatabase, root: Path
) -> None:
    lock = FileLock(root / LOCK_FILE, thread_local=False)  # released by a timer thread
    with lock:
        started = time.monotonic()
        proc, out = retrain(filled, root)
        assert proc.returncode == 2, proc.stderr
        errors = error_lines(proc)
        assert len(errors) == 1 and "another retrain is running" in errors[0], proc.stderr
        assert out is None and read_current(root) == filled.tiny.version
        assert time.monotonic() - started < 60  # no training happened

    # With a lock timeout, the run waits for the holder and then does its work.
    lock.acquire()
    release = threading.Timer(3.0, lock.release)
    release.start()
    try:
        proc, out = retrain(
            filled, root,
            RECSTREAM_RETRAIN__LOCK_TIMEOUT_S="120", RECSTREAM_RETRAIN__QUALITY_MARGIN="1.0",
            RECSTREAM_TRAIN__EPOCHS="1",
        )  # fmt: skip
    finally:
        release.join()
    assert proc.returncode == 0, proc.stderr
    assert out is not None and out["switched"] and read_current(root) == out["version"]
