"""Compare sequence_parallel_attention with dense attention on every device.

tests/test_long_context.py runs this file in a subprocess, because the number
of simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
must be set before JAX starts. On a GPU or TPU runtime the flag changes only
the host platform, and the mesh spans the accelerators that exist.

Prints one JSON object: the backend, the device count, the max absolute
difference from dense attention for each case, and the ValueError message
for a length that the device count does not divide.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from book_utils.attention import causal_mask, scaled_dot_product_attention
from book_utils.long_context import sequence_parallel_attention


def max_difference(output: jax.Array, reference: jax.Array) -> float:
    difference = np.asarray(output, np.float32) - np.asarray(reference, np.float32)
    return float(np.abs(difference).max())


def main() -> None:
    num_devices = len(jax.devices())
    seq_len, head_dim = 8 * num_devices, 16
    keys = jax.random.split(jax.random.key(0), 3)
    # (B, N, T, d_k) queries, and keys and values shared by the heads
    query = jax.random.normal(keys[0], (2, 3, seq_len, head_dim))
    key = jax.random.normal(keys[1], (2, 1, seq_len, head_dim))
    value = jax.random.normal(keys[2], (2, 1, seq_len, head_dim))
    auto_mesh = Mesh(np.array(jax.devices()), ("sequence",))
    explicit_mesh = jax.make_mesh((num_devices,), ("sequence",))
    result = {"backend": jax.default_backend(), "num_devices": num_devices}

    with jax.default_matmul_precision("highest"):
        dense, _ = scaled_dot_product_attention(query, key, value)
        causal, _ = scaled_dot_product_attention(
            query, key, value, causal_mask(seq_len)
        )
        output = sequence_parallel_attention(query, key, value, mesh=auto_mesh)
        result["float32_full"] = max_difference(output, dense)
        output = sequence_parallel_attention(
            query, key, value, mesh=explicit_mesh, causal=True
        )
        result["float32_causal_explicit_mesh"] = max_difference(output, causal)

        as_bfloat16 = [x.astype(jnp.bfloat16) for x in (query, key, value)]
        rounded = [x.astype(jnp.float32) for x in as_bfloat16]
        reference, _ = scaled_dot_product_attention(*rounded, causal_mask(seq_len))
        output = sequence_parallel_attention(*as_bfloat16, mesh=auto_mesh, causal=True)
        result["bfloat16_causal"] = max_difference(output, reference)
        result["bfloat16_dtype"] = str(output.dtype)

    if num_devices > 1:
        try:
            sequence_parallel_attention(query[..., :-1, :], key, value, mesh=auto_mesh)
        except ValueError as error:
            result["indivisible_error"] = str(error)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
