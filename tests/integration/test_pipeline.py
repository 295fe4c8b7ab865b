"""BatchProcessor against a real SQLite file and real artifacts (no broker needed)."""

import json
import logging
import math
import queue
import shutil
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from sqlalchemy import select

from model.artifact_store import LocalStore, promote, start_canary, switch
from model.artifacts import VersionContents, load_version, publish_version
from model.config import IndexConfig
from stream_worker.app import create_app
from stream_worker.events import event_value
from stream_worker.metrics import WorkerMetrics
from stream_worker.pipeline import BatchProcessor, RawRecord
from stream_worker.recommender import (
    Recommender,
    StageTimes,
    VersionWatcher,
    in_canary,
    length_buckets,
    search_depth,
)
from stream_worker.replay_eval import offline_answers, plan
from stream_worker.settings import Settings
from stream_worker.store import (
    load_sequences,
    make_engine,
    run_migrations,
    stored_offsets,
    user_sequences,
)
from tests.integration.worker_harness import TinyModel, publish_tiny_model, tiny_event_type

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


def processor(tiny: TinyModel, tmp_path: Path, **worker: object) -> BatchProcessor:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(url)
    settings = Settings.model_validate(
        {"worker": {"top_k": 5, **worker}, "artifacts": {"root": str(tiny.root)}}
    )
    cache_bytes = settings.worker.encoder_cache_mb * 2**20
    watcher = VersionWatcher(LocalStore(tiny.root), "cpu", 60.0, cache_bytes=cache_bytes)
    return BatchProcessor(settings, make_engine(url), watcher, WorkerMetrics())


def records(
    events: list[tuple[str, str, str]], start: int = 0, types: list[str] | None = None
) -> list[RawRecord]:
    now = int(time.time() * 1000)
    kinds = types or ["view"] * len(events)
    return [
        RawRecord(user.encode(), event_value(eid, user, item, kind, now), 0, start + n)
        for n, ((eid, user, item), kind) in enumerate(zip(events, kinds, strict=True))
    ]


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("typed"), event_types=True)


@pytest.mark.parametrize("cache_mb", [0, 16])
def test_a_model_with_event_types_reads_them_from_the_events_and_the_state(
    typed: TinyModel, tmp_path: Path, cache_mb: int
) -> None:
    proc = processor(typed, tmp_path, encoder_cache_mb=cache_mb)
    items = ["item-1", "item-2", "item-3", "item-4"]
    kinds = ["purchase", "view", "add_to_cart", "click"]
    first = proc.process(records([("e1", "u", items[0]), ("e2", "u", items[1])], 0, kinds[:2]))
    # The next batch reads the first two types back from the database.
    second = proc.process(records([("e3", "u", items[2]), ("e4", "u", items[3])], 2, kinds[2:]))
    got = [[i["item_id"] for i in json.loads(v)["items"]] for _, v in
           [*first.recommendations, *second.recommendations]]  # fmt: skip
    assert got == [
        typed.offline_top_k(items[:2], 5, kinds[:2]),
        typed.offline_top_k(items, 5, kinds),
    ]
    # The types count: the worker's scores are those of the types sent, and the same
    # items as views, or of types not known, score otherwise (the tiny model's top 5
    # may not change).
    answered = json.loads(second.recommendations[-1][1])["items"]
    rows = [typed.item_ids.index(i["item_id"]) for i in answered]
    scores = torch.tensor([i["score"] for i in answered])
    assert torch.allclose(scores, typed.offline_scores(items, kinds)[rows], atol=1e-4)
    for other in (["view"] * 4, ["?"] * 4):
        assert (scores - typed.offline_scores(items, other)[rows]).abs().max() > 1e-2


def test_replay_eval_offline_answers_read_event_types(typed: TinyModel) -> None:
    items, kinds = ["item-3", "item-1", "item-7"], ["click", "purchase", "view"]
    users = plan({"u": [*items, "item-9"]}, event_types={"u": [*kinds, "view"]})
    assert users[0].types == kinds
    answers = offline_answers(load_version(typed.root), users, k=5)
    assert answers["u"].items == typed.offline_top_k(items, 5, kinds)


