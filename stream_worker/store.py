"""The worker's state: each user's recent item sequence and the last applied offset per partition.

Both tables are written in one transaction per micro-batch (:func:`apply_batch`), so a
batch replayed after a crash (Kafka redelivers everything after the last committed
consumer offset) finds its events at or below the stored partition offset and skips
them: state is updated exactly once per event.

SQLite (a file, the embedded default) and PostgreSQL (production) are supported. The
schema is owned by the Alembic migrations in the repository's ``migrations/``
directory; :func:`run_migrations` applies them and :func:`check_migrated` refuses to
run against a database that is not at their head.

Pure logic (:func:`merge_events`) is apart from I/O so it is tested without a database.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql.expression import Executable

from model.errors import ConfigError
from model.sequences import TYPE_CODES
from stream_worker.errors import DatabaseNotMigrated, DatabaseUnavailable, StoreError
from stream_worker.events import ClickEvent

logger = logging.getLogger(__name__)

# The migrations ship inside the package (``stream_worker.migrations``, mapped onto the
# repository's migrations/ by pyproject.toml), so a plain wheel install has them.
MIGRATIONS_DIR = Path(str(importlib.resources.files("stream_worker.migrations")))
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = 0x7265_6373  # "recs": PostgreSQL advisory lock of migration runs
PG_CONNECT_TIMEOUT_S = 10
NO_OFFSET = -1  # "nothing applied yet": Kafka offsets start at 0

# Bound parameters per IN (...) list; SQLite allows 32766 per statement, PostgreSQL 65535.
_IN_CHUNK = 1000
# Execution option that makes a SQLite transaction take the write lock at BEGIN.
_WRITE = "recstream_write"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING_CONVENTION)

user_sequences = Table(
    "user_sequences",
    metadata,
    Column("user_id", String(255), primary_key=True),
    # External item ids, oldest first, newest last, at most max_len of them.
    Column("items", JSON, nullable=False),
    Column("event_count", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The top items last published to the user and the model version that ranked them
    # (migration 0003): the user's next event is scored against them (online HR@K).
    Column("last_recommended", JSON, nullable=True),
    Column("last_model_version", String(64), nullable=True),
    # The items' event types (migration 0004): {"at": event_count, "codes": "1121..."},
    # one digit per item, valid while "at" equals event_count (see stored_types).
    Column("event_types", JSON, nullable=True),
)

# One row: the oldest code revision that can still run on this schema (migration 0002).
schema_compatibility = Table(
    "schema_compatibility",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("oldest_reader", String(32), nullable=False),
)

partition_offsets = Table(
    "partition_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# --------------------------------------------------------------------------- pure logic


def stored_types(items: Sequence[str], event_count: int, column: Any) -> str:
    """A row's event type codes, one digit per item: the ``event_types`` column when it
    was written at the row's ``event_count`` (code that predates it appends items
    without it), else "0" (not known) for every item."""
    if isinstance(column, Mapping) and column.get("at") == event_count:
        codes = column.get("codes")
        if isinstance(codes, str) and len(codes) == len(items):
            return codes
    return "0" * len(items)


class Merge(NamedTuple):
    """What :func:`merge_events` decided; unpacks as a 5-tuple."""

    sequences: dict[str, list[str]]  # new full sequence of every user with an applied event
    offsets: dict[int, int]  # new last offset of every partition with an applied event
    applied: list[ClickEvent]  # in batch order
    skipped: int  # events at or below the partition's offset (re-deliveries)
    types: dict[str, str]  # per sequence, its items' event type codes (stored_types)

    def event_counts(self) -> Counter[str]:
        """Applied events per user: what each user's ``event_count`` grows by."""
        return Counter(e.user_id for e in self.applied)


