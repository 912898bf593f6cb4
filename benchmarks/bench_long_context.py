"""Measure dense, chunked and sliding-window attention on long sequences.

One head with d_k = d_v = 64 in float32, inputs of shape (T, 64). Prints one
JSON object with:

- ``longest_fitting``: the longest T whose compiled memory fits the budget
  (``--budget-gib``, default 4 GiB), for dense and for chunked attention.
  "Compiled memory" is XLA's plan from ``memory_analysis()``: arguments +
  outputs + temporaries - aliased bytes. Nothing runs, so lengths far beyond
  this machine's memory can be tested. The search is a bisection over T for
  dense attention, and over multiples of the chunk size for chunked attention.
  Chunked attention pads other lengths to the next multiple, which costs two
  more copies of the keys and values, so its memory is not monotonic between
  multiples.
- ``time_s``: median wall-clock seconds of the compiled functions, chunked
  against dense at 4,096 and 16,384 tokens, chunked alone at 65,536 tokens,
  and sliding-window attention (window 512) over 1,000,000 tokens, which
  runs block by block and never builds a (T, T) mask.
- ``dense_output_only``: evidence for the pitfall the chapter warns about.
  Dense attention that returns only its output is compiled and run at 16,384
  tokens in a fresh process; its planned temporary bytes are printed next to
  the growth of the process's peak resident memory while it runs.

Dense attention is book_utils.attention.scaled_dot_product_attention, which
returns the output and the (T, T) weights, as in the chapter. Timings share
the CPU with anything else running on the machine.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_long_context
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from benchmarks.common import cpu_model, time_call
from book_utils.attention import scaled_dot_product_attention
from book_utils.long_context import chunked_attention, sliding_window_attention

HEAD_DIM = 64


def compiled(function: Callable, seq_len: int) -> jax.stages.Compiled:
    """Compile ``function(query, key, value)`` for (seq_len, 64) float32 inputs."""
    spec = jax.ShapeDtypeStruct((seq_len, HEAD_DIM), jnp.float32)
    return jax.jit(function).lower(spec, spec, spec).compile()


def planned_bytes(function: Callable, seq_len: int) -> int:
    """Return the bytes XLA plans for one call: args + outputs + temps - aliases."""
    memory = compiled(function, seq_len).memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def longest_fitting(function: Callable, budget: int, step: int, upper: int) -> dict:
    """Bisect for the largest multiple of ``step`` whose plan fits ``budget``.

    Raises:
        ValueError: if ``step`` does not fit or ``upper`` still fits.
    """
    low, high = 1, upper // step  # in units of step
    if planned_bytes(function, low * step) > budget:
        raise ValueError(f"even {step} tokens exceed the budget of {budget} bytes")
    if planned_bytes(function, high * step) <= budget:
        raise ValueError(f"{upper} tokens still fit the budget; raise upper")
    while high - low > 1:
        middle = (low + high) // 2
        if planned_bytes(function, middle * step) <= budget:
            low = middle
        else:
            high = middle
    return {
        "seq_len": low * step,
        "planned_bytes": planned_bytes(function, low * step),
        "next_seq_len": high * step,
        "next_planned_bytes": planned_bytes(function, high * step),
    }


def median_seconds(function: Callable, seq_len: int, repeats: int) -> float:
    """Compile, then time ``repeats`` calls on random (seq_len, 64) inputs."""
    executable = compiled(function, seq_len)
    keys = jax.random.split(jax.random.key(seq_len), 3)
    inputs = [jax.random.normal(key, (seq_len, HEAD_DIM)) for key in keys]
    jax.block_until_ready(inputs)
    # Already compiled, so no warm-up call is needed.
    timing = time_call(lambda: executable(*inputs), repeats=repeats, warmup=0)
    return timing["median_s"]


def dense_output_only(query, key, value):
    output, _ = scaled_dot_product_attention(query, key, value)
    return output


def probe_dense_output_only(seq_len: int) -> dict:
    """Run output-only dense attention once; compare plan and resident memory.

    Meant to run in a fresh process (``--probe``), so that the peak resident
    set size before the call is not inflated by earlier work.
    """
    executable = compiled(dense_output_only, seq_len)
    memory = executable.memory_analysis()
    keys = jax.random.split(jax.random.key(0), 3)
    inputs = [jax.random.normal(key, (seq_len, HEAD_DIM)) for key in keys]
    jax.block_until_ready(inputs)
    # ru_maxrss is in KiB on Linux.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    jax.block_until_ready(executable(*inputs))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seq_len": seq_len,
        "planned_temp_bytes": memory.temp_size_in_bytes,
        "peak_rss_growth_bytes": after - before,
        "scores_bytes": 4 * seq_len**2,
    }


def run_probe_in_subprocess(seq_len: int) -> dict:
    module = "benchmarks.bench_long_context"
    command = [sys.executable, "-m", module, "--probe", str(seq_len)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-gib", type=float, default=4.0, help="memory budget in GiB"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=512,
        help="keys per chunk of chunked attention",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=512,
        help="keys each query attends to in sliding-window attention",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls at 4,096 and 16,384 tokens"
    )
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        print(json.dumps(probe_dense_output_only(args.probe)))
        return

    budget = int(args.budget_gib * 2**30)
    chunked = partial(chunked_attention, chunk_size=args.chunk_size)
    windowed = partial(sliding_window_attention, window=args.window)
    result = {
        "machine": {
            "backend": jax.default_backend(),
            "devices": [str(device) for device in jax.devices()],
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        "chunk_size": args.chunk_size,
        "window": args.window,
        "budget_bytes": budget,
    }

    result["dense_output_only"] = run_probe_in_subprocess(16384)
    result["longest_fitting"] = {
        "dense": longest_fitting(
            scaled_dot_product_attention, budget, step=1, upper=2**20
        ),
        "chunked": longest_fitting(chunked, budget, step=args.chunk_size, upper=2**28),
    }

    timings = {}
    for seq_len in (4096, 16384):
        timings[f"dense_{seq_len}"] = median_seconds(
            scaled_dot_product_attention, seq_len, args.repeats
        )
        timings[f"chunked_{seq_len}"] = median_seconds(chunked, seq_len, args.repeats)
    timings["chunked_65536"] = median_seconds(chunked, 65536, repeats=1)
    timings["sliding_window_1000000"] = median_seconds(windowed, 1_000_000, repeats=1)
    result["time_s"] = timings
    result["dense_over_chunked_time"] = {
        seq_len: timings[f"dense_{seq_len}"] / timings[f"chunked_{seq_len}"]
        for seq_len in (4096, 16384)
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
