"""The event and recommendation contracts, and decoding of raw Kafka records.

Pure logic: no I/O beyond reading the packaged JSON Schema files, no Kafka imports.
:func:`decode_event` turns one raw record into a :class:`ClickEvent` or a
:class:`Rejected` (never raises); :func:`dead_letter_value` wraps a rejection for the
dead-letter topic with the exact original bytes; :func:`recommendation_value` and
:func:`event_value` are the canonical encodings of the messages recstream writes.
The same contracts are published as JSON Schema files (:func:`load_schema`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any

from model.sequences import EVENT_TYPES  # one list for the model and the events

if TYPE_CHECKING:
    from stream_worker.settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class ClickEvent:
    """A validated clickstream event and where it came from."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts: int  # ms since epoch
    partition: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Bounds that :func:`decode_event` enforces beyond the JSON shape.

    The ts window defaults equal :class:`~stream_worker.settings.WorkerSettings`'s
    (365 days back, 5 minutes ahead); build it with :meth:`from_settings` in the worker.
    """

    max_id_length: int = 128
    max_payload_bytes: int = 65536
    ts_past_window_ms: int = 365 * 24 * 3600 * 1000
    ts_future_window_ms: int = 300 * 1000

    def __post_init__(self) -> None:
        if self.max_id_length < 1:
            raise ValueError(f"max_id_length must be at least 1, got {self.max_id_length}")
        if self.max_payload_bytes < 1:
            raise ValueError(f"max_payload_bytes must be at least 1, got {self.max_payload_bytes}")
        if self.ts_past_window_ms < 0 or self.ts_future_window_ms < 0:
            raise ValueError(
                "ts windows must not be negative, got "
                f"past={self.ts_past_window_ms} future={self.ts_future_window_ms}"
            )

    @classmethod
    def from_settings(cls, worker_settings: WorkerSettings) -> DecodeLimits:
        """Limits from the worker settings (``max_id_length``, ``ts_*_window_s``).

        Duck-typed: any object with those attributes works; ``max_payload_bytes`` is
        taken from it when present, else the default.
        """
        max_payload = getattr(worker_settings, "max_payload_bytes", None)
        return cls(
            max_id_length=int(worker_settings.max_id_length),
            max_payload_bytes=65536 if max_payload is None else int(max_payload),
            ts_past_window_ms=int(worker_settings.ts_past_window_s) * 1000,
            ts_future_window_ms=int(worker_settings.ts_future_window_s) * 1000,
        )


class Reason(StrEnum):
    """Why a record went to the dead-letter topic (the ``reason`` field there)."""

    payload_too_large = "payload_too_large"
    invalid_utf8 = "invalid_utf8"
    not_json = "not_json"
    not_object = "not_object"
    missing_field = "missing_field"
    wrong_type = "wrong_type"
    empty_id = "empty_id"
    id_too_long = "id_too_long"
    unknown_event_type = "unknown_event_type"
    ts_out_of_window = "ts_out_of_window"
    key_mismatch = "key_mismatch"
    missing_value = "missing_value"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that is not a valid event, with the exact original bytes and origin."""

    reason: Reason
    detail: str  # one human sentence naming the field and what was wrong
    original: bytes  # b"" when the record had no value (tombstone)
    key: bytes | None
    partition: int
    offset: int


_REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")
_ID_FIELDS = ("event_id", "user_id", "item_id")
_STRING_FIELDS = ("event_id", "user_id", "item_id", "event_type")
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)
_ORIGINAL_TEXT_MAX_CHARS = 4096
# A dead letter must fit in one Kafka record: brokers and producers refuse records over
# 1 MiB by default (message.max.bytes, max.request.size), and base64 grows bytes by 4/3.
# A bigger copy would fail to publish and stop the worker on that record at every restart.
DEAD_LETTER_MAX_VALUE_COPY = 384 * 1024
DEAD_LETTER_MAX_KEY_COPY = 64 * 1024
_SHOW_MAX = 80


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


