"""Incremental encoding: each user's per-block keys and values, kept between batches.

SASRec's positions count from the oldest item in the window and its attention is
causal, so while a history is shorter than ``max_len`` a new event changes nothing at
the earlier positions: the encoder only has to run the new items against the cached
keys and values (``Encoder.extend``). The database stays the source of truth: an entry
is used only when the items it covers are a prefix of the history just read, so a
restart, a rebalance, a trimmed history or another worker's writes all fall back to a
full encode, never to a stale vector.
"""

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt
import torch

# What an entry costs beyond its arrays' bytes: the tensor's and the array's objects,
# the tuple, the entry, its key and the LRU's node. Measured: 2,511 bytes of RSS per
# entry for 1,288 bytes of arrays (one item, dim 64, two blocks).
ENTRY_OVERHEAD_BYTES = 1_200


@dataclass(slots=True)
class CachedUser:
    """What the cache holds for one user: the items its keys and values cover."""

    items: tuple[int, ...]  # item indices, oldest first
    kv: torch.Tensor  # [capacity >= len(items), blocks * 2 * dim]; rows past len(items) unused
    vector: npt.NDArray[np.float32]  # the user vector after ``items``

    @property
    def nbytes(self) -> int:
        arrays = self.kv.numel() * self.kv.element_size() + self.vector.nbytes
        return ENTRY_OVERHEAD_BYTES + 8 * len(self.items) + arrays

    def past(self) -> torch.Tensor:
        """The keys and values of ``items``: [len(items), blocks * 2 * dim]."""
        return self.kv[: len(self.items)]

    def extended(
        self, items: tuple[int, ...], new_kv: torch.Tensor, vector: npt.NDArray[np.float32]
    ) -> "CachedUser":
        """This entry after ``items`` (which start with ``self.items``) whose new part has
        keys and values ``new_kv``. Written in place while capacity lasts, doubling it
        otherwise, so a user's events cost amortised O(1) copies each."""
        start, stop = len(self.items), len(items)
        kv = self.kv
        if stop > kv.size(0):
            kv = torch.empty(
                max(stop, 2 * kv.size(0)), kv.size(1), dtype=kv.dtype, device=kv.device
            )
            kv[:start] = self.kv[:start]
        kv[start:stop] = new_kv
        return CachedUser(items, kv, vector)


class Reuse(Enum):
    """How one history is encoded, given the cache."""

    SAME = "same"  # nothing new since the cached entry: its vector as is
    EXTEND = "extend"  # the cached entry covers a prefix: encode only the new items
    FULL = "full"  # no usable entry: encode the whole window


def reuse(history: Sequence[int], entry: CachedUser | None, max_len: int) -> Reuse:
    """The cheapest exact way to encode ``history`` (item indices, oldest first, the
    whole stored history, not yet cut to ``max_len``)."""
    if entry is None or len(history) > max_len:
        # Past max_len the window slides: every position moves, nothing cached holds.
        return Reuse.FULL
    cached = len(entry.items)
    if cached > len(history) or tuple(history[:cached]) != entry.items:
        return Reuse.FULL
    return Reuse.SAME if cached == len(history) else Reuse.EXTEND


class EncoderCache:
    """Least-recently-used entries per user, bounded in bytes (keys, values, vector)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # Sizes as counted when stored: an entry's buffer is shared with its successor.
        self._entries: OrderedDict[str, tuple[CachedUser, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: str) -> CachedUser | None:
        found = self._entries.get(user)
        if found is None:
            return None
        self._entries.move_to_end(user)
        return found[0]

    def put(self, user: str, entry: CachedUser) -> None:
        old = self._entries.pop(user, None)
        if old is not None:
            self.bytes -= old[1]
        size = entry.nbytes
        if size > self.max_bytes:
            return
        self._entries[user] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def resize(self, max_bytes: int) -> None:
        """A new budget; the least recently used entries go until the rest fit."""
        self.max_bytes = max_bytes
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def drop(self, user: str) -> None:
        old = self._entries.pop(user, None)
        if old is not None:
            self.bytes -= old[1]
