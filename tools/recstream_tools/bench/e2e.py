"""End-to-end benchmark: real events through a broker into one worker process.

For each offered load the run gets fresh topics and a fresh state database, starts one
``recstream worker`` process, replays events from a real interaction log (producer and
result collector each in their own process, so they do not share the worker's cores'
interpreter), and measures:

- sustained events/s: events answered over the worker's own time, from the first send
  (throttled) or from the moment the worker's partitions were assigned (unthrottled:
  the backlog was there before it joined) to the publish timestamp of the last answer;
  never from the collector's receive times, which bunch up when it reads a burst;
- outputs/s beside it: the worker publishes one recommendation per user and batch, so
  under a backlog it publishes fewer records than it reads;
- latency of every event, from the producer's send to the moment the collector
  receives the recommendation that covers it (a user's recommendation covers all of
  that user's events up to the ``source_event_id`` it names), and to the moment it was
  published (its record timestamp, stamped as the worker hands it to its producer):
  the difference is the output's trip through the broker to a consumer;
- the worker's per-batch stage times, scraped from its ``/metrics``;
- the worker's peak RSS;
- the CPU each process (worker, broker, producer, collector) used during the timed
  replay, in cores: on a small machine the load generator competes with the worker;
  and the worker's and the broker's CPU second by second, plotted, since a broker
  whose cost per fetch grows with the log (tansu's in-memory store) shows up only
  over time.

Offered load 0 means unthrottled: the events are loaded into the topic first and the
worker drains them. In the same run a bare aiokafka consume -> decode -> produce loop
drains the same topic, timed the same way (assignment to its last send), the ceiling
for a Python Kafka consumer on this machine, and the worker/bare ratio is reported.

Brokers: Apache Kafka (one node, :mod:`recstream_tools.kafka`), the demo's tansu, or
one the caller runs (``bootstrap``); state on a SQLite file or a fresh PostgreSQL
database per load.
"""

import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.errors import ConfigError
from recstream_tools.process import stop_process
from stream_worker.errors import WorkerError

logger = logging.getLogger(__name__)

DATASETS = {
    "taobao": "ecommerce/taobao_UserBehavior_head.csv",
    "ml-1m": "ml-1m/ml-1m_sasrec_reconstructed.txt",
}
STAGES = ("decode", "db", "encode", "search", "rank", "publish", "commit")
ASSIGNED = "partitions assigned"  # the worker's log line once it may fetch
PROCESSES = ("worker", "broker", "producer", "collector")


@dataclass
class Replay:
    """Events to send, in order: ``users[i]`` clicked ``items[i]`` (id ``b<i>``)."""

    name: str
    users: list[str]
    items: list[str]
    types: list[str]

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class LoadResult:
    dataset: str
    offered: float  # events/s, 0 = unthrottled (preloaded)
    events: int
    answered: int
    seconds: float  # the worker's time: first send or assignment -> last publish
    events_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    publish_p50_ms: float  # to the recommendation's record timestamp
    publish_p99_ms: float
    batches: int
    mean_batch: float
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean per batch
    worker_peak_rss_mb: float = 0.0
    cpu_cores: dict[str, float] = field(default_factory=dict)  # CPU s / wall s, per process
    sent_per_s: float = 0.0  # the rate the producer achieved (below ``offered`` if starved)
    full_gcs: int = 0  # the worker's full (generation 2) collections
    full_gc_ms: float = 0.0  # and their pauses, in all
    # Worker and broker cores in each second of the timed replay.
    cpu_timeline: dict[str, list[float]] = field(default_factory=dict)
    # p99 ms to publish of the first, middle and last third of the events sent.
    publish_p99_by_third: list[float] = field(default_factory=list)
    outputs: int = 0  # records published (recommendations and dead letters)
    outputs_per_s: float = 0.0
    broker: str = "kafka"
    state: str = "sqlite"

    @property
    def tag(self) -> str:
        return load_tag(self.broker, self.state, self.dataset, self.offered)

    @property
    def setup(self) -> str:
        """The broker and the state database, as the tables name them."""
        return f"{self.broker}, {self.state}"


def load_tag(broker: str, state: str, dataset: str, offered: float) -> str:
    """File-name tag of one load's run."""
    return f"{broker}-{state}-{dataset}-{int(offered) if offered else 'max'}"


@dataclass
class BareResult:
    name: str
    events: int
    seconds: float  # from its partitions' assignment to its last send
    events_per_s: float
    broker: str = "kafka"
    dataset: str = ""


# ---------------------------------------------------------------------------- pure logic


