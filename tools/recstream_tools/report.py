"""Online quality over time: a worker's /metrics scraped at intervals, drawn as online
HR@10 per model version (hits over scored events since the worker started)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stream_worker.errors import WorkerError
from stream_worker.metrics import OnlineTotals, read_page


@dataclass
class Sample:
    seconds: float  # since the first scrape
    totals: OnlineTotals  # per model version, at k = 10

    def hr(self) -> dict[str, float]:
        """Online HR@10 per version that has scored events."""
        return {v: hr for v in self.totals.scored if (hr := self.totals.hr(v)) is not None}


def parse(metrics_text: str, seconds: float) -> Sample:
    totals = OnlineTotals(k=10)
    totals.add(metrics_text)
    return Sample(seconds, totals)


class Recorder:
    """Scrapes ``url`` every ``every_s`` in a thread until stopped; ``samples`` grows."""

    def __init__(self, url: str, every_s: float) -> None:
        self.url = url
        self.every_s = every_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="report", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> Recorder:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.take()  # the final state

    def take(self) -> None:
        try:
            text = read_page(self.url)
        except WorkerError:
            return  # a missed scrape is a gap in the plot, not a failure
        self.samples.append(parse(text, time.monotonic() - self._started))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.take()


def record(
    url: str, duration_s: float, every_s: float, progress: Callable[[Sample], None]
) -> list[Sample]:
    """Scrape for ``duration_s`` seconds (the first scrape must succeed)."""
    parse(read_page(url), 0.0)  # fails early, in one line, when nothing answers
    with Recorder(url, every_s) as recorder:
        deadline = time.monotonic() + duration_s
        seen = 0
        while time.monotonic() < deadline:
            time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))
            for sample in recorder.samples[seen:]:
                progress(sample)
            seen = len(recorder.samples)
    return recorder.samples


def plot_online(samples: list[Sample], path: Path, title: str = "") -> bool:
    """Online HR@10 per model version over time; False (nothing drawn) before any
    event was scored."""
    versions = sorted({v for s in samples for v, n in s.totals.scored.items() if n})
    if not versions:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for version in versions:
        points = [(s.seconds, s.hr()[version]) for s in samples if s.totals.scored.get(version)]
        ax.plot(*zip(*points, strict=True), marker=".", label=version)
    ax.set_xlabel("seconds")
    ax.set_ylabel("online HR@10 (since the worker started)")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Online HR@10 per model version")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
