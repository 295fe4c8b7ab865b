"""Prometheus metrics of one worker, on a registry of its own (no import-time globals)."""

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

# Milliseconds: encode and search take ~0.1-10 ms, end to end up to seconds under backlog.
MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter(
            "recstream_events",
            "Input records by outcome: applied, duplicate (already applied), dead_letter.",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "recstream_dead_letters",
            "Records sent to the dead-letter topic.",
            ["reason"],
            registry=r,
        )
        self.recommendations = Counter(
            "recstream_recommendations",
            "Recommendations published, by the model version that ranked them and by "
            "source: model, or popularity (the fallback for a user with no known item).",
            ["model_version", "source"],
            registry=r,
        )
        self.online_scored = Counter(
            "recstream_online_scored",
            "Events scored against the recommendation last published to their user (online "
            "evaluation), by the model version of that recommendation.",
            ["model_version"],
            registry=r,
        )
        self.online_hits = Counter(
            "recstream_online_hits",
            "Scored events whose item was in the top k of that recommendation: online HR@k "
            "is this over recstream_online_scored_total (k: 10 and the served top_k).",
            ["model_version", "k"],
            registry=r,
        )
        self.online_ndcg = Counter(
            "recstream_online_ndcg",
            "Sum of NDCG@k gains (1 / log2(rank + 2) for a hit at 0-based rank) of scored "
            "events: online NDCG@k is this over recstream_online_scored_total.",
            ["model_version", "k"],
            registry=r,
        )
        self.online_coverage = Gauge(
            "recstream_online_coverage",
            "Share of the catalogue recommended at least once by this worker, per version.",
            ["model_version"],
            registry=r,
        )
        self.batch_size = Histogram(
            "recstream_batch_size", "Records per micro-batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_ms = Histogram(
            "recstream_stage_ms",
            "Time per micro-batch stage, milliseconds.",
            ["stage"],
            buckets=MS_BUCKETS,
            registry=r,
        )
        self.end_to_end_ms = Histogram(
            "recstream_end_to_end_ms",
            "Event timestamp to recommendation produced, milliseconds.",
            buckets=MS_BUCKETS,
            registry=r,
        )
        self.db_retries = Counter(
            "recstream_db_retries", "Database transactions retried after an outage.", registry=r
        )
        self.swaps = Counter(
            "recstream_version_swaps", "Model/index versions swapped in.", registry=r
        )
        self.version = Info(
            "recstream_serving", "The model and index versions serving.", registry=r
        )
        self.gc_pause_ms = Histogram(
            "recstream_gc_pause_ms",
            "Garbage-collector pauses by generation (2: full), milliseconds; every thread "
            "waits for them.",
            ["generation"],
            buckets=MS_BUCKETS,
            registry=r,
        )
        self.encoded = Counter(
            "recstream_encoded_histories",
            "Histories encoded, by cache reuse: same (cached vector), extend (new items "
            "only), full (whole window).",
            ["reuse"],
            registry=r,
        )
        self.encoder_cache_bytes = Gauge(
            "recstream_encoder_cache_bytes",
            "Bytes of per-user keys and values held for incremental encoding.",
            registry=r,
        )
        self.last_batch_ts = Gauge(
            "recstream_last_batch_timestamp_seconds", "When the last batch finished.", registry=r
        )
        self.consumer_lag = Gauge(
            "recstream_consumer_lag",
            "Records of an assigned events partition not yet processed: the partition's "
            "high watermark minus the next offset to process.",
            ["partition"],
            registry=r,
        )
        self.version_age = Gauge(
            "recstream_serving_version_age_seconds",
            "Seconds since the serving model version was published (its manifest's created).",
            registry=r,
        )
        self.canary_share = Gauge(
            "recstream_canary_share",
            "Share of users served the canary version (recstream canary); absent when none "
            "runs. Its recommendations and online scores carry its model_version.",
            ["version", "model_version"],
            registry=r,
        )
        self.version_max_age = Gauge(
            "recstream_serving_version_max_age_seconds",
            "ARTIFACTS__MAX_AGE_S: the serving version's age past which it is stale.",
            registry=r,
        )
        self.ready = Gauge(
            "recstream_ready",
            "1 while the worker is ready (in its group, database answering, model loaded).",
            registry=r,
        )
        # The standard process (CPU, memory, file descriptors) and platform collectors,
        # on this registry: process_* and python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def set_version(self, model_version: str, index_version: str, created: float) -> None:
        """The serving versions, and when the model version was published (epoch s)."""
        self.version.info({"model_version": model_version, "index_version": index_version})
        self.version_age.set_function(lambda: max(0.0, time.time() - created))

    def set_canary(self, canary: tuple[str, str, float] | None) -> None:
        """The canary (version, model version, share) serving now, or None."""
        self.canary_share.clear()
        if canary is not None:
            version, model_version, share = canary
            self.canary_share.labels(version, model_version).set(share)

    def watch_gc(self) -> Callable[[], None]:
        """Record every garbage collection's pause from now on; returns the function
        that stops recording."""
        started: list[float] = []

        def callback(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pause = (time.perf_counter() - started.pop()) * 1000
                self.gc_pause_ms.labels(str(info["generation"])).observe(pause)

        gc.callbacks.append(callback)
        return lambda: gc.callbacks.remove(callback)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_table() -> str:
    """Every metric family a worker exposes, as the README's Markdown table."""
    metrics = WorkerMetrics()
    metrics.set_version("v", "v", time.time())  # an Info family shows its labels once set
    labels: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            # The declared label names (prometheus_client keeps them only there).
            labels[metric._name] = set(metric._labelnames)
    for family in metrics.registry.collect():
        names = labels.setdefault(family.name, set())
        for sample in family.samples:
            names.update(k for k in sample.labels if k not in {"le", "quantile"})
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in metrics.registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        shown = ", ".join(f"`{n}`" for n in sorted(labels[family.name])) or "-"
        meaning = " ".join(family.documentation.split()).replace("|", "\\|")
        rows.append(f"| `{family.name}{suffix}` | {family.type} | {shown} | {meaning} |")
    return "\n".join(rows)


@dataclass
class OnlineTotals:
    """Online evaluation counters read back from metrics pages, summed over the pages
    added (each worker scores the users of its partitions), per model version: events
    scored, hits at ``k`` and NDCG gains at ``k``."""

    k: int = 10
    scored: dict[str, float] = field(default_factory=dict)
    hits: dict[str, float] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)

    def add(self, metrics_text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        wanted = {
            "recstream_online_scored_total": self.scored,
            "recstream_online_hits_total": self.hits,
            "recstream_online_ndcg_total": self.gains,
        }
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                into = wanted.get(sample.name)
                if into is None or sample.labels.get("k", str(self.k)) != str(self.k):
                    continue
                version = sample.labels.get("model_version", "")
                into[version] = into.get(version, 0.0) + sample.value

    def hr(self, version: str) -> float | None:
        scored = self.scored.get(version, 0.0)
        return self.hits.get(version, 0.0) / scored if scored else None

    def ndcg(self, version: str) -> float | None:
        scored = self.scored.get(version, 0.0)
        return self.gains.get(version, 0.0) / scored if scored else None


def read_page(url: str, timeout_s: float = 10.0) -> str:
    """A metrics page's text. :raises WorkerError: it does not answer."""
    import urllib.request

    from stream_worker.errors import WorkerError

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text: str = resp.read().decode(errors="replace")
            return text
    except OSError as exc:
        raise WorkerError(f"cannot read {url}: {exc}") from None
