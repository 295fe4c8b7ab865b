"""SASRec training with full-ranking validation, early stopping and a training curve."""

import copy
import logging
import math
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.config import HistoryUse, TrainConfig
from model.data import SequenceData, leave_one_out
from model.errors import ConfigError, DataError
from model.evaluate import Metrics, evaluate_model, evaluate_popularity, popularity_order
from model.sasrec import SASRec
from model.sequences import TYPE_BITS, IntArray, pack

logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    seconds: float
    valid_ndcg10: float | None = None
    valid_hr10: float | None = None
    samples_per_s: float = 0.0  # next-item targets trained on per second (validation excluded)


@dataclass
class TrainResult:
    model: SASRec
    best_epoch: int
    valid: Metrics
    test: Metrics
    popularity_valid: Metrics
    popularity_test: Metrics
    popularity: IntArray  # item indices, most popular first, from all known interactions
    config: TrainConfig  # what trained, its auto settings chosen (TrainConfig.resolved)
    history: list[EpochStats] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_matrix(
    prefixes: Sequence[IntArray], max_len: int, history: HistoryUse = "newest"
) -> IntArray:
    """Rows of ``max_len + 1`` items (left-padded); input = row[:-1], target = row[1:].

    ``newest`` keeps each user's newest ``max_len + 1`` items, as SASRec does. ``all``
    also cuts the older items into windows of ``max_len + 1`` that overlap by one item,
    so that every transition of a long history is a target exactly once instead of
    being dropped (at ``max_len`` 100, MovieLens-1M's newest windows hold 45% of its
    transitions). Users with fewer than two items teach nothing and are left out.
    """
    rows: list[IntArray] = []
    for prefix in prefixes:
        if len(prefix) < 2:
            continue
        end = len(prefix)
        while True:
            rows.append(prefix[max(0, end - max_len - 1) : end])
            end -= max_len
            if history == "newest" or end < 2:
                break
    out = np.zeros((len(rows), max_len + 1), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, max_len + 1 - len(row) :] = row
    return out


def pack_rows(matrix: IntArray) -> tuple[IntArray, IntArray]:
    """Training rows (:func:`training_matrix`) packed together where they fit: rows of
    the same width, each holding one or more of ``matrix``'s sequences one after another
    (left-padded), and the segments that say which sequence each item belongs to
    (numbered from 1 in order, 0 for padding; see ``SASRec.forward``).

    Short histories and the oldest windows of long ones are mostly padding, which every
    block computes on; packed, an epoch has the same targets in fewer rows (MovieLens-1M
    at ``max_len`` 100: 24% fewer). Best-fit decreasing: longest first, each into the
    fullest row it fits; rows and their order are the same for the same ``matrix``.
    """
    width = matrix.shape[1]
    lengths = (matrix != 0).sum(axis=1)
    contents: list[list[int]] = []
    # by_free[f]: rows with f places left (a row with fewer than 2 takes nothing more)
    by_free: list[list[int]] = [[] for _ in range(width + 1)]
    for r in np.argsort(-lengths, kind="stable"):
        n = int(lengths[r])
        free = next((f for f in range(n, width + 1) if by_free[f]), None)
        if free is None:
            row, free = len(contents), width
            contents.append([])
        else:
            row = by_free[free].pop()
        contents[row].append(int(r))
        if free - n >= 2:
            by_free[free - n].append(row)
    packed = np.zeros((len(contents), width), dtype=matrix.dtype)
    segments = np.zeros((len(contents), width), dtype=np.int64)
    for i, members in enumerate(contents):
        end = width
        for number, r in zip(range(len(members), 0, -1), reversed(members), strict=True):
            n = int(lengths[r])
            packed[i, end - n : end] = matrix[r, width - n :]
            segments[i, end - n : end] = number
            end -= n
    return packed, segments


def training_rows(
    prefixes: Sequence[IntArray], cfg: TrainConfig
) -> tuple[IntArray, IntArray | None]:
    """The rows training draws its batches from: :func:`training_matrix`'s for ``cfg``,
    and where ``cfg.packing`` is on packed (:func:`pack_rows`) with their segments
    (None otherwise)."""
    matrix = training_matrix(prefixes, cfg.max_len, cfg.history)
    if cfg.packing == "on":
        return pack_rows(matrix)
    return matrix, None


