"""The training-speed benchmark and its generated large log: structure of quick runs,
never timings."""

import json
from pathlib import Path

import pytest
import torch

from model.config import TrainConfig
from model.data import build_sequence_data, load_interactions
from model.errors import ConfigError
from recstream_tools.bench.training import (
    VARIANTS,
    TorchDropout,
    run_training_speed,
    write_synthetic_log,
)

TINY = TrainConfig(max_len=8, dim=16, blocks=1, heads=1, negatives=8, device="cpu")


def test_the_generated_log_has_the_size_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "large.txt"
    lines = write_synthetic_log(path, users=300, items=500, length=6, seed=1)
    log = load_interactions(path)
    assert len(log.interactions) == lines
    sequences = log.sequences()
    assert len(sequences) == 300
    assert min(len(s) for s in sequences.values()) >= 3
    assert len({i.item_id for i in log.interactions}) > 400  # the long tail occurs


def test_every_variant_runs_and_the_table_has_a_row_each(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    write_synthetic_log(path, users=60, items=40, length=8)
    data = build_sequence_data(load_interactions(path).sequences())
    table = run_training_speed("log", data, TINY, list(VARIANTS), 1, 1, tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(VARIANTS)
    assert rows[0].split(" | ")[4] == "1.00x"
    saved = json.loads((tmp_path / "training-log.json").read_text())
    assert [v["name"] for v in saved["variants"]] == list(VARIANTS)
    assert saved["config"]["dim"] == 16  # a fixed dim stays; auto would be chosen
    assert all(len(v["step_ms"]) == 1 and v["targets"] > 0 for v in saved["variants"])
    with pytest.raises(ConfigError, match="unknown variant 'fp8'"):
        run_training_speed("log", data, TINY, ["base", "fp8"], 1, 1, tmp_path)


def test_torch_dropout_is_the_same_rate_by_nn_dropouts_draw() -> None:
    torch.manual_seed(0)
    dropped = (TorchDropout(0.25)(torch.ones(100_000)) == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.01)
