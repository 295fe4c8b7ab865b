"""Full-ranking evaluation: every item is a candidate, items already seen are removed.

A user's rank is the number of unseen items scored strictly above the target; HR@K is
``rank < K`` and NDCG@K is ``1 / log2(rank + 2)`` within K (one relevant item).
"""

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from model.sasrec import SASRec
from model.sequences import IntArray, pad_left

KS = (1, 5, 10, 20)
Metrics = dict[str, float]


def metrics_from_ranks(ranks: npt.NDArray[np.int64], ks: Sequence[int] = KS) -> Metrics:
    """HR@K and NDCG@K averaged over users, from 0-based ranks of the targets."""
    if len(ranks) == 0:
        return {f"{name}@{k}": 0.0 for k in ks for name in ("hr", "ndcg")}
    out: Metrics = {}
    for k in ks:
        hit, gain = per_user_at(ranks, k)
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(gain.mean())
    return out


def per_user_at(
    ranks: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Each user's hit@K (1.0 or 0.0) and NDCG@K, from 0-based ranks of the targets."""
    hit = ranks < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def ranks_from_scores(
    scores: torch.Tensor, histories: Sequence[IntArray], targets: torch.Tensor
) -> torch.Tensor:
    """Ranks of ``targets`` in ``scores`` [B, N + 1] after removing padding and seen items."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    for row, hist in enumerate(histories):
        if len(hist):
            scores[row, torch.as_tensor(hist, device=scores.device)] = -torch.inf
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # A target that was filtered out (a re-consumed item) can never be a hit.
    ranks = (scores > target_scores).sum(dim=1)
    return torch.where(torch.isinf(target_scores.squeeze(1)), scores.size(1), ranks)


ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def rank_targets(
    score_fn: ScoreFn,
    max_len: int,
    inputs: Sequence[IntArray],
    targets: IntArray,
    *,
    device: torch.device | None = None,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "evaluate",
    seen: Sequence[IntArray] | None = None,
) -> npt.NDArray[np.int64]:
    """Each case's 0-based rank of its next-item target under ``score_fn`` ([B, L] ->
    [B, N + 1]), over every item it has not seen (:func:`ranks_from_scores`). ``seen``
    holds the item indices to rank out when ``inputs`` are not item indices (tokens
    with event types); by default the inputs themselves."""
    ranks: list[torch.Tensor] = []
    seen = inputs if seen is None else seen
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = inputs[start : start + batch_size]
        seqs = torch.from_numpy(pad_left(batch, max_len)).to(device)
        tgt = torch.from_numpy(targets[start : start + batch_size]).to(device)
        filtered = seen[start : start + batch_size]
        ranks.append(ranks_from_scores(score_fn(seqs), filtered, tgt).cpu())
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def paired_difference(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """Mean of ``b - a`` over the same users (per-user figures such as hit@10), and the
    half-width of its 95% confidence interval (normal approximation, users as the
    sample). Paired, what makes a user easy or hard for both cancels, so where two
    models rank users alike the interval is narrower than either mean's."""
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError("paired_difference needs two equal 1-d arrays of at least 2 users")
    diff = b - a
    return float(diff.mean()), float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))


def evaluate_model(
    model: SASRec,
    inputs: Sequence[IntArray],
    targets: IntArray,
    *,
    progress: bool = False,
    desc: str = "evaluate",
    seen: Sequence[IntArray] | None = None,
) -> Metrics:
    """Full-ranking metrics of an eager ``model``, in eval mode (``seen``: as
    :func:`rank_targets`)."""
    was_training = model.training
    model.eval()
    try:
        device = model.item_emb.weight.device
        ranks = rank_targets(
            model.score_all,
            model.max_len,
            inputs,
            targets,
            device=device,
            progress=progress,
            desc=desc,
            seen=seen,
        )
    finally:
        model.train(was_training)
    return metrics_from_ranks(ranks)


def popularity_order(sequences: Sequence[IntArray], num_items: int) -> IntArray:
    """Item indices by interaction count, most popular first; ties by lower index."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for seq in sequences:
        np.add.at(counts, seq, 1)
    counts[0] = -1  # padding last
    # Stable sort on negated counts keeps the lower index first among equals.
    return np.argsort(-counts, kind="stable").astype(np.int64)


def evaluate_popularity(
    order: IntArray, inputs: Sequence[IntArray], targets: IntArray, *, batch_size: int = 1024
) -> Metrics:
    """The most-popular baseline under the same protocol as :func:`evaluate_model`."""
    scores_one = torch.empty(len(order), dtype=torch.float32)
    # Distinct scores (no ties): the most popular item gets the highest.
    scores_one[torch.from_numpy(order)] = -torch.arange(len(order), dtype=torch.float32)
    ranks: list[torch.Tensor] = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        scores = scores_one.unsqueeze(0).expand(len(batch), -1)
        tgt = torch.from_numpy(targets[start : start + batch_size])
        ranks.append(ranks_from_scores(scores, batch, tgt))
    all_ranks = torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)
    return metrics_from_ranks(all_ranks)


def format_table(rows: dict[str, Metrics], ks: Sequence[int] = KS) -> str:
    """A fixed-width table: one row per model, HR@K and NDCG@K columns."""
    cols = [f"{name}@{k}" for name in ("hr", "ndcg") for k in ks]
    name_width = max(len("model"), *(len(name) for name in rows))
    lines = [f"{'model':<{name_width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for name, metrics in rows.items():
        cells = "  ".join(f"{metrics.get(c, float('nan')):>8.4f}" for c in cols)
        lines.append(f"{name:<{name_width}}  {cells}")
    return "\n".join(lines)