def event_latencies(
    users: Sequence[str],
    sent_ms: npt.NDArray[np.float64],
    answers: Sequence[tuple[int, float]],
) -> npt.NDArray[np.float64]:
    """Latency of every event (NaN when never answered).

    ``answers`` are ``(event index, receive ms)`` in receive order; an answer for event
    ``i`` of user ``u`` covers every earlier, not yet covered event of ``u``.
    """
    per_user: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        per_user.setdefault(user, []).append(i)
    position = {i: n for positions in per_user.values() for n, i in enumerate(positions)}
    covered = dict.fromkeys(per_user, 0)
    out = np.full(len(users), np.nan)
    for index, received in answers:
        user = users[index]
        upto = position[index] + 1
        for i in per_user[user][covered[user] : upto]:
            out[i] = received - sent_ms[i]
        covered[user] = max(covered[user], upto)
    return out


def proc_cpu_seconds(stat: str, ticks_per_s: float) -> float:
    """User + system CPU seconds from the text of ``/proc/<pid>/stat``."""
    # The command name (field 2) may hold spaces and parentheses: fields after it are
    # counted from the last ')'; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def cores_per_interval(readings: Sequence[tuple[float, float]]) -> list[float]:
    """Cores in use between consecutive ``(wall s, cumulative CPU s)`` readings."""
    return [
        round((cpu - cpu0) / (t - t0), 3) if t > t0 else float("nan")
        for (t0, cpu0), (t, cpu) in itertools.pairwise(readings)
    ]


def first_and_last_third(timeline: Sequence[float]) -> tuple[float, float]:
    """Mean of the first and of the last third of a timeline (NaN when too short)."""
    third = len(timeline) // 3
    if third == 0:
        return float("nan"), float("nan")
    return float(np.mean(timeline[:third])), float(np.mean(timeline[-third:]))


class CpuSampler:
    """Reads the CPU time of some processes every ``interval_s`` on a thread, from
    ``start()`` to ``stop()``; ``timeline()`` gives each one's cores per interval."""

    def __init__(self, pids: dict[str, int | None], interval_s: float = 1.0) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.interval_s = interval_s
        self._readings: dict[str, list[tuple[float, float]]] = {n: [] for n in self.pids}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _read(self) -> None:
        now = time.monotonic()
        for name, pid in self.pids.items():
            self._readings[name].append((now, cpu_seconds_of(pid)))

    def _run(self) -> None:
        self._read()
        while not self._stopped.wait(self.interval_s):
            self._read()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # The last, partial interval is left out: its few clock ticks over a short
        # time would read as a spike or a drop.
        self._stopped.set()
        self._thread.join()

    def timeline(self) -> dict[str, list[float]]:
        return {name: cores_per_interval(r) for name, r in self._readings.items()}