# One decoder for all records: json.loads(..., parse_constant=...) would build one per call.
# parse_constant makes NaN/Infinity/-Infinity (accepted by Python, not by JSON) an error.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: str | bytes | int) -> str:
    """An ASCII-safe, bounded rendering of user input for a detail sentence."""
    if isinstance(value, str | bytes) and len(value) > _SHOW_MAX:
        return ascii(value[:_SHOW_MAX]) + f"... ({len(value)} long)"
    text = ascii(value)
    return text if len(text) <= _SHOW_MAX else f"{text[:_SHOW_MAX]}... ({len(text)} digits)"


def decode_event(
    value: bytes | None,
    key: bytes | None,
    partition: int,
    offset: int,
    now_ms: int,
    limits: DecodeLimits,
) -> ClickEvent | Rejected:
    """Decode and validate one record value; never raises on any input bytes.

    Checks, in order: a value at all, size (before parsing), strict UTF-8, JSON
    (NaN/Infinity and nesting past the interpreter's limit count as not JSON), a top-level
    object, the required fields, their types (ids and event_type strings; ts an integer,
    not a boolean or float), ids not empty or whitespace-only, ids at most
    ``max_id_length`` characters, ids encodable as UTF-8 and free of NUL, a known
    event_type, ts within ``[now - past, now + future]``, and a key (when present) equal
    to the UTF-8 bytes of user_id. Extra fields are ignored.
    """

    def reject(reason: Reason, detail: str) -> Rejected:
        return Rejected(reason, detail, value or b"", key, partition, offset)

    if value is None:
        return reject(
            Reason.missing_value, "record has no value (a tombstone); expected a JSON event"
        )
    size = len(value)
    if size > limits.max_payload_bytes:
        return reject(
            Reason.payload_too_large,
            f"payload is {size} bytes, over the limit of {limits.max_payload_bytes} bytes",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(
            Reason.invalid_utf8,
            f"payload is not valid UTF-8 at byte {exc.start}: {exc.reason}",
        )
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        return reject(Reason.not_json, "payload is nested too deeply to parse as JSON")
    except ValueError as exc:
        return reject(Reason.not_json, f"payload is not valid JSON: {exc}")
    if type(doc) is not dict:
        return reject(Reason.not_object, f"payload must be a JSON object, got {_json_type(doc)}")

    missing = [name for name in _REQUIRED if name not in doc]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        noun = "field" if len(missing) == 1 else "fields"
        return reject(Reason.missing_field, f"required {noun} {names} missing")
    for name in _STRING_FIELDS:
        field = doc[name]
        if type(field) is not str:
            return reject(
                Reason.wrong_type, f"field {name!r} must be a string, got {_json_type(field)}"
            )
    ts = doc["ts"]
    if type(ts) is not int:
        return reject(
            Reason.wrong_type,
            f"field 'ts' must be an integer (ms since epoch), got {_json_type(ts)}",
        )

    event_id: str = doc["event_id"]
    user_id: str = doc["user_id"]
    item_id: str = doc["item_id"]
    event_type: str = doc["event_type"]
    max_len = limits.max_id_length
    for name, ident in (("event_id", event_id), ("user_id", user_id), ("item_id", item_id)):
        if not ident or ident.isspace():
            return reject(Reason.empty_id, f"field {name!r} must not be empty or only whitespace")
        if len(ident) > max_len:
            return reject(
                Reason.id_too_long,
                f"field {name!r} is {len(ident)} characters, over the limit of {max_len}",
            )
        if not ident.isascii():
            try:
                ident.encode("utf-8")
            except UnicodeEncodeError:
                return reject(
                    Reason.invalid_utf8,
                    f"field {name!r} contains an unpaired surrogate escape, "
                    "which is not encodable as UTF-8",
                )
        if "\x00" in ident:
            return reject(
                Reason.wrong_type, f"field {name!r} must be a string without NUL (U+0000)"
            )
    if event_type not in _EVENT_TYPE_SET:
        return reject(
            Reason.unknown_event_type,
            f"field 'event_type' must be one of {', '.join(EVENT_TYPES)}, got {_show(event_type)}",
        )
    lowest = now_ms - limits.ts_past_window_ms
    highest = now_ms + limits.ts_future_window_ms
    if not lowest <= ts <= highest:
        return reject(
            Reason.ts_out_of_window,
            f"field 'ts' is {_show(ts)} ms, outside the accepted window "
            f"[{lowest}, {highest}] around now ({now_ms})",
        )
    if key is not None and key != user_id.encode("utf-8"):
        return reject(
            Reason.key_mismatch,
            f"record key {_show(key)} is not the UTF-8 of user_id {_show(user_id)}; "
            "per-user order needs key = user id",
        )
    return ClickEvent(event_id, user_id, item_id, event_type, ts, partition, offset)


def _original_text(original: bytes) -> str | None:
    # At most 4096 characters means at most 4 * 4096 bytes of UTF-8: skip decoding more.
    if len(original) > 4 * _ORIGINAL_TEXT_MAX_CHARS:
        return None
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= _ORIGINAL_TEXT_MAX_CHARS else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dead_letter_value(rejected: Rejected, source_topic: str, now_ms: int) -> bytes:
    """The dead-letter record value for ``rejected`` (see ``dead_letter.schema.json``).

    ``original_b64`` holds the exact original bytes, and ``key_b64`` the exact key, up to
    :data:`DEAD_LETTER_MAX_VALUE_COPY` and :data:`DEAD_LETTER_MAX_KEY_COPY` bytes; a
    longer one is cut to that prefix and ``truncated`` is true, so the letter always fits
    in a default-sized Kafka record (under 1 MiB). ``original_size`` and
    ``original_sha256`` describe the whole original value either way. ``original_text``
    repeats the value as text for people when it is valid UTF-8 of at most 4096
    characters. The JSON is ASCII-only (non-ASCII escaped), so encoding it can never fail.
    """
    original, key = rejected.original, rejected.key
    truncated = len(original) > DEAD_LETTER_MAX_VALUE_COPY or (
        key is not None and len(key) > DEAD_LETTER_MAX_KEY_COPY
    )
    doc = {
        "reason": rejected.reason.value,
        "detail": rejected.detail,
        "topic": source_topic,
        "partition": rejected.partition,
        "offset": rejected.offset,
        "key_b64": None if key is None else _b64(key[:DEAD_LETTER_MAX_KEY_COPY]),
        "original_b64": _b64(original[:DEAD_LETTER_MAX_VALUE_COPY]),
        "original_text": _original_text(original),
        "original_size": len(original),
        "original_sha256": hashlib.sha256(original).hexdigest(),
        "truncated": truncated,
        "failed_ts": now_ms,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii")


def recommendation_value(
    user_id: str,
    items: Sequence[tuple[str, float]],
    model_version: str,
    index_version: str,
    source_event_id: str,
    event_ts: int,
    produced_ts: int,
    source_partition: int,
    source_offset: int,
) -> bytes:
    """The recommendation record value (see ``recommendation.schema.json``), UTF-8 JSON.

    ``source_partition``/``source_offset`` locate the answered event: a user's events
    share a partition, so a higher offset is always a newer state, even where a worker
    removed from its group published late (consumers keep the highest per user).

    Scores become Python floats rounded to 6 decimals; a NaN or infinite score raises
    ``ValueError`` (it would not be JSON).
    """
    doc = {
        "user_id": user_id,
        "items": [
            {"item_id": item_id, "score": round(float(score), 6)} for item_id, score in items
        ],
        "model_version": model_version,
        "index_version": index_version,
        "source_event_id": source_event_id,
        "event_ts": event_ts,
        "produced_ts": produced_ts,
        "source_partition": source_partition,
        "source_offset": source_offset,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def event_value(event_id: str, user_id: str, item_id: str, event_type: str, ts: int) -> bytes:
    """The canonical producer-side encoding of an input event: compact UTF-8 JSON."""
    doc = {
        "event_id": event_id,
        "user_id": user_id,
        "item_id": item_id,
        "event_type": event_type,
        "ts": ts,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_SCHEMAS = {
    "event": "event.schema.json",
    "recommendation": "recommendation.schema.json",
    "dead_letter": "dead_letter.schema.json",
}


def load_schema(name: str) -> dict[str, Any]:
    """A packaged JSON Schema: ``"event"``, ``"recommendation"`` or ``"dead_letter"``.

    The file name (``"event.schema.json"``) is accepted too; anything else raises
    ``ValueError``.
    """
    filename = _SCHEMAS.get(name, name)
    if filename not in _SCHEMAS.values():
        raise ValueError(f"no schema named {name!r}; known: {', '.join(_SCHEMAS)}")
    text = (resources.files("stream_worker") / "schemas" / filename).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
