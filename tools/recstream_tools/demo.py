"""``recstream demo``: the whole loop on one machine, on embedded defaults.

A local Kafka-compatible broker, a fresh SQLite file, a small model (trained here on
generated sessions unless artifacts are given), one worker process, a producer
replaying clicks, and a consumer printing recommendations as they stream out.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from model.config import IndexConfig, TrainConfig
from model.data import build_sequence_data, load_interactions
from model.errors import ConfigError
from model.pipeline import load_training_data, train_and_publish
from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import HOST, free_port, wait_ready
from recstream_tools.process import stop_process
from recstream_tools.report import Recorder, plot_online
from recstream_tools.tansu import LocalBroker
from stream_worker.errors import BrokerError, WorkerError
from stream_worker.produce import (
    PlannedEvent,
    generate_clicks,
    generated_log,
    plan_replay,
    send_events,
)
from stream_worker.settings import Settings
from stream_worker.store import run_migrations

logger = logging.getLogger(__name__)

MALFORMED = [b"not json at all", b'{"event_id": "x", "user_id": 7}', b"\xff\xfe\xfa"]


@dataclass
class DemoStats:
    recommendations: int = 0
    dead_letters: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    online: dict[str, float] = field(default_factory=dict)  # online HR@10 per version


def _train_demo_model(root: Path, data: Path | None, epochs: int) -> None:
    cfg = TrainConfig(max_len=50, dim=32, blocks=1, heads=1, dropout=0.1, epochs=epochs, lr=5e-3)
    if data is not None:
        sequences, info = load_training_data(data)
    else:
        sequences = build_sequence_data(generated_log())
        info = {"source": "generated walks", "format": "generated"}
    print(f"training a small SASRec on {info['source']} ({epochs} epochs)...", flush=True)
    published = train_and_publish(sequences, info, root, cfg, IndexConfig(), progress=False)
    print(
        f"published {published.version}: test HR@10 {published.result.test['hr@10']:.3f} "
        f"(popularity {published.result.popularity_test['hr@10']:.3f})",
        flush=True,
    )


def _consume(
    bootstrap: str, topics: list[str], stats: DemoStats, stop: threading.Event, show: int
) -> None:
    consumer = KafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    try:
        while not stop.is_set():
            for tp, records in consumer.poll(200).items():
                for rec in records:
                    payload = json.loads(rec.value)
                    if tp.topic == topics[1]:
                        stats.dead_letters += 1
                        where = f"offset {payload['offset']}"
                        reason = f"{payload['reason']} ({payload['detail']})"
                        print(f"  dead letter at {where}: {reason}", flush=True)
                        continue
                    stats.recommendations += 1
                    stats.users.add(payload["user_id"])
                    stats.latencies_ms.append(payload["produced_ts"] - payload["event_ts"])
                    if stats.recommendations <= show or stats.recommendations % 500 == 0:
                        items = ", ".join(i["item_id"] for i in payload["items"][:5])
                        print(
                            f"  {payload['user_id']:>10} -> {items}  "
                            f"({payload['produced_ts'] - payload['event_ts']} ms)",
                            flush=True,
                        )
    finally:
        consumer.close()


def run_demo(
    settings: Settings,
    *,
    workdir: Path,
    artifacts: Path | None,
    data: Path | None,
    events: int,
    rate: float,
    epochs: int,
    show: int,
    broker: str = "tansu",
) -> DemoStats:
    """The whole loop on ``broker``: ``tansu`` (embedded, no JVM: the default) or
    ``kafka`` (a one-node Apache Kafka, as the tests and benchmarks run)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    root = artifacts or workdir / "artifacts"
    if artifacts is None:
        _train_demo_model(root, data, epochs)
    stats = DemoStats()
    stop = threading.Event()
    with local_worker(workdir, root, broker) as run:
        topics = settings.topics
        consumer = threading.Thread(
            target=_consume,
            args=(
                run.bootstrap,
                [topics.recommendations, topics.dead_letter],
                stats,
                stop,
                show,
            ),
            daemon=True,
        )
        try:
            consumer.start()
            plan: list[PlannedEvent] = (
                plan_replay(load_interactions(data), limit=events)
                if data
                else generate_clicks(events)
            )
            producer = KafkaProducer(bootstrap_servers=run.bootstrap, linger_ms=5)
            started = time.monotonic()
            print(f"replaying {len(plan)} clicks at {rate or 'max'} events/s...", flush=True)
            # The worker's online HR@10, scraped every half second while it runs.
            with Recorder(f"http://{HOST}:{run.port}/metrics", 0.5) as recorder:
                sent = send_events(producer, topics.events, plan, rate=rate, progress=False)
                for bad in MALFORMED:
                    producer.send(topics.events, value=bad)
                producer.flush()
                producer.close()
                deadline = time.monotonic() + 60
                expected_users = len({p.user_id for p in plan})
                while time.monotonic() < deadline and (
                    len(stats.users) < expected_users or stats.dead_letters < len(MALFORMED)
                ):
                    time.sleep(0.2)
                elapsed = time.monotonic() - started
            stats.online = recorder.samples[-1].hr() if recorder.samples else {}
            _print_summary(sent, elapsed, stats)
            plot = workdir / "online_hr10.png"
            if plot_online(recorder.samples, plot, "recstream demo: online HR@10"):
                print(f"online HR@10 over time: {plot}", flush=True)
        finally:
            stop.set()
            if consumer.is_alive():
                consumer.join(timeout=5)
    return stats


