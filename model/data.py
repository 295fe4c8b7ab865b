"""Interaction logs from files: loaders, chronological sequences and the leave-one-out split.

Each supported format is parsed line by line with plain ``str.split`` (no pandas), so a
million-line log loads in seconds. Bytes are decoded strictly: an id is never silently
altered by a replacement character, and an undecodable line is counted as malformed like
any other bad line. Malformed lines are skipped, counted and reported
("path:LINE: reason"); a file that yields nothing usable raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import functools
import gc
import importlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from model.errors import DataError
from model.sequences import EVENT_TYPES, type_codes

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = (
    "sasrec",
    "movielens-dat",
    "movielens-csv",
    "tsv",
    "recbole",
    "taobao",
    "yoochoose",
    "diginetica-views",
    "diginetica-purchases",
    "sessions",
    "csv",
    "parquet",
)

# Taobao UserBehavior codes. "fav" (adding to favourites) maps to "click": the event
# contract has no favourite type, and a favourite is a deliberate interest signal
# stronger than a page view but short of a cart addition.
TAOBAO_BEHAVIOURS: dict[str, str] = {
    "pv": "view",
    "fav": "click",
    "cart": "add_to_cart",
    "buy": "purchase",
}

# Logical column names of the generic readers (csv, tsv, parquet) and their defaults.
DEFAULT_COLUMNS: dict[str, str] = {
    "user": "user_id",
    "item": "item_id",
    "ts": "timestamp",
    "type": "event_type",
}

PAD_ITEM = "<pad>"
MAX_SKIPPED_EXAMPLES = 10
_SNIFF_BYTES = 64 * 1024
_SNIFF_LINES = 50
_TS_UNITS = ("s", "ms")
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)
_SESSION_SPLIT = re.compile(r"[\s,]+")


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user-item event."""

    user_id: str
    item_id: str
    ts_ms: int | None
    event_type: str


@dataclass
class InteractionLog:
    """The usable interactions of one file, in file order, plus what was skipped."""

    source: str
    format: str
    interactions: list[Interaction]
    lines_read: int
    skipped: int
    skipped_examples: list[str] = field(default_factory=list)

    def sequences(self) -> dict[str, list[str]]:
        """Per user, item ids in chronological order.

        Ties (equal or missing ts) keep file order (stable sort); users are in order of
        first appearance.
        """
        return {user: [x.item_id for x in group] for user, group in self._by_user.items()}

    def event_types(self) -> dict[str, list[str]]:
        """Per user, the event types of :meth:`sequences`' items, in the same order."""
        return {user: [x.event_type for x in group] for user, group in self._by_user.items()}

    @functools.cached_property
    def _by_user(self) -> dict[str, list[Interaction]]:
        """Each user's interactions in time order: grouped and sorted once, for both
        :meth:`sequences` and :meth:`event_types`."""
        groups: dict[str, list[Interaction]] = {}
        for inter in self.interactions:
            group = groups.get(inter.user_id)
            if group is None:
                groups[inter.user_id] = [inter]
            else:
                group.append(inter)
        return {user: _time_sorted(group) for user, group in groups.items()}

    def has_event_types(self) -> bool:
        """Whether the events differ in type (formats without types all read "view")."""
        first = self.interactions[0].event_type if self.interactions else None
        return any(x.event_type != first for x in self.interactions)

    def in_event_time_order(self) -> list[Interaction]:
        """All interactions sorted by ts, stably; without ts the file order is kept."""
        return _time_sorted(self.interactions)


def _time_sorted(interactions: list[Interaction]) -> list[Interaction]:
    """Stable sort by ts; an interaction without ts stays right after its predecessor.

    The loaders produce logs that are either fully timed or fully untimed; carrying the
    previous time forward only defines a sane order for hand-built mixed logs.
    """
    has_none = False
    has_ts = False
    for inter in interactions:
        if inter.ts_ms is None:
            has_none = True
        else:
            has_ts = True
        if has_none and has_ts:
            break
    if not has_ts:
        return list(interactions)
    if not has_none:
        return sorted(interactions, key=_ts_key)
    keys: list[float] = []
    last = -math.inf
    for inter in interactions:
        if inter.ts_ms is not None:
            last = inter.ts_ms
        keys.append(last)
    order = sorted(range(len(interactions)), key=keys.__getitem__)
    return [interactions[i] for i in order]


