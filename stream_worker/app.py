"""The faust application: a thin agent around :class:`BatchProcessor`.

The agent takes micro-batches of events, runs the blocking batch work (database,
encoder, FAISS) on one dedicated thread so the event loop keeps heartbeating and
per-partition order is kept, publishes dead letters and recommendations, and only then
lets faust acknowledge the batch. Faust flushes the producer before committing
offsets, so an offset is never committed ahead of its outputs.
"""

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faust
from sqlalchemy.engine import Engine

from stream_worker.faust_transport import App
from stream_worker.kafka_config import faust_broker_options
from stream_worker.metrics import WorkerMetrics
from stream_worker.pipeline import BatchProcessor, RawRecord
from stream_worker.recommender import Recommender, VersionWatcher
from stream_worker.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a running worker holds, for tests and the demo to inspect."""

    app: faust.App
    processor: BatchProcessor
    watcher: VersionWatcher
    metrics: WorkerMetrics
    executor: ThreadPoolExecutor
    batches: int = 0
    records: int = 0


def describe_positions(records: list[RawRecord]) -> str:
    """``partition=P offsets=A..B`` for each partition in a batch, for log lines."""
    spans: dict[int, tuple[int, int]] = {}
    for rec in records:
        low, high = spans.get(rec.partition, (rec.offset, rec.offset))
        spans[rec.partition] = (min(low, rec.offset), max(high, rec.offset))
    return ", ".join(f"partition={p} offsets={a}..{b}" for p, (a, b) in sorted(spans.items()))


def create_app(settings: Settings, engine: Engine) -> WorkerContext:
    """Build the faust app, its topics, agent, health and metrics pages."""
    metrics = WorkerMetrics()

    def on_swap(recommender: Recommender) -> None:
        metrics.swaps.inc()
        metrics.set_version(recommender.model_version, recommender.index_version)

    watcher = VersionWatcher(
        settings.artifacts.root,
        settings.worker.device,
        settings.artifacts.poll_interval_s,
        on_swap=on_swap,
    )
    active = watcher.active
    metrics.set_version(active.model_version, active.index_version)
    processor = BatchProcessor(settings, engine, watcher, metrics)
    topics = settings.topics
    app = App(
        settings.worker.group_id,
        fetch_max_wait_ms=settings.worker.fetch_max_wait_ms,
        **faust_broker_options(settings.kafka),
        store="memory://",
        datadir=str(settings.worker.data_dir),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.worker.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.worker.session_timeout_s / 3),
        producer_linger=settings.worker.producer_linger_ms / 1000,
        producer_acks=-1,
        web_enabled=settings.worker.web_port > 0,
        web_port=settings.worker.web_port or 6066,
        web_bind="0.0.0.0",
        web_in_thread=False,
    )
    # One thread: batches of this worker run strictly one after another, in order.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
    ctx = WorkerContext(app, processor, watcher, metrics, executor)

    def topic(name: str) -> Any:
        return app.topic(
            name, partitions=topics.partitions, key_serializer="raw", value_serializer="raw"
        )

    events_topic = topic(topics.events)
    recommendations_topic = topic(topics.recommendations)
    dead_letter_topic = topic(topics.dead_letter)
    batch_size = settings.worker.batch_size
    within = settings.worker.batch_max_wait_ms / 1000

    @app.agent(events_topic, name="recommend")
    async def recommend(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(batch_size, within=within):
            records = [
                RawRecord(e.message.key, e.message.value, e.message.partition, e.message.offset)
                for e in events
            ]
            try:
                output = await loop.run_in_executor(executor, processor.process, records)
            except Exception:
                # A bug, not bad input (that is dead-lettered): crash without acking, so
                # the batch is re-read after the restart.
                logger.exception("batch failed: %s", describe_positions(records))
                raise
            logger.debug("batch done: %s", describe_positions(records))
            started = time.perf_counter()
            for key, value in output.dead_letters:
                await dead_letter_topic.send(key=key, value=value)
            for key, value in output.recommendations:
                await recommendations_topic.send(key=key, value=value)
            metrics.stage_ms.labels("publish").observe((time.perf_counter() - started) * 1000)
            metrics.last_batch_ts.set_to_current_time()
            ctx.batches += 1
            ctx.records += len(records)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        current = watcher.active
        return web.json(
            {
                "status": "ok",
                "model_version": current.model_version,
                "index_version": current.index_version,
                "batches": ctx.batches,
                "records": ctx.records,
            }
        )

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(metrics.exposition(), content_type="text/plain; version=0.0.4")

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode types a callable union
    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs.get("assigned", ())
        partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned)
        logger.info("partitions assigned: %s", json.dumps(partitions))

    return ctx
