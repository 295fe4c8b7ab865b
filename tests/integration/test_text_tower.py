"""Item text end to end with the real sentence model (all-MiniLM-L6-v2 from its wheel):
`train --items` fits the text tower, `add-items` publishes new items that the serving
path uses in histories and can rank, and the cold-item protocol runs on generated data
with timestamps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.artifacts import PROJECTION, load_version, read_current, read_manifest
from model.item_text import Projection, TextEncoder
from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import page
from stream_worker.produce import generated_log
from stream_worker.recommender import Recommender
from stream_worker.store import run_migrations
from tests.integration.worker_harness import (
    TINY_ENV,
    Reader,
    WorkerProcess,
    cli,
    new_topics,
    send,
    worker_env,
)

pytestmark = pytest.mark.integration

GENRES = ["comedy", "horror", "romance", "western", "science fiction"]


def text_of(n: int) -> dict[str, Any]:
    return {"item_id": f"item-{n}", "title": f"Film number {n}",
            "genres": [GENRES[n % 5], GENRES[(n // 5) % 5]]}  # fmt: skip


def error_line(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "stream_worker.cli", *args],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, **TINY_ENV})  # fmt: skip
    assert done.returncode == 2, done.stderr
    # One error line, last, after any progress logging; no traceback.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_with_items(tmp_path: Path, root: Path) -> str:
    """`recstream train --items` on generated walks over items 0-39, each with a text;
    the version published."""
    walks = tmp_path / "walks.txt"
    sequences = generated_log(users=60, items=40, length=25, seed=3)
    walks.write_text("".join(f"{u} {i}\n" for u, items in sequences.items() for i in items))
    items = write_jsonl(tmp_path / "items.jsonl", [text_of(n) for n in range(40)])
    published = cli("train", "--data", str(walks), "--format", "sasrec", "--out", str(root),
                     "--epochs", "2", "--no-progress", "--items", str(items))  # fmt: skip
    return str(published["version"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)


def test_train_with_items_then_add_items_serves_new_items(env: None, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    first = train_with_items(tmp_path, root)
    manifest = read_manifest(root / first)
    assert manifest["text_tower"]["items_with_text"] == 40
    assert manifest["text_tower"]["model"] == "all-MiniLM-L6-v2"
    assert PROJECTION in manifest["files"]  # checksummed like every file of a version

    new = [text_of(100), text_of(101)]
    added = cli("add-items", "--artifacts", str(root), "--items",
                str(write_jsonl(tmp_path / "new.jsonl", [*new, text_of(3)])))  # fmt: skip
    assert added["added"] == 2 and added["already_known"] == 1 and added["source"] == first
    second = added["version"]
    assert read_current(root) == second
    loaded = load_version(root, second)
    assert loaded.item_ids[-2:] == ["item-100", "item-101"]
    assert loaded.index is not None and loaded.index.ntotal == 42
    assert loaded.model_version == first  # the model's weights are unchanged
    # Each new row is the projection of its text; the old rows are untouched.
    projection = Projection.load(root / second / PROJECTION)
    texts = [f"title: Film number {n}; genres: {GENRES[n % 5]}, {GENRES[(n // 5) % 5]}"
             for n in (100, 101)]  # fmt: skip
    expected = projection.apply(TextEncoder().embed(texts))
    np.testing.assert_allclose(loaded.item_embeddings[-2:], expected, atol=1e-5)
    before = load_version(root, first)
    np.testing.assert_array_equal(loaded.item_embeddings[:-2], before.item_embeddings)

    # Served: a history of only new items is encoded (not answered with the popularity
    # fallback), and a new item can come back as a result of the index.
    served = Recommender.load(root, second, "cpu")
    ranked = served.recommend({"u": ["item-100"]}, 41)
    assert [item for item, _ in ranked["u"]] != before.manifest["popularity"][:41]
    assert "item-101" in {item for item, _ in ranked["u"]}
    old = Recommender.load(root, first, "cpu")
    assert [i for i, _ in old.recommend({"u": ["item-100"]}, 5)["u"]] == (
        before.manifest["popularity"][:5]  # unknown to the old version: the fallback
    )

    # The projection survives an index rebuild, so items can be added again after one.
    rebuilt = cli("build-index", "--artifacts", str(root), "--factory", "HNSW8")["version"]
    again = cli("add-items", "--artifacts", str(root), "--items",
                str(write_jsonl(tmp_path / "more.jsonl", [text_of(102)])))  # fmt: skip
    assert again["source"] == rebuilt and again["added"] == 1
    assert "already in version" in error_line(
        "add-items", "--artifacts", str(root), "--items", str(tmp_path / "more.jsonl")
    )


def test_add_items_needs_a_version_trained_with_items(env: None, tmp_path: Path) -> None:
    walks = tmp_path / "walks.txt"
    sequences = generated_log(users=30, items=20, length=10, seed=1)
    walks.write_text("".join(f"{u} {i}\n" for u, items in sequences.items() for i in items))
    root = tmp_path / "artifacts"
    cli("train", "--data", str(walks), "--format", "sasrec", "--out", str(root),
        "--epochs", "1", "--no-progress")  # fmt: skip
    new = write_jsonl(tmp_path / "new.jsonl", [text_of(100)])
    assert "train with --items" in error_line(
        "add-items", "--artifacts", str(root), "--items", str(new)
    )
    assert "needs --items" in error_line(
        "evaluate", "--data", str(walks), "--artifacts", str(root), "--protocol", "cold-items"
    )
    assert "unknown --protocol" in error_line(
        "evaluate", "--data", str(walks), "--artifacts", str(root), "--protocol", "nope"
    )
    # Without timestamps there is no "last 10% of the time span".
    assert "needs a timestamp" in error_line(
        "train", "--data", str(walks), "--format", "sasrec", "--out", str(root),
        "--protocol", "cold-items", "--items", str(new), "--no-progress",
    )  # fmt: skip


def test_the_cold_item_protocol_withholds_late_items_and_scores_them(
    env: None, tmp_path: Path
) -> None:
    """Items 40-44 appear only in the last tenth of the time span: withheld from
    training, then placed from their text and ranked as the targets of their events."""
    rng = np.random.default_rng(0)
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(80):
        start = int(rng.integers(0, 40))
        for t in range(20):  # warm walks over the first 90% of the span
            rows.append(f"u{u}\titem-{(start + t) % 40}\t1\t{1000 + u * 20 + t}")
        for t in range(3):  # then late clicks, some on the new items
            item = 40 + int(rng.integers(0, 5)) if t == 1 else (start + 20 + t) % 40
            rows.append(f"u{u}\titem-{item}\t1\t{100_000 + u * 3 + t}")
    data = tmp_path / "log.inter"
    data.write_text("\n".join(rows) + "\n")
    items = write_jsonl(tmp_path / "items.jsonl", [text_of(n) for n in range(45)])
    root = tmp_path / "artifacts"
    cli("train", "--data", str(data), "--out", str(root), "--epochs", "2", "--no-progress",
        "--items", str(items), "--protocol", "cold-items")  # fmt: skip
    loaded = load_version(root)
    assert loaded.manifest["training_data"]["protocol"]["cold_items"] == 5
    assert not {f"item-{n}" for n in range(40, 45)} & set(loaded.item_ids)
    result = cli("evaluate", "--data", str(data), "--artifacts", str(root),
                 "--items", str(items), "--protocol", "cold-items")  # fmt: skip
    assert result["protocol"]["cold_items"] == 5 and result["cold_items_with_text"] == 5
    assert result["test_events"] == 80  # one click on a new item per user
    for scores in (result, result["cold_only"], *result["baseline"].values(),
                   *result["warm"].values()):  # fmt: skip
        assert 0 <= scores["ndcg@10"] <= scores["hr@10"] <= 1
    # Among 5 cold items, any top 10 holds the target.
    assert result["cold_only"]["hr@10"] == 1.0 and result["baseline"]["random"]["hr@10"] == 1.0


def test_a_worker_takes_up_added_items_in_histories_and_results(
    env: None, broker: KafkaCluster, tmp_path: Path
) -> None:
    """Before `add-items`, a click on an unknown item is answered (the popularity
    fallback) and kept in the user's state; after it, the same user's history, new
    items included, is encoded by the new version, as offline."""
    root = tmp_path / "artifacts"
    first = train_with_items(tmp_path, root)
    topics = new_topics(broker.bootstrap_servers, "text-")
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env_vars = worker_env(broker.bootstrap_servers, db_url, root, topics, tmp_path)
    worker = WorkerProcess(env_vars, tmp_path / "worker.log").start()
    port = int(env_vars["RECSTREAM_WORKER__WEB_PORT"])
    bootstrap = broker.bootstrap_servers
    try:
        with Reader(bootstrap, topics["recommendations"]) as reader:
            send(bootstrap, topics["events"], [("e1", "shopper", "item-100")])
            reader.read_until(lambda vs: any(v["source_event_id"] == "e1" for v in vs))
            answer = next(v for v in reader.values if v["source_event_id"] == "e1")
            popularity = read_manifest(root / first)["popularity"]
            assert [i["item_id"] for i in answer["items"]] == popularity[:5]

            second = cli("add-items", "--artifacts", str(root), "--items",
                         str(write_jsonl(tmp_path / "new.jsonl",
                                         [text_of(100), text_of(101)])))["version"]  # fmt: skip
            deadline = time.monotonic() + 60
            while page(port, "/ready")[1]["version"] != second:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                nudge = f"nudge-{uuid.uuid4().hex}"
                send(bootstrap, topics["events"], [(nudge, nudge, "item-1")])
                time.sleep(0.3)
            send(bootstrap, topics["events"], [("e2", "shopper", "item-101")])
            reader.read_until(lambda vs: any(v["source_event_id"] == "e2" for v in vs))
            answer = next(v for v in reader.values if v["source_event_id"] == "e2")
        assert answer["index_version"] == second
        offline = Recommender.load(root, second, "cpu").recommend(
            {"shopper": ["item-100", "item-101"]}, 5
        )["shopper"]
        assert [i["item_id"] for i in answer["items"]] == [item for item, _ in offline]
        assert [i["item_id"] for i in answer["items"]] != popularity[:5]
    finally:
        assert worker.stop() == 0


def test_the_retrain_job_keeps_the_text_tower_when_given_the_items(tmp_path: Path) -> None:
    from model.config import IndexConfig, TrainConfig
    from model.retrain import run_retrain

    cfg = TrainConfig(max_len=8, dim=16, blocks=1, heads=1, dropout=0.0, epochs=1,
                      batch_size=64, device="cpu")  # fmt: skip
    walks = generated_log(users=30, items=20, length=8, seed=1)
    outcome = run_retrain(
        tmp_path, lambda: walks, {"source": "test"}, cfg, IndexConfig(), quality_margin=1.0,
        min_users=10, item_texts={f"item-{n}": f"title: Film number {n}" for n in range(20)},
    )  # fmt: skip
    assert outcome.published and outcome.version is not None
    assert (tmp_path / outcome.version / PROJECTION).is_file()
    assert read_manifest(tmp_path / outcome.version)["text_tower"]["items_with_text"] == 20
