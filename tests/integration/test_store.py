"""The state store against real databases: a SQLite file and PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text

from model.errors import ConfigError
from stream_worker.errors import DatabaseNotMigrated, DatabaseUnavailable
from stream_worker.events import ClickEvent
from stream_worker.store import (
    apply_batch,
    check_migrated,
    expected_revision,
    iter_sequences,
    load_histories,
    load_sequences,
    make_engine,
    metadata,
    oldest_reader,
    partition_offsets,
    redacted,
    run_migrations,
    stored_offsets,
    user_sequences,
)
from tests.factories import click_event

pytestmark = pytest.mark.integration

TOPIC = "clickstream"


def ev(user: str, item: str, offset: int, partition: int = 0) -> ClickEvent:
    return click_event(user, item, offset, partition, "click")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An empty database: a SQLite file (in a directory make_engine creates) or a fresh
    PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'recstream.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def migrated(db_url: str, engine: Engine) -> Engine:
    run_migrations(db_url)
    return engine


def snapshot(engine: Engine) -> tuple[list[Any], list[Any]]:
    """The state's rows, in the columns every revision has."""
    c = user_sequences.c
    with engine.connect() as conn:
        users = conn.execute(
            select(c.user_id, c["items"], c.event_count, c.updated_at).order_by(c.user_id)
        ).all()
        offsets = conn.execute(
            select(partition_offsets).order_by(partition_offsets.c.partition)
        ).all()
    return [tuple(r) for r in users], [tuple(r) for r in offsets]


def event_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(user_sequences.c.user_id, user_sequences.c.event_count))
        return {user: count for user, count in rows}


# ---------------------------------------------------------------------------- migrations


HEAD = expected_revision()


def test_migrations_from_empty_to_head_create_both_tables(db_url: str, engine: Engine) -> None:
    assert run_migrations(db_url) == (None, HEAD)

    inspector = inspect(engine)
    assert {"user_sequences", "partition_offsets", "alembic_version"} <= set(
        inspector.get_table_names()
    )
    assert inspector.get_pk_constraint("user_sequences")["name"] == "pk_user_sequences"
    assert inspector.get_pk_constraint("partition_offsets")["name"] == "pk_partition_offsets"
    assert inspector.get_pk_constraint("partition_offsets")["constrained_columns"] == [
        "topic",
        "partition",
    ]
    # The migration creates exactly what store.metadata describes.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    # Running again is a no-op.
    assert run_migrations(db_url) == (HEAD, HEAD)


def test_check_migrated_names_the_command_until_migrated(db_url: str, engine: Engine) -> None:
    with pytest.raises(DatabaseNotMigrated) as info:
        check_migrated(engine)
    assert str(info.value) == (
        f"database {redacted(db_url)} is at revision none (empty), expected {HEAD}: "
        "run `recstream migrate`"
    )
    assert not info.value.retriable

    run_migrations(db_url)

    check_migrated(engine)


def test_check_migrated_rejects_a_revision_from_a_newer_version(migrated: Engine) -> None:
    with migrated.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        conn.execute(text("UPDATE schema_compatibility SET oldest_reader = '9999'"))

    with pytest.raises(DatabaseNotMigrated, match=r"revision 9999, which this version does not"):
        check_migrated(migrated)


def test_a_newer_revision_whose_window_includes_this_version_is_accepted(
    migrated: Engine,
) -> None:
    """An image rollback: the database was migrated by a newer recstream whose migrations
    kept this version's head in their compatibility window."""
    with migrated.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    # 0003 only added nullable columns: the window still starts at 0002.
    assert oldest_reader(migrated) == "0002"
    check_migrated(migrated)  # no error


def test_migrate_downgrades_to_an_earlier_revision_and_back(db_url: str, engine: Engine) -> None:
    run_migrations(db_url)
    assert run_migrations(db_url, "0001") == (HEAD, "0001")
    assert "schema_compatibility" not in inspect(engine).get_table_names()
    with pytest.raises(DatabaseNotMigrated, match="run `recstream migrate`"):
        check_migrated(engine)
    assert run_migrations(db_url) == ("0001", HEAD)
    check_migrated(engine)