def training_batch(
    matrix: IntArray, segments: IntArray | None, picked: IntArray, device: torch.device
) -> tuple[Tensor, Tensor | None, int]:
    """Rows ``picked`` of :func:`training_rows`' ``matrix`` and ``segments`` as tensors
    on ``device`` (segments None where the rows are not packed), and how many next-item
    targets they hold."""
    rows = matrix[picked]
    segs = None if segments is None else segments[picked]
    targets = int(target_mask(rows, segs).sum())
    as_tensor = None if segs is None else torch.from_numpy(segs).to(device)
    return torch.from_numpy(rows).to(device), as_tensor, targets


def target_mask(rows: IntArray, segments: IntArray | None = None) -> npt.NDArray[np.bool_]:
    """Which positions of training rows (:func:`training_matrix`, or with ``segments``
    :func:`pack_rows`) past the first are next-item targets: an item with one before it
    (in its own sequence)."""
    mask: npt.NDArray[np.bool_] = (rows[:, 1:] != 0) & (rows[:, :-1] != 0)
    if segments is not None:
        mask &= segments[:, 1:] == segments[:, :-1]
    return mask


class NegativeSampler:
    """Negatives for the sampled softmax, drawn with replacement in proportion to how
    often each item is a training target (plus one, so that every item can be drawn),
    and their log-probabilities for the logQ correction.

    Frequent items are the hard negatives a uniform draw almost never picks; subtracting
    ``log q`` from every candidate's logit (Bengio & Senecal; Yi et al., RecSys 2019)
    makes the sampled softmax an unbiased estimate of the full one, instead of one that
    learns to push popular items down.
    """

    def __init__(self, target_counts: IntArray, negatives: int, device: torch.device) -> None:
        weights = target_counts.astype(np.float64) + 1.0
        weights[0] = 0.0  # padding is never a candidate
        probs = torch.from_numpy(weights / weights.sum())
        self.negatives = negatives
        self.probs = probs.float().to(device)
        self.log_q = torch.log(probs.clamp(min=1e-30)).float().to(device)

    @classmethod
    def for_matrix(
        cls,
        matrix: IntArray,
        num_items: int,
        negatives: int,
        device: torch.device,
        segments: IntArray | None = None,
    ) -> "NegativeSampler":
        """From the targets of a :func:`training_matrix` (or, with ``segments``, of
        :func:`pack_rows`)."""
        targets = matrix[:, 1:][target_mask(matrix, segments)]
        return cls(np.bincount(targets, minlength=num_items + 1), negatives, device)

    def draw(self) -> torch.Tensor:
        """Item indices [negatives], shared by a batch's positions."""
        return torch.multinomial(self.probs, self.negatives, replacement=True)


def negative_sampler(
    cfg: TrainConfig,
    items: IntArray,
    num_items: int,
    device: torch.device,
    segments: IntArray | None = None,
) -> NegativeSampler | None:
    """The sampler of ``cfg``'s loss: ``cfg.negatives`` a batch, by the targets of
    ``items`` (a :func:`training_matrix` of item indices, event types taken off, or
    with ``segments`` :func:`pack_rows`) where the loss is sampled-ce; None where it is
    the full softmax."""
    if cfg.loss != "sampled-ce":
        return None
    return NegativeSampler.for_matrix(items, num_items, cfg.negatives, device, segments)


