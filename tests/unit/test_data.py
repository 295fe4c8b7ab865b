"""Loaders, format detection and the leave-one-out split of model.data (small generated files)."""

from __future__ import annotations

import gc
import io
import logging
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model import data
from model.data import (
    FORMATS,
    Interaction,
    InteractionLog,
    build_sequence_data,
    detect_format,
    leave_one_out,
    load_interactions,
)
from model.errors import DataError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


DAY_2016_05_09_MS = 1_462_752_000_000  # 2016-05-09T00:00:00Z

Row = tuple[str, str, int | None, str]


def untimed(user: str, *items: str) -> list[Row]:
    return [(user, item, None, "view") for item in items]


# name, file name, content, expected format, expected (user, item, ts_ms, type) rows
CASES: list[tuple[str, str, str, list[Row]]] = [
    (
        "data.txt",
        "1 10\n1 11\n2 10\n1 12\n",
        "sasrec",
        [
            ("1", "10", None, "view"),
            ("1", "11", None, "view"),
            ("2", "10", None, "view"),
            ("1", "12", None, "view"),
        ],
    ),
    (
        "ratings.dat",
        "1::1193::5::978300760\n1::661::3::978302109\n",
        "movielens-dat",
        [("1", "1193", 978300760000, "view"), ("1", "661", 978302109000, "view")],
    ),
    (
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n2,3,4.0,964981247\n",
        "movielens-csv",
        [("1", "1", 964982703000, "view"), ("2", "3", 964981247000, "view")],
    ),
    (
        "chrono.tsv",
        "user_id\titem_id\trating\n1\t3186\t4\n1\t1721\t4\n",
        "tsv",
        [("1", "3186", None, "view"), ("1", "1721", None, "view")],
    ),
    (
        "ml.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
        "recbole",
        [("196", "242", 881250949000, "view")],
    ),
    (
        "ml100k.tsv",
        "user_id:token\titem_id:token\n1\t2\n",
        "recbole",
        [("1", "2", None, "view")],
    ),
    (
        "UserBehavior.csv",
        "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,fav,1511561733\n"
        "2,5,6,cart,1511561734\n2,7,6,buy,1511561735\n",
        "taobao",
        [
            ("1", "2268318", 1511544070000, "view"),
            ("1", "2333346", 1511561733000, "click"),
            ("2", "5", 1511561734000, "add_to_cart"),
            ("2", "7", 1511561735000, "purchase"),
        ],
    ),
    (
        "clicks.txt",
        "SessionId\tItemId\tTime\n1\t214536502\t1396860669.277\n",
        "yoochoose",
        [("1", "214536502", 1396860669277, "view")],
    ),
    (
        "views.csv",
        "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n",
        "diginetica-views",
        [("1", "81766", DAY_2016_05_09_MS + 526309, "view")],
    ),
    (
        "purchases.csv",
        "sessionId;userId;timeframe;eventdate;ordernumber;itemId\n"
        "150;18278;17100868;2016-05-09;16421;25911\n",
        "diginetica-purchases",
        [("150", "25911", DAY_2016_05_09_MS + 17100868, "purchase")],
    ),
    (
        "train_seq.txt",
        "1 2 1\n3 4 3 5\n",
        "sessions",
        untimed("s1", "1", "2", "1") + untimed("s2", "3", "4", "3", "5"),
    ),
    (
        "test.txt",
        "16156 16156\t16156\n11575,29313\t5405\n",
        "sessions",
        untimed("s1", "16156", "16156", "16156") + untimed("s2", "11575", "29313", "5405"),
    ),
    (
        "events.csv",
        "user_id,item_id,timestamp,event_type\nu1,i1,1700000000,click\nu2,i2,1700000001,view\n",
        "csv",
        [("u1", "i1", 1700000000000, "click"), ("u2", "i2", 1700000001000, "view")],
    ),
]


def rows(log: InteractionLog) -> list[Row]:
    return [(x.user_id, x.item_id, x.ts_ms, x.event_type) for x in log.interactions]


