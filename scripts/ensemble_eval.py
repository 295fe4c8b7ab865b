"""How much would an ensemble give? Test metrics of published versions, one by one and
with their scores summed, under the protocol of ``recstream evaluate`` (full ranking,
seen items ranked out, leave-one-out test item).

Summed scores are what one exported model would serve if it concatenated the versions'
user vectors and item vectors (one dot product); this measures that before building it.
The versions must share one item vocabulary (trained on the same log). Event types are
not read.

    .venv/bin/python scripts/ensemble_eval.py \\
        ../shared/data/ml-1m/ml-1m_sasrec_reconstructed.txt ROOT_A ROOT_B
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from model.artifacts import LoadedVersion, load_version
from model.data import load_interactions
from model.evaluate import ScoreFn, metrics_from_ranks, rank_targets
from model.sequences import IntArray, encoder_input


def summed_scores(versions: list[LoadedVersion]) -> ScoreFn:
    """Sequences [B, L] to the sum of the versions' scores of every item [B, N + 1]."""
    tables = [torch.from_numpy(v.item_embeddings) for v in versions]

    def score(seqs: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(seqs.size(0), tables[0].size(0))
        for version, table in zip(versions, tables, strict=True):
            total += version.encoder(seqs[:, -version.max_len :]) @ table.T
        return total

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("data", type=Path, help="the interaction log the versions trained on")
    parser.add_argument("roots", type=Path, nargs="+", help="artifact roots (their CURRENT)")
    args = parser.parse_args()
    versions = [load_version(root, load_index_file=False) for root in args.roots]
    if any(v.item_ids != versions[0].item_ids for v in versions):
        raise SystemExit("error: the versions do not share one item vocabulary")
    index = versions[0].item_index()
    histories: list[IntArray] = []
    targets: list[int] = []
    unknown = 0
    for items in load_interactions(args.data).sequences().values():
        if len(items) < 2:
            continue
        if items[-1] not in index:
            unknown += 1  # recstream evaluate counts these as misses; left out here
            continue
        known, _ = encoder_input(items[:-1], index)
        histories.append(np.asarray(known, dtype=np.int64))
        targets.append(index[items[-1]])
    longest = max(v.max_len for v in versions)
    rows = [(root.name, [v]) for root, v in zip(args.roots, versions, strict=True)]
    rows.append(("sum of scores", versions))
    print(
        f"{len(histories):,} users ({unknown} with a test item the versions do not know, left out)"
    )
    print("\n| version | HR@10 | NDCG@10 |\n|---|---|---|")
    target_array = np.asarray(targets, dtype=np.int64)
    with torch.no_grad():
        for name, chosen in rows:
            ranks = rank_targets(summed_scores(chosen), longest, histories, target_array)
            metrics = metrics_from_ranks(ranks)
            print(f"| {name} | {metrics['hr@10']:.4f} | {metrics['ndcg@10']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
