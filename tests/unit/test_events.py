"""Decoding of raw records into events or rejections, and the JSON contracts (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_worker.events import (
    EVENT_TYPES,
    ClickEvent,
    DecodeLimits,
    Reason,
    Rejected,
    dead_letter_value,
    decode_event,
    event_value,
    load_schema,
    recommendation_value,
)
from stream_worker.settings import WorkerSettings

NOW = 1_700_000_000_000
DAY_MS = 24 * 3600 * 1000
LIMITS = DecodeLimits(ts_past_window_ms=DAY_MS, ts_future_window_ms=60_000)
TOPIC = "clickstream"

EVENT_SCHEMA = Draft202012Validator(load_schema("event"))
RECOMMENDATION_SCHEMA = Draft202012Validator(load_schema("recommendation"))
DEAD_LETTER_SCHEMA = Draft202012Validator(load_schema("dead_letter"))


def doc(**changes: Any) -> dict[str, Any]:
    """A valid event document with ``changes`` applied (a value of ``...`` deletes)."""
    base: dict[str, Any] = {
        "event_id": "e-1",
        "user_id": "u-1",
        "item_id": "i-1",
        "event_type": "click",
        "ts": NOW - 1000,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not ...}


def encode(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")


def decode(
    value: bytes | None, key: bytes | None = b"u-1", limits: DecodeLimits = LIMITS
) -> ClickEvent | Rejected:
    return decode_event(value, key, partition=3, offset=42, now_ms=NOW, limits=limits)


def rejected(value: bytes | None, key: bytes | None = b"u-1", **kwargs: Any) -> Rejected:
    result = decode(value, key, **kwargs)
    assert isinstance(result, Rejected), result
    assert result.original == (value or b"")
    assert (result.key, result.partition, result.offset) == (key, 3, 42)
    return result


# --- valid events ---------------------------------------------------------------------


def test_valid_event_decodes_to_the_exact_click_event() -> None:
    assert decode(encode(doc())) == ClickEvent(
        event_id="e-1",
        user_id="u-1",
        item_id="i-1",
        event_type="click",
        ts=NOW - 1000,
        partition=3,
        offset=42,
    )


def test_extra_fields_are_ignored() -> None:
    value = encode(doc(session={"id": [1, 2, None]}, price=9.99, ts_str="yesterday"))
    assert decode(value) == decode(encode(doc()))


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    result = decode(encode(doc(event_type=event_type)))
    assert isinstance(result, ClickEvent) and result.event_type == event_type


def test_non_ascii_ids_with_the_matching_key_are_accepted() -> None:
    value = json.dumps(doc(user_id="ユーザー", item_id="café")).encode("utf-8")
    result = decode(value, key="ユーザー".encode())
    assert isinstance(result, ClickEvent)
    assert (result.user_id, result.item_id) == ("ユーザー", "café")


def test_no_key_is_accepted_and_boundaries_are_inclusive() -> None:
    assert isinstance(decode(encode(doc()), key=None), ClickEvent)
    longest = "x" * LIMITS.max_id_length
    assert isinstance(decode(encode(doc(item_id=longest))), ClickEvent)
    for ts in (NOW - LIMITS.ts_past_window_ms, NOW + LIMITS.ts_future_window_ms):
        assert isinstance(decode(encode(doc(ts=ts))), ClickEvent)


def test_event_value_round_trips_and_matches_the_schema() -> None:
    value = event_value("e-9", "ü-7", "i-3", "purchase", NOW)
    assert (
        value
        == (
            '{"event_id":"e-9","user_id":"ü-7","item_id":"i-3","event_type":"purchase",'
            '"ts":1700000000000}'
        ).encode()
    )
    EVENT_SCHEMA.validate(json.loads(value))
    assert decode(value, key="ü-7".encode()) == ClickEvent(
        "e-9", "ü-7", "i-3", "purchase", NOW, partition=3, offset=42
    )


# --- each rejection reason ------------------------------------------------------------

CASES: list[tuple[str, bytes | None, bytes | None, Reason, str]] = [
    ("tombstone", None, b"u-1", Reason.missing_value, "no value"),
    ("over limit", b" " * 65537, b"u-1", Reason.payload_too_large, "65537 bytes"),
    ("bad utf-8", b'{"event_id": "\xff"}', b"u-1", Reason.invalid_utf8, "byte 14"),
    ("utf-16", encode(doc()).decode().encode("utf-16"), b"u-1", Reason.invalid_utf8, "UTF-8"),
    ("truncated", encode(doc())[:-1], b"u-1", Reason.not_json, "not valid JSON"),
    ("empty", b"", b"u-1", Reason.not_json, "not valid JSON"),
    ("trailing", encode(doc()) + b"{}", b"u-1", Reason.not_json, "Extra data"),
    ("nan", encode(doc()).replace(b"}", b', "x": NaN}'), b"u-1", Reason.not_json, "NaN"),
    ("bom", b"\xef\xbb\xbf" + encode(doc()), b"u-1", Reason.not_json, "not valid JSON"),
    ("array", b"[1, 2]", b"u-1", Reason.not_object, "got array"),
    ("string", b'"click"', b"u-1", Reason.not_object, "got string"),
    ("null", b"null", b"u-1", Reason.not_object, "got null"),
    ("no ts", encode(doc(ts=...)), b"u-1", Reason.missing_field, "'ts'"),
    ("no ids", encode({"ts": NOW}), b"u-1", Reason.missing_field, "'event_id', 'user_id'"),
    ("int id", encode(doc(user_id=42)), b"u-1", Reason.wrong_type, "'user_id' must be a str"),
    ("bool id", encode(doc(item_id=True)), b"u-1", Reason.wrong_type, "got boolean"),
    ("null id", encode(doc(event_id=None)), b"u-1", Reason.wrong_type, "got null"),
    ("int type", encode(doc(event_type=1)), b"u-1", Reason.wrong_type, "'event_type'"),
    (
        "str ts",
        encode(doc(ts="1700000000000")),
        b"u-1",
        Reason.wrong_type,
        "field 'ts' must be an integer (ms since epoch), got string",
    ),
    ("bool ts", encode(doc(ts=True)), b"u-1", Reason.wrong_type, "got boolean"),
    ("float ts", encode(doc(ts=float(NOW))), b"u-1", Reason.wrong_type, "got number"),
    (
        "exp ts",
        encode(doc()).replace(str(NOW - 1000).encode(), b"1.699999999e12"),
        b"u-1",
        Reason.wrong_type,
        "got number",
    ),
    ("nul id", encode(doc(item_id="a\x00b")), b"u-1", Reason.wrong_type, "NUL"),
    ("empty id", encode(doc(event_id="")), b"u-1", Reason.empty_id, "'event_id'"),
    ("blank id", encode(doc(user_id=" \t\u3000")), b"u-1", Reason.empty_id, "'user_id'"),
    ("long id", encode(doc(item_id="x" * 129)), b"u-1", Reason.id_too_long, "129 characters"),
    ("surrogate", encode(doc(item_id="a\ud800")), b"u-1", Reason.invalid_utf8, "surrogate"),
    ("like", encode(doc(event_type="like")), b"u-1", Reason.unknown_event_type, "'like'"),
    ("case", encode(doc(event_type="Click")), b"u-1", Reason.unknown_event_type, "'Click'"),
    ("old", encode(doc(ts=NOW - DAY_MS - 1)), b"u-1", Reason.ts_out_of_window, "outside"),
    ("future", encode(doc(ts=NOW + 60_001)), b"u-1", Reason.ts_out_of_window, "outside"),
    ("negative", encode(doc(ts=-1)), b"u-1", Reason.ts_out_of_window, "is -1 ms"),
    ("seconds", encode(doc(ts=NOW // 1000)), b"u-1", Reason.ts_out_of_window, "outside"),
    ("huge ts", encode(doc(ts=10**30)), b"u-1", Reason.ts_out_of_window, "outside"),
    ("other key", encode(doc()), b"u-2", Reason.key_mismatch, "b'u-2'"),
    ("empty key", encode(doc()), b"", Reason.key_mismatch, "user_id 'u-1'"),
]


@pytest.mark.parametrize(
    ("value", "key", "reason", "in_detail"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_rejection_has_its_exact_reason(
    value: bytes | None, key: bytes | None, reason: Reason, in_detail: str
) -> None:
    result = rejected(value, key)
    assert result.reason is reason
    assert in_detail in result.detail
    assert "\n" not in result.detail and len(result.detail) < 400


def test_every_reason_is_covered_by_a_case() -> None:
    assert {case[3] for case in CASES} == set(Reason)


def test_first_failing_check_wins() -> None:
    # Both a mistyped ts and an unknown event type: types are checked first.
    assert rejected(encode(doc(ts="x", event_type="like"))).reason is Reason.wrong_type
    # Blank id and a wrong key: the id check comes first.
    assert rejected(encode(doc(item_id=" ")), key=b"nobody").reason is Reason.empty_id


def test_deeply_nested_json_is_rejected_not_a_crash() -> None:
    roomy = DecodeLimits(max_payload_bytes=1_000_000)
    assert rejected(b"[" * 100_000, limits=roomy).reason is Reason.not_json
    assert rejected(b"[" * 100_000 + b"]" * 100_000, limits=roomy).reason is Reason.not_json
    nested = b'{"a":' * 10_000 + b"1" + b"}" * 10_000  # fits the default 64 KiB
    result = rejected(nested, limits=DecodeLimits())
    assert (result.reason, result.detail) == (
        Reason.not_json,
        "payload is nested too deeply to parse as JSON",
    )
    # The default size limit stops 100k brackets before any parsing.
    assert rejected(b"[" * 100_000, limits=DecodeLimits()).reason is Reason.payload_too_large


def test_ten_megabyte_payload_is_rejected_before_parsing() -> None:
    value = b'{"event_id": "' + b"x" * 10_000_000 + b'"}'
    result = rejected(value)
    assert result.reason is Reason.payload_too_large
    assert result.detail == "payload is 10000016 bytes, over the limit of 65536 bytes"
    assert result.original is value


def test_enormous_integers_are_rejected_with_a_bounded_detail() -> None:
    digits_4000 = encode(doc()).replace(str(NOW - 1000).encode(), b"9" * 4000)
    result = rejected(digits_4000)
    assert result.reason is Reason.ts_out_of_window
    assert len(result.detail) < 300
    # Past Python's int-conversion limit (4300 digits) the parser itself refuses.
    digits_5000 = encode(doc()).replace(str(NOW - 1000).encode(), b"9" * 5000)
    assert rejected(digits_5000).reason is Reason.not_json
    negative = encode(doc(ts=-(10**40)))
    assert rejected(negative).reason is Reason.ts_out_of_window


def test_limits_come_from_the_worker_settings() -> None:
    worker = WorkerSettings(max_id_length=16, ts_past_window_s=60, ts_future_window_s=5)
    limits = DecodeLimits.from_settings(worker)
    assert limits == DecodeLimits(
        max_id_length=16, ts_past_window_ms=60_000, ts_future_window_ms=5_000
    )
    assert rejected(encode(doc(item_id="x" * 17)), limits=limits).reason is Reason.id_too_long
    defaults = DecodeLimits.from_settings(WorkerSettings())
    assert defaults == DecodeLimits()
    with pytest.raises(ValueError, match="max_id_length"):
        DecodeLimits(max_id_length=0)


# --- dead letters and recommendations -------------------------------------------------


def test_dead_letter_round_trips_invalid_utf8_exactly() -> None:
    original = b'{"user_id": "\xc3\x28", "x": "\x00\xff"}'
    result = rejected(original, key=b"\xfe\x00k")
    value = dead_letter_value(result, TOPIC, now_ms=NOW + 5)
    letter = json.loads(value)
    DEAD_LETTER_SCHEMA.validate(letter)
    assert base64.b64decode(letter["original_b64"], validate=True) == original
    assert base64.b64decode(letter["key_b64"], validate=True) == b"\xfe\x00k"
    assert letter == {
        "reason": "invalid_utf8",
        "detail": result.detail,
        "topic": TOPIC,
        "partition": 3,
        "offset": 42,
        "key_b64": letter["key_b64"],
        "original_b64": letter["original_b64"],
        "original_text": None,
        "original_size": len(original),
        "original_sha256": hashlib.sha256(original).hexdigest(),
        "truncated": False,
        "failed_ts": NOW + 5,
    }
    assert value == dead_letter_value(result, TOPIC, now_ms=NOW + 5)  # deterministic
    assert value == json.dumps(letter, separators=(",", ":")).encode()  # compact


def test_dead_letter_text_copy_only_for_short_utf8() -> None:
    short = "é" * 4096  # 4096 characters, 8192 bytes
    letter = json.loads(dead_letter_value(rejected(short.encode()), TOPIC, NOW))
    assert letter["reason"] == "not_json" and letter["original_text"] == short
    longer = ("x" * 4097).encode()
    letter = json.loads(dead_letter_value(rejected(longer), TOPIC, NOW))
    assert letter["original_text"] is None
    assert base64.b64decode(letter["original_b64"]) == longer


def test_dead_letter_of_a_tombstone_without_key() -> None:
    letter = json.loads(dead_letter_value(rejected(None, key=None), TOPIC, NOW))
    DEAD_LETTER_SCHEMA.validate(letter)
    assert (letter["reason"], letter["key_b64"], letter["original_b64"]) == (
        "missing_value",
        None,
        "",
    )


def test_recommendation_value_matches_its_schema() -> None:
    value = recommendation_value(
        "ユーザー",
        [("i-1", 0.123456789), ("café", -2), ("i-3", 1e-9)],
        model_version="20240101-000000",
        index_version="20240101-000000",
        source_event_id="e-1",
        event_ts=NOW,
        produced_ts=NOW + 7,
        source_partition=3,
        source_offset=41,
    )
    message = json.loads(value)
    RECOMMENDATION_SCHEMA.validate(message)
    assert message == {
        "user_id": "ユーザー",
        "items": [
            {"item_id": "i-1", "score": 0.123457},
            {"item_id": "café", "score": -2.0},
            {"item_id": "i-3", "score": 0.0},
        ],
        "model_version": "20240101-000000",
        "index_version": "20240101-000000",
        "source_event_id": "e-1",
        "event_ts": NOW,
        "produced_ts": NOW + 7,
        "source_partition": 3,
        "source_offset": 41,
    }
    assert all(type(item["score"]) is float for item in message["items"])
    assert "ユーザー".encode() in value  # UTF-8, not escaped
    empty = json.loads(recommendation_value("u", [], "m", "i", "e", NOW, NOW, 0, 0))
    RECOMMENDATION_SCHEMA.validate(empty)


def test_recommendation_refuses_a_nan_score() -> None:
    with pytest.raises(ValueError):
        recommendation_value("u", [("i", float("nan"))], "m", "i", "e", NOW, NOW, 0, 0)


def test_schemas_agree_with_the_code() -> None:
    event = load_schema("event.schema.json")
    assert event["properties"]["event_type"]["enum"] == list(EVENT_TYPES)
    assert event["additionalProperties"] is True
    assert event["properties"]["user_id"]["maxLength"] == DecodeLimits().max_id_length
    dead = load_schema("dead_letter")
    assert dead["properties"]["reason"]["enum"] == [reason.value for reason in Reason]
    for schema in (event, load_schema("recommendation"), dead):
        Draft202012Validator.check_schema(schema)
        assert schema["$id"] and schema["title"] and schema["description"]
    assert load_schema("recommendation")["additionalProperties"] is False
    assert dead["additionalProperties"] is False
    with pytest.raises(ValueError, match="no schema"):
        load_schema("../settings")


# --- properties -----------------------------------------------------------------------

KEYS = st.none() | st.binary(max_size=12) | st.just(b"u-1")


def check_outcome(value: bytes, key: bytes | None, limits: DecodeLimits = LIMITS) -> None:
    """decode_event returns one of its two types; a rejection makes a valid dead letter."""
    result = decode_event(value, key, 0, 7, NOW, limits)
    assert isinstance(result, ClickEvent | Rejected)
    if isinstance(result, Rejected):
        assert isinstance(result.reason, Reason) and result.detail
        letter = json.loads(dead_letter_value(result, TOPIC, NOW))
        DEAD_LETTER_SCHEMA.validate(letter)
        assert base64.b64decode(letter["original_b64"]) == value
        assert (letter["key_b64"] is None) == (key is None)


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=300), key=KEYS)
def test_arbitrary_bytes_never_raise(value: bytes, key: bytes | None) -> None:
    check_outcome(value, key, DecodeLimits(max_payload_bytes=200))


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


@settings(max_examples=100, deadline=None)
@given(
    document=JSON_VALUES
    | st.dictionaries(
        st.sampled_from(["event_id", "user_id", "item_id", "event_type", "ts"]), JSON_VALUES
    ),
    key=KEYS,
    noise=st.binary(max_size=3),
)
def test_arbitrary_json_never_raises(document: Any, key: bytes | None, noise: bytes) -> None:
    value = json.dumps(document).encode()
    check_outcome(value, key)
    check_outcome(value[: len(value) // 2] + noise, key)


REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")
IDS = st.text(min_size=1, max_size=12)
TRICKY_IDS = (
    st.just("")
    | st.text(alphabet=" \t\n\r\u00a0\u2003\u3000\x1c", min_size=1, max_size=4)
    | st.text(min_size=127, max_size=131)
    | st.builds(lambda a, b: a + "\x00" + b, IDS, IDS)
    | st.builds(lambda a, s: a + s, IDS, st.characters(categories=["Cs"]))
)
TS_EDGES = (
    NOW - LIMITS.ts_past_window_ms,
    NOW + LIMITS.ts_future_window_ms,
    NOW - LIMITS.ts_past_window_ms - 1,
    NOW + LIMITS.ts_future_window_ms + 1,
)
TS_ANY = (
    st.integers(NOW - LIMITS.ts_past_window_ms, NOW + LIMITS.ts_future_window_ms)
    | st.sampled_from(TS_EDGES)
    | st.integers()
    | st.sampled_from(TS_EDGES).map(float)
)
EVENT_TYPE_ANY = st.sampled_from(EVENT_TYPES) | st.sampled_from(["View", "", "like", " view"])


JUNK = (
    JSON_SCALARS
    | st.lists(JSON_SCALARS, max_size=2)
    | st.dictionaries(st.text(max_size=3), JSON_SCALARS)
)
NEAR_MISSES = {
    "event_id": TRICKY_IDS,
    "user_id": TRICKY_IDS,
    "item_id": TRICKY_IDS,
    "event_type": EVENT_TYPE_ANY,
    "ts": TS_ANY,
}


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[dict[str, Any], bytes | None]:
    """A valid event with up to two mutations (mostly near misses), extras and a key."""
    document: dict[str, Any] = {
        "event_id": draw(IDS),
        "user_id": draw(IDS),
        "item_id": draw(IDS),
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "ts": draw(st.integers(NOW - LIMITS.ts_past_window_ms, NOW + LIMITS.ts_future_window_ms)),
    }
    for field in draw(st.lists(st.sampled_from(REQUIRED), max_size=2)):
        kind = draw(st.sampled_from(["near miss", "near miss", "junk", "delete"]))
        if kind == "delete":
            document.pop(field, None)
        else:
            document[field] = draw(NEAR_MISSES[field] if kind == "near miss" else JUNK)
    extras = draw(st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=2))
    for name, extra in extras.items():
        document.setdefault(name, extra)
    user_id = document.get("user_id")
    matching = user_id.encode("utf-8", "surrogatepass") if isinstance(user_id, str) else b"u"
    key = draw(st.sampled_from([matching, matching, None, matching + b"!", b""]))
    return document, key


def worker_only_checks_pass(document: dict[str, Any], key: bytes | None, value: bytes) -> bool:
    """What the worker checks beyond event.schema.json (assumes the schema passed)."""
    ids = [document[name] for name in ("event_id", "user_id", "item_id")]
    ts = document["ts"]
    return (
        len(value) <= LIMITS.max_payload_bytes
        and type(ts) is int  # JSON Schema counts 1.0 as an integer; the worker does not
        and NOW - LIMITS.ts_past_window_ms <= ts <= NOW + LIMITS.ts_future_window_ms
        and not any(ident.isspace() for ident in ids)
        and not any("\ud800" <= char <= "\udfff" for ident in ids for char in ident)
        and (key is None or key == document["user_id"].encode("utf-8"))
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=mutated_records(), ascii_only=st.booleans())
def test_accepts_exactly_when_schema_and_worker_checks_pass(
    record: tuple[dict[str, Any], bytes | None], ascii_only: bool
) -> None:
    document, key = record
    # ensure_ascii=False plus surrogatepass writes lone surrogates as (invalid) UTF-8 bytes.
    value = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    expected = EVENT_SCHEMA.is_valid(document) and worker_only_checks_pass(document, key, value)
    result = decode_event(value, key, 1, 2, NOW, LIMITS)
    assert isinstance(result, ClickEvent) == expected, (result, document, key)
    if isinstance(result, ClickEvent):
        assert result == ClickEvent(
            document["event_id"],
            document["user_id"],
            document["item_id"],
            document["event_type"],
            document["ts"],
            partition=1,
            offset=2,
        )