def seen_before(items: Tensor, candidates: Tensor, segments: Tensor | None = None) -> Tensor:
    """Whether each of ``candidates`` [C] is among a row's items up to each position:
    [B, L, C], for item indices ``items`` [B, L] (0 is padding); with ``segments`` [B,
    L] (:func:`pack_rows`), among the items of the position's own sequence."""
    batch, length = items.shape
    positions = torch.arange(length, dtype=torch.int32, device=items.device)
    # Groups of items to look in: each row, or each (row, sequence) pair.
    group = torch.arange(batch, device=items.device).unsqueeze(1)
    groups = batch
    if segments is not None:
        span = int(segments.max()) + 1
        group, groups = group * span + segments, batch * span
    # Each item's slot among the distinct candidates; any other item shares the last.
    unique, slot = torch.unique(candidates, return_inverse=True)
    at = torch.searchsorted(unique, items.contiguous()).clamp(max=len(unique) - 1)
    item_slot = torch.where(unique[at] == items, at, len(unique))
    # first[g, s]: the first position of slot s's item in group g (length: never).
    first = torch.full((groups, len(unique) + 1), length, dtype=torch.int32, device=items.device)
    index = (group * (len(unique) + 1) + item_slot).flatten()
    first.view(-1).scatter_reduce_(0, index, positions.expand(batch, length).flatten(), "amin")
    by_candidate = first[:, slot]
    found = by_candidate.unsqueeze(1) if segments is None else by_candidate[group]
    return found <= positions.view(1, length, 1)


def seen_pairs(
    items: Tensor, mask: Tensor, segments: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each item at or before each position ``mask`` [B, L] selects, in ``items`` [B, L]
    (0 is padding; with ``segments`` [B, L], in the position's own sequence): (the
    position's number among the selected, row-major; the item). Repeated items come
    once per occurrence."""
    length = items.size(1)
    number = mask.flatten().cumsum(0).view(mask.shape) - 1
    earlier = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    pairs = earlier & mask.unsqueeze(2) & (items != 0).unsqueeze(1)
    if segments is not None:
        pairs &= segments.unsqueeze(2) == segments.unsqueeze(1)
    b, at, before = pairs.nonzero(as_tuple=True)
    return number[b, at], items[b, before]


def sequence_loss(
    model: SASRec,
    batch: torch.Tensor,
    sampler: NegativeSampler | None = None,
    *,
    mask_seen: bool = False,
    segments: Tensor | None = None,
) -> torch.Tensor:
    """Next-item cross-entropy at every non-padded position of ``batch`` [B, L + 1]
    (with ``segments``, packed rows: :func:`pack_rows`): over every item, or with
    ``sampler`` over the target and the sampler's negatives.

    With ``mask_seen`` a position's softmax leaves out the items already in its input
    (its target excepted): serving and evaluation rank only unseen items, so the model
    spends nothing on pushing down what the user has had."""
    # Drop columns that are padding for the whole batch: exact (padding is masked), cheaper.
    first = min(int((batch != 0).any(dim=0).nonzero()[0]), batch.size(1) - 2)
    batch = batch[:, first:]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    # A user's first item has no history to predict it from: not a target.
    mask = (targets != 0) & (inputs != 0)
    if segments is not None:
        segments = segments[:, first:]
        mask &= segments[:, 1:] == segments[:, :-1]
        segments = segments[:, :-1]
    hidden = model.user_vectors(model(inputs, segments=segments)[mask])
    if model.temperature > 0:
        hidden = hidden / model.temperature  # scales every logit: cosine / temperature
    target = model.targets(targets[mask])
    emb = model.item_embeddings()
    if sampler is None:
        # Padding (row 0) is never a next item: leave it out of the softmax.
        logits = hidden @ emb[1:].T
        if mask_seen:
            rows, items = seen_pairs(model.targets(inputs), mask, segments)
            other = items != target[rows]
            # Outside autograd: the loss's gradient at a logit is its softmax share, 0
            # once it is -inf, so the gradients are exact and no mask is kept for them.
            with torch.no_grad():
                logits.index_put_((rows[other], items[other] - 1), logits.new_tensor(-torch.inf))
        return F.cross_entropy(logits, target - 1)
    negatives = sampler.draw()
    pos_logits = (hidden * emb[target]).sum(dim=1, keepdim=True) - sampler.log_q[target, None]
    neg_logits = hidden @ emb[negatives].T - sampler.log_q[negatives]
    # A negative that is the position's own target is not a negative.
    drop = negatives.unsqueeze(0) == target.unsqueeze(1)
    if mask_seen:
        drop = drop | seen_before(model.targets(inputs), negatives, segments)[mask]
    neg_logits = neg_logits.masked_fill(drop, -torch.inf)
    logits = torch.cat([pos_logits, neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(target))


def optimizer_for(model: SASRec, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused: one kernel over all parameters instead of one per operation (the
    item table is updated whole every step; ``recstream bench train`` measures it)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=cfg.weight_decay,
        fused=True,
    )


def train_step(
    model: SASRec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batch: Tensor,
    sampler: NegativeSampler | None,
    mask_seen: bool,
    segments: Tensor | None = None,
) -> float:
    """One optimiser step on ``batch`` (:func:`sequence_loss`); its loss."""
    loss = sequence_loss(model, batch, sampler, mask_seen=mask_seen, segments=segments)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning rate's schedule over ``total_steps`` steps, stepped once a step: a
    linear warm-up over ``warmup_steps`` (from 1/``warmup_steps`` of the rate), times a
    cosine decay to 0 over every step where ``lr_schedule`` is cosine. None: constant."""
    schedules: list[torch.optim.lr_scheduler.LRScheduler] = []
    if cfg.warmup_steps > 0:
        schedules.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizer, 1 / cfg.warmup_steps, 1.0, total_iters=cfg.warmup_steps
            )
        )
    if cfg.lr_schedule == "cosine":
        schedules.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps))
    if not schedules:
        return None
    if len(schedules) == 1:
        return schedules[0]
    return torch.optim.lr_scheduler.ChainedScheduler(schedules, optimizer)


