"""Time loading GloVe 6B 50d and one nearest-neighbour query over all words.

Run from the repository root:

    .venv/bin/python benchmarks/bench_static_embeddings.py

Prints one JSON object, with times in seconds:

- ``load_s``: one uncached call of ``load_glove``, which reads the .npy and
  parquet files, normalises the rows and copies them to the device.
- ``first_query_with_compile_s``: the first ``nearest`` call, which compiles.
- ``jit_query_s``: one ``StaticEmbeddings.nearest`` call, including its
  Python checks, the jit-compiled matrix-vector product and top_k, and the
  copy back to NumPy.
- ``kernel_only_s``: the compiled kernel alone.
- ``numpy_query_s``: the same search in NumPy (matrix-vector product and
  argpartition), for comparison.

The last three are medians over ``--repeats`` calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from book_utils import describe_backend
from book_utils.static_embeddings import _top_k_cosine, load_glove


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=50, help="number of timed calls per measurement"
    )
    parser.add_argument(
        "--k", type=int, default=10, help="number of neighbours per query"
    )
    parser.add_argument(
        "--word", default="bank", help="word whose neighbours are searched"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    glove = load_glove.__wrapped__()
    jax.block_until_ready(glove.unit_vectors)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    glove.nearest(args.word, k=args.k)
    first_query_s = time.perf_counter() - start
    jit_query_s = median_seconds(
        lambda: glove.nearest(args.word, k=args.k), args.repeats
    )

    row = glove.index(args.word)
    query = glove.unit_vectors[row]
    excluded = np.array([row] + [glove.vocab_size] * 7, dtype=np.int32)

    def kernel():
        jax.block_until_ready(
            _top_k_cosine(
                glove.unit_vectors, query, excluded, glove.vocab_size, k=args.k
            )
        )

    kernel()
    kernel_only_s = median_seconds(kernel, args.repeats)

    unit_numpy = np.asarray(glove.unit_vectors)
    query_numpy = unit_numpy[row]

    def numpy_query():
        scores = unit_numpy @ query_numpy
        scores[row] = -np.inf
        top = np.argpartition(-scores, args.k)[: args.k]
        return top[np.argsort(-scores[top])]

    numpy_query_s = median_seconds(numpy_query, args.repeats)

    print(
        json.dumps(
            {
                "backend": describe_backend(),
                "vocab_size": glove.vocab_size,
                "dim": glove.dim,
                "k": args.k,
                "repeats": args.repeats,
                "load_s": round(load_s, 4),
                "first_query_with_compile_s": round(first_query_s, 4),
                "jit_query_s": round(jit_query_s, 6),
                "kernel_only_s": round(kernel_only_s, 6),
                "numpy_query_s": round(numpy_query_s, 6),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
