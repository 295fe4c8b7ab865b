"""Serving one model version: sequences in, top-K unseen items out.

Pure ranking (``top_k_unseen``, ``popular_unseen``) is kept apart from the runtime that
holds the TorchScript encoder and the FAISS index, so it is tested without either.
"""

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from model.artifact_store import ArtifactStore, Canary, fetch, prune_cache
from model.artifacts import LoadedVersion, list_versions, load_version
from model.errors import ArtifactError
from model.index import ExactScorer, search, to_device
from model.sasrec import takes_event_types
from model.sequences import encoder_input, pad_left, pad_right
from model.train import resolve_device
from stream_worker.encoder_cache import CachedUser, EncoderCache, Reuse, reuse

logger = logging.getLogger(__name__)

Ranked = list[tuple[str, float]]
# Most histories per encoder call: a call's memory grows with its rows (attention
# scores alone are rows x max_len² floats: 655 MB for 4,096 histories of 200 items).
ENCODE_ROWS = 256


def top_k_unseen(
    ids: Sequence[int],
    scores: Sequence[float],
    seen: set[int],
    item_ids: Sequence[str],
    k: int,
) -> Ranked:
    """The first ``k`` results that are neither padding nor already seen, in order."""
    out: Ranked = []
    for idx, score in zip(ids, scores, strict=True):
        if idx <= 0 or idx in seen:
            continue
        out.append((item_ids[idx], float(score)))
        if len(out) == k:
            break
    return out


def popular_unseen(popularity: Sequence[str], seen: set[str], k: int) -> Ranked:
    """Fallback for users with no known item: the most popular unseen items, scored
    ``1 / (1 + popularity rank)`` so scores still order the list."""
    out: Ranked = []
    for rank, item in enumerate(popularity):
        if item in seen:
            continue
        out.append((item, 1.0 / (1 + rank)))
        if len(out) == k:
            break
    return out


