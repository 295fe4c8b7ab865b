"""Memory with a canary: one process serving real event order, first on the live
version alone, then with a canary beside it.

Two production-shaped versions (untrained: memory does not depend on the weights) are
published into a temporary root; a ``VersionWatcher`` loads the live one, the first
half of the events is served through it (filling its encoder cache), then a canary is
started at ``share`` and the second half is served through both. The process's resident
memory is read after each phase, with the bytes each encoder cache holds: the two
caches share one budget (``WORKER__ENCODER_CACHE_MB``), so what a canary adds is its
model and index.
"""

import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from model.artifact_store import Canary, LocalStore, start_canary
from model.artifacts import list_versions, read_current
from recstream_tools.bench.e2e import load_replay, proc_status_mib, publish_bench_model
from stream_worker.recommender import Serving, VersionWatcher

logger = logging.getLogger(__name__)

BATCH_EVENTS = 1000  # events per batch: the worker's batch at a backlog


@dataclass
class Phase:
    name: str
    rss_mib: float
    cache_mib: dict[str, float] = field(default_factory=dict)  # per role: live, canary


@dataclass
class CanaryMemory:
    dataset: str
    events: int
    users: int
    items: int
    share: float
    cache_budget_mib: float
    canary_users: int = 0  # distinct users the canary answered
    phases: list[Phase] = field(default_factory=list)


def _cache_mib(serving: Serving) -> dict[str, float]:
    out = {}
    for role, rec in (("live", serving.live), ("canary", serving.canary)):
        if rec is not None and rec.cache is not None:
            out[role] = round(rec.cache.bytes / 2**20, 1)
    return out


def _phase(name: str, serving: Serving | None = None) -> Phase:
    caches = {} if serving is None else _cache_mib(serving)
    phase = Phase(name, round(proc_status_mib(os.getpid(), "VmRSS"), 1), caches)
    logger.info("%s: RSS %.0f MiB, caches %s", name, phase.rss_mib, phase.cache_mib)
    return phase


def _serve(
    watcher: VersionWatcher,
    users: Sequence[str],
    items: Sequence[str],
    histories: dict[str, list[str]],
    max_len: int,
    label: str,
) -> set[str]:
    """Serve the events in batches as the worker would; the users the canary answered."""
    canary_users: set[str] = set()
    for start in tqdm(range(0, len(users), BATCH_EVENTS), desc=label, unit="batch"):
        batch: dict[str, list[str]] = {}
        for user, item in zip(
            users[start : start + BATCH_EVENTS], items[start : start + BATCH_EVENTS], strict=True
        ):
            history = histories.setdefault(user, [])
            history.append(item)
            del history[:-max_len]
            batch[user] = history
        serving = watcher.current()
        for recommender, group in serving.split(batch):
            recommender.recommend(
                {u: batch[u] for u in group}, 10, cache_keys={u: u for u in group}
            )
            if recommender is serving.canary:
                canary_users.update(group)
    return canary_users


def run_canary_memory(
    dataset: str,
    data_root: Path,
    events: int,
    share: float,
    cache_mb: int,
    max_len: int,
    out_dir: Path,
) -> str:
    """Measured in a fresh process, so that no earlier run's memory is counted."""
    Canary("probe", share)  # a bad share fails here, before any loading
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        report: str = pool.submit(
            _measure, dataset, data_root, events, share, cache_mb, max_len, out_dir
        ).result()
    return report


def _measure(
    dataset: str,
    data_root: Path,
    events: int,
    share: float,
    cache_mb: int,
    max_len: int,
    out_dir: Path,
) -> str:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    replay = load_replay(dataset, data_root, events)
    with tempfile.TemporaryDirectory(prefix="recstream-canary-bench-") as tmp:
        root = Path(tmp)
        publish_bench_model(replay, root, max_len)
        publish_bench_model(replay, root, max_len)  # the newer one becomes CURRENT
        candidate = next(v for v in list_versions(root) if v != read_current(root))
        store = LocalStore(root)
        result = CanaryMemory(
            dataset, len(replay), len(set(replay.users)), len(set(replay.items)), share, cache_mb
        )
        result.phases.append(_phase("before loading"))
        watcher = VersionWatcher(store, "cpu", 3600.0, cache_bytes=cache_mb * 2**20)
        result.phases.append(_phase("live version loaded", watcher.serving))
        half = len(replay) // 2
        histories: dict[str, list[str]] = {}
        _serve(watcher, replay.users[:half], replay.items[:half], histories, max_len, "live only")
        result.phases.append(_phase("live only, after half the events", watcher.serving))
        start_canary(store, candidate, share, root / ".cache")
        watcher.check_once()
        watcher.current()
        result.phases.append(_phase("canary loaded beside it", watcher.serving))
        served = _serve(
            watcher, replay.users[half:], replay.items[half:], histories, max_len, "with canary"
        )
        result.canary_users = len(served)
        result.phases.append(_phase("both, after the other half", watcher.serving))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"canary-memory-{dataset}.json").write_text(json.dumps(asdict(result), indent=2))
    _plot(result, out_dir / f"canary-memory-{dataset}.png")
    return _report(result)


def _report(r: CanaryMemory) -> str:
    lines = [
        f"## {r.dataset}: {r.events:,} events, {r.users:,} users, {r.items:,} items; "
        f"canary share {r.share:g} ({r.canary_users:,} users answered by it); encoder cache "
        f"budget {r.cache_budget_mib:g} MiB",
        "",
        "| phase | RSS MiB | live cache MiB | canary cache MiB |",
        "|---|---:|---:|---:|",
    ]
    for p in r.phases:
        live = p.cache_mib.get("live", "-")
        canary = p.cache_mib.get("canary", "-")
        lines.append(f"| {p.name} | {p.rss_mib:,.0f} | {live} | {canary} |")
    by = {p.name: p.rss_mib for p in r.phases}
    added = by["canary loaded beside it"] - by["live only, after half the events"]
    model = by["live version loaded"] - by["before loading"]
    lines += [
        "",
        f"The live version took {model:,.0f} MiB to load; the canary added {added:,.0f} MiB; "
        f"caches at the end: {sum(r.phases[-1].cache_mib.values()):.1f} MiB of "
        f"{r.cache_budget_mib:g} MiB.",
    ]
    return "\n".join(lines)


def _plot(r: CanaryMemory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [p.name for p in r.phases]
    ax.barh(names, [p.rss_mib for p in r.phases], color="#4c72b0", label="RSS")
    ax.barh(
        names,
        [sum(p.cache_mib.values()) for p in r.phases],
        color="#dd8452",
        label="encoder caches",
    )
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title(f"{r.dataset}: memory with a canary at share {r.share:g}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
