"""Pure parts of the online side: ranking, replay planning, pacing, settings."""

import itertools

import pytest
from pydantic import ValidationError

from model.data import Interaction, InteractionLog
from stream_worker.produce import generate_clicks, paced, plan_replay
from stream_worker.recommender import popular_unseen, top_k_unseen
from stream_worker.settings import Settings

ITEMS = ["<pad>", "a", "b", "c", "d", "e"]


def test_top_k_unseen_drops_seen_and_padding_and_keeps_order() -> None:
    ranked = top_k_unseen([2, 0, 3, 1, 5, 4], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], {3}, ITEMS, k=3)
    assert ranked == [("b", 0.9), ("a", 0.6), ("e", 0.5)]


def test_top_k_unseen_returns_fewer_when_results_run_out() -> None:
    assert top_k_unseen([1, 2], [1.0, 0.5], {1, 2}, ITEMS, k=3) == []


def test_popular_unseen_scores_follow_rank() -> None:
    ranked = popular_unseen(["a", "b", "c", "d"], {"b"}, k=2)
    assert ranked == [("a", 1.0), ("c", pytest.approx(1 / 3))]


def log_of(rows: list[tuple[str, str, int | None]]) -> InteractionLog:
    interactions = [Interaction(u, i, ts, "view") for u, i, ts in rows]
    return InteractionLog("mem", "test", interactions, len(rows), 0, [])


def test_plan_replay_orders_by_event_time_and_scales_offsets() -> None:
    log = log_of([("u1", "a", 3000), ("u2", "b", 1000), ("u1", "c", 2000)])
    plan = plan_replay(log, speed=2.0)
    assert [(p.user_id, p.item_id) for p in plan] == [("u2", "b"), ("u1", "c"), ("u1", "a")]
    assert [p.offset_ms for p in plan] == [0.0, 500.0, 1000.0]
    # Stable ids: the same file replayed twice gives the same event ids.
    assert [p.event_id for p in plan] == [p.event_id for p in plan_replay(log, speed=2.0)]
    assert len({p.event_id for p in plan}) == 3
    assert len(plan_replay(log, limit=2)) == 2


def test_paced_respects_rate_and_event_time() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    plan = generate_clicks(5)
    list(paced(plan, rate=10, clock=lambda: now[0], sleep=sleep))
    assert now[0] == pytest.approx(0.4)  # 5 events at 10/s: the last is due at 0.4 s


def test_generated_clicks_walk_the_catalogue() -> None:
    plan = generate_clicks(2000, users=5, items=7)
    by_user: dict[str, list[int]] = {}
    for p in plan:
        by_user.setdefault(p.user_id, []).append(int(p.item_id.split("-")[1]))
    for items in by_user.values():
        assert all((b - a) % 7 == 1 for a, b in itertools.pairwise(items))


def test_settings_read_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("RECSTREAM_TOPICS__EVENTS", "clicks")
    monkeypatch.setenv("RECSTREAM_DATABASE__URL", "postgresql://u:s3cret@db/recs")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.topics.events == "clicks"
    assert settings.topics.recommendations == "recommendations"
    assert settings.topics.dead_letter == "clickstream.dlq"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())


def test_incomplete_sasl_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="SASL needs"):
        Settings()
