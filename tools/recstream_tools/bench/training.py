"""Training speed: what one optimiser step costs, variant by variant, side by side.

Each variant is a model and optimiser of its own, trained on the dataset's real
training rows (``model.train.training_rows``). The variants take turns, a few steps
each, for several rounds, so that a machine that speeds up or slows down over the run
weighs on all of them alike; each variant's median step time, next-item targets per
second and ratio to the first variant are printed, with the epoch each would take. One
full-ranking validation pass (every user, as each epoch runs it) is timed too.

Variants (``--variants``, in this order by default):

- ``torch-dropout``: ``nn.Dropout``'s draw (one Bernoulli sample per element), as
  training ran before ``ByteDropout``;
- ``base``: the training loop as it runs now;
- ``bf16``: ``torch.autocast`` to bfloat16 around the forward pass and loss;
- ``batch-128``, ``batch-512``: larger batches (the same targets per epoch in fewer
  steps; training scales the rate, this measures only speed);
- ``sampled``: the sampled softmax (``loss`` sampled-ce, ``negatives`` as configured)
  instead of the full one;
- ``foreach-adamw``: AdamW's multi-tensor implementation, as training ran before the
  fused one;
- ``keep-seen``: each position's softmax over every item, the user's own earlier items
  included, as training ran before ``seen`` mask;
- ``packed``: rows packed together (``packing`` on, ``model.train.pack_rows``), batches
  of ``batch_size`` packed rows;
- ``distance-bias``: each block's attention with its learnt bias by query-to-key
  distance (``distance_bias`` on).
"""

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import TrainConfig
from model.data import SequenceData, leave_one_out
from model.errors import ConfigError
from model.evaluate import evaluate_model
from model.sasrec import ByteDropout, SASRec
from model.train import (
    negative_sampler,
    optimizer_for,
    sequence_loss,
    target_mask,
    training_batch,
    training_rows,
)

logger = logging.getLogger(__name__)

VARIANTS = (
    "torch-dropout",
    "base",
    "bf16",
    "batch-128",
    "batch-512",
    "sampled",
    "foreach-adamw",
    "keep-seen",
    "packed",
    "distance-bias",
)


class TorchDropout(ByteDropout):
    """``ByteDropout`` drawing its mask as ``nn.Dropout`` does, for comparison."""

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, True)


@dataclass
class VariantSpeed:
    name: str
    batch_size: int
    step_ms: list[float] = field(default_factory=list)
    targets: int = 0  # next-item targets in the timed steps

    @property
    def targets_per_s(self) -> float:
        return self.targets / (sum(self.step_ms) / 1000) if self.step_ms else 0.0


@dataclass
class TrainingSpeed:
    dataset: str
    items: int
    rows: int
    targets_per_epoch: int
    config: dict[str, object]
    variants: list[VariantSpeed]
    validation_s: float


@dataclass
class _Runner:
    speed: VariantSpeed
    model: SASRec
    matrix: np.ndarray  # the rows it draws batches from
    segments: np.ndarray | None  # where they are packed
    step: Callable[[Tensor, Tensor | None], None]

    def draw(self, rng: np.random.Generator) -> tuple[Tensor, Tensor | None, int]:
        """A batch of random rows, their segments, and how many targets they hold."""
        picked = rng.integers(0, len(self.matrix), self.speed.batch_size)
        return training_batch(self.matrix, self.segments, picked, torch.device("cpu"))


