"""Time the from-scratch attention against jax.nn.dot_product_attention.

Batch 1, 12 heads of size 64, float32, with and without a causal mask, for
512 to 4,096 tokens. Each implementation gets its own layout, so that no
transpose is charged to either: the book's function takes (B, N, T, d_k),
jax.nn.dot_product_attention takes (B, T, N, d_k). Both are jit-compiled
and both outputs are compared before anything is timed.

The two are timed in alternation (``benchmarks.common.time_pair``) and the
reported ratio is the median of the per-pair ratios, which other processes
on a shared machine disturb less than two separate medians.

The FLOP count is the dense one, 4 * N * T^2 * d_k: two matrix products of
2 * N * T^2 * d_k each. The causal case is counted the same, because
neither implementation skips the masked half. The achieved rate uses the
fastest call and is compared with this machine's matrix-multiply rate, also
from its fastest call.

Run from the repository root; prints one JSON object:

    .venv/bin/python -m benchmarks.bench_attention
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    machine_description,
    matmul_flop_rate,
    planned_bytes,
    time_pair,
)
from book_utils.attention import causal_mask, scaled_dot_product_attention

NUM_HEADS = 12
HEAD_DIM = 64
LENGTHS = (512, 1024, 2048, 4096)


def _inputs(seq_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    keys = jax.random.split(jax.random.key(seq_len), 3)
    # (B, N, T, d_k) for the book's layout
    shape = (1, NUM_HEADS, seq_len, HEAD_DIM)
    return tuple(jax.random.normal(key, shape, jnp.float32) for key in keys)


@jax.jit
def _scratch(query, key, value):
    return scaled_dot_product_attention(query, key, value)[0]


@jax.jit
def _scratch_causal(query, key, value):
    mask = causal_mask(query.shape[-2])
    return scaled_dot_product_attention(query, key, value, mask)[0]


def _reference(is_causal: bool):
    """Return jax.nn.dot_product_attention, jitted, on (B, T, N, d_k) inputs."""

    @jax.jit
    def attend(query, key, value):
        return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal)

    return attend


def compiled_summary(function, *args: jax.Array) -> dict[str, int]:
    """Describe the compiled program: planned temporary bytes and its kernels.

    ``kernels`` counts the fusions and custom calls in the entry computation
    of XLA's optimised HLO, each of which runs as one kernel, and
    ``temp_bytes`` the temporary buffers XLA plans between them. Fewer
    kernels and fewer temporaries mean fewer passes over the (N, T, T)
    scores in memory.
    """
    compiled = function.lower(*args).compile()
    entry = compiled.as_text().split("\nENTRY ", 1)[-1]
    kernels = sum(
        1
        for line in entry.splitlines()
        if " fusion(" in line or " custom-call(" in line
    )
    return {"temp_bytes": planned_bytes(compiled)["temp"], "kernels": kernels}


def measure(seq_len: int, causal: bool, repeats: int) -> dict[str, Any]:
    """Check and time both implementations at one length; return one row."""
    scratch = _scratch_causal if causal else _scratch
    reference = _reference(causal)
    inputs = _inputs(seq_len)
    # (B, T, N, d_k) copies for the reference, made before any timing
    reference_inputs = jax.block_until_ready(
        tuple(jnp.swapaxes(array, 1, 2) for array in inputs)
    )

    difference = jnp.abs(
        scratch(*inputs) - jnp.swapaxes(reference(*reference_inputs), 1, 2)
    ).max()
    timing = time_pair(
        lambda: scratch(*inputs),
        lambda: reference(*reference_inputs),
        repeats=repeats,
    )

    flops = 4 * NUM_HEADS * seq_len**2 * HEAD_DIM
    scratch_program = compiled_summary(scratch, *inputs)
    reference_program = compiled_summary(reference, *reference_inputs)
    return {
        "seq_len": seq_len,
        "causal": causal,
        "repeats": repeats,
        "scratch_s": timing["candidate_median_s"],
        "scratch_min_s": timing["candidate_min_s"],
        "reference_s": timing["reference_median_s"],
        "reference_min_s": timing["reference_min_s"],
        "scratch_over_reference": timing["candidate_over_reference"],
        "flops": flops,
        "scratch_flop_per_s": flops / timing["candidate_min_s"],
        "reference_flop_per_s": flops / timing["reference_min_s"],
        "max_abs_difference": float(np.asarray(difference)),
        "scratch_temp_bytes": scratch_program["temp_bytes"],
        "scratch_kernels": scratch_program["kernels"],
        "reference_temp_bytes": reference_program["temp_bytes"],
        "reference_kernels": reference_program["kernels"],
    }


def run(
    lengths: tuple[int, ...] = LENGTHS, repeats: int = 5, long_repeats: int = 3
) -> dict[str, Any]:
    """Time both implementations at every length; return a JSON-ready dict.

    Lengths of 4,096 tokens and more get ``long_repeats`` timed pairs, the
    others ``repeats``.
    """
    matmul = matmul_flop_rate()
    rows = []
    for causal in (False, True):
        for seq_len in lengths:
            count = long_repeats if seq_len >= 4096 else repeats
            row = measure(seq_len, causal, count)
            row["scratch_fraction_of_matmul_rate"] = (
                row["scratch_flop_per_s"] / matmul["flop_per_s"]
            )
            row["reference_fraction_of_matmul_rate"] = (
                row["reference_flop_per_s"] / matmul["flop_per_s"]
            )
            rows.append(row)
    return {
        "description": (
            "from-scratch attention vs jax.nn.dot_product_attention, batch 1, "
            f"{NUM_HEADS} heads of {HEAD_DIM}, float32; times are medians, "
            "FLOP rates use the fastest call, the ratio is the median of "
            "paired ratios"
        ),
        "num_heads": NUM_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        "machine": machine_description(),
        "matmul": matmul,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(LENGTHS),
        help="sequence lengths T in tokens",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed pairs below 4,096 tokens"
    )
    parser.add_argument(
        "--long-repeats",
        type=int,
        default=3,
        help="timed pairs at 4,096 tokens and more",
    )
    args = parser.parse_args()
    result = run(tuple(args.lengths), args.repeats, args.long_repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
