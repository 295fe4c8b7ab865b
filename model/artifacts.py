"""Versioned model artifacts: ``<root>/<version>/`` plus an atomically replaced ``CURRENT``.

A version directory holds the TorchScript encoder, the item embeddings, the item id
list, the FAISS index and ``manifest.json`` with the sha256 of every other file. A
version is written under a hidden temporary name and renamed into place when complete,
so readers never see half a version; ``CURRENT`` moves only after that.
"""

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import IndexConfig
from model.errors import ArtifactError
from model.index import FloatArray, build_index, load_index, save_index
from model.sasrec import load_encoder

logger = logging.getLogger(__name__)

ENCODER = "encoder.pt"
EMBEDDINGS = "item_embeddings.npy"
ITEMS = "items.json"
INDEX = "index.faiss"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
PROJECTION = "text_projection.npz"  # item text -> item embedding (versions trained with items)
FORMAT_VERSION = 1


def new_version_name(now: datetime | None = None) -> str:
    """Sortable and unique: UTC time to the millisecond plus a random suffix (names sort
    in publication order, which ``recstream gc`` relies on)."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class VersionContents:
    """Everything a new version holds besides the index, which is built from it."""

    encoder: torch.jit.ScriptModule
    item_embeddings: FloatArray  # [N + 1, d], row 0 padding
    item_ids: list[str]  # index -> external id, entry 0 is the padding placeholder
    max_len: int
    popularity: list[str]  # external ids, most popular first
    info: Mapping[str, Any]  # hyper-parameters, data fingerprint, metrics, ...


def publish_version(
    root: Path,
    contents: VersionContents,
    index_cfg: IndexConfig,
    *,
    version: str | None = None,
    switch: bool = True,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> str:
    """Write a complete version under ``root``, then point ``CURRENT`` at it."""
    emb = np.ascontiguousarray(contents.item_embeddings, dtype=np.float32)
    if emb.shape[0] != len(contents.item_ids):
        raise ArtifactError(
            f"embedding rows ({emb.shape[0]}) do not match item ids ({len(contents.item_ids)})"
        )
    version = version or new_version_name()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{version}"
    staging.mkdir()
    try:
        contents.encoder.save(str(staging / ENCODER))
        np.save(staging / EMBEDDINGS, emb)
        _write_json(staging / ITEMS, contents.item_ids)
        index, report = build_index(emb[1:], index_cfg)
        save_index(index, staging / INDEX)
        for name, writer in (extra_files or {}).items():
            writer(staging / name)
        manifest = {
            "format": FORMAT_VERSION,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "dims": int(emb.shape[1]),
            "num_items": int(emb.shape[0] - 1),
            "max_len": contents.max_len,
            "index": {
                "factory": index_cfg.factory,
                "nprobe": index_cfg.nprobe,
                "ef_search": index_cfg.ef_search,
                "build_s": round(report.build_s, 3),
                f"recall@{report.k}": report.recall_at_k,
                "version": version,
            },
            "popularity": contents.popularity,
            **contents.info,
            "files": {
                p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST
            },
        }
        _write_json(staging / MANIFEST, manifest)
        os.replace(staging, root / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("published version %s under %s", version, root)
    if switch:
        switch_current(root, version)
    return version


def derived_info(source: "LoadedVersion") -> dict[str, Any]:
    """The manifest entries a version made from ``source`` with the same model keeps
    (training data, metrics, text tower, ...), and the model's version."""
    own = {"format", "version", "created", "dims", "num_items", "max_len", "index"}
    kept = {k: v for k, v in source.manifest.items() if k not in own | {"popularity", "files"}}
    return kept | {"model_version": source.model_version}


def model_files(root: Path, version: str) -> dict[str, Callable[[Path], None]]:
    """Writers of the files that go with a version's model into a version made from it:
    its text projection, if it has one, so that new items can still be added."""
    projection = root / version / PROJECTION
    if not projection.is_file():
        return {}

    def copy_projection(path: Path) -> None:
        shutil.copyfile(projection, path)

    return {PROJECTION: copy_projection}


