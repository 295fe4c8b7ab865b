"""Where versions live: a local directory or an S3-compatible bucket, with one contract.

Both stores keep ``<root>/<version>/<file>``, ``<root>/CURRENT`` and, while a canary
runs, ``<root>/CANARY`` (a version served to a share of users beside ``CURRENT``):

- a version is complete before anything points at it: its files first, its manifest
  (which lists every file's sha256) last, so a version without a manifest is not one;
- ``CURRENT`` is replaced in one write, and only ever names a complete version;
- checksums are verified when a version is loaded; a broken version is refused.

The artifact code itself (``model.artifacts``) works on local directories. For a bucket,
:func:`workspace` gives it a temporary local root holding what it needs and, when it is
done, uploads the versions it published and moves ``CURRENT``; :func:`fetch` gives a
worker a verified local copy of a version from its cache.

    store = open_store("s3://models/recstream")        # or a path
    with workspace(store, pull=[CURRENT]) as root:     # a Path
        rebuild_index(root, read_current(root), cfg)   # uploaded on exit
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from model.artifacts import (
    CURRENT,
    MANIFEST,
    _atomic_write_text,
    list_versions,
    read_current,
    read_manifest,
    verify_version,
)
from model.errors import ArtifactError

logger = logging.getLogger(__name__)

__all__ = [
    "CANARY",
    "CURRENT",
    "ArtifactStore",
    "Canary",
    "LocalStore",
    "S3Store",
    "fetch",
    "open_store",
    "workspace",
]

CANARY = "CANARY"


def _check_name(version: str) -> None:
    if version.startswith(".") or "/" in version or version in {CURRENT, CANARY} or not version:
        raise ArtifactError(f"{version!r} is not a version name")


@dataclass(frozen=True)
class Canary:
    """A version served to ``share`` of the users (a stable hash of each user id, see
    ``stream_worker.recommender.in_canary``) beside the one ``CURRENT`` names."""

    version: str
    share: float

    def __post_init__(self) -> None:
        _check_name(self.version)
        if not 0.0 < self.share < 1.0:
            raise ArtifactError(
                f"a canary's share is a fraction of users between 0 and 1 (exclusive), "
                f"not {self.share:g}: 0.05 serves it to 5% of users"
            )

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "share": self.share}) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Canary:
        try:
            doc = json.loads(text)
            return cls(str(doc["version"]), float(doc["share"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"{where} is not a canary ({{version, share}}): {exc}") from None


class ArtifactStore(ABC):
    """Versions and ``CURRENT``, wherever they are kept."""

    url: str

    @abstractmethod
    def read_current(self) -> str:
        """The live version. :raises ArtifactError: none yet, or an invalid name."""

    @abstractmethod
    def write_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` (the caller checked it is complete)."""

    @abstractmethod
    def read_canary(self) -> Canary | None:
        """The canary, if one runs. :raises ArtifactError: an unreadable CANARY."""

    @abstractmethod
    def write_canary(self, canary: Canary | None) -> None:
        """Start (or change) the canary in one write; None ends it."""

    @abstractmethod
    def versions(self) -> list[str]:
        """Every version with files, complete or not, oldest first (names sort by time)."""

    @abstractmethod
    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest. :raises ArtifactError: incomplete (no manifest)."""

    @abstractmethod
    def put_version(self, local: Path, version: str) -> None:
        """Store the complete local version directory ``local``: files, manifest last."""

    @abstractmethod
    def get_version(self, version: str, dest: Path) -> None:
        """Copy the files of ``version`` into the new directory ``dest`` (unverified)."""

    @abstractmethod
    def delete_version(self, version: str) -> None:
        """Remove a version; its manifest first, so it is never seen half-deleted."""

    def complete(self, version: str) -> bool:
        try:
            self.manifest(version)
        except ArtifactError:
            return False
        return True


class LocalStore(ArtifactStore):
    """A directory (a ReadWriteMany volume, in Kubernetes); ``model.artifacts`` works on
    it directly."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def read_current(self) -> str:
        return read_current(self.root)

    def write_current(self, version: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / CURRENT, version + "\n")

    def read_canary(self) -> Canary | None:
        path = self.root / CANARY
        try:
            return Canary.from_json(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            return None

    def write_canary(self, canary: Canary | None) -> None:
        if canary is None:
            (self.root / CANARY).unlink(missing_ok=True)
        else:
            _atomic_write_text(self.root / CANARY, canary.to_json())

    def versions(self) -> list[str]:
        return list_versions(self.root)

    def manifest(self, version: str) -> dict[str, Any]:
        return read_manifest(self.root / version)

    def put_version(self, local: Path, version: str) -> None:
        if local.resolve() == (self.root / version).resolve():
            return
        staging = self.root / f".staging-{version}"
        shutil.copytree(local, staging)
        os.replace(staging, self.root / version)

    def get_version(self, version: str, dest: Path) -> None:
        shutil.copytree(self.root / version, dest)

    def delete_version(self, version: str) -> None:
        (self.root / version / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.root / version)


class S3Store(ArtifactStore):
    """A bucket and prefix on any S3-compatible server, through boto3.

    Credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); ``endpoint_url`` names a
    server other than AWS (SeaweedFS, MinIO, Ceph).
    """

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise FileNotFoundError(key) from None
            raise ArtifactError(f"{self.url}: cannot read {key}: {exc}") from None
        return body

    def read_current(self) -> str:
        try:
            version = self._get(self._key(CURRENT)).decode().strip()
        except FileNotFoundError:
            raise ArtifactError(
                f"no {CURRENT} under {self.url}: train a model first "
                f"(recstream train --out {self.url})"
            ) from None
        if not version or "/" in version or version.startswith("."):
            raise ArtifactError(f"{self.url}/{CURRENT} holds an invalid version name {version!r}")
        return version

    def write_current(self, version: str) -> None:
        # One PUT replaces the object whole: readers see the old name or the new one.
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(CURRENT), Body=(version + "\n").encode()
        )

    def read_canary(self) -> Canary | None:
        try:
            raw = self._get(self._key(CANARY))
        except FileNotFoundError:
            return None
        return Canary.from_json(raw.decode(errors="replace"), f"{self.url}/{CANARY}")

    def write_canary(self, canary: Canary | None) -> None:
        if canary is None:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(CANARY))
        else:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(CANARY), Body=canary.to_json().encode()
            )

    def versions(self) -> list[str]:
        # From the objects themselves, not "directories": a server may keep an empty
        # prefix around after its objects are deleted.
        paginator = self.client.get_paginator("list_objects_v2")
        found: set[str] = set()
        prefix = self._key("") if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name, slash, _ = obj["Key"][len(prefix) :].partition("/")
                if slash and name and not name.startswith("."):
                    found.add(name)
        return sorted(found)

    def manifest(self, version: str) -> dict[str, Any]:
        try:
            raw = self._get(self._key(version, MANIFEST))
        except FileNotFoundError:
            raise ArtifactError(
                f"{self.url}/{version} is not a complete version: no {MANIFEST}"
            ) from None
        try:
            manifest: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"{self.url}/{version}/{MANIFEST} is not valid JSON: {exc}"
            ) from exc
        return manifest

    def put_version(self, local: Path, version: str) -> None:
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name != MANIFEST)
        for path in [*files, local / MANIFEST]:  # the manifest last: it marks completion
            self.client.upload_file(str(path), self.bucket, self._key(version, path.name))
        logger.info("uploaded version %s to %s", version, self.url)

    def get_version(self, version: str, dest: Path) -> None:
        manifest = self.manifest(version)
        dest.mkdir(parents=True)
        for name in [*manifest.get("files", {}), MANIFEST]:
            self.client.download_file(self.bucket, self._key(version, name), str(dest / name))

    def delete_version(self, version: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(version, MANIFEST))
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(version, "")):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def open_store(location: str | Path, *, endpoint_url: str | None = None) -> ArtifactStore:
    """``s3://bucket/prefix`` or a local path."""
    text = str(location)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise ArtifactError(f"{text!r}: an S3 location needs a bucket (s3://BUCKET/PREFIX)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if "://" in text:
        raise ArtifactError(f"{text!r}: artifacts live in a directory or at s3://BUCKET/PREFIX")
    return LocalStore(Path(text))


def fetch(store: ArtifactStore, version: str, cache: Path) -> Path:
    """A root holding a verified copy of ``version`` (its files' checksums checked).

    A local store is its own root. A bucket's version is downloaded into ``cache`` once
    (under a temporary name, renamed when verified), and kept: workers keep a local
    cache of versions, so a restart or a rollback does not download again.

    :raises ArtifactError: incomplete, or a file that does not match its checksum.
    """
    if isinstance(store, LocalStore):
        verify_version(store.root / version)
        return store.root
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / version
    if target.is_dir():
        try:
            verify_version(target)
            return cache
        except ArtifactError:
            logger.warning("cached copy of %s is damaged; downloading it again", version)
            shutil.rmtree(target)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{version}-", dir=cache))
    try:
        store.get_version(version, partial / version)
        verify_version(partial / version)
        os.replace(partial / version, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("version %s downloaded from %s into %s", version, store.url, cache)
    return cache


def prune_cache(cache: Path, keep: Sequence[str]) -> None:
    """Remove cached versions other than ``keep``."""
    if not cache.is_dir():
        return
    for entry in cache.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def workspace(store: ArtifactStore, *, pull: Sequence[str] = ()) -> Iterator[Path]:
    """A local root for ``model.artifacts`` to work on, for any store.

    For a local store, its own directory. For a bucket, a temporary directory holding
    ``CURRENT`` and the versions named in ``pull`` (``CURRENT`` for the live one),
    downloaded and verified; when the block ends without error, every version published
    into it is uploaded (files first, manifest last), and then, if the block moved it,
    ``CURRENT`` is written. A failed block uploads nothing and leaves ``CURRENT``.
    """
    if isinstance(store, LocalStore):
        yield store.root
        return
    with tempfile.TemporaryDirectory(prefix="recstream-workspace-") as tmp:
        root = Path(tmp)
        try:
            current: str | None = store.read_current()
        except ArtifactError:
            current = None
        for name in pull:
            version = current if name == CURRENT else name
            if version is not None:
                fetch(store, version, root)
        if current is not None:
            (root / CURRENT).write_text(current + "\n")
        before = set(list_versions(root))
        yield root
        for version in sorted(set(list_versions(root)) - before):
            verify_version(root / version)
            store.put_version(root / version, version)
        try:
            moved: str | None = read_current(root)
        except ArtifactError:
            moved = None
        if moved is not None and moved != current:
            store.write_current(moved)
            logger.info("%s/CURRENT -> %s", store.url, moved)


def switch(store: ArtifactStore, version: str, cache: Path) -> str | None:
    """Point the store's ``CURRENT`` at ``version`` after verifying it (downloaded into
    ``cache`` for a bucket); returns the version it replaces (None: none, or invalid).

    :raises ArtifactError: no such version, incomplete, or a checksum mismatch.
    """
    _check_name(version)
    if version not in store.versions():
        raise ArtifactError(
            f"no version {version!r} under {store.url} (`recstream versions` lists them)"
        )
    fetch(store, version, cache)
    try:
        previous: str | None = store.read_current()
    except ArtifactError:
        previous = None
    store.write_current(version)
    return previous


def _live(store: ArtifactStore) -> str | None:
    try:
        return store.read_current()
    except ArtifactError:
        return None


def start_canary(store: ArtifactStore, version: str, share: float, cache: Path) -> Canary:
    """Serve ``version`` (verified first) to ``share`` of the users beside ``CURRENT``;
    replaces a running canary. Workers pick it up at their next poll.

    :raises ArtifactError: a bad share, no such version, a broken one, or the live one.
    """
    canary = Canary(version, share)
    live = _live(store)
    if live is None:
        raise ArtifactError(f"no {CURRENT} under {store.url}: a canary runs beside a live version")
    if version == live:
        raise ArtifactError(f"{version} is already the live version")
    if version not in store.versions():
        raise ArtifactError(
            f"no version {version!r} under {store.url} (`recstream versions` lists them)"
        )
    fetch(store, version, cache)
    store.write_canary(canary)
    return canary


def stop_canary(store: ArtifactStore) -> Canary | None:
    """End the canary (its users go back to ``CURRENT``); returns the one ended."""
    canary = store.read_canary()
    store.write_canary(None)
    return canary


def promote(store: ArtifactStore, cache: Path) -> tuple[Canary, str | None]:
    """Make the canary the live version: ``CURRENT`` first, then ``CANARY`` removed (a
    worker that sees both name the same version serves it to everyone). Returns the
    canary and the version it replaces.

    :raises ArtifactError: no canary runs, or its version is no longer whole.
    """
    canary = store.read_canary()
    if canary is None:
        raise ArtifactError(f"no canary runs under {store.url} (recstream canary --version V)")
    previous = switch(store, canary.version, cache)
    store.write_canary(None)
    return canary, previous


def gc(store: ArtifactStore, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the live one nor the canary;
    returns the versions deleted. Incomplete versions (an upload cut short) count as
    deletable."""
    if keep < 1:
        raise ArtifactError(f"--keep must be at least 1, not {keep}")
    live = _live(store)
    try:
        canary = store.read_canary()
    except ArtifactError:
        canary = None
    everything = store.versions()
    kept = set(everything[-keep:]) | ({live} if live else set())
    if canary is not None:
        kept.add(canary.version)
    doomed = [v for v in everything if v not in kept]
    for version in doomed:
        store.delete_version(version)
        logger.info("deleted version %s from %s", version, store.url)
    return doomed


def summaries(store: ArtifactStore) -> list[dict[str, Any]]:
    """One summary per version, oldest first, from the manifests (unverified)."""
    live = _live(store)
    try:
        canary = store.read_canary()
    except ArtifactError:
        canary = None
    out: list[dict[str, Any]] = []
    for version in store.versions():
        summary: dict[str, Any] = {
            "version": version,
            "current": version == live,
            "canary_share": canary.share if canary and canary.version == version else None,
        }
        try:
            manifest = store.manifest(version)
        except ArtifactError as exc:
            out.append(summary | {"complete": False, "error": str(exc)})
            continue
        metrics = manifest.get("metrics", {})
        summary |= {
            "complete": True,
            "created": manifest.get("created"),
            "model_version": manifest.get("model_version", version),
            "index": manifest.get("index", {}).get("factory"),
            "items": manifest.get("num_items"),
            "valid_ndcg@10": metrics.get("valid", {}).get("ndcg@10"),
            "test_ndcg@10": metrics.get("test", {}).get("ndcg@10"),
        }
        out.append(summary)
    return out
