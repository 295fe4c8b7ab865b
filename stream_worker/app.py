"""The faust application: lifecycle, health and metrics, and a batch consumer.

faust runs the worker (signals, service start and stop, the web server for ``/live``,
``/ready`` and ``/metrics``). Events are read by :class:`BatchConsumer`, a faust service around an
aiokafka group consumer and producer: it fetches whole micro-batches with ``getmany``,
runs the blocking batch work (database, encoder, FAISS) on one dedicated thread so the
event loop keeps heartbeating and per-partition order is kept, and publishes dead
letters and recommendations as record batches. Offsets are committed at most every
``commit_interval_s``, and only once every output of the batches they cover is
acknowledged by the broker.

Why not a faust agent: faust's stream machinery costs ~200 µs per event on this 2-core
machine (an agent doing nothing but ``take_events(1024)`` peaks at ~5,000 events/s,
against ~27,000 for a bare aiokafka consume->decode->produce loop), so it capped the
worker below its throughput target; ``recstream bench e2e`` measures both side by side.
"""

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiokafka
import faiss
import faust
import mode
import torch
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from faust.app.base import BootStrategy
from sqlalchemy.engine import Engine

from model.artifact_store import open_store
from model.errors import RecstreamError
from stream_worker.errors import WorkerError
from stream_worker.kafka_config import bootstrap_list, faust_broker_options, security_options
from stream_worker.metrics import WorkerMetrics
from stream_worker.pipeline import BatchProcessor, RawRecord
from stream_worker.recommender import Recommender, Serving, VersionWatcher
from stream_worker.settings import Settings

logger = logging.getLogger(__name__)


def describe_positions(records: list[RawRecord]) -> str:
    """``partition=P offsets=A..B`` for each partition in a batch, for log lines."""
    spans: dict[int, tuple[int, int]] = {}
    for rec in records:
        low, high = spans.get(rec.partition, (rec.offset, rec.offset))
        spans[rec.partition] = (min(low, rec.offset), max(high, rec.offset))
    return ", ".join(f"partition={p} offsets={a}..{b}" for p, (a, b) in sorted(spans.items()))


