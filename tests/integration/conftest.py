"""Fixtures for the integration tier: a throw-away PostgreSQL database per test session.

The server is the one named by ``RECSTREAM_TEST_PG_ADMIN_URL`` (default: the development
server at 127.0.0.1:5432, trust auth, database ``test``, which ``scripts/postgres start``
installs and starts). Without a reachable server the PostgreSQL cases fail, saying how
to start one: a missing part never turns into a skip.
"""

from __future__ import annotations

import gc
import os
import uuid
import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from recstream_tools.postgres import LOCAL_ADMIN_URL, temporary_database
from stream_worker.store import redacted

PG_ADMIN_URL = os.environ.get("RECSTREAM_TEST_PG_ADMIN_URL", LOCAL_ADMIN_URL)


@pytest.fixture(autouse=True)
def refused_connections_collected() -> Iterator[None]:
    """kafka-python 3.0 leaves the socket of a refused connection open (``kafka/net/
    inet.py`` raises without closing it), in a reference cycle with the exception: any
    test whose clients meet a broker that is down or not up yet leaves some. Collected
    after each integration test, their ResourceWarnings ignored, so that they are not
    reported in whichever later test happens to run the garbage collector. Tests that
    check for leaks of their own (``test_broker``) turn ResourceWarnings into errors
    inside the test."""
    # Before the test too: module-scoped fixtures are torn down (and set up) outside
    # the function-scoped ones, and hypothesis collects garbage between examples.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of a new, empty database ``recstream_test_<random>``, dropped afterwards."""
    admin = create_engine(
        PG_ADMIN_URL,
        isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except DBAPIError as exc:
        reason = (
            f"PostgreSQL is not reachable at {redacted(PG_ADMIN_URL)} "
            f"({' '.join(str(exc.orig).split())}); start it with "
            "`scripts/postgres start` or point RECSTREAM_TEST_PG_ADMIN_URL at a server"
        )
        pytest.fail(reason)
    finally:
        admin.dispose()
    with temporary_database(PG_ADMIN_URL) as url:
        yield url


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A URL whose connections work in a new, empty schema of the session's database.

    Cheaper than a database per test; ``search_path`` makes it the default schema, so
    tables and Alembic's version table land there.
    """
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            make_url(pg_url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
