"""FAISS indexes of item embeddings, described by a factory string.

Vectors are the item rows 1..N of the embedding table (padding excluded); FAISS id ``i``
is item index ``i + 1``. The metric is always inner product, matching the model's scores.
"""

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch

from model.config import IndexConfig
from model.errors import IndexBuildError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass
class IndexReport:
    factory: str
    items: int
    build_s: float
    device: str
    recall_at_k: float | None  # None for exact indexes, which are the reference
    k: int


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def is_exact(factory: str) -> bool:
    return factory.strip().replace(" ", "") in {"Flat", "IDMap,Flat"}


def build_index(item_vectors: FloatArray, cfg: IndexConfig) -> tuple[Any, IndexReport]:
    """Build ``cfg.factory`` over [N, d] vectors; approximate indexes get a recall check."""
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    count, dim = vectors.shape
    started = time.perf_counter()
    try:
        index = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexBuildError(f"invalid FAISS factory string {cfg.factory!r}: {exc}") from exc
    if not index.is_trained:
        nlist = getattr(faiss.extract_index_ivf(index), "nlist", 0) if "IVF" in cfg.factory else 0
        if nlist and count < nlist:
            raise IndexBuildError(
                f"{cfg.factory!r} needs at least {nlist} items to train, the catalogue has "
                f"{count}: use fewer lists or 'Flat'"
            )
    # HNSW has no GPU version in FAISS; everything else trains and searches there.
    index, device = to_device(index, "cpu" if "HNSW" in cfg.factory else cfg.device)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    configure_search(index, cfg)
    build_s = time.perf_counter() - started
    k = min(10, count)
    recall = None if is_exact(cfg.factory) else recall_against_exact(index, vectors, cfg, k)
    report = IndexReport(cfg.factory, count, build_s, device, recall, k)
    logger.info(
        "built index %s over %d items in %.2fs%s",
        cfg.factory,
        count,
        build_s,
        "" if recall is None else f", recall@{k} vs exact {recall:.4f}",
    )
    return index, report


def configure_search(index: Any, cfg: IndexConfig) -> None:
    """Apply query-time parameters (nprobe, efSearch) where the index has them."""
    # The CPU ParameterSpace cannot set nprobe on a GPU IVF index (it raises, which is
    # suppressed below), which would leave it searching one list.
    on_gpu = "Gpu" in type(index).__name__ and hasattr(faiss, "GpuParameterSpace")
    params = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in (("nprobe", cfg.nprobe), ("efSearch", cfg.ef_search)):
        with contextlib.suppress(RuntimeError):  # this index type has no such parameter
            params.set_index_parameter(index, name, value)


def recall_against_exact(index: Any, vectors: FloatArray, cfg: IndexConfig, k: int) -> float:
    """Mean recall@k of ``index`` against brute force, on queries drawn from the items.

    Item vectors perturbed with noise stand in for user vectors, which live in the
    same space; the draw is seeded so the figure is reproducible.
    """
    rng = np.random.default_rng(0)
    count = len(vectors)
    picks = rng.choice(count, size=min(cfg.recall_queries, count), replace=False)
    scale = float(np.std(vectors)) or 1.0
    noise = rng.normal(0, scale, size=(len(picks), vectors.shape[1]))
    queries = (vectors[picks] + noise).astype(np.float32)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / (len(queries) * k)


def to_device(index: Any, device: str) -> tuple[Any, str]:
    """Move ``index`` to a GPU when asked for (or when ``auto`` finds one)."""
    if device == "cpu" or (device == "auto" and not gpu_available()):
        return index, "cpu"
    if not gpu_available():
        raise IndexBuildError("index device 'cuda' requested but this FAISS build has no GPU")
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
    # Keep the resources alive as long as the index.
    setattr(gpu_index, "referenced_resources", resources)  # noqa: B010
    return gpu_index, "cuda"


def save_index(index: Any, path: Path) -> None:
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def load_index(path: Path, cfg: IndexConfig) -> Any:
    index = faiss.read_index(str(path))
    configure_search(index, cfg)
    return index


