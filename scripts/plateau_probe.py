"""Does training leave the popularity plateau, and how soon? The first steps of
``recstream train``, variant by variant, with the mean training loss of every
``--every`` steps.

A SASRec model first learns popularity (on MovieLens-1M a loss of about 7.46, where a
uniform guess is ln 3416 = 8.14) and only then what the sequence says. A model that
stays on that plateau for epochs ranks like popularity, and its validation NDCG@10 says
so only after a whole epoch. Each variant is a ``TRAIN`` setting (or several, joined by
``+``) over the ``RECSTREAM_TRAIN__*`` configuration; all take the same batches, in the
same order, from the same seed. Event types are not read.

    .venv/bin/python scripts/plateau_probe.py ../shared/data/ml-1m/ml-1m_sasrec_reconstructed.txt \\
        --variants blocks=3 blocks=3+warmup_steps=200 blocks=4 blocks=4+warmup_steps=200
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from model.config import TrainConfig
from model.data import build_sequence_data, leave_one_out, load_interactions
from model.sasrec import SASRec
from model.train import (
    lr_scheduler,
    negative_sampler,
    optimizer_for,
    seed_everything,
    train_step,
    training_batch,
    training_rows,
)
from stream_worker.settings import Settings


def variant(base: TrainConfig, spec: str) -> TrainConfig:
    """``base`` with the settings of ``spec`` (``name=value+name=value``); a bad one
    ends the script with one line."""
    parts = [part.split("=", 1) for part in spec.split("+")]
    update = {part[0]: part[1] for part in parts if len(part) == 2}
    unknown = [p[0] for p in parts if len(p) != 2 or p[0] not in TrainConfig.model_fields]
    if unknown:
        raise SystemExit(f"error: {spec!r}: {unknown[0]!r} is not a training setting (name=value)")
    try:
        return TrainConfig.model_validate(base.model_dump() | update)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SystemExit(f"error: {spec!r}: {first['loc'][0]}: {first['msg']}") from None


def probe(
    cfg: TrainConfig,
    matrix: np.ndarray,
    segments: np.ndarray | None,
    num_items: int,
    order: np.ndarray,
    every: int,
    total: int,
) -> tuple[list[float], float]:
    """Mean loss of each ``every`` steps over the first ``total`` on ``matrix`` (packed
    where ``segments``); targets per second."""
    seed_everything(cfg.seed)
    model = SASRec.from_config(num_items, cfg)
    optimizer = optimizer_for(model, cfg)
    steps_per_epoch = -(-len(matrix) // cfg.batch_size)
    scheduler = lr_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    sampler = negative_sampler(cfg, matrix, num_items, torch.device("cpu"), segments)
    model.train()
    losses, window, targets, started = [], 0.0, 0, time.perf_counter()
    for step in range(total):
        picked = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        batch, segs, held = training_batch(matrix, segments, picked, torch.device("cpu"))
        targets += held
        window += train_step(model, optimizer, scheduler, batch, sampler, cfg.seen == "mask", segs)
        if (step + 1) % every == 0:
            losses.append(window / every)
            window = 0.0
            print(f"  step {step + 1}: loss {losses[-1]:.3f}", flush=True)
    return losses, targets / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("data", type=Path, help="an interaction log recstream train reads")
    parser.add_argument("--variants", nargs="+", required=True, help="e.g. blocks=4+lr=0.002")
    parser.add_argument("--steps", type=int, default=400, help="steps per variant")
    parser.add_argument("--every", type=int, default=100, help="steps per reported mean")
    args = parser.parse_args()
    base = Settings().train
    configs = [variant(base, spec) for spec in args.variants]  # bad ones end it here
    data = build_sequence_data(load_interactions(args.data).sequences())
    num_items = data.num_items()
    prefixes, _, _ = leave_one_out(data)
    events = sum(len(seq) for seq in data.sequences)
    rows: list[str] = []
    for spec, chosen in zip(args.variants, configs, strict=True):
        cfg = chosen.resolved(num_items, events)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        matrix, segments = training_rows(prefixes, cfg)
        rng = np.random.default_rng(cfg.seed)
        epochs = -(-args.steps * cfg.batch_size // len(matrix))  # an epoch a permutation
        order = np.concatenate([rng.permutation(len(matrix)) for _ in range(epochs)])
        print(f"{spec}:", flush=True)
        losses, speed = probe(cfg, matrix, segments, num_items, order, args.every, args.steps)
        rows.append(f"| {spec} | {', '.join(f'{x:.3f}' for x in losses)} | {speed:,.0f} |")
    print(f"\n| variant | mean loss of each {args.every} steps | targets/s |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
