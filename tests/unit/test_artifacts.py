"""Versioned artifacts and FAISS indexes, on real files written to a temporary root."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from model.artifacts import (
    INDEX,
    MANIFEST,
    VersionContents,
    list_versions,
    load_version,
    publish_version,
    read_current,
    rebuild_index,
)
from model.config import IndexConfig
from model.errors import ArtifactError, IndexBuildError
from model.index import ExactScorer, build_index, flat_vectors, load_index, save_index, search
from model.sasrec import SASRec, script_encoder
from model.sequences import pad_left

NUM_ITEMS = 300
MAX_LEN = 10


@pytest.fixture(scope="module")
def model() -> SASRec:
    torch.manual_seed(3)
    return SASRec(NUM_ITEMS, MAX_LEN, dim=16, blocks=1, heads=1, dropout=0.0).eval()


def contents_of(model: SASRec) -> VersionContents:
    return VersionContents(
        encoder=script_encoder(model),
        item_embeddings=model.item_embeddings().detach().numpy().copy(),
        item_ids=["<pad>", *(f"item-{i}" for i in range(1, NUM_ITEMS + 1))],
        max_len=MAX_LEN,
        popularity=["item-1", "item-2"],
        info={"metrics": {"valid": {"ndcg@10": 0.1}}},
    )


def test_exact_index_top_k_equals_eager_full_scoring(model: SASRec, tmp_path: Path) -> None:
    version = publish_version(tmp_path, contents_of(model), IndexConfig())
    loaded = load_version(tmp_path)
    assert loaded.version == version
    rng = np.random.default_rng(7)
    seqs = [rng.integers(1, NUM_ITEMS + 1, size=rng.integers(1, 15)) for _ in range(64)]
    batch = torch.from_numpy(pad_left(seqs, MAX_LEN))
    with torch.no_grad():
        eager_scores = model.score_all(batch)[:, 1:]  # drop padding column
        user_vectors = loaded.encoder(batch).numpy()
    k = 10
    expected = torch.topk(eager_scores, k, dim=1).indices.numpy() + 1
    # FAISS's own search, and the worker's scorer over the same index.
    for scorer in (None, ExactScorer.of(loaded.index)):
        _, ids = search(loaded.index, user_vectors, k, scorer)
        assert (ids == expected).all()


def test_publish_writes_manifest_with_checksums_and_switches_current(
    model: SASRec, tmp_path: Path
) -> None:
    version = publish_version(tmp_path, contents_of(model), IndexConfig())
    assert read_current(tmp_path) == version
    manifest = json.loads((tmp_path / version / MANIFEST).read_text())
    assert manifest["version"] == version
    assert manifest["dims"] == 16 and manifest["max_len"] == MAX_LEN
    assert manifest["num_items"] == NUM_ITEMS
    assert manifest["index"]["factory"] == "Flat"
    assert set(manifest["files"]) >= {"encoder.pt", "item_embeddings.npy", "items.json", INDEX}
    assert manifest["popularity"] == ["item-1", "item-2"]
    # No staging directories are left behind.
    assert list_versions(tmp_path) == [version]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_checksum_mismatch_fails_loudly(model: SASRec, tmp_path: Path) -> None:
    version = publish_version(tmp_path, contents_of(model), IndexConfig())
    items = tmp_path / version / "items.json"
    items.write_text(items.read_text().replace("item-1", "item-X"))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for items\.json"):
        load_version(tmp_path)


def test_missing_file_and_missing_current(model: SASRec, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no CURRENT"):
        load_version(tmp_path)
    version = publish_version(tmp_path, contents_of(model), IndexConfig())
    (tmp_path / version / INDEX).unlink()
    with pytest.raises(ArtifactError, match=r"index\.faiss is missing"):
        load_version(tmp_path)


def test_failed_publish_leaves_current_untouched(model: SASRec, tmp_path: Path) -> None:
    first = publish_version(tmp_path, contents_of(model), IndexConfig())
    with pytest.raises(IndexBuildError):
        publish_version(tmp_path, contents_of(model), IndexConfig(factory="NoSuchIndex"))
    assert read_current(tmp_path) == first
    assert list_versions(tmp_path) == [first]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_rebuild_index_keeps_model_and_reports_recall(model: SASRec, tmp_path: Path) -> None:
    first = publish_version(tmp_path, contents_of(model), IndexConfig())
    cfg = IndexConfig(factory="IVF8,Flat", nprobe=8, recall_queries=200)
    second = rebuild_index(tmp_path, first, cfg)
    assert read_current(tmp_path) == second
    loaded = load_version(tmp_path)
    assert loaded.model_version == first
    assert loaded.index_version == second
    assert loaded.manifest["index"]["factory"] == "IVF8,Flat"
    # nprobe == nlist searches every list: as good as exact.
    assert loaded.manifest["index"]["recall@10"] == pytest.approx(1.0)
    old = load_version(tmp_path, first)
    assert np.array_equal(old.item_embeddings, loaded.item_embeddings)


def test_approximate_index_recall_is_measured() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    _, report = build_index(vectors, IndexConfig(factory="HNSW16", ef_search=8, recall_queries=300))
    assert report.recall_at_k is not None and 0.3 < report.recall_at_k <= 1.0
    _, exact = build_index(vectors, IndexConfig())
    assert exact.recall_at_k is None


def test_ivf_with_too_few_items_is_a_clear_error() -> None:
    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    with pytest.raises(IndexBuildError, match="needs at least 64 items"):
        build_index(vectors, IndexConfig(factory="IVF64,Flat"))


@pytest.mark.parametrize("items", [20_000, 64 * 400, 130])
def test_the_exact_scorer_returns_what_faiss_returns(tmp_path: Path, items: int) -> None:
    rng = np.random.default_rng(items)
    vectors = rng.standard_normal((items, 16)).astype(np.float32)
    index, _ = build_index(vectors, IndexConfig())
    view = flat_vectors(index)
    assert view is not None and np.shares_memory(view, faiss.rev_swig_ptr(index.get_xb(), 1))
    scorer = ExactScorer.of(index)
    assert scorer is not None
    # Scoring a few rows at a time (large batches, large catalogues) changes nothing.
    chunked = ExactScorer(view, max_score_mb=7 * scorer.vectors_t.shape[1] * 4 / 2**20)
    assert chunked.chunk_rows == 7
    # Top-k in two steps over blocks of 64 items, the last one full or part empty, and
    # (130 items, k 120) a plain top-k where the blocks are few.
    for k in (1, 10, 25, 120):
        queries = rng.standard_normal((40, 16)).astype(np.float32)
        scores, ids = search(index, queries, k, scorer)
        faiss_scores, faiss_ids = index.search(queries, min(k, items))
        # The same scores, rank by rank, each the true score of the item returned
        # (items whose scores differ in the last bit may swap places).
        assert np.allclose(scores, faiss_scores, atol=1e-4)
        true = np.take_along_axis(queries.astype(np.float64) @ vectors.T, ids - 1, axis=1)
        assert np.allclose(scores, true, atol=1e-4)
        assert np.mean(ids == faiss_ids + 1) > 0.99
        chunked_scores, chunked_ids = search(index, queries, k, chunked)
        assert np.allclose(chunked_scores, scores, atol=1e-5)
        assert np.mean(chunked_ids == ids) > 0.99
    # As the worker loads it from a version directory.
    save_index(index, tmp_path / "index.faiss")
    assert ExactScorer.of(load_index(tmp_path / "index.faiss", IndexConfig())) is not None
    # Approximate indexes keep FAISS's own search.
    ivf, _ = build_index(vectors, IndexConfig(factory="IVF2,Flat"))
    assert flat_vectors(ivf) is None and ExactScorer.of(ivf) is None