def merge_events(
    stored_offsets: Mapping[int, int],
    stored_sequences: Mapping[str, Sequence[str]],
    events: Iterable[ClickEvent],
    max_len: int,
    stored_codes: Mapping[str, str] | None = None,
) -> Merge:
    """Apply ``events`` (in batch order) to the stored state, without touching it.

    An event is applied when its offset is above its partition's high-water mark: the
    stored offset at first, then the offset of the last event applied from the same
    partition in this batch, so a duplicate inside one batch is skipped like a
    re-delivery. Applied items are appended in batch order and each touched sequence
    keeps its newest ``max_len`` items; their event type codes (``stored_codes``, "0"
    for items without) follow them.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    watermark = dict(stored_offsets)
    stored_codes = stored_codes or {}
    sequences: dict[str, list[str]] = {}
    codes: dict[str, list[str]] = {}
    offsets: dict[int, int] = {}
    applied: list[ClickEvent] = []
    skipped = 0
    for ev in events:
        if ev.offset <= watermark.get(ev.partition, NO_OFFSET):
            skipped += 1
            continue
        watermark[ev.partition] = offsets[ev.partition] = ev.offset
        seq = sequences.get(ev.user_id)
        if seq is None:
            seq = sequences[ev.user_id] = list(stored_sequences.get(ev.user_id, ()))
            known = stored_codes.get(ev.user_id, "")
            codes[ev.user_id] = list(known if len(known) == len(seq) else "0" * len(seq))
        seq.append(ev.item_id)
        codes[ev.user_id].append(str(TYPE_CODES.get(ev.event_type, 0)))
        applied.append(ev)
    for seq in sequences.values():
        # Cap once at the end: cheaper than per append, same result.
        if len(seq) > max_len:
            del seq[:-max_len]
    types = {user: "".join(c[-len(sequences[user]) :]) for user, c in codes.items()}
    return Merge(sequences, offsets, applied, skipped, types)


@dataclass
class AppliedBatch:
    """The outcome of :func:`apply_batch`."""

    sequences: dict[str, list[str]]  # new full sequence of every user with an applied event
    applied: int
    skipped: int  # events at or below the stored offset (re-deliveries)
    types: dict[str, str] = field(default_factory=dict)  # per sequence: Merge.types
    last_event: dict[str, ClickEvent] = field(default_factory=dict)  # per user, newest applied
    applied_events: list[ClickEvent] = field(default_factory=list)
    # Per user with an applied event: what was last published to it, and by which model
    # version, as stored before this batch (None: nothing yet).
    previous: dict[str, LastRecommendation] = field(default_factory=dict)


class LastRecommendation(NamedTuple):
    """A user's last published items (best first) and the model version behind them."""

    items: list[str]
    model_version: str


# Answers a batch inside its transaction: user -> what is published to it now.
Answer = Callable[[AppliedBatch], Mapping[str, LastRecommendation]]


# ------------------------------------------------------------------------------ engines


def redacted(url: str | URL) -> str:
    """``url`` with its password (and any ``*password*`` query parameter) shown as ``***``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<invalid database URL>"
    secret_keys = [key for key in parsed.query if "password" in key.lower()]
    if secret_keys:
        parsed = parsed.difference_update_query(secret_keys).update_query_dict(
            dict.fromkeys(secret_keys, "***")
        )
    return parsed.render_as_string(hide_password=True)


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """An engine for a SQLite file or PostgreSQL URL, tuned for the worker.

    SQLite: the file's directory is created, connections use WAL and a busy timeout,
    and transactions begin explicitly (see :func:`_sqlite_on_begin`). PostgreSQL:
    pooled connections are pinged before use (a restarted server or a dropped idle
    connection costs a reconnect, not a failed batch) and connecting times out; a URL
    without a driver (``postgresql://``) uses psycopg2.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "RECSTREAM_DATABASE__URL is not a database URL "
            "(expected sqlite:///PATH or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, pool_size=pool_size, echo=echo)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; the project ships psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg2")
        connect_args: dict[str, Any] = {}
        if parsed.get_driver_name() in ("psycopg2", "psycopg") and (
            "connect_timeout" not in parsed.query
        ):
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        return create_engine(
            parsed,
            pool_size=pool_size,
            pool_pre_ping=True,
            echo=echo,
            connect_args=connect_args,
        )
    raise ConfigError(
        f"unsupported database {redacted(parsed)}: recstream keeps state in SQLite or PostgreSQL"
    )


