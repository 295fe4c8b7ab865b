"""scripts/compare_versions.py: its rows agree with ``recstream evaluate``, a version
against itself differs by nothing, and another version's difference is the difference
of the two means; and the paired interval it prints."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.artifacts import load_version
from model.config import IndexConfig
from model.data import build_sequence_data
from model.evaluate import paired_difference
from model.pipeline import evaluate_version, train_and_publish
from tests.unit.test_ensemble_eval import write_log
from tests.unit.test_training import TINY, cyclic_sequences

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_versions.py"


def test_paired_difference_is_the_mean_difference_with_its_interval() -> None:
    a = np.array([0.0, 1.0, 0.0, 1.0])
    b = np.array([1.0, 1.0, 0.0, 1.0])
    mean, half = paired_difference(a, b)
    assert mean == pytest.approx(0.25)
    # differences 1, 0, 0, 0: sample standard deviation 0.5, over sqrt(4) users
    assert half == pytest.approx(1.96 * 0.5 / 2)
    assert paired_difference(b, b) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal 1-d arrays"):
        paired_difference(a, b[:3])


def test_groups_against_the_first_on_the_same_users(tmp_path: Path) -> None:
    sequences = cyclic_sequences(users=80)
    log = write_log(sequences, tmp_path / "log.tsv")
    data = build_sequence_data(sequences)
    for name, epochs in (("a", 1), ("b", 4)):
        train_and_publish(
            data, {"source": "generated"}, tmp_path / name,
            TINY.model_copy(update={"epochs": epochs}), IndexConfig(), progress=False,
        )  # fmt: skip
    a = evaluate_version(sequences, load_version(tmp_path / "a")).model
    b = evaluate_version(sequences, load_version(tmp_path / "b")).model
    plot = tmp_path / "curves.png"
    out = subprocess.run(
        [
            sys.executable, str(SCRIPT), str(log), "--group", f"first={tmp_path / 'a'}",
            "--group", f"again={tmp_path / 'a'}", "--group", f"longer={tmp_path / 'b'}",
            "--plot", str(plot),
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ")
    ]
    table = {(row[0], row[1]): row[2:] for row in cells if len(row) == 5}
    assert float(table["first", "a"][0]) == pytest.approx(a["hr@10"], abs=1e-4)
    assert float(table["first", "a"][1]) == pytest.approx(a["ndcg@10"], abs=1e-4)
    assert float(table["longer", "mean"][0]) == pytest.approx(b["hr@10"], abs=1e-4)
    diffs = {row[0]: row[1:] for row in cells if len(row) == 3 and "±" in row[1]}
    assert diffs["again"] == ["+0.0000 ± 0.0000", "+0.0000 ± 0.0000"]
    assert abs(b["ndcg@10"] - a["ndcg@10"]) > 0.01  # 1 epoch against 4: unlike models
    hr_diff = float(diffs["longer"][0].split("±")[0])
    assert hr_diff == pytest.approx(b["hr@10"] - a["hr@10"], abs=2e-4)
    ndcg_diff = float(diffs["longer"][1].split("±")[0])
    assert ndcg_diff == pytest.approx(b["ndcg@10"] - a["ndcg@10"], abs=2e-4)
    assert plot.stat().st_size > 1000
