"""Do two training recipes differ, or only their seeds? Test HR@10 / NDCG@10 of groups of
published versions (a recipe's seeds), each group's mean, and each group's difference
from the first group on the same users, with a 95% interval; with --plot, each
version's validation NDCG@10 by epoch (from its manifest), a colour per group.

    .venv/bin/python scripts/compare_versions.py \\
        ../shared/data/ml-1m/ml-1m_sasrec_reconstructed.txt \\
        --group "20 epochs=ROOT_A1,ROOT_A2" --group "24 epochs=ROOT_B1,ROOT_B2" \\
        --plot curves.png

Each version is ranked as ``recstream evaluate`` ranks it (the last item of each user
of DATA is the target, seen items ranked out), so DATA must be the log it trained on.
A user's hit@10 is averaged over the group's versions and paired with the first
group's: the interval is over users, with the models fixed. It says whether these
models rank these users differently; it does not say whether other seeds would.
"""

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt

from model.artifacts import LoadedVersion, load_version
from model.data import load_interactions
from model.evaluate import paired_difference, per_user_at
from model.pipeline import held_out_ranks

Group = tuple[str, list[Path]]


def parse_group(spec: str) -> Group:
    """``NAME=ROOT[,ROOT...]`` to the name and its artifact roots."""
    name, sep, roots = spec.partition("=")
    paths = [Path(r) for r in roots.split(",") if r]
    if not sep or not name or not paths:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=ROOT[,ROOT...]")
    return name, paths


def best_valid(loaded: LoadedVersion) -> str:
    metrics = loaded.manifest.get("metrics", {})
    if "valid" not in metrics:
        return "-"
    return f"{metrics['valid']['ndcg@10']:.4f} ({metrics.get('best_epoch', '?')})"


def plot_curves(groups: list[tuple[str, list[LoadedVersion]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for colour, (name, versions) in enumerate(groups):
        for i, loaded in enumerate(versions):
            history = loaded.manifest.get("training", {}).get("history", [])
            points = [
                (h["epoch"], h["valid_ndcg10"]) for h in history if h["valid_ndcg10"] is not None
            ]
            ax.plot(
                [e for e, _ in points],
                [v for _, v in points],
                color=f"C{colour}",
                marker=".",
                alpha=0.8,
                label=name if i == 0 else None,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("data", type=Path, help="the interaction log the versions trained on")
    parser.add_argument(
        "--group",
        type=parse_group,
        action="append",
        required=True,
        help="NAME=ROOT[,ROOT...]: a recipe's versions (artifact roots, their CURRENT); "
        "the first group is the one the others are compared with",
    )
    parser.add_argument("--plot", type=Path, help="write validation curves to this PNG")
    args = parser.parse_args()
    groups: list[Group] = args.group
    log = load_interactions(args.data)
    sequences, event_types = log.sequences(), log.event_types()
    loaded: list[tuple[str, list[LoadedVersion]]] = []
    per_user: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
    print("| group | version | test HR@10 | test NDCG@10 | best validation NDCG@10 (epoch) |")
    print("|---|---|---|---|---|")
    for name, roots in groups:
        versions = [load_version(root, load_index_file=False) for root in roots]
        hits, gains = [], []
        for root, version in zip(roots, versions, strict=True):
            ranks = held_out_ranks(sequences, version, event_types=event_types).ranks
            hit, gain = per_user_at(ranks, 10)
            hits.append(hit)
            gains.append(gain)
            print(
                f"| {name} | {root.name} | {hit.mean():.4f} | {gain.mean():.4f} "
                f"| {best_valid(version)} |",
                flush=True,
            )
        mean_hit, mean_gain = np.mean(hits, axis=0), np.mean(gains, axis=0)
        print(f"| {name} | mean | {mean_hit.mean():.4f} | {mean_gain.mean():.4f} | |")
        loaded.append((name, versions))
        per_user.append((mean_hit, mean_gain))
    base_name = groups[0][0]
    print(
        f"\n{len(per_user[0][0]):,} users; differences from {base_name!r}, 95% interval over users:"
    )
    print("\n| group | HR@10 | NDCG@10 |\n|---|---|---|")
    for (name, _), (hit, gain) in zip(groups[1:], per_user[1:], strict=True):
        d_hit, w_hit = paired_difference(per_user[0][0], hit)
        d_gain, w_gain = paired_difference(per_user[0][1], gain)
        print(f"| {name} | {d_hit:+.4f} ± {w_hit:.4f} | {d_gain:+.4f} ± {w_gain:.4f} |")
    if args.plot is not None:
        plot_curves(loaded, args.plot)
        print(f"\nvalidation curves: {args.plot}")


if __name__ == "__main__":
    main()
