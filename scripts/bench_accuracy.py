"""Accuracy benchmark: train and evaluate SASRec on the shared real datasets.

Runs the public commands (``recstream train`` then ``recstream evaluate``) for each
dataset, under ``/usr/bin/time -v`` for wall time and peak memory, and prints one
markdown row per dataset. The data is read from ``../shared/data`` at run time.

    .venv/bin/python scripts/bench_accuracy.py ml-100k taobao
    .venv/bin/python scripts/bench_accuracy.py all --out bench-out/accuracy
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

# Every shared dataset, trained with the defaults (settings left auto are chosen per log
# and recorded in the manifest); RECSTREAM_TRAIN__* in the environment override them.
DATASETS: dict[str, str] = {
    "ml-1m": "ml-1m/ml-1m_sasrec_reconstructed.txt",
    "ml-100k": "ml-100k/ml-100k.inter",
    "ml-latest-small": "ml-latest-small/ratings.csv",
    "taobao": "ecommerce/taobao_UserBehavior_head.csv",
    "yoochoose": "ecommerce/yoochoose-clicks-100k_train_full.txt",
    "diginetica": "ecommerce/diginetica_sample_train-item-views.csv",
    "retailrocket": "ecommerce/retailrocket_cotrec_all_train_seq.txt",
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
    parser.add_argument("datasets", nargs="+", choices=[*sorted(DATASETS), "all"])
    parser.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    args = parser.parse_args()
    recstream = str(Path(sys.executable).with_name("recstream"))
    print(
        "| dataset | users | model HR@10 | model NDCG@10 | popularity HR@10 | popularity NDCG@10 "
        "| best epoch | dim | loss | train wall | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in list(DATASETS) if "all" in args.datasets else args.datasets:
        path, env = DATASETS[name], dict(os.environ)
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
        chosen = manifest["hyperparameters"]
        print(
            f"| {name} | {result['users']} | {result['hr@10']:.4f} | {result['ndcg@10']:.4f} "
            f"| {pop['hr@10']:.4f} | {pop['ndcg@10']:.4f} | {manifest['metrics']['best_epoch']} "
            f"| {chosen['dim']} | {chosen['loss']} | {wall / 60:.1f} min | {rss:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
