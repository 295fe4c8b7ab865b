"""The encoder cache's pure parts: when an entry may be reused, and its memory bound."""

import numpy as np
import torch

from stream_worker.encoder_cache import CachedUser, EncoderCache, Reuse, reuse


def entry(items: list[int], width: int = 4) -> CachedUser:
    return CachedUser(tuple(items), torch.zeros(len(items), width), np.zeros(3, dtype=np.float32))


def history(*items: int) -> list[int]:
    return list(items)


def test_reuse_extends_only_from_a_prefix_of_the_stored_history() -> None:
    cached = entry([1, 2, 3])
    assert reuse(history(1, 2, 3, 4), cached, max_len=10) is Reuse.EXTEND
    assert reuse(history(1, 2, 3), cached, max_len=10) is Reuse.SAME
    # Another worker's writes, a trimmed or rewritten history: encode it all again.
    assert reuse(history(1, 9, 3, 4), cached, max_len=10) is Reuse.FULL
    assert reuse(history(2, 3, 4), cached, max_len=10) is Reuse.FULL
    assert reuse(history(1, 2), cached, max_len=10) is Reuse.FULL
    assert reuse(history(1, 2, 3, 4), None, max_len=10) is Reuse.FULL


def test_reuse_stops_once_the_window_slides() -> None:
    cached = entry([1, 2, 3])
    assert reuse(history(1, 2, 3, 4), cached, max_len=4) is Reuse.EXTEND
    # Five items in a window of four: every position moves.
    assert reuse(history(1, 2, 3, 4, 5), cached, max_len=4) is Reuse.FULL


def test_cache_evicts_least_recently_used_users_to_stay_within_its_bytes() -> None:
    size = entry([1, 2]).nbytes
    cache = EncoderCache(max_bytes=2 * size)
    cache.put("a", entry([1, 2]))
    cache.put("b", entry([3, 4]))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", entry([5, 6]))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.bytes == 2 * size


def test_cache_replaces_a_users_entry_and_skips_one_larger_than_the_budget() -> None:
    small = entry([1])
    cache = EncoderCache(max_bytes=small.nbytes * 3)
    cache.put("a", small)
    cache.put("a", entry([1, 2]))
    assert cache.bytes == entry([1, 2]).nbytes and len(cache) == 1
    big = entry(list(range(500)))
    assert big.nbytes > cache.max_bytes
    cache.put("b", big)
    assert cache.get("b") is None and cache.get("a") is not None
    cache.drop("a")
    cache.drop("never-cached")
    assert len(cache) == 0 and cache.bytes == 0


def test_extending_an_entry_appends_in_place_and_doubles_when_full() -> None:
    first = CachedUser((1, 2), torch.tensor([[1.0], [2.0]]), np.zeros(1, dtype=np.float32))
    grown = first.extended((1, 2, 3), torch.tensor([[3.0]]), np.ones(1, dtype=np.float32))
    assert grown.kv.size(0) == 4  # doubled
    assert grown.past().flatten().tolist() == [1.0, 2.0, 3.0]
    again = grown.extended((1, 2, 3, 4), torch.tensor([[4.0]]), np.ones(1, dtype=np.float32))
    assert again.kv.data_ptr() == grown.kv.data_ptr()  # room left: no copy
    assert again.past().flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert first.past().flatten().tolist() == [1.0, 2.0]  # the old entry is untouched