def cpu_seconds_of(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (NaN: none, or gone)."""
    if pid is None:
        return float("nan")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    return proc_cpu_seconds(stat, os.sysconf("SC_CLK_TCK"))


def _own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _samples(metrics_text: str) -> Iterator[Any]:
    """Every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        yield from family.samples


def full_gc_pauses(metrics_text: str) -> tuple[int, float]:
    """Full (generation 2) garbage collections and their pauses in ms, from /metrics."""
    count, total = 0.0, 0.0
    for sample in _samples(metrics_text):
        if sample.labels.get("generation") != "2":
            continue
        if sample.name == "recstream_gc_pause_ms_count":
            count = sample.value
        elif sample.name == "recstream_gc_pause_ms_sum":
            total = sample.value
    return int(count), total


def stage_means(metrics_text: str) -> tuple[int, float, dict[str, float]]:
    """Batches, mean batch size and mean ms per batch of each stage, from /metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    batches, records = 0.0, 0.0
    for sample in _samples(metrics_text):
        if sample.name == "recstream_stage_ms_sum":
            sums[sample.labels["stage"]] = sample.value
        elif sample.name == "recstream_stage_ms_count":
            counts[sample.labels["stage"]] = sample.value
        elif sample.name == "recstream_batch_size_count":
            batches = sample.value
        elif sample.name == "recstream_batch_size_sum":
            records = sample.value
    means = {s: sums[s] / counts[s] for s in STAGES if counts.get(s)}
    return int(batches), records / batches if batches else 0.0, means


def _percentiles(values: npt.NDArray[np.float64], qs: list[float]) -> npt.NDArray[np.float64]:
    return np.percentile(values, qs) if len(values) else np.full(len(qs), np.nan)


def summarise(
    dataset: str,
    offered: float,
    latencies: npt.NDArray[np.float64],
    to_publish: npt.NDArray[np.float64],
    start_ms: float,
    published_ms: npt.NDArray[np.float64],
) -> LoadResult:
    """Throughput and percentiles. ``latencies`` run to receipt, ``to_publish`` (same
    events) to the record timestamps of the recommendations, ``published_ms`` are those
    timestamps. The rate is events answered over ``start_ms`` (first send, or the
    worker's assignment) to the last publish: when the collector reads, its receive
    times, bunched or not, play no part."""
    answered = latencies[~np.isnan(latencies)]
    end_ms = float(published_ms.max()) if len(published_ms) else start_ms
    seconds = max(end_ms - start_ms, 1.0) / 1000
    pct = _percentiles(answered, [50, 95, 99])
    pub = _percentiles(to_publish[~np.isnan(to_publish)], [50, 99])
    by_third = [_percentiles(t[~np.isnan(t)], [99])[0] for t in np.array_split(to_publish, 3)]
    return LoadResult(
        dataset=dataset,
        offered=offered,
        events=len(latencies),
        answered=len(answered),
        seconds=round(seconds, 2),
        events_per_s=round(len(answered) / seconds, 1),
        p50_ms=round(float(pct[0]), 1),
        p95_ms=round(float(pct[1]), 1),
        p99_ms=round(float(pct[2]), 1),
        max_ms=round(float(answered.max()), 1) if len(answered) else float("nan"),
        publish_p50_ms=round(float(pub[0]), 1),
        publish_p99_ms=round(float(pub[1]), 1),
        batches=0,
        mean_batch=0.0,
        publish_p99_by_third=[round(float(v), 1) for v in by_third],
        outputs=len(published_ms),
        outputs_per_s=round(len(published_ms) / seconds, 1),
    )


def log_time_ms(log_text: str, marker: str) -> float | None:
    """Wall-clock ms of the first log line containing ``marker``, from its timestamp
    (the CLI's ``%(asctime)s``: local time, millisecond precision)."""
    import datetime

    for line in log_text.splitlines():
        if marker in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() * 1000  # naive: local time, like the log
    return None


# ------------------------------------------------------------------- helper processes


def _produce(
    bootstrap: str,
    topic: str,
    replay: Replay,
    rate: float,
    out: str,
    ready: Any,
    cpu: Any,
    nice: int = 0,
) -> None:
    """Send every event (paced at ``rate`` per second, 0 = as fast as possible) and save
    the wall-clock send time of each; ``cpu`` gets the CPU seconds spent sending."""
    from kafka import KafkaProducer

    from stream_worker.events import event_value

    os.nice(nice)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=2, batch_size=256 * 1024, acks=1
    )
    sent = np.zeros(len(replay))
    ready.wait()
    cpu_start = _own_cpu_seconds()
    start = time.perf_counter()
    for i in range(len(replay)):
        if rate > 0:
            ahead = start + i / rate - time.perf_counter()
            if ahead > 0.001:
                time.sleep(ahead)
        now = time.time() * 1000
        user = replay.users[i]
        value = event_value(f"b{i}", user, replay.items[i], replay.types[i], int(now))
        producer.send(topic, key=user.encode(), value=value)
        sent[i] = now
    producer.flush()
    cpu.value = _own_cpu_seconds() - cpu_start
    producer.close()
    np.save(out, sent)


def _collect(
    bootstrap: str,
    topics: list[str],
    final_events: list[int],
    out: str,
    idle_s: float,
    started: Any,
    cpu: Any,
    nice: int = 0,
) -> None:
    """Record ``(event index, receive ms, record timestamp ms)`` of every recommendation
    and dead letter until each user's last event is covered, or nothing arrived for
    ``idle_s``; ``cpu`` gets the CPU seconds spent after ``started`` is set."""
    import base64

    from kafka import KafkaConsumer

    os.nice(nice)
    pending = set(final_events)
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    rows: list[tuple[int, float, float]] = []
    last = time.monotonic()
    cpu_start = None
    try:
        while pending and time.monotonic() - last < idle_s:
            if cpu_start is None and started.is_set():
                cpu_start = _own_cpu_seconds()
            polled = consumer.poll(timeout_ms=50)
            now = time.time() * 1000
            for tp, records in polled.items():
                for rec in records:
                    doc = json.loads(rec.value)
                    if tp.topic == topics[0]:
                        event_id = doc["source_event_id"]
                    else:
                        event_id = json.loads(base64.b64decode(doc["original_b64"]))["event_id"]
                    index = int(event_id[1:])
                    rows.append((index, now, float(rec.timestamp)))
                    pending.discard(index)
                    last = time.monotonic()
    finally:
        cpu.value = _own_cpu_seconds() - (cpu_start or 0.0)
        consumer.close()
    np.save(out, np.array(rows, dtype=np.float64).reshape(-1, 3))


def _bare_loop(bootstrap: str, source: str, sink: str, events: int, out: str) -> None:
    """The ceiling: the worker's Kafka loop without its work. aiokafka ``getmany`` ->
    ``json.loads`` -> one output record per input, sent as record batches, offsets
    committed once a second after the outputs are acknowledged. Saves the events done
    and, timed like the worker, its assignment and its last send (wall-clock ms)."""
    import asyncio

    import aiokafka
    from aiokafka.partitioner import DefaultPartitioner

    from stream_worker.app import send_batches

    async def main() -> None:
        assigned_ms: list[float] = []

        class Stamp(aiokafka.ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                assigned_ms.append(time.time() * 1000)

        consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=f"bare-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
        partitioner = DefaultPartitioner()
        consumer.subscribe([source], listener=Stamp())
        await consumer.start()
        await producer.start()
        done, last_send, last_commit = 0, 0.0, time.monotonic()
        unacked: list[Any] = []
        try:
            while done < events:
                fetched = await consumer.getmany(timeout_ms=100, max_records=1024)
                if not fetched:
                    continue
                outputs = []
                for messages in fetched.values():
                    for m in messages:
                        doc = json.loads(m.value)
                        outputs.append((m.key, m.value))
                        done += doc is not None
                unacked += await send_batches(producer, sink, outputs, partitioner)
                last_send = time.time() * 1000  # the record timestamps of that batch
                if time.monotonic() - last_commit >= 1.0 or done >= events:
                    await asyncio.gather(*unacked)
                    unacked.clear()
                    await consumer.commit()
                    last_commit = time.monotonic()
            np.save(out, np.array([done, assigned_ms[0], last_send]))
        finally:
            await consumer.stop()
            await producer.stop()

    asyncio.run(main())


# ----------------------------------------------------------------------------- harness


def load_replay(name: str, data_root: Path, limit: int) -> Replay:
    """A dataset's events in event-time order (file order when it has no timestamps,
    which for ML-1M is per-user order)."""
    from model.data import load_interactions

    path = data_root / DATASETS[name]
    if not path.exists():
        raise WorkerError(f"benchmark data {path} not found (set --data-root)")
    ordered = load_interactions(path).in_event_time_order()[:limit]
    return Replay(
        name,
        [it.user_id for it in ordered],
        [it.item_id for it in ordered],
        [it.event_type for it in ordered],
    )


def publish_bench_model(replay: Replay, root: Path, max_len: int, factory: str = "Flat") -> None:
    """A production-shaped SASRec over the replay's items, untrained: speed does not
    depend on the weights, and training on every dataset first would dominate the run."""
    from collections import Counter

    import torch

    from model.artifacts import VersionContents, publish_version
    from model.config import IndexConfig, TrainConfig
    from model.sasrec import SASRec, script_encoder

    counts = Counter(replay.items)
    item_ids = ["<pad>", *sorted(counts)]
    # dim 64: the width every recorded end-to-end figure was measured at.
    cfg = TrainConfig(max_len=max_len, dim=64)
    torch.manual_seed(0)
    model = SASRec.from_config(len(item_ids) - 1, cfg).eval()
    contents = VersionContents(
        encoder=script_encoder(model),
        item_embeddings=model.item_embeddings().detach().numpy().copy(),
        item_ids=item_ids,
        max_len=max_len,
        popularity=[item for item, _ in counts.most_common(1000)],
        info={"model": "sasrec", "note": "untrained, for speed benchmarks only"},
    )
    publish_version(root, contents, IndexConfig(factory=factory))


@dataclass
class Bench:
    bootstrap: str
    workdir: Path
    artifacts: Path
    partitions: int = 12
    worker_env: dict[str, str] = field(default_factory=dict)
    # "sqlite": a fresh file per load; "postgres": a fresh database per load on the
    # server of ``pg_admin_url``; "external": ``database_url``, shared by every load.
    state: str = "sqlite"
    database_url: str | None = None
    pg_admin_url: str | None = None
    broker: str = "kafka"  # a name for the tables
    idle_s: float = 30.0
    settle_s: float = 5.0
    broker_pid: int | None = None  # for its CPU figure; None for an external broker
    # The producer and collector yield the CPU to the worker and the broker, as a load
    # generator on other machines would; their own delays still count as latency.
    load_nice: int = 10

    def _topics(self, tag: str, kinds: Sequence[str]) -> dict[str, str]:
        """Fresh topics for one run, one per kind (events, recs, dlq, bare)."""
        from stream_worker.broker import ensure_topics

        run = uuid.uuid4().hex[:6]
        names = {k: f"bench-{tag}-{run}-{k}" for k in kinds}
        ensure_topics(self.bootstrap, dict.fromkeys(names.values(), self.partitions))
        return names

    @contextlib.contextmanager
    def _database(self, tag: str) -> Iterator[str]:
        """A migrated state database for one load (see ``state``)."""
        from recstream_tools.postgres import LOCAL_ADMIN_URL, temporary_database
        from stream_worker.store import run_migrations

        if self.state == "external":
            if self.database_url is None:
                raise ConfigError("an external state database needs its URL")
            run_migrations(self.database_url)
            yield self.database_url
        elif self.state == "postgres":
            with temporary_database(self.pg_admin_url or LOCAL_ADMIN_URL) as url:
                run_migrations(url)
                yield url
        else:
            path = self.workdir / f"{tag}.db"
            path.unlink(missing_ok=True)
            url = f"sqlite:///{path}"
            run_migrations(url)
            try:
                yield url
            finally:
                path.unlink(missing_ok=True)

    def _start_worker(self, topics: dict[str, str], url: str, tag: str) -> tuple[Any, int, float]:
        """Start a worker; return its process, web port and the wall-clock ms at which
        its partitions were assigned (from its log line's timestamp)."""
        from recstream_tools.probe import free_port

        port = free_port()
        env = {
            **os.environ,
            "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "RECSTREAM_DATABASE__URL": url,
            "RECSTREAM_ARTIFACTS__ROOT": str(self.artifacts),
            "RECSTREAM_TOPICS__EVENTS": topics["events"],
            "RECSTREAM_TOPICS__RECOMMENDATIONS": topics["recs"],
            "RECSTREAM_TOPICS__DEAD_LETTER": topics["dlq"],
            "RECSTREAM_TOPICS__PARTITIONS": str(self.partitions),
            "RECSTREAM_WORKER__GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "RECSTREAM_WORKER__WEB_PORT": str(port),
            "RECSTREAM_WORKER__DATA_DIR": str(self.workdir / f"worker-{tag}"),
            "RECSTREAM_LOG_LEVEL": "INFO",
            **(
                {"RECSTREAM_WORKER__IDEMPOTENT_PRODUCER": "false"} if self.broker == "tansu" else {}
            ),
            **self.worker_env,
        }
        path = self.workdir / f"worker-{tag}.log"
        with path.open("w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "stream_worker.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while (assigned := log_time_ms(path.read_text(errors="replace"), ASSIGNED)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise WorkerError(f"the worker did not start; see {path}")
            time.sleep(0.2)
        return proc, port, assigned

    def run_load(self, replay: Replay, rate: float) -> LoadResult:
        """One offered load: fresh topics and state, one worker, every event answered."""
        tag = load_tag(self.broker, self.state, replay.name, rate)
        with self._database(tag) as url:
            return self._run_load(replay, rate, url, tag)

    def _run_load(self, replay: Replay, rate: float, url: str, tag: str) -> LoadResult:
        ctx = mp.get_context("spawn")
        topics = self._topics(tag, ("events", "recs", "dlq"))
        files = {k: str(self.workdir / f"{tag}-{k}.npy") for k in ("sent", "answers")}
        last_of_user: dict[str, int] = {u: i for i, u in enumerate(replay.users)}
        go, timed = ctx.Event(), ctx.Event()
        cpu = {name: ctx.Value("d", 0.0) for name in ("producer", "collector")}
        producer = ctx.Process(
            target=_produce,
            args=(
                self.bootstrap,
                topics["events"],
                replay,
                rate,
                files["sent"],
                go,
                cpu["producer"],
                self.load_nice,
            ),
        )
        collector = ctx.Process(
            target=_collect,
            args=(
                self.bootstrap,
                [topics["recs"], topics["dlq"]],
                sorted(last_of_user.values()),
                files["answers"],
                self.idle_s,
                timed,
                cpu["collector"],
                self.load_nice,
            ),
        )
        producer.start()
        if rate == 0:  # preload, then let the worker drain the backlog
            go.set()
            _join(producer, "producer")
        worker, port, assigned_ms = self._start_worker(topics, url, tag)
        pids = {"worker": worker.pid, "broker": self.broker_pid}
        try:
            collector.start()
            if rate > 0:
                # Joining the group is not the end of start-up: offset resets and the
                # first fetches of every partition follow; the timed replay starts after.
                time.sleep(self.settle_s)
                go.set()
            # Timed from here: the replay starts, or (preloaded) the worker has been
            # draining the backlog since it joined.
            timed.set()
            before = {name: cpu_seconds_of(pid) for name, pid in pids.items()}
            window_start = time.monotonic()
            sampler = CpuSampler(pids)
            sampler.start()
            _join(producer, "producer")
            _join(collector, "collector")
            sampler.stop()
            window = time.monotonic() - window_start
            used = {name: cpu_seconds_of(pid) - before[name] for name, pid in pids.items()}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                metrics_text = resp.read().decode()
            peak_rss = _peak_rss_mb(worker.pid)
        finally:
            stop_process(worker, 30)
        sent = np.load(files["sent"])
        answers = np.load(files["answers"])
        received = [(int(i), float(t)) for i, t, _ in answers]
        published = [(int(i), float(t)) for i, _, t in answers]
        latencies = event_latencies(replay.users, sent, received)
        to_publish = event_latencies(replay.users, sent, published)
        # Throttled: from the first send. Preloaded: the backlog was waiting before the
        # worker joined, so from the moment it could first fetch it.
        start = float(sent.min()) if rate else assigned_ms
        result = summarise(replay.name, rate, latencies, to_publish, start, answers[:, 2])
        result.broker, result.state = self.broker, self.state
        sending_s = max(float(sent.max() - sent.min()) / 1000, 1e-3)
        result.sent_per_s = round(len(sent) / sending_s, 1)
        result.batches, result.mean_batch, result.stage_ms = stage_means(metrics_text)
        result.full_gcs, result.full_gc_ms = full_gc_pauses(metrics_text)
        result.worker_peak_rss_mb = peak_rss
        # A preloaded (unthrottled) replay was sent before the timed window.
        used["producer"] = cpu["producer"].value if rate else 0.0
        used["collector"] = cpu["collector"].value
        result.cpu_cores = {name: round(used[name] / window, 2) for name in PROCESSES}
        result.cpu_timeline = sampler.timeline()
        np.save(self.workdir / f"{tag}-latency.npy", latencies)
        return result

    def run_bare(self, replay: Replay) -> BareResult:
        """Preload the replay, then drain it with the bare loop in its own process."""
        ctx = mp.get_context("spawn")
        tag = f"{self.broker}-{replay.name}-bare"
        topics = self._topics(tag, ("events", "bare"))
        sent = str(self.workdir / f"{tag}-sent.npy")
        out = str(self.workdir / f"{tag}.npy")
        go = ctx.Event()
        go.set()
        cpu = ctx.Value("d", 0.0)  # held here: a started Process drops its arguments
        producer = ctx.Process(
            target=_produce, args=(self.bootstrap, topics["events"], replay, 0.0, sent, go, cpu)
        )
        producer.start()
        _join(producer, "producer")
        loop = ctx.Process(
            target=_bare_loop,
            args=(self.bootstrap, topics["events"], topics["bare"], len(replay), out),
        )
        loop.start()
        _join(loop, "bare loop")
        done, assigned_ms, last_send_ms = np.load(out)
        seconds = max(float(last_send_ms - assigned_ms), 1.0) / 1000
        return BareResult(
            f"bare aiokafka loop ({self.broker}, {replay.name})", int(done), round(seconds, 2),
            round(float(done / seconds), 1), broker=self.broker, dataset=replay.name,
        )  # fmt: skip


def _join(process: Any, name: str) -> None:
    process.join()
    if process.exitcode != 0:  # its traceback is on stderr above
        raise WorkerError(f"the benchmark's {name} process failed (exit code {process.exitcode})")


def proc_status_mib(pid: int | str, field: str) -> float:
    """A memory line of ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` at its peak),
    in MiB; NaN once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb(pid: int) -> float:
    return round(proc_status_mib(pid, "VmHWM"), 1)


# ----------------------------------------------------------------------------- report


def _offered(r: LoadResult) -> str:
    return "unthrottled" if r.offered == 0 else f"{r.offered:,.0f}"


def format_loads(results: Sequence[LoadResult], bare: Sequence[BareResult]) -> str:
    ceiling = {(b.broker, b.dataset): b.events_per_s for b in bare}
    lines = [
        "| broker, state | dataset | offered ev/s | sent ev/s | events | sustained ev/s "
        "| outputs/s | vs bare | p50 ms | p95 ms | p99 ms | p50 / p99 ms to publish "
        "| batches | mean batch | worker peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    above = []
    for r in results:
        ratio = r.events_per_s / ceiling.get((r.broker, r.dataset), float("nan"))
        if ratio > 1:
            above.append(r)
        offered = _offered(r)
        sent = "preloaded" if r.offered == 0 else f"{r.sent_per_s:,.0f}"
        lines.append(
            f"| {r.setup} | {r.dataset} | {offered} | {sent} | {r.answered:,}/{r.events:,} "
            f"| {r.events_per_s:,.0f} | {r.outputs_per_s:,.0f} "
            f"| {ratio:.0%} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.publish_p50_ms:.1f} / {r.publish_p99_ms:.1f} | {r.batches:,} "
            f"| {r.mean_batch:.0f} | {r.worker_peak_rss_mb:,.0f} |"
        )
    lines += ["", "| ceiling | events | seconds | ev/s |", "|---|---|---|---|"]
    lines += [f"| {b.name} | {b.events:,} | {b.seconds} | {b.events_per_s:,.0f} |" for b in bare]
    for r in above:
        lines.append(
            f"\nAbove the bare loop ({r.setup}, {r.dataset}, {_offered(r)}): the bare loop "
            "publishes one output per event; the worker one recommendation per user and "
            f"batch, {r.outputs_per_s:,.0f} outputs/s for {r.events_per_s:,.0f} events/s "
            f"({r.outputs_per_s / r.events_per_s:.0%}), so it writes fewer records per event."
        )
    return "\n".join(lines)


def format_stages(results: Sequence[LoadResult]) -> str:
    lines = [
        "| broker, state | dataset | offered ev/s | " + " | ".join(STAGES) + " | total ms/batch |",
        "|---|---|---|" + "---|" * (len(STAGES) + 1),
    ]
    for r in results:
        total = sum(r.stage_ms.values())
        cells = [
            f"{r.stage_ms.get(s, 0.0):.2f} ({r.stage_ms.get(s, 0.0) / total:.0%})" if total else "-"
            for s in STAGES
        ]
        offered = _offered(r)
        lines.append(
            f"| {r.setup} | {r.dataset} | {offered} | " + " | ".join(cells) + f" | {total:.2f} |"
        )
    return "\n".join(lines)


def format_cpu(results: Sequence[LoadResult]) -> str:
    lines = [
        "| broker, state | dataset | offered ev/s | " + " | ".join(PROCESSES) + " | all "
        "| worker's full GCs (ms in all) |",
        "|---|---|---|" + "---|" * (len(PROCESSES) + 2),
    ]
    for r in results:
        cells = [f"{r.cpu_cores.get(p, float('nan')):.2f}" for p in PROCESSES]
        offered = _offered(r)
        total = sum(v for v in r.cpu_cores.values() if not np.isnan(v))
        gcs = f"{r.full_gcs} ({r.full_gc_ms:,.0f})"
        lines.append(
            f"| {r.setup} | {r.dataset} | {offered} | "
            + " | ".join(cells)
            + f" | {total:.2f} | {gcs} |"
        )
    return "\n".join(lines)


def format_drift(results: Sequence[LoadResult]) -> str:
    """First against last third of each throttled replay: the worker's and the
    broker's cores and the p99 to publish (unthrottled latency is queueing)."""
    lines = [
        "| broker, state | dataset | offered ev/s | worker cores | broker cores "
        "| p99 ms to publish |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.offered:
            continue
        cells = []
        for name in ("worker", "broker"):
            first, last = first_and_last_third(r.cpu_timeline.get(name, []))
            cells.append(f"{first:.2f} -> {last:.2f}")
        p99 = r.publish_p99_by_third
        cells.append(f"{p99[0]:.1f} -> {p99[-1]:.1f}" if p99 else "-")
        lines.append(f"| {r.setup} | {r.dataset} | {_offered(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cpu_timeline(results: Sequence[LoadResult], path: Path) -> None:
    """Worker and broker cores over each throttled replay, one panel per dataset and
    load, on one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Throttled loads only: an unthrottled replay lasts a few seconds.
    shown = [r for r in results if r.offered and r.cpu_timeline]
    if not shown:
        return
    top = max(max(cores, default=0.0) for r in shown for cores in r.cpu_timeline.values())
    cols = min(len(shown), 4)
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(5.5, 3.6 * cols), 2.8 * rows + 0.4), sharey=True, squeeze=False
    )
    for ax, r in zip(axes.flat, shown, strict=False):
        for name, cores in r.cpu_timeline.items():
            ax.plot(np.arange(1, len(cores) + 1), cores, label=name, linewidth=1.3)
        title = f"{r.dataset} {_offered(r)}" + (" ev/s" if r.offered else "")
        ax.set_title(f"{title}\n{r.setup}", fontsize=9)
        ax.set_xlabel("seconds into the replay", fontsize=8)
        ax.set_ylim(0, max(top, 0.1) * 1.1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("cores")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("CPU of the worker and the broker during each replay", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(results: Sequence[LoadResult], workdir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.logspace(0, 5, 80).tolist()
    for r in results:
        lat = np.load(workdir / f"{r.tag}-latency.npy")
        lat = lat[~np.isnan(lat)]
        offered = _offered(r) + ("/s" if r.offered else "")
        ax.hist(
            np.clip(lat, 1, None), bins=bins, histtype="step", linewidth=1.4,
            label=f"{r.dataset} {offered}, {r.setup} (p99 {r.p99_ms:.0f} ms)",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("event -> recommendation latency (ms)")
    ax.set_ylabel("events")
    ax.set_title("recstream end-to-end latency, one worker process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BROKERS = ("kafka", "tansu")
STATES = ("sqlite", "postgres")


def run_e2e(
    *,
    datasets: Sequence[str],
    data_root: Path,
    events: int,
    rates: Sequence[float],
    out_dir: Path,
    brokers: Sequence[str] = ("kafka",),
    states: Sequence[str] = ("sqlite",),
    bootstrap: str | None = None,
    broker_pid: int | None = None,
    database_url: str | None = None,
    pg_admin_url: str | None = None,
    worker_env: dict[str, str] | None = None,
    max_len: int = 200,
    rated_seconds: float = 20.0,
    index_factory: str = "Flat",
    load_nice: int = 10,
) -> str:
    """Run every dataset at every offered load, on each broker and state database; write
    JSON, PNG and markdown; return the markdown.

    ``brokers``: ``kafka`` (a one-node Apache Kafka started here), ``tansu`` (the demo's
    embedded broker), both in one run; or ``bootstrap``, a broker the caller runs.
    ``states``: ``sqlite`` and/or ``postgres`` (a fresh database per load on
    ``pg_admin_url``'s server); or ``database_url``, one database for every load.
    A throttled load replays ``min(events, rate * rated_seconds)`` events, so the slow
    rates do not take minutes; unthrottled loads and the bare loop replay ``events``.
    """
    from recstream_tools.kafka import KafkaCluster
    from recstream_tools.tansu import LocalBroker

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    results: list[LoadResult] = []
    bare: list[BareResult] = []
    if broker_pid is not None and bootstrap is None:
        raise ConfigError("--broker-pid names the process of a --bootstrap broker")
    if broker_pid is not None and not Path(f"/proc/{broker_pid}/stat").exists():
        raise ConfigError(f"--broker-pid {broker_pid}: no such process")
    unknown = sorted(set(brokers) - set(BROKERS)) + sorted(set(states) - set(STATES))
    if unknown:
        raise ConfigError(f"unknown broker or state {unknown[0]!r}: brokers {BROKERS}, {STATES}")
    replays = {name: load_replay(name, data_root, events) for name in datasets}
    runs: list[tuple[str, Any]] = []  # (name, a broker to enter: bootstrap_servers, pid)
    if bootstrap:
        runs.append(("external", ExternalBroker(bootstrap, broker_pid)))
    for kind in [] if bootstrap else brokers:
        if kind == "kafka":
            runs.append((kind, KafkaCluster(work / "kafka", nodes=1)))
        else:
            runs.append((kind, LocalBroker(log_dir=work / "tansu")))
    chosen_states = ["external"] if database_url else list(states)
    for kind, running in runs:
        with running as broker:
            for name, replay in replays.items():
                tag = f"{name}-{len(replay)}-{index_factory.replace(',', '_')}"
                artifacts = work / f"artifacts-{tag}"
                if not artifacts.exists():
                    publish_bench_model(replay, artifacts, max_len, index_factory)
                logger.info("%s: %d events, %d users", name, len(replay), len(set(replay.users)))
                for n, state in enumerate(chosen_states):
                    bench = Bench(
                        broker.bootstrap_servers, work, artifacts,
                        worker_env=worker_env or {}, state=state, database_url=database_url,
                        pg_admin_url=pg_admin_url, broker=kind,
                        broker_pid=getattr(broker, "pid", None), load_nice=load_nice,
                    )  # fmt: skip
                    if n == 0:  # the ceiling does not depend on the state database
                        bare.append(bench.run_bare(replay))
                        logger.info("%s", bare[-1])
                    for rate in rates:
                        limit = (
                            len(replay)
                            if rate == 0
                            else min(len(replay), int(rate * rated_seconds))
                        )
                        sliced = Replay(
                            name, replay.users[:limit], replay.items[:limit], replay.types[:limit]
                        )
                        results.append(bench.run_load(sliced, rate))
                        logger.info("%s", results[-1])
    plot_latency(results, work, out_dir / "latency_histogram.png")
    plot_cpu_timeline(results, out_dir / "cpu_timeline.png")
    (out_dir / "e2e.json").write_text(
        json.dumps(
            {"loads": [asdict(r) for r in results], "bare": [asdict(b) for b in bare]}, indent=2
        )
    )
    settings = {
        **{k: v for k, v in os.environ.items() if k.startswith("RECSTREAM_WORKER__")},
        **(worker_env or {}),
    }
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    report = f"Model: untrained SASRec, max_len {max_len}; index {index_factory}"
    report += f"; worker settings: {overrides or 'defaults'}"
    report += f"; producer and collector at nice {load_nice}.\n\n"
    report += format_loads(results, bare) + "\n\nMean ms per batch by stage (share):\n\n"
    report += format_stages(results)
    report += (
        f"\n\nCPU in use during the timed replay, in cores (this machine has {os.cpu_count()}):\n\n"
    )
    report += format_cpu(results)
    report += "\n\nFirst third of each throttled replay -> last third:\n\n"
    report += format_drift(results)
    (out_dir / "e2e.md").write_text(report + "\n")
    return report


class ExternalBroker:
    """A broker the caller runs, with LocalBroker's context-manager shape; its CPU is
    read only when its process id is given."""

    def __init__(self, bootstrap: str, pid: int | None) -> None:
        self.bootstrap_servers = bootstrap
        self.pid = pid

    def __enter__(self) -> "ExternalBroker":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
