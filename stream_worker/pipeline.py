"""One micro-batch, start to finish, as plain synchronous code.

decode -> (dead letters) -> one DB transaction -> encode + search -> output records.
The worker's batch consumer runs :meth:`BatchProcessor.process` on its own thread and
only publishes what it returns, so this module knows nothing of Kafka clients.
"""

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_never,
    wait_exponential_jitter,
)

from stream_worker.errors import DatabaseUnavailable
from stream_worker.events import (
    DEAD_LETTER_MAX_KEY_COPY,
    ClickEvent,
    DecodeLimits,
    Rejected,
    dead_letter_value,
    decode_event,
    recommendation_value,
)
from stream_worker.metrics import WorkerMetrics
from stream_worker.recommender import Ranked, Recommender, Serving, StageTimes, VersionWatcher
from stream_worker.settings import Settings
from stream_worker.store import (
    AppliedBatch,
    LastRecommendation,
    apply_batch,
    database_problem,
    load_histories,
    stored_offsets,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawRecord:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


@dataclass
class BatchOutput:
    recommendations: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    stages_ms: dict[str, float] = field(default_factory=dict)


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        watcher: VersionWatcher,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.watcher = watcher
        self.metrics = metrics
        self.clock = clock
        self.limits = DecodeLimits.from_settings(settings.worker)
        self.topic = settings.topics.events
        # Monotonic time of the batch in progress's last sign of life (its start, or a
        # database retry); None between batches. Read by the liveness probe.
        self.progress_at: float | None = None
        # Online evaluation at 10 and at the served top_k; catalogue coverage per version.
        self.online_ks = sorted({10, settings.worker.top_k})
        self._covered: dict[str, set[str]] = {}
        # An outage blocks the batch (and so the partition's offsets) until the
        # database is back: nothing is acknowledged that was not applied.
        self._apply = retry(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_exponential_jitter(multiplier=0.2, max=10.0, jitter=0.2),
            stop=stop_never,
            before_sleep=self._before_retry,
            reraise=True,
        )(apply_batch)

    def _before_retry(self, state: RetryCallState) -> None:
        self.progress_at = time.monotonic()  # waiting for the database, not wedged
        self.metrics.db_retries.inc()
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("database unavailable (attempt %d), retrying: %s", state.attempt_number, exc)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def stored_offsets(self) -> dict[int, int]:
        """The offsets stored with the state: partition -> last applied offset."""
        return stored_offsets(self.engine, self.topic)

    def database_problem(self) -> str | None:
        """None when the state database answers; else why not (for readiness)."""
        return database_problem(self.engine)

    def stalled_s(self) -> float:
        """Seconds the batch in progress has gone without progress (0 between batches)."""
        started = self.progress_at
        return 0.0 if started is None else time.monotonic() - started

    def process(self, records: Sequence[RawRecord]) -> BatchOutput:
        self.progress_at = time.monotonic()
        try:
            return self._process(records)
        finally:
            self.progress_at = None

    def _process(self, records: Sequence[RawRecord]) -> BatchOutput:
        out = BatchOutput()
        # One set of versions per batch: a swap staged meanwhile applies to the next.
        serving = self.watcher.current()
        t0 = time.perf_counter()
        events: list[ClickEvent] = []
        now = self.now_ms()
        for rec in records:
            decoded = decode_event(rec.value, rec.key, rec.partition, rec.offset, now, self.limits)
            if isinstance(decoded, Rejected):
                self._dead_letter(decoded, out, now)
            else:
                events.append(decoded)
        t1 = time.perf_counter()
        applied = None
        answer = _Answer(self, serving, events)
        if records:
            # Where each partition stands after this batch, bad records included
            # (records come in offset order within a partition).
            positions = {rec.partition: rec.offset for rec in records}
            history = self.settings.worker.history_length
            applied = self._apply(
                self.engine, self.topic, events, history, positions, answer if events else None
            )
        t2 = time.perf_counter()
        times = answer.times
        if applied is not None and events:
            self.metrics.events.labels("applied").inc(applied.applied)
            self.metrics.events.labels("duplicate").inc(applied.skipped)
            if not applied.applied:  # all re-deliveries: answered from stored state
                answer(applied)
            out.recommendations = answer.answered.records
            self._score_online(applied)
            self._count_published(serving, answer.answered)
        t3 = time.perf_counter()
        answer_ms = answer.seconds * 1000
        # The answer runs inside the database transaction: its time is not the db stage's.
        out.stages_ms = {
            "decode": (t1 - t0) * 1000,
            "db": max(0.0, (t2 - t1) * 1000 - answer_ms),
            "encode": times.encode_ms,
            "search": times.search_ms,
            "rank": max(0.0, answer_ms + (t3 - t2) * 1000 - times.encode_ms - times.search_ms),
        }
        self.metrics.batch_size.observe(len(records))
        for kind, count in times.reuse.items():
            self.metrics.encoded.labels(kind).inc(count)
        self.metrics.encoder_cache_bytes.set(
            sum(r.cache.bytes for r in serving.recommenders if r.cache is not None)
        )
        for stage, ms in out.stages_ms.items():
            self.metrics.stage_ms.labels(stage).observe(ms)
        return out

    def _dead_letter(self, rejected: Rejected, out: BatchOutput, now: int) -> None:
        self.metrics.events.labels("dead_letter").inc()
        self.metrics.dead_letters.labels(rejected.reason.value).inc()
        logger.warning(
            "dead letter partition=%d offset=%d reason=%s: %s",
            rejected.partition,
            rejected.offset,
            rejected.reason.value,
            rejected.detail,
        )
        # The key is copied like the value, capped, so the letter fits one Kafka record.
        key = None if rejected.key is None else rejected.key[:DEAD_LETTER_MAX_KEY_COPY]
        out.dead_letters.append((key, dead_letter_value(rejected, self.topic, now)))

    def _score_online(self, applied: AppliedBatch) -> None:
        """Each user's first applied event against what was last published to it."""
        for version, hits in online_scores(applied, self.online_ks).items():
            self.metrics.online_scored.labels(version).inc(hits.scored)
            for k in self.online_ks:
                self.metrics.online_hits.labels(version, str(k)).inc(hits.hits[k])
                self.metrics.online_ndcg.labels(version, str(k)).inc(hits.gains[k])

    def _count_published(self, serving: Serving, answer: "Answered") -> None:
        for (version, source), count in answer.published.items():
            self.metrics.recommendations.labels(version, source).inc(count)
        top_k = self.settings.worker.top_k
        for recommender in serving.recommenders:
            version = recommender.model_version
            covered = self._covered.setdefault(version, set())
            for rec in answer.last.values():
                if rec.model_version == version:
                    covered.update(rec.items[:top_k])
            self.metrics.online_coverage.labels(version).set(
                len(covered) / max(1, recommender.num_items)
            )
        while len(self._covered) > 4:  # versions long gone
            old = next(iter(self._covered))
            del self._covered[old]
            self.metrics.online_coverage.remove(old)

    def recommend_batch(
        self,
        serving: Serving,
        events: Sequence[ClickEvent],
        applied: AppliedBatch,
        times: StageTimes,
    ) -> "Answered":
        """The records to publish for a batch, each user's from the version that serves
        it (``Serving.route``), and per user what they carry (its top ``max(top_k, 10)``
        items, kept in the state for online scoring)."""
        k = max(self.settings.worker.top_k, max(self.online_ks))
        sequences = dict(applied.sequences)
        types = dict(applied.types)
        last_event = dict(applied.last_event)
        # Re-delivered events (a crash after the DB commit, before the publish) are not
        # applied twice, but their users still get a recommendation from stored state.
        replayed = {e.user_id: e for e in events if e.user_id not in sequences}
        if replayed:
            for user, (stored, codes) in load_histories(self.engine, list(replayed)).items():
                sequences[user], types[user] = stored, codes
            for user, event in replayed.items():
                last_event.setdefault(user, event)
        if self.settings.worker.emit_per_event:
            return self._recommend_per_event(applied, sequences, types, serving, k, times)
        answered = Answered()
        for recommender, users in serving.split(sequences):
            ranked = recommender.recommend(
                {user: sequences[user] for user in users},
                k,
                times,
                {user: user for user in users},
                types,
            )
            produced = self.now_ms()
            for user, items in ranked.items():
                record = self._record(user, items, recommender, last_event[user], produced)
                answered.add(user, record, items, recommender, user in times.fallbacks)
        return answered

    def _recommend_per_event(
        self,
        applied: AppliedBatch,
        sequences: dict[str, list[str]],
        types: dict[str, str],
        serving: Serving,
        k: int,
        times: StageTimes,
    ) -> "Answered":
        # The state after each event is the final state without the user's later items
        # of this batch.
        remaining: dict[str, int] = {}
        for event in applied.applied_events:
            remaining[event.user_id] = remaining.get(event.user_id, 0) + 1
        states: dict[str, list[str]] = {}
        state_types: dict[str, str] = {}
        users: dict[str, str] = {}
        order: list[tuple[str, ClickEvent]] = []
        for i, event in enumerate(applied.applied_events):
            remaining[event.user_id] -= 1
            full = sequences[event.user_id]
            key = f"{i}\x00{event.user_id}"
            states[key] = full[: len(full) - remaining[event.user_id]]
            state_types[key] = types.get(event.user_id, "")[: len(states[key])]
            users[key] = event.user_id
            order.append((key, event))
        ranked: dict[str, Ranked] = {}
        served: dict[str, Recommender] = {}
        for recommender, keys in serving.split(states, users):
            ranked |= recommender.recommend(
                {key: states[key] for key in keys}, k, times, users, state_types
            )
            served |= dict.fromkeys(keys, recommender)
        produced = self.now_ms()
        answered = Answered()
        for key, event in order:
            recommender, items = served[key], ranked[key]
            record = self._record(event.user_id, items, recommender, event, produced)
            answered.add(event.user_id, record, items, recommender, key in times.fallbacks)
        times.fallbacks = {users[key] for key in times.fallbacks}
        return answered

    def _record(
        self,
        user: str,
        items: list[tuple[str, float]],
        recommender: Recommender,
        event: ClickEvent,
        produced: int,
    ) -> tuple[bytes, bytes]:
        self.metrics.end_to_end_ms.observe(max(0, produced - event.ts))
        value = recommendation_value(
            user,
            items[: self.settings.worker.top_k],
            recommender.model_version,
            recommender.index_version,
            event.event_id,
            event.ts,
            produced,
            event.partition,
            event.offset,
        )
        return user.encode(), value


@dataclass
class Answered:
    """A batch's recommendations: the records in publishing order, each user's last list
    (for online scoring) and the records per (model version, source)."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    last: dict[str, LastRecommendation] = field(default_factory=dict)
    published: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(
        self,
        user: str,
        record: tuple[bytes, bytes],
        items: Ranked,
        recommender: Recommender,
        fallback: bool,
    ) -> None:
        version = recommender.model_version
        self.records.append(record)
        self.last[user] = LastRecommendation([i for i, _ in items], version)
        key = (version, "popularity" if fallback else "model")
        self.published[key] = self.published.get(key, 0) + 1


class _Answer:
    """The batch's answer, computed inside its database transaction (``apply_batch``
    calls it; again if the transaction is retried, so each call starts afresh)."""

    def __init__(
        self, processor: BatchProcessor, serving: Serving, events: Sequence[ClickEvent]
    ) -> None:
        self.processor = processor
        self.serving = serving
        self.events = events
        self.times = StageTimes()
        self.answered = Answered()
        self.seconds = 0.0

    def __call__(self, applied: AppliedBatch) -> dict[str, LastRecommendation]:
        started = time.perf_counter()
        self.times = StageTimes()
        self.answered = self.processor.recommend_batch(
            self.serving, self.events, applied, self.times
        )
        self.seconds = time.perf_counter() - started
        return self.answered.last


@dataclass
class OnlineHits:
    """One model version's online scores in a batch."""

    scored: int = 0
    hits: dict[int, int] = field(default_factory=dict)
    gains: dict[int, float] = field(default_factory=dict)


def online_scores(applied: AppliedBatch, ks: Sequence[int]) -> dict[str, OnlineHits]:
    """Per model version: each user's first applied event of the batch scored against
    the items last published to the user (``applied.previous``): a hit at k when its
    item is in the top k, with NDCG gain ``1 / log2(rank + 2)`` (0-based rank)."""
    first: dict[str, str] = {}
    for event in applied.applied_events:
        first.setdefault(event.user_id, event.item_id)
    out: dict[str, OnlineHits] = {}
    for user, previous in applied.previous.items():
        target = first.get(user)
        if target is None:
            continue
        scores = out.setdefault(
            previous.model_version,
            OnlineHits(0, dict.fromkeys(ks, 0), dict.fromkeys(ks, 0.0)),
        )
        scores.scored += 1
        if target not in previous.items:
            continue
        rank = previous.items.index(target)
        for k in ks:
            if rank < k:
                scores.hits[k] += 1
                scores.gains[k] += 1.0 / math.log2(rank + 2)
    return out
