"""Fault injection against real workers, and the checks that nothing was lost or doubled.

Shared by ``tests/integration/test_reliability.py`` (short runs in the suite) and
``scripts/chaos.py`` (the long runs behind ``docs/reliability.md``). Everything is real:
``recstream worker`` subprocesses, a tansu broker, PostgreSQL (or SQLite).

The checks never trust the worker. At the end of a run the events topic is read back
from the beginning (what the broker accepted is what the log holds), every record is
classified with what the producer knows it sent (its own JSON, or one of the hostile
records it made), and each user's expected sequence and event count are computed from
that log in offset order. They are compared with ``user_sequences``; each user's last
recommendation with the offline model's top-K for the final sequence; and the
dead-letter topic with the hostile records, by source partition and offset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import page
from stream_worker.broker import ensure_topics
from stream_worker.events import event_value
from stream_worker.store import make_engine, stored_offsets, user_sequences
from tests.integration.worker_harness import TinyModel, WorkerProcess, worker_env

logger = logging.getLogger(__name__)

CATALOGUE = 40  # items of the tiny test model: item-0 .. item-39
TOP_K = 5  # worker_env's RECSTREAM_WORKER__TOP_K
PARTITIONS = 4
MIB = 1024 * 1024


# --------------------------------------------------------------------------- hostile input


def hostile_record(n: int, prefix: str, now_ms: int) -> tuple[str, bytes, bytes | None]:
    """The ``n``-th hostile record: (label, key, value). Every one is distinct bytes.

    Labels name what is wrong, not the worker's reason code: the dead-letter check
    matches records by position and bytes, so it does not depend on the decoder's words.
    """
    key = f"{prefix}-bad-{n}".encode()
    good = {
        "event_id": f"{prefix}-bad-{n}",
        "user_id": key.decode(),
        "item_id": "item-1",
        "event_type": "view",
        "ts": now_ms,
    }

    def doc(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    tag = str(n).encode()
    cases: list[tuple[str, bytes, bytes | None]] = [
        ("not json", key, b"{not json " + tag),
        ("invalid utf-8", key, b'{"event_id": "\xff\xfe' + tag + b'"}'),
        ("missing field", key, json.dumps({"event_id": good["event_id"]}).encode()),
        ("ts as string", key, doc(ts="yesterday")),
        ("unknown event type", key, doc(event_type="teleport")),
        ("id too long", key, doc(item_id="x" * 1000)),
        ("huge ts", key, doc(ts=10**30)),
        ("negative ts", key, doc(ts=-(10**15))),
        ("nested 30k deep", key, b"[" * 30_000 + tag + b"]" * 30_000),
        ("key is not the user", b"someone-else-" + tag, doc()),
        ("tombstone", key, None),
        ("NaN field", key, doc()[:-1] + b', "price": NaN}'),
        ("NUL in id", key, doc(item_id="item\x001")),
        ("unpaired surrogate", key, doc(item_id="item-\ud800")),
        ("100 KiB payload", key, doc(pad="p" * 100_000)),
    ]
    return cases[n % len(cases)]


def huge_record(prefix: str, size: int = 900_000) -> tuple[str, bytes, bytes]:
    """A record close to Kafka's default 1 MiB limit: its dead letter must still fit."""
    key = f"{prefix}-huge".encode()
    return f"{size // 1000} kB payload", key, b'{"blob": "' + b"z" * size + b'"}'


# --------------------------------------------------------------------------------- load


@dataclass(frozen=True, slots=True)
class Acked:
    """A record the broker acknowledged."""

    partition: int
    offset: int
    valid: bool


