"""The worker's memory bound, measured from outside (``/proc/<pid>/status``).

Beyond what start-up loads, a worker holds its encoder cache (``ENCODER_CACHE_MB``,
least recently active users dropped first) and one batch's working memory; nothing it
keeps grows with the number of users. Ten times more distinct users than a first,
full-sized round must leave the peak RSS within the cache budget plus a fixed slack.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaProducer

from recstream_tools.kafka import KafkaCluster
from stream_worker.broker import ensure_topics
from stream_worker.events import event_value
from stream_worker.store import make_engine, run_migrations
from tests.integration.reliability_harness import read_peak_rss_mb
from tests.integration.worker_harness import (
    WorkerProcess,
    applied_events,
    publish_tiny_model,
    worker_env,
)

pytestmark = pytest.mark.integration

CACHE_MB = 4
# Allocator and fragmentation headroom over the cache budget; a per-user leak of a few
# hundred bytes would pass it with the 45,000 extra users.
SLACK_MB = 24


def send_users(bootstrap: str, topic: str, prefix: str, users: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    try:
        now = int(time.time() * 1000)
        for n in range(users):
            user = f"{prefix}-{n}"
            value = event_value(f"{prefix}-e{n}", user, f"item-{n % 40}", "view", now)
            producer.send(topic, key=user.encode(), value=value)
        producer.flush()
    finally:
        producer.close()


def test_the_workers_memory_does_not_grow_with_its_users(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    tiny = publish_tiny_model(tmp_path / "artifacts")
    run = uuid.uuid4().hex[:8]
    topics = {"events": f"mem-events-{run}", "recommendations": f"mem-recs-{run}",
              "dead_letter": f"mem-dlq-{run}"}  # fmt: skip
    ensure_topics(broker.bootstrap_servers, dict.fromkeys(topics.values(), 2))
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = worker_env(
        broker.bootstrap_servers, db_url, tiny.root, topics, tmp_path,
        RECSTREAM_WORKER__ENCODER_CACHE_MB=str(CACHE_MB),
    )  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    engine = make_engine(db_url)
    assert worker.proc is not None
    try:
        # First round: full-sized batches (more than WORKER__BATCH_SIZE events waiting),
        # so the peak already holds a batch's working memory.
        send_users(broker.bootstrap_servers, topics["events"], "first", 5_000)
        deadline = time.monotonic() + 120
        while applied_events(engine) < 5_000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert applied_events(engine) == 5_000
        first_peak = read_peak_rss_mb(worker.proc.pid)
        send_users(broker.bootstrap_servers, topics["events"], "second", 45_000)
        deadline = time.monotonic() + 300
        while applied_events(engine) < 50_000 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert applied_events(engine) == 50_000
        second_peak = read_peak_rss_mb(worker.proc.pid)
    finally:
        engine.dispose()
        code = worker.stop()
    assert code == 0
    assert first_peak > 100  # the model, torch and FAISS are loaded: a real figure
    growth = second_peak - first_peak
    assert growth <= CACHE_MB + SLACK_MB, (first_peak, second_peak)
