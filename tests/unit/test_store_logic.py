"""The pure part of the state store: merging a micro-batch into stored sequences."""

from __future__ import annotations

import pytest

from stream_worker.events import ClickEvent
from stream_worker.store import merge_events, redacted, stored_types
from tests.factories import click_event


def ev(user: str, item: str, offset: int, partition: int = 0) -> ClickEvent:
    return click_event(user, item, offset, partition, "view")


def test_appends_in_batch_order_after_stored_items() -> None:
    events = [ev("u1", "c", 0), ev("u2", "x", 1), ev("u1", "d", 2), ev("u1", "e", 3)]

    sequences, offsets, applied, skipped, _ = merge_events({}, {"u1": ["a", "b"]}, events, 10)

    assert sequences == {"u1": ["a", "b", "c", "d", "e"], "u2": ["x"]}
    assert offsets == {0: 3}
    assert applied == events
    assert skipped == 0


def test_skips_events_at_or_below_the_stored_offset() -> None:
    events = [ev("u1", "old", 4), ev("u1", "same", 5), ev("u1", "new", 6), ev("u2", "new2", 7)]

    merged = merge_events({0: 5}, {"u1": ["a"]}, events, 10)

    assert merged.sequences == {"u1": ["a", "new"], "u2": ["new2"]}
    assert merged.offsets == {0: 7}
    assert [e.offset for e in merged.applied] == [6, 7]
    assert merged.skipped == 2


def test_a_fully_replayed_batch_changes_nothing() -> None:
    events = [ev("u1", "a", 0), ev("u1", "b", 1)]

    merged = merge_events({0: 1}, {"u1": ["a", "b"]}, events, 10)

    assert merged.sequences == {}
    assert merged.offsets == {}
    assert merged.applied == []
    assert merged.skipped == 2
    assert merged.event_counts() == {}


def test_duplicate_offset_inside_one_batch_applies_once() -> None:
    events = [ev("u1", "a", 3), ev("u1", "a", 3), ev("u1", "b", 4)]

    merged = merge_events({}, {}, events, 10)

    assert merged.sequences == {"u1": ["a", "b"]}
    assert merged.skipped == 1


def test_partitions_have_independent_offsets() -> None:
    # u1 lives on partition 0, u2 on partition 1; the same offset numbers on both.
    events = [
        ev("u1", "p0-5", 5, partition=0),
        ev("u2", "p1-5", 5, partition=1),
        ev("u1", "p0-6", 6, partition=0),
        ev("u2", "p1-6", 6, partition=1),
        ev("u3", "p2-0", 0, partition=2),
    ]

    merged = merge_events({0: 5, 1: 4}, {}, events, 10)

    assert merged.sequences == {"u1": ["p0-6"], "u2": ["p1-5", "p1-6"], "u3": ["p2-0"]}
    assert merged.offsets == {0: 6, 1: 6, 2: 0}
    assert merged.skipped == 1


def test_caps_at_max_len_keeping_the_newest() -> None:
    events = [ev("u1", f"n{i}", i) for i in range(4)]

    merged = merge_events({}, {"u1": ["s0", "s1", "s2"], "u2": ["t0", "t1", "t2", "t3"]}, events, 3)

    assert merged.sequences == {"u1": ["n1", "n2", "n3"]}
    # An untouched user keeps its stored sequence, even one longer than max_len.
    assert "u2" not in merged.sequences


def test_event_counts_count_applied_events_per_user() -> None:
    events = [ev("u1", "a", 0), ev("u2", "b", 1), ev("u1", "a", 2), ev("u1", "c", 3)]

    merged = merge_events({0: 0}, {}, events, 2)

    assert merged.event_counts() == {"u1": 2, "u2": 1}
    assert merged.sequences["u1"] == ["a", "c"]  # the count is not capped, the items are


def test_event_types_follow_their_items_through_the_cap() -> None:
    kinds = ["purchase", "view", "add_to_cart", "click"]
    events = [click_event("u1", f"n{i}", i, 0, kind) for i, kind in enumerate(kinds)]
    events.append(click_event("u2", "x", 4, 0, "click"))

    merged = merge_events({}, {"u1": ["s0", "s1"], "u2": ["t0"]}, events, 5, {"u1": "21"})

    assert merged.sequences["u1"] == ["s1", "n0", "n1", "n2", "n3"]
    assert merged.types == {"u1": "14132", "u2": "02"}  # u2's stored type was not known


def test_stored_types_are_read_only_when_written_at_the_rows_event_count() -> None:
    items = ["a", "b", "c"]
    assert stored_types(items, 7, {"at": 7, "codes": "123"}) == "123"
    # Code from before event types appended items and counted events, not types.
    assert stored_types(items, 8, {"at": 7, "codes": "123"}) == "000"
    assert stored_types(items, 7, None) == "000"
    assert stored_types(items, 7, {"at": 7, "codes": "12"}) == "000"


def test_stored_sequences_are_not_modified() -> None:
    stored = {"u1": ["a"]}

    merge_events({}, stored, [ev("u1", "b", 0)], 5)

    assert stored == {"u1": ["a"]}


def test_rejects_a_max_len_below_one() -> None:
    with pytest.raises(ValueError, match="max_len"):
        merge_events({}, {}, [], 0)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg2://app:s3cr%40t@db:5432/rec",
            "postgresql+psycopg2://app:***@db:5432/rec",
        ),
        (
            "postgresql://app@db/rec?sslpassword=s3cr3t",
            "postgresql://app@db/rec?sslpassword=%2A%2A%2A",
        ),
        ("sqlite:///var/recstream.db", "sqlite:///var/recstream.db"),
        ("not a url s3cr3t", "<invalid database URL>"),
    ],
)
def test_redacted_hides_passwords(url: str, expected: str) -> None:
    assert redacted(url) == expected
