"""The retrain job's decision logic, its lock, and switching CURRENT back and forth.

No servers: versions are published from untrained models into temporary roots, and the
sequences come from a function instead of the database.
"""

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from typer.testing import CliRunner

from model.artifact_store import LocalStore, summaries, switch
from model.artifacts import (
    MANIFEST,
    VersionContents,
    list_versions,
    publish_version,
    read_current,
    read_manifest,
)
from model.config import IndexConfig, TrainConfig
from model.data import build_sequence_data
from model.errors import ArtifactError, NotEnoughData, RetrainLocked
from model.retrain import (
    LOCK_FILE,
    RetrainOutcome,
    quality_gate,
    retrain_lock,
    run_retrain,
    validation_split,
)
from model.sasrec import SASRec, script_encoder
from stream_worker.cli import app
from stream_worker.produce import generated_log

ITEMS = 20
CFG = TrainConfig(
    max_len=8, dim=16, blocks=1, heads=1, dropout=0.0, epochs=1, batch_size=64, device="cpu"
)


@pytest.mark.parametrize(
    ("candidate", "live", "margin", "publish"),
    [
        (0.30, None, 0.0, True),  # no live version
        (0.30, 0.20, 0.0, True),  # better
        (0.20, 0.20, 0.0, True),  # equal
        (0.195, 0.20, 0.01, True),  # worse, within the margin
        (0.19, 0.20, 0.01, True),  # exactly at the margin
        (0.18, 0.20, 0.01, False),  # worse by more than the margin
        (0.0, 0.20, 0.0, False),
        (float("nan"), 0.20, 0.5, False),  # a broken candidate is never published
        (float("nan"), None, 0.5, False),
    ],
)
def test_quality_gate(candidate: float, live: float | None, margin: float, publish: bool) -> None:
    decision = quality_gate(candidate, live, margin)
    assert decision.publish is publish
    assert decision.reason


def test_quality_gate_rejects_a_negative_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        quality_gate(0.2, 0.1, -0.01)


def test_validation_split_holds_out_only_the_test_item() -> None:
    data = build_sequence_data({"a": ["x", "y", "z", "w"], "b": ["y", "x", "z"], "c": ["x"]})
    assert validation_split(data) == {"a": ["x", "y", "z"], "b": ["y", "x"]}


def test_the_lock_excludes_a_second_holder_at_once_or_after_a_wait(tmp_path: Path) -> None:
    with retrain_lock(tmp_path, 0):
        started = time.monotonic()
        second = retrain_lock(tmp_path, 0)
        with pytest.raises(RetrainLocked, match="another retrain is running"), second:
            pass
        assert time.monotonic() - started < 1
        waiting = retrain_lock(tmp_path, 0.3)
        with pytest.raises(RetrainLocked, match=r"waited 0\.3s"), waiting:
            pass
    with retrain_lock(tmp_path, 0):  # released on exit
        pass
    # Held by another lock object (another open file), as another process would.
    other = FileLock(tmp_path / LOCK_FILE)
    with other, pytest.raises(RetrainLocked), retrain_lock(tmp_path, 0):
        pass


def random_version(root: Path, seed: int, *, switch: bool = True) -> str:
    torch.manual_seed(seed)
    model = SASRec(ITEMS, CFG.max_len, dim=16, blocks=1, heads=1, dropout=0.0).eval()
    contents = VersionContents(
        encoder=script_encoder(model),
        item_embeddings=model.item_embeddings().detach().numpy().copy(),
        item_ids=["<pad>", *(f"item-{i}" for i in range(ITEMS))],
        max_len=CFG.max_len,
        popularity=["item-0"],
        info={"metrics": {"valid": {"ndcg@10": 0.05 * seed}}},
    )
    return publish_version(root, contents, IndexConfig(), switch=switch)


def walks() -> dict[str, list[str]]:
    return generated_log(users=30, items=ITEMS, length=8, seed=1)


def retrain_here(
    root: Path,
    load: Callable[[], Mapping[str, list[str]]] = walks,
    *,
    min_users: int = 10,
) -> RetrainOutcome:
    return run_retrain(
        root, load, {"source": "test"}, CFG, IndexConfig(), quality_margin=1.0, min_users=min_users
    )


def test_retrain_with_event_types_reads_the_stored_codes_and_gates_against_a_typed_live(
    tmp_path: Path,
) -> None:
    typed_cfg = CFG.model_copy(update={"event_types": "on"})
    codes = {user: "".join(str(1 + (n + len(user)) % 4) for n in range(len(items)))
             for user, items in walks().items()}  # fmt: skip

    def retrain() -> RetrainOutcome:
        return run_retrain(
            tmp_path, walks, {"source": "test"}, typed_cfg, IndexConfig(), quality_margin=1.0,
            min_users=10, load_types=lambda: codes,
        )  # fmt: skip

    first = retrain()
    assert first.published and first.live_version is None
    manifest = read_manifest(tmp_path / str(first.version))
    assert manifest["hyperparameters"]["event_types"] == "on"
    second = retrain()  # the live version is typed: its validation reads the same types
    assert second.published and second.live_version == first.version
    # The same model on the same validation data, through the published encoder: equal
    # only when the types reach it as they reached training.
    assert second.live_valid is not None
    assert second.live_valid["ndcg@10"] == pytest.approx(first.candidate_valid["ndcg@10"], abs=1e-6)


