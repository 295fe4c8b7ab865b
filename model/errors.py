"""The root exception of recstream and the offline subsystems' errors.

Every error an operator can see derives from :class:`RecstreamError`; its message is
written for the operator and is printed as one line by the CLI.
"""


class RecstreamError(Exception):
    """Base of every error recstream raises on purpose."""


class ConfigError(RecstreamError):
    """A setting or command-line value is invalid: fix the value named in the message."""


class DataError(RecstreamError):
    """An input data file is unusable: check the file and format named in the message."""


class ArtifactError(RecstreamError):
    """A model version is missing, incomplete or corrupt: rebuild it or point CURRENT elsewhere."""


class IndexBuildError(RecstreamError):
    """A FAISS index could not be built: check the factory string and the catalogue size."""
