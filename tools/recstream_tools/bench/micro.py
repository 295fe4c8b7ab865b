"""Micro-benchmarks of the two hot-path components: the SASRec encoder and the FAISS index.

Both run on the device the worker would pick (``device="auto"``: CUDA and a FAISS GPU
index when present, else CPU) and go through the project's own code paths: the encoder
is scripted by :func:`model.sasrec.script_encoder`, exactly as the artifact export does,
and indexes are built by :func:`model.index.build_index` with ``IndexConfig``'s query-time
settings. Every configuration of one call is measured in the same process, one after the
other, so the figures are comparable side by side; medians are the headline figure.

``run_encoder`` and ``run_index`` are what ``recstream bench`` calls: they write a PNG
and the raw results as JSON to a directory and return a markdown table.
"""

import contextlib
import functools
import gc
import itertools
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from model.config import IndexConfig, TrainConfig
from model.errors import ConfigError
from model.index import FloatArray, build_index, gpu_available, is_exact
from model.sasrec import SASRec, script_encoder
from model.train import resolve_device

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES: tuple[int, ...] = tuple(2**i for i in range(11))  # 1 .. 1024
DEFAULT_MAX_LENS: tuple[int, ...] = (50, 200)
DEFAULT_INDEX_SIZES: tuple[int, ...] = (10_000, 100_000, 1_000_000)
DEFAULT_FACTORIES: tuple[str, ...] = ("Flat", "IVF{nlist},Flat", "HNSW32")
# MovieLens-1M's catalogue, the project's reference dataset; the encoder's cost hardly
# depends on it (one embedding gather per position).
DEFAULT_NUM_ITEMS = 3_416
# Queries of the builder's own recall check; each costs an exact search over every item.
BUILDER_QUERIES = 256


@dataclass(frozen=True)
class EncoderResult:
    """One (max_len, batch size) configuration of the scripted encoder."""

    max_len: int
    batch_size: int
    device: str
    calls: int  # timed calls the statistics come from
    median_ms: float  # per batch
    p99_ms: float  # per batch; with fewer than 100 calls this is close to the maximum
    seqs_per_s: float  # batch_size / median


@dataclass(frozen=True)
class IndexResult:
    """One index over ``items`` vectors, searched for the top ``k``."""

    items: int
    factory: str  # the concrete factory string, e.g. "IVF4000,Flat"
    family: str  # the template it came from, e.g. "IVF{nlist},Flat"
    device: str
    dim: int
    build_s: float  # train + add, as reported by the project's builder
    recall_at_k: float  # against exact inner-product search on the same queries
    # The builder's own check (model.index.recall_against_exact): items perturbed by
    # noise as large as themselves, i.e. queries between clusters; None for exact indexes.
    builder_recall_at_k: float | None
    k: int
    single_median_ms: float  # one query per search call
    single_p99_ms: float
    single_calls: int
    batch_size: int
    batch_median_ms: float  # one call of batch_size queries
    batch_qps: float  # batch_size / batch median
    batch_calls: int
    nprobe: int | None  # query-time settings where the index has them
    ef_search: int | None


# --- timing -------------------------------------------------------------------------


def _time_calls(
    fn: Callable[[], object],
    *,
    max_calls: int,
    min_calls: int,
    budget_s: float,
    sync: Callable[[], None] | None = None,
) -> npt.NDArray[np.float64]:
    """Seconds per call of ``fn``: up to ``max_calls``, stopping once ``budget_s`` is
    spent and at least ``min_calls`` are in, so slow configurations still finish."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_calls:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_calls and time.perf_counter() - started >= budget_s:
            break
    return np.asarray(times, dtype=np.float64)


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 0
) -> dict[str, tuple[float, float]]:
    """Median wall and CPU ms per call of each of ``calls``, timed in turn round after
    round so that side-by-side figures share the machine's state; the first ``warmup``
    rounds are not counted. CPU time is the process's (helper threads included)."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            call()
            if round_ >= warmup:
                wall[name].append((time.perf_counter() - started) * 1000)
                cpu[name].append((time.process_time() - cpu_started) * 1000)
    return {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in calls}


def _median_p99_ms(seconds: npt.NDArray[np.float64]) -> tuple[float, float]:
    return float(np.median(seconds) * 1000), float(np.percentile(seconds, 99) * 1000)