def test_a_redelivered_batch_is_answered_with_its_stored_types(
    typed: TinyModel, tmp_path: Path
) -> None:
    proc = processor(typed, tmp_path)
    items, kinds = ["item-3", "item-1"], ["add_to_cart", "view"]
    batch = records([("e1", "u", items[0]), ("e2", "u", items[1])], 0, kinds)
    first = proc.process(batch)
    again = proc.process(batch)  # nothing applied: the types come from the database
    answers = [[i["item_id"] for i in json.loads(out.recommendations[0][1])["items"]]
               for out in (first, again)]  # fmt: skip
    assert answers == [typed.offline_top_k(items, 5, kinds)] * 2
    assert answers[1] != typed.offline_top_k(items, 5, ["?", "?"])  # types not known


def test_event_types_per_event(typed: TinyModel, tmp_path: Path) -> None:
    proc = processor(typed, tmp_path, emit_per_event=True)
    kinds = [tiny_event_type("u", n) for n in range(2)]
    out = proc.process(records([("e1", "u", "item-1"), ("e2", "u", "item-2")], 0, kinds))
    recs = [[i["item_id"] for i in json.loads(v)["items"]] for _, v in out.recommendations]
    assert recs == [
        typed.offline_top_k(["item-1"], 5, kinds[:1]),
        typed.offline_top_k(["item-1", "item-2"], 5, kinds),
    ]


def test_several_events_of_a_user_give_one_recommendation_for_the_latest_state(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path)
    batch = records([("e1", "u", "item-1"), ("e2", "u", "item-2"), ("e3", "u", "item-3")])
    out = proc.process(batch)
    assert len(out.recommendations) == 1
    key, value = out.recommendations[0]
    rec = json.loads(value)
    assert key == b"u" and rec["source_event_id"] == "e3"
    items = [i["item_id"] for i in rec["items"]]
    assert items == tiny.offline_top_k(["item-1", "item-2", "item-3"], 5)


def test_emit_per_event_gives_one_recommendation_per_state(tiny: TinyModel, tmp_path: Path) -> None:
    proc = processor(tiny, tmp_path, emit_per_event=True)
    out = proc.process(records([("e1", "u", "item-1"), ("e2", "u", "item-2")]))
    recs = [json.loads(v) for _, v in out.recommendations]
    assert [r["source_event_id"] for r in recs] == ["e1", "e2"]
    assert [i["item_id"] for i in recs[0]["items"]] == tiny.offline_top_k(["item-1"], 5)
    assert [i["item_id"] for i in recs[1]["items"]] == tiny.offline_top_k(["item-1", "item-2"], 5)


def test_unknown_items_get_the_popularity_fallback(tiny: TinyModel, tmp_path: Path) -> None:
    proc = processor(tiny, tmp_path)
    out = proc.process(records([("e1", "new-user", "never-seen-item")]))
    rec = json.loads(out.recommendations[0][1])
    popularity = tiny_popularity(tiny)
    assert [i["item_id"] for i in rec["items"]] == popularity[:5]


def tiny_popularity(tiny: TinyModel) -> list[str]:
    manifest = json.loads((tiny.root / tiny.version / "manifest.json").read_text())
    return list(manifest["popularity"])


def test_a_redelivered_batch_is_not_applied_twice_but_still_answered(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path)
    batch = records([("e1", "u", "item-1"), ("e2", "v", "item-2")])
    first = proc.process(batch)
    again = proc.process(batch)
    assert load_sequences(proc.engine, ["u", "v"]) == {"u": ["item-1"], "v": ["item-2"]}
    assert sorted(k for k, _ in again.recommendations) == [b"u", b"v"]
    assert [json.loads(v)["items"] for _, v in sorted(first.recommendations)] == [
        json.loads(v)["items"] for _, v in sorted(again.recommendations)
    ]