async def send_batches(
    producer: aiokafka.AIOKafkaProducer,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes]],
    partitioner: DefaultPartitioner,
) -> list["asyncio.Future[Any]"]:
    """Send ``records`` as one record batch per partition (a per-record ``send`` costs
    ~50 µs of Python each); keys pick partitions as Kafka's default partitioner does.
    Returns the futures of the broker's acknowledgements."""
    if not records:
        return []
    partitions = sorted(await producer.partitions_for(topic))
    grouped: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for key, value in records:
        partition = partitioner(key, partitions, partitions)  # None key: random
        grouped.setdefault(partition, []).append((key, value))
    futures = []
    for partition, rows in grouped.items():
        batch = producer.create_batch()
        for key, value in rows:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                futures.append(await _send_closed(producer, batch, topic, partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        futures.append(await _send_closed(producer, batch, topic, partition))
    return futures


async def _send_closed(
    producer: aiokafka.AIOKafkaProducer, batch: Any, topic: str, partition: int
) -> "asyncio.Future[Any]":
    # A closed batch is complete: the producer sends it at once instead of holding it
    # for linger_ms in case more records arrive (+5 ms on every recommendation).
    batch.close()
    future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
    return future


class _Rebalance(aiokafka.ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    def __init__(self, owner: "BatchConsumer") -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        await self.owner.partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        await self.owner.partitions_assigned(list(assigned))


class BatchConsumer(mode.Service):
    """Consume micro-batches, process them off the loop, publish, then commit."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        metrics: WorkerMetrics,
        executor: ThreadPoolExecutor,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.executor = executor
        self.in_flight = asyncio.Lock()
        self.consumer: aiokafka.AIOKafkaConsumer | None = None
        self.producer: aiokafka.AIOKafkaProducer | None = None
        self.partitioner = DefaultPartitioner()
        self.batches = 0
        self.records = 0
        self._unacked: list[asyncio.Future[Any]] = []
        self._to_commit: dict[Any, int] = {}
        self._last_commit = time.monotonic()
        self._committing: asyncio.Future[None] | None = None
        # Set once a send is refused: from then on nothing is processed or committed in
        # this process (a later batch's acknowledged outputs must not carry a commit
        # past the refused ones), and the restart reads the batches again.
        self._publish_failed: BaseException | None = None
        # In the consumer group: set once a rebalance assigned this member its share
        # (possibly none), cleared while one is under way and at stop.
        self.in_group = False
        self._next_offset: dict[Any, int] = {}  # next offset to process, per partition

    async def on_start(self) -> None:
        kafka, worker = self.settings.kafka, self.settings.worker
        self.consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=bootstrap_list(kafka),
            client_id=kafka.client_id,
            group_id=worker.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Brokers that hold a fetch until this deadline (tansu does, even when data
            # arrives) make it a latency floor; faust's own consumer hard-codes 1500 ms.
            fetch_max_wait_ms=worker.fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # aiokafka's 100 ms logs ~100 errors a second while the broker is down.
            retry_backoff_ms=500,
            session_timeout_ms=int(worker.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, worker.session_timeout_s / 3) * 1000),
            **security_options(kafka),
        )
        self.consumer.subscribe([self.settings.topics.events], listener=_Rebalance(self))
        self.producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=bootstrap_list(kafka),
            client_id=kafka.client_id,
            acks="all",
            # Retries after a leader change or a lost connection never double an output.
            enable_idempotence=worker.idempotent_producer,
            linger_ms=worker.producer_linger_ms,
            **security_options(kafka),
        )
        await self.producer.start()
        await self.consumer.start()

    async def partitions_revoked(self, revoked: list[Any]) -> None:
        """The batch in flight finishes, and everything processed is acknowledged and
        committed before the partitions move (the database skips any overlap)."""
        self.in_group = False
        async with self.in_flight:
            if self.consumer is not None:
                await self.commit_now(self.consumer)
        for tp in revoked:
            self._next_offset.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(tp.partition))

    async def partitions_assigned(self, assigned: list[Any]) -> None:
        await self.resume_from_database(assigned)
        if self.consumer is not None:
            for tp in assigned:
                self._next_offset[tp] = await self.consumer.position(tp)
        self.in_group = True
        partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned)
        logger.info("partitions assigned: %s", json.dumps(partitions))

    def update_lag(self) -> None:
        """``recstream_consumer_lag`` of each assigned partition, from the high watermark
        the last fetch reported."""
        if self.consumer is None:
            return
        for tp, next_offset in self._next_offset.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - next_offset))

    async def resume_from_database(self, assigned: list[Any]) -> None:
        """Re-read from the database's offset where it is behind the committed one.

        Offsets are committed only after the outputs are acknowledged, so normally the
        committed offset is at or before the stored one, and re-read events are
        answered from stored state without being applied again. A database that lost
        its newest commits (SQLite's WAL without a sync per commit, after a power cut)
        is behind instead: those events are read and applied again.
        """
        if not assigned or self.consumer is None:
            return
        loop = asyncio.get_running_loop()
        try:
            stored = await loop.run_in_executor(self.executor, self.processor.stored_offsets)
        except RecstreamError as exc:
            logger.warning("could not read stored offsets (%s); using committed offsets", exc)
            return
        for tp in assigned:
            committed = await self.consumer.committed(tp)
            position = stored.get(tp.partition)
            if position is not None and committed is not None and position + 1 < committed:
                logger.warning(
                    "partition %d: database at offset %d, behind the committed %d; "
                    "re-reading from the database's position",
                    tp.partition, position, committed,
                )  # fmt: skip
                self.consumer.seek(tp, position + 1)

    async def on_stop(self) -> None:
        # Let the batch in flight publish and commit, then leave the group: the clients
        # close even when the commit is refused, so the group rebalances at once.
        self.in_group = False
        async with self.in_flight:
            try:
                if self.consumer is not None and self._publish_failed is None:
                    await self.commit_now(self.consumer)
            finally:
                if self.consumer is not None:
                    await self.consumer.stop()
                    self.consumer = None
                if self.producer is not None:
                    await self.producer.stop()
                    self.producer = None

    @mode.Service.task
    async def _consume(self) -> None:
        worker = self.settings.worker
        while not self.should_stop:
            consumer = self.consumer
            if consumer is None:
                return
            fetched = await consumer.getmany(
                timeout_ms=max(worker.batch_max_wait_ms, 1), max_records=worker.batch_size
            )
            async with self.in_flight:
                if self.consumer is None:
                    return
                if self._publish_failed is not None:
                    # Seen by a rebalance's commit (or the background commit, which has
                    # crashed already): process nothing more.
                    await self._stop_after_refused_send()
                    return
                if fetched:
                    await self._handle(fetched)
                self.update_lag()
                due = time.monotonic() - self._last_commit >= worker.commit_interval_s
                if self._to_commit and (due or not fetched):
                    self._commit_in_background(consumer)

    async def _handle(self, fetched: dict[Any, Any]) -> None:
        records = [
            RawRecord(m.key, m.value, m.partition, m.offset)
            for messages in fetched.values()
            for m in messages
        ]
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(self.executor, self.processor.process, records)
        except Exception:
            # A bug, not bad input (that is dead-lettered): crash without committing,
            # so the batch is read again after the restart (mode crashes the worker).
            logger.exception("batch failed: %s", describe_positions(records))
            raise
        started = time.perf_counter()
        topics = self.settings.topics
        # Acknowledgements are awaited before the next commit, not here: the next batch
        # is processed while the broker replicates this one's outputs.
        # Appended after the awaits: `self._unacked += await ...` would read the list
        # before a commit that ran meanwhile swapped it, and put it back.
        letters = await self._send(topics.dead_letter, output.dead_letters)
        recommendations = await self._send(topics.recommendations, output.recommendations)
        self._unacked += letters + recommendations
        done = {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}
        self._to_commit.update(done)
        self._next_offset.update(done)
        self.metrics.stage_ms.labels("publish").observe((time.perf_counter() - started) * 1000)
        self.metrics.last_batch_ts.set_to_current_time()
        self.batches += 1
        self.records += len(records)
        logger.debug("batch done: %s", describe_positions(records))

    def _commit_in_background(self, consumer: aiokafka.AIOKafkaConsumer) -> None:
        """Commit without holding up the next batch; one commit at a time, in order."""
        if self._committing is None or self._committing.done():
            self._committing = asyncio.ensure_future(self._commit_or_crash(consumer))

    async def _commit_or_crash(self, consumer: aiokafka.AIOKafkaConsumer) -> None:
        try:
            await self._flush_and_commit(consumer)
        except Exception as exc:
            if self._publish_failed is None:
                self._publish_failed = exc
            await self._stop_after_refused_send()

    async def _stop_after_refused_send(self) -> None:
        """The one reaction to a refused send, whichever commit saw it: log it and crash,
        once, committing nothing (the restart reads the uncommitted batches again;
        ``on_stop`` skips its commit but closes the clients)."""
        if self.crashed:
            return
        logger.error(
            "publishing failed; stopping without committing", exc_info=self._publish_failed
        )
        assert self._publish_failed is not None
        await self.crash(self._publish_failed)

    async def commit_now(self, consumer: aiokafka.AIOKafkaConsumer) -> None:
        """Commit now (rebalance, stop), after any commit under way: commits stay in order."""
        if self._committing is not None and not self._committing.done():
            await asyncio.shield(self._committing)
        await self._flush_and_commit(consumer)

    async def _flush_and_commit(self, consumer: aiokafka.AIOKafkaConsumer) -> None:
        """Wait until every output sent so far is acknowledged, then commit the offsets
        of the batches that produced them. A failed send raises: the worker stops
        without committing, and the batch is read again after the restart."""
        if self._publish_failed is not None:
            raise WorkerError(
                f"not committing: a send was refused earlier ({self._publish_failed!r})"
            )
        started = time.perf_counter()
        unacked, self._unacked = self._unacked, []
        offsets, self._to_commit = self._to_commit, {}
        self._last_commit = time.monotonic()
        try:
            await asyncio.gather(*unacked)
        except BaseException as exc:
            self._publish_failed = exc
            raise
        if offsets:
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                # Safe to go on: re-read events are recognised by the offsets stored
                # with the state, answered, and not applied twice.
                logger.warning("offset commit failed (%s); a later commit covers it", exc)
        self.metrics.stage_ms.labels("commit").observe((time.perf_counter() - started) * 1000)

    async def _send(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes]]
    ) -> list["asyncio.Future[Any]"]:
        assert self.producer is not None
        return await send_batches(self.producer, topic, records, self.partitioner)


class _Boot(BootStrategy):
    # faust runs the process, the web server and the services; BatchConsumer owns the
    # Kafka clients, so faust's own consumer, producer and agents stay off.
    enable_kafka_consumer = False
    enable_kafka_producer = False


class App(faust.App):
    BootStrategy = _Boot

    def __init__(self, *args: Any, batch_consumer: BatchConsumer, **kwargs: Any) -> None:
        self._batch_consumer = batch_consumer
        super().__init__(*args, **kwargs)

    def on_init_dependencies(self) -> Iterable[mode.ServiceT]:
        # Started after the web server, stopped before it.
        return [*super().on_init_dependencies(), self._batch_consumer]


@dataclass
class WorkerContext:
    """What a running worker holds, for tests and the demo to inspect."""

    app: faust.App
    processor: BatchProcessor
    watcher: VersionWatcher
    metrics: WorkerMetrics
    executor: ThreadPoolExecutor
    consumer: BatchConsumer


def limit_cpu_threads(threads: int) -> None:
    """Run torch and FAISS on ``threads`` OpenMP threads from the calling thread on
    (0: leave their defaults, one per core).

    OpenMP keeps the thread count per thread: set only in the main thread, the batch
    thread would still run every operator on one thread per core, so it is called in
    each thread that encodes or searches. OpenMP threads that wait for each other at
    every operator stall whenever one of them is descheduled, as on cores shared with
    the broker.
    """
    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def create_app(settings: Settings, engine: Engine) -> WorkerContext:
    """Build the faust app, its batch consumer, and its /live, /ready and /metrics."""
    metrics = WorkerMetrics()
    metrics.version_max_age.set(settings.artifacts.max_age_s)

    def on_swap(recommender: Recommender) -> None:
        metrics.swaps.inc()
        metrics.set_version(
            recommender.model_version, recommender.index_version, recommender.published_at
        )

    def on_canary(serving: Serving) -> None:
        canary = serving.canary
        metrics.set_canary(
            None if canary is None else (canary.loaded.version, canary.model_version, serving.share)
        )

    setup_thread = functools.partial(limit_cpu_threads, settings.worker.cpu_threads)
    watcher = VersionWatcher(
        open_store(settings.artifacts.root, endpoint_url=settings.artifacts.endpoint_url),
        settings.worker.device,
        settings.artifacts.poll_interval_s,
        on_swap=on_swap,
        cache_bytes=settings.worker.encoder_cache_mb * 2**20,
        thread_setup=setup_thread,
        cache_dir=settings.artifacts.cache_dir,
        on_canary=on_canary,
    )
    active = watcher.active
    metrics.set_version(active.model_version, active.index_version, active.published_at)
    processor = BatchProcessor(settings, engine, watcher, metrics)
    # One thread: batches of this worker run strictly one after another, in order.
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="batch", initializer=setup_thread
    )
    consumer = BatchConsumer(settings, processor, metrics, executor)
    app = App(
        settings.worker.group_id,
        batch_consumer=consumer,
        **faust_broker_options(settings.kafka),
        store="memory://",
        datadir=str(settings.worker.data_dir),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=settings.worker.web_port > 0,
        web_port=settings.worker.web_port or 6066,
        web_bind="0.0.0.0",
        web_in_thread=False,
    )
    ctx = WorkerContext(app, processor, watcher, metrics, executor, consumer)
    probes = Probes(settings, processor, watcher, consumer, metrics)

    @app.page("/live")
    async def live(web: Any, request: Any) -> Any:
        body, ok = probes.liveness()
        return web.json(body, status=200 if ok else 503)

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        body, ok = await probes.readiness()
        return web.json(body, status=200 if ok else 503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        await probes.readiness()  # recstream_ready, as of this scrape
        return web.bytes(metrics.exposition(), content_type="text/plain; version=0.0.4")

    return ctx


class Probes:
    """What ``/live`` and ``/ready`` answer.

    Live: the event loop answers (this runs on it) and no batch has gone longer than
    ``WORKER__LIVENESS_BATCH_S`` without progress (a database retry is progress: an
    outage makes the worker unready, not unlive). Ready: in the consumer group, the
    state database answers, a verified version is loaded.
    """

    DATABASE_TIMEOUT_S = 5.0

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        watcher: VersionWatcher,
        consumer: BatchConsumer,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.watcher = watcher
        self.consumer = consumer
        self.metrics = metrics

    def liveness(self) -> tuple[dict[str, Any], bool]:
        stalled = self.processor.stalled_s()
        limit = self.settings.worker.liveness_batch_s
        if stalled > limit:
            return {
                "status": "wedged",
                "detail": f"a batch has made no progress for {stalled:.0f}s (limit {limit:g}s)",
            }, False
        return {"status": "live", "batch_s": round(stalled, 3)}, True

    async def readiness(self) -> tuple[dict[str, Any], bool]:
        problems = []
        if not self.consumer.in_group:
            problems.append("not in its consumer group")
        loop = asyncio.get_running_loop()
        try:
            # The default executor: the batch thread may be busy (or waiting on this
            # very database) and must not hold the probe up.
            database = await asyncio.wait_for(
                loop.run_in_executor(None, self.processor.database_problem),
                self.DATABASE_TIMEOUT_S,
            )
        except TimeoutError:
            database = f"the database did not answer within {self.DATABASE_TIMEOUT_S:g}s"
        if database:
            problems.append(database)
        serving = self.watcher.serving
        current = serving.live
        body: dict[str, Any] = {
            "status": "not ready" if problems else "ready",
            "version": current.loaded.version,
            "model_version": current.model_version,
            "index_version": current.index_version,
            "batches": self.consumer.batches,
            "records": self.consumer.records,
        }
        if serving.canary is not None:
            body["canary"] = {
                "version": serving.canary.loaded.version,
                "model_version": serving.canary.model_version,
                "share": serving.share,
            }
        if problems:
            body["problems"] = problems
        self.metrics.ready.set(0 if problems else 1)
        return body, not problems
