"""scripts/ensemble_eval.py: a version's row agrees with ``recstream evaluate``, and
summing a version's scores with themselves changes no rank."""

import subprocess
import sys
from pathlib import Path

import pytest

from model.artifacts import load_version
from model.config import IndexConfig
from model.data import build_sequence_data
from model.pipeline import evaluate_version, train_and_publish
from tests.unit.test_training import TINY, cyclic_sequences

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensemble_eval.py"


def _rows(*args: Path) -> dict[str, tuple[float, float]]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=True
    ).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1][:1].isdigit():
            rows[cells[0]] = (float(cells[1]), float(cells[2]))
    return rows


def write_log(sequences: dict[str, list[str]], path: Path) -> Path:
    """``sequences`` as a tab-separated log with timestamps in order."""
    rows = [(u, i) for u, items in sequences.items() for i in items]
    path.write_text("user_id\titem_id\ttimestamp\n" + "".join(
        f"{u}\t{i}\t{t}\n" for t, (u, i) in enumerate(rows)
    ))  # fmt: skip
    return path


def test_a_versions_row_and_its_sum_with_itself_agree_with_evaluate(tmp_path: Path) -> None:
    sequences = cyclic_sequences(users=80)
    log = write_log(sequences, tmp_path / "log.tsv")
    data = build_sequence_data(sequences)
    cfg = TINY.model_copy(update={"epochs": 3})
    for name, seed in (("a", 0), ("b", 1)):
        train_and_publish(
            data, {"source": "generated"}, tmp_path / name,
            cfg.model_copy(update={"seed": seed}), IndexConfig(), progress=False,
        )  # fmt: skip
    a = evaluate_version(sequences, load_version(tmp_path / "a"))
    same = _rows(log, tmp_path / "a", tmp_path / "a")
    assert same["a"] == pytest.approx((a.model["hr@10"], a.model["ndcg@10"]), abs=1e-4)
    assert same["sum of scores"] == same["a"]
    pair = _rows(log, tmp_path / "a", tmp_path / "b")
    assert set(pair) == {"a", "b", "sum of scores"}
    assert all(0.0 < ndcg <= 1.0 for _, ndcg in pair.values())
