"""Exact search: FAISS's flat index against ``model.index.search``, side by side.

Builds an exact inner-product index with the project's ``build_index`` over random
vectors of the Taobao replay's size (55,368 items, dim 64), then times interleaved calls
of the index's own ``search`` and ``model.index.search`` (a matrix product and a top-k
over the same vectors) for batches of queries as the worker sends them, on one thread
as the worker runs, and checks that both return the same items. CPU time is the
process's, so it includes any helper threads the BLAS library runs.

    .venv/bin/python scripts/compare_search.py
"""

import argparse

import faiss
import numpy as np
import torch

from model.config import IndexConfig
from model.index import build_index, search
from stream_worker.bench.micro import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=55_368)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=42, help="the worker asks for k + 32 at most")
    parser.add_argument("--queries", default="1,5,10,30,90,170")
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((args.items, args.dim)) * 0.02).astype(np.float32)
    index, _ = build_index(vectors, IndexConfig())
    print(
        f"{args.items:,} items, dim {args.dim}, k {args.k}, one thread, medians of {args.repeats}"
    )
    print(
        "| queries | FAISS flat ms | matrix product + top-k ms | speed-up "
        "| FAISS CPU ms | matrix product CPU ms | same items |"
    )
    print("|---|---|---|---|---|---|---|")
    for nq in (int(v) for v in args.queries.split(",")):
        queries = rng.standard_normal((nq, args.dim)).astype(np.float32)
        _, faiss_ids = index.search(queries, args.k)
        _, ids = search(index, queries, args.k)
        same = bool((ids == faiss_ids + 1).all())
        medians = interleaved_medians(
            {
                "faiss": lambda q=queries: index.search(q, args.k),
                "ours": lambda q=queries: search(index, q, args.k),
            },
            args.repeats,
        )
        (a, ca), (b, cb) = medians["faiss"], medians["ours"]
        print(
            f"| {nq} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {ca:.2f} | {cb:.2f} "
            f"| {'yes' if same else 'no'} |"
        )


if __name__ == "__main__":
    main()
