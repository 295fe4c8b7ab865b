"""A plain wheel install of recstream (no editable install, no repository on the path)
carries its migrations and brings an empty database to head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_worker.store import expected_revision

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_a_wheel_install_migrates_an_empty_database(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("recstream-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert (site / "stream_worker" / "migrations" / "versions").is_dir()
    # Run from an empty directory with only the installed copy ahead on the path (the
    # dependencies still come from this environment).
    env = {**os.environ, "PYTHONPATH": str(site), "RECSTREAM_DATABASE__URL":
           f"sqlite:///{tmp_path / 'state.db'}"}  # fmt: skip
    where = subprocess.run(
        [sys.executable, "-c", "import json, stream_worker.store as s; "
         "print(json.dumps([s.__file__, str(s.MIGRATIONS_DIR)]))"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    module, migrations = json.loads(where.stdout)
    assert module.startswith(str(site)) and migrations.startswith(str(site))
    migrated = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "migrate"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert migrated.stdout.strip().endswith(f"empty -> {expected_revision()}")