def train_sasrec(
    data: SequenceData,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    curve_path: Path | None = None,
) -> TrainResult:
    """Train on leave-one-out prefixes; keep the epoch with the best validation NDCG@10."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    num_items = data.num_items()
    prefixes, valid_targets, test_targets = leave_one_out(data)
    test_inputs = [seq[:-1] for seq in data.sequences]
    # What the model reads: item indices, or with event types tokens (model.sequences.pack).
    model_prefixes, model_test_inputs = prefixes, test_inputs
    if cfg.event_types == "on":
        if data.types is None:
            raise ConfigError("event_types is on, but the training data has no event types")
        model_prefixes = [pack(p, t[: len(p)]) for p, t in zip(prefixes, data.types, strict=True)]
        model_test_inputs = [
            pack(seq, t[: len(seq)]) for seq, t in zip(test_inputs, data.types, strict=True)
        ]
    matrix, segments = training_rows(model_prefixes, cfg)
    if len(matrix) == 0:
        raise DataError("no user has enough interactions to train on (need at least 4 each)")

    cfg = cfg.resolved(num_items, sum(len(seq) for seq in data.sequences))
    items = matrix >> TYPE_BITS if cfg.event_types == "on" else matrix
    sampler = negative_sampler(cfg, items, num_items, device, segments)
    model = SASRec.from_config(num_items, cfg).to(device)
    optimizer = optimizer_for(model, cfg)
    steps_per_epoch = math.ceil(len(matrix) / cfg.batch_size)
    scheduler = lr_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    generator = np.random.default_rng(cfg.seed)
    # Each epoch's validation: every user, or a fixed sample of them on large logs (a
    # full ranking per user costs as much as several training steps).
    watched = np.arange(len(prefixes))
    if 0 < cfg.valid_users < len(prefixes):
        watched = np.sort(generator.choice(len(prefixes), cfg.valid_users, replace=False))
    watch_inputs = [model_prefixes[i] for i in watched]
    watch_seen = [prefixes[i] for i in watched]
    watch_targets = valid_targets[watched]
    logger.info(
        "training SASRec on %s: %d users, %d items, %d parameters, dim=%d, loss=%s, "
        "%d training rows%s",
        device,
        len(data.users),
        num_items,
        sum(p.numel() for p in model.parameters()),
        cfg.width(),
        cfg.loss,
        len(matrix),
        " (packed)" if segments is not None else "",
    )

    # With ema_decay, validation and the kept epoch read an average of the weights over
    # the last steps (torch's AveragedModel) rather than the weights themselves.
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))  # type: ignore[no-untyped-call]
        if cfg.ema_decay
        else None
    )
    kept = model if averaged is None else cast(SASRec, averaged.module)
    history: list[EpochStats] = []
    best_ndcg, best_epoch, best_state, stale = -1.0, 0, copy.deepcopy(kept.state_dict()), 0
    epochs = tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=not progress, unit="epoch")
    for epoch in epochs:
        epoch_start = time.perf_counter()
        model.train()
        order = generator.permutation(len(matrix))
        total, steps, samples = 0.0, steps_per_epoch, 0
        batches = tqdm(
            range(steps), desc=f"epoch {epoch}", disable=not progress, leave=False, unit="batch"
        )
        for step in batches:
            picked = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            batch, segs, targets = training_batch(matrix, segments, picked, device)
            samples += targets
            total += train_step(
                model, optimizer, scheduler, batch, sampler, cfg.seen == "mask", segs
            )
            if averaged is not None:
                averaged.update_parameters(model)
        trained_s = time.perf_counter() - epoch_start
        stats = EpochStats(epoch, total / max(steps, 1), trained_s)
        stats.samples_per_s = round(samples / max(trained_s, 1e-9), 1)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            valid = evaluate_model(
                kept, watch_inputs, watch_targets, seen=watch_seen, progress=progress, desc="valid"
            )
            stats.valid_ndcg10, stats.valid_hr10 = valid["ndcg@10"], valid["hr@10"]
            if valid["ndcg@10"] > best_ndcg:
                best_ndcg, best_epoch, stale = valid["ndcg@10"], epoch, 0
                best_state = copy.deepcopy(kept.state_dict())
            else:
                stale += cfg.eval_every
        history.append(stats)
        epochs.set_postfix(loss=f"{stats.loss:.4f}", ndcg10=f"{best_ndcg:.4f}", best=best_epoch)
        logger.info(
            "epoch %d: loss %.4f, valid ndcg@10 %s, %.1fs (%.0f samples/s)",
            epoch,
            stats.loss,
            "-" if stats.valid_ndcg10 is None else f"{stats.valid_ndcg10:.4f}",
            stats.seconds,
            stats.samples_per_s,
        )
        if stale >= cfg.patience:
            logger.info("early stop: no better validation NDCG@10 for %d epochs", stale)
            break

    model.load_state_dict(best_state)
    model.eval()
    valid = evaluate_model(model, model_prefixes, valid_targets, seen=prefixes)
    test = evaluate_model(
        model, model_test_inputs, test_targets, seen=test_inputs, progress=progress, desc="test"
    )
    # The baseline sees what the model saw: training prefixes for validation, and
    # everything before the test item for test.
    pop_valid = evaluate_popularity(popularity_order(prefixes, num_items), prefixes, valid_targets)
    pop_all = popularity_order(test_inputs, num_items)
    pop_test = evaluate_popularity(pop_all, test_inputs, test_targets)
    result = TrainResult(
        model=model,
        best_epoch=best_epoch,
        valid=valid,
        test=test,
        popularity_valid=pop_valid,
        popularity_test=pop_test,
        popularity=pop_all,
        config=cfg,
        history=history,
        wall_s=time.perf_counter() - started,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if curve_path is not None:
        plot_training_curve(history, curve_path)
    return result


def plot_training_curve(history: Sequence[EpochStats], path: Path) -> None:
    """Loss and validation NDCG@10 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch for h in history]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(epochs, [h.loss for h in history], color="tab:blue", label="training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    ndcg_ax = loss_ax.twinx()
    evaluated = [(h.epoch, h.valid_ndcg10) for h in history if h.valid_ndcg10 is not None]
    ndcg_ax.plot(
        [epoch for epoch, _ in evaluated],
        [ndcg for _, ndcg in evaluated],
        color="tab:orange",
        marker=".",
        label="validation NDCG@10",
    )
    ndcg_ax.set_ylabel("validation NDCG@10", color="tab:orange")
    fig.suptitle("SASRec training")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
