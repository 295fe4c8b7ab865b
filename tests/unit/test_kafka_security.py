"""Kafka TLS and SASL settings: what each client gets, and one readable error for bad ones.

The worker talks to Kafka through three clients built from the same settings:
kafka-python (topic creation, ``recstream produce``), aiokafka (the batch consumer, with
kafka-python's option names) and faust's producer (through ``broker_credentials``).
Against a live broker: ``tests/integration/test_reliability.py``.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import ssl
from pathlib import Path
from typing import Any

import aiokafka
import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import SecretStr

from model.errors import ConfigError
from stream_worker.cli import load_settings
from stream_worker.kafka_config import (
    CLIENT_LOGGERS,
    faust_broker_options,
    kafka_python_options,
    security_options,
    ssl_context,
)
from stream_worker.settings import KafkaSettings
from tests.factories import make_pki, mutual_tls_settings

KEY_PASSWORD = "key-pass-7f3a"
SASL_PASSWORD = "sasl-pass-91c2"

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
    pytest.mark.usefixtures("client_log_levels"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki") / "pki", KEY_PASSWORD)


def sasl_ssl(pki: dict[str, Path], **changes: Any) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers="k1:9093, k2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="recstream",
        sasl_password=SecretStr(SASL_PASSWORD),
        ssl_cafile=pki["ca.pem"],
        **changes,
    )


def accepted_options(client: Any) -> set[str]:
    """Keyword options a client constructor accepts."""
    if hasattr(client, "DEFAULT_CONFIG"):  # kafka-python
        return set(client.DEFAULT_CONFIG)
    return set(inspect.signature(client.__init__).parameters)


def test_plaintext_adds_no_security_options() -> None:
    settings = KafkaSettings(bootstrap_servers="k1:9092")
    assert kafka_python_options(settings) == {
        "bootstrap_servers": ["k1:9092"],
        "client_id": "recstream",
        "security_protocol": "PLAINTEXT",
    }
    assert faust_broker_options(settings) == {"broker": ["kafka://k1:9092"]}
    assert ssl_context(settings) is None


def test_sasl_ssl_maps_to_the_same_options_for_every_client(pki: dict[str, Path]) -> None:
    settings = sasl_ssl(pki)
    options = security_options(settings)
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "recstream",
        "sasl_plain_password": SASL_PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    # The names are real options of kafka-python's three clients and of aiokafka's.
    names = set(security_options(settings))
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert names <= accepted_options(client), client
    for client in (aiokafka.AIOKafkaConsumer, aiokafka.AIOKafkaProducer):
        assert names <= accepted_options(client), client
    # faust hands its producer the same through its credentials.
    faust_options = faust_broker_options(settings)
    assert faust_options["broker"] == ["kafka://k1:9093", "kafka://k2:9093"]
    credentials = faust_options["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    auth = dict(credentials_to_aiokafka_auth(credentials))
    assert isinstance(auth.pop("ssl_context"), ssl.SSLContext)
    assert auth == options


def test_sasl_plaintext_has_no_tls(pki: dict[str, Path]) -> None:
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=SecretStr(SASL_PASSWORD),
    )
    assert "ssl_context" not in security_options(settings)
    auth = credentials_to_aiokafka_auth(faust_broker_options(settings)["broker_credentials"])
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["ssl_context"] is None


def test_ssl_with_a_client_certificate_and_an_encrypted_key(pki: dict[str, Path]) -> None:
    settings = mutual_tls_settings(pki, KEY_PASSWORD)
    options = security_options(settings)
    assert set(options) == {"security_protocol", "ssl_context"}
    auth = credentials_to_aiokafka_auth(faust_broker_options(settings)["broker_credentials"])
    assert auth["security_protocol"] == "SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("env", "in_message"),
    [
        ({"SECURITY_PROTOCOL": "SASL_SSL"}, "SASL needs kafka.sasl_mechanism"),
        (
            {"SASL_USERNAME": "u", "SASL_PASSWORD": SASL_PASSWORD},
            "kafka.sasl_username is set but kafka.security_protocol is PLAINTEXT",
        ),
        ({"SSL_CAFILE": "/ca.pem"}, "kafka.ssl_cafile is set but kafka.security_protocol is"),
        (
            {
                "SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "SASL_MECHANISM": "PLAIN",
                "SASL_USERNAME": "u",
                "SASL_PASSWORD": SASL_PASSWORD,
                "SSL_CAFILE": "/ca.pem",
            },
            "does not use TLS",
        ),
        (
            {"SECURITY_PROTOCOL": "SSL", "SSL_KEYFILE": "/k.pem", "SSL_PASSWORD": KEY_PASSWORD},
            "set kafka.ssl_certfile too",
        ),
        ({"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "GSSAPI"}, "SASL_MECHANISM"),
        ({"SECURITY_PROTOCOL": "TLS"}, "RECSTREAM_KAFKA__SECURITY_PROTOCOL"),
    ],
)
def test_bad_combinations_are_one_readable_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], in_message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"RECSTREAM_KAFKA__{name}", value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("invalid setting RECSTREAM_KAFKA")
    assert in_message in message
    assert "\n" not in message
    assert SASL_PASSWORD not in message and KEY_PASSWORD not in message


@pytest.mark.parametrize(
    ("changes", "in_message"),
    [
        ({"ssl_cafile": Path("/nowhere/ca.pem")}, "RECSTREAM_KAFKA__SSL_CAFILE"),
        ({"ssl_certfile": "client.pem", "ssl_password": "wrong"}, "cannot load the client"),
        ({"ssl_certfile": "client.pem", "ssl_keyfile": "ca.pem"}, "cannot load the client"),
    ],
)
def test_unusable_tls_files_are_one_readable_error(
    pki: dict[str, Path], changes: dict[str, Any], in_message: str
) -> None:
    resolved = {
        name: pki.get(str(value), value) if name != "ssl_password" else SecretStr(str(value))
        for name, value in changes.items()
    }
    if resolved.get("ssl_certfile") and "ssl_keyfile" not in resolved:
        resolved["ssl_keyfile"] = pki["client.key"]
    settings = KafkaSettings(security_protocol="SSL", ssl_cafile=pki["ca.pem"]).model_copy(
        update=resolved
    )
    with pytest.raises(ConfigError, match=in_message) as error:
        security_options(settings)
    assert "\n" not in str(error.value) and KEY_PASSWORD not in str(error.value)


def test_credentials_hold_the_client_loggers_at_info(pki: dict[str, Path]) -> None:
    """kafka-python's admin client logs its configuration (the SASL password) at DEBUG."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.DEBUG)
    try:
        for name in CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        security_options(KafkaSettings(security_protocol="SSL", ssl_cafile=pki["ca.pem"]))
        assert logging.getLogger("kafka").getEffectiveLevel() == logging.DEBUG  # no secret
        kafka_python_options(sasl_ssl(pki))
        for name in CLIENT_LOGGERS:
            assert logging.getLogger(name).getEffectiveLevel() == logging.INFO
    finally:
        root.setLevel(saved)


def test_secrets_stay_out_of_reprs_and_dumps(pki: dict[str, Path]) -> None:
    settings = sasl_ssl(
        pki,
        ssl_certfile=pki["client.pem"],
        ssl_keyfile=pki["client.key"],
        ssl_password=SecretStr(KEY_PASSWORD),
    )
    for text in (repr(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert SASL_PASSWORD not in text and KEY_PASSWORD not in text
    credentials = faust_broker_options(settings)["broker_credentials"]
    assert SASL_PASSWORD not in repr(credentials)
