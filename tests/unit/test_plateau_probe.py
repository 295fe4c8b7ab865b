"""scripts/plateau_probe.py: every variant's settings reach training, on one batch order."""

import subprocess
import sys
from pathlib import Path

from stream_worker.produce import generated_log

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plateau_probe.py"


def test_each_variant_trains_with_its_own_settings(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    lines = ["user_id\titem_id\ttimestamp"]
    for user, items in generated_log(users=200, items=30, length=12).items():
        lines += [f"{user}\t{item}\t{1_600_000_000 + t}" for t, item in enumerate(items)]
    log.write_text("\n".join(lines) + "\n")
    tiny = "max_len=8+dim=16+blocks=1+dropout=0+batch_size=16"
    out = subprocess.run(
        [
            sys.executable, str(SCRIPT), str(log), "--steps", "60", "--every", "20",
            "--variants", f"{tiny}+lr=0.01", f"{tiny}+lr=0.01+warmup_steps=60", f"{tiny}+lr=1e-9",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = {
        cells[0]: [float(x) for x in cells[1].split(", ")]
        for line in out.splitlines()
        if line.startswith(f"| {tiny}")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    learning, warming, still = rows.values()
    assert len(rows) == 3 and all(len(losses) == 3 for losses in rows.values())
    assert learning[-1] < still[-1] - 0.5  # a rate of 0.01 learns the walks
    assert abs(still[-1] - still[0]) < 0.01  # a rate of 1e-9 does not move
    assert warming[0] > learning[0]  # the warm-up's first steps are smaller


def test_a_bad_variant_is_one_readable_line(tmp_path: Path) -> None:
    for spec, says in [("blockz=3", "'blockz' is not a training setting"), ("blocks=x", "blocks")]:
        run = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path / "absent.tsv"), "--variants", spec],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode != 0
        assert run.stderr.count("\n") == 1 and says in run.stderr, run.stderr