def flat_vectors(index: Any) -> FloatArray | None:
    """The vectors of an exact inner-product index in host memory, as a view (no copy);
    None for any other index (approximate, on a GPU, or another metric)."""
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    raw = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
    return np.asarray(raw).reshape(index.ntotal, index.d)


class ExactScorer:
    """Exact inner-product top-k over a flat index's vectors, for batches of CPU queries.

    One matrix product, then a top-k in two steps. The vectors are copied once (their
    memory twice over), transposed to [d, n], which the product runs on faster than on
    FAISS's [n, d] rows. The scores are cut into blocks of ``block`` items; the k best
    items lie in at most k blocks, whose maxima are then among the k largest block
    maxima, so a top-k over the maxima and another over those blocks' items is exact,
    and costs about one pass over the scores, where a top-k over every item costs
    about as much as the product. 1.15-1.6x faster than a product over FAISS's rows
    and a top-k over every item, 2-3.6x faster than FAISS's flat scan, for 5-90 queries
    over 55k items (scripts/compare_search.py; docs/benchmarks.md). Large batches are
    scored in chunks of rows, at most ``max_score_mb`` of scores at a time.
    """

    def __init__(self, vectors: FloatArray, block: int = 64, max_score_mb: float = 32) -> None:
        items, dim = vectors.shape
        self.items, self.block = items, block
        padded = np.zeros((dim, -(-items // block) * block), dtype=np.float32)
        padded[:, :items] = vectors.T
        self.vectors_t = torch.from_numpy(padded)
        # Queries are scored this many rows at a time: a batch's [rows, items] score
        # matrix would otherwise grow with the batch (4,096 queries over 1M items: 16 GiB).
        self.chunk_rows = max(1, int(max_score_mb * 2**20 // (4 * padded.shape[1])))

    @classmethod
    def of(cls, index: Any) -> "ExactScorer | None":
        """A scorer for an exact inner-product index in host memory, else None."""
        vectors = flat_vectors(index)
        return None if vectors is None else cls(vectors)

    def top_k(self, queries: FloatArray, k: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Scores and 0-based item positions of the ``k`` best items per query row."""
        if len(queries) <= self.chunk_rows:
            return self._top_k(queries, k)
        parts = [
            self._top_k(queries[start : start + self.chunk_rows], k)
            for start in range(0, len(queries), self.chunk_rows)
        ]
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    @torch.inference_mode()
    def _top_k(self, queries: FloatArray, k: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        rows = len(queries)
        scores = torch.from_numpy(queries) @ self.vectors_t
        scores[:, self.items :] = -torch.inf  # the padding of the last block
        blocks = scores.shape[1] // self.block
        if k * 4 >= blocks:  # few blocks: one top-k over every item is as cheap
            top = torch.topk(scores, k)
            return top.values.numpy(), top.indices.numpy()
        by_block = scores.view(rows, blocks, self.block)
        best = torch.topk(by_block.amax(dim=2), k).indices  # [rows, k]
        candidates = torch.gather(by_block, 1, best.unsqueeze(2).expand(-1, -1, self.block))
        top = torch.topk(candidates.reshape(rows, -1), k)
        positions = (best.unsqueeze(2) * self.block + torch.arange(self.block)).reshape(rows, -1)
        return top.values.numpy(), positions.gather(1, top.indices).numpy()


def search(
    index: Any, queries: FloatArray, k: int, scorer: ExactScorer | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k scores and item indices (1-based, -1 padded to 0) for [B, d] queries.

    With ``scorer`` (``ExactScorer.of(index)``, made once per index), batches of
    queries run through it; single queries and other indexes go through FAISS.
    """
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if scorer is not None and len(queries) > 1:
        scores, ids = scorer.top_k(queries, k)
    else:
        scores, ids = index.search(queries, k)
    return scores, np.where(ids >= 0, ids + 1, 0).astype(np.int64)
