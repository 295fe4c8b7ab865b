"""Starting real ``recstream worker`` processes against the session's broker.

Shared by the integration tests: a tiny model published as real artifacts, a migrated
database, a worker subprocess, and kafka-python clients to feed and read it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from model.artifacts import read_manifest
from model.config import IndexConfig, TrainConfig
from model.data import build_sequence_data
from model.pipeline import train_and_publish
from model.sasrec import SASRec
from model.sequences import EVENT_TYPES, encoder_input, pad_left, type_codes
from recstream_tools.probe import free_port, wait_ready
from stream_worker.broker import ensure_topics
from stream_worker.cli import app
from stream_worker.errors import BrokerError
from stream_worker.events import event_value
from stream_worker.produce import generated_log

TINY = TrainConfig(
    max_len=20, dim=16, blocks=1, heads=1, dropout=0.0, epochs=4, lr=5e-3, batch_size=64,
    device="cpu",
)  # fmt: skip


@dataclass
class TinyModel:
    root: Path
    version: str
    model: SASRec
    item_ids: list[str]
    popularity: list[str]  # the manifest's fallback list

    def offline_top_k(
        self, sequence: list[str], k: int, types: list[str] | None = None
    ) -> list[str]:
        """The eager model's top-k for a sequence, seen items and padding removed (fewer
        when fewer unseen items are left); for a sequence with no item of the catalogue,
        the most popular unseen items, as the worker's documented fallback. A model
        trained with event types reads ``types`` (one per item)."""
        index = {item: i for i, item in enumerate(self.item_ids) if i}
        history, _ = encoder_input(sequence, index)
        if not history:
            return [item for item in self.popularity if item not in set(sequence)][:k]
        k = min(k, len(self.item_ids) - 1 - len(set(history)))
        if k <= 0:
            return []
        scores = self.offline_scores(sequence, types)
        scores[0] = -torch.inf
        scores[history] = -torch.inf
        return [self.item_ids[i] for i in torch.topk(scores, k).indices.tolist()]

    def offline_scores(self, sequence: list[str], types: list[str] | None = None) -> torch.Tensor:
        """The eager model's scores [N + 1] of every item after ``sequence`` (its items
        the model knows; with event types, ``types`` one per item)."""
        index = {item: i for i, item in enumerate(self.item_ids) if i}
        codes = None
        if self.model.event_types:
            assert types is not None and len(types) == len(sequence)
            codes = type_codes(types)
        _, tokens = encoder_input(sequence, index, codes)
        with torch.no_grad():
            return self.model.score_all(torch.from_numpy(pad_left([tokens], self.model.max_len)))[0]


# The same tiny model through the CLI's settings (`recstream train`, `build-index`).
TINY_ENV = {"RECSTREAM_TRAIN__MAX_LEN": "20", "RECSTREAM_TRAIN__DIM": "16",
            "RECSTREAM_TRAIN__BLOCKS": "1", "RECSTREAM_TRAIN__HEADS": "1",
            "RECSTREAM_TRAIN__DEVICE": "cpu", "RECSTREAM_INDEX__DEVICE": "cpu"}  # fmt: skip


def cli(*args: str) -> Any:
    """Run a ``recstream`` command in this process; its last stdout line, as JSON."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_event_type(user: str, position: int) -> str:
    """The event type the tiny typed model's data gives ``user``'s item at ``position``."""
    return EVENT_TYPES[(len(user) + position) % len(EVENT_TYPES)]


def publish_tiny_model(root: Path, seed: int = 0, event_types: bool = False) -> TinyModel:
    log = generated_log(users=60, items=40, length=25, seed=seed)
    types = None
    if event_types:
        types = {u: [tiny_event_type(u, n) for n in range(len(s))] for u, s in log.items()}
    data = build_sequence_data(log, event_types=types)
    cfg = TINY.model_copy(update={"seed": seed, "event_types": "on" if event_types else "off"})
    published = train_and_publish(
        data, {"source": "generated"}, root, cfg, IndexConfig(), progress=False
    )
    manifest = read_manifest(root / published.version)
    return TinyModel(
        root, published.version, published.result.model.eval(), data.item_ids,
        manifest["popularity"],
    )  # fmt: skip


