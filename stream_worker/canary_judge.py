"""Deciding a canary from the workers' online scores: promote it, stop it, or wait.

The scores are the workers' own ``/metrics`` (each worker scores the users of its
partitions), summed over the pages given: events scored and NDCG@10 gains per model
version. The canary is promoted when both versions have at least ``min_scored`` scored
events and its online NDCG@10 is no more than ``margin`` below the live version's;
stopped when it is more than ``margin`` below; otherwise it waits for more events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from model.errors import ConfigError, RecstreamError
from stream_worker.metrics import OnlineTotals, read_page

Decision = Literal["promote", "stop", "wait"]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str
    live_scored: int
    canary_scored: int
    live_ndcg: float | None
    canary_ndcg: float | None


def judge(
    scores: OnlineTotals, live: str, canary: str, *, min_scored: int, margin: float
) -> Verdict:
    """The decision for canary model version ``canary`` against ``live``."""
    if margin < 0 or min_scored < 1:
        raise ConfigError("--margin must be >= 0 and --min-scored >= 1")
    if live == canary:
        raise RecstreamError(
            f"the canary and the live version share model version {live}: online scores "
            "cannot tell them apart (an index-only version); decide from their index_version"
        )
    n_live, n_canary = int(scores.scored.get(live, 0)), int(scores.scored.get(canary, 0))
    ndcg_live, ndcg_canary = scores.ndcg(live), scores.ndcg(canary)
    if n_live < min_scored or n_canary < min_scored or ndcg_live is None or ndcg_canary is None:
        return Verdict("wait", f"scored events: live {n_live}, canary {n_canary} (need "
                       f"{min_scored} each)", n_live, n_canary, ndcg_live, ndcg_canary)  # fmt: skip
    gap = ndcg_canary - ndcg_live
    if gap >= -margin:
        reason = f"online NDCG@10 {ndcg_canary:.4f} against {ndcg_live:.4f}, within {margin:g}"
        return Verdict("promote", reason, n_live, n_canary, ndcg_live, ndcg_canary)
    reason = (
        f"online NDCG@10 {ndcg_canary:.4f} against {ndcg_live:.4f}, below by more than {margin:g}"
    )
    return Verdict("stop", reason, n_live, n_canary, ndcg_live, ndcg_canary)


def scrape(urls: Iterable[str], timeout_s: float = 10.0) -> OnlineTotals:
    """The summed online scores of the workers' metrics pages.

    :raises WorkerError: a page that does not answer (a partial sum would judge on part
        of the users).
    """
    scores = OnlineTotals(k=10)
    for url in urls:
        scores.add(read_page(url, timeout_s))
    return scores