@dataclass
class LocalRun:
    bootstrap: str
    port: int  # the worker's /live, /ready and /metrics
    worker: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def local_worker(
    workdir: Path,
    artifacts: Path | str,
    broker: str = "tansu",
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalRun]:
    """A broker (``tansu`` or ``kafka``), a fresh SQLite file and one ``recstream worker``
    serving ``artifacts``, ready (its /ready answered 200); all stopped on exit."""
    if broker not in ("tansu", "kafka"):
        raise ConfigError(f"--broker must be tansu or kafka, not {broker!r}")
    db_url = f"sqlite:///{workdir / 'recstream.db'}"
    run_migrations(db_url)
    running = LocalBroker(log_dir=workdir) if broker == "tansu" else KafkaCluster(workdir / "kafka")
    with running as up:
        bootstrap = up.bootstrap_servers
        print(f"{broker} broker up at {bootstrap}; starting a worker...", flush=True)
        env = {
            **os.environ,
            "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RECSTREAM_DATABASE__URL": db_url,
            "RECSTREAM_ARTIFACTS__ROOT": str(artifacts),
            "RECSTREAM_WORKER__WEB_PORT": str(port := free_port()),
            "RECSTREAM_WORKER__DATA_DIR": str(workdir / "worker"),
            # tansu has no InitProducerId: the worker's producer cannot be idempotent.
            "RECSTREAM_WORKER__IDEMPOTENT_PRODUCER": str(broker == "kafka").lower(),
            **(extra_env or {}),
        }
        log = workdir / "worker.log"
        with log.open("w") as worker_log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "stream_worker.cli", "worker"],
                env=env,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_worker(worker, port, log)
            yield LocalRun(bootstrap, port, worker, log)
        finally:
            stop_process(worker, 30)


def _wait_for_worker(
    worker: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 120
) -> None:
    """Until the worker's /ready answers 200 (in its group, database up, model loaded)."""
    try:
        wait_ready(port, lambda: worker.poll() is None, timeout)
    except BrokerError as exc:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise WorkerError(f"{exc}; the end of {log_path}:\n{tail}") from None


def _print_summary(sent: int, elapsed: float, stats: DemoStats) -> None:
    lat = np.array(stats.latencies_ms or [0.0])
    print(
        "\nsummary: "
        f"{sent} events in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):.0f} events/s), "
        f"{stats.recommendations} recommendations for {len(stats.users)} users, "
        f"latency p50 {np.percentile(lat, 50):.0f} ms / p99 {np.percentile(lat, 99):.0f} ms, "
        f"{stats.dead_letters} dead letters",
        flush=True,
    )
    for version, hr in sorted(stats.online.items()):
        print(f"online HR@10 of {version}: {hr:.3f} (each user's next click vs its last list)")
    if not stats.online:
        # One batch took every click (e.g. --rate 0 on tansu): no user clicked again
        # after receiving a list, so there is nothing to score yet.
        print("online HR@10: not measured (no user clicked again after receiving a list)")
