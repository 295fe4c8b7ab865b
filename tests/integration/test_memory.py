"""The worker's memory bound, measured from outside (``/proc/<pid>/status``).

Beyond what start-up loads, a worker holds its encoder cache (``ENCODER_CACHE_MB``,
least recently active users dropped first), one batch's working memory and bounded
client caches; nothing it keeps grows with the number of users. After a first,
full-sized round of 10,000 users, 40,000 more must stay within the cache budget plus
a fixed warm-up slack, and 40,000 more again must cost (almost) nothing.

The backlog is kept to a few thousand events: the Kafka client prefetches whatever is
waiting (up to its fetch sizes), memory that grows with the backlog, not the users.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaProducer
from sqlalchemy.engine import Engine

from recstream_tools.kafka import KafkaCluster
from stream_worker.events import event_value
from stream_worker.store import make_engine, run_migrations
from tests.integration.reliability_harness import read_peak_rss_mb
from tests.integration.worker_harness import (
    WorkerProcess,
    applied_events,
    new_topics,
    publish_tiny_model,
    worker_env,
)

pytestmark = pytest.mark.integration

CACHE_MB = 4
# Warm-up over the first round's peak: SQLite's page caches filling as the file grows,
# allocator arenas, the cache filling (measured: 3-5 MiB over a 4 MiB cache).
SLACK_MB = 16
# After the warm-up, 40,000 more users: what a leak of 150 bytes per user would cost.
LEAK_MB = 6


CHUNK = 5_000  # events waiting at once: more than a batch, a bounded backlog


def send_users(
    bootstrap: str, topic: str, engine: Engine, first: int, users: int, timeout: float = 120
) -> None:
    """One event for each of ``users`` new users, in chunks of CHUNK; each chunk is
    applied before the next is sent, so the consumer's prefetch holds at most a chunk
    (a backlog of any size would be buffered by the client, not held per user)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    try:
        for start in range(first, first + users, CHUNK):
            now = int(time.time() * 1000)
            for n in range(start, start + CHUNK):
                value = event_value(f"e{n}", f"user-{n}", f"item-{n % 40}", "view", now)
                producer.send(topic, key=f"user-{n}".encode(), value=value)
            producer.flush()
            deadline = time.monotonic() + timeout
            while applied_events(engine) < start + CHUNK and time.monotonic() < deadline:
                time.sleep(0.2)
            assert applied_events(engine) == start + CHUNK
    finally:
        producer.close()


def test_the_workers_memory_does_not_grow_with_its_users(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    tiny = publish_tiny_model(tmp_path / "artifacts")
    topics = new_topics(broker.bootstrap_servers, "mem-")
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
        # so the peak already holds a batch's working memory and a full encoder cache.
        send_users(broker.bootstrap_servers, topics["events"], engine, 0, 10_000)
        first_peak = read_peak_rss_mb(worker.proc.pid)
        send_users(broker.bootstrap_servers, topics["events"], engine, 10_000, 40_000)
        second_peak = read_peak_rss_mb(worker.proc.pid)
        send_users(broker.bootstrap_servers, topics["events"], engine, 50_000, 40_000)
        third_peak = read_peak_rss_mb(worker.proc.pid)
    finally:
        engine.dispose()
        code = worker.stop()
    assert code == 0
    peaks = (first_peak, second_peak, third_peak)
    assert first_peak > 100, peaks  # the model, torch and FAISS are loaded: a real figure
    assert second_peak - first_peak <= CACHE_MB + SLACK_MB, peaks
    assert third_peak - second_peak <= LEAK_MB, peaks