@dataclass
class WorkerProcess:
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    topics: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 90) -> "WorkerProcess":
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_worker.cli", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        port = int(self.env["RECSTREAM_WORKER__WEB_PORT"])
        proc = self.proc
        try:
            wait_ready(port, lambda: proc.poll() is None, timeout)
        except BrokerError as exc:
            raise AssertionError(f"{exc}:\n{self.log()[-3000:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def new_topics(bootstrap: str, prefix: str = "", partitions: int = 2) -> dict[str, str]:
    """Fresh topics (2 partitions: worker_env's), created before anything is sent: the
    broker creates none on its own. ``prefix`` names the test in the broker's log."""
    run = uuid.uuid4().hex[:8]
    topics = {
        "events": f"{prefix}events-{run}",
        "recommendations": f"{prefix}recs-{run}",
        "dead_letter": f"{prefix}dlq-{run}",
    }
    ensure_topics(bootstrap, dict.fromkeys(topics.values(), partitions))
    return topics


def worker_env(
    bootstrap: str, db_url: str, root: Path, topics: dict[str, str], workdir: Path, **extra: str
) -> dict[str, str]:
    return {
        **os.environ,
        "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "RECSTREAM_DATABASE__URL": db_url,
        "RECSTREAM_ARTIFACTS__ROOT": str(root),
        "RECSTREAM_ARTIFACTS__POLL_INTERVAL_S": "0.5",
        "RECSTREAM_TOPICS__EVENTS": topics["events"],
        "RECSTREAM_TOPICS__RECOMMENDATIONS": topics["recommendations"],
        "RECSTREAM_TOPICS__DEAD_LETTER": topics["dead_letter"],
        "RECSTREAM_TOPICS__PARTITIONS": "2",
        "RECSTREAM_WORKER__GROUP_ID": topics["events"] + "-group",
        "RECSTREAM_WORKER__WEB_PORT": str(free_port()),
        "RECSTREAM_WORKER__DATA_DIR": str(workdir / "faust"),
        "RECSTREAM_WORKER__BATCH_MAX_WAIT_MS": "10",
        "RECSTREAM_WORKER__TOP_K": "5",
        **extra,
    }


def send(
    bootstrap: str, topic: str, events: Iterable[tuple[str, str, str]], ts: int | None = None
) -> list[str]:
    """Publish (event_id, user, item) views keyed by user; returns the ids in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    ids = []
    try:
        for event_id, user, item in events:
            value = event_value(event_id, user, item, "view", ts or int(time.time() * 1000))
            producer.send(topic, key=user.encode(), value=value)
            ids.append(event_id)
        producer.flush()
    finally:
        producer.close()
    return ids


def send_raw(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()


class Reader:
    """Reads a topic from the beginning, accumulating JSON values."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        self.values: list[dict[str, Any]] = []
        self.keys: list[bytes | None] = []

    def read_until(self, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while not done(self.values) and time.monotonic() < deadline:
            for records in self.consumer.poll(200).values():
                for rec in records:
                    self.values.append(json.loads(rec.value))
                    self.keys.append(rec.key)
        return self.values

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def latest_by_user(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        out[value["user_id"]] = value
    return out


def walk_events(
    prefix: str, users: int, length: int, items: int = 40
) -> Iterator[tuple[str, str, str]]:
    """Interleaved per-user walks over the catalogue, like the training data."""
    rng = np.random.default_rng(len(prefix))
    starts = rng.integers(0, items, size=users)
    for t in range(length):
        for u in range(users):
            yield f"{prefix}-{u}-{t}", f"{prefix}-user-{u}", f"item-{(starts[u] + t) % items}"


def applied_events(engine: Engine) -> int:
    """Events the worker has applied to state, from the database."""
    with engine.connect() as conn:
        total = conn.execute(text("select sum(event_count) from user_sequences")).scalar()
    return int(total or 0)


def wait_until_applied(engine: Engine, expected: int, timeout: float = 60) -> int:
    """Poll the state until ``expected`` events are applied (or time runs out)."""
    deadline = time.monotonic() + timeout
    total = applied_events(engine)
    while total != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        total = applied_events(engine)
    return total