class Load:
    """Sends valid events (and every ``bad_every``-th record a hostile one) from a thread.

    ``users`` > 0: each event goes to a random user of that many; ``users`` = 0: every
    event has a user of its own (the million-user run). ``rate`` events/s, 0 for as fast
    as the producer goes; ``limit`` stops after that many records. One request in flight
    per connection keeps each user's events in order through retries.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        prefix: str,
        users: int,
        rate: float,
        bad_every: int = 0,
        limit: int | None = None,
        huge_at: int | None = None,
        seed: int = 0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.prefix = prefix
        self.users = users
        self.rate = rate
        self.bad_every = bad_every
        self.limit = limit
        self.huge_at = huge_at
        self.rng = random.Random(seed)
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,  # a retry after a leader change never doubles a record
            linger_ms=5,
            max_in_flight_requests_per_connection=1,
            retries=1_000_000,
            retry_backoff_ms=200,
            request_timeout_ms=10_000,
            delivery_timeout_ms=300_000,
            max_request_size=2 * MIB,
            **(client_options or {}),
        )
        self.bad: dict[tuple[bytes, bytes | None], str] = {}
        self.acked: list[Acked] = []
        self.failed = 0
        self._all_hostile = False  # set by hostile_only()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    # One callback per record; kafka-python runs them on its sender thread.
    def _on_ack(self, valid: bool) -> Callable[[Any], None]:
        def record(meta: Any) -> None:
            with self._lock:
                self.acked.append(Acked(meta.partition, meta.offset, valid))

        return record

    def _on_error(self, exc: BaseException) -> None:
        logger.warning("a send failed: %s", exc)
        with self._lock:
            self.failed += 1

    def _next(self, n: int, now_ms: int) -> tuple[bytes, bytes | None, bool]:
        if self.huge_at is not None and n == self.huge_at:
            label, key, value = huge_record(self.prefix)
            self.bad[(key, value)] = label
            return key, value, False
        if self._all_hostile:  # numbered past the every-bad_every-th ones
            label, key, maybe = hostile_record(1_000_000 + n, self.prefix, now_ms)
            self.bad[(key, maybe)] = label
            return key, maybe, False
        if self.bad_every and n % self.bad_every == self.bad_every - 1:
            label, key, maybe = hostile_record(n // self.bad_every, self.prefix, now_ms)
            self.bad[(key, maybe)] = label
            return key, maybe, False
        user_n = n if self.users == 0 else self.rng.randrange(self.users)
        user = f"{self.prefix}-u{user_n}"
        item = f"item-{self.rng.randrange(CATALOGUE)}"
        return user.encode(), event_value(f"{self.prefix}-e{n}", user, item, "view", now_ms), True

    def _run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self._stop.is_set() and (self.limit is None or n < self.limit):
            if self.rate > 0:
                ahead = n / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                    continue
            key, value, valid = self._next(n, int(time.time() * 1000))
            try:
                future = self.producer.send(self.topic, key=key, value=value)
            except KafkaError as exc:  # buffer full for too long: counted, never silent
                self._on_error(exc)
            else:
                future.add_callback(self._on_ack(valid))
                future.add_errback(self._on_error)
            n += 1

    def start(self) -> Load:
        self._thread.start()
        return self

    def hostile_only(self) -> None:
        """Send only hostile records from now on."""
        self._all_hostile = True

    def stop(self) -> None:
        """Stop sending, wait for every outstanding acknowledgement, close the producer."""
        self._stop.set()
        self._thread.join()
        self.producer.flush()
        self.producer.close()

    def wait_done(self, timeout: float) -> None:
        """Wait for a ``limit``-ed load to send everything (then :meth:`stop` it)."""
        self._thread.join(timeout)

    def valid_high_water(self) -> dict[int, int]:
        """Per partition, the highest offset of a valid event acknowledged so far."""
        high: dict[int, int] = {}
        with self._lock:
            for ack in self.acked:
                if ack.valid and ack.offset > high.get(ack.partition, -1):
                    high[ack.partition] = ack.offset
        return high


# ------------------------------------------------------------------------------ checking


@dataclass(frozen=True, slots=True)
class LogRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class TopicReader:
    """Reads every partition of a topic from the beginning, and on each call on to the
    end offsets of that moment, keeping what it read."""

    def __init__(
        self, bootstrap: str, topic: str, client_options: dict[str, Any] | None = None
    ) -> None:
        self.topic = topic
        self.records: list[LogRecord] = []
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * MIB,
            fetch_max_bytes=64 * MIB,
            **(client_options or {}),
        )
        partitions = self.consumer.partitions_for_topic(topic) or set()
        self.assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.assigned)
        self.consumer.seek_to_beginning(*self.assigned)

    def read_to_end(self, timeout: float = 600) -> list[LogRecord]:
        """The records read by this call (all records so far are in ``records``)."""
        ends = self.consumer.end_offsets(self.assigned)
        new: list[LogRecord] = []
        deadline = time.monotonic() + timeout
        while any(self.consumer.position(tp) < ends[tp] for tp in self.assigned):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic} to its end in {timeout}s")
            for batch in self.consumer.poll(500, max_records=100_000).values():
                new.extend(LogRecord(r.partition, r.offset, r.key, r.value) for r in batch)
        self.records.extend(new)
        return new

    def close(self) -> None:
        self.consumer.close()


def read_topic(
    bootstrap: str, topic: str, client_options: dict[str, Any] | None = None
) -> list[LogRecord]:
    """Every record of ``topic``, up to the end offsets seen when it gets there."""
    reader = TopicReader(bootstrap, topic, client_options)
    try:
        reader.read_to_end()
        return reader.records
    finally:
        reader.close()


def read_json_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
    client_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """JSON values of ``topic`` from the beginning, read on until ``done`` or the timeout."""
    deadline = time.monotonic() + timeout
    reader = TopicReader(bootstrap, topic, client_options)
    values: list[dict[str, Any]] = []
    try:
        while True:
            values += [json.loads(r.value) for r in reader.read_to_end() if r.value]
            if done(values) or time.monotonic() > deadline:
                return values
            time.sleep(1.0)
    finally:
        reader.close()


@dataclass
class Expected:
    """Final state computed from the events log alone."""

    sequences: dict[str, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    last_event: dict[str, str] = field(default_factory=dict)
    bad_at: dict[tuple[int, int], LogRecord] = field(default_factory=dict)
    valid: int = 0


def expected_state(
    log: list[LogRecord], bad: dict[tuple[bytes, bytes | None], str], history_length: int
) -> Expected:
    """Sequences, counts and last events per user, in per-partition offset order.

    A record is hostile when its (key, value) is one the load sent as hostile; anything
    else must be one of the load's own JSON events (a stranger raises).
    """
    out = Expected()
    for rec in sorted(log, key=lambda r: (r.partition, r.offset)):
        if rec.key is not None and (rec.key, rec.value) in bad:
            out.bad_at[(rec.partition, rec.offset)] = rec
            continue
        if rec.value is None:
            raise AssertionError(f"unexpected record without value at {rec.partition}/{rec.offset}")
        event = json.loads(rec.value)
        user = event["user_id"]
        seq = out.sequences.setdefault(user, [])
        seq.append(event["item_id"])
        if len(seq) > history_length:
            del seq[0]
        out.counts[user] += 1
        out.last_event[user] = event["event_id"]
        out.valid += 1
    return out


@dataclass
class StateCheck:
    users: int
    applied: int  # sum of event_count
    expected: int
    lost: int  # valid events in the log that state does not count
    duplicated: int  # events counted more than once
    wrong_sequences: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.wrong_sequences


def stored_state(engine: Engine) -> dict[str, tuple[list[str], int]]:
    """Every user's stored items and event count."""
    table = user_sequences.c
    with engine.connect() as conn:  # the Table's JSON type decodes items on both databases
        rows = conn.execute(select(table.user_id, table["items"], table.event_count))
        return {user: (list(items), int(count)) for user, items, count in rows}


