"""The cold-item protocol: can a version recommend items it was never trained on?

Items first seen in the last ``fraction`` of the log's time span are *cold*: withheld
from training (``recstream train --protocol cold-items``). At evaluation the version
gets them from their text, as ``recstream add-items`` would (in memory), and every
interaction with a cold item that has a history before it is a test event: the history
(warm and earlier cold items) goes in, the cold item is the target, ranked over every
item with the history's items removed. Baselines, over the cold items only: ``popular``
(most interactions first) and ``random``. The model is also ranked over the cold items
only, beside them, and on the warm items' leave-one-out before and after the cold items
joined its catalogue (adding items must not cost the items it knew).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifacts import LoadedVersion
from model.data import InteractionLog
from model.errors import DataError
from model.evaluate import Metrics, ScoreFn, metrics_from_ranks, rank_targets
from model.item_text import TextEncoder, place_items
from model.sequences import IntArray

logger = logging.getLogger(__name__)

FRACTION = 0.1
KS = (10,)


@dataclass(frozen=True)
class ColdSplit:
    cutoff_ms: int
    cold: frozenset[str]

    def info(self, fraction: float) -> dict[str, Any]:
        return {
            "name": "cold-items",
            "fraction": fraction,
            "cutoff_ms": self.cutoff_ms,
            "cold_items": len(self.cold),
        }


def cold_split(log: InteractionLog, fraction: float = FRACTION) -> ColdSplit:
    """The items first seen at or after ``start + (1 - fraction) * span``.

    :raises DataError: the log has no timestamps, or no item is cold.
    """
    times = [it.ts_ms for it in log.interactions if it.ts_ms is not None]
    if len(times) < len(log.interactions) or not times:
        raise DataError(f"{log.source}: the cold-items protocol needs a timestamp on every event")
    start, end = min(times), max(times)
    cutoff = int(start + (1.0 - fraction) * (end - start))
    first: dict[str, int] = {}
    for it in log.interactions:
        assert it.ts_ms is not None
        if it.ts_ms < first.get(it.item_id, it.ts_ms + 1):
            first[it.item_id] = it.ts_ms
    cold = frozenset(item for item, ts in first.items() if ts >= cutoff)
    if not cold:
        raise DataError(f"{log.source}: no item is first seen in the last {fraction:.0%} of time")
    return ColdSplit(cutoff, cold)


def without(sequences: Mapping[str, list[str]], cold: frozenset[str]) -> dict[str, list[str]]:
    """The training sequences: every cold item removed (users left with none dropped)."""
    out = {user: [i for i in items if i not in cold] for user, items in sequences.items()}
    return {user: items for user, items in out.items() if items}


@dataclass
class Extended:
    """A loaded version with extra items, in memory: scores over all of them."""

    encoder: torch.jit.ScriptModule
    table: torch.Tensor  # [N + 1 + new, dim]
    index: dict[str, int]
    max_len: int

    def score(self, seqs: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.encoder(seqs) @ self.table.T
        return scores


def extend(loaded: LoadedVersion, root: Path, texts: Mapping[str, str], new: Sequence[str],
           encoder: TextEncoder) -> Extended:  # fmt: skip
    """``loaded`` plus the ``new`` items placed from their text, as ``add_items`` does."""
    table = torch.from_numpy(place_items(loaded, root, texts, new, encoder))
    item_ids = [*loaded.item_ids, *new]
    index = {item: i for i, item in enumerate(item_ids) if i}
    return Extended(loaded.encoder, table, index, loaded.max_len)


@torch.no_grad()
def evaluate_cold(
    log: InteractionLog,
    loaded: LoadedVersion,
    root: Path,
    texts: Mapping[str, str],
    *,
    fraction: float = FRACTION,
    seed: int = 0,
    encoder: TextEncoder | None = None,
) -> dict[str, Any]:
    """One JSON-able result: the model and the baselines on cold targets, and the warm
    leave-one-out before and after the cold items joined (see the module's doc)."""
    split = cold_split(log, fraction)
    trained = set(loaded.item_ids)
    if split.cold & trained:
        raise DataError(
            f"version {loaded.version} was trained on {len(split.cold & trained)} of the cold "
            "items: train it with --protocol cold-items on the same data"
        )
    placeable = sorted(i for i in split.cold if i in texts)
    encoder = encoder or TextEncoder()
    before = torch.from_numpy(loaded.item_embeddings)
    ext = extend(loaded, root, texts, placeable, encoder)
    cold_rows = torch.tensor([ext.index[i] for i in placeable], dtype=torch.int64)

    sequences = log.sequences()
    histories: list[IntArray] = []
    targets: list[int] = []
    missing = len(ext.table)  # a cold target without text: scored as a miss
    for items in sequences.values():
        for p in range(1, len(items)):
            if items[p] in split.cold:
                known = [ext.index[i] for i in items[:p] if i in ext.index]
                histories.append(np.array(known, dtype=np.int64))
                targets.append(ext.index.get(items[p], missing))
    if not histories:
        raise DataError("no interaction with a cold item has a history before it")
    target_arr = np.array(targets, dtype=np.int64)

    counts = np.zeros(missing + 1, dtype=np.float32)
    for items in sequences.values():
        for i in items:
            if i in ext.index:
                counts[ext.index[i]] += 1
    only_cold = torch.full((missing + 1,), -torch.inf)
    only_cold[cold_rows] = 0.0
    rng = np.random.default_rng(seed)
    random_scores = torch.from_numpy(rng.random(missing + 1).astype(np.float32))
    popular_scores = torch.from_numpy(counts) + only_cold
    random_cold = random_scores + only_cold

    def model(seqs: torch.Tensor) -> torch.Tensor:
        scores = torch.cat([ext.score(seqs), torch.zeros(len(seqs), 1)], dim=1)
        scores[:, missing] = -torch.inf
        return scores

    def constant(row: torch.Tensor) -> ScoreFn:
        return lambda seqs: row.expand(len(seqs), -1)

    score_fns: dict[str, ScoreFn] = {
        "model": model,
        "model_cold_only": lambda seqs: model(seqs) + only_cold,
        "popular": constant(popular_scores),
        "random": constant(random_cold),
    }
    scored = {
        name: _at_10(metrics_from_ranks(rank_targets(fn, ext.max_len, histories, target_arr)))
        for name, fn in score_fns.items()
    }

    warm = _warm_leave_one_out(sequences, split.cold, loaded, before, ext)
    return {
        "version": loaded.version,
        "protocol": split.info(fraction),
        "cold_items_with_text": len(placeable),
        "test_events": len(histories),
        **scored["model"],
        "cold_only": scored["model_cold_only"],
        "baseline": {"popular": scored["popular"], "random": scored["random"]},
        "warm": warm,
    }


def _at_10(metrics: Metrics) -> dict[str, float]:
    return {key: round(metrics[key], 4) for key in ("hr@10", "ndcg@10")}


def _warm_leave_one_out(
    sequences: Mapping[str, list[str]],
    cold: frozenset[str],
    loaded: LoadedVersion,
    before: torch.Tensor,
    ext: Extended,
) -> dict[str, dict[str, float]]:
    """Each user's last warm item from the warm items before it: ranked among the
    trained items, then among them and the cold items."""
    histories: list[IntArray] = []
    targets: list[int] = []
    for items in without(sequences, cold).values():
        if len(items) >= 2:
            histories.append(np.array([ext.index[i] for i in items[:-1]], dtype=np.int64))
            targets.append(ext.index[items[-1]])
    target_arr = np.array(targets, dtype=np.int64)

    def against(table: torch.Tensor) -> ScoreFn:
        return lambda seqs: ext.encoder(seqs) @ table.T

    tables = {"without_new_items": before, "with_new_items": ext.table}
    return {
        name: _at_10(
            metrics_from_ranks(rank_targets(against(table), loaded.max_len, histories, target_arr))
        )
        for name, table in tables.items()
    }
