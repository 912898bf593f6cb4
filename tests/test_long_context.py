"""Chunked, sliding-window and sequence-parallel attention against dense attention.

The reference is book_utils.attention.scaled_dot_product_attention with the
matching mask. Tolerances: 1e-5 absolute in float32. bfloat16 inputs are
compared with float32 dense attention on the same rounded inputs at 1e-2
absolute, which covers rounding the output to bfloat16 (a relative step of
2**-8, so under 4e-3 for outputs below 1 in magnitude).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from book_utils.attention import (
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from book_utils.long_context import (
    chunked_attention,
    sequence_parallel_attention,
    sliding_window_attention,
    sliding_window_mask,
)

FLOAT32_TOLERANCE = 1e-5
BFLOAT16_TOLERANCE = 1e-2
CHECK_SCRIPT = Path(__file__).with_name("_sequence_parallel_check.py")


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def random_qkv(shape_q, shape_k, value_size=None, seed=0):
    """Return normal query, key and value; value has key's shape by default.

    NumPy draws them: jax.random would compile a new program per shape.
    """
    generator = np.random.default_rng(seed)
    shape_v = (*shape_k[:-1], value_size or shape_k[-1])
    return tuple(
        jnp.asarray(generator.standard_normal(shape), dtype=jnp.float32)
        for shape in (shape_q, shape_k, shape_v)
    )


@jax.jit
def dense(query, key, value, mask=None):
    output, _ = scaled_dot_product_attention(query, key, value, mask)
    return output


def assert_close(actual, expected, tolerance=FLOAT32_TOLERANCE):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32),
        np.asarray(expected, np.float32),
        rtol=0,
        atol=tolerance,
    )


def single_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("sequence",))


def integer_qkv(seq_len, head_dim=64, seed=0):
    """Return inputs whose scores are exact in float32: query . key / 8.

    Entries are small integers and 1 / sqrt(64) = 1/8 is a power of two, so
    every score is a multiple of 1/8 that float32 holds exactly, whatever
    the order of the sums. Query column 0 is -80000 and key column 0 is 1,
    so all scores lie near -1e4 and differ from each other by a few units.
    """
    generator = np.random.default_rng(seed)
    query = generator.integers(-1, 2, (seq_len, head_dim)).astype(np.float32)
    key = generator.integers(-1, 2, (seq_len, head_dim)).astype(np.float32)
    value = generator.normal(size=(seq_len, 8)).astype(np.float32)
    query[:, 0] = -80000.0
    key[:, 0] = 1.0
    return jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)


# chunked_attention


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 100])
def test_chunked_matches_dense(chunk_size):
    query, key, value = random_qkv((2, 3, 20, 16), (2, 3, 64, 16), value_size=8)
    output = chunked_attention(query, key, value, chunk_size=chunk_size)
    assert_close(output, dense(query, key, value))


@pytest.mark.parametrize("chunk_size", [5, 16])
def test_chunked_causal_mask(chunk_size):
    query, key, value = random_qkv((2, 37, 16), (2, 37, 16))
    expected = dense(query, key, value, causal_mask(37))
    output = chunked_attention(
        query, key, value, causal_mask(37), chunk_size=chunk_size
    )
    assert_close(output, expected)


def test_chunked_causal_flag():
    query, key, value = random_qkv((2, 37, 16), (2, 37, 16))
    expected = dense(query, key, value, causal_mask(37))
    output = chunked_attention(query, key, value, chunk_size=8, causal=True)
    assert_close(output, expected)


def test_chunked_causal_flag_and_mask():
    query, key, value = random_qkv((2, 12, 8), (2, 12, 8))
    lengths = jnp.array([[1] * 12, [1] * 5 + [0] * 7])
    mask = padding_mask(lengths)[:, 0]
    expected = dense(query, key, value, mask & causal_mask(12))
    output = chunked_attention(query, key, value, mask, chunk_size=5, causal=True)
    assert_close(output, expected)


def test_chunked_padding_mask():
    query, key, value = random_qkv((2, 4, 19, 8), (2, 4, 19, 8))
    attention_mask = jnp.array([[1] * 19, [1] * 11 + [0] * 8])
    mask = padding_mask(attention_mask)
    output = chunked_attention(query, key, value, mask, chunk_size=4)
    assert_close(output, dense(query, key, value, mask))


def test_chunked_arbitrary_mask():
    query, key, value = random_qkv((3, 15, 8), (3, 33, 8))
    mask = jnp.asarray(np.random.default_rng(1).random((3, 15, 33)) < 0.3)
    mask = mask.at[0, 4].set(False)
    output = chunked_attention(query, key, value, mask, chunk_size=8)
    assert_close(output, dense(query, key, value, mask))


def test_chunked_query_without_keys_is_zero():
    query, key, value = random_qkv((6, 8), (10, 8))
    mask = jnp.ones((6, 10), bool).at[2].set(False)
    output = chunked_attention(query, key, value, mask, chunk_size=4)
    assert np.all(np.asarray(output[2]) == 0)
    assert np.all(np.isfinite(np.asarray(output)))
    assert_close(output, dense(query, key, value, mask))


def test_chunked_query_only_mask():
    # A (T, 1) mask broadcasts over the keys: rows 1 and 4 see no key at all.
    query, key, value = random_qkv((6, 8), (11, 8))
    mask = jnp.array([True, False, True, True, False, True])[:, None]
    output = chunked_attention(query, key, value, mask, chunk_size=4)
    assert np.all(np.asarray(output[jnp.array([1, 4])]) == 0)
    assert_close(output, dense(query, key, value, mask))


def test_chunked_gradient_finite_for_masked_row():
    query, key, value = random_qkv((6, 8), (10, 8))
    mask = jnp.ones((6, 10), bool).at[2].set(False)

    def loss(query, key, value):
        return chunked_attention(query, key, value, mask, chunk_size=4).sum()

    gradients = jax.grad(loss, argnums=(0, 1, 2))(query, key, value)
    expected = jax.grad(lambda q, k, v: dense(q, k, v, mask).sum(), argnums=(0, 1, 2))(
        query, key, value
    )
    for gradient, reference in zip(gradients, expected, strict=True):
        assert np.all(np.isfinite(np.asarray(gradient)))
        assert_close(gradient, reference, 1e-4)


def test_chunked_very_negative_scores():
    query, key, value = integer_qkv(40)
    scores = (query @ key.T) / 8
    assert float(scores.max()) < -9000
    output = chunked_attention(query, key, value, chunk_size=8)
    assert np.all(np.isfinite(np.asarray(output)))
    assert float(jnp.abs(output).min()) > 0
    assert_close(output, dense(query, key, value))


def test_chunked_first_chunks_masked():
    # Keys 0..23 would score about +1e4, but the mask hides them; the allowed
    # keys 24..39 score about -1e4. A running maximum taken over masked keys,
    # or lost in the all-masked chunks, would turn the output into 0 or NaN.
    query, key, value = integer_qkv(40)
    key = key.at[:24, 0].set(-1.0)
    mask = jnp.zeros((40, 40), bool).at[:, 24:].set(True)
    output = chunked_attention(query, key, value, mask, chunk_size=8)
    assert np.all(np.isfinite(np.asarray(output)))
    assert float(jnp.abs(output).min()) > 0
    assert_close(output, dense(query, key, value, mask))


def test_chunked_rising_maximum():
    # Scores rise by about 40 from the first chunk to the last, so every
    # chunk raises the running maximum and the earlier sums must be rescaled.
    query, key, value = random_qkv((5, 16), (64, 16))
    query = query.at[:, 0].set(8.0)
    key = key.at[:, 0].set(jnp.linspace(0.0, 40.0, 64))
    output = chunked_attention(query, key, value, chunk_size=8)
    assert_close(output, dense(query, key, value))


def test_chunked_broadcast_batch():
    # Heads share one key and value (B, 1, S, d); the query has 4 heads.
    query, key, value = random_qkv((2, 4, 9, 8), (2, 1, 21, 8), value_size=6)
    output = chunked_attention(query, key, value, chunk_size=5)
    assert output.shape == (2, 4, 9, 6)
    assert_close(output, dense(query, key, value))


def test_chunked_unroll_matches():
    query, key, value = random_qkv((9, 8), (30, 8))
    rolled = chunked_attention(query, key, value, chunk_size=8)
    unrolled = chunked_attention(query, key, value, chunk_size=8, unroll=True)
    assert_close(unrolled, rolled)


def test_chunked_jit():
    query, key, value = random_qkv((2, 33, 8), (2, 33, 8))
    mask = causal_mask(33)
    compiled = jax.jit(partial(chunked_attention, chunk_size=8))
    assert_close(compiled(query, key, value, mask), dense(query, key, value, mask))


def test_chunked_bfloat16():
    query, key, value = random_qkv((2, 40, 16), (2, 40, 16))
    inputs = [x.astype(jnp.bfloat16) for x in (query, key, value)]
    rounded = [x.astype(jnp.float32) for x in inputs]
    output = chunked_attention(*inputs, causal_mask(40), chunk_size=16)
    assert output.dtype == jnp.bfloat16
    assert_close(output, dense(*rounded, causal_mask(40)), BFLOAT16_TOLERANCE)


def test_chunked_memory_below_quadratic():
    # Compiled, not run: the largest temporary is one (T, chunk) block.
    seq_len, chunk_size = 8192, 256
    spec = jax.ShapeDtypeStruct((seq_len, 64), jnp.float32)
    function = partial(chunked_attention, chunk_size=chunk_size, causal=True)
    memory = jax.jit(function).lower(spec, spec, spec).compile().memory_analysis()
    assert memory.temp_size_in_bytes < seq_len * seq_len


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_chunked_rejects_chunk_size(chunk_size):
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(ValueError, match=f"chunk_size.*{chunk_size}"):
        chunked_attention(query, key, value, chunk_size=chunk_size)


def test_chunked_rejects_float_chunk_size():
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(TypeError, match="chunk_size"):
        chunked_attention(query, key, value, chunk_size=2.5)


def test_chunked_rejects_mask_shape():
    query, key, value = random_qkv((4, 8), (6, 8))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 6\)"):
        chunked_attention(query, key, value, jnp.ones((4, 4), bool), chunk_size=2)


def test_chunked_rejects_integer_mask():
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(TypeError, match="boolean"):
        chunked_attention(query, key, value, jnp.ones((4, 4)), chunk_size=2)


def test_chunked_rejects_head_size():
    query, _, value = random_qkv((4, 8), (4, 8))
    key = jnp.zeros((4, 6))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 6\)"):
        chunked_attention(query, key, value, chunk_size=2)


# sliding_window_mask and sliding_window_attention


@pytest.mark.parametrize("window", [1, 3, 8, 20])
def test_window_mask_key_counts(window):
    seq_len = 12
    counts = np.asarray(sliding_window_mask(seq_len, window).sum(axis=-1))
    expected = np.minimum(np.arange(seq_len) + 1, window)
    np.testing.assert_array_equal(counts, expected)


def test_window_mask_band():
    mask = np.asarray(sliding_window_mask(6, 3))
    expected = np.array(
        [[i - 3 < j <= i for j in range(6)] for i in range(6)], dtype=bool
    )
    np.testing.assert_array_equal(mask, expected)


def test_window_mask_wide_is_causal():
    np.testing.assert_array_equal(sliding_window_mask(7, 50), causal_mask(7))


@pytest.mark.parametrize(
    ("seq_len", "window"), [(32, 1), (32, 4), (37, 8), (30, 30), (9, 50), (100, 7)]
)
def test_window_matches_dense(seq_len, window):
    query, key, value = random_qkv((2, 3, seq_len, 8), (2, 3, seq_len, 8))
    mask = sliding_window_mask(seq_len, window)
    output = sliding_window_attention(query, key, value, window=window)
    assert_close(output, dense(query, key, value, mask))


def test_window_keys_seen():
    # A zero query weighs its allowed keys equally, and value = identity
    # makes output[i, j] the weight of key j: 1 / count on the band, else 0.
    seq_len, window = 23, 5
    query = jnp.zeros((seq_len, 4))
    key = jnp.asarray(np.random.default_rng(0).standard_normal((seq_len, 4)))
    value = jnp.eye(seq_len)
    weights = np.asarray(sliding_window_attention(query, key, value, window=window))
    seen = weights > 0
    counts = seen.sum(axis=-1)
    np.testing.assert_array_equal(counts, np.minimum(np.arange(seq_len) + 1, window))
    np.testing.assert_array_equal(seen, np.asarray(sliding_window_mask(seq_len, 5)))
    np.testing.assert_allclose(weights.max(axis=-1), 1 / counts, rtol=1e-6)


def test_window_broadcast_batch():
    query, key, value = random_qkv((2, 4, 19, 8), (2, 1, 19, 8), value_size=6)
    output = sliding_window_attention(query, key, value, window=4)
    assert output.shape == (2, 4, 19, 6)
    assert_close(output, dense(query, key, value, sliding_window_mask(19, 4)))


def test_window_jit():
    query, key, value = random_qkv((45, 8), (45, 8))
    compiled = jax.jit(partial(sliding_window_attention, window=6))
    expected = dense(query, key, value, sliding_window_mask(45, 6))
    assert_close(compiled(query, key, value), expected)


def test_window_bfloat16():
    query, key, value = random_qkv((2, 50, 16), (2, 50, 16))
    inputs = [x.astype(jnp.bfloat16) for x in (query, key, value)]
    rounded = [x.astype(jnp.float32) for x in inputs]
    output = sliding_window_attention(*inputs, window=9)
    assert output.dtype == jnp.bfloat16
    expected = dense(*rounded, sliding_window_mask(50, 9))
    assert_close(output, expected, BFLOAT16_TOLERANCE)


def test_window_memory_linear():
    # Compiled, not run: no (T, T) array, not even a one-byte mask.
    seq_len, window = 16384, 64
    spec = jax.ShapeDtypeStruct((seq_len, 64), jnp.float32)
    function = partial(sliding_window_attention, window=window)
    memory = jax.jit(function).lower(spec, spec, spec).compile().memory_analysis()
    assert memory.temp_size_in_bytes < seq_len * seq_len // 8


def test_window_rejects_cross_attention():
    query, key, value = random_qkv((4, 8), (6, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(6, 8\)"):
        sliding_window_attention(query, key, value, window=2)


@pytest.mark.parametrize("window", [0, -1])
def test_window_rejects_window(window):
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(ValueError, match=f"window.*{window}"):
        sliding_window_attention(query, key, value, window=window)


def test_window_mask_rejects_length():
    with pytest.raises(ValueError, match="seq_len.*0"):
        sliding_window_mask(0, 3)


# sequence_parallel_attention


@pytest.mark.parametrize("causal", [False, True])
def test_parallel_one_device(causal):
    query, key, value = random_qkv((2, 3, 24, 8), (2, 3, 24, 8))
    mask = causal_mask(24) if causal else None
    output = sequence_parallel_attention(
        query, key, value, mesh=single_device_mesh(), causal=causal
    )
    assert_close(output, dense(query, key, value, mask))


def test_parallel_one_device_bfloat16():
    query, key, value = random_qkv((24, 8), (24, 8))
    inputs = [x.astype(jnp.bfloat16) for x in (query, key, value)]
    rounded = [x.astype(jnp.float32) for x in inputs]
    output = sequence_parallel_attention(
        *inputs, mesh=single_device_mesh(), causal=True
    )
    assert output.dtype == jnp.bfloat16
    assert_close(output, dense(*rounded, causal_mask(24)), BFLOAT16_TOLERANCE)


def test_parallel_jit():
    query, key, value = random_qkv((16, 8), (16, 8))
    compiled = jax.jit(
        partial(sequence_parallel_attention, mesh=single_device_mesh(), causal=True)
    )
    assert_close(compiled(query, key, value), dense(query, key, value, causal_mask(16)))


def test_parallel_rejects_two_axis_mesh():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "sequence"))
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(ValueError, match="one axis.*data.*sequence"):
        sequence_parallel_attention(query, key, value, mesh=mesh)


def test_parallel_rejects_non_mesh():
    query, key, value = random_qkv((4, 8), (4, 8))
    with pytest.raises(TypeError, match="Mesh"):
        sequence_parallel_attention(query, key, value, mesh=jax.devices())


@pytest.fixture(scope="module")
def eight_device_result():
    """Run the check script with 8 simulated CPU devices in a subprocess."""
    environment = dict(os.environ)
    flags = environment.get("XLA_FLAGS", "")
    environment["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count=8".strip()
    )
    completed = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_parallel_device_count(eight_device_result):
    if eight_device_result["backend"] != "cpu":
        pytest.skip("the simulated devices exist only on the CPU backend")
    assert eight_device_result["num_devices"] == 8


@pytest.mark.parametrize("case", ["float32_full", "float32_causal_explicit_mesh"])
def test_parallel_float32_devices(eight_device_result, case):
    assert eight_device_result[case] < FLOAT32_TOLERANCE


def test_parallel_bfloat16_devices(eight_device_result):
    assert eight_device_result["bfloat16_dtype"] == "bfloat16"
    assert eight_device_result["bfloat16_causal"] < BFLOAT16_TOLERANCE


def test_parallel_rejects_indivisible_length(eight_device_result):
    if eight_device_result["num_devices"] == 1:
        pytest.skip("every length divides one device")
    num_devices = eight_device_result["num_devices"]
    message = eight_device_result["indivisible_error"]
    assert f"(2, 3, {8 * num_devices - 1}, 16)" in message
    assert f"{num_devices} devices" in message
