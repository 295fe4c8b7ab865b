"""Crashes, rebalances and outages against real workers, broker and PostgreSQL.

Short versions of ``scripts/chaos.py``'s runs (``docs/reliability.md``): the same
scenarios and checks (``reliability_harness``), a few seconds of load each.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from recstream_tools.kafka import KafkaCluster
from stream_worker.store import run_migrations
from tests.integration.reliability_harness import (
    PARTITIONS,
    Chaos,
    Report,
    kill_loop,
    postgres_outage,
    scale,
)
from tests.integration.worker_harness import TinyModel, publish_tiny_model

pytestmark = pytest.mark.integration

# Short enough that a SIGKILLed worker's partitions move within seconds.
SESSION_TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


def assert_clean(report: Report) -> None:
    """Nothing lost, nothing applied twice, exact dead letters, fresh recommendations."""
    shown = json.dumps(asdict(report), indent=1)
    assert report.produced > 0 and report.valid > 0 and report.hostile > 0, shown
    assert report.send_failures == 0, shown
    assert (report.lost, report.duplicated, report.wrong_sequences) == (0, 0, 0), shown
    assert report.dead_letters_exact and report.dead_letters == report.hostile, shown
    assert (report.recs_missing, report.recs_stale) == (0, 0), shown
    assert report.recs_checked == report.users, shown
    assert not report.notes, shown


def test_five_sigkills_and_a_clean_removal_under_load_lose_nothing_and_double_nothing(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    """Two workers in one group: five times one is SIGKILLed mid-stream and restarted at
    once (its partitions move away and back), then one leaves cleanly. After each kill
    the group's committed offsets are checked against what is in the output topics."""
    run_migrations(pg_schema_url)
    with Chaos(
        bootstrap=broker.bootstrap_servers,
        db_url=pg_schema_url,
        model=tiny,
        workdir=tmp_path,
        name="kill",
        session_timeout_s=SESSION_TIMEOUT_S,
    ) as chaos:
        report = kill_loop(
            chaos, kills=5, rate=150, users=200, gap=(1.0, 2.0), seed=1, then_remove=True
        )
    assert_clean(report)
    assert report.faults == 6 and len(report.recovery_s) == 6
    assert report.commits_checked == 5


