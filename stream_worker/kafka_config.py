"""Kafka client configuration from settings, for faust and for kafka-python.

Credentials travel only inside these dicts and objects; nothing here is logged.
"""

import ssl
from typing import Any

import faust

from stream_worker.settings import KafkaSettings


def bootstrap_list(settings: KafkaSettings) -> list[str]:
    return [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()]


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if "SSL" not in settings.security_protocol:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
    )
    if settings.ssl_certfile:
        context.load_cert_chain(
            str(settings.ssl_certfile),
            str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
            settings.ssl_password.get_secret_value() if settings.ssl_password else None,
        )
    return context


def faust_broker_options(settings: KafkaSettings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` arguments for :class:`faust.App`."""
    options: dict[str, Any] = {"broker": [f"kafka://{s}" for s in bootstrap_list(settings)]}
    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_password is not None  # checked by the settings validator
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value(),
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def kafka_python_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
    return {
        "bootstrap_servers": bootstrap_list(settings),
        "client_id": settings.client_id,
        **security_options(settings),
    }


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python's TLS and SASL options."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_password is not None
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password.get_secret_value(),
        }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    return options
