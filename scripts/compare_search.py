"""Exact search: FAISS's flat index against the worker's ``ExactScorer``, side by side.

Builds an exact inner-product index with the project's ``build_index`` over random
vectors of the Taobao replay's size (55,368 items, dim 64), then times interleaved calls
of ``model.index.search`` with an ``ExactScorer`` (transposed vectors, top-k in two
steps) against each of two other ways to the same top-k, for batches of queries as the
worker sends them, on one thread as the worker runs: the index's own ``search``, and a
matrix product over the index's vectors with a top-k over every score (the worker's way
before the scorer). It checks that all three return the same items. CPU time is the
process's, so it includes any helper threads the BLAS library runs.

    .venv/bin/python scripts/compare_search.py
"""

import argparse

import faiss
import numpy as np
import torch

from model.config import IndexConfig
from model.index import ExactScorer, build_index, flat_vectors, search
from recstream_tools.bench.micro import interleaved_medians


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
    scorer = ExactScorer.of(index)
    rows = torch.from_numpy(flat_vectors(index))

    def product_and_top_k(queries: np.ndarray) -> torch.Tensor:
        return torch.topk(torch.from_numpy(queries) @ rows.T, args.k).indices

    print(
        "| queries | FAISS flat ms | scorer ms | speed-up | product + top-k ms | scorer ms "
        "| speed-up | scorer CPU ms | same items |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for nq in (int(v) for v in args.queries.split(",")):
        queries = rng.standard_normal((nq, args.dim)).astype(np.float32)
        _, faiss_ids = index.search(queries, args.k)
        _, ids = search(index, queries, args.k, scorer)
        same = (ids == faiss_ids + 1).all() and (
            product_and_top_k(queries).numpy() == faiss_ids
        ).all()
        # Two pairs, each interleaved on its own: a FAISS call just before speeds up
        # the next product over the same rows and slows the scorer's (it reads its
        # own copy), which would bias a three-way rotation.
        scorer_call = lambda q=queries: search(index, q, args.k, scorer)  # noqa: E731
        faiss_pair = interleaved_medians(
            {"faiss": lambda q=queries: index.search(q, args.k), "scorer": scorer_call},
            args.repeats,
        )
        product_pair = interleaved_medians(
            {"product": lambda q=queries: product_and_top_k(q), "scorer": scorer_call},
            args.repeats,
        )
        (a, _), (c1, cc) = faiss_pair["faiss"], faiss_pair["scorer"]
        (b, _), (c2, _) = product_pair["product"], product_pair["scorer"]
        print(
            f"| {nq} | {a:.2f} | {c1:.2f} | {a / c1:.2f}x | {b:.2f} | {c2:.2f} | {b / c2:.2f}x "
            f"| {cc:.2f} | {'yes' if same else 'no'} |"
        )


if __name__ == "__main__":
    main()