def _sqlite_engine(url: URL, *, pool_size: int, echo: bool) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:")
    if not in_memory and not database.startswith("file:"):
        directory = Path(database).expanduser().parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create {directory} for the SQLite database {redacted(url)}: "
                f"{exc.strerror}; check RECSTREAM_DATABASE__URL"
            ) from None
    # In-memory databases get SingletonThreadPool, whose pool_size means something else.
    pool_args: dict[str, Any] = {} if in_memory else {"pool_size": pool_size}
    engine = create_engine(url, echo=echo, **pool_args)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The sqlite3 driver's legacy mode never BEGINs before a SELECT, so a read-then-write
    # transaction would not be isolated; take transaction control (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # Wait for another writer's lock instead of failing at once with "database is
        # locked" (set first: switching to WAL may itself wait for a lock).
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # Readers do not block the writer nor it them; the mode is stored in the file.
        cursor.execute("PRAGMA journal_mode = WAL")
        # No fsync per commit (it was the largest stage, ~17 ms a batch): in WAL mode a
        # commit still survives a crash of the process; a power cut can roll back the
        # newest commits, and the worker then re-reads from the offsets stored here.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A write transaction takes the database's write lock at BEGIN: two workers that both
    # read the stored offsets and then write serialize here, and the second one reads
    # what the first committed. A deferred BEGIN would let both read the same offsets.
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def _reason(exc: DBAPIError, url: URL) -> str:
    text = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    if url.password:
        # Drivers do not echo the password, but a message is no place to find out.
        text = text.replace(str(url.password), "***")
    return text


def _unavailable(engine: Engine, exc: DBAPIError) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"database {redacted(engine.url)} is unavailable: {_reason(exc, engine.url)}"
    )


def _is_sqlite_busy(exc: DBAPIError) -> bool:
    text = str(exc.orig)
    return "database is locked" in text or "database is busy" in text


@contextmanager
def _transaction(engine: Engine, *, write: bool = False) -> Iterator[Connection]:
    """A connection in a transaction, committed on success; connection failures, a lost
    connection and an expired SQLite busy timeout become :class:`DatabaseUnavailable`."""
    try:
        conn = engine.connect()
    except (OperationalError, InterfaceError) as exc:
        raise _unavailable(engine, exc) from exc
    try:
        with conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn
    except (OperationalError, InterfaceError) as exc:
        if exc.connection_invalidated or _is_sqlite_busy(exc):
            raise _unavailable(engine, exc) from exc
        raise