def _ts_key(inter: Interaction) -> int:
    assert inter.ts_ms is not None  # only called on fully timed lists
    return inter.ts_ms


def _interaction_builder() -> Callable[[str, str, int | None, str], Interaction]:
    """A constructor equivalent to ``Interaction(...)`` for the loaders' hot loops.

    The frozen dataclass ``__init__`` routes every field through ``object.__setattr__``,
    which costs about as much as parsing the line; writing the slots directly builds the
    same, equally immutable object about a third faster.
    """
    names = tuple(f.name for f in fields(Interaction))
    if names != ("user_id", "item_id", "ts_ms", "event_type"):
        raise AssertionError(f"_interaction_builder is out of date with Interaction: {names}")
    new = object.__new__
    set_user, set_item, set_ts, set_type = (getattr(Interaction, n).__set__ for n in names)

    def build(user_id: str, item_id: str, ts_ms: int | None, event_type: str) -> Interaction:
        obj = new(Interaction)
        set_user(obj, user_id)
        set_item(obj, item_id)
        set_ts(obj, ts_ms)
        set_type(obj, event_type)
        return obj

    return build


class _Malformed(Exception):
    """A line that cannot be used; the message is the reason shown to the operator."""


# A line parser appends zero or more interactions for one decoded line, or raises
# _Malformed. It gets the 1-based physical line number (session ids are built from it).
_LineParser = Callable[[str, int], None]


# --- format sniffing -----------------------------------------------------------------


def _formats_list() -> str:
    return ", ".join(FORMATS)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"Data file {path} does not exist.")
    if not path.is_file():
        raise DataError(f"Data file {path} is not a regular file.")


def _is_int(token: str) -> bool:
    return token.isdigit() or (token[:1] == "-" and token[1:].isdigit())


def _is_number(token: str) -> bool:
    try:
        return math.isfinite(float(token))
    except ValueError:
        return False


def _sniff(lines: list[str], suffix: str) -> str | None:
    first = lines[0]
    if suffix == ".inter":
        return "recbole"
    if "::" in first and len(first.split("::")) == 4:
        return "movielens-dat"
    tab_fields = [f.strip() for f in first.split("\t")]
    # RecBole atomic files name every column "name:type" (token, float, token_seq, ...).
    if len(tab_fields) > 1 and all(re.fullmatch(r"\w+:\w+", f) for f in tab_fields):
        return "recbole"
    comma_fields = [f.strip() for f in first.split(",")]
    if comma_fields[:2] == ["userId", "movieId"]:
        return "movielens-csv"
    if {"SessionId", "ItemId"} <= set(tab_fields):
        return "yoochoose"
    semi_fields = {f.strip() for f in first.split(";")}
    if {"session_id", "item_id", "timeframe", "eventdate"} <= semi_fields:
        return "diginetica-views"
    if {"sessionId", "itemId", "timeframe", "eventdate"} <= semi_fields:
        return "diginetica-purchases"

    def taobao_like(line: str) -> bool:
        f = line.split(",")
        return len(f) == 5 and f[3].strip() in TAOBAO_BEHAVIOURS and _is_number(f[4].strip())

    # One malformed line among the first ones must not defeat detection.
    if taobao_like(first) and sum(map(taobao_like, lines)) * 2 >= len(lines):
        return "taobao"
    if "\t" in first and {"user_id", "item_id"} <= set(tab_fields):
        return "tsv"
    if all("\t" not in ln and len(t := ln.split()) == 2 and all(map(_is_int, t)) for ln in lines):
        return "sasrec"

    def session_like(line: str) -> bool:
        if line.count("\t") > 1:
            return False
        tokens = [t for t in _SESSION_SPLIT.split(line) if t]
        return bool(tokens) and all(map(_is_int, tokens))

    if all(map(session_like, lines)):
        return "sessions"
    # A header line (no numeric field); the loader explains a needed column mapping.
    for sep, fmt in (("\t", "tsv"), (",", "csv"), (";", "csv")):
        names = [f.strip() for f in first.split(sep)]
        if len(names) > 1 and all(n and not _is_number(n) for n in names):
            return fmt
    return None


