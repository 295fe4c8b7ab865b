"""The offline jobs as functions: train and publish a version, evaluate a published one.

The CLI and the periodic retrain call these; they take settings objects and paths and
return plain results, so tests drive them directly.
"""

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifacts import (
    PROJECTION,
    LoadedVersion,
    VersionContents,
    load_version,
    publish_version,
)
from model.config import IndexConfig, TrainConfig
from model.data import (
    InteractionLog,
    SequenceData,
    build_sequence_data,
    load_interactions,
)
from model.evaluate import (
    Metrics,
    evaluate_popularity,
    metrics_from_ranks,
    popularity_order,
    rank_targets,
)
from model.sasrec import script_encoder, takes_event_types
from model.sequences import IntArray, encoder_input, type_codes
from model.train import TrainResult, plot_training_curve, train_sasrec

logger = logging.getLogger(__name__)

CURVE = "training_curve.png"


@dataclass
class PublishedModel:
    version: str
    result: TrainResult


def fingerprint(log: InteractionLog) -> dict[str, Any]:
    """What the model was trained on, for the manifest."""
    digest = hashlib.sha256()
    for it in log.interactions:
        digest.update(f"{it.user_id}\t{it.item_id}\t{it.ts_ms}\n".encode())
    return {
        "source": log.source,
        "format": log.format,
        "interactions": len(log.interactions),
        "skipped_lines": log.skipped,
        "sha256": digest.hexdigest(),
    }


def train_and_publish(
    data: SequenceData,
    data_info: Mapping[str, Any],
    out: Path,
    train_cfg: TrainConfig,
    index_cfg: IndexConfig,
    *,
    progress: bool = True,
    switch: bool = True,
    item_texts: Mapping[str, str] | None = None,
) -> PublishedModel:
    """Train SASRec on ``data`` and publish a complete, servable version under ``out``;
    with ``item_texts`` (item id -> text), its text tower too (``model.item_text``)."""
    result = train_sasrec(data, train_cfg, progress=progress)
    version = publish_trained(
        result, data, data_info, out, index_cfg, switch=switch, item_texts=item_texts
    )
    return PublishedModel(version, result)


def publish_trained(
    result: TrainResult,
    data: SequenceData,
    data_info: Mapping[str, Any],
    out: Path,
    index_cfg: IndexConfig,
    *,
    switch: bool = True,
    extra_info: Mapping[str, Any] | None = None,
    item_texts: Mapping[str, str] | None = None,
) -> str:
    """Publish a trained model as a complete version under ``out``; returns its name.

    ``extra_info`` adds top-level manifest keys (the retrain job records its quality
    gate there).
    """
    model = result.model.cpu().eval()
    popularity = [data.item_ids[i] for i in result.popularity[:1000].tolist() if i]
    info = {
        "model": "sasrec",
        "hyperparameters": result.config.model_dump(),
        "training_data": {
            **data_info,
            "users": len(data.users),
            "items": data.num_items(),
        },
        "metrics": {
            "best_epoch": result.best_epoch,
            "valid": result.valid,
            "test": result.test,
            "popularity_valid": result.popularity_valid,
            "popularity_test": result.popularity_test,
        },
        "training": {
            "wall_s": round(result.wall_s, 1),
            "peak_rss_mb": round(result.peak_rss_mb, 1),
            "epochs_run": len(result.history),
            "torch": torch.__version__,
            "history": [asdict(h) for h in result.history],
        },
        **(extra_info or {}),
    }
    embeddings = model.item_embeddings().detach().numpy().copy()
    extra: dict[str, Callable[[Path], None]] = {
        CURVE: lambda path: plot_training_curve(result.history, path)
    }
    if item_texts is not None:
        from model.item_text import fit_text_tower

        tower = fit_text_tower(data.item_ids, embeddings, dict(item_texts))
        info["text_tower"] = tower.info
        extra[PROJECTION] = tower.projection.save
    contents = VersionContents(
        encoder=script_encoder(model),
        item_embeddings=embeddings,
        item_ids=data.item_ids,
        max_len=result.config.max_len,
        popularity=popularity,
        info=info,
    )

    return publish_version(out, contents, index_cfg, switch=switch, extra_files=extra)