@pytest.mark.parametrize(("name", "text", "fmt", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_format_is_detected_and_parsed(
    tmp_path: Path, name: str, text: str, fmt: str, expected: list[Row]
) -> None:
    path = write(tmp_path, name, text)
    assert detect_format(path) == fmt
    log = load_interactions(path)
    assert log.format == fmt
    assert log.source == str(path)
    assert rows(log) == expected
    assert log.skipped == 0
    assert log.skipped_examples == []
    assert rows(load_interactions(str(path), fmt=fmt)) == expected


def test_every_format_is_covered() -> None:
    covered = {c[2] for c in CASES} | {"parquet"}
    assert covered == set(FORMATS)


def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "uid": [1, 2, None, 1],
            "iid": ["a", "b", "c", "d"],
            "ms": [3000, 1000, 0, 2000],
            "kind": ["view", "purchase", "view", "teleport"],
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "parquet"
    log = load_interactions(
        path, columns={"user": "uid", "item": "iid", "ts": "ms", "type": "kind"}, ts_unit="ms"
    )
    assert rows(log) == [("1", "a", 3000, "view"), ("2", "b", 1000, "purchase")]
    assert log.lines_read == 4
    assert log.skipped == 2
    assert log.skipped_examples[0] == f"{path}:3: empty user id"
    assert log.skipped_examples[1].startswith(f"{path}:4: unknown event type 'teleport'")


def test_sequences_are_chronological_with_ties_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "7,c,1,30\n"
        "5,x,1,10\n"
        "7,a,1,10\n"
        "7,b1,1,20\n"
        "7,b2,1,20\n"
        "5,y,1,5\n",
    )
    log = load_interactions(path)
    seqs = log.sequences()
    assert list(seqs) == ["7", "5"]  # order of first appearance
    assert seqs == {"7": ["a", "b1", "b2", "c"], "5": ["y", "x"]}
    ordered = [(x.user_id, x.item_id) for x in log.in_event_time_order()]
    assert ordered == [("5", "y"), ("5", "x"), ("7", "a"), ("7", "b1"), ("7", "b2"), ("7", "c")]


def test_untimed_logs_keep_file_order() -> None:
    log = InteractionLog(
        source="mem",
        format="sasrec",
        interactions=[
            Interaction("u", "b", None, "view"),
            Interaction("v", "z", None, "view"),
            Interaction("u", "a", None, "view"),
        ],
        lines_read=3,
        skipped=0,
        skipped_examples=[],
    )
    assert log.sequences() == {"u": ["b", "a"], "v": ["z"]}
    assert [x.item_id for x in log.in_event_time_order()] == ["b", "z", "a"]


def test_mixed_timed_log_keeps_untimed_after_predecessor() -> None:
    log = InteractionLog(
        "mem",
        "csv",
        [
            Interaction("u", "late", 50, "view"),
            Interaction("u", "after-late", None, "view"),
            Interaction("u", "early", 10, "view"),
        ],
        3,
        0,
        [],
    )
    assert log.sequences() == {"u": ["early", "late", "after-late"]}


def test_malformed_lines_are_counted_with_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "UserBehavior.csv",
        "1,10,100,pv,1511544070\n"
        "1,11,100,pv\n"  # line 2: field count
        ",12,100,pv,1511544071\n"  # line 3: empty user
        "1,13,100,pv,soon\n"  # line 4: timestamp
        "\n"  # blank lines are not data
        "1,14,100,like,1511544072\n"  # line 6: behaviour
        "2,15,100,buy,1511544073\n",
    )
    with caplog.at_level(logging.WARNING, logger="model.data"):
        log = load_interactions(path, fmt="taobao")
    assert [x.item_id for x in log.interactions] == ["10", "15"]
    assert log.lines_read == 6
    assert log.skipped == 4
    assert [e.split(": ", 1)[0] for e in log.skipped_examples] == [
        f"{path}:2",
        f"{path}:3",
        f"{path}:4",
        f"{path}:6",
    ]
    assert "expected 5 fields" in log.skipped_examples[0]
    assert "empty user id" in log.skipped_examples[1]
    assert "'soon' is not a number" in log.skipped_examples[2]
    assert "unknown behaviour code 'like'" in log.skipped_examples[3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 4 malformed of 6 lines" in warnings[0].getMessage()


def test_only_the_first_examples_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "data.txt", "1 2\n" + "bad\n" * 25)
    log = load_interactions(path, fmt="sasrec")
    assert log.skipped == 25
    assert len(log.skipped_examples) == data.MAX_SKIPPED_EXAMPLES
    assert log.skipped_examples[0] == f"{path}:2: expected 2 fields 'user item', got 1"


