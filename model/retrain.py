"""The periodic retrain: fresh sequences, a new model, a quality gate, then the switch.

One run, under an exclusive lock on the artifact root:

1. read every user's stored sequence (the caller passes a loader, so this module does
   no database I/O of its own) and build the leave-one-out split;
2. score the live version on the new validation split: the fair comparison, since the
   figure in its manifest was measured on older data;
3. train a candidate and apply :func:`quality_gate` to the two validation NDCG@10s;
4. publish the candidate (encoder, embeddings, index, manifest with both figures) and
   switch ``CURRENT``, unless ``CURRENT`` moved during the run (a rollback): then the
   version is published but not switched.

Any failure before step 4 leaves the artifact root as it was; a failure while
publishing removes the half-written version, and ``CURRENT`` moves only last.
"""

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from model.artifacts import CURRENT, load_version, read_current, switch_current
from model.config import IndexConfig, TrainConfig
from model.data import SequenceData, build_sequence_data
from model.errors import NotEnoughData, RetrainLocked
from model.evaluate import Metrics
from model.pipeline import evaluate_version, publish_trained
from model.sequences import type_names
from model.train import train_sasrec

logger = logging.getLogger(__name__)

LOCK_FILE = ".retrain.lock"
NDCG = "ndcg@10"


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str


def quality_gate(candidate: float, live: float | None, margin: float) -> GateDecision:
    """Publish unless ``candidate`` is below ``live`` by more than ``margin`` (absolute).

    Both figures must come from the same validation data. No live version: publish.
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if not math.isfinite(candidate):
        return GateDecision(False, f"candidate validation NDCG@10 is {candidate}")
    if live is None:
        return GateDecision(True, "no live version to compare with")
    floor = live - margin
    if candidate < floor:
        return GateDecision(
            False,
            f"candidate validation NDCG@10 {candidate:.4f} is below the live version's "
            f"{live:.4f} by more than the margin {margin:g}",
        )
    return GateDecision(
        True,
        f"candidate validation NDCG@10 {candidate:.4f} >= live {live:.4f} - margin {margin:g}",
    )


def validation_split(data: SequenceData) -> dict[str, list[str]]:
    """Each user's sequence without its test item, as external ids.

    :func:`model.pipeline.evaluate_version` takes the last item as the target and the
    rest as history: exactly the validation case the training run scores.
    """
    return {
        user: [data.item_ids[i] for i in seq[:-1].tolist()]
        for user, seq in zip(data.users, data.sequences, strict=True)
    }


def validation_types(data: SequenceData) -> dict[str, list[str]] | None:
    """The event types of :func:`validation_split`'s items (None: the data has none)."""
    if data.types is None:
        return None
    return {
        user: type_names("".join(str(c) for c in codes[:-1].tolist()))
        for user, codes in zip(data.users, data.types, strict=True)
    }