def _chunks(values: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[list[Any]]:
    """``values`` in chunks of at most ``size``, each padded (see :func:`_padded`)."""
    for start in range(0, len(values), size):
        yield _padded(values[start : start + size])


def _padded(values: Sequence[Any]) -> list[Any]:
    """``values`` repeated at the end up to a power of two (at least 8).

    An ``IN (?, ?, ...)`` list of n parameters is its own SQL text, and SQLite's driver
    keeps 128 prepared statements per connection: batches of every size from 1 to 1,000
    users filled that cache with ~22 MiB per connection (measured). Padded lengths are
    8, 16, ..., 1024: a handful of texts. A repeated value changes no IN result.
    """
    padded = list(values)
    if padded:
        size = max(8, 1 << (len(padded) - 1).bit_length())
        padded += [padded[-1]] * (size - len(padded))
    return padded


# ---------------------------------------------------------------------------- migrations


def alembic_config(url: str | None = None) -> Config:
    """The Alembic configuration, built in code (there is no ``alembic.ini``).

    ``url`` reaches ``migrations/env.py`` through ``config.attributes`` (never through
    the ini-style options, whose ``%`` interpolation would mangle an encoded password).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["url"] = url
    return config


@functools.cache
def _script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def expected_revision() -> str:
    """The head revision of the migrations shipped with this version."""
    head = _script_directory().get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}: the installation is broken")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision; ``None`` when it was never migrated."""
    with _transaction(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _is_downgrade(current: str | None, target: str) -> bool:
    """True when ``target`` lies before the database's ``current`` revision."""
    if current is None or target in ("head", "heads", current):
        return False
    if target == "base":
        return True
    if not _known_revision(target) or not _known_revision(current):
        return False  # alembic names the unknown revision
    return _is_ancestor(target, current)


def _known_revision(revision: str) -> bool:
    try:
        _script_directory().get_revision(revision)
    except CommandError:  # alembic's answer for an id it has no script for
        return False
    return True


def _is_ancestor(older: str, newer: str) -> bool:
    """True when revision ``older`` comes at or before ``newer`` (both known here)."""
    script = _script_directory()
    return any(rev.revision == older for rev in script.iterate_revisions(newer, "base"))


def oldest_reader(engine: Engine) -> str | None:
    """The database's compatibility window: the oldest code revision that may run on it
    (None before migration 0002)."""
    with _transaction(engine) as conn:
        if not sa_inspect(conn).has_table("schema_compatibility"):
            return None
        value = conn.execute(select(schema_compatibility.c.oldest_reader)).scalar()
    return None if value is None else str(value)


def check_migrated(engine: Engine) -> None:
    """Raise :class:`DatabaseNotMigrated` unless this version can run on the database.

    It can at its own head revision, and at a newer revision (migrated by a newer
    recstream) whose compatibility window still includes this version's head: that is
    what lets an image be rolled back without touching the database. A database behind
    this version's head needs ``recstream migrate``.

    Raises :class:`DatabaseUnavailable` when the database cannot be reached.
    """
    expected = expected_revision()
    current = current_revision(engine)
    if current == expected:
        return
    where = redacted(engine.url)
    if current is not None and not _known_revision(current):
        reader = oldest_reader(engine)
        if reader is not None and _known_revision(reader) and _is_ancestor(reader, expected):
            logger.warning(
                "database %s is at revision %s, newer than this version's %s; its "
                "compatibility window starts at %s, so this version runs on it",
                where, current, expected, reader,
            )  # fmt: skip
            return
        raise DatabaseNotMigrated(
            f"database {where} is at revision {current}, which this version does not know "
            f"(expected {expected}) and whose compatibility window starts at "
            f"{reader or 'its own revision'}: it was migrated by a newer recstream; deploy "
            "that version"
        )
    shown = current if current is not None else "none (empty)"
    raise DatabaseNotMigrated(
        f"database {where} is at revision {shown}, expected {expected}: run `recstream migrate`"
    )


def run_migrations(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at ``url`` to ``revision``, upgrading or, for a revision
    before its own, downgrading; returns (revision before, after).

    All migrations run in one transaction (both databases have transactional DDL), so
    a failure leaves the database at the revision it had; concurrent runs (every
    worker's init container at a rollout) wait for each other on the database's write
    lock and the later ones find nothing to do.
    """
    engine = make_engine(url, pool_size=1)
    try:
        with _transaction(engine, write=True) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            before = MigrationContext.configure(conn).get_current_revision()
            config = alembic_config(url)
            # env.py runs on this connection, inside this transaction.
            config.attributes["connection"] = conn
            downgrade = _is_downgrade(before, revision)
            try:
                if downgrade:
                    command.downgrade(config, revision)
                else:
                    command.upgrade(config, revision)
            except CommandError as exc:
                raise ConfigError(f"cannot migrate {redacted(url)} to {revision}: {exc}") from None
            after = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if after is None and revision != "base":
        raise StoreError(f"database {redacted(url)} has no revision after migrating to {revision}")
    if before == after:
        logger.info("database %s already at revision %s", redacted(url), after)
    else:
        logger.info("migrated database %s from %s to %s", redacted(url), before, after)
    return before, after


# ---------------------------------------------------------------------------- hot path


def apply_batch(
    engine: Engine,
    topic: str,
    events: Sequence[ClickEvent],
    max_len: int,
    positions: Mapping[int, int] | None = None,
    answer: Answer | None = None,
) -> AppliedBatch:
    """Append a micro-batch's items to its users' sequences and advance partition offsets.

    One transaction: the batch's partition offsets are read under a lock (PostgreSQL: row
    locks; SQLite: the database write lock taken at BEGIN), events at or below them are
    skipped, and the touched sequences and new offsets are upserted together. Two
    workers applying the same partition at once (during a rebalance) serialize, and the
    second skips what the first applied. ``events`` must be in per-partition offset order.
    Four statements, each sent once whatever the batch size.

    ``positions`` (partition -> last offset of the whole batch, bad records included)
    advances the stored offsets past records that were not events, so the stored offset
    is where the worker really stands: a restart then re-reads neither events nor
    dead letters.

    ``answer``, when given, is called inside the transaction with the applied batch and
    returns what is published to each user now; it is stored with the state
    (``last_recommended``), so the state and the last answer commit together.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    positions = positions or {}
    if not events and not positions:
        return AppliedBatch(sequences={}, applied=0, skipped=0)
    partitions = sorted({ev.partition for ev in events} | set(positions))
    with _transaction(engine, write=True) as conn:
        statements = _statements(conn.dialect.name)
        offsets = _locked_offsets(conn, statements, topic, partitions)
        # Only users with an event above the stored offset need their sequence read.
        candidates = sorted(
            {ev.user_id for ev in events if ev.offset > offsets.get(ev.partition, NO_OFFSET)}
        )
        rows = _select_sequences(conn, statements.lock_sequences, candidates)
        stored = {user: row[0] for user, row in rows.items()}
        counts_before = {user: int(row[3]) for user, row in rows.items()}
        merged = merge_events(
            offsets,
            stored,
            events,
            max_len,
            {user: stored_types(row[0], int(row[3]), row[4]) for user, row in rows.items()},
        )
        advanced = dict(merged.offsets)
        for partition, offset in positions.items():
            if offset > max(offsets.get(partition, NO_OFFSET), advanced.get(partition, NO_OFFSET)):
                advanced[partition] = offset
        if merged.applied:
            counts = merged.event_counts()
            _execute_many(
                conn,
                statements.upsert_sequences,
                [
                    {
                        "user_id": user,
                        "items": seq,
                        "event_count": counts[user],
                        "event_types": {
                            "at": counts_before.get(user, 0) + counts[user],
                            "codes": merged.types[user],
                        },
                    }
                    for user, seq in sorted(merged.sequences.items())
                ],
            )
        if advanced:
            _execute_many(
                conn,
                statements.upsert_offsets,
                [
                    {"topic": topic, "partition": p, "last_offset": o}
                    for p, o in sorted(advanced.items())
                ],
            )
        previous = {
            user: LastRecommendation(list(row[1]), str(row[2]))
            for user, row in rows.items()
            if row[1] is not None and user in merged.sequences
        }
        result = AppliedBatch(
            sequences=merged.sequences,
            applied=len(merged.applied),
            skipped=merged.skipped,
            types=merged.types,
            last_event={ev.user_id: ev for ev in merged.applied},
            applied_events=merged.applied,
            previous=previous,
        )
        if answer is not None and merged.applied:
            published = answer(result)
            rows_out = [
                {"u": user, "b_items": rec.items, "b_version": rec.model_version}
                for user, rec in sorted(published.items())
                if user in merged.sequences
            ]
            if rows_out:
                conn.execute(_UPDATE_LAST, rows_out)
    logger.debug(
        "applied %d events (%d re-deliveries skipped) to %d users from %s partitions %s",
        result.applied,
        result.skipped,
        len(result.sequences),
        topic,
        partitions,
    )
    return result


# Each user's last answer, written in the batch's transaction (``apply_batch(answer=)``).
_UPDATE_LAST = (
    user_sequences.update()
    .where(user_sequences.c.user_id == bindparam("u"))
    .values(last_recommended=bindparam("b_items"), last_model_version=bindparam("b_version"))
)


class _Statements(NamedTuple):
    lock_offsets: Executable  # params: topic, partitions (or one row per partition)
    lock_sequences: Executable  # params: user_ids
    upsert_sequences: Executable  # rows: user_id, items, event_count, event_types
    upsert_offsets: Executable  # rows: topic, partition, last_offset


# Built once per dialect: constructing Core statements costs more than compiling them
# (which SQLAlchemy caches anyway). Timestamps are the server's, one expression per row.
@functools.cache
def _statements(dialect: str) -> _Statements:
    insert: Callable[[Table], sqlite.Insert | postgresql.Insert]
    if dialect == "postgresql":
        insert = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise StoreError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")
    offsets = partition_offsets.c
    sequences = user_sequences.c

    lock_offsets: Executable
    if dialect == "postgresql":
        # SELECT ... FOR UPDATE cannot lock a row that does not exist yet, so two workers
        # seeing a partition for the first time would both apply it. An upsert whose
        # conflict branch rewrites the row unchanged creates the missing rows and locks
        # all of them in one statement; a racing transaction waits on the row, then gets
        # the committed offset. Rows in partition order: no lock-order deadlock.
        ins = postgresql.insert(partition_offsets).values(updated_at=func.now())
        lock_offsets = ins.on_conflict_do_update(
            index_elements=[offsets.topic, offsets.partition],
            set_={"last_offset": offsets.last_offset},
        ).returning(offsets.partition, offsets.last_offset)
    else:
        # SQLite: the transaction already holds the database write lock (BEGIN IMMEDIATE).
        lock_offsets = select(offsets.partition, offsets.last_offset).where(
            offsets.topic == bindparam("topic"),
            offsets.partition.in_(bindparam("partitions", expanding=True)),
        )

    # PostgreSQL: guards a user whose events arrive on two partitions (keys are user ids,
    # so that takes a misbehaving producer); ordered, so locks are taken in one order.
    # SQLite renders no FOR UPDATE and needs none.
    lock_sequences = (
        select(
            sequences.user_id,
            sequences["items"],
            sequences.last_recommended,
            sequences.last_model_version,
            sequences.event_count,
            sequences.event_types,
        )
        .where(sequences.user_id.in_(bindparam("user_ids", expanding=True)))
        .order_by(sequences.user_id)
        .with_for_update()
    )

    ins_seq = insert(user_sequences).values(updated_at=func.now())
    upsert_sequences = ins_seq.on_conflict_do_update(
        index_elements=[sequences.user_id],
        set_={
            # "items" collides with ColumnCollection.items(): index, never attribute access.
            "items": ins_seq.excluded["items"],
            "event_count": sequences.event_count + ins_seq.excluded.event_count,
            "event_types": ins_seq.excluded.event_types,
            "updated_at": ins_seq.excluded.updated_at,
        },
    )

    ins_off = insert(partition_offsets).values(updated_at=func.now())
    upsert_offsets = ins_off.on_conflict_do_update(
        index_elements=[offsets.topic, offsets.partition],
        set_={
            "last_offset": ins_off.excluded.last_offset,
            "updated_at": ins_off.excluded.updated_at,
        },
        # Never move an offset backwards, whatever the caller passed.
        where=offsets.last_offset < ins_off.excluded.last_offset,
    )

    if dialect == "postgresql":
        # RETURNING makes SQLAlchemy send an executemany as multi-row VALUES pages
        # ("insertmanyvalues"); without it, SQLAlchemy 2.1 runs an ON CONFLICT executemany
        # row by row: a round trip per user. Safe because a batch's keys are distinct (one
        # statement may not upsert a row twice).
        return _Statements(
            lock_offsets,
            lock_sequences,
            upsert_sequences.returning(sequences.user_id),
            upsert_offsets.returning(offsets.partition),
        )
    # sqlite3's executemany is a loop in C over one prepared statement: no RETURNING.
    return _Statements(lock_offsets, lock_sequences, upsert_sequences, upsert_offsets)


def _execute_many(conn: Connection, stmt: Executable, rows: list[dict[str, Any]]) -> None:
    result = conn.execute(stmt, rows)
    if result.returns_rows:
        result.all()


def _locked_offsets(
    conn: Connection, statements: _Statements, topic: str, partitions: list[int]
) -> dict[int, int]:
    if conn.dialect.name == "postgresql":
        rows = [{"topic": topic, "partition": p, "last_offset": NO_OFFSET} for p in partitions]
        result = conn.execute(statements.lock_offsets, rows)
    else:
        result = conn.execute(
            statements.lock_offsets, {"topic": topic, "partitions": _padded(partitions)}
        )
    return {int(p): int(o) for p, o in result.all()}


def _select_sequences(
    conn: Connection, stmt: Executable, user_ids: Sequence[str]
) -> dict[str, Any]:
    """user -> the rest of its row (``stmt`` selects the user id first)."""
    found: dict[str, Any] = {}
    for chunk in _chunks(user_ids):
        for row in conn.execute(stmt, {"user_ids": chunk}).all():
            found[row[0]] = row[1] if len(row) == 2 else tuple(row[1:])
    return found


# ------------------------------------------------------------------------------- reads


def load_sequences(engine: Engine, user_ids: Iterable[str]) -> dict[str, list[str]]:
    """The stored sequences of ``user_ids`` (users without state are absent)."""
    return {user: items for user, (items, _) in load_histories(engine, user_ids).items()}


_SELECT_HISTORIES = select(
    user_sequences.c.user_id,
    user_sequences.c["items"],
    user_sequences.c.event_count,
    user_sequences.c.event_types,
).where(user_sequences.c.user_id.in_(bindparam("user_ids", expanding=True)))


def load_histories(engine: Engine, user_ids: Iterable[str]) -> dict[str, tuple[list[str], str]]:
    """The stored sequences of ``user_ids`` and their event type codes (``stored_types``);
    users without state are absent."""
    wanted = sorted(set(user_ids))
    if not wanted:
        return {}
    with _transaction(engine) as conn:
        found = _select_sequences(conn, _SELECT_HISTORIES, wanted)
    return {
        user: (list(items), stored_types(items, int(count), kinds))
        for user, (items, count, kinds) in found.items()
    }


def iter_sequences(engine: Engine, batch_size: int = 1000) -> Iterator[tuple[str, list[str]]]:
    """Every user's sequence, in user id order, for offline retraining."""
    for user, items, _ in iter_histories(engine, batch_size):
        yield user, items


def iter_histories(engine: Engine, batch_size: int = 1000) -> Iterator[tuple[str, list[str], str]]:
    """Every user's sequence and its event type codes (``stored_types``), in user id
    order, for offline retraining.

    Pages by user id (keyset), one short transaction per page: no long-running read
    holds back the workers' writes or PostgreSQL's vacuum.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    c = user_sequences.c
    after: str | None = None
    while True:
        stmt = (
            select(c.user_id, c["items"], c.event_count, c.event_types)
            .order_by(c.user_id)
            .limit(batch_size)
        )
        if after is not None:
            stmt = stmt.where(c.user_id > after)
        with _transaction(engine) as conn:
            page = [
                (str(user), list(items), stored_types(items, int(count), kinds))
                for user, items, count, kinds in conn.execute(stmt)
            ]
        yield from page
        if len(page) < batch_size:
            return
        after = page[-1][0]


def database_problem(engine: Engine) -> str | None:
    """None when the database answers a trivial query; else why not, one line, with the
    URL's password masked (for readiness)."""
    try:
        with _transaction(engine) as conn:
            conn.execute(text("SELECT 1"))
    except StoreError as exc:
        return str(exc)
    except DBAPIError as exc:
        return f"database {redacted(engine.url)}: {_reason(exc, engine.url)}"
    return None


def stored_offsets(engine: Engine, topic: str) -> dict[int, int]:
    """The last applied offset of every partition of ``topic`` that has one."""
    stmt = select(partition_offsets.c.partition, partition_offsets.c.last_offset).where(
        partition_offsets.c.topic == topic, partition_offsets.c.last_offset > NO_OFFSET
    )
    with _transaction(engine) as conn:
        return {int(p): int(o) for p, o in conn.execute(stmt)}
