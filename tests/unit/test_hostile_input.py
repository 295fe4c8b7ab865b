"""Hostile input: fuzzing of event decoding and bounds on what a bad record can cost.

``test_events.py`` fuzzes arbitrary bytes and JSON and checks every rejection reason;
this file goes after what an attacker (or a broken producer) would send on purpose:
nesting at every depth, invalid UTF-8 spliced into valid events, timestamps of any
size, payloads around and far past the size limit, and dead letters that must still
fit in one Kafka record. A million distinct users through a real worker:
``scripts/chaos.py users`` (``docs/reliability.md``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_worker.events import (
    DEAD_LETTER_MAX_KEY_COPY,
    DEAD_LETTER_MAX_VALUE_COPY,
    ClickEvent,
    DecodeLimits,
    Reason,
    Rejected,
    dead_letter_value,
    decode_event,
    event_value,
    load_schema,
)

NOW = 1_700_000_000_000
LIMITS = DecodeLimits()
ROOMY = DecodeLimits(max_payload_bytes=4 * 1024 * 1024)  # lets nesting reach the parser
DEAD_LETTER_SCHEMA = Draft202012Validator(load_schema("dead_letter"))
KAFKA_RECORD_LIMIT = 1024 * 1024  # message.max.bytes / max.request.size defaults
VALID = event_value("e-1", "u-1", "i-1", "click", NOW)


def decode(value: bytes | None, key: bytes | None = b"u-1", limits: DecodeLimits = LIMITS) -> Any:
    return decode_event(value, key, partition=0, offset=9, now_ms=NOW, limits=limits)


def nested(depth: int, opener: bytes, closer: bytes, inner: bytes = b"1") -> bytes:
    return opener * depth + inner + closer * depth


# --- nesting ---------------------------------------------------------------------------

BRACKETS = st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")])


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 200_000), pair=BRACKETS, closed=st.booleans())
def test_nesting_at_any_depth_is_rejected_or_parsed_never_raised(
    depth: int, pair: tuple[bytes, bytes], closed: bool
) -> None:
    opener, closer = pair
    value = nested(depth, opener, closer if closed else b"")
    result = decode(value, limits=ROOMY)
    assert isinstance(result, Rejected)
    if len(value) > ROOMY.max_payload_bytes:
        assert result.reason is Reason.payload_too_large
    elif depth > 5_000:  # past the interpreter's recursion limit, closed or not
        assert result.reason is Reason.not_json
    else:
        assert result.reason in {Reason.not_json, Reason.not_object, Reason.missing_field}


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 100_000))
def test_deep_nesting_in_an_extra_field_never_escapes(depth: int) -> None:
    document = VALID[:-1] + b',"extra":' + nested(depth, b"[", b"]") + b"}"
    result = decode(document, limits=ROOMY)
    if isinstance(result, Rejected):
        assert result.reason in {Reason.not_json, Reason.payload_too_large}
    else:  # shallow enough to parse: the extra field is ignored
        assert result == decode(VALID)


def test_nesting_is_safe_on_the_workers_batch_thread() -> None:
    """The worker decodes on its batch thread, whose stack is not the main thread's."""
    value = nested(60_000, b'{"a":', b"}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(decode, value, b"u-1", ROOMY).result()
        # The same thread goes on decoding: its stack came back whole.
        after = pool.submit(decode, VALID).result()
    assert isinstance(result, Rejected) and result.reason is Reason.not_json
    assert after == decode(VALID) and isinstance(after, ClickEvent)


# --- invalid UTF-8 ---------------------------------------------------------------------

INVALID_SEQUENCES = st.sampled_from(
    [b"\xff", b"\xfe", b"\xc0\xaf", b"\xe0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
)


@settings(max_examples=200, deadline=None)
@given(where=st.integers(0, len(VALID)), bad=INVALID_SEQUENCES)
def test_invalid_utf8_anywhere_in_an_event_is_invalid_utf8(where: int, bad: bytes) -> None:
    value = VALID[:where] + bad + VALID[where:]
    result = decode(value)
    assert isinstance(result, Rejected) and result.reason is Reason.invalid_utf8
    assert result.original == value
    letter = json.loads(dead_letter_value(result, "t", NOW))
    assert base64.b64decode(letter["original_b64"]) == value
    assert letter["original_text"] is None


@settings(max_examples=100, deadline=None)
@given(key=st.binary(min_size=1, max_size=40))
def test_a_key_that_is_not_utf8_is_a_key_mismatch_not_a_crash(key: bytes) -> None:
    result = decode(VALID, key=key)
    if key == b"u-1":
        assert isinstance(result, ClickEvent)
    else:
        assert isinstance(result, Rejected) and result.reason is Reason.key_mismatch
        assert result.detail.isascii() and len(result.detail) < 400


# --- timestamps ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    ts=st.integers()
    | st.integers(min_value=-(10**4000), max_value=10**4000)
    | st.sampled_from([-1, 0, -(2**63), 2**63 - 1, 2**63, 2**64, -(2**64)])
)
def test_timestamps_of_any_size_and_sign(ts: int) -> None:
    value = json.dumps({**json.loads(VALID), "ts": ts}).encode()
    result = decode(value)
    in_window = NOW - LIMITS.ts_past_window_ms <= ts <= NOW + LIMITS.ts_future_window_ms
    if len(str(abs(ts))) > 4300:  # past Python's int parsing limit: refused by the parser
        assert isinstance(result, Rejected) and result.reason is Reason.not_json
    elif in_window:
        assert isinstance(result, ClickEvent) and result.ts == ts
    else:
        assert isinstance(result, Rejected) and result.reason is Reason.ts_out_of_window
        assert len(result.detail) < 400 and "\n" not in result.detail


@settings(max_examples=100, deadline=None)
@given(ts=st.floats(allow_nan=False) | st.sampled_from(["1e400", "-1e400", "1.0", "-0.0"]))
def test_fractional_and_overflowing_numbers_are_the_wrong_type(ts: float | str) -> None:
    text = ts if isinstance(ts, str) else repr(ts).replace("inf", "1e400")
    value = VALID.replace(str(NOW).encode(), text.encode())
    result = decode(value)
    assert isinstance(result, Rejected) and result.reason is Reason.wrong_type


# --- size ------------------------------------------------------------------------------


def padded_event(size: int) -> bytes:
    """A valid event padded (with an ignored field) to exactly ``size`` bytes."""
    head = VALID[:-1] + b',"pad":"'
    return head + b"p" * (size - len(head) - 2) + b'"}'


def test_the_size_limit_is_exact() -> None:
    limit = LIMITS.max_payload_bytes
    assert isinstance(decode(padded_event(limit)), ClickEvent)
    result = decode(padded_event(limit + 1))
    assert isinstance(result, Rejected) and result.reason is Reason.payload_too_large


@settings(max_examples=25, deadline=None)
@given(
    value_size=st.integers(0, 8 * 1024 * 1024),
    key_size=st.integers(0, 2 * 1024 * 1024),
    reason=st.sampled_from(list(Reason)),
)
def test_every_dead_letter_fits_in_one_kafka_record(
    value_size: int, key_size: int, reason: Reason
) -> None:
    """Before the cap, a payload over ~786 KB made a letter over 1 MiB: publishing it
    failed and the worker stopped on that record at every restart."""
    original = bytes(range(256)) * (value_size // 256) + b"x" * (value_size % 256)
    key = b"k" * key_size
    rejected = Rejected(reason, "detail", original, key, 3, 4)
    letter_bytes = dead_letter_value(rejected, "clickstream", NOW)
    # The worker publishes the letter under the key capped the same way.
    record_key = key[:DEAD_LETTER_MAX_KEY_COPY]
    assert len(letter_bytes) + len(record_key) <= KAFKA_RECORD_LIMIT
    assert len(letter_bytes) < 700 * 1024
    letter = json.loads(letter_bytes)
    DEAD_LETTER_SCHEMA.validate(letter)
    copy = base64.b64decode(letter["original_b64"])
    truncated = value_size > DEAD_LETTER_MAX_VALUE_COPY or key_size > DEAD_LETTER_MAX_KEY_COPY
    assert letter["truncated"] is truncated
    assert copy == original[:DEAD_LETTER_MAX_VALUE_COPY]
    assert base64.b64decode(letter["key_b64"]) == key[:DEAD_LETTER_MAX_KEY_COPY]
    assert letter["original_size"] == value_size
    assert letter["original_sha256"] == hashlib.sha256(original).hexdigest()


# --- memory ----------------------------------------------------------------------------

WORST_CASES = {
    "64k empty arrays": b"[" + b"[]," * 21_000 + b"[]]",
    "64k small objects": b"[" + b"{}," * 21_000 + b"{}]",
    "64k escapes": b'{"x":"' + b"\\u00e9" * 10_000 + b'"}',
    "64k digits": b'{"x":' + b"9" * 4_300 + b"}",
    "32k deep": b"[" * 32_000 + b"]" * 32_000,
}


def test_one_hostile_payload_costs_a_few_megabytes_at_most() -> None:
    for name, value in WORST_CASES.items():
        assert len(value) <= LIMITS.max_payload_bytes, name
        tracemalloc.start()
        try:
            result = decode(value)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(result, Rejected), name
        assert peak < 8 * 1024 * 1024, (name, peak)


def test_decoding_keeps_no_state_per_user() -> None:
    """20,000 distinct users leave nothing behind (the worker's memory is the batch)."""
    tracemalloc.start()
    try:
        for n in range(2_000):  # warm up caches that are per process, not per user
            decode(event_value(f"e{n}", f"w{n}", "i", "view", NOW), key=f"w{n}".encode())
        before, _ = tracemalloc.get_traced_memory()
        for n in range(20_000):
            result = decode(event_value(f"e{n}", f"u{n}", "i", "view", NOW), key=f"u{n}".encode())
            assert isinstance(result, ClickEvent)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 256 * 1024