@contextlib.contextmanager
def _heartbeat(bar: "tqdm[Any]", every_s: float = 1.0) -> Iterator[None]:
    """Keep the bar's elapsed time moving during one long native call (an HNSW build
    over a million items takes minutes and reports nothing on its own)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            bar.refresh()

    thread = threading.Thread(target=beat, name="bench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- encoder ------------------------------------------------------------------------


def bench_encoder(
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_lens: Sequence[int] = DEFAULT_MAX_LENS,
    device: str = "auto",
    repeats: int = 100,
    warmup: int = 5,
    dim: int = 64,
    blocks: int = 2,
    heads: int = 1,
    num_items: int = DEFAULT_NUM_ITEMS,
    *,
    min_repeats: int = 10,
    budget_s: float = 2.0,
    seed: int = 0,
    progress: bool = True,
) -> list[EncoderResult]:
    """Latency and throughput of the scripted SASRec encoder per (max_len, batch size).

    A fresh, untrained model of the production shape (``TrainConfig`` defaults unless
    given) is scripted as the artifact export does and run under
    ``torch.inference_mode()`` on random full-length sequences (no padding: the worst
    case of a given length). The timed call is the encoder alone, inputs already on the
    device; CUDA is synchronised after every call. Each configuration gets ``warmup``
    untimed calls (TorchScript's profiling executor optimises after its first runs), then up to
    ``repeats`` timed calls, at least ``min_repeats``, stopping after ``budget_s``.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not max_lens or min(max_lens) < 2:
        raise ConfigError(f"max lengths must be at least 2, got {list(max_lens)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("repeats must be at least 1 and warmup at least 0")
    torch_device = resolve_device(device)
    sync = torch.cuda.synchronize if torch_device.type == "cuda" else None
    dropout = TrainConfig().dropout  # inactive in eval mode; kept for the production shape
    generator = torch.Generator().manual_seed(seed)
    results: list[EncoderResult] = []
    bar = tqdm(
        total=len(max_lens) * len(batch_sizes), desc="encoder", unit="cfg", disable=not progress
    )
    with bar, torch.inference_mode():
        for length in max_lens:
            torch.manual_seed(seed)
            model = SASRec(num_items, length, dim, blocks, heads, dropout).to(torch_device)
            encoder = script_encoder(model)
            for batch in batch_sizes:
                bar.set_postfix_str(f"max_len={length} batch={batch}")
                seqs = torch.randint(1, num_items + 1, (batch, length), generator=generator)
                call = functools.partial(encoder, seqs.to(torch_device))
                for _ in range(warmup):
                    call()
                if sync is not None:
                    sync()
                seconds = _time_calls(
                    call,
                    max_calls=repeats,
                    min_calls=min(min_repeats, repeats),
                    budget_s=budget_s,
                    sync=sync,
                )
                median_ms, p99_ms = _median_p99_ms(seconds)
                results.append(
                    EncoderResult(
                        max_len=length,
                        batch_size=batch,
                        device=str(torch_device),
                        calls=len(seconds),
                        median_ms=median_ms,
                        p99_ms=p99_ms,
                        seqs_per_s=batch / (median_ms / 1000),
                    )
                )
                bar.update()
            logger.info(
                "encoder max_len %d: %s",
                length,
                ", ".join(
                    f"batch {r.batch_size} {r.median_ms:.2f} ms"
                    for r in results
                    if r.max_len == length
                ),
            )
    return results


# --- index --------------------------------------------------------------------------


def ivf_nlist(items: int) -> int:
    """About 4 * sqrt(N) lists, capped so k-means has the 39 points per centroid FAISS
    asks for (at 10k items 4 * sqrt(N) = 400 would leave it short)."""
    return max(1, min(round(4 * math.sqrt(items)), items // 39))


def clustered_vectors(
    count: int,
    centers: FloatArray,
    rng: np.random.Generator,
    spread: float = 1.0,
    chunk: int = 100_000,
) -> FloatArray:
    """``count`` unit-norm draws from an equal-weight Gaussian mixture around ``centers``
    (unit vectors); the noise has about ``spread`` times a center's norm. Filled in
    chunks, in float32, so a million rows never need a float64 copy."""
    dim = centers.shape[1]
    sigma = np.float32(spread / math.sqrt(dim))
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        block = out[start:stop]
        rng.standard_normal(out=block, dtype=np.float32)
        block *= sigma
        block += centers[rng.integers(0, len(centers), size=stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def mixture_centers(items: int, dim: int, rng: np.random.Generator) -> FloatArray:
    """About sqrt(N) unit-norm cluster centers (at least 8): a catalogue's categories."""
    count = max(8, round(math.sqrt(items)))
    centers = rng.standard_normal((count, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return centers


def _recall(truth: npt.NDArray[np.int64], found: npt.NDArray[np.int64]) -> float:
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / truth.size


def _search_settings(index: Any) -> tuple[int | None, int | None]:
    """nprobe and efSearch as the built index holds them (None where it has none), read
    back rather than assumed, so a setting that did not apply shows in the results."""
    nprobe: int | None = None
    with contextlib.suppress(RuntimeError):
        nprobe = int(faiss.extract_index_ivf(index).nprobe)
    if nprobe is None and "Gpu" in type(index).__name__ and hasattr(index, "nprobe"):
        nprobe = int(index.nprobe)
    hnsw = getattr(index, "hnsw", None)
    return nprobe, None if hnsw is None else int(hnsw.efSearch)


def bench_index(
    sizes: Sequence[int] = DEFAULT_INDEX_SIZES,
    factories: Sequence[str] = DEFAULT_FACTORIES,
    dim: int = 64,
    queries: int = 1024,
    k: int = 10,
    device: str = "auto",
    *,
    batch_size: int = 256,
    max_calls: int = 200,
    min_calls: int = 5,
    budget_s: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> list[IndexResult]:
    """Build time, search speed and recall@k of FAISS indexes at several catalogue sizes.

    Item vectors are unit-norm draws from a Gaussian mixture (about sqrt(N) clusters of
    equal weight, noise as large as the cluster centers): clustered like real item
    embeddings, unlike uniform random vectors, which are the hardest case for IVF and
    HNSW. Queries are fresh draws from the same mixture, standing in for user vectors.

    ``factories`` are FAISS factory strings; ``{nlist}`` is replaced by
    :func:`ivf_nlist` of the size. Each index is built by the project's builder with
    ``IndexConfig``'s ``nprobe`` and ``efSearch`` (and moved to the GPU where it would
    be: HNSW stays on the CPU). Recall@k is measured against exact (``Flat``) search of
    the same queries, built and searched in the same run; the builder's own check, on
    queries between clusters, is reported beside it. Search speed is reported as
    the median latency of single-query calls and the QPS of ``batch_size``-query calls;
    each runs up to ``max_calls`` calls, at least ``min_calls``, within ``budget_s``.
    """
    if not sizes or min(sizes) < k:
        raise ConfigError(f"index sizes must be at least k={k}, got {list(sizes)}")
    if not factories:
        raise ConfigError("no index factory strings given")
    if queries < 1 or batch_size < 1 or k < 1:
        raise ConfigError("queries, batch_size and k must be positive")
    # Exact search is the reference: it goes first so that every other index is compared
    # with it on the same queries; it is built even when not asked for.
    order = sorted(factories, key=lambda f: not is_exact(f))
    if not is_exact(order[0]):
        order.insert(0, "Flat")
    rng = np.random.default_rng(seed)
    results: list[IndexResult] = []
    bar = tqdm(total=len(sizes) * len(order), desc="index", unit="idx", disable=not progress)
    with bar:
        for items in sizes:
            centers = mixture_centers(items, dim, rng)
            vectors = clustered_vectors(items, centers, rng)
            query_vectors = clustered_vectors(queries, centers, rng)
            truth: npt.NDArray[np.int64] | None = None
            for family in order:
                factory = family.format(nlist=ivf_nlist(items))
                bar.set_postfix_str(f"{items:,} items, {factory}: build")
                cfg = IndexConfig(
                    factory=factory, device=device, recall_queries=min(BUILDER_QUERIES, items)
                )
                with _heartbeat(bar):
                    index, report = build_index(vectors, cfg)
                bar.set_postfix_str(f"{items:,} items, {factory}: search")
                _, found = index.search(query_vectors, k)
                truth = found if truth is None else truth
                times = _measure_search(
                    index,
                    query_vectors,
                    k,
                    batch_size=batch_size,
                    max_calls=max_calls,
                    min_calls=min_calls,
                    budget_s=budget_s,
                )
                nprobe, ef_search = _search_settings(index)
                del index
                gc.collect()  # a 1M-item index is hundreds of MB: free it before the next
                bar.update()
                if family not in factories:
                    continue
                result = IndexResult(
                    items=items,
                    factory=factory,
                    family=family,
                    device=report.device,
                    dim=dim,
                    build_s=report.build_s,
                    recall_at_k=_recall(truth, found),
                    builder_recall_at_k=report.recall_at_k,
                    k=k,
                    single_median_ms=times.single_median_ms,
                    single_p99_ms=times.single_p99_ms,
                    single_calls=times.single_calls,
                    batch_size=times.batch_size,
                    batch_median_ms=times.batch_median_ms,
                    batch_qps=times.batch_size / (times.batch_median_ms / 1000),
                    batch_calls=times.batch_calls,
                    nprobe=nprobe,
                    ef_search=ef_search,
                )
                results.append(result)
                logger.info(
                    "%s over %d items on %s: build %.2fs, recall@%d %.4f, single query "
                    "%.3f ms, %.0f QPS at batch %d",
                    factory,
                    items,
                    result.device,
                    result.build_s,
                    k,
                    result.recall_at_k,
                    result.single_median_ms,
                    result.batch_qps,
                    result.batch_size,
                )
            del vectors
            gc.collect()
    return results


@dataclass(frozen=True)
class _SearchTimes:
    single_median_ms: float
    single_p99_ms: float
    single_calls: int
    batch_size: int
    batch_median_ms: float
    batch_calls: int


def _measure_search(
    index: Any,
    query_vectors: FloatArray,
    k: int,
    *,
    batch_size: int,
    max_calls: int,
    min_calls: int,
    budget_s: float,
) -> _SearchTimes:
    """Single-query latency and batched search time, cycling through the queries so
    that consecutive calls do not search the same vector."""
    count = len(query_vectors)
    batch_size = min(batch_size, count)
    singles = [query_vectors[i : i + 1] for i in range(count)]
    batches = [
        query_vectors[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)
    ]
    # One untimed call of each shape: the first search pays for lazy allocations.
    index.search(singles[0], k)
    index.search(batches[0], k)
    calls = itertools.count()

    def one() -> None:
        index.search(singles[next(calls) % len(singles)], k)

    def many() -> None:
        index.search(batches[next(calls) % len(batches)], k)

    single = _time_calls(one, max_calls=max_calls, min_calls=min_calls, budget_s=budget_s)
    batched = _time_calls(many, max_calls=max_calls, min_calls=min_calls, budget_s=budget_s)
    single_median, single_p99 = _median_p99_ms(single)
    batch_median, _ = _median_p99_ms(batched)
    return _SearchTimes(
        single_median, single_p99, len(single), batch_size, batch_median, len(batched)
    )


# --- tables -------------------------------------------------------------------------


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_encoder_table(results: Sequence[EncoderResult]) -> str:
    """One markdown row per (max_len, batch size)."""
    header = ["max_len", "batch", "device", "median ms", "p99 ms", "sequences/s", "calls"]
    rows = [
        [
            str(r.max_len),
            str(r.batch_size),
            r.device,
            f"{r.median_ms:.3f}",
            f"{r.p99_ms:.3f}",
            f"{r.seqs_per_s:,.0f}",
            str(r.calls),
        ]
        for r in results
    ]
    return _markdown(header, rows)


def format_index_table(results: Sequence[IndexResult]) -> str:
    """One markdown row per (catalogue size, index)."""
    batch = results[0].batch_size if results else 0
    k = results[0].k if results else 10
    header = [
        "items",
        "index",
        "device",
        "search params",
        "build s",
        f"recall@{k}",
        "builder's check (recall@10)",
        "1-query median ms",
        "1-query p99 ms",
        f"QPS (batch {batch})",
    ]
    rows = [
        [
            f"{r.items:,}",
            r.factory,
            r.device,
            _params(r),
            f"{r.build_s:.2f}",
            f"{r.recall_at_k:.4f}",
            "-" if r.builder_recall_at_k is None else f"{r.builder_recall_at_k:.4f}",
            f"{r.single_median_ms:.3f}",
            f"{r.single_p99_ms:.3f}",
            f"{r.batch_qps:,.0f}",
        ]
        for r in results
    ]
    return _markdown(header, rows)


def _params(result: IndexResult) -> str:
    parts = []
    if result.nprobe is not None:
        parts.append(f"nprobe={result.nprobe}")
    if result.ef_search is not None:
        parts.append(f"efSearch={result.ef_search}")
    return ", ".join(parts) or "-"


# --- plots --------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    # The object-oriented API: no pyplot global state, no backend to select.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_encoder(results: Sequence[EncoderResult], path: Path) -> None:
    """Median latency per batch (p99 dashed) and sequences/s against batch size, one
    line per max_len, on log-log axes."""
    fig = _figure(11, 4.2)
    latency_ax, throughput_ax = fig.subplots(1, 2)
    for length in sorted({r.max_len for r in results}):
        rows = sorted((r for r in results if r.max_len == length), key=lambda r: r.batch_size)
        batches = [r.batch_size for r in rows]
        (line,) = latency_ax.plot(
            batches, [r.median_ms for r in rows], marker="o", label=f"max_len {length} median"
        )
        latency_ax.plot(
            batches,
            [r.p99_ms for r in rows],
            linestyle="--",
            color=line.get_color(),
            label=f"max_len {length} p99",
        )
        throughput_ax.plot(
            batches, [r.seqs_per_s for r in rows], marker="o", label=f"max_len {length}"
        )
    device = ", ".join(sorted({r.device for r in results}))
    for ax, ylabel in ((latency_ax, "ms per batch"), (throughput_ax, "sequences / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    latency_ax.set_title("encoder latency")
    throughput_ax.set_title("encoder throughput")
    fig.suptitle(f"SASRec TorchScript encoder on {device}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_index(results: Sequence[IndexResult], path: Path) -> None:
    """Batched QPS, single-query latency, recall@k and build time against catalogue
    size, one line per index family; the builder's recall check is dashed."""
    fig = _figure(11, 8)
    axes = fig.subplots(2, 2)
    k = results[0].k if results else 10
    panels: list[tuple[Any, str, Callable[[IndexResult], float | None], bool]] = [
        (axes[0][0], "queries / s (batched)", lambda r: r.batch_qps, True),
        (axes[0][1], "single-query median ms", lambda r: r.single_median_ms, True),
        (axes[1][0], f"recall@{k} vs exact", lambda r: r.recall_at_k, False),
        (axes[1][1], "build s", lambda r: r.build_s, True),
    ]
    families = list(dict.fromkeys(r.family for r in results))
    for ax, ylabel, value, log_y in panels:
        for family in families:
            rows = sorted((r for r in results if r.family == family), key=lambda r: r.items)
            label = family.replace("{nlist}", "(4√N)")
            (line,) = ax.plot(
                [r.items for r in rows], [value(r) for r in rows], marker="o", label=label
            )
            checked = [r for r in rows if r.builder_recall_at_k is not None]
            if ax is axes[1][0] and checked:
                ax.plot(
                    [r.items for r in checked],
                    [r.builder_recall_at_k for r in checked],
                    marker="x",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{label}, builder's check",
                )
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("items")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    device = ", ".join(sorted({r.device for r in results}))
    fig.suptitle(f"FAISS inner-product search, d={results[0].dim if results else 0}, {device}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# --- entry points -------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What the figures depend on, stored next to them."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine inflates every figure; this says how busy it was.
        "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "cuda": torch.cuda.is_available(),
        "faiss_gpu": gpu_available(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def _write_json(
    path: Path, kind: str, settings: dict[str, Any], results: Sequence[Any], wall_s: float
) -> None:
    payload = {
        "benchmark": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall_s, 1),
        "environment": environment(),  # taken at the end, so the load averages cover the run
        "settings": settings,
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def run_encoder(out_dir: Path, device: str, quick: bool, *, progress: bool = True) -> str:
    """The encoder benchmark: ``encoder.png`` and ``encoder.json`` in ``out_dir``; returns
    the markdown table. ``quick`` runs a few small configurations in about a second."""
    settings: dict[str, Any] = {"device": device}
    if quick:
        settings |= {
            "batch_sizes": (1, 8),
            "max_lens": (20, 50),
            "repeats": 3,
            "warmup": 1,
            "min_repeats": 2,
            "budget_s": 0.05,
        }
    return _run_and_record(
        out_dir, "encoder", settings, bench_encoder, plot_encoder, format_encoder_table, progress
    )


def run_index(
    out_dir: Path,
    device: str,
    quick: bool,
    sizes: tuple[int, ...] = DEFAULT_INDEX_SIZES,
    *,
    progress: bool = True,
) -> str:
    """The index benchmark: ``index.png`` and ``index.json`` in ``out_dir``; returns the
    markdown table. ``quick`` caps the sizes at 1,000 items and shortens every timing."""
    settings: dict[str, Any] = {"device": device, "sizes": sizes}
    if quick:
        settings |= {
            "sizes": tuple(sorted({min(size, 1_000) for size in sizes})),
            "queries": 64,
            "batch_size": 32,
            "max_calls": 5,
            "min_calls": 2,
            "budget_s": 0.1,
        }
    return _run_and_record(
        out_dir, "index", settings, bench_index, plot_index, format_index_table, progress
    )


def _run_and_record(
    out_dir: Path,
    name: str,
    settings: dict[str, Any],
    bench: Callable[..., Sequence[Any]],
    plot: Callable[[Any, Path], None],
    table: Callable[[Any], str],
    progress: bool,
) -> str:
    """Run one benchmark; write ``<name>.json`` and ``<name>.png``; return its table."""
    started = time.perf_counter()
    results = bench(**settings, progress=progress)
    wall_s = time.perf_counter() - started
    _write_json(out_dir / f"{name}.json", name, settings, results, wall_s)
    plot(results, out_dir / f"{name}.png")
    logger.info("%s results written to %s", name, out_dir)
    return table(results)
