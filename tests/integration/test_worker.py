"""The worker end to end: real broker, real SQLite/PostgreSQL, real artifacts."""

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.artifacts import rebuild_index
from model.config import IndexConfig
from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import page
from stream_worker.store import load_sequences, make_engine, run_migrations
from tests.integration.worker_harness import (
    Reader,
    TinyModel,
    WorkerProcess,
    applied_events,
    latest_by_user,
    new_topics,
    publish_tiny_model,
    send,
    send_raw,
    wait_until_applied,
    walk_events,
    worker_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def worker(
    request: pytest.FixtureRequest,
    broker: KafkaCluster,
    tiny: TinyModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    workdir = tmp_path_factory.mktemp("worker")
    if request.param == "sqlite":
        db_url = f"sqlite:///{workdir / 'state.db'}"
    else:
        db_url = request.getfixturevalue("pg_url")
    run_migrations(db_url)
    topics = new_topics(broker.bootstrap_servers)
    env = worker_env(broker.bootstrap_servers, db_url, tiny.root, topics, workdir)
    proc = WorkerProcess(env, workdir / "worker.log", topics=topics | {"db": db_url}).start()
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]


def test_recommendations_follow_the_contract_and_the_offline_model(
    worker: WorkerProcess, broker: KafkaCluster, tiny: TinyModel
) -> None:
    bootstrap, topics = broker.bootstrap_servers, worker.topics
    events = list(walk_events("flow", users=6, length=5))
    send(bootstrap, topics["events"], events)
    last_event = {user: event_id for event_id, user, _ in events}
    with Reader(bootstrap, topics["recommendations"]) as reader:
        values = reader.read_until(
            lambda vs: {v["source_event_id"] for v in vs} >= set(last_event.values())
        )
    latest = latest_by_user([v for v in values if v["user_id"].startswith("flow-")])
    assert set(latest) == set(last_event)
    engine = make_engine(topics["db"])
    stored = load_sequences(engine, list(latest))
    for user, rec in latest.items():
        assert rec["source_event_id"] == last_event[user]
        assert rec["model_version"] == tiny.version and rec["index_version"] == tiny.version
        assert rec["produced_ts"] >= rec["event_ts"]
        sequence = [item for _, u, item in events if u == user]
        assert stored[user] == sequence
        items = [i["item_id"] for i in rec["items"]]
        assert len(items) == 5 and not set(items) & set(sequence)
        scores = [i["score"] for i in rec["items"]]
        assert scores == sorted(scores, reverse=True)
        # Online equals offline: the eager model ranks the same items for this sequence.
        assert items == tiny.offline_top_k(sequence, 5)


def test_every_kind_of_bad_input_is_dead_lettered_and_the_worker_keeps_serving(
    worker: WorkerProcess, broker: KafkaCluster
) -> None:
    bootstrap, topics = broker.bootstrap_servers, worker.topics
    now = int(time.time() * 1000)

    def event(**overrides: object) -> bytes:
        base = {"event_id": "e", "user_id": "bad-u", "item_id": "item-1", "event_type": "view"}
        return json.dumps({**base, "ts": now, **overrides}).encode()

    cases = {
        "not_json": b"{not json",
        "invalid_utf8": b'{"event_id": "\xff\xfe"}',
        "missing_field": json.dumps({"event_id": "e", "user_id": "bad-u"}).encode(),
        "wrong_type": event(ts="yesterday"),
        "unknown_event_type": event(event_type="teleport"),
        "id_too_long": event(item_id="x" * 1000),
        "ts_out_of_window": event(ts=now + 10 * 24 * 3600 * 1000),
        "not_object": b"[1, 2, 3]",
    }
    send_raw(bootstrap, topics["events"], [(b"bad-u", raw) for raw in cases.values()])
    send(bootstrap, topics["events"], [("after-bad", "good-after-bad", "item-3")])
    with Reader(bootstrap, topics["dead_letter"]) as dlq:
        letters = dlq.read_until(lambda vs: len(vs) >= len(cases))
    assert sorted(v["reason"] for v in letters) == sorted(cases)
    by_reason = {v["reason"]: v for v in letters}
    for reason, raw in cases.items():
        letter = by_reason[reason]
        assert base64.b64decode(letter["original_b64"]) == raw
        assert letter["topic"] == topics["events"]
        assert letter["detail"]
        assert isinstance(letter["partition"], int) and isinstance(letter["offset"], int)
    with Reader(bootstrap, topics["recommendations"]) as reader:
        values = reader.read_until(lambda vs: any(v["source_event_id"] == "after-bad" for v in vs))
    assert any(v["source_event_id"] == "after-bad" for v in values)
    metrics = (
        urllib.request.urlopen(
            f"http://127.0.0.1:{worker.env['RECSTREAM_WORKER__WEB_PORT']}/metrics", timeout=5
        )
        .read()
        .decode()
    )
    assert 'recstream_dead_letters_total{reason="not_json"} 1.0' in metrics
    assert "recstream_stage_ms_bucket" in metrics


def test_probes_and_metrics_report_versions_lag_and_the_process(
    worker: WorkerProcess, tiny: TinyModel
) -> None:
    port = int(worker.env["RECSTREAM_WORKER__WEB_PORT"])
    code, ready = page(port, "/ready")
    assert code == 200 and ready["status"] == "ready"
    assert ready["model_version"] == tiny.version
    code, live = page(port, "/live")
    assert code == 200 and live["status"] == "live"
    _, metrics = page(port, "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    # Lag per assigned partition (the worker_env topics have 2), caught up by now.
    lags = {dict(labels)["partition"]: v for (n, labels), v in samples.items()
            if n == "recstream_consumer_lag"}  # fmt: skip
    assert set(lags) == {"0", "1"} and all(v >= 0 for v in lags.values())
    info = [dict(labels) for (n, labels) in samples if n == "recstream_serving_info"]
    assert info == [{"model_version": tiny.version, "index_version": tiny.version}]
    age = samples[("recstream_serving_version_age_seconds", ())]
    assert 0 <= age < 24 * 3600  # published by this test session
    assert samples[("recstream_ready", ())] == 1.0
    # The standard process and platform collectors.
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names


def test_worker_refuses_an_unmigrated_database(
    broker: KafkaCluster, tiny: TinyModel, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    db_url = f"sqlite:///{tmp_path / 'empty.db'}"
    env = worker_env(bootstrap, db_url, tiny.root, new_topics(bootstrap), tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "recstream migrate" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_redelivered_offsets_are_not_applied_twice(
    broker: KafkaCluster, tiny: TinyModel, tmp_path: Path
) -> None:
    """Commit nothing in Kafka (a new group each start), so the restarted worker
    re-reads every event; state must come out the same."""
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    topics = new_topics(broker.bootstrap_servers)
    bootstrap = broker.bootstrap_servers
    events = list(walk_events("redeliver", users=4, length=6))
    send(bootstrap, topics["events"], events)
    engine = make_engine(db_url)
    users = sorted({u for _, u, _ in events})

    def run_once(group: str) -> dict[str, list[str]]:
        env = worker_env(
            bootstrap, db_url, tiny.root, topics, tmp_path, RECSTREAM_WORKER__GROUP_ID=group
        )
        proc = WorkerProcess(env, tmp_path / f"{group}.log").start()
        with Reader(bootstrap, topics["recommendations"]) as reader:
            reader.read_until(lambda vs: len(latest_by_user(vs)) >= len(users))
        assert wait_until_applied(engine, len(events), timeout=30) == len(events)
        assert proc.stop() == 0
        return load_sequences(engine, users)

    first = run_once("first")
    second = run_once("second")
    assert first == second
    for user in users:
        assert first[user] == [item for _, u, item in events if u == user]
    assert applied_events(engine) == len(events)


def test_a_database_behind_the_committed_offsets_is_caught_up_from_kafka(
    broker: KafkaCluster, tiny: TinyModel, tmp_path: Path
) -> None:
    """A state database restored to an older copy (or SQLite losing its newest commits
    in a power cut) is behind the group's committed offsets: the worker re-reads from
    the database's own positions, so those events are applied, exactly once."""
    db_path = tmp_path / "state.db"
    db_url = f"sqlite:///{db_path}"
    run_migrations(db_url)
    topics = new_topics(broker.bootstrap_servers)
    bootstrap = broker.bootstrap_servers
    env = worker_env(bootstrap, db_url, tiny.root, topics, tmp_path)
    engine = make_engine(db_url)
    first = list(walk_events("behind-a", users=3, length=4))
    second = list(walk_events("behind-b", users=3, length=5))

    def run(events: list[tuple[str, str, str]], expected: int, name: str) -> None:
        proc = WorkerProcess(env, tmp_path / f"{name}.log").start()
        if events:
            send(bootstrap, topics["events"], events)
        assert wait_until_applied(engine, expected, timeout=60) == expected
        assert proc.stop() == 0  # commits the offsets on the way out

    run(first, len(first), "first")
    engine.dispose()
    shutil.copy(db_path, tmp_path / "older.db")
    run(second, len(first) + len(second), "second")
    engine.dispose()
    shutil.copy(tmp_path / "older.db", db_path)  # the database loses the second run
    run([], len(first) + len(second), "third")
    assert "behind the committed" in (tmp_path / "third.log").read_text()
    users = sorted({u for _, u, _ in first + second})
    state = load_sequences(engine, users)
    for user in users:
        assert state[user] == [item for _, u, item in first + second if u == user]


def test_swap_under_steady_traffic_loses_no_event_and_refuses_broken_versions(
    broker: KafkaCluster, tmp_path: Path
) -> None:
    tiny = publish_tiny_model(tmp_path / "artifacts", seed=1)
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    topics = new_topics(broker.bootstrap_servers)
    bootstrap = broker.bootstrap_servers
    env = worker_env(
        bootstrap, db_url, tiny.root, topics, tmp_path, RECSTREAM_WORKER__EMIT_PER_EVENT="true"
    )
    proc = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        events = list(walk_events("swap", users=5, length=40))
        first_half, second_half = events[:100], events[100:]
        sent = []
        for event in first_half:
            sent += send(bootstrap, topics["events"], [event])
        new_version = rebuild_index(tiny.root, tiny.version, IndexConfig(factory="HNSW8"))
        for i, event in enumerate(second_half):
            sent += send(bootstrap, topics["events"], [event])
            if i == 50:
                # A broken version: CURRENT points at it, the worker must refuse it.
                broken = rebuild_index(tiny.root, new_version, IndexConfig(), switch=False)
                (tiny.root / broken / "item_embeddings.npy").write_bytes(b"garbage")
                (tiny.root / "CURRENT").write_text(broken + "\n")
            time.sleep(0.01)
        with Reader(bootstrap, topics["recommendations"]) as reader:
            values = reader.read_until(lambda vs: {v["source_event_id"] for v in vs} >= set(sent))
        produced_for = {v["source_event_id"] for v in values}
        assert set(sent) <= produced_for, f"lost {len(set(sent) - produced_for)} events"
        versions = {v["index_version"] for v in values}
        assert versions == {tiny.version, new_version}
        # After the broken version was named, the last good one kept serving.
        assert values[-1]["index_version"] == new_version
        assert "refusing version " + broken in proc.log()
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
