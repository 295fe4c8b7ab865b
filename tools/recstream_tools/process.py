"""What the tools' launchers share: stopping a child process, and the with-block shape
(``with KafkaCluster(...) as kafka:`` starts it and stops it on the way out)."""

from __future__ import annotations

import logging
import subprocess
from types import TracebackType
from typing import Any, Self

__all__ = ["Service", "stop_process"]

log = logging.getLogger(__name__)


def stop_process(proc: subprocess.Popen[Any], grace_s: float, what: str | None = None) -> None:
    """SIGTERM, then SIGKILL if it still runs after ``grace_s`` (a warning names it when
    ``what`` is given); the process is reaped either way. Nothing for one that ended."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        if what is not None:
            log.warning("%s still runs %gs after SIGTERM; killing it", what, grace_s)
        proc.kill()
        proc.wait()


class Service:
    """Something started and stopped; a with block does both."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