def test_bad_records_become_dead_letters_and_good_ones_still_flow(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path)
    batch = [RawRecord(b"u", b"{oops", 0, 0), *records([("e1", "u", "item-1")], start=1)]
    out = proc.process(batch)
    assert len(out.dead_letters) == 1
    assert json.loads(out.dead_letters[0][1])["reason"] == "not_json"
    assert len(out.recommendations) == 1
    assert set(out.stages_ms) == {"decode", "db", "encode", "search", "rank"}


def test_stored_offsets_cover_bad_records_so_a_resume_does_not_reread_them(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path)
    topic = proc.settings.topics.events
    good = records([("e1", "u", "item-1")], start=0)
    proc.process([*good, RawRecord(b"u", b"{oops", 0, 1), RawRecord(b"v", b"[]", 1, 7)])
    assert stored_offsets(proc.engine, topic) == {0: 1, 1: 7}
    # A batch of bad records only still moves the stored position.
    out = proc.process([RawRecord(None, b"\xff", 1, 8)])
    assert len(out.dead_letters) == 1 and not out.recommendations
    assert stored_offsets(proc.engine, topic) == {0: 1, 1: 8}


@pytest.mark.parametrize("encode_rows", [256, 2])
def test_recommender_equals_the_eager_model_for_mixed_lengths_and_crowded_rankings(
    tiny: TinyModel, encode_rows: int
) -> None:
    # Lengths from 1 to past max_len land in different padding buckets (cut further
    # into encoder calls of at most encode_rows); long histories of 30+ of the 40 items
    # make seen items crowd the first search pass (re-searched).
    recommender = Recommender.load(tiny.root, device="cpu")
    recommender.encode_rows = encode_rows
    rng = np.random.default_rng(3)
    items = tiny.item_ids[1:]
    sequences = {
        f"u{n}": [str(x) for x in rng.choice(items, size=int(length), replace=length > 35)]
        for n, length in enumerate([1, 2, 3, 5, 9, 17, 20, 33, 36, 39, 60])
    }
    ranked = recommender.recommend(sequences, 5)
    for user, sequence in sequences.items():
        assert [item for item, _ in ranked[user]] == tiny.offline_top_k(sequence, 5), user


@pytest.mark.parametrize("encode_rows", [256, 2])
def test_incremental_encoding_gives_the_full_encoders_vectors_as_histories_grow(
    tiny: TinyModel, encode_rows: int
) -> None:
    """Batches of growing histories through the cache (extend, same, and full once a
    window slides or a history is rewritten) against the same version without it."""
    cached = Recommender.load(tiny.root, device="cpu", cache_bytes=2**20)
    plain = Recommender.load(tiny.root, device="cpu")
    cached.encode_rows = plain.encode_rows = encode_rows
    assert cached.cache is not None and plain.cache is None
    rng = np.random.default_rng(11)
    num_items, max_len = len(tiny.item_ids) - 1, cached.loaded.max_len
    histories: dict[str, list[int]] = {f"u{n}": [] for n in range(12)}
    seen: dict[str, int] = {}
    for step in range(30):
        users = sorted(rng.choice(sorted(histories), size=5, replace=False))
        for user in users:
            histories[user] += rng.integers(1, num_items + 1, size=rng.integers(0, 4)).tolist()
        if step == 15:  # another writer changed a history the cache has seen
            histories[users[0]][:1] = [num_items + 1 - histories[users[0]][0]]
        batch = [histories[u] or [1] for u in users]
        times = StageTimes()
        got = cached.user_vectors(batch, users, times)
        assert np.allclose(got, plain.user_vectors(batch), atol=1e-5), step
        for kind, count in times.reuse.items():
            seen[kind] = seen.get(kind, 0) + count
    assert seen.keys() == {"same", "extend", "full"}
    assert any(len(h) > max_len for h in histories.values())  # windows did slide