def test_a_database_full_of_state_upgrades_from_the_first_revision(
    db_url: str, engine: Engine
) -> None:
    """State written at revision 0001 (its own tables, by SQL), upgraded to head: every
    row is kept and the worker's code goes on applying batches on top of it."""
    assert run_migrations(db_url, "0001") == (None, "0001")
    users = 300
    with engine.begin() as conn:
        for n in range(users):
            conn.execute(
                text(
                    "INSERT INTO user_sequences (user_id, items, event_count, updated_at) "
                    "VALUES (:user, :items, :count, CURRENT_TIMESTAMP)"
                ),
                {"user": f"u{n}", "items": json.dumps([f"i{n}", f"i{n + 1}"]), "count": 2},
            )
        conn.execute(
            text(
                "INSERT INTO partition_offsets (topic, partition, last_offset, updated_at) "
                "VALUES (:topic, 0, 599, CURRENT_TIMESTAMP)"
            ),
            {"topic": TOPIC},
        )
    before = snapshot(engine)
    assert run_migrations(db_url) == ("0001", HEAD)
    check_migrated(engine)
    assert snapshot(engine) == before
    result = apply_batch(engine, TOPIC, [ev("u7", "i99", 600), ev("u7", "i98", 601)], 200, {0: 601})
    assert result.applied == 2
    assert load_sequences(engine, ["u7"])["u7"] == ["i7", "i8", "i99", "i98"]
    assert stored_offsets(engine, TOPIC) == {0: 601}


def test_make_engine_reports_an_unusable_sqlite_directory(tmp_path: Any) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    with pytest.raises(ConfigError, match="cannot create"):
        make_engine(f"sqlite:///{blocker / 'state.db'}")


# ------------------------------------------------------------------------------ batches


def test_apply_batch_appends_caps_and_counts(migrated: Engine) -> None:
    first = [ev("u1", "a", 0), ev("u2", "x", 1), ev("u1", "b", 2), ev("u3", "q", 0, partition=1)]

    result = apply_batch(migrated, TOPIC, first, max_len=3)

    assert result.sequences == {"u1": ["a", "b"], "u2": ["x"], "u3": ["q"]}
    assert (result.applied, result.skipped) == (4, 0)
    assert result.applied_events == first
    assert result.last_event == {"u1": first[2], "u2": first[1], "u3": first[3]}

    second = [ev("u1", "c", 3), ev("u1", "d", 4), ev("u2", "y", 5)]
    result = apply_batch(migrated, TOPIC, second, max_len=3)

    assert result.sequences == {"u1": ["b", "c", "d"], "u2": ["x", "y"]}
    assert load_sequences(migrated, ["u1", "u2", "u3", "nobody"]) == {
        "u1": ["b", "c", "d"],
        "u2": ["x", "y"],
        "u3": ["q"],
    }
    assert event_counts(migrated) == {"u1": 4, "u2": 2, "u3": 1}
    assert stored_offsets(migrated, TOPIC) == {0: 5, 1: 0}
    assert stored_offsets(migrated, "another-topic") == {}
    assert list(iter_sequences(migrated, batch_size=2)) == [
        ("u1", ["b", "c", "d"]),
        ("u2", ["x", "y"]),
        ("u3", ["q"]),
    ]


def load_types(engine: Engine, user_ids: list[str]) -> dict[str, str]:
    return {user: codes for user, (_, codes) in load_histories(engine, user_ids).items()}


def test_event_types_are_stored_with_their_items(migrated: Engine) -> None:
    def typed(user: str, item: str, offset: int, kind: str) -> ClickEvent:
        return click_event(user, item, offset, 0, kind)

    first = apply_batch(migrated, TOPIC, [typed("u1", "a", 0, "purchase")], max_len=3)
    assert first.types == {"u1": "4"}
    batch = [typed("u1", "b", 1, "view"), typed("u1", "c", 2, "click"), typed("u1", "d", 3, "view")]
    second = apply_batch(migrated, TOPIC, batch, max_len=3)
    assert second.sequences == {"u1": ["b", "c", "d"]}
    assert second.types == {"u1": "121"}
    assert load_types(migrated, ["u1", "nobody"]) == {"u1": "121"}
    # A worker from before event types appends items and counts events without them:
    # the stored types no longer describe the items and read as not known.
    with migrated.begin() as conn:
        conn.execute(
            user_sequences.update().values(
                items=["c", "d", "e"], event_count=user_sequences.c.event_count + 1
            )
        )
    assert load_types(migrated, ["u1"]) == {"u1": "000"}
    third = apply_batch(migrated, TOPIC, [typed("u1", "f", 4, "add_to_cart")], max_len=3)
    assert third.types == {"u1": "003"}
    assert load_types(migrated, ["u1"]) == {"u1": "003"}