def check_state(engine: Engine, expected: Expected) -> StateCheck:
    stored = stored_state(engine)
    lost = duplicated = 0
    wrong: list[str] = []
    for user in expected.counts.keys() | stored.keys():
        items, count = stored.get(user, ([], 0))
        want = expected.counts.get(user, 0)
        lost += max(0, want - count)
        duplicated += max(0, count - want)
        if items != expected.sequences.get(user, []):
            wrong.append(user)
    return StateCheck(
        users=len(stored),
        applied=sum(count for _, count in stored.values()),
        expected=expected.valid,
        lost=lost,
        duplicated=duplicated,
        wrong_sequences=sorted(wrong),
    )


@dataclass
class RecommendationCheck:
    users: int  # users with a valid event
    checked: int  # users whose last recommendation was compared with the offline model
    missing: list[str]  # users with no recommendation for their last event
    stale: list[str]  # last recommendation not for the final event, or not the offline top-K

    @property
    def ok(self) -> bool:
        return not self.missing and not self.stale


def latest_recommendations(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each user's newest recommendation: the highest ``source_offset``, as the contract
    tells consumers (log order, the last of equals: a re-published answer is the same)."""
    latest: dict[str, dict[str, Any]] = {}
    for value in values:
        kept = latest.get(value["user_id"])
        if kept is None or value["source_offset"] >= kept["source_offset"]:
            latest[value["user_id"]] = value
    return latest


def check_recommendations(
    values: list[dict[str, Any]],
    expected: Expected,
    model: TinyModel,
    sample: int | None = None,
    seed: int = 0,
) -> RecommendationCheck:
    """Each user's last recommendation answers its last event and equals the offline top-K
    for its final sequence (on a random ``sample`` of users, or all of them)."""
    latest = latest_recommendations(values)
    users = sorted(expected.last_event)
    missing = [u for u in users if u not in latest]
    chosen = users if sample is None else random.Random(seed).sample(users, min(sample, len(users)))
    stale = []
    for user in chosen:
        rec = latest.get(user)
        if rec is None:
            continue
        sequence = expected.sequences[user]
        items = [i["item_id"] for i in rec["items"]]
        if rec["source_event_id"] != expected.last_event[user] or items != (
            model.offline_top_k(sequence, TOP_K)
        ):
            stale.append(user)
    return RecommendationCheck(len(users), len(chosen), missing, stale)


@dataclass
class DeadLetterCheck:
    expected: int  # hostile records in the log
    distinct: int  # distinct source positions in the dead-letter topic
    missing: int  # hostile records with no dead letter
    unexpected: int  # dead letters for a record that is not hostile
    copies: int  # extra letters for a position already dead-lettered
    mismatched: int  # letters whose copy of the original does not match the log

    @property
    def exact(self) -> bool:
        """The topic holds the hostile records and nothing else (copies aside)."""
        return self.missing == 0 and self.unexpected == 0 and self.mismatched == 0


def check_dead_letters(letters: list[dict[str, Any]], expected: Expected) -> DeadLetterCheck:
    import base64
    import hashlib

    seen: Counter[tuple[int, int]] = Counter()
    unexpected = mismatched = 0
    for letter in letters:
        where = (letter["partition"], letter["offset"])
        seen[where] += 1
        rec = expected.bad_at.get(where)
        if rec is None:
            unexpected += 1
            continue
        original = rec.value or b""
        copy = base64.b64decode(letter["original_b64"])
        if letter.get("truncated"):
            same = original.startswith(copy) and (
                letter["original_sha256"] == hashlib.sha256(original).hexdigest()
            )
        else:
            same = copy == original
        if not same or letter["original_size"] != len(original):
            mismatched += 1
    distinct = set(seen)
    return DeadLetterCheck(
        expected=len(expected.bad_at),
        distinct=len(distinct),
        missing=len(expected.bad_at.keys() - distinct),
        unexpected=unexpected,
        copies=sum(seen.values()) - len(seen),
        mismatched=mismatched,
    )


# ------------------------------------------------------------------------------ processes


def read_peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssWatch:
    """Samples the peak RSS of every worker it is told about, until stopped."""

    def __init__(self, interval: float = 0.5) -> None:
        self.pids: set[int] = set()
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._interval = interval

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        for pid in list(self.pids):
            self.peak_mb = max(self.peak_mb, read_peak_rss_mb(pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pg_cluster(action: str) -> None:
    """Start or stop the local PostgreSQL cluster (``pg_ctlcluster``)."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def pg_cluster_available() -> bool:
    return shutil.which("pg_ctlcluster") is not None and os.path.isdir("/etc/postgresql")


def wait_for_database(url: str, timeout: float = 60) -> None:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("select 1"))
                return
            except DBAPIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ scenarios