def index_config(manifest: Mapping[str, Any]) -> IndexConfig:
    """The index settings a version was built with."""
    idx = manifest["index"]
    return IndexConfig(
        factory=idx["factory"], nprobe=idx.get("nprobe", 16), ef_search=idx.get("ef_search", 128)
    )


def rebuild_index(root: Path, version: str, index_cfg: IndexConfig, *, switch: bool = True) -> str:
    """A new version with the same model and another index; the source is untouched."""
    source = load_version(root, version, load_index_file=False)
    contents = VersionContents(
        encoder=source.encoder,
        item_embeddings=source.item_embeddings,
        item_ids=source.item_ids,
        max_len=source.max_len,
        popularity=source.manifest.get("popularity", []),
        info=derived_info(source),
    )
    return publish_version(
        root, contents, index_cfg, switch=switch, extra_files=model_files(root, version)
    )


def switch_current(root: Path, version: str) -> None:
    """Point ``CURRENT`` at a complete version, atomically (write, fsync, rename)."""
    verify_version(root / version)
    _atomic_write_text(root / CURRENT, version + "\n")
    logger.info("CURRENT -> %s", version)


def read_current(root: Path) -> str:
    path = root / CURRENT
    try:
        version = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ArtifactError(
            f"no {CURRENT} under {root}: train a model first (recstream train --out {root})"
        ) from None
    if not version or "/" in version or version.startswith("."):
        raise ArtifactError(f"{path} holds an invalid version name {version!r}")
    return version


def list_versions(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{version_dir} is not a complete version: no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    return manifest


def verify_version(version_dir: Path) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its sha256."""
    manifest = read_manifest(version_dir)
    files = manifest.get("files")
    required = {ENCODER, EMBEDDINGS, ITEMS, INDEX}
    if not isinstance(files, dict) or not required <= files.keys():
        raise ArtifactError(f"{version_dir / MANIFEST} does not list {sorted(required)}")
    for name, expected in files.items():
        path = version_dir / name
        if not path.is_file():
            raise ArtifactError(f"{version_dir.name}: {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{version_dir.name}: checksum mismatch for {name} "
                f"(manifest {expected[:12]}..., file {actual[:12]}...)"
            )
    return manifest


@dataclass
class LoadedVersion:
    version: str
    manifest: dict[str, Any]
    encoder: torch.jit.ScriptModule
    item_embeddings: FloatArray
    item_ids: list[str]
    index: Any  # a FAISS index, or None when not loaded

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def model_version(self) -> str:
        """The version that trained the encoder (an index rebuild keeps it)."""
        return str(self.manifest.get("model_version", self.version))

    @property
    def index_version(self) -> str:
        return str(self.manifest["index"]["version"])

    def item_index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids) if i}


def load_version(
    root: Path,
    version: str | None = None,
    *,
    map_location: str = "cpu",
    load_index_file: bool = True,
) -> LoadedVersion:
    """Load and verify ``version`` (default: the one ``CURRENT`` names)."""
    version = version or read_current(root)
    version_dir = root / version
    if not version_dir.is_dir():
        raise ArtifactError(f"version {version!r} does not exist under {root}")
    manifest = verify_version(version_dir)
    try:
        encoder = load_encoder(str(version_dir / ENCODER), map_location)
        embeddings = np.load(version_dir / EMBEDDINGS).astype(np.float32, copy=False)
        item_ids = json.loads((version_dir / ITEMS).read_text(encoding="utf-8"))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"version {version!r} cannot be loaded: {exc}") from exc
    if embeddings.shape[0] != len(item_ids):
        raise ArtifactError(f"version {version!r}: embeddings and items.json disagree in length")
    index = None
    if load_index_file:
        index = load_index(version_dir / INDEX, index_config(manifest))
        if index.ntotal != len(item_ids) - 1:
            raise ArtifactError(f"version {version!r}: index size does not match items.json")
    return LoadedVersion(version, manifest, encoder, embeddings, item_ids, index)