def test_replaying_a_batch_changes_nothing(migrated: Engine) -> None:
    batch = [ev(f"u{i % 4}", f"i{i}", i, partition=i % 2) for i in range(20)]
    apply_batch(migrated, TOPIC, batch, max_len=5)
    before = snapshot(migrated)

    replay = apply_batch(migrated, TOPIC, batch, max_len=5)

    assert (replay.applied, replay.skipped) == (0, 20)
    assert replay.sequences == {}
    assert replay.applied_events == []
    assert snapshot(migrated) == before


def test_a_batch_of_old_and_new_offsets_applies_only_the_new(migrated: Engine) -> None:
    apply_batch(migrated, TOPIC, [ev("u1", f"i{o}", o) for o in range(5)], max_len=10)

    result = apply_batch(migrated, TOPIC, [ev("u1", f"i{o}", o) for o in range(3, 8)], max_len=10)

    assert (result.applied, result.skipped) == (3, 2)
    assert [e.offset for e in result.applied_events] == [5, 6, 7]
    assert load_sequences(migrated, ["u1"]) == {"u1": [f"i{o}" for o in range(8)]}
    assert event_counts(migrated) == {"u1": 8}
    assert stored_offsets(migrated, TOPIC) == {0: 7}


def test_concurrent_overlapping_batches_never_double_apply(migrated: Engine) -> None:
    # Two workers consuming the same two partitions from the same position (as during a
    # rebalance), with different batch sizes so their batches overlap.
    n = 600
    events = [
        ev(f"u{k % 2}-{(k // 2) % 25}", f"i{k}", offset=k // 2, partition=k % 2) for k in range(n)
    ]
    start = threading.Barrier(2)
    applied: dict[str, list[ClickEvent]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    failures: list[BaseException] = []

    def worker(name: str, batch_size: int) -> None:
        try:
            start.wait()
            for lo in range(0, n, batch_size):
                result = apply_batch(migrated, TOPIC, events[lo : lo + batch_size], max_len=1000)
                applied[name].extend(result.applied_events)
                skipped[name] += result.skipped
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=args) for args in (("a", 20), ("b", 27))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures

    all_applied = applied["a"] + applied["b"]
    assert sorted(e.event_id for e in all_applied) == sorted(e.event_id for e in events)
    assert skipped["a"] + skipped["b"] == n
    expected: dict[str, list[str]] = defaultdict(list)
    for e in events:
        expected[e.user_id].append(e.item_id)
    assert dict(iter_sequences(migrated)) == expected
    assert event_counts(migrated) == {user: len(items) for user, items in expected.items()}
    assert stored_offsets(migrated, TOPIC) == {0: n // 2 - 1, 1: n // 2 - 1}


# ------------------------------------------------------------------------------ secrets


def test_unavailable_database_errors_never_show_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql+psycopg2://recstream:s3cr3t-Pa55@127.0.0.1:1/test"
    engine = make_engine(url)
    calls: list[Callable[[], object]] = [
        lambda: check_migrated(engine),
        lambda: apply_batch(engine, TOPIC, [ev("u1", "a", 0)], max_len=5),
        lambda: load_sequences(engine, ["u1"]),
        lambda: list(iter_sequences(engine)),
        lambda: stored_offsets(engine, TOPIC),
        lambda: run_migrations(url),
    ]
    try:
        for call in calls:
            with pytest.raises(DatabaseUnavailable) as info:
                call()
            assert info.value.retriable
            assert str(info.value).startswith(
                "database postgresql+psycopg2://recstream:***@127.0.0.1:1/test is unavailable: "
            )
            chain: BaseException | None = info.value
            while chain is not None:  # the chained driver error too
                assert "s3cr3t" not in str(chain)
                chain = chain.__cause__ or chain.__context__
    finally:
        engine.dispose()
    assert "s3cr3t" not in caplog.text
