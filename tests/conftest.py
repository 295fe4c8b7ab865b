"""Shared fixtures: one local Kafka-compatible broker per test session, unique topic names."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_worker.broker import LocalBroker
from stream_worker.kafka_config import CLIENT_LOGGERS


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A started tansu broker (in-memory) on 127.0.0.1, shared by the session.

    Its log is in the session's temporary directory, under ``broker/``. Tests share
    it, so each test uses its own topics (see ``topic_names``) and consumer groups.
    """
    log_dir: Path = tmp_path_factory.mktemp("broker")
    with LocalBroker(log_dir=log_dir) as started:
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