@dataclass
class Report:
    """One scenario's figures (one row of chaos.py's table)."""

    scenario: str
    produced: int = 0  # records the broker acknowledged (valid + hostile)
    valid: int = 0
    hostile: int = 0
    send_failures: int = 0  # records the producer gave up on (never acknowledged)
    faults: int = 0  # kills, outages or membership changes
    lost: int = 0
    duplicated: int = 0
    wrong_sequences: int = 0
    dead_letters: int = 0  # distinct source records in the dead-letter topic
    dead_letter_copies: int = 0  # re-published letters (at-least-once after a crash)
    dead_letters_exact: bool = False
    users: int = 0
    recs_checked: int = 0
    recs_missing: int = 0
    recs_stale: int = 0
    # Checked at each fault, from the broker: users (and hostile records) below the
    # group's committed offset with no output yet. Must stay 0.
    commits_checked: int = 0
    commits_ahead: int = 0
    recovery_s: list[float] = field(default_factory=list)
    drain_s: float = 0.0  # from the last record sent to everything applied
    db_retries: int = 0  # recstream_db_retries_total, summed over the workers at the end
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.wrong_sequences == 0
            and self.dead_letters_exact
            and self.recs_missing == 0
            and self.recs_stale == 0
            and self.send_failures == 0
            and self.commits_ahead == 0
            and not self.notes
        )

    def recovery_summary(self) -> str:
        if not self.recovery_s:
            return "-"
        worst = max(self.recovery_s)
        if len(self.recovery_s) == 1:
            return f"{worst:.1f}"
        return f"{statistics.median(self.recovery_s):.1f} / {worst:.1f}"