def detect_format(path: Path | str) -> str:
    """Name of the format of ``path``, from its extension and first lines.

    Raises :class:`DataError` for a missing or empty file, or when no format fits.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".parquet":
        return "parquet"
    try:
        with path.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"Data file {path} cannot be read: {exc.strerror or exc}.") from exc
    if head.startswith(b"PAR1"):
        return "parquet"
    # Sniffing only: replacement characters are harmless here, ids are decoded strictly later.
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    raw_lines = text.split("\n")
    if len(head) == _SNIFF_BYTES and len(raw_lines) > 1:
        raw_lines.pop()  # probably cut in the middle
    lines = [ln.rstrip("\r") for ln in raw_lines if ln.strip()][:_SNIFF_LINES]
    if not lines:
        raise DataError(f"Data file {path} is empty.")
    fmt = _sniff(lines, path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"Cannot tell the format of data file {path} from its name and first lines; "
            f"pass one of: {_formats_list()}."
        )
    return fmt


# --- value parsing -------------------------------------------------------------------


def _seconds_to_ms(value: str) -> int:
    try:
        return int(value) * 1000
    except ValueError:
        pass
    try:
        seconds = float(value)
    except ValueError:
        raise _Malformed(f"timestamp {value!r} is not a number") from None
    if not math.isfinite(seconds):
        raise _Malformed(f"timestamp {value!r} is not finite")
    return round(seconds * 1000)


def _generic_ts(value: str, unit: str) -> int:
    """A timestamp in ``unit`` (s or ms) or an ISO 8601 date-time (naive = UTC)."""
    value = value.strip()
    try:
        number = int(value)
    except ValueError:
        try:
            fnumber = float(value)
        except ValueError:
            return _iso_to_ms(value)
        if not math.isfinite(fnumber):
            raise _Malformed(f"timestamp {value!r} is not finite") from None
        return round(fnumber * 1000) if unit == "s" else round(fnumber)
    return number * 1000 if unit == "s" else number


def _iso_to_ms(value: str) -> int:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Malformed(f"timestamp {value!r} is neither a number nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _split_row(line: str, sep: str) -> list[str]:
    # Quotes are rare in interaction logs; only then pay for the csv module.
    if sep != "\t" and '"' in line:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


# --- header-based formats ------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a header-based format keeps its fields, and how times are encoded."""

    sep: str
    user: str
    item: str
    ts: str | None = None
    ts_required: bool = False
    ts_kind: str = "s"  # "s", "ms" or "diginetica" (date column + ms offset)
    date: str | None = None
    type_col: str | None = None
    type_required: bool = False
    fixed_type: str = "view"
    strip_types: bool = False  # recbole "name:type" headers


_LAYOUTS: dict[str, _Layout] = {
    "movielens-csv": _Layout(",", "userId", "movieId", "timestamp", ts_required=True),
    "recbole": _Layout("\t", "user_id", "item_id", "timestamp", strip_types=True),
    "yoochoose": _Layout("\t", "SessionId", "ItemId", "Time", ts_required=True),
    "diginetica-views": _Layout(
        ";", "session_id", "item_id", "timeframe", True, "diginetica", date="eventdate"
    ),
    "diginetica-purchases": _Layout(
        ";",
        "sessionId",
        "itemId",
        "timeframe",
        True,
        "diginetica",
        date="eventdate",
        fixed_type="purchase",
    ),
}


