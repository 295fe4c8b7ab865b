"""Security on a real broker: Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512) and a
mutual-TLS listener, under the StandardAuthorizer with nothing allowed by default.

The worker and ``recstream produce`` authenticate as users created on the broker and
hold only the ACLs that ``docs/operations.md`` lists (read from there); the checks are
the ground truth of ``reliability_harness``, and no secret may appear in a log, a page
or an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ResourcePattern,
    ResourceType,
    UserScramCredentialUpsertion,
)

from recstream_tools.kafka import SCRAM_MECHANISM, KafkaCluster, secured
from stream_worker.store import run_migrations
from tests.factories import make_pki
from tests.integration.reliability_harness import Chaos, steady
from tests.integration.test_reliability import assert_clean, assert_secret_absent
from tests.integration.worker_harness import TinyModel, publish_tiny_model

pytestmark = pytest.mark.integration

OPERATIONS_MD = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
KEY_PASSWORD = f"key-{uuid.uuid4().hex}"


@dataclass
class SecureKafka:
    cluster: KafkaCluster
    pki: dict[str, Path]

    @property
    def admin_bootstrap(self) -> str:
        """The PLAINTEXT listener on loopback: the super user, for setting up and checking."""
        return self.cluster.bootstrap_servers

    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.admin_bootstrap)

    def add_user(self, user: str, password: str) -> None:
        admin = self.admin()
        try:
            result = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(user, SCRAM_MECHANISM, password)]
            )
        finally:
            admin.close()
        assert result == {user: None}

    def allow(self, principal: str, acls: list[tuple[str, str, str]]) -> None:
        """Grant (resource type, name, operation) triples to ``principal``."""
        admin = self.admin()
        try:
            result = admin.create_acls(
                [
                    ACL(principal, "*", ACLOperation[op], ACLPermissionType.ALLOW,
                        ResourcePattern(ResourceType[kind], name))
                    for kind, name, op in acls
                ]
            )  # fmt: skip
        finally:
            admin.close()
        assert not result["failed"], result

    def sasl_env(self, user: str, password: str) -> dict[str, str]:
        return {
            "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.cluster.bootstrap_for("SECURE"),
            "RECSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "RECSTREAM_KAFKA__SASL_MECHANISM": SCRAM_MECHANISM,
            "RECSTREAM_KAFKA__SASL_USERNAME": user,
            "RECSTREAM_KAFKA__SASL_PASSWORD": password,
            "RECSTREAM_KAFKA__SSL_CAFILE": str(self.pki["ca.pem"]),
        }


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    where = tmp_path_factory.mktemp("secure-kafka")
    pki = make_pki(where / "pki", KEY_PASSWORD)
    config = secured(pki["ca.pem"], pki["server.pem"], pki["server.key"], where / "ks.pem")
    with KafkaCluster(where / "kafka", nodes=1, **config) as cluster:
        yield SecureKafka(cluster, pki)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return publish_tiny_model(tmp_path_factory.mktemp("artifacts"))


def documented_acls(role: str, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """The (resource type, name, operation) rows of docs/operations.md for ``role``, with
    each setting named in the table replaced by its value in ``names``."""
    rows = re.findall(
        r"^\| (\w+) \| (TOPIC|GROUP|CLUSTER) \| `(\w+)` \| ([A-Z_, ]+) \|$",
        OPERATIONS_MD.read_text(),
        flags=re.MULTILINE,
    )
    acls = [
        (kind, names[setting], op.strip())
        for who, kind, setting, ops in rows
        if who == role
        for op in ops.split(",")
    ]
    assert acls, f"no ACL rows for {role} in {OPERATIONS_MD}"
    return acls


def setting_values(chaos: Chaos) -> dict[str, str]:
    """The values of the settings the ACL table names, in this run."""
    return {
        "TOPICS__EVENTS": chaos.topics["events"],
        "TOPICS__RECOMMENDATIONS": chaos.topics["recommendations"],
        "TOPICS__DEAD_LETTER": chaos.topics["dead_letter"],
        "WORKER__GROUP_ID": chaos.group,
    }


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_worker_and_producer_authenticate_with_scram_over_tls_holding_only_the_documented_acls(
    secure_kafka: SecureKafka, tiny: TinyModel, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    worker_user, worker_password = f"rs-worker-{run}", f"Wk/{uuid.uuid4().hex}@:"
    producer_user, producer_password = f"rs-producer-{run}", f"Pr/{uuid.uuid4().hex}@:"
    secure_kafka.add_user(worker_user, worker_password)
    secure_kafka.add_user(producer_user, producer_password)
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = {**secure_kafka.sasl_env(worker_user, worker_password), "RECSTREAM_LOG_LEVEL": "DEBUG"}
    with Chaos(
        bootstrap=secure_kafka.admin_bootstrap, db_url=db_url, model=tiny, workdir=tmp_path,
        name="sasl", extra_env=env,
    ) as chaos:  # fmt: skip
        names = setting_values(chaos)
        secure_kafka.allow(f"User:{worker_user}", documented_acls("worker", names))
        secure_kafka.allow(f"User:{producer_user}", documented_acls("producer", names))
        produce_env = {
            **secure_kafka.sasl_env(producer_user, producer_password),
            "RECSTREAM_TOPICS__EVENTS": chaos.topics["events"],
            "RECSTREAM_LOG_LEVEL": "DEBUG",
        }
        produced = run_cli("produce", "--generate", "200", "--no-progress", env=produce_env)
        assert produced.returncode == 0, produced.stderr[-3000:]
        assert json.loads(produced.stdout.splitlines()[-1])["sent"] == 200
        chaos.produced_elsewhere = 200
        report = steady(chaos, rate=100, users=100, seconds=3.0)
        texts = {
            "worker log": chaos.workers["w1"].log(),
            "produce output": produced.stdout + produced.stderr,
            **chaos.pages,
        }
    assert_clean(report)
    assert report.valid >= 200 + 200  # the CLI's events and the load's
    assert_secret_absent(worker_password, texts)
    assert_secret_absent(producer_password, texts)


@pytest.mark.parametrize("command", [["worker"], ["produce", "--generate", "5", "--no-progress"]])
def test_a_wrong_password_is_one_error_line_and_a_non_zero_exit(
    secure_kafka: SecureKafka, tiny: TinyModel, tmp_path: Path, command: list[str]
) -> None:
    user, password = f"rs-user-{uuid.uuid4().hex[:8]}", f"right-{uuid.uuid4().hex}"
    secure_kafka.add_user(user, password)
    wrong = f"wrong-{uuid.uuid4().hex}"
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = {
        **secure_kafka.sasl_env(user, wrong),
        "RECSTREAM_DATABASE__URL": db_url,
        "RECSTREAM_ARTIFACTS__ROOT": str(tiny.root),
        "RECSTREAM_WORKER__DATA_DIR": str(tmp_path / "faust"),
        "RECSTREAM_WORKER__WEB_PORT": "0",
        "RECSTREAM_LOG_LEVEL": "DEBUG",
    }
    done = run_cli(*command, env=env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.search(r"authenticat|SASL", errors[0], re.IGNORECASE), errors[0]
    assert user in errors[0] or secure_kafka.cluster.bootstrap_for("SECURE") in errors[0]
    assert_secret_absent(wrong, {"output": done.stdout + done.stderr})


# kafka-python's SSL transport can drop an aborted connection's socket without closing
# it; the garbage collector then reports that client-side socket. Only that report is
# ignored; every assertion stands.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_a_worker_with_a_client_certificate_over_mutual_tls_processes_everything(
    secure_kafka: SecureKafka, tiny: TinyModel, tmp_path: Path
) -> None:
    """The MTLS listener requires a client certificate; the broker names the worker by
    its certificate's subject (User:CN=recstream), which holds the documented ACLs.
    The key is encrypted: its password must never be shown, even at DEBUG."""
    pki = secure_kafka.pki
    env = {
        "RECSTREAM_KAFKA__BOOTSTRAP_SERVERS": secure_kafka.cluster.bootstrap_for("MTLS"),
        "RECSTREAM_KAFKA__SECURITY_PROTOCOL": "SSL",
        "RECSTREAM_KAFKA__SSL_CAFILE": str(pki["ca.pem"]),
        "RECSTREAM_KAFKA__SSL_CERTFILE": str(pki["client.pem"]),
        "RECSTREAM_KAFKA__SSL_KEYFILE": str(pki["client.key"]),
        "RECSTREAM_KAFKA__SSL_PASSWORD": KEY_PASSWORD,
        "RECSTREAM_LOG_LEVEL": "DEBUG",
    }
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    with Chaos(
        bootstrap=secure_kafka.admin_bootstrap, db_url=db_url, model=tiny, workdir=tmp_path,
        name="mtls", extra_env=env,
    ) as chaos:  # fmt: skip
        names = setting_values(chaos)
        secure_kafka.allow("User:CN=recstream", documented_acls("worker", names))
        report = steady(chaos, rate=100, users=100, seconds=2.0)
        texts = {"worker log": chaos.workers["w1"].log(), **chaos.pages}
    assert_clean(report)
    assert_secret_absent(KEY_PASSWORD, texts)