class Chaos:
    """One scenario's world: topics, workers in one group, a load, and the final checks.

    Use as a context manager; workers still running at exit are stopped (SIGTERM, then
    SIGKILL), so a failing run leaves no process behind.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        db_url: str,
        model: TinyModel,
        workdir: Path,
        name: str,
        session_timeout_s: float = 10.0,
        history_length: int = 200,
        extra_env: dict[str, str] | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        run = uuid.uuid4().hex[:8]
        self.client_options = client_options or {}
        self.bootstrap = bootstrap
        self.db_url = db_url
        self.model = model
        self.workdir = workdir
        self.prefix = f"{name}-{run}"
        self.topics = {
            "events": f"{name}-events-{run}",
            "recommendations": f"{name}-recs-{run}",
            "dead_letter": f"{name}-dlq-{run}",
        }
        self.history_length = history_length
        self.env_extra = {
            "RECSTREAM_TOPICS__PARTITIONS": str(PARTITIONS),
            "RECSTREAM_WORKER__SESSION_TIMEOUT_S": str(session_timeout_s),
            "RECSTREAM_WORKER__HISTORY_LENGTH": str(history_length),
            **(extra_env or {}),
        }
        self.report = Report(name)
        self.produced_elsewhere = 0  # valid events a test sent to the events topic itself
        self.workers: dict[str, WorkerProcess] = {}
        self.pages: dict[str, str] = {}  # "<worker> /metrics" -> body, fetched at the end
        self.rss = RssWatch()
        self.load: Load | None = None
        self.engine = make_engine(db_url, pool_size=1)
        self._started = time.monotonic()

    def __enter__(self) -> Chaos:
        ensure_topics(
            self.bootstrap,
            dict.fromkeys(self.topics.values(), PARTITIONS),
            client_config=self.client_options,
        )
        self.rss.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers.values():
            if worker.proc is not None and worker.proc.poll() is None:
                worker.stop()
        if self.load is not None:
            with contextlib.suppress(Exception):
                self.load.stop()
        self.rss.__exit__()
        self.engine.dispose()

    # -- workers

    def env(self, name: str) -> dict[str, str]:
        env = worker_env(
            self.bootstrap, self.db_url, self.model.root, self.topics, self.workdir / name,
            **self.env_extra,
        )  # fmt: skip
        env["RECSTREAM_WORKER__GROUP_ID"] = self.group
        env["RECSTREAM_KAFKA__CLIENT_ID"] = name  # names the member in the group's view
        return env

    @property
    def group(self) -> str:
        return self.prefix + "-group"

    def start_worker(self, name: str, timeout: float = 120) -> WorkerProcess:
        """Start (or restart) worker ``name`` and wait until it has joined the group."""
        worker = self.workers.get(name)
        if worker is None:
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
            worker = WorkerProcess(self.env(name), self.workdir / f"{name}.log")
            self.workers[name] = worker
        worker.start(timeout=timeout)
        assert worker.proc is not None
        self.rss.pids.add(worker.proc.pid)
        return worker

    def start_workers(self, *names: str) -> None:
        """Start several workers at once (each start is mostly imports and model loading)."""
        errors: list[BaseException] = []

        def start(name: str) -> None:
            try:
                self.start_worker(name)
            except BaseException as exc:  # re-raised below, on the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def kill(self, name: str) -> None:
        worker = self.workers[name]
        assert worker.proc is not None
        self.rss.sample()  # VmHWM is gone with the process
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        self.rss.pids.discard(worker.proc.pid)

    def stop_worker(self, name: str) -> int:
        worker = self.workers[name]
        assert worker.proc is not None
        self.rss.sample()
        self.rss.pids.discard(worker.proc.pid)
        return worker.stop()

    def alive(self) -> list[str]:
        return [n for n, w in self.workers.items() if w.proc is not None and w.proc.poll() is None]

    def fetch_pages(self, name: str) -> None:
        """Keep the worker's /metrics, /ready and /live, and count its database retries."""
        port = self.workers[name].env["RECSTREAM_WORKER__WEB_PORT"]
        for path in ("/metrics", "/ready", "/live"):
            _, body = page(int(port), path)
            self.pages[f"{name} {path}"] = body if isinstance(body, str) else json.dumps(body)
        for line in self.pages[f"{name} /metrics"].splitlines():
            if line.startswith("recstream_db_retries_total "):
                self.report.db_retries += int(float(line.split()[1]))

    # -- load and faults

    def start_load(self, **kwargs: Any) -> Load:
        self.load = Load(
            self.bootstrap,
            self.topics["events"],
            prefix=self.prefix,
            client_options=self.client_options,
            **kwargs,
        )
        return self.load.start()

    def check_commits(self) -> None:
        """No committed offset ahead of its outputs, from the broker alone: every valid
        event below its partition's committed offset has a recommendation for its user
        answering it or a later event, and every hostile record below it a dead letter.

        Committed offsets are read first and outputs after: outputs only grow, so a gap
        seen here was a gap when the offsets were read.
        """
        committed = committed_offsets(
            self.bootstrap, self.group, self.topics["events"], self.client_options
        )
        if not committed:
            return
        options = self.client_options
        log = read_topic(self.bootstrap, self.topics["events"], client_options=options)
        recs = read_topic(self.bootstrap, self.topics["recommendations"], client_options=options)
        letters = read_topic(self.bootstrap, self.topics["dead_letter"], client_options=options)
        assert self.load is not None
        offset_of: dict[str, tuple[int, int]] = {}  # event id -> (partition, offset)
        last_below: dict[str, tuple[int, int]] = {}  # user -> its last event under the commit
        hostile_below: set[tuple[int, int]] = set()
        for rec in sorted(log, key=lambda r: (r.partition, r.offset)):
            below = rec.offset < committed.get(rec.partition, 0)
            if rec.key is not None and (rec.key, rec.value) in self.load.bad:
                if below:
                    hostile_below.add((rec.partition, rec.offset))
                continue
            assert rec.value is not None
            event = json.loads(rec.value)
            offset_of[event["event_id"]] = (rec.partition, rec.offset)
            if below:
                last_below[event["user_id"]] = (rec.partition, rec.offset)
        answered: dict[str, int] = {}  # user -> offset of the newest event answered
        for rec in recs:
            if rec.value is None:
                continue
            value = json.loads(rec.value)
            where = offset_of.get(value["source_event_id"])
            if where is not None:
                answered[value["user_id"]] = max(answered.get(value["user_id"], -1), where[1])
        lettered = set()
        for rec in letters:
            if rec.value is not None:
                letter = json.loads(rec.value)
                lettered.add((letter["partition"], letter["offset"]))
        ahead = [u for u, (_, offset) in last_below.items() if answered.get(u, -1) < offset]
        ahead += [f"hostile {p}/{o}" for p, o in sorted(hostile_below - lettered)]
        self.report.commits_checked += 1
        self.report.commits_ahead += len(ahead)
        if ahead:
            self.report.notes.append(
                f"committed offsets {committed} ahead of the outputs of {ahead[:5]}"
            )

    def group_assignment(self, members: int, timeout: float = 60) -> dict[str, set[int]]:
        """The events partitions each worker (by client id) holds, as the group
        coordinator reports it once the group is stable with ``members`` members."""
        deadline = time.monotonic() + timeout
        topic = self.topics["events"]
        while True:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, **self.client_options)
            try:
                group = admin.describe_groups([self.group])[self.group]
            finally:
                admin.close()
            held: dict[str, set[int]] = {}
            for member in group["members"]:
                assignment = member["member_assignment"] or {}  # b"" while rebalancing
                parts = {
                    p
                    for assigned in assignment.get("assigned_partitions", [])
                    if assigned["topic"] == topic
                    for p in assigned["partitions"]
                }
                held[member["client_id"]] = held.get(member["client_id"], set()) | parts
            stable = group["group_state"] == "Stable" and all(
                isinstance(m["member_assignment"], dict) for m in group["members"]
            )
            if stable and len(held) == members:
                return held
            if time.monotonic() > deadline:
                raise AssertionError(f"group {self.group} not stable with {members}: {group}")
            time.sleep(0.5)

    def fault_point(self) -> dict[int, int]:
        """What must be applied to call the fault recovered: every valid event acked so far."""
        self.report.faults += 1
        assert self.load is not None
        return self.load.valid_high_water()

    def wait_applied(self, targets: dict[int, int], timeout: float) -> float | None:
        """Seconds until the stored offsets reach ``targets`` (None: not within timeout).

        Database errors (an outage in progress) count as not there yet.
        """
        started = time.monotonic()
        deadline = started + timeout
        topic = self.topics["events"]
        while time.monotonic() < deadline:
            try:
                stored = stored_offsets(self.engine, topic)
            except Exception:  # the database is down: try again
                stored = {}
            if all(stored.get(p, -1) >= o for p, o in targets.items()):
                return time.monotonic() - started
            time.sleep(0.2)
        return None

    def recovered(self, targets: dict[int, int], since: float, timeout: float = 180) -> None:
        """Record the recovery time of a fault that began at ``since`` (monotonic)."""
        took = self.wait_applied(targets, timeout)
        if took is None:
            self.report.notes.append(f"not recovered within {timeout:.0f}s")
        else:
            self.report.recovery_s.append(time.monotonic() - since)

    def recovered_after_restore(self, restored: float, timeout: float = 180) -> None:
        """Record an outage's recovery: from the restore until every valid event the
        broker acknowledged up to a second after it (the backlog of the outage, and what
        producers had buffered) is applied."""
        time.sleep(1.0)
        assert self.load is not None
        self.recovered(self.load.valid_high_water(), restored, timeout)

    # -- the end

    def finish(self, *, drain_timeout: float = 300, rec_sample: int | None = None) -> Report:
        """Stop the load, wait until everything is applied, stop the workers, check."""
        assert self.load is not None
        load = self.load
        load.stop()
        last_sent = time.monotonic()
        r = self.report
        r.send_failures = load.failed
        drained = self.wait_applied(load.valid_high_water(), drain_timeout)
        if drained is None:
            r.notes.append(f"not drained within {drain_timeout:.0f}s")
        r.drain_s = time.monotonic() - last_sent
        log = read_topic(self.bootstrap, self.topics["events"], client_options=self.client_options)
        expected = expected_state(log, load.bad, self.history_length)
        r.produced, r.valid, r.hostile = len(log), expected.valid, len(expected.bad_at)
        if len(load.acked) + self.produced_elsewhere != len(log):
            r.notes.append(
                f"{len(load.acked)} records acknowledged (+{self.produced_elsewhere} sent "
                f"by others), {len(log)} in the log"
            )

        state = check_state(self.engine, expected)
        r.lost, r.duplicated, r.wrong_sequences = (
            state.lost,
            state.duplicated,
            len(state.wrong_sequences),
        )
        r.users = len(expected.last_event)

        def answered(values: list[dict[str, Any]]) -> bool:
            latest = latest_recommendations(values)
            return all(
                latest.get(u, {}).get("source_event_id") == e
                for u, e in expected.last_event.items()
            )

        recs = read_json_until(
            self.bootstrap,
            self.topics["recommendations"],
            answered,
            60,
            client_options=self.client_options,
        )
        rec_check = check_recommendations(recs, expected, self.model, sample=rec_sample)
        r.recs_checked, r.recs_missing, r.recs_stale = (
            rec_check.checked,
            len(rec_check.missing),
            len(rec_check.stale),
        )
        letters = read_json_until(
            self.bootstrap,
            self.topics["dead_letter"],
            lambda vs: len({(v["partition"], v["offset"]) for v in vs}) >= len(expected.bad_at),
            60,
            client_options=self.client_options,
        )
        dlq = check_dead_letters(letters, expected)
        r.dead_letters, r.dead_letter_copies, r.dead_letters_exact = (
            dlq.distinct,
            dlq.copies,
            dlq.exact,
        )
        for name in self.alive():
            self.fetch_pages(name)
            code = self.stop_worker(name)
            if code != 0:
                r.notes.append(f"worker {name} exited {code} on SIGTERM")
        r.peak_rss_mb = self.rss.peak_mb
        r.wall_s = time.monotonic() - self._started
        return r


