"""Probes of brokers that the tools start: free ports, and "does this cluster answer"."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from kafka.errors import KafkaError

from stream_worker.broker import admin_client
from stream_worker.errors import BrokerError

__all__ = ["HOST", "answers_as", "free_port", "page", "tcp_accepts", "wait_ready"]

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


def page(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, Any]:
    """GET ``http://127.0.0.1:<port><path>``: (status, body as JSON, or text)."""
    url = f"http://{HOST}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # 503 and the like still carry a body
        status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_ready(port: int, alive: Callable[[], bool], timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll a worker's ``/ready`` until it answers 200; returns its body.

    :raises BrokerError: the process died (``alive`` false) or the timeout passed; the
        message quotes the last answer.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = "no answer yet"
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError(f"the worker exited before it was ready (last /ready: {last})")
        try:
            status, body = page(port, "/ready", timeout_s=10.0)
        except OSError as exc:  # not listening yet
            last = str(exc)
        else:
            if status == 200 and isinstance(body, dict):
                return body
            last = body
        time.sleep(0.2)
    raise BrokerError(f"the worker was not ready within {timeout_s:g}s (last /ready: {last})")
