"""Deciding a canary from online scores summed over workers' metrics pages."""

import pytest

from model.errors import ConfigError, RecstreamError
from stream_worker.canary_judge import judge
from stream_worker.metrics import OnlineTotals, WorkerMetrics


def page(scored: dict[str, int], gains: dict[str, float]) -> str:
    """A worker's real exposition with these online counters."""
    metrics = WorkerMetrics()
    for version, n in scored.items():
        metrics.online_scored.labels(version).inc(n)
        metrics.online_ndcg.labels(version, "10").inc(gains[version])
        metrics.online_ndcg.labels(version, "5").inc(1000.0)  # another k: not counted
    return metrics.exposition().decode()


def test_scores_are_summed_over_workers() -> None:
    scores = OnlineTotals()
    scores.add(page({"live": 100, "new": 10}, {"live": 20.0, "new": 3.0}))
    scores.add(page({"live": 300, "new": 30}, {"live": 40.0, "new": 5.0}))
    assert scores.scored == {"live": 400, "new": 40}
    assert scores.ndcg("live") == pytest.approx(0.15) and scores.ndcg("new") == pytest.approx(0.2)
    assert scores.ndcg("gone") is None


def test_promote_stop_or_wait() -> None:
    scores = OnlineTotals()
    scores.add(page({"live": 1000, "new": 200}, {"live": 150.0, "new": 29.0}))  # 0.15, 0.145
    assert judge(scores, "live", "new", min_scored=500, margin=0.01).decision == "wait"
    promote = judge(scores, "live", "new", min_scored=200, margin=0.01)
    assert promote.decision == "promote" and promote.canary_scored == 200
    assert judge(scores, "live", "new", min_scored=200, margin=0.001).decision == "stop"
    assert judge(scores, "live", "absent", min_scored=1, margin=1.0).decision == "wait"
    with pytest.raises(RecstreamError, match="cannot tell them apart"):
        judge(scores, "live", "live", min_scored=1, margin=0.0)
    with pytest.raises(ConfigError):
        judge(scores, "live", "new", min_scored=1, margin=-0.1)