# The scenarios: the suite runs them short, scripts/chaos.py long. Each returns its report.


def kill_loop(
    chaos: Chaos,
    *,
    kills: int,
    rate: float,
    users: int,
    gap: tuple[float, float],
    seed: int = 0,
    then_remove: bool = False,
) -> Report:
    """Two workers; SIGKILL one at random moments while events flow, restart it at once.
    ``then_remove``: finally stop one of them cleanly (SIGTERM), still under load."""
    rng = random.Random(seed)
    chaos.start_workers("w1", "w2")
    chaos.start_load(users=users, rate=rate, bad_every=40, huge_at=int(rate * gap[0]), seed=seed)
    for _ in range(kills):
        time.sleep(rng.uniform(*gap))
        victim = rng.choice(sorted(chaos.workers))
        targets = chaos.fault_point()
        since = time.monotonic()
        chaos.kill(victim)
        chaos.check_commits()  # what the dead worker committed, against what is out
        chaos.start_worker(victim)
        chaos.recovered(targets, since)
    if then_remove:
        time.sleep(gap[0])
        leaving = rng.choice(sorted(chaos.workers))
        targets = chaos.fault_point()
        since = time.monotonic()
        if (code := chaos.stop_worker(leaving)) != 0:
            chaos.report.notes.append(f"worker {leaving} exited {code} on SIGTERM")
        chaos.recovered(targets, since)
    time.sleep(gap[0])
    return chaos.finish()


