"""Pure sequence helpers shared by training, evaluation and the worker."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def pad_left(seqs: Sequence[Sequence[int] | IntArray], max_len: int) -> IntArray:
    """Keep the newest ``max_len`` items of each sequence, left-padded with 0, as [B, L].

    L is the longest kept sequence (at least 1), not ``max_len``: the encoder masks
    padding, so shorter batches give the same vectors for less work.
    """
    width = max(1, min(max_len, max((len(s) for s in seqs), default=1)))
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-width:] if len(seq) else []
        if len(tail):
            out[row, width - len(tail) :] = tail
    return out


def pad_right(seqs: Sequence[Sequence[int] | IntArray]) -> IntArray:
    """Sequences as rows [B, L] (L the longest, at least 1), padded after with 0."""
    out = np.zeros((len(seqs), max(1, max((len(s) for s in seqs), default=1))), dtype=np.int64)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = seq
    return out


def append_capped(history: Sequence[str], new_items: Sequence[str], max_len: int) -> list[str]:
    """A user's history after new events, keeping only the newest ``max_len`` items."""
    merged = [*history, *new_items]
    return merged[-max_len:] if max_len > 0 else []