def load_training_data(
    path: Path, fmt: str | None = None, columns: Mapping[str, str] | None = None
) -> tuple[SequenceData, dict[str, Any]]:
    log = load_interactions(path, fmt, columns)
    return build_sequence_data(log.sequences()), fingerprint(log)


@dataclass
class Evaluation:
    version: str
    users: int
    model: Metrics
    popularity: Metrics

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "users": self.users,
            **self.model,
            "popularity": self.popularity,
        }


@dataclass(frozen=True)
class HeldOutRanks:
    """Each test user's 0-based rank of their last item under a version (the number of
    unseen items it scored above it; users in the order of the log), and what
    popularity needs to rank the same users: the item indices each has seen, and the
    targets (``len(item_ids)`` where the version does not know the item)."""

    ranks: IntArray
    seen: list[IntArray]
    targets: IntArray


def held_out_ranks(
    sequences: Mapping[str, list[str]],
    loaded: LoadedVersion,
    *,
    progress: bool = False,
    event_types: Mapping[str, list[str]] | None = None,
) -> HeldOutRanks:
    """Leave-one-out test ranks of a published version on ``sequences`` (as
    :func:`evaluate_version`, user by user)."""
    index = loaded.item_index()
    unknown = len(loaded.item_ids)  # an index no score row has: never ranked
    typed = takes_event_types(loaded.encoder)
    inputs: list[IntArray] = []
    seen: list[IntArray] = []
    targets: list[int] = []
    for user, items in sequences.items():
        if len(items) < 2:
            continue
        history = items[:-1]
        codes = None
        if typed:
            types = event_types[user] if event_types is not None else [""] * len(items)
            codes = type_codes(types[: len(history)])
        known, tokens = encoder_input(history, index, codes)
        seen.append(np.asarray(known, dtype=np.int64))
        inputs.append(np.asarray(tokens, dtype=np.int64))
        targets.append(index.get(items[-1], unknown))
    emb = torch.from_numpy(loaded.item_embeddings)
    # A zero column for unknown targets; its score is set to -inf so it is never a hit.
    emb = torch.cat([emb, torch.zeros(1, emb.size(1))])

    def score(seqs: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = loaded.encoder(seqs) @ emb.T
        scores[:, unknown] = -torch.inf
        return scores

    target_arr = np.array(targets, dtype=np.int64)
    ranks = rank_targets(
        score, loaded.max_len, inputs, target_arr, progress=progress, desc="evaluate", seen=seen
    )
    return HeldOutRanks(ranks, seen, target_arr)


def evaluate_version(
    sequences: Mapping[str, list[str]],
    loaded: LoadedVersion,
    *,
    progress: bool = False,
    event_types: Mapping[str, list[str]] | None = None,
) -> Evaluation:
    """Leave-one-out test metrics of a published version on ``sequences``, beside
    popularity's on the same users.

    Items the version does not know are dropped from histories; a user whose test
    target is unknown still counts (as a miss), so the figure is not flattered. A
    version trained with event types reads them from ``event_types`` (per user, aligned
    with ``sequences``; without them, as not known).
    """
    held_out = held_out_ranks(sequences, loaded, progress=progress, event_types=event_types)
    order = popularity_order(held_out.seen, len(loaded.item_ids))
    pop_scores = evaluate_popularity(order, held_out.seen, held_out.targets)
    model_metrics = metrics_from_ranks(held_out.ranks)
    return Evaluation(loaded.version, len(held_out.ranks), model_metrics, pop_scores)


def evaluate_published(
    data_path: Path, root: Path, fmt: str | None = None, *, progress: bool = False
) -> Evaluation:
    log = load_interactions(data_path, fmt)
    return evaluate_version(
        log.sequences(), load_version(root), progress=progress, event_types=log.event_types()
    )
