"""Shared fixtures: Apache Kafka (one node per test session, three for failover tests),
unique topic names."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from recstream_tools.kafka import KafkaCluster
from recstream_tools.s3 import SeaweedS3
from stream_worker.kafka_config import CLIENT_LOGGERS


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A one-node Apache Kafka cluster (KRaft) on 127.0.0.1, shared by the session.

    Its data and logs are in the session's temporary directory, under ``kafka/``. Tests
    share it, so each test uses its own topics (see ``topic_names``) and consumer groups.
    """
    with KafkaCluster(tmp_path_factory.mktemp("kafka"), nodes=1) as started:
        yield started


@pytest.fixture(scope="session")
def kafka3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A three-node Apache Kafka cluster for failover tests: topics default to
    replication factor 3 with ``min.insync.replicas`` 2. Started on first use."""
    with KafkaCluster(tmp_path_factory.mktemp("kafka3"), nodes=3) as started:
        yield started


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 gateway on 127.0.0.1 for the session; tests take buckets of their
    own (``s3.new_bucket()``)."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as started:
        yield started


@pytest.fixture
def topic_names(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of topic (or group) names unique to this test: ``topic_names("events")``.

    The names carry the test's name, for reading the broker log, and a random suffix,
    so reruns and parametrized cases never share a topic on the session's broker.
    """
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]
    run = uuid.uuid4().hex[:8]

    def name(role: str = "topic") -> str:
        return f"{test}-{role}-{run}"

    return name


@pytest.fixture
def client_log_levels() -> Iterator[None]:
    """Restore the Kafka client loggers' levels, which configured credentials hold at INFO."""
    levels = {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
