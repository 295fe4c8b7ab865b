"""Probes of brokers that the tools start: free ports, and "does this cluster answer"."""

from __future__ import annotations

import logging
import socket

from kafka.errors import KafkaError

from stream_worker.broker import admin_client
from stream_worker.errors import BrokerError

__all__ = ["HOST", "answers_as", "free_port", "tcp_accepts"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that is free now (it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_accepts(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def answers_as(bootstrap_servers: str, cluster_id: str, timeout_s: float) -> bool:
    """True when ``bootstrap_servers`` answers metadata requests as cluster ``cluster_id``.

    Checking the cluster id makes sure the answer comes from our process, not from
    another broker that holds the port.
    """
    timeout_ms = max(100, int(timeout_s * 1000))
    try:
        admin = admin_client(
            bootstrap_servers=bootstrap_servers,
            client_id="recstream-broker-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            reconnect_backoff_ms=50,
            reconnect_backoff_max_ms=200,
        )
    except (KafkaError, OSError) as exc:
        log.debug("broker %s not ready yet: %s", bootstrap_servers, exc)
        return False
    try:
        admin.list_topics()
        found = admin.describe_cluster().get("cluster_id")
    except (KafkaError, OSError) as exc:
        log.debug("broker %s answered but metadata failed: %s", bootstrap_servers, exc)
        return False
    finally:
        admin.close()
    if found != cluster_id:
        raise BrokerError(
            f"Another broker (cluster {found!r}) answers on {bootstrap_servers}: "
            "stop it or pick another port."
        )
    return True
