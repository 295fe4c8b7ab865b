"""Which users a canary serves, and what a CANARY record may hold (no servers)."""

import pytest

from model.artifact_store import Canary
from model.errors import ArtifactError
from stream_worker.recommender import in_canary

USERS = [f"user-{n}" for n in range(20_000)]


def chosen(version: str, share: float) -> set[str]:
    return {user for user in USERS if in_canary(user, version, share)}


def test_a_canary_serves_a_stable_share_that_only_grows_with_the_share() -> None:
    fifth = chosen("v2", 0.2)
    # Binomial: the standard deviation of the share is 0.003 for 20,000 users.
    assert abs(len(fifth) / len(USERS) - 0.2) < 0.015
    assert chosen("v2", 0.2) == fifth  # the same users every time
    third = chosen("v2", 0.3)
    assert fifth < third  # raising the share keeps the users it had
    assert abs(len(third) / len(USERS) - 0.3) < 0.015
    # Another canary version draws its own users: about 0.2 x 0.2 of them in common.
    overlap = len(fifth & chosen("v3", 0.2)) / len(USERS)
    assert abs(overlap - 0.04) < 0.01


def test_odd_user_ids_are_routed_too() -> None:
    for user in ["", "\ud800", "é" * 200, "a\x00b"]:
        assert isinstance(in_canary(user, "v2", 0.5), bool)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_share_outside_0_to_1_is_refused(share: float) -> None:
    with pytest.raises(ArtifactError, match="between 0 and 1"):
        Canary("v2", share)


@pytest.mark.parametrize("name", ["", "../x", ".staging-v", "CURRENT", "CANARY"])
def test_a_canary_names_a_version(name: str) -> None:
    with pytest.raises(ArtifactError, match="not a version name"):
        Canary(name, 0.1)


def test_a_canary_record_round_trips_and_a_damaged_one_is_refused() -> None:
    canary = Canary("20261206T120000.000Z-abcdef", 0.05)
    assert Canary.from_json(canary.to_json(), "CANARY") == canary
    for bad in ["", "{}", '{"version": "v"}', '{"version": "v", "share": "x"}', "[1]"]:
        with pytest.raises(ArtifactError, match="CANARY"):
            Canary.from_json(bad, "CANARY")
