"""The root exception of recstream and the offline subsystems' errors.

Every error an operator can see derives from :class:`RecstreamError`; its message is
written for the operator and is printed as one line by the CLI.
"""

from typing import ClassVar


class RecstreamError(Exception):
    """Base of every error recstream raises on purpose."""

    #: The CLI's exit status for this error.
    exit_code: ClassVar[int] = 2


class ConfigError(RecstreamError):
    """A setting or command-line value is invalid: fix the value named in the message."""


class DataError(RecstreamError):
    """An input data file is unusable: check the file and format named in the message."""


class ArtifactError(RecstreamError):
    """A model version is missing, incomplete or corrupt: rebuild it or point CURRENT elsewhere."""


class IndexBuildError(RecstreamError):
    """A FAISS index could not be built: check the factory string and the catalogue size."""


class NotEnoughData(DataError):
    """Too few users have enough history to train on (``RECSTREAM_RETRAIN__MIN_USERS``).

    Nothing was published and ``CURRENT`` is unchanged. Let the workers collect more
    events, or lower the minimum for a small catalogue.
    """


class RetrainLocked(RecstreamError):
    """Another retrain holds the artifact root's lock.

    Nothing was read or written. Wait for the other run to finish (its log says when),
    or raise ``RECSTREAM_RETRAIN__LOCK_TIMEOUT_S`` to wait for it. The lock is released
    by the operating system when its holder exits, even after a crash.
    """


class QualityGateRefused(RecstreamError):
    """The new model validates worse than the live one by more than the allowed margin.

    Nothing was published and ``CURRENT`` is unchanged. Compare the two figures in the
    message (both measured on the same fresh data); to publish anyway, raise
    ``RECSTREAM_RETRAIN__QUALITY_MARGIN`` for one run. Exit status 3.
    """

    exit_code: ClassVar[int] = 3