def length_buckets(
    lengths: Sequence[int], ratio: float = 2.0, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices grouped so that, within a group, the longest sequence is at most
    ``ratio`` times the shortest: each group is padded to its own longest, so short
    histories are not padded to the batch's longest (attention cost grows with L²).
    With ``max_rows``, no group has more rows than that."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if (
            groups
            and lengths[i] <= ratio * max(1, lengths[groups[-1][0]])
            and (max_rows is None or len(groups[-1]) < max_rows)
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def search_depth(k: int, seen: int, first_pass: int = 32) -> int:
    """Results to ask for so that, usually, ``k`` survive dropping seen items: a user's
    seen items rarely all rank on top, so the first pass asks for at most ``k +
    first_pass``; rows that come out short are searched again at full depth."""
    return k + min(seen, first_pass)


@dataclass
class StageTimes:
    encode_ms: float = 0.0
    search_ms: float = 0.0
    # Histories encoded per kind of cache reuse (``Reuse`` values).
    reuse: dict[str, int] = field(default_factory=dict)
    # Keys of the sequences answered with the popularity list (no known item).
    fallbacks: set[str] = field(default_factory=set)


@dataclass
class Recommender:
    """A verified version, loaded onto its device, ready to rank."""

    loaded: LoadedVersion
    device: torch.device
    index: object
    item_index: dict[str, int] = field(default_factory=dict)
    # Per-user keys and values for incremental encoding; None: every history is
    # encoded in full (no budget, or an encoder exported before ``extend`` existed).
    cache: EncoderCache | None = None
    # Exact CPU indexes are searched in batches by this scorer; None: by FAISS.
    scorer: ExactScorer | None = None
    # Most histories per encoder call (``ENCODE_ROWS``).
    encode_rows: int = ENCODE_ROWS

    @functools.cached_property
    def event_types(self) -> bool:
        """Whether the encoder reads event types with the items (``takes_event_types``)."""
        return takes_event_types(self.loaded.encoder)

    @classmethod
    def load(
        cls,
        root: Path,
        version: str | None = None,
        device: str = "auto",
        cache_bytes: int = 0,
    ) -> "Recommender":
        torch_device = resolve_device(device)
        loaded = load_version(root, version, map_location=str(torch_device))
        index, _ = to_device(loaded.index, "cuda" if torch_device.type == "cuda" else "cpu")
        cache = None
        if cache_bytes > 0:
            if hasattr(loaded.encoder, "extend"):
                cache = EncoderCache(cache_bytes)
            else:
                logger.warning(
                    "version %s: its encoder has no incremental path (exported by an older "
                    "recstream); every history is encoded in full",
                    loaded.version,
                )
        recommender = cls(
            loaded, torch_device, index, loaded.item_index(), cache, ExactScorer.of(index)
        )
        recommender.warm_up()
        return recommender

    @property
    def model_version(self) -> str:
        return self.loaded.model_version

    @property
    def index_version(self) -> str:
        return self.loaded.index_version

    @property
    def num_items(self) -> int:
        return len(self.loaded.item_ids) - 1

    @property
    def published_at(self) -> float:
        """When the model version was published (its manifest's ``created``), epoch s."""
        created = self.loaded.manifest.get("created")
        if not created:
            return float("nan")
        return datetime.fromisoformat(str(created)).timestamp()

    def warm_up(self) -> None:
        """Tiny queries so the first real batches do not pay for lazy initialisation
        (and TorchScript's first runs of each path): full, then incremental."""
        first = self.loaded.item_ids[1]
        self.recommend({"warm-up": [first]}, 1)
        if self.cache is not None:
            for _ in range(3):
                for length in (1, 2):
                    self.recommend({"warm-up": [first] * length}, 1, cache_keys={"warm-up": ""})
            self.cache.drop("")

    @torch.inference_mode()
    def user_vectors(
        self,
        histories: Sequence[Sequence[int]],
        users: Sequence[str] | None = None,
        times: StageTimes | None = None,
    ) -> npt.NDArray[np.float32]:
        """User vectors [B, dim] for item-index histories (newest last). With ``users``
        (one cache key per history) and a cache, cached keys and values are reused."""
        if self.cache is None or users is None:
            return self._encode_windows(histories)
        vectors, plans = self._encode_incremental(histories, users, self.cache)
        if times is not None:
            for plan in plans:
                times.reuse[plan.value] = times.reuse.get(plan.value, 0) + 1
        return vectors

    def _encode_windows(self, histories: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        max_len = self.loaded.max_len
        lengths = [min(len(h), max_len) for h in histories]
        out = np.empty((len(histories), self.loaded.item_embeddings.shape[1]), dtype=np.float32)
        for rows in length_buckets(lengths, max_rows=self.encode_rows):
            padded = pad_left([histories[i] for i in rows], max_len)
            vectors: torch.Tensor = self.loaded.encoder(torch.from_numpy(padded).to(self.device))
            out[rows] = vectors.float().cpu().numpy()
        return out

    def _encode_incremental(
        self, histories: Sequence[Sequence[int]], users: Sequence[str], cache: EncoderCache
    ) -> tuple[npt.NDArray[np.float32], list[Reuse]]:
        encoder = self.loaded.encoder
        max_len = self.loaded.max_len
        width = int(encoder.cache_width())
        out = np.empty((len(histories), self.loaded.item_embeddings.shape[1]), dtype=np.float32)
        # Every lookup before any store: rows of one user (one per event, in
        # emit_per_event mode) all extend the entry the batch started with.
        entries = [cache.get(user) for user in users]
        plans = [reuse(h, e, max_len) for h, e in zip(histories, entries, strict=True)]
        new_kv: dict[int, torch.Tensor] = {}

        def run(
            rows: list[int], items: list[Sequence[int]], past: torch.Tensor, cached: list[int]
        ) -> None:
            vectors, kv = encoder.extend(
                torch.from_numpy(pad_right(items)).to(self.device),
                past,
                torch.tensor(cached, dtype=torch.int64, device=self.device),
            )
            out[rows] = vectors.float().cpu().numpy()
            for n, row in enumerate(rows):
                new_kv[row] = kv[n, : len(items[n])]

        # Full windows are not kept (they slide at the next event): the plain encoder,
        # which returns no keys and values, is cheaper for them.
        sliding = [
            i for i, plan in enumerate(plans) if plan is Reuse.FULL and len(histories[i]) >= max_len
        ]
        if sliding:
            out[sliding] = self._encode_windows([histories[i] for i in sliding])
        # The others run from their cached keys and values (none for a new entry),
        # grouped by the number of new items, which sets a group's padded compute (one
        # user's burst of clicks would otherwise pad every row to its length); the
        # cached part only adds keys.
        rest = [
            i
            for i, plan in enumerate(plans)
            if plan is Reuse.EXTEND or (plan is Reuse.FULL and len(histories[i]) < max_len)
        ]
        pasts = [
            entry.past() if plan is Reuse.EXTEND and entry is not None else None
            for plan, entry in ((plans[i], entries[i]) for i in rest)
        ]
        done = [0 if past is None else past.size(0) for past in pasts]
        new_items = [histories[i][n:] for i, n in zip(rest, done, strict=True)]
        nothing = torch.zeros(0, width, device=self.device)
        for group in length_buckets([len(items) for items in new_items], 4.0, self.encode_rows):
            run(
                [rest[g] for g in group],
                [new_items[g] for g in group],
                torch.nn.utils.rnn.pad_sequence(
                    [nothing if (past := pasts[g]) is None else past for g in group],
                    batch_first=True,
                ),
                [done[g] for g in group],
            )

        for i, (plan, entry) in enumerate(zip(plans, entries, strict=True)):
            if plan is Reuse.SAME:
                assert entry is not None
                out[i] = entry.vector
            elif len(histories[i]) >= max_len:
                # A full window slides at the next event: nothing to extend from.
                cache.drop(users[i])
            else:
                items = tuple(histories[i])
                if plan is Reuse.EXTEND:
                    assert entry is not None
                    stored = entry.extended(items, new_kv[i], out[i].copy())
                else:
                    stored = CachedUser(items, new_kv[i].clone(), out[i].copy())
                cache.put(users[i], stored)
        return out, plans

    def recommend(
        self,
        sequences: Mapping[str, Sequence[str]],
        k: int,
        times: StageTimes | None = None,
        cache_keys: Mapping[str, str] | None = None,
        types: Mapping[str, str] | None = None,
    ) -> dict[str, Ranked]:
        """Top ``k`` unseen items for each user's sequence (external ids, newest last).
        ``cache_keys`` names each sequence's user for the encoder cache (left out: no
        reuse, nothing cached). ``types`` holds each sequence's event type codes (one
        digit per item, ``store.stored_types``), read by a version trained with event
        types; without them the types are not known."""
        out: dict[str, Ranked] = {}
        known_users: list[str] = []
        histories: list[list[int]] = []
        tokens: list[list[int]] = []  # what the encoder reads: histories, typed or not
        for user, items in sequences.items():
            codes = None
            if self.event_types:
                digits = (types or {}).get(user, "")
                codes = [int(c) for c in digits] if len(digits) == len(items) else [0] * len(items)
            indices, read = encoder_input(items, self.item_index, codes)
            if indices:
                known_users.append(user)
                histories.append(indices)
                tokens.append(read)
            else:
                out[user] = popular_unseen(self.loaded.manifest["popularity"], set(items), k)
                if times is not None:
                    times.fallbacks.add(user)
        if not known_users:
            return out
        started = time.perf_counter()
        users = None if cache_keys is None else [cache_keys[key] for key in known_users]
        vectors = self.user_vectors(tokens, users, times)
        encoded = time.perf_counter()
        seen_sets = [set(h) for h in histories]
        depth = search_depth(k, max(map(len, seen_sets)))
        scores, ids = search(self.index, vectors, depth, self.scorer)
        search_s = time.perf_counter() - encoded
        short = []
        for row, user in enumerate(known_users):
            ranked = top_k_unseen(
                ids[row].tolist(), scores[row].tolist(), seen_sets[row], self.loaded.item_ids, k
            )
            out[user] = ranked
            if len(ranked) < k and len(seen_sets[row]) > ids.shape[1] - k:
                short.append(row)
        if short:  # the rare users whose seen items crowded out the first pass
            again = time.perf_counter()
            depth = k + max(len(seen_sets[r]) for r in short)
            scores, ids = search(self.index, vectors[short], depth, self.scorer)
            search_s += time.perf_counter() - again
            for n, row in enumerate(short):
                out[known_users[row]] = top_k_unseen(
                    ids[n].tolist(), scores[n].tolist(), seen_sets[row], self.loaded.item_ids, k
                )
        if times is not None:  # ranking (dropping seen items) is the caller's "rank"
            times.encode_ms += (encoded - started) * 1000
            times.search_ms += search_s * 1000
        return out


def in_canary(user: str, version: str, share: float) -> bool:
    """Whether the canary ``version`` at ``share`` serves ``user``: a hash of the two
    against the share. Stable (a user stays on one side for the canary's life), a
    larger share only adds users, and each canary version draws its own users."""
    key = f"{version}\x00{user}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


@dataclass(frozen=True, eq=False)
class Serving:
    """What serves a batch: the live version and, while a canary runs, the canary for
    ``share`` of the users (``in_canary``)."""

    live: Recommender
    canary: Recommender | None = None
    share: float = 0.0

    @property
    def recommenders(self) -> list[Recommender]:
        return [self.live] if self.canary is None else [self.live, self.canary]

    def route(self, user: str) -> Recommender:
        canary = self.canary
        if canary is not None and in_canary(user, canary.loaded.version, self.share):
            return canary
        return self.live

    def split(
        self, keys: Iterable[str], user_of: Mapping[str, str] | None = None
    ) -> list[tuple[Recommender, list[str]]]:
        """The keys (users, or ``user_of`` names each key's user) grouped by the version
        that serves their user, live first, each group in the order given; versions that
        serve none of them are left out."""
        groups: dict[int, list[str]] = {id(r): [] for r in self.recommenders}
        for key in keys:
            groups[id(self.route(key if user_of is None else user_of[key]))].append(key)
        return [(r, groups[id(r)]) for r in self.recommenders if groups[id(r)]]

    def same_as(self, other: "Serving") -> bool:
        """The same loaded versions at the same share (recommenders compared by identity)."""
        return self.live is other.live and self.canary is other.canary and self.share == other.share


class VersionWatcher:
    """Follows ``CURRENT`` and ``CANARY``: loads and verifies new versions in a
    background thread and hands them over at the next ``current()`` call, i.e. between
    batches.

    A version that fails to load is logged and refused; what served keeps serving, and
    the broken version is not retried while it stays named. A promoted canary (CURRENT
    now names it) is already loaded: it becomes the live version without a reload.

    The encoder caches share one budget: the canary's is ``share`` of it, the live
    version's the rest, so a canary adds only its model and index to memory.
    """

    def __init__(
        self,
        store: ArtifactStore,
        device: str,
        poll_interval_s: float,
        on_swap: Callable[[Recommender], None] | None = None,
        cache_bytes: int = 0,
        thread_setup: Callable[[], None] | None = None,
        cache_dir: Path = Path("var/artifacts-cache"),
        on_canary: Callable[[Serving], None] | None = None,
    ) -> None:
        self.store = store
        self.cache_dir = cache_dir  # local copies of a bucket's versions
        self.device = device
        self.poll_interval_s = poll_interval_s
        self.on_swap = on_swap
        self.on_canary = on_canary
        # Run first in the watcher's thread, which loads and warms up new versions.
        self.thread_setup = thread_setup
        # Each version gets its own encoder cache: keys and values of another model's
        # weights mean nothing to it.
        self.cache_bytes = cache_bytes
        self._serving = Serving(self._load(store.read_current()))
        self._staged: Serving | None = None
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        logger.info(
            "serving model %s, index %s", self.active.model_version, self.active.index_version
        )
        # A restarted worker serves a running canary from its first batch.
        if self.check_once():
            self.current()

    def _load(
        self, version: str, cache_bytes: int | None = None, held: Sequence[str] = ()
    ) -> Recommender:
        """Load ``version``: verified, from the store (a bucket's through the local
        cache, which then keeps it, the ``held`` versions serving and the two newest
        others)."""
        root = fetch(self.store, version, self.cache_dir)
        budget = self.cache_bytes if cache_bytes is None else cache_bytes
        recommender = Recommender.load(root, version, self.device, budget)
        if root == self.cache_dir:
            others = sorted((v for v in list_versions(root) if v != version), reverse=True)
            prune_cache(self.cache_dir, [version, *held, *others[:2]])
        return recommender

    def _try_load(self, version: str, cache_bytes: int | None = None) -> Recommender | None:
        if version in self._refused:
            return None
        try:
            held = [r.loaded.version for r in self._serving.recommenders]
            return self._load(version, cache_bytes, held)
        except (ArtifactError, RuntimeError, OSError) as exc:
            self._refused.add(version)
            logger.error(
                "refusing version %s, still serving %s: %s",
                version,
                ", ".join(r.loaded.version for r in self._serving.recommenders),
                exc,
            )
            return None

    @property
    def active(self) -> Recommender:
        """The live version serving now, without swapping."""
        return self._serving.live

    @property
    def serving(self) -> Serving:
        """The versions serving now, without swapping."""
        return self._serving

    def current(self) -> Serving:
        """The versions to use for the next batch (swapping in staged ones, if any)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return self._serving
        old, self._serving = self._serving, staged
        self._fit_caches(staged)
        if staged.live is not old.live:
            logger.info(
                "swapped version %s -> %s (model %s, index %s)",
                old.live.loaded.version,
                staged.live.loaded.version,
                staged.live.model_version,
                staged.live.index_version,
            )
            if self.on_swap:
                self.on_swap(staged.live)
        if staged.canary is not old.canary or staged.share != old.share:
            if staged.canary is None:
                logger.info("canary ended: every user is served %s", staged.live.loaded.version)
            else:
                logger.info(
                    "canary %s serves %.1f%% of users beside %s",
                    staged.canary.loaded.version,
                    100 * staged.share,
                    staged.live.loaded.version,
                )
            if self.on_canary:
                self.on_canary(staged)
        return staged

    def _fit_caches(self, serving: Serving) -> None:
        """One encoder-cache budget for both versions: the canary's share, the rest live."""
        canary_bytes = int(self.cache_bytes * serving.share) if serving.canary else 0
        if serving.live.cache is not None:
            serving.live.cache.resize(self.cache_bytes - canary_bytes)
        if serving.canary is not None and serving.canary.cache is not None:
            serving.canary.cache.resize(canary_bytes)

    def check_once(self) -> bool:
        """Load what CURRENT and CANARY name if it is new; True when a change is staged."""
        try:
            wanted = self.store.read_current()
        except ArtifactError as exc:
            logger.warning("cannot read CURRENT: %s", exc)
            return False
        with self._lock:
            base = self._staged or self._serving
        try:
            canary: Canary | None = self.store.read_canary()
        except ArtifactError as exc:
            logger.warning("cannot read CANARY, keeping the canary as it is: %s", exc)
            canary = (
                Canary(base.canary.loaded.version, base.share) if base.canary is not None else None
            )
        if canary is not None and canary.version == wanted:
            canary = None  # promoted: CURRENT names it already
        # Refused versions are tried again once they are named anew.
        self._refused &= {wanted, canary.version if canary else wanted}
        loaded = {r.loaded.version: r for r in base.recommenders}
        live = loaded.get(wanted) or self._try_load(wanted) or base.live
        canary_rec = None
        if canary is not None:
            canary_rec = loaded.get(canary.version) or self._try_load(
                canary.version, int(self.cache_bytes * canary.share)
            )
        staged = Serving(live, canary_rec, canary.share if canary and canary_rec else 0.0)
        if staged.same_as(base):
            return False
        with self._lock:
            self._staged = staged
        logger.info(
            "versions %s loaded and verified; serving them from the next batch",
            ", ".join(r.loaded.version for r in staged.recommenders),
        )
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="version-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        if self.thread_setup is not None:
            self.thread_setup()
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.check_once()
            except Exception:  # the watcher must outlive any surprise
                logger.exception("version check failed")
