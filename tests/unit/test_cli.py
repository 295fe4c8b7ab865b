"""The offline commands through the real console script, on a small generated log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.artifacts import list_versions, read_current

TINY_ENV = {
    "RECSTREAM_TRAIN__MAX_LEN": "8",
    "RECSTREAM_TRAIN__DIM": "16",
    "RECSTREAM_TRAIN__BLOCKS": "1",
    "RECSTREAM_TRAIN__DROPOUT": "0.0",
    "RECSTREAM_TRAIN__LR": "0.005",
    "RECSTREAM_TRAIN__BATCH_SIZE": "32",
    "RECSTREAM_TRAIN__DEVICE": "cpu",
}


def recstream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **TINY_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # MovieLens ratings.csv layout: the format must be detected from the header.
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(60):
        for t in range(8):
            rows.append(f"{user},{(user + t) % 25},4.0,{1_000_000 + t * 60}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(log_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    proc = recstream("train", "--data", str(log_file), "--out", str(out), "--epochs", "6")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["version"] == read_current(out)
    assert "hr@10" in line and "ndcg@10" in line
    assert "popularity (test)" in proc.stderr  # the readable table
    return out


def test_evaluate_prints_one_json_line_with_model_and_popularity(
    trained: Path, log_file: Path
) -> None:
    proc = recstream("evaluate", "--data", str(log_file), "--artifacts", str(trained))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@10"):
        assert 0.0 <= result[key] <= 1.0
        assert 0.0 <= result["popularity"][key] <= 1.0
    assert result["users"] == 60
    assert result["hr@10"] > result["popularity"]["hr@10"]


def test_build_index_publishes_a_new_version_with_recall(trained: Path) -> None:
    before = read_current(trained)
    proc = recstream(
        "build-index", "--artifacts", str(trained), "--factory", "HNSW8", "--ef-search", "16"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"] == before
    assert read_current(trained) == out["version"] != before
    assert out["index"]["factory"] == "HNSW8"
    assert 0.0 < out["index"]["recall@10"] <= 1.0
    assert set(list_versions(trained)) >= {before, out["version"]}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["train", "--data", "/no/such/file", "--out", "x"], {}, "does not exist"),
        (["evaluate", "--data", __file__, "--artifacts", "/no/such/root"], {}, "error:"),
        (["train", "--data", __file__, "--out", "x"], {"RECSTREAM_TRAIN__DIM": "-3"}, "DIM"),
        (["build-index", "--artifacts", "/no/such/root", "--factory", "Flat"], {}, "no CURRENT"),
        (["bench", "incremental", "--batch-events", "90,0"], {}, "--batch-events must be"),
        (["bench", "incremental", "--dataset", "nope"], {}, "unknown dataset 'nope'"),
        (["bench", "incremental", "--data-root", "/no/such/dir"], {}, "not found"),
        (["bench", "e2e", "--broker-pid", "1"], {}, "--broker-pid names the process"),
        (
            ["bench", "e2e", "--bootstrap", "127.0.0.1:1", "--broker-pid", "999999999"],
            {},
            "--broker-pid 999999999: no such process",
        ),
    ],
)
def test_bad_input_is_one_readable_line_not_a_traceback(
    args: list[str], env: dict[str, str], message: str
) -> None:
    proc = recstream(*args, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_event_types_on_a_log_without_them_and_heads_not_dividing_dim_are_one_line(
    log_file: Path, tmp_path: Path
) -> None:
    out = str(tmp_path / "out")
    typed = recstream("train", "--data", str(log_file), "--out", out,
                      env={"RECSTREAM_TRAIN__EVENT_TYPES": "on"})  # fmt: skip
    # dim auto chooses 64 for this log (8 events per item); 3 heads do not divide it.
    auto_dim = {"RECSTREAM_TRAIN__DIM": "auto", "RECSTREAM_TRAIN__HEADS": "3"}
    heads = recstream("train", "--data", str(log_file), "--out", out, env=auto_dim)
    for proc, message in (
        (typed, "RECSTREAM_TRAIN__EVENT_TYPES is on, but every event in"),
        (heads, "training settings for this data: dim (64) must be a multiple of heads (3)"),
    ):
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert message in proc.stderr


def test_empty_data_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = recstream("train", "--data", str(empty), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "empty" in proc.stderr.lower()
