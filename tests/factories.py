"""Small builders shared by unit and integration tests."""

import os
import subprocess
from pathlib import Path

from pydantic import SecretStr

from stream_worker.events import ClickEvent
from stream_worker.settings import KafkaSettings


def click_event(
    user: str, item: str, offset: int, partition: int = 0, event_type: str = "view"
) -> ClickEvent:
    """A decoded event at a partition offset, with an id and time derived from them."""
    return ClickEvent(
        event_id=f"{partition}-{offset}",
        user_id=user,
        item_id=item,
        event_type=event_type,
        ts=1_700_000_000_000 + offset,
        partition=partition,
        offset=offset,
    )


def make_pki(where: Path, key_password: str) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate whose key is
    encrypted with ``key_password`` (openssl; passwords through the environment)."""
    where.mkdir(parents=True)
    env = {**os.environ, "KEY_PASSWORD": key_password}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, env=env, check=True, capture_output=True)

    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=recstream test CA")  # fmt: skip
    for name, subject, extra in (
        ("server", "/CN=127.0.0.1", ["-nodes"]),
        ("client", "/CN=recstream", ["-passout", "env:KEY_PASSWORD"]),
    ):
        openssl("req", "-newkey", "rsa:2048", *extra, "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", subject)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", "san.ext")  # fmt: skip
    return {name: where / name for name in ("ca.pem", "server.pem", "server.key",
                                            "client.pem", "client.key")}  # fmt: skip


def mutual_tls_settings(pki: dict[str, Path], key_password: str) -> KafkaSettings:
    """Kafka settings for SSL with the CA and the client certificate of ``make_pki``."""
    return KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=pki["ca.pem"],
        ssl_certfile=pki["client.pem"],
        ssl_keyfile=pki["client.key"],
        ssl_password=SecretStr(key_password),
    )