def test_the_worker_answers_from_the_cache_what_the_full_model_answers(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path, emit_per_event=True)
    items = tiny.item_ids[1:]
    sequence: list[str] = []
    for batch in range(4):
        new = items[batch * 3 : batch * 3 + 3]
        events = [(f"e{batch}-{n}", "u", item) for n, item in enumerate(new)]
        out = proc.process(records(events, start=batch * 3))
        for n, (_, value) in enumerate(out.recommendations):
            state = [*sequence, *new[: n + 1]]
            got = [i["item_id"] for i in json.loads(value)["items"]]
            assert got == tiny.offline_top_k(state, 5), (batch, n)
        sequence += new
    exposition = proc.metrics.exposition().decode()
    assert 'recstream_encoded_histories_total{reuse="extend"} 9.0' in exposition


def test_a_version_exported_without_the_incremental_path_is_served_in_full(
    tiny: TinyModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class ForwardOnly(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, seqs: torch.Tensor) -> torch.Tensor:
            return self.model.encode(seqs)

    source = load_version(tiny.root, tiny.version)
    with warnings.catch_warnings():  # torch.jit's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(ForwardOnly(tiny.model))
    contents = VersionContents(
        encoder=scripted,
        item_embeddings=source.item_embeddings,
        item_ids=source.item_ids,
        max_len=source.max_len,
        popularity=source.manifest["popularity"],
        info={},
    )
    root = tmp_path / "artifacts"
    publish_version(root, contents, IndexConfig())
    with caplog.at_level(logging.WARNING):
        recommender = Recommender.load(root, device="cpu", cache_bytes=2**20)
    assert recommender.cache is None
    assert "no incremental path" in caplog.text
    sequence = list(tiny.item_ids[1:6])
    ranked = recommender.recommend({"u": sequence}, 5, cache_keys={"u": "u"})
    assert [item for item, _ in ranked["u"]] == tiny.offline_top_k(sequence, 5)


def test_length_buckets_keep_every_row_once_within_the_ratio() -> None:
    lengths = [1, 200, 3, 4, 50, 2, 8, 9, 120, 1]
    for max_rows in (None, 2):
        groups = length_buckets(lengths, max_rows=max_rows)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for group in groups:
            assert max(lengths[i] for i in group) <= 2 * max(1, min(lengths[i] for i in group))
            assert max_rows is None or len(group) <= max_rows
    assert max(map(len, length_buckets(lengths))) > 2
    assert search_depth(10, 5) == 15 and search_depth(10, 500) == 42


def test_the_batch_and_watcher_threads_run_torch_and_faiss_on_the_configured_threads(
    tiny: TinyModel, tmp_path: Path
) -> None:
    # OpenMP keeps thread counts per thread: the main thread's setting alone would
    # leave the batch thread on one thread per core.
    url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(url)
    settings = Settings.model_validate(
        {"worker": {"cpu_threads": 1, "web_port": 0}, "artifacts": {"root": str(tiny.root)}}
    )
    ctx = create_app(settings, make_engine(url))
    # The version watcher's thread loads and warms up new versions: it sets them too.
    setup, in_watcher = ctx.watcher.thread_setup, queue.Queue[int]()

    def setup_and_report() -> None:
        assert setup is not None
        setup()
        in_watcher.put(faiss.omp_get_max_threads())

    ctx.watcher.thread_setup = setup_and_report
    ctx.watcher.start()
    try:
        threads = ctx.executor.submit(faiss.omp_get_max_threads).result()
        assert in_watcher.get(timeout=10) == 1
    finally:
        ctx.executor.shutdown()
        ctx.watcher.stop()
    assert threads == 1


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_next_event_is_scored_against_the_last_published_top_k(
    tiny: TinyModel, tmp_path: Path
) -> None:
    """Online evaluation: what a batch publishes to a user is stored with the state (top
    10, for a served top 5); the user's next event is a hit at k when its item is in the
    top k of that list, and counts toward the version that ranked it."""
    proc = processor(tiny, tmp_path)
    version = tiny.version
    first = proc.process(records([("e1", "u", "item-1"), ("e1", "v", "item-7")]))
    published = {json.loads(v)["user_id"]: json.loads(v) for _, v in first.recommendations}
    stored = stored_last(proc)
    # Kept with the state: the top 10 (5 served), by the serving version.
    assert stored["u"] == (tiny.offline_top_k(["item-1"], 10), version)
    assert [i["item_id"] for i in published["u"]["items"]] == stored["u"][0][:5]
    assert sample(proc.metrics, "recstream_online_scored_total", model_version=version) == 0
    # u's next item is its 1st recommendation (rank 0), v's its 8th (rank 7); w is new.
    u_item, v_item = stored["u"][0][0], stored["v"][0][7]
    proc.process(records([("e2", "u", u_item), ("e2", "v", v_item), ("e2", "w", "item-2")], 2))
    scored = sample(proc.metrics, "recstream_online_scored_total", model_version=version)
    assert scored == 2
    hits = {k: sample(proc.metrics, "recstream_online_hits_total", model_version=version, k=k)
            for k in ("5", "10")}  # fmt: skip
    assert hits == {"5": 1, "10": 2}
    ndcg10 = sample(proc.metrics, "recstream_online_ndcg_total", model_version=version, k="10")
    assert ndcg10 == pytest.approx(1.0 + 1.0 / math.log2(9))
    # Every recommendation came from the model (each user had a known item).
    assert sample(proc.metrics, "recstream_recommendations_total", model_version=version,
                  source="model") == 5  # fmt: skip
    coverage = sample(proc.metrics, "recstream_online_coverage", model_version=version)
    assert 0 < coverage <= 1


def test_a_user_with_no_known_item_counts_as_a_popularity_fallback(
    tiny: TinyModel, tmp_path: Path
) -> None:
    proc = processor(tiny, tmp_path)
    proc.process(records([("e1", "u", "never-seen"), ("e1", "v", "item-3")]))
    version = tiny.version
    assert sample(proc.metrics, "recstream_recommendations_total", model_version=version,
                  source="popularity") == 1  # fmt: skip
    assert stored_last(proc)["u"] == (tiny.popularity[:10], version)


def stored_last(proc: BatchProcessor) -> dict[str, tuple[list[str], str]]:
    c = user_sequences.c
    with proc.engine.connect() as conn:
        rows = conn.execute(select(c.user_id, c.last_recommended, c.last_model_version))
        return {user: (list(items), str(version)) for user, items, version in rows}


# ------------------------------------------------------------------------------ canary


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyModel, TinyModel]:
    """(live, candidate): two models trained with different seeds into one root,
    CURRENT on the live one."""
    root = tmp_path_factory.mktemp("two-versions")
    candidate = publish_tiny_model(root, seed=1)
    live = publish_tiny_model(root, seed=0)  # published last: CURRENT names it
    return live, candidate


