"""Encoder speed of this checkout against an earlier revision, side by side.

Loads ``model/sasrec.py`` as of ``--base`` next to the current one, builds both with
the same seed (same weights), scripts them as the artifact export does, checks that
they give the same user vectors, and times interleaved calls on batches shaped like the
worker's (histories of one length bucket, left-padded), on one thread as the worker runs.

    .venv/bin/python scripts/compare_encoder.py --base 171e189
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from model import sasrec
from model.sequences import pad_left
from recstream_tools.bench.micro import interleaved_medians

SHAPES = [(1, 200), (8, 50), (8, 200), (16, 100), (16, 200), (64, 200), (256, 50)]


def module_at(revision: str, folder: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:model/sasrec.py"], check=True, capture_output=True, text=True
    ).stdout
    path = folder / "sasrec_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sasrec_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--items", type=int, default=55_368)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_module = module_at(args.base, Path(tmp))
        encoders = {}
        for name, module in (("base", base_module), ("current", sasrec)):
            torch.manual_seed(0)
            model = module.SASRec(args.items, 200, 64, 2, 1, 0.2).eval()
            encoders[name] = module.script_encoder(model)
    rng = np.random.default_rng(0)
    print(f"| batch | lengths | {args.base} ms | current ms | speed-up |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch, length in SHAPES:
            histories = [
                rng.integers(1, args.items, size=rng.integers(length // 2, length + 1))
                for _ in range(batch)
            ]
            seqs = torch.from_numpy(pad_left(histories, 200))
            if not torch.allclose(encoders["base"](seqs), encoders["current"](seqs), atol=1e-4):
                sys.exit(f"the encoders disagree at batch {batch}, length {length}")
            # The first rounds warm up TorchScript.
            medians = interleaved_medians(
                {name: lambda e=encoder, s=seqs: e(s) for name, encoder in encoders.items()},
                args.calls,
                warmup=5,
            )
            base, current = medians["base"][0], medians["current"][0]
            print(
                f"| {batch} | {length // 2}-{length} | {base:.2f} | {current:.2f} "
                f"| {base / current:.2f}x |"
            )


if __name__ == "__main__":
    main()
