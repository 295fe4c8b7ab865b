"""The end-to-end benchmark harness against the real broker, worker and SQLite."""

import os
from pathlib import Path

import pytest

from recstream_tools.bench.e2e import Bench, Replay, publish_bench_model
from recstream_tools.kafka import KafkaCluster
from stream_worker.produce import generate_clicks

pytestmark = pytest.mark.integration


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
        broker_pid=broker.pids[0],
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
    assert result.worker_peak_rss_mb > 0
    # Every process did work during the replay, and none used more than the machine has.
    assert set(result.cpu_cores) == {"worker", "broker", "producer", "collector"}
    assert all(0 < cores <= (os.cpu_count() or 1) for cores in result.cpu_cores.values())
