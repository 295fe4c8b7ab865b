"""One source for every default and every metric: the README's configuration table is
generated from ``Settings`` (``recstream settings``), its metrics table from the
worker's registry, and both must stay equal to what they are generated from."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stream_worker.cli import app
from stream_worker.metrics import metrics_table
from stream_worker.settings import Settings, settings_reference, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name}:[^\n]*-->\n(.*?)\n<!-- {name}: end -->", text, re.S)
    assert match is not None, f"the README lost its {name} markers"
    return match.group(1)


def test_the_readme_table_is_the_generated_one() -> None:
    assert readme_table("settings-table") == settings_table(), "run scripts/regen_docs.py"


def test_the_readme_lists_every_metric_the_worker_exposes() -> None:
    assert readme_table("metrics-table") == metrics_table(), "run scripts/regen_docs.py"


def test_every_setting_is_described_and_read_from_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = settings_reference()
    assert all(row.meaning for row in rows), [row.variable for row in rows if not row.meaning]
    assert len({row.variable for row in rows}) == len(rows)
    # Each documented variable really reaches its field.
    monkeypatch.setenv("RECSTREAM_WORKER__TOP_K", "17")
    monkeypatch.setenv("RECSTREAM_TRAIN__DIM", "48")
    settings = Settings()
    assert (settings.worker.top_k, settings.train.dim) == (17, 48)
    assert {"RECSTREAM_WORKER__TOP_K", "RECSTREAM_TRAIN__DIM"} <= {r.variable for r in rows}


def test_the_cli_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0
    assert result.output.strip() == settings_table()