def sequences_fingerprint(sequences: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for user in sorted(sequences):
        digest.update(user.encode())
        digest.update(b"\t")
        digest.update("\x1f".join(sequences[user]).encode())
        digest.update(b"\n")
    return {
        "users_in_store": len(sequences),
        "interactions": sum(len(s) for s in sequences.values()),
        "sha256": digest.hexdigest(),
    }


@contextmanager
def retrain_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """Hold ``ROOT/.retrain.lock`` (an OS lock: released when its holder dies).

    ``timeout_s`` 0 tries once; otherwise waits that long, then raises
    :class:`RetrainLocked`.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    lock = FileLock(path, timeout=timeout_s, blocking=timeout_s > 0)
    try:
        lock.acquire()
    except Timeout:
        waited = f"waited {timeout_s:g}s" if timeout_s > 0 else "not waiting"
        raise RetrainLocked(
            f"another retrain is running on {root} (lock {path} is held; {waited}): "
            "nothing was changed"
        ) from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class RetrainOutcome:
    decision: GateDecision
    users: int
    candidate_valid: Metrics
    candidate_test: Metrics
    live_version: str | None
    live_valid: Metrics | None  # the live version on the same validation split
    live_recorded_valid: float | None  # the figure in its manifest (older data)
    quality_margin: float
    version: str | None = None  # the published version; None when refused
    switched: bool = False
    wall_s: float = 0.0

    @property
    def published(self) -> bool:
        return self.version is not None

    def gate_record(self) -> dict[str, Any]:
        """What the new version's manifest keeps under ``retrain``."""
        return {
            "live_version": self.live_version,
            f"candidate_valid_{NDCG}": self.candidate_valid[NDCG],
            f"live_valid_{NDCG}": None if self.live_valid is None else self.live_valid[NDCG],
            "live_valid": self.live_valid,
            f"live_recorded_valid_{NDCG}": self.live_recorded_valid,
            "quality_margin": self.quality_margin,
            "decision": self.decision.reason,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "switched": self.switched,
            "version": self.version,
            "live_version": self.live_version,
            f"candidate_valid_{NDCG}": self.candidate_valid[NDCG],
            f"live_valid_{NDCG}": None if self.live_valid is None else self.live_valid[NDCG],
            f"live_recorded_valid_{NDCG}": self.live_recorded_valid,
            f"candidate_test_{NDCG}": self.candidate_test[NDCG],
            "quality_margin": self.quality_margin,
            "users": self.users,
            "reason": self.decision.reason,
            "wall_s": round(self.wall_s, 1),
        }


def _current_or_none(root: Path) -> str | None:
    return read_current(root) if (root / CURRENT).exists() else None


def run_retrain(
    root: Path,
    load_sequences: Callable[[], Mapping[str, Sequence[str]]],
    source: Mapping[str, Any],
    train_cfg: TrainConfig,
    index_cfg: IndexConfig,
    *,
    quality_margin: float,
    min_users: int,
    lock_timeout_s: float = 0.0,
    progress: bool = False,
    item_texts: Mapping[str, str] | None = None,
    load_types: Callable[[], Mapping[str, str]] | None = None,
) -> RetrainOutcome:
    """One retrain run (see the module docstring); returns what happened.

    A refusal by the quality gate is an outcome (``published`` false), not an
    exception: the caller decides how to report it. Raises :class:`RetrainLocked`,
    :class:`NotEnoughData` and the errors of loading, training and publishing; none of
    them changes ``CURRENT``. With event types on, ``load_types`` gives each user's
    stored type codes (one digit per item, as the worker keeps them).
    """
    started = time.perf_counter()
    with retrain_lock(root, lock_timeout_s):
        live_version = _current_or_none(root)
        sequences = load_sequences()
        types = None
        if train_cfg.event_types == "on" and load_types is not None:
            types = {user: type_names(codes) for user, codes in load_types().items()}
            types = {user: types.get(user, [""] * len(seq)) for user, seq in sequences.items()}
        data = build_sequence_data(sequences, min_length=3, event_types=types)
        if len(data.users) < min_users:
            raise NotEnoughData(
                f"only {len(data.users)} users have 3 or more items "
                f"(RECSTREAM_RETRAIN__MIN_USERS={min_users}): nothing published, "
                "CURRENT unchanged"
            )
        logger.info(
            "retrain on %d users (%d stored), %d items; live version %s",
            len(data.users),
            len(sequences),
            data.num_items(),
            live_version or "none",
        )

        live_valid: Metrics | None = None
        live_recorded: float | None = None
        if live_version is not None:
            # Before training: a broken live version fails the run in seconds, not hours.
            live = load_version(root, live_version, load_index_file=False)
            live_valid = evaluate_version(
                validation_split(data), live, event_types=validation_types(data)
            ).model
            recorded = live.manifest.get("metrics", {}).get("valid", {}).get(NDCG)
            live_recorded = float(recorded) if isinstance(recorded, int | float) else None
            logger.info(
                "live version %s: validation NDCG@10 %.4f on this data (%s in its manifest)",
                live_version,
                live_valid[NDCG],
                "n/a" if live_recorded is None else f"{live_recorded:.4f}",
            )

        result = train_sasrec(data, train_cfg, progress=progress)
        decision = quality_gate(
            result.valid[NDCG], None if live_valid is None else live_valid[NDCG], quality_margin
        )
        outcome = RetrainOutcome(
            decision=decision,
            users=len(data.users),
            candidate_valid=result.valid,
            candidate_test=result.test,
            live_version=live_version,
            live_valid=live_valid,
            live_recorded_valid=live_recorded,
            quality_margin=quality_margin,
        )
        if not decision.publish:
            logger.warning("quality gate refused the new model: %s", decision.reason)
            outcome.wall_s = time.perf_counter() - started
            return outcome

        data_info = {"format": "database", **source, **sequences_fingerprint(sequences)}
        version = publish_trained(
            result,
            data,
            data_info,
            root,
            index_cfg,
            switch=False,
            extra_info={"retrain": outcome.gate_record()},
            item_texts=item_texts,
        )
        outcome.version = version
        now_live = _current_or_none(root)
        if now_live != live_version:
            # Someone pointed CURRENT elsewhere meanwhile (a rollback): theirs stands.
            logger.warning(
                "CURRENT moved from %s to %s during the run: published %s without switching",
                live_version,
                now_live,
                version,
            )
        else:
            switch_current(root, version)
            outcome.switched = True
        outcome.wall_s = time.perf_counter() - started
        return outcome
