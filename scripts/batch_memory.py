"""Peak memory and time of one large worker batch: many users, all at full length.

The worst case for a micro-batch of ``WORKER__BATCH_SIZE`` events is that every event
comes from another user whose history is already at ``max_len``: every history is
encoded in full and searched. This runs one such batch through ``Recommender.recommend``
on the end-to-end benchmark's untrained, production-shaped SASRec (``max_len`` 200,
dim 64) over an exact index, on one thread, and prints the wall time and the process's
resident memory before the batch and at its peak. One configuration per process, so
that each peak is its own:

    .venv/bin/python scripts/batch_memory.py --users 4096
    .venv/bin/python scripts/batch_memory.py --users 4096 --encode-rows 100000 --score-mb 100000

(the second lifts the worker's limits on rows per encoder call and on the score
matrix, as before they existed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.index import ExactScorer, flat_vectors
from recstream_tools.bench.e2e import Replay, proc_status_mib, publish_bench_model
from stream_worker.recommender import ENCODE_ROWS, Recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4096)
    parser.add_argument("--items", type=int, default=55_368, help="catalogue size (Taobao's)")
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--encode-rows", type=int, default=ENCODE_ROWS)
    parser.add_argument("--score-mb", type=float, default=None, help="ExactScorer's limit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    items = [f"i{n}" for n in range(args.items)]
    with tempfile.TemporaryDirectory() as tmp:
        replay = Replay("synthetic", ["u"] * len(items), items, ["click"] * len(items))
        publish_bench_model(replay, Path(tmp), args.max_len)
        recommender = Recommender.load(Path(tmp), device="cpu")
    recommender.encode_rows = args.encode_rows
    vectors = flat_vectors(recommender.index)
    if args.score_mb is not None and vectors is not None:
        recommender.scorer = ExactScorer(vectors, max_score_mb=args.score_mb)
    picks = rng.integers(0, args.items, size=(args.users, args.max_len))
    sequences = {f"user-{u}": [items[i] for i in row] for u, row in enumerate(picks)}
    Path("/proc/self/clear_refs").write_text("5")  # peak := now (Linux)
    before = proc_status_mib("self", "VmRSS")
    started = time.perf_counter()
    ranked = recommender.recommend(sequences, 10)
    seconds = time.perf_counter() - started
    peak = proc_status_mib("self", "VmHWM")
    assert len(ranked) == args.users
    print(
        f"users {args.users}, items {args.items}, max_len {args.max_len}, "
        f"encode rows {args.encode_rows}, score MB {args.score_mb or 'default'}: "
        f"{seconds:.2f} s, RSS {before:.0f} MiB before, peak {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
