"""Kafka client configuration from settings, for faust and for kafka-python.

Credentials travel only inside these dicts and objects; nothing here is logged. The
client libraries would log them: at DEBUG, kafka-python's admin client prints its whole
configuration (the SASL password in clear) and both libraries print raw protocol frames
(SASL PLAIN sends the password in one). So whenever credentials are configured, the
``kafka`` and ``aiokafka`` loggers are held at INFO, whatever ``RECSTREAM_LOG_LEVEL`` says.
"""

import asyncio
import logging
import ssl
import time
from typing import Any

import faust
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from model.errors import ConfigError
from stream_worker.errors import BrokerError
from stream_worker.settings import KafkaSettings

logger = logging.getLogger(__name__)

CLIENT_LOGGERS = ("kafka", "aiokafka")


def protect_client_logs(settings: KafkaSettings) -> None:
    """Hold the Kafka client loggers at INFO or above when ``settings`` carry a secret."""
    if settings.sasl_password is None and settings.ssl_password is None:
        return
    for name in CLIENT_LOGGERS:
        client_logger = logging.getLogger(name)
        if client_logger.getEffectiveLevel() < logging.INFO:
            client_logger.setLevel(logging.INFO)
            logger.info("%s DEBUG logging stays off: it would print the Kafka credentials", name)


def bootstrap_list(settings: KafkaSettings) -> list[str]:
    return [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()]


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (None otherwise): server certificates are
    verified against ``ssl_cafile`` (else the system's CAs), host names checked.

    :raises ConfigError: a TLS file is missing or unusable, or the key password is wrong;
        the message names the setting, never the password.
    """
    if "SSL" not in settings.security_protocol:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(
            f"RECSTREAM_KAFKA__SSL_CAFILE: cannot load CA certificates from "
            f"{settings.ssl_cafile}: {_why(exc)}"
        ) from None
    if settings.ssl_certfile:
        try:
            context.load_cert_chain(
                str(settings.ssl_certfile),
                str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
                settings.ssl_password.get_secret_value() if settings.ssl_password else None,
            )
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(
                "RECSTREAM_KAFKA__SSL_CERTFILE/__SSL_KEYFILE/__SSL_PASSWORD: cannot load the "
                f"client certificate {settings.ssl_certfile} "
                f"(key {settings.ssl_keyfile or 'in the same file'}): {_why(exc)}"
            ) from None
    return context


def _why(exc: OSError) -> str:
    # OpenSSL's reasons and the OS's words; neither ever contains the key password.
    if isinstance(exc, ssl.SSLError):
        return str(exc)
    return exc.strerror or str(exc)


def faust_broker_options(settings: KafkaSettings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` arguments for :class:`faust.App`."""
    protect_client_logs(settings)
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
    """kafka-python's TLS and SASL options (aiokafka takes the same names)."""
    protect_client_logs(settings)
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


def check_connection(settings: KafkaSettings, timeout_s: float = 30.0) -> None:
    """Connect to a bootstrap server once, TLS and SASL included, before any client starts.

    The client libraries log a refused login and then report only that they could not
    bootstrap; this names the cause. A refused login, an unknown mechanism or a
    certificate that does not verify fail at once (trying again cannot help); an
    unreachable broker is tried again until ``timeout_s``.

    :raises BrokerError: one line naming the servers and the cause, never a secret.
    """
    asyncio.run(_check_connection(settings, timeout_s))


async def _check_connection(settings: KafkaSettings, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    servers = bootstrap_list(settings)
    options = security_options(settings)
    while True:
        reasons = []
        for server in servers:
            host, _, port = server.rpartition(":")
            try:
                conn = await asyncio.wait_for(
                    create_conn(
                        host or "localhost", int(port), client_id=settings.client_id,
                        request_timeout_ms=10_000, **options,
                    ),
                    timeout=10,
                )  # fmt: skip
            except (
                SaslAuthenticationFailed,
                AuthenticationFailedError,
                AuthenticationMethodNotSupported,
                UnsupportedSaslMechanismError,
            ) as exc:
                raise BrokerError(
                    f"Kafka at {server} refused the SASL login of user "
                    f"{settings.sasl_username!r} ({settings.sasl_mechanism}): {_sasl_reason(exc)}; "
                    "check RECSTREAM_KAFKA__SASL_USERNAME and RECSTREAM_KAFKA__SASL_PASSWORD"
                ) from None
            except ssl.SSLCertVerificationError as exc:
                raise BrokerError(
                    f"Kafka at {server}: its TLS certificate did not verify "
                    f"({exc.verify_message}); check RECSTREAM_KAFKA__SSL_CAFILE"
                ) from None
            except (KafkaError, OSError, TimeoutError, ValueError) as exc:
                reasons.append(f"{server}: {type(exc).__name__}: {exc}".rstrip(": "))
                continue
            conn.close()
            return
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"Could not connect to Kafka at {settings.bootstrap_servers} "
                f"({settings.security_protocol}) within {timeout_s:g}s: {'; '.join(reasons)}"
            )
        await asyncio.sleep(1.0)


def _sasl_reason(exc: Exception) -> str:
    # The broker's words ("invalid credentials with SASL mechanism ..."); they never
    # carry the password, which is only ever sent as a SCRAM proof or inside PLAIN's frame.
    text = str(exc).split(": ", 1)[-1] or type(exc).__name__
    return text.rstrip(".")
