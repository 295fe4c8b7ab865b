"""The end-to-end benchmark harness against Apache Kafka, a real worker and SQLite."""

import os
from pathlib import Path

import pytest

from recstream_tools.bench.e2e import STAGES, Bench, LoadResult, Replay, publish_bench_model
from recstream_tools.kafka import KafkaCluster
from stream_worker.produce import generate_clicks

pytestmark = pytest.mark.integration

# Stages on the worker's one batch path, one after another (commits run beside them).
SEQUENTIAL = [s for s in STAGES if s != "commit"]


def busy_seconds(result: LoadResult) -> float:
    """Time the worker spent inside batches, from its own stage timings."""
    return result.batches * sum(result.stage_ms.get(s, 0.0) for s in SEQUENTIAL) / 1000


def test_every_event_is_answered_and_measured_against_the_bare_loop(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    clicks = generate_clicks(400, users=30, items=25, seed=5)
    replay = Replay(
        "generated",
        [c.user_id for c in clicks],
        [c.item_id for c in clicks],
        [c.event_type for c in clicks],
    )
    publish_bench_model(replay, tmp_path / "artifacts", max_len=20)
    bench = Bench(
        broker.bootstrap_servers, tmp_path, tmp_path / "artifacts", partitions=2,
        broker_pid=broker.pid,
    )  # fmt: skip

    bare = bench.run_bare(replay)
    assert bare.events == len(replay) and bare.events_per_s > 0

    result = bench.run_load(replay, rate=400)
    assert (result.events, result.answered) == (len(replay), len(replay))
    assert 200 < result.sent_per_s < 600  # paced at 400 events/s
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    # Published (record timestamp) before received, and after the event was sent.
    assert 0 < result.publish_p50_ms <= result.p50_ms
    assert result.publish_p99_ms <= result.p99_ms
    assert result.batches >= 1 and result.mean_batch >= 1
    assert {"decode", "db", "encode", "search", "publish"} <= set(result.stage_ms)
    # A worker process holds the model, torch and FAISS: hundreds of MiB, not a few.
    assert 100 < result.worker_peak_rss_mb < 4000
    # Every process did work during the replay, and none used more than the machine has.
    assert set(result.cpu_cores) == {"worker", "broker", "producer", "collector"}
    assert all(0 < cores <= (os.cpu_count() or 1) for cores in result.cpu_cores.values())
    # Paced: the rate is the offered one, over the replay's length (about a second).
    assert result.events_per_s < 600 and result.seconds >= 0.8


def test_the_unthrottled_rate_is_bounded_by_the_workers_own_batch_time(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    """Preloaded, the backlog is drained in a few batches and the collector may read
    the answers in one burst: the rate must still come from the worker's time, which
    cannot be shorter than the time it spent inside its batches."""
    clicks = generate_clicks(3000, users=400, items=40, seed=7)
    replay = Replay(
        "generated", [c.user_id for c in clicks], [c.item_id for c in clicks],
        [c.event_type for c in clicks],
    )  # fmt: skip
    publish_bench_model(replay, tmp_path / "artifacts", max_len=20)
    bench = Bench(broker.bootstrap_servers, tmp_path, tmp_path / "artifacts", partitions=2)
    result = bench.run_load(replay, rate=0)
    assert result.answered == len(replay)
    busy = busy_seconds(result)
    assert busy > 0
    assert result.seconds >= busy
    assert result.events_per_s <= result.answered / busy
    # Coalesced per user and batch: fewer outputs than events, each user at least once.
    assert len(set(replay.users)) <= result.outputs < result.answered