def test_scaling_one_three_one_moves_partitions_and_loses_nothing(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    run_migrations(pg_schema_url)
    with Chaos(
        bootstrap=broker.bootstrap_servers,
        db_url=pg_schema_url,
        model=tiny,
        workdir=tmp_path,
        name="scale",
        session_timeout_s=SESSION_TIMEOUT_S,
    ) as chaos:
        report, (one, three, back) = scale(chaos, rate=150, users=200, hold=2.0)
    assert_clean(report)
    every = set(range(PARTITIONS))
    # As the group coordinator saw it: w1 alone holds everything, then each of three
    # workers holds a share and w1 gave some away, then w1 holds everything again.
    assert one == {"w1": every}
    assert set(three) == {"w1", "w2", "w3"} and all(three.values())
    assert set().union(*three.values()) == every and sum(map(len, three.values())) == PARTITIONS
    assert three["w1"] < every
    assert back == {"w1": every}


# ------------------------------------------------------------------- database outage


@pytest.fixture
def password_url(pg_schema_url: str) -> Iterator[tuple[str, str]]:
    """(URL, password) of a least-privilege login role with a password, in a migrated
    schema. The server trusts local connections, so the password is never checked, but
    the worker still carries it in its settings, connections and error paths."""
    run_migrations(pg_schema_url)
    url = make_url(pg_schema_url)
    options = url.query["options"]
    schema = str(options).removeprefix("-csearch_path=")
    role = f"rs_{uuid.uuid4().hex[:10]}"
    password = f"Pw/{uuid.uuid4().hex}@#:"  # characters a URL must escape
    admin = create_engine(pg_schema_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.exec_driver_sql(
            f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "{schema}" TO {role}'
        )
    try:
        yield url.set(username=role, password=password).render_as_string(False), password
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def assert_secret_absent(secret: str, texts: dict[str, str]) -> None:
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    for where, body in texts.items():
        for form in forms:
            assert form not in body, f"a secret appears in {where}"


def test_a_postgres_outage_of_30_s_is_retried_commits_nothing_and_loses_nothing(
    broker: KafkaCluster, tiny: TinyModel, password_url: tuple[str, str], tmp_path: Path
) -> None:
    db_url, password = password_url
    with Chaos(
        bootstrap=broker.bootstrap_servers,
        db_url=db_url,
        model=tiny,
        workdir=tmp_path,
        name="pgdown",
        # DEBUG: the most the worker ever logs, and so the most that could leak.
        extra_env={"RECSTREAM_LOG_LEVEL": "DEBUG"},
    ) as chaos:
        report, during, before_restore = postgres_outage(
            chaos, rate=150, users=200, outage=30.0, warmup=1.5
        )
        texts = {"worker log": chaos.workers["w1"].log(), **chaos.pages}
    assert_clean(report)
    # Events kept arriving during the outage, yet no offset moved: nothing unapplied
    # was acknowledged.
    assert during and during == before_restore
    assert report.db_retries > 0
    assert "database unavailable" in texts["worker log"]
    assert_secret_absent(password, texts)


def _privileges(admin_url: str, worker_url: str, action: str) -> None:
    """GRANT or REVOKE the worker role's writes on the state tables."""
    role = make_url(worker_url).username
    verb = {"grant": "GRANT", "revoke": "REVOKE"}[action]
    direction = "TO" if action == "grant" else "FROM"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"{verb} INSERT, UPDATE ON user_sequences, partition_offsets {direction} {role}"
            )
    finally:
        admin.dispose()


def _wait_exit(chaos: Chaos, name: str, timeout: float = 60) -> int:
    proc = chaos.workers[name].proc
    assert proc is not None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tail = chaos.workers[name].log()[-3000:]
        raise AssertionError(f"worker {name} kept running:\n{tail}") from None


def test_a_batch_that_raises_stops_the_worker_without_committing_and_a_restart_loses_nothing(
    broker: KafkaCluster,
    tiny: TinyModel,
    pg_schema_url: str,
    password_url: tuple[str, str],
    tmp_path: Path,
) -> None:
    """The worker's role loses its write privileges mid-stream: applying the batch
    raises (not an outage: nothing to wait for). Documented outcome: the worker exits
    non-zero without committing; once the privileges are back, a restart re-reads the
    batch and nothing is lost or applied twice."""
    db_url, _ = password_url
    with Chaos(
        bootstrap=broker.bootstrap_servers, db_url=db_url, model=tiny, workdir=tmp_path,
        name="raises",
    ) as chaos:  # fmt: skip
        chaos.start_worker("w1")
        chaos.start_load(users=200, rate=150, bad_every=40)
        time.sleep(2.0)
        targets = chaos.fault_point()
        _privileges(pg_schema_url, db_url, "revoke")
        code = _wait_exit(chaos, "w1")
        chaos.check_commits()
        _privileges(pg_schema_url, db_url, "grant")
        since = time.monotonic()
        chaos.start_worker("w1")
        chaos.recovered(targets, since)
        log = chaos.workers["w1"].log()
        report = chaos.finish()
    assert code != 0
    assert "batch failed" in log and "permission denied" in log
    assert_clean(report)
    assert report.commits_checked == 1


def _refused_sends(
    broker: KafkaCluster,
    tiny: TinyModel,
    pg_schema_url: str,
    tmp_path: Path,
    name: str,
    *,
    hostile_after: bool,
) -> None:
    """The recommendations topic's max.message.bytes drops below a recommendation's
    size mid-stream (with ``hostile_after``, only hostile records follow); the worker
    must exit non-zero with no committed offset ahead of its outputs, and once the limit
    is back a restart publishes everything."""
    run_migrations(pg_schema_url)
    with Chaos(
        bootstrap=broker.bootstrap_servers, db_url=pg_schema_url, model=tiny,
        workdir=tmp_path, name=name,
    ) as chaos:  # fmt: skip
        chaos.start_worker("w1")
        load = chaos.start_load(users=200, rate=150, bad_every=40)
        time.sleep(2.0)
        targets = chaos.fault_point()
        recs = chaos.topics["recommendations"]
        topic_config(broker.bootstrap_servers, recs, {"max.message.bytes": "64"})
        if hostile_after:
            load.hostile_only()
        code = _wait_exit(chaos, "w1")
        chaos.check_commits()
        topic_config(broker.bootstrap_servers, recs, {"max.message.bytes": "1048588"})
        since = time.monotonic()
        chaos.start_worker("w1")
        chaos.recovered(targets, since)
        log = chaos.workers["w1"].log()
        report = chaos.finish()
    assert code != 0
    # One reaction, whichever commit saw the refusal first.
    assert log.count("publishing failed; stopping without committing") == 1, log
    assert_clean(report)


def test_a_send_the_broker_refuses_stops_the_worker_without_committing(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    """The broker refuses the worker's sends (not retriable). Documented outcome: the
    worker exits non-zero without committing the batches of the refused outputs; once
    the limit is back, a restart publishes them and nothing is lost."""
    _refused_sends(broker, tiny, pg_schema_url, tmp_path, "refused", hostile_after=False)


def test_dead_letters_acknowledged_after_a_refused_send_do_not_carry_a_commit_past_it(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    """As above, but only hostile records follow the fault: the batches after the
    refused one publish dead letters, which the broker accepts. Documented outcome: no
    commit after a refused send (a commit of those batches' offsets would skip the
    refused recommendations for good); the restart publishes them."""
    _refused_sends(broker, tiny, pg_schema_url, tmp_path, "refusedbad", hostile_after=True)


def test_a_failed_commit_is_logged_and_covered_by_the_stored_offsets(
    broker: KafkaCluster, tiny: TinyModel, pg_schema_url: str, tmp_path: Path
) -> None:
    """A worker frozen (SIGSTOP) past its session timeout is removed from the group and
    its partitions move to the other worker; thawed, its commit of the batches it had
    done is refused by the coordinator. Documented outcome: logged, the worker rejoins
    and goes on; the other worker re-read those events, answered them and did not apply
    them twice (the offsets stored with the state)."""
    run_migrations(pg_schema_url)
    with Chaos(
        bootstrap=broker.bootstrap_servers, db_url=pg_schema_url, model=tiny,
        workdir=tmp_path, name="commitfail", session_timeout_s=SESSION_TIMEOUT_S,
        # Commit rarely, so that the frozen worker certainly holds uncommitted batches.
        extra_env={"RECSTREAM_WORKER__COMMIT_INTERVAL_S": "30"},
    ) as chaos:  # fmt: skip
        chaos.start_workers("w1", "w2")
        chaos.start_load(users=200, rate=150, bad_every=40)
        time.sleep(3.0)
        targets = chaos.fault_point()
        since = time.monotonic()
        w1 = chaos.workers["w1"].proc
        assert w1 is not None
        w1.send_signal(signal.SIGSTOP)
        try:
            chaos.group_assignment(1, timeout=SESSION_TIMEOUT_S * 4)  # w2 alone
        finally:
            w1.send_signal(signal.SIGCONT)
        chaos.recovered(targets, since)
        chaos.group_assignment(2)  # w1 back in the group
        time.sleep(2.0)
        log = chaos.workers["w1"].log()
        report = chaos.finish()
    assert "offset commit failed" in log, log[-3000:]
    assert_clean(report)


def topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()
