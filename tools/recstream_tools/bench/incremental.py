"""The encode stage on real event order, with and without the encoder cache.

Replays a dataset in event-time order, cut into batches of consecutive events as the
worker sees them at a given load, keeps each user's history as the database would
(capped at ``history_length``), and encodes every batch's users twice with the same
version: once through the cache (``Recommender.user_vectors`` with cache keys) and once
in full. The two runs alternate which goes first, so neither always meets warm CPU
caches, and their vectors are compared: the speed-up is only worth quoting when they
agree.
"""

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.train import resolve_device
from recstream_tools.bench.e2e import Replay, load_replay, publish_bench_model
from stream_worker.recommender import Recommender, StageTimes

logger = logging.getLogger(__name__)


@dataclass
class IncrementalResult:
    dataset: str
    events: int
    batch_events: int
    batches: int
    mean_users: float  # distinct users per batch
    full_ms: list[float] = field(default_factory=list)  # per batch
    cached_ms: list[float] = field(default_factory=list)
    reuse: dict[str, int] = field(default_factory=dict)  # histories by kind of reuse
    cache_mib: float = 0.0  # held at the end
    max_abs_diff: float = 0.0  # between the two runs' vectors, over every batch


def replay_batches(
    replay: Replay, batch_events: int, history_length: int
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Per batch of ``batch_events`` consecutive events: its users (first appearance
    order) and their stored histories after the batch, newest item last."""
    histories: dict[str, list[str]] = {}
    for start in range(0, len(replay), batch_events):
        users: dict[str, None] = {}
        stop = start + batch_events
        for user, item in zip(replay.users[start:stop], replay.items[start:stop], strict=True):
            history = histories.setdefault(user, [])
            history.append(item)
            if len(history) > history_length:
                del history[0]
            users[user] = None
        yield list(users), [list(histories[user]) for user in users]


def bench_incremental(
    replay: Replay,
    root: Path,
    batch_events: int,
    *,
    device: str = "cpu",
    cache_mb: int = 256,
    history_length: int = 200,
    progress: bool = True,
) -> IncrementalResult:
    cached = Recommender.load(root, device=device, cache_bytes=cache_mb * 2**20)
    full = Recommender.load(root, device=device)
    assert cached.cache is not None, "the benchmark model's encoder has no extend()"
    result = IncrementalResult(replay.name, len(replay), batch_events, 0, 0.0)
    times = StageTimes()
    users_seen = 0
    batches = replay_batches(replay, batch_events, history_length)
    total = -(-len(replay) // batch_events)
    for n, (users, histories) in enumerate(
        tqdm(batches, total=total, desc=f"{replay.name} batches", disable=not progress)
    ):
        indices = [[cached.item_index[item] for item in h] for h in histories]
        vectors = {}
        for which in ("cached", "full") if n % 2 == 0 else ("full", "cached"):
            started = time.perf_counter()
            if which == "cached":
                vectors[which] = cached.user_vectors(indices, users, times)
            else:
                vectors[which] = full.user_vectors(indices)
            elapsed = (time.perf_counter() - started) * 1000
            (result.cached_ms if which == "cached" else result.full_ms).append(elapsed)
        diff = float(np.abs(vectors["cached"] - vectors["full"]).max())
        result.max_abs_diff = max(result.max_abs_diff, diff)
        users_seen += len(users)
        result.batches += 1
    result.mean_users = users_seen / max(result.batches, 1)
    result.reuse = dict(times.reuse)
    result.cache_mib = cached.cache.bytes / 2**20
    return result


def format_incremental(results: list[IncrementalResult]) -> str:
    head = (
        "| dataset | events per batch | batches | users per batch | full encode median / p99 ms "
        "| with cache median / p99 ms | total s full / with cache | speed-up (total) "
        "| histories: same / extend / full | cache MiB at end | max abs diff |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        full, cached = np.array(r.full_ms), np.array(r.cached_ms)
        reuse = " / ".join(f"{r.reuse.get(k, 0):,}" for k in ("same", "extend", "full"))
        rows.append(
            f"| {r.dataset} | {r.batch_events:,} | {r.batches:,} | {r.mean_users:.1f} "
            f"| {np.median(full):.2f} / {np.percentile(full, 99):.2f} "
            f"| {np.median(cached):.2f} / {np.percentile(cached, 99):.2f} "
            f"| {full.sum() / 1000:.2f} / {cached.sum() / 1000:.2f} "
            f"| {full.sum() / max(cached.sum(), 1e-9):.2f}x | {reuse} | {r.cache_mib:.1f} "
            f"| {r.max_abs_diff:.1e} |"
        )
    return head + "\n".join(rows)


def plot_incremental(results: list[IncrementalResult], path: Path) -> None:
    """Per-batch encode time, full against cached, as cumulative distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results, strict=False):
        for label, values in (("full encode", r.full_ms), ("with cache", r.cached_ms)):
            xs = np.sort(np.array(values))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
        ax.set_xscale("log")
        ax.set_xlabel("encode ms per batch")
        ax.set_ylabel("share of batches")
        ax.set_title(f"{r.dataset}, {r.batch_events} events per batch")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_incremental(
    *,
    datasets: list[str],
    data_root: Path,
    events: int,
    batch_events: list[int],
    out_dir: Path,
    device: str = "cpu",
    threads: int = 1,
    cache_mb: int = 256,
    max_len: int = 200,
    progress: bool = True,
) -> str:
    """Every dataset at every batch size; writes JSON, PNG and markdown; returns it."""
    device = str(resolve_device(device))
    if threads:
        torch.set_num_threads(threads)  # the worker's default (WORKER__CPU_THREADS=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in datasets:
        replay = load_replay(name, data_root, events)
        root = out_dir / "work" / f"artifacts-{name}-{len(replay)}"
        if not root.exists():
            publish_bench_model(replay, root, max_len)
        for size in batch_events:
            results.append(
                bench_incremental(
                    replay, root, size, device=device, cache_mb=cache_mb, progress=progress
                )
            )
            logger.info("%s, %d events per batch done", name, size)
    (out_dir / "incremental.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot_incremental(results, out_dir / "incremental.png")
    report = (
        f"Model: untrained SASRec, max_len {max_len}, dim 64, 2 blocks; device {device}, "
        f"{torch.get_num_threads()} thread(s); cache budget {cache_mb} MiB.\n\n"
        + format_incremental(results)
    )
    (out_dir / "incremental.md").write_text(report + "\n")
    return report