def test_invalid_utf8_line_is_counted_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"1 10\n1 \xff\xfe\n2 \xc3\xa9\n")
    log = load_interactions(path, fmt="sasrec")
    assert rows(log) == [("1", "10", None, "view"), ("2", "\u00e9", None, "view")]
    assert log.skipped == 1
    assert log.skipped_examples[0].startswith(f"{path}:2: not valid UTF-8")


def test_crlf_and_bom_are_handled(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\r\n1,2,4.0,10\r\n")
    assert detect_format(path) == "movielens-csv"
    assert rows(load_interactions(path)) == [("1", "2", 10_000, "view")]


def test_lines_split_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_BLOCK_BYTES", 7)
    path = tmp_path / "data.txt"
    path.write_bytes(b"11 100\n12 \xff\n13 102\n14 103")
    log = load_interactions(path, fmt="sasrec")
    assert [x.user_id for x in log.interactions] == ["11", "13", "14"]
    assert log.skipped_examples[0].startswith(f"{path}:2: not valid UTF-8")


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    block=st.integers(min_value=1, max_value=40),
)
def test_decoded_blocks_match_line_by_line_decoding(lines: list[bytes], block: int) -> None:
    payload = b"\n".join(lines)
    assume(not payload.startswith(b"\xef\xbb\xbf"))  # a BOM is dropped on purpose
    raw_lines = payload.split(b"\n") if payload else []
    if payload.endswith(b"\n"):
        raw_lines.pop()  # like iterating over a file: no line after the last newline
    expected: list[str | None] = []
    for raw in raw_lines:
        try:
            expected.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            expected.append(None)
    got: list[str | None] = []
    original = data._BLOCK_BYTES
    data._BLOCK_BYTES = block
    try:
        for first, block_lines, bad in data._decoded_blocks(io.BytesIO(payload)):
            assert first == len(got) + 1
            got.extend(None if n in bad else s for n, s in enumerate(block_lines, first))
    finally:
        data._BLOCK_BYTES = original
    assert got == expected


def test_generic_csv_with_column_mapping_and_ms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "clicks.csv",
        "when,who,what,kind,extra\n"
        "1700000000123,alice,apple,add_to_cart,x\n"
        '1700000000001,"bob, jr",pear,purchase,y\n'
        "1700000000002,carol,plum,teleport,z\n"
        "2023-11-14T22:13:20Z,dave,fig,view,w\n",
    )
    log = load_interactions(
        path,
        fmt="csv",
        columns={"user": "who", "item": "what", "ts": "when", "type": "kind"},
        ts_unit="ms",
    )
    assert rows(log) == [
        ("alice", "apple", 1700000000123, "add_to_cart"),
        ("bob, jr", "pear", 1700000000001, "purchase"),
        ("dave", "fig", 1700000000000, "view"),
    ]
    assert log.skipped == 1
    assert "unknown event type 'teleport'" in log.skipped_examples[0]


def test_generic_csv_missing_mapped_column_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "events.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no column 'user_id'.*events\.csv|events\.csv.*user_id"):
        load_interactions(path)
    with pytest.raises(DataError, match="no column 'when'"):
        load_interactions(path, columns={"user": "a", "item": "b", "ts": "when"})
    log = load_interactions(path, columns={"user": "a", "item": "b"})
    assert rows(log) == [("1", "2", None, "view")]


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        load_interactions(missing)
    empty = write(tmp_path, "empty.txt", "")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_interactions(empty)
    with pytest.raises(DataError, match=r"empty\.txt is empty \(format sasrec\)"):
        load_interactions(empty, fmt="sasrec")
    blank = write(tmp_path, "blank.txt", "\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_interactions(blank, fmt="sessions")


def test_header_only_and_all_malformed_files(tmp_path: Path) -> None:
    header_only = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"ratings\.csv has no data lines \(format movielens-csv\)"):
        load_interactions(header_only)
    bad = write(tmp_path, "bad.txt", "1 2 3\n4\n")
    with pytest.raises(DataError, match=r"bad\.txt has no usable interaction for format sasrec"):
        load_interactions(bad, fmt="sasrec")