def rebalance(chaos: Chaos, *, rate: float, users: int, hold: float, seed: int = 0) -> Report:
    """Under load: add a second worker, remove the first (SIGTERM), add it back, remove
    the second; each change is a rebalance of the group."""
    chaos.start_worker("w1")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    steps: list[tuple[str, str]] = [
        ("add", "w2"),
        ("remove", "w1"),
        ("add", "w1"),
        ("remove", "w2"),
    ]
    for action, name in steps:
        time.sleep(hold)
        targets = chaos.fault_point()
        since = time.monotonic()
        if action == "add":
            chaos.start_worker(name)
        else:
            code = chaos.stop_worker(name)
            if code != 0:
                chaos.report.notes.append(f"worker {name} exited {code} on SIGTERM")
        chaos.recovered(targets, since)
    time.sleep(hold)
    return chaos.finish()


def postgres_outage(
    chaos: Chaos, *, rate: float, users: int, outage: float, warmup: float, seed: int = 0
) -> tuple[Report, dict[int, int], dict[int, int]]:
    """One worker; PostgreSQL stopped for ``outage`` seconds while events flow.

    Returns the report and the group's committed offsets shortly after the stop and at
    the end of the outage: they must be equal (nothing acknowledged that was not applied).
    PostgreSQL is always started again.
    """
    worker = chaos.start_worker("w1")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    time.sleep(warmup)
    group = chaos.env("w1")["RECSTREAM_WORKER__GROUP_ID"]
    chaos.fault_point()
    pg_cluster("stop")
    try:
        time.sleep(min(2.0, outage / 2))  # the batch in flight at the stop settles
        during = committed_offsets(chaos.bootstrap, group, chaos.topics["events"])
        time.sleep(max(0.0, outage - min(2.0, outage / 2)))
        before_restore = committed_offsets(chaos.bootstrap, group, chaos.topics["events"])
        assert worker.proc is not None
        if worker.proc.poll() is not None:
            chaos.report.notes.append(f"worker exited {worker.proc.returncode} during the outage")
    finally:
        pg_cluster("start")
    chaos.recovered_after_restore(time.monotonic())
    chaos.check_commits()
    return chaos.finish(), during, before_restore


