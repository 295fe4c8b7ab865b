"""Accuracy benchmark: train and evaluate SASRec on the shared real datasets.

Runs the public commands (``recstream train`` then ``recstream evaluate``) for each
dataset, under ``/usr/bin/time -v`` for wall time and peak memory, and prints one
markdown row per dataset. The data is read from ``../shared/data`` at run time.

    .venv/bin/python scripts/bench_accuracy.py ml-100k taobao
    .venv/bin/python scripts/bench_accuracy.py ml-1m --out bench-out/accuracy
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Per-dataset training settings (RECSTREAM_TRAIN__* overrides).
DATASETS: dict[str, tuple[str, dict[str, str]]] = {
    "ml-1m": (
        "ml-1m/ml-1m_sasrec_reconstructed.txt",
        # dim 64 (the published recipe's) plateaus near valid NDCG@10 0.157; dim 256 over
        # the newest 100 items, annealed to lr 0, learns more per epoch; batches of 32
        # and the SASRec paper's block reach a higher plateau sooner; training on every
        # item of the long histories (2.2x the rows) lifts the plateau past the bar.
        {
            "DIM": "256",
            "MAX_LEN": "100",
            "DROPOUT": "0.2",
            "LR": "1e-3",
            "LR_SCHEDULE": "cosine",
            "EPOCHS": "20",
            "PATIENCE": "20",
            "BATCH_SIZE": "32",
            "BLOCK": "sasrec",
            "HISTORY": "all",
        },
    ),
    "ml-100k": (
        "ml-100k/ml-100k.inter",
        {"LR": "2e-3", "PATIENCE": "10", "EPOCHS": "200"},
    ),
    # 55k items: a full softmax per position does not fit; sampled negatives do.
    "taobao": (
        "ecommerce/taobao_UserBehavior_head.csv",
        {
            "LOSS": "sampled-ce",
            "NEGATIVES": "1024",
            "LR": "2e-3",
            "PATIENCE": "10",
            "EPOCHS": "200",
        },
    ),
}


def run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (MiB) of ``cmd``; its log (per-epoch lines)
    goes to ``log`` as it runs."""
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], env=env, stdout=subprocess.PIPE, stderr=err,
            text=True, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - started
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return proc.stdout, wall, int(rss.group(1)) / 1024 if rss else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    args = parser.parse_args()
    recstream = str(Path(sys.executable).with_name("recstream"))
    print(
        "| dataset | users | model HR@10 | model NDCG@10 | popularity HR@10 | popularity NDCG@10 "
        "| best epoch | train wall | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        path, overrides = DATASETS[name]
        env = {**os.environ, **{f"RECSTREAM_TRAIN__{k}": v for k, v in overrides.items()}}
        root = args.out / name
        root.mkdir(parents=True, exist_ok=True)
        data = str(DATA / path)
        _, wall, rss = run(
            [recstream, "train", "--data", data, "--out", str(root), "--no-progress"],
            env,
            root / "train.log",
        )
        stdout, _, _ = run(
            [recstream, "evaluate", "--data", data, "--artifacts", str(root), "--no-progress"],
            env,
            root / "evaluate.log",
        )
        result = json.loads(stdout.strip().splitlines()[-1])
        manifest = json.loads((root / result["version"] / "manifest.json").read_text())
        pop = result["popularity"]
        print(
            f"| {name} | {result['users']} | {result['hr@10']:.4f} | {result['ndcg@10']:.4f} "
            f"| {pop['hr@10']:.4f} | {pop['ndcg@10']:.4f} | {manifest['metrics']['best_epoch']} "
            f"| {wall / 60:.1f} min | {rss:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
