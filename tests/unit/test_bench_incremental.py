"""The encode-stage replay: batches as the database would hold them, and a small run
through real (untrained, scripted) encoders with and without the cache."""

from pathlib import Path

import numpy as np

from recstream_tools.bench.e2e import Replay, publish_bench_model
from recstream_tools.bench.incremental import (
    bench_incremental,
    format_incremental,
    plot_incremental,
    replay_batches,
)


def replay(users: list[str], items: list[str]) -> Replay:
    return Replay("toy", users, items, ["view"] * len(users))


def test_batches_hold_each_users_capped_history_after_the_batch() -> None:
    toy = replay(["a", "b", "a", "a", "c", "b"], ["1", "2", "3", "4", "5", "6"])
    batches = list(replay_batches(toy, batch_events=4, history_length=2))
    assert batches == [
        (["a", "b"], [["3", "4"], ["2"]]),
        (["c", "b"], [["5"], ["2", "6"]]),
    ]


def test_a_small_replay_agrees_with_the_full_encoder_and_reuses_the_cache(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    users = [f"u{n}" for n in rng.integers(0, 30, size=300)]
    items = [f"i{n}" for n in rng.integers(0, 40, size=300)]
    toy = replay(users, items)
    publish_bench_model(toy, tmp_path / "artifacts", max_len=16)
    result = bench_incremental(toy, tmp_path / "artifacts", batch_events=10, progress=False)
    assert result.batches == 30 and len(result.full_ms) == len(result.cached_ms) == 30
    assert result.max_abs_diff < 1e-4
    # Short histories extend; new users and ones past max_len (16) are encoded in full.
    assert result.reuse["extend"] > 0 and result.reuse["full"] > 0
    assert result.cache_mib > 0
    table = format_incremental([result])
    assert "| toy | 10 | 30 |" in table
    plot_incremental([result], tmp_path / "incremental.png")
    assert (tmp_path / "incremental.png").stat().st_size > 0