def broker_restart(
    chaos: Chaos,
    cluster: KafkaCluster,
    *,
    rate: float,
    users: int,
    down_s: float,
    warmup: float,
    seed: int = 0,
) -> Report:
    """Two workers; every node of the cluster SIGKILLed mid-stream (no shutdown, nothing
    flushed by Kafka itself), down for ``down_s``, then started again from its on-disk
    log. Producers, workers and the group coordinator all lose the broker at once."""
    chaos.start_workers("w1", "w2")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    time.sleep(warmup)
    chaos.fault_point()
    for node in cluster.node_ids:
        cluster.kill(node)
    time.sleep(down_s)
    for node in cluster.node_ids:
        cluster.start_node(node, wait=False)
    cluster.wait_ready()
    chaos.recovered_after_restore(time.monotonic())
    chaos.check_commits()
    time.sleep(warmup)
    return chaos.finish()


def leader_kill(
    chaos: Chaos,
    cluster: KafkaCluster,
    *,
    rate: float,
    users: int,
    down_s: float,
    warmup: float,
    seed: int = 0,
) -> tuple[Report, dict[int, int], dict[int, int]]:
    """Two workers on a replicated cluster; the node leading the most events partitions
    SIGKILLed under load, down for ``down_s`` (its partitions fail over to in-sync
    replicas), then started again. Returns the report and the events partitions'
    leaders before the kill and while the node was down."""
    chaos.start_workers("w1", "w2")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    time.sleep(warmup)
    before = cluster.partition_leaders(chaos.topics["events"])
    victim = Counter(before.values()).most_common(1)[0][0]
    targets = chaos.fault_point()
    since = time.monotonic()
    cluster.kill(victim)
    deadline = time.monotonic() + 60
    during = cluster.partition_leaders(chaos.topics["events"])
    while victim in during.values() or -1 in during.values():  # until all failed over
        if time.monotonic() > deadline:
            chaos.report.notes.append(f"leadership did not leave node {victim}: {during}")
            break
        time.sleep(0.5)
        during = cluster.partition_leaders(chaos.topics["events"])
    chaos.recovered(targets, since)
    chaos.check_commits()
    time.sleep(max(0.0, down_s - (time.monotonic() - since)))
    cluster.start_node(victim)
    time.sleep(warmup)
    return chaos.finish(), before, during


def scale(
    chaos: Chaos, *, rate: float, users: int, hold: float, seed: int = 0
) -> tuple[Report, list[dict[str, set[int]]]]:
    """One worker, then three, then one again, under load (clean starts and SIGTERMs).
    Returns the group's assignment (client id -> events partitions) after each step, as
    the group coordinator reports it."""
    chaos.start_worker("w1")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    views = [chaos.group_assignment(1)]
    time.sleep(hold)
    targets = chaos.fault_point()
    since = time.monotonic()
    chaos.start_workers("w2", "w3")
    views.append(chaos.group_assignment(3))
    chaos.recovered(targets, since)
    time.sleep(hold)
    targets = chaos.fault_point()
    since = time.monotonic()
    for name in ("w2", "w3"):
        if (code := chaos.stop_worker(name)) != 0:
            chaos.report.notes.append(f"worker {name} exited {code} on SIGTERM")
    views.append(chaos.group_assignment(1))
    chaos.recovered(targets, since)
    chaos.check_commits()
    time.sleep(hold)
    return chaos.finish(), views


def steady(chaos: Chaos, *, rate: float, users: int, seconds: float, seed: int = 0) -> Report:
    """One worker, events flowing for ``seconds``, no fault: the baseline."""
    chaos.start_worker("w1")
    chaos.start_load(users=users, rate=rate, bad_every=40, seed=seed)
    time.sleep(seconds)
    return chaos.finish()


def many_users(chaos: Chaos, *, users: int, timeout: float) -> Report:
    """One worker, ``users`` events each of a new user, as fast as they can be produced."""
    chaos.start_worker("w1")
    load = chaos.start_load(users=0, rate=0, limit=users, bad_every=10_000)
    load.wait_done(timeout)
    return chaos.finish(drain_timeout=timeout, rec_sample=2000)


def committed_offsets(
    bootstrap: str, group: str, topic: str, client_options: dict[str, Any] | None = None
) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **(client_options or {}))
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