def canary_processor(root: Path, tmp_path: Path, **worker: object) -> BatchProcessor:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(url)
    settings = Settings.model_validate({"worker": {"top_k": 5, **worker}})
    watcher = VersionWatcher(LocalStore(root), "cpu", 60.0, cache_bytes=2**22)
    return BatchProcessor(settings, make_engine(url), watcher, WorkerMetrics())


@pytest.mark.parametrize("emit_per_event", [False, True])
def test_a_canary_serves_its_users_and_is_scored_and_promoted_apart(
    two_versions: tuple[TinyModel, TinyModel], tmp_path: Path, emit_per_event: bool
) -> None:
    """Each user gets the top-K of the version that serves it (a stable hash share),
    tagged with that version; online scores are kept per version; the two encoder caches
    share one budget; a promoted canary serves everyone without being loaded again."""
    live, candidate = two_versions
    store = LocalStore(live.root)
    start_canary(store, candidate.version, 0.4, tmp_path / "cache")
    try:
        proc = canary_processor(live.root, tmp_path, emit_per_event=emit_per_event)
        serving = proc.watcher.serving
        assert serving.canary is not None and serving.share == 0.4
        assert serving.live.cache is not None and serving.canary.cache is not None
        assert serving.live.cache.max_bytes + serving.canary.cache.max_bytes == 2**22
        users = [f"u{n}" for n in range(40)]
        walks = {
            user: [f"item-{(n * 7 + t) % 40}" for t in range(3)] for n, user in enumerate(users)
        }
        expected = {
            user: candidate if in_canary(user, candidate.version, 0.4) else live for user in users
        }
        assert 0 < sum(m is candidate for m in expected.values()) < len(users)
        # Two clicks per user, then a third: the third is scored against the second's list.
        first = [(f"{u}-{t}", u, walks[u][t]) for t in range(2) for u in users]
        out = proc.process(records(first))
        per_user = 2 if emit_per_event else 1
        assert len(out.recommendations) == per_user * len(users)
        for _, value in out.recommendations:
            rec = json.loads(value)
            model = expected[rec["user_id"]]
            assert rec["model_version"] == model.version
            n = int(rec["source_event_id"].rsplit("-", 1)[1]) + 1
            want = model.offline_top_k(walks[rec["user_id"]][:n], 5)
            assert [i["item_id"] for i in rec["items"]] == want, rec
        proc.process(records([(f"{u}-2", u, walks[u][2]) for u in users], len(first)))
        for model in (live, candidate):
            scored = sample(proc.metrics, "recstream_online_scored_total",
                            model_version=model.version)  # fmt: skip
            assert scored == sum(m is model for m in expected.values())
            assert sample(proc.metrics, "recstream_online_coverage",
                          model_version=model.version) > 0  # fmt: skip
        stored = stored_last(proc)
        assert {u: v for u, (_, v) in stored.items()} == {u: m.version for u, m in expected.items()}

        loaded_canary = serving.canary
        promote(store, tmp_path / "cache")
        assert proc.watcher.check_once()
        out = proc.process(records([(f"{u}-3", u, walks[u][0]) for u in users], 2 * len(first)))
        assert {json.loads(v)["model_version"] for _, v in out.recommendations} == {
            candidate.version
        }
        now = proc.watcher.serving
        assert now.live is loaded_canary and now.canary is None  # not loaded again
        assert now.live.cache is not None and now.live.cache.max_bytes == 2**22
    finally:
        switch(store, live.version, tmp_path / "cache")
        store.write_canary(None)


