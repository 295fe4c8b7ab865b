"""Apache Kafka against the clients the project uses: topics, keyed produce, group commit
and resume."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition as AioTopicPartition
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.serializer import DefaultSerializer

from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import answers_as
from stream_worker.broker import ensure_topics

pytestmark = pytest.mark.integration

TopicNames = Callable[[str], str]
Record = tuple[str, str, int, int]  # key, value, partition, offset

# Kafka's default minimum session timeout; a consumer that leaves is noticed in seconds.
GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def _produce(broker: KafkaCluster, topic: str, messages: list[tuple[str, str]]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers,
        # kafka-python 3 deprecates plain callables here: (de)serializers are objects.
        key_serializer=DefaultSerializer(),
        value_serializer=DefaultSerializer(),
        acks="all",
    )
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consumer(broker: KafkaCluster, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        key_deserializer=DefaultSerializer(),
        value_deserializer=DefaultSerializer(),
        **GROUP_TIMEOUTS,
    )


def _poll_until(consumer: KafkaConsumer, count: int, timeout_s: float = 60.0) -> list[Record]:
    """Poll until ``count`` records arrived (or the timeout passed); returns all received."""
    received: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            received.extend((r.key, r.value, r.partition, r.offset) for r in batch)
    return received


def test_ensure_topics_creates_requested_partitions(
    broker: KafkaCluster, topic_names: TopicNames
) -> None:
    wanted = {topic_names("events"): 4, topic_names("recs"): 1, topic_names("dlq"): 2}

    created = ensure_topics(broker.bootstrap_servers, wanted)

    assert created == list(wanted)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        described = {t["name"]: t for t in admin.describe_topics(list(wanted))}
    finally:
        admin.close()
    for name, partitions in wanted.items():
        assert described[name]["error_code"] == 0
        assert sorted(p["partition_index"] for p in described[name]["partitions"]) == list(
            range(partitions)
        )
    # A plain client sees the same through its own metadata request.
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        for name, partitions in wanted.items():
            assert consumer.partitions_for_topic(name) == set(range(partitions))
    finally:
        consumer.close()


def test_ensure_topics_is_idempotent(broker: KafkaCluster, topic_names: TopicNames) -> None:
    first, second = topic_names("a"), topic_names("b")

    assert ensure_topics(broker.bootstrap_servers, {first: 2}) == [first]
    assert ensure_topics(broker.bootstrap_servers, {first: 2, second: 3}) == [second]
    assert ensure_topics(broker.bootstrap_servers, {first: 2, second: 3}) == []
    assert ensure_topics(broker.bootstrap_servers, {}) == []


def test_ensure_topics_rejects_bad_counts(broker: KafkaCluster, topic_names: TopicNames) -> None:
    with pytest.raises(ValueError, match="partitions"):
        ensure_topics(broker.bootstrap_servers, {topic_names("zero"): 0})
    with pytest.raises(ValueError, match="replication_factor"):
        ensure_topics(broker.bootstrap_servers, {topic_names("x"): 1}, replication_factor=0)


def test_group_commits_and_second_consumer_resumes(
    broker: KafkaCluster, topic_names: TopicNames
) -> None:
    topic, group = topic_names("events"), topic_names("group")
    ensure_topics(broker.bootstrap_servers, {topic: 3})
    users = [f"user-{i}" for i in range(6)]
    first = [(users[i % 6], f"first-{i}") for i in range(30)]
    second = [(users[i % 6], f"second-{i}") for i in range(12)]

    _produce(broker, topic, first)
    consumer = _consumer(broker, topic, group)
    try:
        got_first = _poll_until(consumer, len(first))
        consumer.commit()
        committed = {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in range(3)}
    finally:
        consumer.close(autocommit=False)

    assert sorted(v for _, v, _, _ in got_first) == sorted(v for _, v in first)
    # Keyed: every user's events sit in one partition, in the order they were sent.
    partition_of: dict[str, set[int]] = {}
    for key, _, partition, _ in got_first:
        partition_of.setdefault(key, set()).add(partition)
    assert all(len(parts) == 1 for parts in partition_of.values())
    for user in users:
        values = [v for k, v, _, _ in sorted(got_first, key=lambda r: r[3]) if k == user]
        assert values == [v for k, v in first if k == user]
    # A fresh topic's offsets start at 0, so the committed offset is the count read.
    # (Not end_offsets(): tansu's ListOffsets "latest" is the last batch's base offset + 1.)
    assert committed == {p: sum(1 for r in got_first if r[2] == p) for p in range(3)}

    _produce(broker, topic, second)
    resumed = _consumer(broker, topic, group)
    try:
        got_second = _poll_until(resumed, len(second))
        extra = _poll_until(resumed, 1, timeout_s=2.0)
    finally:
        resumed.close(autocommit=False)

    # Only the new events: nothing at or before the committed offsets comes again.
    assert sorted(v for _, v, _, _ in got_second) == sorted(v for _, v in second)
    assert extra == []
    assert all(offset >= committed[partition] for _, _, partition, offset in got_second)


def test_aiokafka_producer_and_group_consumer(
    broker: KafkaCluster, topic_names: TopicNames
) -> None:
    topic, group = topic_names("events"), topic_names("group")
    ensure_topics(broker.bootstrap_servers, {topic: 4})
    sent = [(f"user-{i % 5}", f"event-{i}") for i in range(40)]

    async def roundtrip() -> tuple[list[tuple[str, str, int]], dict[int, Any]]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for key, value in sent:
                await producer.send(topic, key=key.encode(), value=value.encode())
            await producer.flush()
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **GROUP_TIMEOUTS,
        )
        await consumer.start()
        received: list[tuple[str, str, int]] = []
        try:
            async with asyncio.timeout(60):
                while len(received) < len(sent):
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        received.extend(
                            (r.key.decode(), r.value.decode(), r.partition)
                            for r in records
                            if r.key is not None and r.value is not None
                        )
            await consumer.commit()
            committed = {p: await consumer.committed(AioTopicPartition(topic, p)) for p in range(4)}
        finally:
            await consumer.stop()
        return received, committed

    received, committed = asyncio.run(roundtrip())

    assert sorted(v for _, v, _ in received) == sorted(v for _, v in sent)
    partition_of: dict[str, set[int]] = {}
    for key, _, partition in received:
        partition_of.setdefault(key, set()).add(partition)
    assert all(len(parts) == 1 for parts in partition_of.values())
    per_partition = {p: sum(1 for *_, q in received if q == p) for p in range(4)}
    assert {p: committed[p] or 0 for p in range(4)} == per_partition


def test_a_probe_of_a_silent_port_leaves_no_client_behind() -> None:
    # The port accepts connections and never answers, like a broker still starting:
    # kafka-python's admin client raises from its constructor with its I/O thread
    # running and its socket open, once per probe, unless they are closed for it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        assert not answers_as(f"127.0.0.1:{port}", "any-cluster", 0.3)
    assert [t.name for t in threading.enumerate() if t.name.startswith("kafka-io-")] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()
