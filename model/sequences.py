"""Pure sequence helpers shared by training, evaluation and the worker."""

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

# Event types in a model's input: a token is ``item << TYPE_BITS | type code``, the code
# 1 + the type's place in EVENT_TYPES (0: not known). Item indices, padding 0 and every
# helper below work on tokens unchanged; only the model and the loss take them apart.
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
TYPE_BITS = 3
TYPE_MASK = (1 << TYPE_BITS) - 1
TYPE_CODES = {name: code for code, name in enumerate(EVENT_TYPES, start=1)}


def type_codes(types: Sequence[str]) -> IntArray:
    """Event type names to codes (an unknown name is 0)."""
    return np.fromiter((TYPE_CODES.get(t, 0) for t in types), dtype=np.int64, count=len(types))


def type_names(codes: str) -> list[str]:
    """One digit per item (the worker's stored codes) to event type names ("" unknown)."""
    return [EVENT_TYPES[int(c) - 1] if c in "1234" else "" for c in codes]


def pack(items: Sequence[int] | IntArray, codes: Sequence[int] | IntArray) -> IntArray:
    """Item indices and their event type codes as tokens."""
    return (np.asarray(items, dtype=np.int64) << TYPE_BITS) | np.asarray(codes, dtype=np.int64)


def encoder_input(
    items: Sequence[str], index: Mapping[str, int], codes: Sequence[int] | IntArray | None = None
) -> tuple[list[int], list[int]]:
    """The indices of the ``items`` the vocabulary ``index`` knows (the others are left
    out), and what an encoder reads for them: those indices, or with ``codes`` (one event
    type code per item) their tokens (:func:`pack`)."""
    kept = [n for n, item in enumerate(items) if item in index]
    indices = [index[items[n]] for n in kept]
    if codes is None:
        return indices, indices
    return indices, pack(indices, [codes[n] for n in kept]).tolist()


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
