"""Tests for book_utils.attention against jax.nn and flax.nnx references."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from book_utils.attention import (
    MultiHeadAttention,
    causal_mask,
    merge_heads,
    padding_mask,
    scaled_dot_product_attention,
    split_heads,
)

# float32 comparisons run at the highest matmul precision (GPUs and TPUs use
# reduced-precision matmuls by default). On CPU the largest difference measured
# by these tests was 5e-7, so a tolerance of 1e-5 leaves a wide margin.
FLOAT32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# bfloat16 keeps 8 significant bits (machine epsilon 2**-7 = 7.8e-3). The
# inputs, the weights and the output are each rounded to bfloat16, so outputs
# of size about 1 may differ from float32 by a few epsilons.
BFLOAT16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}

# (batch_size, num_heads, seq_len, kv_len, head_dim)
SHAPES = [
    (1, 1, 1, 1, 4),
    (2, 4, 5, 5, 8),
    (3, 2, 7, 4, 16),
    (2, 12, 9, 9, 32),
]
MASK_KINDS = ["none", "causal", "random", "padding"]


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def random_qkv(shape, seed=0, dtype=np.float32, value_dim=None):
    """Draw query (B, N, T, H), key (B, N, S, H) and value (B, N, S, H_v)."""
    batch_size, num_heads, seq_len, kv_len, head_dim = shape
    value_dim = head_dim if value_dim is None else value_dim
    return (
        random_array((batch_size, num_heads, seq_len, head_dim), seed, dtype),
        random_array((batch_size, num_heads, kv_len, head_dim), seed + 1, dtype),
        random_array((batch_size, num_heads, kv_len, value_dim), seed + 2, dtype),
    )


def random_array(shape, seed=0, dtype=np.float32):
    """Draw a NumPy array of standard normal values.

    The tests index and compare NumPy arrays because every eager JAX operation
    on a new shape compiles, which would cost most of this file's run time.
    """
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return values.astype(dtype)


def make_mask(kind, batch_size, seq_len, kv_len, seed=0):
    """Build a (B, 1, T, S) mask of one kind in which every row allows a key."""
    if kind == "none":
        return None
    if kind == "causal":
        # Query i may attend to keys 0..i (keys past the last query stay open).
        rows = np.arange(seq_len)[:, None] + max(kv_len - seq_len, 0)
        mask = np.arange(kv_len)[None, :] <= rows
        return np.broadcast_to(mask, (batch_size, 1, seq_len, kv_len))
    rng = np.random.default_rng(seed)
    if kind == "random":
        mask = rng.random((batch_size, 1, seq_len, kv_len)) < 0.6
        mask[..., 0] = True
        return mask
    if kind == "padding":
        lengths = rng.integers(1, kv_len + 1, size=batch_size)
        attention_mask = (np.arange(kv_len)[None, :] < lengths[:, None]).astype(int)
        mask = np.asarray(padding_mask(attention_mask))
        return np.broadcast_to(mask, (batch_size, 1, seq_len, kv_len))
    raise ValueError(f"unknown mask kind {kind!r}")


# Most tests call jitted functions: one compilation per shape costs far less
# CPU time than eager mode, which compiles every operation on its own.
# test_sdpa_jit_matches_eager checks that jitted and eager results agree.
jitted_attention = jax.jit(scaled_dot_product_attention)


def attention(query, key, value, mask=None):
    """Run scaled_dot_product_attention jitted and return NumPy arrays."""
    output, weights = jitted_attention(query, key, value, mask)
    return np.asarray(output), np.asarray(weights)


@jax.jit
def jax_reference(query, key, value, mask=None):
    """Call jax.nn.dot_product_attention, which takes (B, T, N, H) arrays."""
    output = jax.nn.dot_product_attention(
        jnp.swapaxes(query, 1, 2),
        jnp.swapaxes(key, 1, 2),
        jnp.swapaxes(value, 1, 2),
        mask=mask,
    )
    # (B, T, N, H) -> (B, N, T, H)
    return jnp.swapaxes(output, 1, 2)


def softmax(scores):
    """Normalise the last axis of a NumPy array with a float64 softmax."""
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def numpy_reference(query, key, value, mask=None):
    """Compute masked softmax(Q K^T / sqrt(d_k)) V in float64 NumPy."""
    query, key, value = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    scores = query @ np.swapaxes(key, -1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    weights = softmax(scores)
    return weights @ value, weights


def flax_copy(module: MultiHeadAttention) -> nnx.MultiHeadAttention:
    """Build flax.nnx.MultiHeadAttention holding the weights of ``module``."""
    d_model, num_heads, head_dim = module.d_model, module.num_heads, module.head_dim
    reference = nnx.MultiHeadAttention(
        num_heads=num_heads,
        in_features=d_model,
        decode=False,
        precision="highest",
        kernel_init=nnx.initializers.zeros_init(),
        rngs=nnx.Rngs(0),
    )
    for name in ("query", "key", "value"):
        ours, theirs = getattr(module, name), getattr(reference, name)
        # (D, D) -> (D, N, head_dim), the columns of head n being n*head_dim...
        theirs.kernel[...] = ours.kernel[...].reshape(d_model, num_heads, head_dim)
        theirs.bias[...] = ours.bias[...].reshape(num_heads, head_dim)
    # (D, D) -> (N, head_dim, D): merge_heads puts head n in rows n*head_dim...
    reference.out.kernel[...] = module.output.kernel[...].reshape(
        num_heads, head_dim, d_model
    )
    reference.out.bias[...] = module.output.bias[...]
    return reference


def randomize_biases(module: MultiHeadAttention, seed: int) -> None:
    """Give every projection a nonzero bias (nnx.Linear starts them at zero)."""
    for offset, name in enumerate(("query", "key", "value", "output")):
        bias = getattr(module, name).bias
        bias[...] = random_array(bias.shape, seed=seed + offset)


# scaled_dot_product_attention against references


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sdpa_matches_jax_nn(shape, mask_kind):
    query, key, value = random_qkv(shape)
    mask = make_mask(mask_kind, shape[0], shape[2], shape[3])
    output, _ = attention(query, key, value, mask)
    expected = jax_reference(query, key, value, mask)
    np.testing.assert_allclose(output, expected, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sdpa_matches_numpy_float64(shape, mask_kind):
    # d_v differs from d_k here, which jax.nn.dot_product_attention rejects.
    query, key, value = random_qkv(shape, seed=1, value_dim=shape[-1] + 3)
    mask = make_mask(mask_kind, shape[0], shape[2], shape[3], seed=1)
    output, weights = attention(query, key, value, mask)
    expected_output, expected_weights = numpy_reference(query, key, value, mask)
    np.testing.assert_allclose(output, expected_output, **FLOAT32_TOLERANCE)
    np.testing.assert_allclose(weights, expected_weights, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_sdpa_bfloat16_close_to_float32(shape):
    query, key, value = random_qkv(shape, dtype=jnp.bfloat16)
    mask = make_mask("causal", shape[0], shape[2], shape[3])
    output, weights = attention(query, key, value, mask)
    assert output.dtype == jnp.bfloat16
    assert weights.dtype == jnp.bfloat16
    # Reference: float32 attention on the same bfloat16-rounded inputs.
    as_float32 = [a.astype(jnp.float32) for a in (query, key, value)]
    expected, _ = attention(*as_float32, mask)
    np.testing.assert_allclose(
        output.astype(jnp.float32), expected, **BFLOAT16_TOLERANCE
    )


@pytest.mark.parametrize("shape", SHAPES[2:], ids=str)
def test_sdpa_bfloat16_matches_jax_nn(shape):
    query, key, value = random_qkv(shape, seed=2, dtype=jnp.bfloat16)
    output, _ = attention(query, key, value)
    expected = jax_reference(query, key, value)
    np.testing.assert_allclose(
        output.astype(jnp.float32),
        expected.astype(jnp.float32),
        **BFLOAT16_TOLERANCE,
    )


def test_sdpa_unbatched_inputs():
    query, key, value = random_qkv((1, 1, 3, 6, 4))
    output, weights = attention(query[0, 0], key[0, 0], value[0, 0])
    expected_output, expected_weights = numpy_reference(
        query[0, 0], key[0, 0], value[0, 0]
    )
    assert output.shape == (3, 4)
    assert weights.shape == (3, 6)
    np.testing.assert_allclose(output, expected_output, **FLOAT32_TOLERANCE)
    np.testing.assert_allclose(weights, expected_weights, **FLOAT32_TOLERANCE)


# Properties of the weights


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_weight_rows_sum_to_one(mask_kind):
    query, key, value = random_qkv((2, 3, 6, 8, 5), seed=3)
    mask = make_mask(mask_kind, 2, 6, 8, seed=3)
    _, weights = attention(query, key, value, mask)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6, atol=1e-6)
    assert (weights >= 0).all()


def test_scores_scaled_by_sqrt_dk():
    query, key, value = random_qkv((1, 1, 4, 4, 16), seed=4)
    _, weights = attention(query, key, value)
    # d_k = 16, so the scores are divided by sqrt(16) = 4.
    scores = query.astype(np.float64) @ np.swapaxes(key, -1, -2)
    np.testing.assert_allclose(weights, softmax(scores / 4.0), **FLOAT32_TOLERANCE)
    assert not np.allclose(weights, softmax(scores), atol=1e-3)


def test_causal_mask_blocks_future():
    seq_len = 7
    query, key, value = random_qkv((2, 3, seq_len, seq_len, 8), seed=5)
    _, weights = attention(query, key, value, causal_mask(seq_len))
    future = np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1)
    assert (weights[..., future] == 0).all()
    assert (weights[..., ~future] > 0).all()


def test_causal_output_ignores_future_tokens():
    seq_len, position = 6, 3
    query, key, value = random_qkv((1, 2, seq_len, seq_len, 8), seed=6)
    mask = causal_mask(seq_len)
    output, _ = attention(query, key, value, mask)
    # Change every key and value after `position`.
    key[..., position + 1 :, :] += 10.0
    value[..., position + 1 :, :] += 10.0
    changed, _ = attention(query, key, value, mask)
    np.testing.assert_array_equal(
        changed[..., : position + 1, :], output[..., : position + 1, :]
    )
    assert not np.allclose(
        changed[..., position + 1 :, :], output[..., position + 1 :, :]
    )


def test_sdpa_key_permutation_invariant():
    query, key, value = random_qkv((2, 2, 5, 6, 4), seed=7)
    permutation = np.array([3, 0, 5, 1, 4, 2])
    output, _ = attention(query, key, value)
    permuted, _ = attention(query, key[..., permutation, :], value[..., permutation, :])
    np.testing.assert_allclose(permuted, output, **FLOAT32_TOLERANCE)


# Fully masked query rows


def one_masked_row(seq_len, kv_len, row):
    """Build a (T, S) mask that allows every key except in query row ``row``."""
    mask = np.ones((seq_len, kv_len), dtype=bool)
    mask[row] = False
    return mask


def test_masked_row_gives_zeros():
    query, key, value = random_qkv((2, 3, 4, 5, 8), seed=8)
    output, weights = attention(query, key, value, one_masked_row(4, 5, row=1))
    assert np.isfinite(output).all()
    assert (output[..., 1, :] == 0).all()
    assert (weights[..., 1, :] == 0).all()


def test_masked_row_leaves_others_unchanged():
    query, key, value = random_qkv((2, 3, 4, 5, 8), seed=8)
    unmasked, unmasked_weights = attention(query, key, value)
    output, weights = attention(query, key, value, one_masked_row(4, 5, row=1))
    others = np.array([0, 2, 3])
    np.testing.assert_allclose(
        output[..., others, :], unmasked[..., others, :], **FLOAT32_TOLERANCE
    )
    np.testing.assert_allclose(
        weights[..., others, :], unmasked_weights[..., others, :], **FLOAT32_TOLERANCE
    )


@pytest.mark.parametrize("argument", [0, 1, 2])
def test_masked_row_gradients_finite(argument):
    inputs = list(random_qkv((2, 3, 4, 5, 8), seed=9))
    mask = one_masked_row(4, 5, row=2)

    def loss(array):
        arguments = inputs.copy()
        arguments[argument] = array
        output, _ = scaled_dot_product_attention(*arguments, mask)
        return (output**2).sum()

    gradient = jax.jit(jax.grad(loss))(inputs[argument])
    assert np.isfinite(gradient).all()


def test_masked_row_query_gradient_zero():
    query, key, value = random_qkv((2, 3, 4, 5, 8), seed=9)
    mask = one_masked_row(4, 5, row=2)

    def loss(query):
        return scaled_dot_product_attention(query, key, value, mask)[0].sum()

    gradient = np.asarray(jax.jit(jax.grad(loss))(query))
    assert (gradient[..., 2, :] == 0).all()
    assert (gradient[..., 0, :] != 0).any()


def test_masked_row_differs_from_jax_nn():
    # jax.nn.dot_product_attention gives a fully masked row uniform weights,
    # so that row's output is the mean of the value rows. Ours is zero.
    query, key, value = random_qkv((2, 3, 4, 5, 8), seed=10)
    mask = one_masked_row(4, 5, row=0)
    output, _ = attention(query, key, value, mask)
    reference = np.asarray(jax_reference(query, key, value, mask))
    np.testing.assert_allclose(
        reference[..., 0, :], value.mean(axis=-2), **FLOAT32_TOLERANCE
    )
    assert (output[..., 0, :] == 0).all()
    np.testing.assert_allclose(
        output[..., 1:, :], reference[..., 1:, :], **FLOAT32_TOLERANCE
    )


def test_all_rows_masked():
    query, key, value = random_qkv((1, 2, 3, 4, 8), seed=11)
    mask = np.zeros((3, 4), dtype=bool)
    output, weights = attention(query, key, value, mask)
    assert (output == 0).all()
    assert (weights == 0).all()


# Transformations


def test_sdpa_jit_matches_eager():
    query, key, value = random_qkv((2, 4, 5, 6, 8), seed=12)
    mask = make_mask("random", 2, 5, 6, seed=12).copy()
    mask[..., 3, :] = False
    eager_output, eager_weights = scaled_dot_product_attention(query, key, value, mask)
    jit_output, jit_weights = jax.jit(scaled_dot_product_attention)(
        query, key, value, mask
    )
    np.testing.assert_allclose(jit_output, eager_output, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jit_weights, eager_weights, rtol=1e-6, atol=1e-6)


def test_sdpa_grad_matches_jax_nn():
    query, key, value = random_qkv((2, 2, 5, 5, 8), seed=13)
    mask = make_mask("causal", 2, 5, 5)
    cotangent = random_array(query.shape, seed=14)

    def ours(query, key, value):
        output, _ = scaled_dot_product_attention(query, key, value, mask)
        return (output * cotangent).sum()

    def reference(query, key, value):
        return (jax_reference(query, key, value, mask) * cotangent).sum()

    gradients = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(query, key, value)
    expected = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(query, key, value)
    for gradient, expected_gradient in zip(gradients, expected, strict=True):
        np.testing.assert_allclose(gradient, expected_gradient, **FLOAT32_TOLERANCE)


def test_sdpa_vmap_matches_batched():
    query, key, value = random_qkv((3, 2, 4, 6, 8), seed=15)
    mask = make_mask("random", 3, 4, 6, seed=15)
    batched, batched_weights = attention(query, key, value, mask)
    mapped, mapped_weights = jax.vmap(scaled_dot_product_attention)(
        query, key, value, mask
    )
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mapped_weights, batched_weights, rtol=1e-6, atol=1e-6)


def test_sdpa_vmap_unbatched_mask():
    query, key, value = random_qkv((3, 2, 5, 5, 8), seed=16)
    mask = causal_mask(5)
    batched, _ = attention(query, key, value, mask)
    mapped, _ = jax.vmap(scaled_dot_product_attention, in_axes=(0, 0, 0, None))(
        query, key, value, mask
    )
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)


# Mask broadcasting


@pytest.mark.parametrize(
    "mask_shape", [(5, 6), (1, 5, 6), (2, 1, 5, 6), (1, 3, 5, 6), (2, 3, 5, 6)]
)
def test_sdpa_mask_broadcasts(mask_shape):
    query, key, value = random_qkv((2, 3, 5, 6, 4), seed=17)
    rng = np.random.default_rng(17)
    mask = rng.random(mask_shape) < 0.6
    mask[..., 0] = True
    full_mask = np.broadcast_to(mask, (2, 3, 5, 6))
    output, _ = attention(query, key, value, mask)
    expected, _ = numpy_reference(query, key, value, full_mask)
    np.testing.assert_allclose(output, expected, **FLOAT32_TOLERANCE)


def test_sdpa_padding_mask_matches_truncation():
    query, key, value = random_qkv((2, 3, 4, 5, 8), seed=18)
    attention_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    output, weights = attention(query, key, value, padding_mask(attention_mask))
    # Padding the first sentence's last two keys equals cutting them off.
    truncated, _ = numpy_reference(query[0], key[0, :, :3], value[0, :, :3])
    assert (weights[0, ..., 3:] == 0).all()
    np.testing.assert_allclose(output[0], truncated, **FLOAT32_TOLERANCE)
    np.testing.assert_allclose(
        output[1], numpy_reference(query[1], key[1], value[1])[0], **FLOAT32_TOLERANCE
    )


# split_heads, merge_heads, causal_mask, padding_mask


@pytest.mark.parametrize("shape", [(6, 12), (2, 6, 12), (2, 3, 6, 12)])
def test_split_then_merge_roundtrip(shape):
    x = random_array(shape, seed=19)
    np.testing.assert_array_equal(merge_heads(split_heads(x, 4)), x)


def test_split_heads_layout():
    x = random_array((2, 5, 12), seed=20)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    # Head n contains columns n*head_dim ... (n+1)*head_dim - 1.
    np.testing.assert_array_equal(np.asarray(heads)[:, 1], x[..., 4:8])


def test_merge_then_split_roundtrip():
    x = random_array((2, 3, 5, 4), seed=21)
    np.testing.assert_array_equal(split_heads(merge_heads(x), 3), x)


def test_causal_mask_values():
    np.testing.assert_array_equal(causal_mask(4), np.tril(np.ones((4, 4), dtype=bool)))
    assert causal_mask(4).dtype == jnp.bool_


@pytest.mark.parametrize("seq_len", [0, -2, 2.5, "3"])
def test_causal_mask_rejects_length(seq_len):
    with pytest.raises(ValueError, match=re.escape(repr(seq_len))):
        causal_mask(seq_len)


def test_padding_mask_shape_and_values():
    attention_mask = np.array([[1, 1, 0], [1, 0, 0]])
    mask = padding_mask(attention_mask)
    assert mask.shape == (2, 1, 1, 3)
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask)[:, 0, 0], attention_mask == 1)


def test_padding_mask_accepts_booleans():
    attention_mask = np.array([[True, False]])
    mask = np.asarray(padding_mask(attention_mask))
    np.testing.assert_array_equal(mask[:, 0, 0], attention_mask)


@pytest.mark.parametrize("bad_value", [2, -1, 0.5])
def test_padding_mask_rejects_values(bad_value):
    attention_mask = np.array([[1, 0, bad_value]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        padding_mask(attention_mask)


def test_padding_mask_rejects_1d():
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        padding_mask(np.array([1, 1, 0]))


def test_padding_mask_under_jit():
    attention_mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(
        jax.jit(padding_mask)(attention_mask), padding_mask(attention_mask)
    )


# Invalid inputs


def assert_raises_naming(error, function, *arguments, shapes):
    with pytest.raises(error) as info:
        function(*arguments)
    for shape in shapes:
        assert str(shape) in str(info.value)


def test_sdpa_rejects_query_key_sizes():
    query, key, value = random_qkv((2, 3, 4, 5, 8))
    query = query[..., :6]
    assert_raises_naming(
        ValueError,
        scaled_dot_product_attention,
        query,
        key,
        value,
        shapes=[query.shape, key.shape],
    )


def test_sdpa_rejects_key_value_lengths():
    query, key, value = random_qkv((2, 3, 4, 5, 8))
    value = value[..., :4, :]
    assert_raises_naming(
        ValueError,
        scaled_dot_product_attention,
        query,
        key,
        value,
        shapes=[key.shape, value.shape],
    )


def test_sdpa_rejects_batch_mismatch():
    query, key, value = random_qkv((2, 3, 4, 5, 8))
    query = np.concatenate([query, query[:1]])
    assert_raises_naming(
        ValueError,
        scaled_dot_product_attention,
        query,
        key,
        value,
        shapes=[query.shape, key.shape],
    )


def test_sdpa_rejects_1d_input():
    query, key, value = random_qkv((1, 1, 1, 5, 8))
    assert_raises_naming(
        ValueError,
        scaled_dot_product_attention,
        query[0, 0, 0],
        key,
        value,
        shapes=[(8,)],
    )


@pytest.mark.parametrize(
    "mask_shape", [(5, 4), (2, 4, 5), (2, 2, 4, 5), (1, 2, 3, 4, 5)]
)
def test_sdpa_rejects_mask_shape(mask_shape):
    query, key, value = random_qkv((2, 3, 4, 5, 8))
    mask = np.ones(mask_shape, dtype=bool)
    assert_raises_naming(
        ValueError,
        scaled_dot_product_attention,
        query,
        key,
        value,
        mask,
        shapes=[mask_shape, (2, 3, 4, 5)],
    )


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_sdpa_rejects_nonboolean_mask(dtype):
    query, key, value = random_qkv((2, 3, 4, 5, 8))
    with pytest.raises(TypeError, match="boolean"):
        scaled_dot_product_attention(query, key, value, np.ones((4, 5), dtype))


def test_split_heads_rejects_indivisible():
    x = np.zeros((2, 5, 12))
    assert_raises_naming(ValueError, split_heads, x, 5, shapes=[(2, 5, 12)])


def test_merge_heads_rejects_2d():
    assert_raises_naming(ValueError, merge_heads, np.zeros((5, 4)), shapes=[(5, 4)])


def test_mha_rejects_indivisible_heads():
    with pytest.raises(ValueError) as info:
        MultiHeadAttention(10, 4, rngs=nnx.Rngs(0))
    assert "d_model=10" in str(info.value)
    assert "num_heads=4" in str(info.value)


def test_mha_rejects_input_width():
    module = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    assert_raises_naming(ValueError, module, np.zeros((2, 5, 6)), shapes=[(2, 5, 6)])


@pytest.mark.parametrize("mask_shape", [(5, 4), (3, 4, 4), (2, 3, 4, 4), (4,)])
def test_mha_rejects_mask_shape(mask_shape):
    module = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    x = np.zeros((2, 4, 8))
    mask = np.ones(mask_shape, dtype=bool)
    assert_raises_naming(ValueError, module, x, mask, shapes=[mask_shape])


def test_mha_rejects_nonboolean_mask():
    module = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="boolean"):
        module(np.zeros((2, 4, 8)), np.ones((4, 4), np.int32))


# MultiHeadAttention


@nnx.jit
def apply(module, x, mask=None):
    """Run our MultiHeadAttention jitted and return (output, weights)."""
    return module(x, mask, return_weights=True)


@nnx.jit
def apply_flax(module, x, mask=None):
    """Run flax.nnx.MultiHeadAttention jitted as self-attention."""
    return module(x, mask=mask)


# (batch_size, seq_len, d_model, num_heads)
MHA_SHAPES = [(1, 1, 4, 1), (3, 7, 32, 4), (2, 6, 48, 12)]


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding"])
@pytest.mark.parametrize("shape", MHA_SHAPES, ids=str)
def test_mha_matches_flax(shape, mask_kind):
    batch_size, seq_len, d_model, num_heads = shape
    module = MultiHeadAttention(d_model, num_heads, rngs=nnx.Rngs(22))
    randomize_biases(module, seed=23)
    reference = flax_copy(module)
    x = random_array((batch_size, seq_len, d_model), seed=24)
    mask = make_mask(mask_kind, batch_size, seq_len, seq_len)
    output, _ = apply(module, x, mask)
    np.testing.assert_allclose(
        output, apply_flax(reference, x, mask), **FLOAT32_TOLERANCE
    )


def test_mha_bfloat16_close_to_flax():
    module = MultiHeadAttention(32, 4, rngs=nnx.Rngs(25))
    randomize_biases(module, seed=25)
    reference = flax_copy(module)
    x = random_array((2, 6, 32), seed=26, dtype=jnp.bfloat16)
    mask = causal_mask(6)
    output, _ = apply(module, x, mask)
    np.testing.assert_allclose(
        output.astype(jnp.float32),
        apply_flax(reference, x, mask).astype(jnp.float32),
        **BFLOAT16_TOLERANCE,
    )


def test_mha_without_bias_matches_flax():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(27), use_bias=False)
    reference = nnx.MultiHeadAttention(
        num_heads=4,
        in_features=16,
        use_bias=False,
        decode=False,
        precision="highest",
        kernel_init=nnx.initializers.zeros_init(),
        rngs=nnx.Rngs(0),
    )
    for name in ("query", "key", "value"):
        kernel = getattr(module, name).kernel[...]
        getattr(reference, name).kernel[...] = kernel.reshape(16, 4, 4)
    reference.out.kernel[...] = module.output.kernel[...].reshape(4, 4, 16)
    x = random_array((2, 5, 16), seed=28)
    output, _ = apply(module, x)
    np.testing.assert_allclose(output, apply_flax(reference, x), **FLOAT32_TOLERANCE)


def test_mha_weights_shape():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(29))
    x = random_array((2, 5, 16), seed=30)
    output, weights = apply(module, x)
    assert output.shape == (2, 5, 16)
    assert weights.shape == (2, 4, 5, 5)


def test_mha_scales_by_head_dim():
    d_model, num_heads = 32, 4
    head_dim = d_model // num_heads
    module = MultiHeadAttention(d_model, num_heads, rngs=nnx.Rngs(31))
    x = random_array((2, 5, d_model), seed=32)
    _, weights = apply(module, x)

    def heads(linear):
        kernel, bias = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
        projected = x.astype(np.float64) @ kernel + bias
        # (B, T, D) -> (B, T, N, head_dim) -> (B, N, T, head_dim)
        return projected.reshape(2, 5, num_heads, head_dim).transpose(0, 2, 1, 3)

    # (B, N, T, T)
    scores = heads(module.query) @ np.swapaxes(heads(module.key), -1, -2)
    by_head_dim = softmax(scores / math.sqrt(head_dim))
    by_d_model = softmax(scores / math.sqrt(d_model))
    np.testing.assert_allclose(weights, by_head_dim, **FLOAT32_TOLERANCE)
    assert not np.allclose(weights, by_d_model, atol=1e-3)


@pytest.mark.parametrize("mask_kind", ["causal", "random"])
def test_mha_mask_shapes_agree(mask_kind):
    batch_size, seq_len = 2, 5
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(33))
    x = random_array((batch_size, seq_len, 16), seed=34)
    # One (T, S) pattern, repeated over the batch.
    pattern = make_mask(mask_kind, 1, seq_len, seq_len, seed=34)[0, 0]
    masks = [
        pattern,
        np.broadcast_to(pattern, (batch_size, seq_len, seq_len)),
        np.broadcast_to(pattern, (batch_size, 1, seq_len, seq_len)),
    ]
    expected, expected_weights = module(x, pattern, return_weights=True)
    for mask in masks:
        output, weights = module(x, mask, return_weights=True)
        np.testing.assert_array_equal(output, expected)
        np.testing.assert_array_equal(weights, expected_weights)


def test_mha_3d_mask_applies_to_every_head():
    batch_size, seq_len, num_heads = 2, 4, 4
    module = MultiHeadAttention(16, num_heads, rngs=nnx.Rngs(35))
    x = random_array((batch_size, seq_len, 16), seed=36)
    # A different pattern per sentence.
    mask = make_mask("random", batch_size, seq_len, seq_len, seed=36)[:, 0]
    _, weights = apply(module, x, mask)
    weights = np.asarray(weights)
    blocked = np.broadcast_to(~mask[:, None], weights.shape)
    assert (weights[blocked] == 0).all()
    assert (weights[~blocked] > 0).all()


def test_mha_masked_row_finite_gradients():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(37))
    randomize_biases(module, seed=37)
    x = random_array((2, 4, 16), seed=38)
    mask = one_masked_row(4, 4, row=0)
    output = np.asarray(apply(module, x, mask)[0])
    assert np.isfinite(output).all()
    # A fully masked row's attention output is zero, leaving only the bias.
    np.testing.assert_allclose(
        output[:, 0], np.broadcast_to(module.output.bias[...], (2, 16)), atol=1e-6
    )

    @nnx.jit
    def gradients(module, x):
        def loss(module, x):
            return (module(x, mask) ** 2).sum()

        return nnx.grad(loss, argnums=(0, 1))(module, x)

    parameter_gradients, input_gradient = gradients(module, x)
    for leaf in jax.tree.leaves(parameter_gradients):
        assert np.isfinite(leaf).all()
    assert np.isfinite(input_gradient).all()


def test_mha_jit_matches_eager():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(39))
    x = random_array((2, 5, 16), seed=40)
    mask = causal_mask(5)
    output, weights = apply(module, x, mask)
    eager_output, eager_weights = module(x, mask, return_weights=True)
    np.testing.assert_allclose(output, eager_output, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weights, eager_weights, rtol=1e-6, atol=1e-6)


def test_mha_vmap_over_sentences():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(41))
    x = random_array((3, 5, 16), seed=42)

    def one_sentence(sentence):
        # (T, D) -> (1, T, D) -> (T, D)
        return module(sentence[None])[0]

    output, _ = apply(module, x)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(one_sentence))(x), output, rtol=1e-6, atol=1e-6
    )


def test_mha_permutation_equivariant():
    module = MultiHeadAttention(16, 4, rngs=nnx.Rngs(43))
    randomize_biases(module, seed=44)
    x = random_array((2, 6, 16), seed=45)
    permutation = np.array([4, 2, 0, 5, 1, 3])
    output, _ = apply(module, x)
    permuted, _ = apply(module, x[:, permutation])
    np.testing.assert_allclose(permuted, output[:, permutation], **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_inputs_raise_type_error(dtype):
    query = jnp.ones((2, 3, 4), dtype)
    with pytest.raises(TypeError, match="floating-point"):
        scaled_dot_product_attention(query, query, query)


def test_empty_head_size_raises():
    query = jnp.ones((2, 3, 0))
    with pytest.raises(ValueError, match=r"\(2, 3, 0\)"):
        scaled_dot_product_attention(query, query, query)


def test_lists_accepted_as_arrays():
    rows = [[1.0, 0.0], [0.0, 1.0]]
    output, weights = scaled_dot_product_attention(rows, rows, rows)
    assert output.shape == (2, 2)
    assert weights.shape == (2, 2)


@pytest.mark.parametrize("num_heads", [0, 2.0])
def test_split_heads_rejects_bad_head_count(num_heads):
    with pytest.raises(ValueError, match="num_heads"):
        split_heads(jnp.ones((3, 4)), num_heads)


def test_causal_mask_rejects_bool():
    with pytest.raises(ValueError, match="True"):
        causal_mask(True)