def rollback(root: Path, version: str) -> str | None:
    """What `recstream rollback` does on a directory store."""
    return switch(LocalStore(root), version, root / ".unused-cache")


def test_rollback_switches_to_a_verified_version_and_refuses_others(tmp_path: Path) -> None:
    old = random_version(tmp_path, 1)
    new = random_version(tmp_path, 2)
    assert read_current(tmp_path) == new
    assert rollback(tmp_path, old) == new
    assert read_current(tmp_path) == old
    for bad in ("missing", "../elsewhere", ".staging-x", ""):
        with pytest.raises(ArtifactError):
            rollback(tmp_path, bad)
    (tmp_path / new / "items.json").write_text("[]")  # corrupt: checksum mismatch
    with pytest.raises(ArtifactError, match="checksum"):
        rollback(tmp_path, new)
    assert read_current(tmp_path) == old
    (tmp_path / "CURRENT").write_text("../garbage\n")  # a damaged pointer is repaired
    assert rollback(tmp_path, old) is None
    assert read_current(tmp_path) == old


def test_version_summaries_mark_current_and_incomplete_versions(tmp_path: Path) -> None:
    old = random_version(tmp_path, 1)
    new = random_version(tmp_path, 2, switch=False)
    (tmp_path / "half-written").mkdir()
    found = {s["version"]: s for s in summaries(LocalStore(tmp_path))}
    assert found[old]["current"] and not found[new]["current"]
    assert found[new]["valid_ndcg@10"] == pytest.approx(0.1)
    assert found[new]["index"] == "Flat" and found[new]["items"] == ITEMS
    assert found["half-written"]["complete"] is False
    assert MANIFEST in found["half-written"]["error"]


def test_cli_versions_and_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = random_version(tmp_path, 1)
    new = random_version(tmp_path, 2)
    monkeypatch.setenv("RECSTREAM_ARTIFACTS__ROOT", str(tmp_path))
    runner = CliRunner()

    listing = runner.invoke(app, ["versions"])
    assert listing.exit_code == 0, listing.output
    versions = json.loads(listing.stdout)["versions"]
    assert {v["version"]: v["current"] for v in versions} == {old: False, new: True}
    assert f"* {new}" in listing.stderr  # the readable table marks CURRENT

    back = runner.invoke(app, ["rollback", "--to", old])
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout) == {"current": old, "previous": new}
    assert read_current(tmp_path) == old

    # The console script prints RecstreamError as one `error:` line (tests/unit/test_cli.py).
    missing = runner.invoke(app, ["rollback", "--to", "no-such-version"])
    assert isinstance(missing.exception, ArtifactError)
    assert "recstream versions" in str(missing.exception)
    assert read_current(tmp_path) == old


def test_first_retrain_without_a_live_version_publishes_and_switches(tmp_path: Path) -> None:
    outcome = retrain_here(tmp_path)
    assert outcome.published and outcome.switched
    assert outcome.live_version is None and outcome.live_valid is None
    version = read_current(tmp_path)
    manifest = read_manifest(tmp_path / version)
    assert manifest["retrain"]["live_version"] is None
    assert manifest["training_data"]["users_in_store"] == 30
    assert manifest["training_data"]["interactions"] == 30 * 8


def test_retrain_does_not_switch_when_current_moved_during_the_run(tmp_path: Path) -> None:
    live = random_version(tmp_path, 1)
    other = random_version(tmp_path, 2, switch=False)

    def load_and_roll_back() -> Mapping[str, list[str]]:
        rollback(tmp_path, other)  # an operator's rollback while the job runs
        return walks()

    outcome = retrain_here(tmp_path, load_and_roll_back)
    assert outcome.live_version == live
    assert outcome.published and not outcome.switched
    assert read_current(tmp_path) == other
    assert outcome.version in list_versions(tmp_path)


def test_retrain_refuses_too_little_data_before_training(tmp_path: Path) -> None:
    live = random_version(tmp_path, 1)
    with pytest.raises(NotEnoughData, match="MIN_USERS=100"):
        retrain_here(tmp_path, min_users=100)
    assert read_current(tmp_path) == live and list_versions(tmp_path) == [live]


def test_live_version_is_scored_with_the_training_protocol(tmp_path: Path) -> None:
    """On unchanged data, re-scoring the live version reproduces the validation NDCG@10
    its training recorded: the gate compares like with like."""
    first = retrain_here(tmp_path)
    second = retrain_here(tmp_path)
    assert second.live_version == first.version
    assert second.live_valid is not None and second.live_recorded_valid is not None
    assert second.live_valid["ndcg@10"] == pytest.approx(second.live_recorded_valid, rel=1e-5)
    assert second.live_valid["ndcg@10"] == pytest.approx(first.candidate_valid["ndcg@10"])
    assert second.users == 30
