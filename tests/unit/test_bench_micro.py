"""Encoder and index micro-benchmarks: structure and sanity of quick runs, never timings."""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.config import IndexConfig
from model.errors import ConfigError
from recstream_tools.bench.micro import (
    EncoderResult,
    IndexResult,
    bench_encoder,
    bench_index,
    clustered_vectors,
    interleaved_medians,
    ivf_nlist,
    mixture_centers,
    run_encoder,
    run_index,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(table: str) -> list[str]:
    """Data rows of a markdown table (header and separator dropped)."""
    lines = table.strip().splitlines()
    assert lines[1].startswith("|---")
    return lines[2:]


# One quick run of each benchmark serves every test below: each takes seconds.


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("encoder")
    table = run_encoder(out, "cpu", quick=True, progress=False)
    return out, table, json.loads((out / "encoder.json").read_text())


@pytest.fixture(scope="module")
def index_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("index")
    # quick caps every size, so both collapse to one small catalogue
    table = run_index(out, "cpu", quick=True, sizes=(1_000, 1_000_000), progress=False)
    return out, table, json.loads((out / "index.json").read_text())


def test_encoder_quick_run_covers_every_configuration(
    encoder_run: tuple[Path, str, dict[str, Any]],
) -> None:
    out, table, payload = encoder_run
    assert payload["benchmark"] == "encoder"
    assert payload["environment"]["torch_threads"] >= 1
    results = [EncoderResult(**row) for row in payload["results"]]
    settings = payload["settings"]
    assert [(r.max_len, r.batch_size) for r in results] == [
        (length, batch) for length in settings["max_lens"] for batch in settings["batch_sizes"]
    ]
    for r in results:
        assert r.device == "cpu"
        assert 1 <= r.calls <= settings["repeats"]
        assert 0 < r.median_ms <= r.p99_ms
        assert r.seqs_per_s == pytest.approx(r.batch_size / (r.median_ms / 1000))
    assert len(table_rows(table)) == len(results)
    assert (out / "encoder.png").read_bytes().startswith(PNG_MAGIC)


def test_index_quick_run_recall_against_exact(
    index_run: tuple[Path, str, dict[str, Any]],
) -> None:
    out, table, payload = index_run
    results = [IndexResult(**row) for row in payload["results"]]
    assert {r.items for r in results} == {1_000}
    assert [r.family for r in results] == ["Flat", "IVF{nlist},Flat", "HNSW32"]
    flat, ivf, hnsw = results
    assert flat.recall_at_k == 1.0
    assert 0 < ivf.recall_at_k <= 1
    assert 0 < hnsw.recall_at_k <= 1
    # the builder's own check, on other queries, is kept beside it (exact needs none)
    assert flat.builder_recall_at_k is None
    assert ivf.builder_recall_at_k is not None and 0 < ivf.builder_recall_at_k <= 1
    assert hnsw.builder_recall_at_k is not None and 0 < hnsw.builder_recall_at_k <= 1
    assert ivf.factory == f"IVF{ivf_nlist(1_000)},Flat"
    # The project's query-time settings are applied, as read back from the built index.
    defaults = IndexConfig()
    assert (ivf.nprobe, ivf.ef_search) == (defaults.nprobe, None)
    assert (hnsw.nprobe, hnsw.ef_search) == (None, defaults.ef_search)
    assert (flat.nprobe, flat.ef_search) == (None, None)
    for r in results:
        assert (r.dim, r.k, r.device) == (64, 10, "cpu")
        assert r.build_s > 0
        assert 0 < r.single_median_ms <= r.single_p99_ms
        assert r.batch_qps > 0
    assert len(table_rows(table)) == len(results)
    assert (out / "index.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_index_measures_recall_without_reporting_flat() -> None:
    results = bench_index(
        sizes=(300,),
        factories=("HNSW32",),
        dim=8,
        queries=16,
        device="cpu",
        batch_size=8,
        max_calls=2,
        min_calls=1,
        budget_s=0.0,
        progress=False,
    )
    assert [r.factory for r in results] == ["HNSW32"]
    assert 0 < results[0].recall_at_k <= 1


def test_bench_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        bench_encoder(batch_sizes=(0,), max_lens=(8,), device="cpu", progress=False)
    with pytest.raises(ConfigError):
        bench_encoder(batch_sizes=(1,), max_lens=(1,), device="cpu", progress=False)
    with pytest.raises(ConfigError):
        bench_index(sizes=(5,), device="cpu", progress=False)
    with pytest.raises(ConfigError):
        bench_index(sizes=(100,), factories=(), device="cpu", progress=False)


def test_ivf_nlist_is_about_four_sqrt_n_with_enough_training_points() -> None:
    assert ivf_nlist(1_000_000) == 4000
    assert ivf_nlist(100_000) == 1265
    assert ivf_nlist(10_000) == 256  # 4 * sqrt(N) = 400 would leave k-means short
    assert ivf_nlist(10) == 1


def test_clustered_vectors_are_unit_norm_float32() -> None:
    rng = np.random.default_rng(0)
    centers = mixture_centers(5_000, 16, rng)
    assert centers.shape == (71, 16)
    vectors = clustered_vectors(5_000, centers, rng, chunk=1_000)
    assert vectors.shape == (5_000, 16)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_interleaved_medians_time_each_call_in_turn_after_the_warm_up() -> None:
    order: list[str] = []

    def slow() -> None:
        order.append("slow")
        time.sleep(0.005)  # wall time, no CPU

    medians = interleaved_medians(
        {"fast": lambda: order.append("fast"), "slow": slow}, repeats=3, warmup=2
    )
    assert order == ["fast", "slow"] * 5
    assert set(medians) == {"fast", "slow"}
    (fast_wall, _), (slow_wall, slow_cpu) = medians["fast"], medians["slow"]
    assert fast_wall < 4.0 <= slow_wall  # ms: each call timed on its own
    assert slow_cpu < slow_wall  # a sleep is wall time, not CPU