def _runner(
    name: str,
    cfg: TrainConfig,
    num_items: int,
    rows: tuple[np.ndarray, np.ndarray | None],
    device: torch.device,
) -> _Runner:
    """Variant ``name``'s model, optimiser and step, drawing from ``rows``
    (:func:`model.train.training_rows`)."""
    torch.manual_seed(cfg.seed)
    matrix, segments = rows
    batch_size = int(name.split("-")[1]) if name.startswith("batch-") else cfg.batch_size
    if name == "distance-bias":
        cfg = cfg.model_copy(update={"distance_bias": "on"})
    model = SASRec.from_config(num_items, cfg).to(device)
    if name == "torch-dropout":
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, ByteDropout):
                    setattr(parent, child_name, TorchDropout(child.p))
    # The loop's optimiser (model.train.optimizer_for), or AdamW's multi-tensor
    # implementation as training ran before it.
    optimizer = (
        torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=(0.9, 0.98),
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
        if name == "foreach-adamw"
        else optimizer_for(model, cfg)
    )
    sampler = negative_sampler(
        cfg.model_copy(update={"loss": "sampled-ce"}) if name == "sampled" else cfg,
        matrix,
        num_items,
        device,
        segments,
    )
    mask_seen = cfg.seen == "mask" and name != "keep-seen"
    model.train()

    def step(batch: Tensor, segs: Tensor | None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            loss = sequence_loss(model, batch, sampler, mask_seen=mask_seen, segments=segs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return _Runner(VariantSpeed(name, batch_size), model, matrix, segments, step)


def run_training_speed(
    name: str,
    data: SequenceData,
    cfg: TrainConfig,
    variants: list[str],
    rounds: int,
    steps: int,
    out_dir: Path,
) -> str:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cpu")
    num_items = data.num_items()
    cfg = cfg.resolved(num_items, sum(len(seq) for seq in data.sequences))
    prefixes, valid_targets, _ = leave_one_out(data)
    # Each kind of rows built once: as configured, and packed for the packed variant.
    rows = training_rows(prefixes, cfg)
    packed = rows
    if "packed" in variants:
        packed = training_rows(prefixes, cfg.model_copy(update={"packing": "on"}))
    per_epoch = int(target_mask(*rows).sum())
    runners = [
        _runner(v, cfg, num_items, packed if v == "packed" else rows, device) for v in variants
    ]
    rng = np.random.default_rng(cfg.seed)
    for runner in runners:  # warm-up: allocator, kernels' first calls
        for _ in range(2):
            runner.step(*runner.draw(rng)[:2])
    for round_ in range(rounds):
        for runner in runners:
            for _ in range(steps):
                batch, segments, targets = runner.draw(rng)
                started = time.perf_counter()
                runner.step(batch, segments)
                runner.speed.step_ms.append((time.perf_counter() - started) * 1000)
                runner.speed.targets += targets
        logger.info("round %d of %d done", round_ + 1, rounds)
    model = runners[0].model.eval()
    started = time.perf_counter()
    evaluate_model(model, prefixes, valid_targets)
    validation_s = time.perf_counter() - started
    result = TrainingSpeed(
        name,
        num_items,
        len(rows[0]),
        per_epoch,
        cfg.model_dump(include={"dim", "max_len", "blocks", "batch_size", "loss", "negatives"}),
        [r.speed for r in runners],
        round(validation_s, 2),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"training-{name}.json").write_text(json.dumps(asdict(result), indent=2))
    return _table(result)


def _table(result: TrainingSpeed) -> str:
    base = result.variants[0].targets_per_s
    lines = [
        f"{result.dataset}: {result.items:,} items, {result.rows:,} training rows, "
        f"{result.targets_per_epoch:,} targets per epoch; {result.config}",
        "",
        "| variant | batch | median step ms | targets/s | vs first | epoch s |",
        "|---|---|---|---|---|---|",
    ]
    for v in result.variants:
        tps = v.targets_per_s
        lines.append(
            f"| {v.name} | {v.batch_size} | {statistics.median(v.step_ms):.0f} | {tps:,.0f} "
            f"| {tps / base:.2f}x | {result.targets_per_epoch / tps:.0f} |"
        )
    lines.append("")
    lines.append(f"one validation pass (every user, full ranking): {result.validation_s:.1f} s")
    return "\n".join(lines)


def write_synthetic_log(path: Path, users: int, items: int, length: int, seed: int = 0) -> int:
    """A TSV log (``user_id item_id timestamp``) the size of a large public one, for
    timing only: each user's ``length`` items (on average, geometric) drawn from a
    Zipf-like popularity over ``items`` (exponent 0.8: a long tail in which nearly every
    item occurs), each item followed by one of its 20 "neighbours" half of the time, so
    that sequences carry signal. Returns the number of events written."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    weights /= weights.sum()
    lengths = np.maximum(3, rng.geometric(1.0 / length, size=users))
    total = int(lengths.sum())
    popular = rng.choice(items, size=total, p=weights)
    follow = rng.random(total) < 0.5
    steps = rng.integers(1, 21, size=total)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write("user_id\titem_id\ttimestamp\n")
        at = 0
        for user, n in enumerate(lengths):
            item = int(popular[at])
            for position in range(int(n)):
                if position and follow[at]:
                    item = (item + int(steps[at])) % items
                elif position:
                    item = int(popular[at])
                out.write(f"u{user}\ti{item}\t{1_600_000_000 + position}\n")
                at += 1
    return total