def test_a_broken_canary_is_refused_and_a_stopped_one_ends(
    two_versions: tuple[TinyModel, TinyModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, candidate = two_versions
    store = LocalStore(live.root)
    proc = canary_processor(live.root, tmp_path)
    try:
        start_canary(store, candidate.version, 0.5, tmp_path / "cache")
        assert proc.watcher.check_once()
        proc.process(records([("e1", "u", "item-1")]))
        assert proc.watcher.serving.canary is not None
        store.write_canary(None)  # recstream canary --stop
        assert proc.watcher.check_once()
        out = proc.process(records([(f"e{n}", f"u{n}", "item-1") for n in range(20)], 1))
        assert {json.loads(v)["model_version"] for _, v in out.recommendations} == {live.version}
        assert proc.watcher.serving.canary is None
        # A canary whose files no longer match their checksums is refused; the live
        # version keeps serving everyone.
        broken = tmp_path / "broken-root"
        shutil.copytree(live.root, broken)
        start_canary(LocalStore(broken), candidate.version, 0.5, tmp_path / "cache")
        (broken / candidate.version / "items.json").write_text('["<pad>"]')
        with caplog.at_level(logging.ERROR):
            watcher = VersionWatcher(LocalStore(broken), "cpu", 60.0)
        assert watcher.serving.canary is None
        assert watcher.serving.live.loaded.version == live.version
        assert f"refusing version {candidate.version}" in caplog.text
        assert not watcher.check_once()  # not retried while it stays named
    finally:
        store.write_canary(None)
