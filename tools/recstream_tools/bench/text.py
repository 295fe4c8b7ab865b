"""Item text speed: texts embedded per second by the text tower's sentence model, and
``add-items`` end to end on a published version.

The texts are MovieLens-100k's item lines (title, year, genres) made distinct with a
running number and repeated to the size asked for: real lengths and vocabulary, as many
items as a large catalogue.
"""

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.item_text import TextEncoder, load_item_texts
from stream_worker.errors import WorkerError

logger = logging.getLogger(__name__)

ITEM_FILE = "ml-100k/ml-100k.item"


@dataclass
class TextSpeed:
    texts: int
    batch_size: int
    runs_s: list[float] = field(default_factory=list)  # embedding all texts, per run
    add_items: int = 0
    add_items_s: float = 0.0  # add_items on a published version, end to end

    @property
    def items_per_s(self) -> float:
        return self.texts / statistics.median(self.runs_s)


def catalogue(data_root: Path, size: int) -> dict[str, str]:
    base = list(load_item_texts(data_root / ITEM_FILE).values())
    return {f"bench-{n}": f"{base[n % len(base)]}; edition: {n}" for n in range(size)}


def run_text_speed(
    data_root: Path, texts: int, runs: int, add: int, artifacts: Path | None, out_dir: Path
) -> str:
    items = catalogue(data_root, texts)
    encoder = TextEncoder()
    encoder.embed(list(items.values())[:256])  # warm-up
    result = TextSpeed(texts, 128)
    for run in range(runs):
        started = time.perf_counter()
        encoder.embed(list(items.values()), batch_size=result.batch_size, progress=True)
        result.runs_s.append(time.perf_counter() - started)
        logger.info("run %d: %.1fs", run + 1, result.runs_s[-1])
    if artifacts is not None:
        # The command as an operator runs it, in a new process: imports, loading the
        # sentence model, embedding, projecting, writing and indexing a new version.
        out_dir.mkdir(parents=True, exist_ok=True)
        new_items = out_dir / "new-items.jsonl"
        new_items.write_text(
            "".join(
                json.dumps({"item_id": item, "text": text}) + "\n"
                for item, text in catalogue(data_root, add).items()
            )
        )
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "stream_worker.cli", "add-items", "--artifacts",
             str(artifacts), "--items", str(new_items), "--no-switch"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        result.add_items_s = time.perf_counter() - started
        if done.returncode != 0:
            raise WorkerError(f"add-items failed: {done.stderr.strip().splitlines()[-1:]}")
        result.add_items = int(json.loads(done.stdout.strip().splitlines()[-1])["added"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "text.json").write_text(
        json.dumps(asdict(result) | {"items_per_s": result.items_per_s}, indent=2)
    )
    lines = [
        f"embedded {texts:,} item texts {runs} times (batches of {result.batch_size}): "
        f"median {statistics.median(result.runs_s):.1f}s, {result.items_per_s:,.0f} items/s "
        f"(runs: {', '.join(f'{s:.1f}s' for s in result.runs_s)})"
    ]
    if artifacts is not None:
        lines.append(
            f"recstream add-items of {result.add_items:,} items into {artifacts}, a new "
            f"process end to end: {result.add_items_s:.1f}s"
        )
    return "\n".join(lines)