def test_unknown_format_and_undetectable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "data.txt", "1 2\n")
    with pytest.raises(DataError, match="choose one of: sasrec, movielens-dat"):
        load_interactions(path, fmt="excel")
    odd = write(tmp_path, "odd.bin", "12.5 hello\n")
    with pytest.raises(DataError, match=r"odd\.bin.*pass one of: sasrec"):
        detect_format(odd)
    with pytest.raises(DataError, match="Unknown timestamp unit 'us'"):
        load_interactions(path, ts_unit="us")
    with pytest.raises(DataError, match="column mapping"):
        load_interactions(path, fmt="sasrec", columns={"user": "u"})


def test_gc_state_is_restored(tmp_path: Path) -> None:
    path = write(tmp_path, "data.txt", "1 2\n")
    assert gc.isenabled()
    load_interactions(path)
    assert gc.isenabled()
    with pytest.raises(DataError):
        load_interactions(write(tmp_path, "bad.txt", "x\n"), fmt="sasrec")
    assert gc.isenabled()


def test_fast_builder_makes_equal_frozen_interactions() -> None:
    build = data._interaction_builder()
    made = build("u", "i", 5, "click")
    assert made == Interaction("u", "i", 5, "click")
    assert hash(made) == hash(Interaction("u", "i", 5, "click"))
    with pytest.raises(FrozenInstanceError):
        made.item_id = "j"  # type: ignore[misc]


def test_build_sequence_data_and_leave_one_out(caplog: pytest.LogCaptureFixture) -> None:
    sequences = {
        "u1": ["a", "b", "c", "d"],
        "short": ["z", "a"],  # dropped: its item z is not indexed
        "u2": ["c", "e", "a"],
    }
    with caplog.at_level(logging.INFO, logger="model.data"):
        sd = build_sequence_data(sequences, min_length=3)
    assert "dropped 1 of 3 users" in caplog.text
    assert sd.item_ids == ["<pad>", "a", "b", "c", "d", "e"]
    assert sd.num_items() == 5
    assert sd.item_index() == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert sd.users == ["u1", "u2"]
    assert [s.tolist() for s in sd.sequences] == [[1, 2, 3, 4], [3, 5, 1]]
    assert all(s.dtype == np.int64 for s in sd.sequences)

    train, valid, test = leave_one_out(sd)
    assert [t.tolist() for t in train] == [[1, 2], [3]]
    assert all(t.dtype == np.int64 for t in train)
    assert valid.dtype == np.int64 and test.dtype == np.int64
    np.testing.assert_array_equal(valid, np.array([3, 5], dtype=np.int64))
    np.testing.assert_array_equal(test, np.array([4, 1], dtype=np.int64))


def test_build_sequence_data_with_no_user_left() -> None:
    with pytest.raises(DataError, match="No user has at least 3 items"):
        build_sequence_data({"u": ["a", "b"]})


def test_leave_one_out_needs_three_items() -> None:
    sd = build_sequence_data({"u": ["a", "b"]}, min_length=2)
    with pytest.raises(DataError, match="User u has 2 items"):
        leave_one_out(sd)


def test_loaded_log_feeds_sequence_data(tmp_path: Path) -> None:
    path = write(tmp_path, "data.txt", "1 10\n1 11\n1 12\n2 12\n2 10\n2 13\n")
    sd = build_sequence_data(load_interactions(path).sequences())
    assert sd.item_ids == ["<pad>", "10", "11", "12", "13"]
    assert [s.tolist() for s in sd.sequences] == [[1, 2, 3], [3, 1, 4]]


def test_undecodable_header_and_non_interaction_recbole_file(tmp_path: Path) -> None:
    header = tmp_path / "ratings.csv"
    header.write_bytes(b"userId,movieId,rating,timestamp\xff\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"header of data file .*ratings\.csv .*not valid UTF-8"):
        load_interactions(header, fmt="movielens-csv")
    items = write(tmp_path, "ml.item", "item_id:token\tmovie_title:token_seq\n1\tToy Story\n")
    assert detect_format(items) == "recbole"
    with pytest.raises(DataError, match=r"ml\.item has no column 'user_id' .*format recbole"):
        load_interactions(items)
