"""Alembic environment of recstream: the state tables defined in ``stream_worker.store``.

There is no ``alembic.ini``: ``stream_worker.store.alembic_config`` builds the
configuration in code and ``recstream migrate`` (``store.run_migrations``) runs it.
The database comes from, in order: a connection in ``config.attributes["connection"]``
(used by ``run_migrations``, which owns the transaction), a URL in
``config.attributes["url"]`` or the ``sqlalchemy.url`` option, and finally the
settings (``RECSTREAM_DATABASE__URL``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from stream_worker.store import make_engine, metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return str(url)
    # Imported here: only the stand-alone path needs the settings.
    from stream_worker.settings import Settings

    return Settings().database.url.get_secret_value()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: autogenerate emits batch (copy-and-move) ops.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        # Already in the caller's transaction: alembic neither begins nor commits it.
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
