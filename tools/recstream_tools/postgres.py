"""Throw-away PostgreSQL databases for tests, benchmarks and soak runs."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

__all__ = ["LOCAL_ADMIN_URL", "temporary_database"]

# The development server that scripts/postgres starts: trust auth on loopback.
LOCAL_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def temporary_database(admin_url: str = LOCAL_ADMIN_URL) -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards; ``admin_url``
    names a server and a role allowed to create databases."""
    admin = create_engine(
        admin_url,
        isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    name = f"recstream_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: a leaked pooled connection must not leak the database.
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