def _generic_layout(
    fmt: str, header: str, columns: Mapping[str, str] | None, ts_unit: str
) -> _Layout:
    explicit = dict(columns or {})
    unknown = sorted(set(explicit) - set(DEFAULT_COLUMNS))
    if unknown:
        raise DataError(
            f"Unknown column mapping key(s) {', '.join(unknown)} for format {fmt}; "
            f"use {', '.join(DEFAULT_COLUMNS)}."
        )
    names = {**DEFAULT_COLUMNS, **explicit}
    if fmt == "tsv":
        sep = "\t"
    elif "," in header or ("\t" not in header and ";" not in header):
        sep = ","
    else:
        sep = ";" if ";" in header else "\t"
    return _Layout(
        sep,
        names["user"],
        names["item"],
        names["ts"],
        ts_required="ts" in explicit,
        ts_kind=ts_unit,
        type_col=names["type"],
        type_required="type" in explicit,
    )


def _header_parser(
    path: Path,
    fmt: str,
    layout: _Layout,
    header: str,
    out: list[Interaction],
    generic: bool,
) -> _LineParser:
    fields = [f.strip() for f in _split_row(header, layout.sep)]
    if layout.strip_types:
        fields = [f.split(":", 1)[0] for f in fields]
    position = {name: i for i, name in reversed(list(enumerate(fields)))}

    def column(name: str | None, required: bool) -> int:
        if name is None:
            return -1
        if name in position:
            return position[name]
        if required:
            hint = " (map columns with the columns argument)" if generic else ""
            raise DataError(
                f"Data file {path} has no column {name!r} required by format {fmt}; "
                f"its header is {header.strip()!r}{hint}."
            )
        return -1

    ui = column(layout.user, True)
    ii = column(layout.item, True)
    ti = column(layout.ts, layout.ts_required)
    di = column(layout.date, layout.ts_kind == "diginetica")
    yi = column(layout.type_col, layout.type_required)
    n = len(fields)
    sep = layout.sep
    kind = layout.ts_kind
    fixed_type = layout.fixed_type
    intern: dict[str, str] = {}
    dates: dict[str, int] = {}
    append = out.append
    make = _interaction_builder()
    setdefault = intern.setdefault

    def day_ms(value: str) -> int:
        ms = dates.get(value)
        if ms is None:
            try:
                day = date.fromisoformat(value.strip())
            except ValueError:
                raise _Malformed(f"event date {value!r} is not YYYY-MM-DD") from None
            ms = round(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
            dates[value] = ms
        return ms

    def parse(line: str, lineno: int) -> None:
        f = _split_row(line, sep)
        if len(f) != n:
            raise _Malformed(f"expected {n} fields, got {len(f)}")
        user = f[ui].strip()
        if not user:
            raise _Malformed("empty user id")
        item = f[ii].strip()
        if not item:
            raise _Malformed("empty item id")
        ts: int | None = None
        if ti >= 0:
            if kind == "s" and not generic:
                ts = _seconds_to_ms(f[ti])
            elif kind == "diginetica":
                try:
                    offset = int(f[ti])
                except ValueError:
                    raise _Malformed(f"timeframe {f[ti]!r} is not an integer") from None
                ts = day_ms(f[di]) + offset
            else:
                ts = _generic_ts(f[ti], kind)
        event_type = fixed_type
        if yi >= 0:
            event_type = f[yi].strip()
            if event_type not in _EVENT_TYPE_SET:
                raise _Malformed(
                    f"unknown event type {event_type!r} (expected one of {', '.join(EVENT_TYPES)})"
                )
        append(make(setdefault(user, user), setdefault(item, item), ts, event_type))

    return parse


# --- headerless formats --------------------------------------------------------------


def _sasrec_parser(out: list[Interaction]) -> _LineParser:
    intern: dict[str, str] = {}
    setdefault = intern.setdefault
    append = out.append
    make = _interaction_builder()

    def parse(line: str, lineno: int) -> None:
        f = line.split()
        if len(f) != 2:
            raise _Malformed(f"expected 2 fields 'user item', got {len(f)}")
        append(make(setdefault(f[0], f[0]), setdefault(f[1], f[1]), None, "view"))

    return parse


def _movielens_dat_parser(out: list[Interaction]) -> _LineParser:
    intern: dict[str, str] = {}
    setdefault = intern.setdefault
    append = out.append
    make = _interaction_builder()

    def parse(line: str, lineno: int) -> None:
        f = line.split("::")
        if len(f) != 4:
            raise _Malformed(f"expected 4 fields 'user::item::rating::timestamp', got {len(f)}")
        user = f[0].strip()
        item = f[1].strip()
        if not user or not item:
            raise _Malformed("empty user id" if not user else "empty item id")
        ts = _seconds_to_ms(f[3])
        append(make(setdefault(user, user), setdefault(item, item), ts, "view"))

    return parse


def _taobao_parser(out: list[Interaction]) -> _LineParser:
    intern: dict[str, str] = {}
    setdefault = intern.setdefault
    append = out.append
    make = _interaction_builder()
    behaviours = TAOBAO_BEHAVIOURS

    def parse(line: str, lineno: int) -> None:
        f = line.split(",")
        if len(f) != 5:
            raise _Malformed(f"expected 5 fields 'user,item,category,behavior,ts', got {len(f)}")
        user = f[0].strip()
        item = f[1].strip()
        if not user or not item:
            raise _Malformed("empty user id" if not user else "empty item id")
        event_type = behaviours.get(f[3].strip())
        if event_type is None:
            raise _Malformed(f"unknown behaviour code {f[3]!r} (expected pv, cart, fav or buy)")
        ts = _seconds_to_ms(f[4])
        append(make(setdefault(user, user), setdefault(item, item), ts, event_type))

    return parse


def _sessions_parser(out: list[Interaction]) -> _LineParser:
    intern: dict[str, str] = {}
    setdefault = intern.setdefault
    append = out.append
    make = _interaction_builder()

    def items_of(text: str) -> list[str]:
        if "," in text:
            return [t for t in _SESSION_SPLIT.split(text) if t]
        return text.split()

    def parse(line: str, lineno: int) -> None:
        if "\t" in line:
            parts = line.split("\t")
            if len(parts) != 2:
                raise _Malformed(f"expected 'prefix<TAB>target', got {len(parts) - 1} tabs")
            items = items_of(parts[0])
            target = items_of(parts[1])
            if not items:
                raise _Malformed("empty session prefix")
            if len(target) != 1:
                raise _Malformed(f"expected one target item after the tab, got {len(target)}")
            items.extend(target)
        else:
            items = items_of(line)
            if not items:
                raise _Malformed("empty session")
        user = f"s{lineno}"
        for item in items:
            append(make(user, setdefault(item, item), None, "view"))

    return parse


# --- loading -------------------------------------------------------------------------


class _Skips:
    """Counts malformed lines and keeps the first few reasons."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0
        self.examples: list[str] = []

    def add(self, where: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(f"{self.source}:{where}: {reason}")


def _normalise_format(fmt: str) -> str:
    name = fmt.strip().lower()
    if name not in FORMATS:
        raise DataError(f"Unknown data format {fmt!r}; choose one of: {_formats_list()}.")
    return name


def load_interactions(
    path: Path | str,
    fmt: str | None = None,
    columns: Mapping[str, str] | None = None,
    ts_unit: str = "s",
) -> InteractionLog:
    """Read an interaction log; ``fmt`` is detected from the file when not given.

    ``columns`` (logical ``user``, ``item``, ``ts``, ``type`` to the file's column names)
    and ``ts_unit`` (``s`` or ``ms``) apply to the generic ``csv``, ``tsv`` and ``parquet``
    readers. Raises :class:`DataError` for a missing, empty or unusable file.
    """
    source = str(path)
    path = Path(path)
    name = _normalise_format(fmt) if fmt is not None else None
    if ts_unit not in _TS_UNITS:
        raise DataError(f"Unknown timestamp unit {ts_unit!r} for {source}; use s or ms.")
    if columns and (name or "") not in ("", "csv", "tsv", "parquet"):
        raise DataError(
            f"A column mapping applies only to the csv, tsv and parquet formats, not {name}."
        )
    _check_file(path)
    if name is None:
        name = detect_format(path)
    if columns and name not in ("csv", "tsv", "parquet"):
        raise DataError(
            f"Data file {source} was detected as format {name}, which takes no column "
            "mapping; pass fmt='csv', 'tsv' or 'parquet'."
        )
    started = time.perf_counter()
    skips = _Skips(source)
    # Millions of new objects and no garbage cycles: collections triggered by the
    # allocations would rescan the growing list for nothing (about a quarter of the time).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if name == "parquet":
            interactions, lines_read = _load_parquet(path, source, columns, ts_unit, skips)
        else:
            interactions, lines_read = _load_text(path, source, name, columns, ts_unit, skips)
    finally:
        if gc_was_enabled:
            gc.enable()
    if skips.count:
        logger.warning(
            "%s: skipped %d malformed of %d lines (format %s); first: %s",
            source,
            skips.count,
            lines_read,
            name,
            "; ".join(skips.examples),
        )
    if not interactions:
        if lines_read == 0:
            raise DataError(f"Data file {source} has no data lines (format {name}).")
        raise DataError(
            f"Data file {source} has no usable interaction for format {name}: all "
            f"{lines_read} lines are malformed, e.g. {skips.examples[0]}."
        )
    logger.info(
        "loaded %d interactions from %s (format %s, %d lines, %d skipped) in %.2fs",
        len(interactions),
        source,
        name,
        lines_read,
        skips.count,
        time.perf_counter() - started,
    )
    return InteractionLog(
        source=source,
        format=name,
        interactions=interactions,
        lines_read=lines_read,
        skipped=skips.count,
        skipped_examples=skips.examples,
    )


def _load_text(
    path: Path,
    source: str,
    fmt: str,
    columns: Mapping[str, str] | None,
    ts_unit: str,
    skips: _Skips,
) -> tuple[list[Interaction], int]:
    out: list[Interaction] = []
    parser: _LineParser | None = None
    if fmt == "sasrec":
        parser = _sasrec_parser(out)
    elif fmt == "movielens-dat":
        parser = _movielens_dat_parser(out)
    elif fmt == "taobao":
        parser = _taobao_parser(out)
    elif fmt == "sessions":
        parser = _sessions_parser(out)
    # Header formats build their parser from the first non-blank line.
    lines_read = 0
    seen_any = False
    malformed = _Malformed
    try:
        with path.open("rb") as fh:
            for first_lineno, lines, bad in _decoded_blocks(fh):
                for lineno, line in enumerate(lines, first_lineno):
                    if bad and lineno in bad:
                        if parser is None:
                            raise DataError(
                                f"The header of data file {source} (format {fmt}) is not "
                                f"valid UTF-8: {bad[lineno]}."
                            )
                        lines_read += 1
                        skips.add(lineno, f"not valid UTF-8 ({bad[lineno]})")
                        continue
                    if not line or line.isspace():
                        continue
                    seen_any = True
                    if parser is None:
                        if fmt in _LAYOUTS:
                            layout = _LAYOUTS[fmt]
                            generic = False
                        else:
                            layout = _generic_layout(fmt, line, columns, ts_unit)
                            generic = True
                        parser = _header_parser(path, fmt, layout, line, out, generic)
                        continue
                    lines_read += 1
                    try:
                        parser(line, lineno)
                    except malformed as exc:
                        skips.add(lineno, str(exc))
    except OSError as exc:
        raise DataError(f"Data file {source} cannot be read: {exc.strerror or exc}.") from exc
    if not seen_any:
        raise DataError(f"Data file {source} is empty (format {fmt}).")
    return out, lines_read


_BLOCK_BYTES = 8 * 1024 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"


def _decoded_blocks(fh: BinaryIO) -> Iterator[tuple[int, list[str], dict[int, str]]]:
    """Lines of a binary file, decoded strictly, one block at a time.

    Yields (number of the block's first line, its lines without end-of-line characters,
    line number -> decoding error for the lines that are not UTF-8, blanked). A whole
    block is decoded at once, which is exact because a newline byte never occurs inside
    a multi-byte UTF-8 sequence; only a block that fails is decoded line by line.
    """
    lineno = 1
    rest = b""
    while True:
        chunk = fh.read(_BLOCK_BYTES)
        if not chunk:
            break
        chunk = rest + chunk
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            rest = chunk
            continue
        rest = chunk[cut:]
        lines, bad = _decode_block(chunk[: cut - 1], lineno)
        yield lineno, lines, bad
        lineno += len(lines)
    if rest:
        lines, bad = _decode_block(rest, lineno)
        yield lineno, lines, bad


def _decode_block(block: bytes, lineno: int) -> tuple[list[str], dict[int, str]]:
    bad: dict[int, str] = {}
    if lineno == 1 and block.startswith(_UTF8_BOM):
        block = block[len(_UTF8_BOM) :]
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        lines: list[str] = []
        for offset, raw in enumerate(block.split(b"\n")):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError as exc:
                bad[lineno + offset] = f"{exc.reason} at byte {exc.start}"
                lines.append("")
        return lines, bad
    lines = text.split("\n")
    if "\r" in text:
        lines = [ln.rstrip("\r") for ln in lines]
    return lines, bad


def _load_parquet(
    path: Path,
    source: str,
    columns: Mapping[str, str] | None,
    ts_unit: str,
    skips: _Skips,
) -> tuple[list[Interaction], int]:
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise DataError(
            f"Reading parquet file {source} needs pyarrow: install recstream[parquet]."
        ) from exc
    try:
        table: Any = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"Data file {source} is not a readable parquet file: {exc}.") from exc
    layout = _generic_layout("parquet", ",", columns, ts_unit)
    names = list(table.column_names)

    def column(name: str | None, required: bool) -> list[Any] | None:
        if name is not None and name in names:
            col = table.column(name)
            if pa.types.is_timestamp(col.type):
                # Arrow timestamps carry their own unit: normalise to ms since epoch.
                col = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
                return [None if v is None else ("ms", v) for v in col.to_pylist()]
            values: list[Any] = col.to_pylist()
            return values
        if required:
            raise DataError(
                f"Data file {source} has no column {name!r} required by format parquet; "
                f"its columns are {', '.join(names)} (map columns with the columns argument)."
            )
        return None

    users = column(layout.user, True)
    items = column(layout.item, True)
    stamps = column(layout.ts, layout.ts_required)
    types = column(layout.type_col, layout.type_required)
    assert users is not None and items is not None
    out: list[Interaction] = []
    intern: dict[str, str] = {}
    for row in range(table.num_rows):
        try:
            user = _parquet_id(users[row], "user")
            item = _parquet_id(items[row], "item")
            ts = None if stamps is None else _parquet_ts(stamps[row], ts_unit)
            event_type = "view"
            if types is not None:
                event_type = str(types[row]).strip() if types[row] is not None else ""
                if event_type not in _EVENT_TYPE_SET:
                    raise _Malformed(
                        f"unknown event type {event_type!r} "
                        f"(expected one of {', '.join(EVENT_TYPES)})"
                    )
        except _Malformed as exc:
            skips.add(row + 1, str(exc))
            continue
        out.append(
            Interaction(
                intern.setdefault(user, user), intern.setdefault(item, item), ts, event_type
            )
        )
    return out, int(table.num_rows)


def _parquet_id(value: object, what: str) -> str:
    if value is None:
        raise _Malformed(f"empty {what} id")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} id is not valid UTF-8") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer id column that went through a float dtype
    text = str(value).strip()
    if not text:
        raise _Malformed(f"empty {what} id")
    return text


def _parquet_ts(value: object, unit: str) -> int:
    if value is None:
        raise _Malformed("missing timestamp")
    if isinstance(value, tuple):
        return int(value[1])  # already ms, from an Arrow timestamp column
    if isinstance(value, bool):
        raise _Malformed(f"timestamp {value!r} is not a number")
    if isinstance(value, int):
        return value * 1000 if unit == "s" else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Malformed(f"timestamp {value!r} is not finite")
        return round(value * 1000) if unit == "s" else round(value)
    return _generic_ts(str(value), unit)


# --- sequences and the leave-one-out split -------------------------------------------


@dataclass
class SequenceData:
    """Users' chronological item sequences over a dense item vocabulary."""

    item_ids: list[str]  # index -> external id; 0 is the padding placeholder
    users: list[str]
    sequences: list[np.ndarray]  # per user, int64 item indices 1..N, chronological
    # Per user, the items' event type codes (model.sequences.TYPE_CODES), when known.
    types: list[np.ndarray] | None = None

    def num_items(self) -> int:
        """N, the number of real items (padding excluded)."""
        return len(self.item_ids) - 1

    def item_index(self) -> dict[str, int]:
        """External item id -> index 1..N (the padding placeholder is not a key)."""
        return {item: i for i, item in enumerate(self.item_ids[1:], start=1)}


def build_sequence_data(
    sequences: Mapping[str, Sequence[str]],
    min_length: int = 3,
    event_types: Mapping[str, Sequence[str]] | None = None,
) -> SequenceData:
    """Index items 1..N in order of first appearance over the kept users, in order.

    Users with fewer than ``min_length`` items are dropped (counted and logged) and their
    items are not indexed unless a kept user has them too. Raises :class:`DataError` when
    no user remains. ``event_types`` (per user, aligned with ``sequences``) become the
    data's type codes.
    """
    if min_length < 1:
        raise ValueError(f"min_length must be at least 1, got {min_length}")
    index: dict[str, int] = {}
    item_ids = [PAD_ITEM]
    users: list[str] = []
    arrays: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    dropped = 0
    for user, seq in sequences.items():
        if len(seq) < min_length:
            dropped += 1
            continue
        row: list[int] = []
        for item in seq:
            idx = index.get(item)
            if idx is None:
                idx = len(item_ids)
                index[item] = idx
                item_ids.append(item)
            row.append(idx)
        users.append(user)
        arrays.append(np.asarray(row, dtype=np.int64))
        if event_types is not None:
            codes.append(type_codes(event_types[user]))
    if dropped:
        logger.info(
            "dropped %d of %d users with fewer than %d items",
            dropped,
            len(sequences),
            min_length,
        )
    if not users:
        raise DataError(
            f"No user has at least {min_length} items ({len(sequences)} users in the data)."
        )
    return SequenceData(
        item_ids=item_ids,
        users=users,
        sequences=arrays,
        types=codes if event_types is not None else None,
    )


def leave_one_out(data: SequenceData) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Train prefixes ``seq[:-2]``, validation targets ``seq[-2]``, test targets ``seq[-1]``.

    Every sequence needs at least 3 items, so that validation has a non-empty history.
    """
    train: list[np.ndarray] = []
    valid = np.empty(len(data.sequences), dtype=np.int64)
    test = np.empty(len(data.sequences), dtype=np.int64)
    for u, seq in enumerate(data.sequences):
        if len(seq) < 3:
            raise DataError(
                f"User {data.users[u]} has {len(seq)} items; leave-one-out needs at least 3 "
                "(build the data with min_length=3)."
            )
        train.append(np.asarray(seq[:-2], dtype=np.int64))
        valid[u] = seq[-2]
        test[u] = seq[-1]
    return train, valid, test
