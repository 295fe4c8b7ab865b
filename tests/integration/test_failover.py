"""The broker fails under load: Apache Kafka SIGKILLed and restarted from its on-disk
log, and, in a three-node cluster, the leader of the events partitions killed.

Checked against ground truth (``reliability_harness``): every event the broker
acknowledged applied to state exactly once, every user's latest recommendation
published and equal to the offline model's, exact dead letters, and no committed
offset ahead of its outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recstream_tools.kafka import KafkaCluster
from stream_worker.store import run_migrations
from tests.integration.reliability_harness import Chaos, broker_restart, leader_kill
from tests.integration.test_reliability import SESSION_TIMEOUT_S, assert_clean
from tests.integration.worker_harness import TinyModel, publish_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


def test_a_broker_sigkilled_mid_stream_restarts_from_its_log_and_nothing_is_lost(
    tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    run_migrations(pg_schema_url)
    # A cluster of its own: the session's broker serves the other tests.
    with (
        KafkaCluster(tmp_path / "kafka", nodes=1) as cluster,
        Chaos(
            bootstrap=cluster.bootstrap_servers,
            db_url=pg_schema_url,
            model=tiny,
            workdir=tmp_path,
            name="brokerkill",
            session_timeout_s=SESSION_TIMEOUT_S,
        ) as chaos,
    ):
        pid_before = cluster.pids
        report = broker_restart(chaos, cluster, rate=150, users=200, down_s=5.0, warmup=2.0)
        assert cluster.pids != pid_before  # a new process, with the old one's log
    assert_clean(report)
    assert report.commits_checked >= 1
    assert len(report.recovery_s) == 1


def test_killing_the_events_leader_of_a_three_node_cluster_loses_nothing(
    kafka3: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    run_migrations(pg_schema_url)
    with Chaos(
        bootstrap=kafka3.bootstrap_servers,
        db_url=pg_schema_url,
        model=tiny,
        workdir=tmp_path,
        name="leaderkill",
        session_timeout_s=SESSION_TIMEOUT_S,
    ) as chaos:
        report, before, during = leader_kill(
            chaos, kafka3, rate=150, users=200, down_s=8.0, warmup=2.0
        )
    assert_clean(report)
    victim = max(set(before.values()), key=list(before.values()).count)
    assert victim not in during.values() and -1 not in during.values(), (before, during)
    # Every partition the victim led moved to another node.
    assert all(during[p] != victim for p, leader in before.items() if leader == victim)
    assert report.commits_checked >= 1
