"""Hostile input through a running worker on Apache Kafka: hypothesis makes the keys and
values (random bytes, near-miss events, deep JSON, valid events with odd ids, missing
values), a producer sends them, and each record must come out exactly one way: applied
to its user's state, or dead-lettered with a reason and its source position, never
both, never neither. The worker must keep going after every example.

One partition keeps the order total: after each example a sentinel event is sent, and
once its recommendation is out, every earlier record has been handled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from recstream_tools.kafka import KafkaCluster
from stream_worker.events import EVENT_TYPES, Reason, event_value
from stream_worker.store import make_engine, run_migrations
from tests.integration.reliability_harness import stored_state
from tests.integration.worker_harness import (
    TinyModel,
    WorkerProcess,
    new_topics,
    publish_tiny_model,
    worker_env,
)

pytestmark = pytest.mark.integration

REASONS = {reason.value for reason in Reason}


@dataclass
class Running:
    proc: WorkerProcess
    producer: KafkaProducer
    letters: KafkaConsumer
    recs: KafkaConsumer
    topics: dict[str, str]
    admin: KafkaAdminClient
    engine: Any
    seen_letters: dict[int, dict[str, Any]]  # source offset -> dead letter

    def read_letters_to_end(self) -> None:
        tp = TopicPartition(self.topics["dead_letter"], 0)
        end = self.letters.end_offsets([tp])[tp]
        while self.letters.position(tp) < end:
            for batch in self.letters.poll(100).values():
                for rec in batch:
                    letter = json.loads(rec.value)
                    assert letter["offset"] not in self.seen_letters, letter  # one per record
                    self.seen_letters[letter["offset"]] = letter

    def wait_committed(self, offset: int, timeout: float = 30) -> None:
        group = self.proc.env["RECSTREAM_WORKER__GROUP_ID"]
        tp = TopicPartition(self.topics["events"], 0)
        deadline = time.monotonic() + timeout
        while True:
            committed = self.admin.list_group_offsets({group: None}).get(group, {}).get(tp)
            if committed is not None and committed.offset >= offset:
                return
            assert time.monotonic() < deadline, f"offset {offset} not committed in {timeout}s"
            time.sleep(0.05)

    def wait_for_answer(self, event_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.proc is not None and self.proc.proc.poll() is None, (
                f"the worker stopped:\n{self.proc.log()[-3000:]}"
            )
            for batch in self.recs.poll(100).values():
                if any(json.loads(r.value)["source_event_id"] == event_id for r in batch):
                    return
        raise AssertionError(f"no recommendation for {event_id} in {timeout}s")


def _reader(bootstrap: str, topic: str) -> KafkaConsumer:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    return consumer


@pytest.fixture(scope="module")
def running(broker: KafkaCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    where = tmp_path_factory.mktemp("hostile")
    tiny: TinyModel = publish_tiny_model(where / "artifacts")
    bootstrap = broker.bootstrap_servers
    topics = new_topics(bootstrap, "hostile-", partitions=1)
    db_url = f"sqlite:///{where / 'state.db'}"
    run_migrations(db_url)
    env = worker_env(bootstrap, db_url, tiny.root, topics, where, RECSTREAM_TOPICS__PARTITIONS="1")
    proc = WorkerProcess(env, where / "worker.log").start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    state = Running(
        proc, producer, _reader(bootstrap, topics["dead_letter"]),
        _reader(bootstrap, topics["recommendations"]), topics,
        KafkaAdminClient(bootstrap_servers=bootstrap), make_engine(db_url), {},
    )  # fmt: skip
    try:
        yield state
    finally:
        for client in (producer, state.letters, state.recs, state.admin):
            client.close()
        state.engine.dispose()
        code = proc.stop()
        assert code == 0, proc.log()[-3000:]


# --------------------------------------------------------------------------- strategies

IDS = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(max_size=3),  # empty ids too
    st.text(min_size=120, max_size=140),  # around the 128-character limit
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
TS = st.one_of(
    st.sampled_from(["now", "an hour ago", "two years ago", "an hour ahead"]),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def near_event(draw: st.DrawFn) -> dict[str, Any]:
    """An event some of whose fields may be missing, mistyped or out of range."""
    doc: dict[str, Any] = {
        "event_id": draw(IDS),
        "user_id": draw(IDS),
        "item_id": draw(st.one_of(st.sampled_from([f"item-{i}" for i in range(45)]), IDS)),
        "event_type": draw(st.one_of(st.sampled_from(EVENT_TYPES), st.text(max_size=10))),
        "ts": draw(TS),
    }
    for name in draw(st.sets(st.sampled_from(sorted(doc)), max_size=2)):
        del doc[name]
    doc.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))
    return doc


@st.composite
def valid_event(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "event_id": draw(st.text(min_size=1, max_size=20)),
        "user_id": draw(st.text(min_size=1, max_size=30)),
        "item_id": draw(st.sampled_from([f"item-{i}" for i in range(40)])),
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "ts": "now",
    }


@dataclass(frozen=True)
class Nested:
    """``depth`` nested JSON arrays (kept as a number, so failing examples print short)."""

    depth: int


# (key spec, value spec): "user" as key means the value's user id.
RECORDS = st.tuples(
    st.one_of(st.just("user"), st.none(), st.binary(max_size=40)),
    st.one_of(
        valid_event(),
        near_event(),
        st.binary(max_size=300),
        JSON_VALUES,
        st.none(),
        st.builds(Nested, st.integers(1, 120_000)),
    ),
)


def encode(key_spec: Any, value_spec: Any, now_ms: int) -> tuple[bytes | None, bytes | None]:
    shifts = {"now": 0, "an hour ago": -3_600_000, "two years ago": -2 * 365 * 86_400_000,
              "an hour ahead": 3_600_000}  # fmt: skip
    if isinstance(value_spec, dict) and value_spec.get("ts") in shifts:
        value_spec = {**value_spec, "ts": now_ms + shifts[value_spec["ts"]]}
    if isinstance(value_spec, Nested):
        value = b"[" * value_spec.depth + b"]" * value_spec.depth
    elif value_spec is None or isinstance(value_spec, bytes):
        value = value_spec
    else:
        value = json.dumps(value_spec, allow_nan=True).encode("utf-8", "surrogatepass")
    if key_spec == "user":
        user = value_spec.get("user_id") if isinstance(value_spec, dict) else None
        key = user.encode("utf-8", "surrogatepass") if isinstance(user, str) else b"no-user"
    else:
        key = key_spec
    if key is None and value is None:  # a record needs one of them
        key = b"tombstone"
    return key, value


# ------------------------------------------------------------------------------- test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(RECORDS, min_size=1, max_size=4))
def test_every_hostile_record_is_applied_or_dead_lettered_and_the_worker_keeps_going(
    running: Running, records: list[tuple[Any, Any]]
) -> None:
    before = stored_state(running.engine)
    now = int(time.time() * 1000)
    sent: list[tuple[int, bytes | None, bytes | None]] = []
    for key_spec, value_spec in records:
        key, value = encode(key_spec, value_spec, now)
        meta = running.producer.send(running.topics["events"], key=key, value=value).get(30)
        sent.append((meta.offset, key, value))
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    value = event_value(sentinel, sentinel, "item-1", "view", int(time.time() * 1000))
    meta = running.producer.send(running.topics["events"], key=sentinel.encode(), value=value)
    sentinel_offset = meta.get(30).offset
    running.wait_for_answer(sentinel)
    # Offsets are committed only once every output of the batches below them is
    # acknowledged: once the sentinel is committed, the letters topic is complete.
    running.wait_committed(sentinel_offset + 1)
    running.read_letters_to_end()

    after = stored_state(running.engine)
    applied: dict[str, list[str]] = {}  # user -> items of the records not dead-lettered
    for offset, key, raw in sent:
        letter = running.seen_letters.get(offset)
        if letter is not None:
            assert letter["reason"] in REASONS and letter["detail"], letter
            assert letter["partition"] == 0
            continue
        # Not dead-lettered: it must be a valid event, applied to its user.
        assert raw is not None, f"offset {offset}: a tombstone was neither applied nor lettered"
        event = json.loads(raw)
        assert isinstance(event, dict) and isinstance(event["user_id"], str), (offset, raw)
        assert key is None or key == event["user_id"].encode(), (offset, key, raw)
        applied.setdefault(event["user_id"], []).append(event["item_id"])
    for user, items in applied.items():
        _, old_count = before.get(user, ([], 0))
        new_items, new_count = after[user]
        assert new_count == old_count + len(items), (user, items)
        assert new_items[-len(items) :] == items, (user, items, new_items)
    assert after[sentinel] == (["item-1"], 1)
    # Users of dead-lettered records only: untouched.
    for user in after.keys() - applied.keys() - {sentinel}:
        assert after[user] == before.get(user), user
