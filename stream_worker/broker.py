"""Topics and admin requests on any Kafka-protocol broker, for the worker's start-up.

:func:`ensure_topics` creates missing topics; :func:`admin_client` is kafka-python's admin
client without its leak when it cannot bootstrap. The brokers that tests, benchmarks and
the demo start live in the ``recstream_tools`` package, apart from the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream_worker.errors import BrokerError

__all__ = ["admin_client", "ensure_topics"]

log = logging.getLogger(__name__)


class _AdminClient(KafkaAdminClient):  # type: ignore[misc]  # untyped base
    """``KafkaAdminClient`` that closes what it opened when it cannot bootstrap:
    kafka-python's constructor raises with its I/O thread running and its socket open
    (one of each per failed probe while a broker starts)."""

    def __init__(self, **configs: Any) -> None:
        try:
            super().__init__(**configs)
        except BaseException:
            if hasattr(self, "_net"):  # got as far as starting its I/O thread
                self._closed = False  # close() skips a client it thinks unopened
                self.close()
            raise


def admin_client(**configs: Any) -> KafkaAdminClient:
    """A kafka-python ``KafkaAdminClient`` that leaves no thread or socket behind when it
    cannot bootstrap (raises ``KafkaError`` then, as kafka-python does)."""
    return _AdminClient(**configs)


def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    replication_factor: int | None = None,
    *,
    client_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics of ``topics`` (name -> partitions) that do not exist yet.

    Existing topics are left alone (a different partition count is logged as a
    warning, never changed). Returns the names created, in ``topics`` order; an
    empty list when all existed. ``replication_factor`` None leaves the replicas to the
    broker's ``default.replication.factor``. ``client_config`` holds extra kafka-python
    ``KafkaAdminClient`` options (security settings, ``client_id``, timeouts).

    :raises BrokerError: the broker is unreachable or refused a creation.
    """
    if replication_factor is not None and replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")
    for name, partitions in topics.items():
        if not name or partitions < 1:
            raise ValueError(f"topic {name!r}: needs a name and >= 1 partitions, got {partitions}")
    if not topics:
        return []
    config: dict[str, Any] = {"client_id": "recstream-admin", **(client_config or {})}
    try:
        admin = admin_client(bootstrap_servers=bootstrap_servers, **config)
    except KafkaError as exc:
        raise BrokerError(
            f"Could not reach the Kafka broker at {bootstrap_servers}: {exc}"
        ) from exc
    try:
        return _ensure_topics(admin, topics, replication_factor)
    except KafkaError as exc:
        raise BrokerError(f"Could not create topics on {bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()


def _ensure_topics(
    admin: KafkaAdminClient, topics: Mapping[str, int], replication_factor: int | None
) -> list[str]:
    existing = set(admin.list_topics())
    present = [name for name in topics if name in existing]
    if present:
        for info in admin.describe_topics(present):
            have = len(info.get("partitions") or [])
            want = topics[info["name"]]
            if have != want:
                log.warning(
                    "topic %s exists with %d partitions, not %d; left as is",
                    info["name"],
                    have,
                    want,
                )
    missing = {name: n for name, n in topics.items() if name not in existing}
    if not missing:
        return []
    response = admin.create_topics(
        {
            # -1: the broker's default.replication.factor (Kafka 2.4+)
            name: {"num_partitions": n, "replication_factor": replication_factor or -1}
            for name, n in missing.items()
        },
        raise_errors=False,
    )
    created: set[str] = set()
    failures: list[str] = []
    for result in response["topics"]:
        code = result["error_code"]
        if code == 0:
            created.add(result["name"])
        elif code != TopicAlreadyExistsError.errno:  # created concurrently: fine
            reason = result.get("error_message") or f"error code {code}"
            failures.append(f"{result['name']}: {reason}")
    if failures:
        raise BrokerError(f"The broker refused to create topics ({'; '.join(failures)}).")
    if created:
        admin.wait_for_topics(sorted(created))
        log.info("created topics %s", ", ".join(sorted(created)))
    return [name for name in topics if name in created]
