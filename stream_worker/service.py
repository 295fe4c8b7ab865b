"""Starting the worker: the checks that must pass first, then faust's own runner."""

import gc
import logging

import faust

from stream_worker.app import WorkerContext, create_app, limit_cpu_threads
from stream_worker.broker import ensure_topics
from stream_worker.kafka_config import check_connection, security_options
from stream_worker.settings import Settings
from stream_worker.store import check_migrated, make_engine, redacted

logger = logging.getLogger(__name__)


def prepare_worker(settings: Settings) -> WorkerContext:
    """Fail fast on an unmigrated database or a missing model; create missing topics."""
    url = settings.database.url.get_secret_value()
    engine = make_engine(url, pool_size=settings.database.pool_size, echo=settings.database.echo)
    check_migrated(engine)
    check_connection(settings.kafka)
    topics = settings.topics
    created = ensure_topics(
        settings.kafka.bootstrap_servers,
        {
            name: topics.partitions
            for name in (topics.events, topics.recommendations, topics.dead_letter)
        },
        topics.replication_factor,
        client_config=security_options(settings.kafka),
    )
    if created:
        logger.info("created topics %s", ", ".join(created))
    # The model loads and warms up here; the batch thread sets its own (create_app).
    limit_cpu_threads(settings.worker.cpu_threads)
    ctx = create_app(settings, engine)
    logger.info(
        "worker ready: database %s, topics %s -> %s (dead letters %s)",
        redacted(url),
        topics.events,
        topics.recommendations,
        topics.dead_letter,
    )
    return ctx


def run_worker(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM; faust stops the agent, flushes and commits."""
    ctx = prepare_worker(settings)
    worker = faust.Worker(
        ctx.app,
        loglevel=settings.log_level,
        override_logging=False,
        quiet=True,
    )
    worker.spinner = None  # it writes terminal control codes into the log
    if settings.worker.gc_freeze:
        # ~270k objects live as long as the process; a full collection that scans them
        # stops every thread for ~150 ms (measured here), a stall that every event in
        # flight waits for. Frozen, they are never scanned again.
        gc.collect()
        gc.freeze()
    ctx.metrics.watch_gc()
    # Loads new versions in the background; the swap happens between batches.
    ctx.watcher.start()
    try:
        worker.execute_from_commandline()
    finally:
        ctx.executor.shutdown(wait=True)
        ctx.watcher.stop()
