"""Scaled dot-product and multi-head attention, written from scratch.

Shape letters used in this module and across the book:

- ``B``: batch size, ``N``: number of heads,
- ``T``: query length, ``S``: key and value length,
- ``D``: model width (``d_model``), ``d_k``: query and key size per head,
  ``d_v``: value size per head.

Masks are boolean and True means "may attend". A query row whose keys are
all masked gets all-zero weights and an all-zero output (see
:func:`scaled_dot_product_attention`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MultiHeadAttention",
    "causal_mask",
    "merge_heads",
    "padding_mask",
    "scaled_dot_product_attention",
    "split_heads",
]


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def _check_qkv(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[int, ...]:
    """Validate the three inputs and return the broadcast batch shape."""
    for name, array in (("query", query), ("key", key), ("value", value)):
        if array.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., length, size), "
                f"got shape {array.shape}"
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(
                f"{name} must be a floating-point array, got dtype {array.dtype}"
            )
        if 0 in array.shape[-2:]:
            raise ValueError(
                f"{name} must have a non-empty length and size, got shape {array.shape}"
            )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "query and key must have the same last dimension d_k, got query "
            f"{query.shape} and key {key.shape}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            "key and value must have the same length S (axis -2), got key "
            f"{key.shape} and value {value.shape}"
        )
    batch_shape = _broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    if batch_shape is None:
        raise ValueError(
            "the leading (batch and head) dimensions of query, key and value do "
            f"not broadcast: query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    return batch_shape


def _check_mask(
    mask: jax.Array,
    scores_shape: tuple[int, ...],
    given_shape: tuple[int, ...] | None = None,
) -> None:
    """Raise unless ``mask`` is boolean and broadcasts to ``scores_shape``.

    ``given_shape`` is the shape the caller passed, named in the error in place
    of ``mask.shape`` when the mask was reshaped before this check.
    """
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True means 'may attend'), got dtype {mask.dtype}"
        )
    if _broadcast_shapes(mask.shape, scores_shape) != scores_shape:
        shape = mask.shape if given_shape is None else given_shape
        raise ValueError(
            f"mask of shape {shape} does not broadcast to the attention "
            f"scores' shape {scores_shape} (..., T, S)"
        )


def scaled_dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Compute softmax(Q K^T / sqrt(d_k)) V and return it with the weights.

    .. math::
        \mathrm{Attention}(Q, K, V) =
        \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V

    Leading dimensions (batch, heads) broadcast by NumPy's rules. The scores
    and the softmax are computed in float32 at least, so bfloat16 inputs do
    not lose the softmax's small weights. The weights and output take the
    dtype of ``value``.

    A query row with no allowed key gets all-zero weights and an all-zero
    output, with finite (zero) gradients, and leaves the other rows as they
    are. ``jax.nn.dot_product_attention`` differs: for such a row it returns
    the mean of the value rows, because every masked score gets the same
    large negative value and the softmax turns them into uniform weights.

    Args:
        query: ``(..., T, d_k)``.
        key: ``(..., S, d_k)``.
        value: ``(..., S, d_v)``.
        mask: optional boolean array broadcastable to ``(..., T, S)``;
            True means the query may attend to that key.

    Returns:
        ``(output, weights)`` with output ``(..., T, d_v)`` and weights
        ``(..., T, S)``, each of whose rows sums to one (or is all zero for a
        fully masked row).

    Raises:
        ValueError: if the sizes do not match or the mask does not broadcast.
        TypeError: if an input is not floating point or the mask is not boolean.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    batch_shape = _check_qkv(query, key, value)
    scores_shape = (*batch_shape, query.shape[-2], key.shape[-2])
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_mask(mask, scores_shape)

    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    scale = 1.0 / math.sqrt(query.shape[-1])
    # (..., T, S)
    scores = jnp.einsum(
        "...td,...sd->...ts", query.astype(compute_dtype), key.astype(compute_dtype)
    )
    scores = scores * scale

    if mask is None:
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        # A finite fill keeps the softmax and its gradient free of NaN even
        # when a whole row is masked. The last line sets every masked weight,
        # and so every weight of such a row, to zero.
        fill = jnp.finfo(compute_dtype).min
        scores = jnp.where(mask, scores, fill)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = jnp.where(mask, weights, 0.0)

    weights = weights.astype(value.dtype)
    # (..., T, d_v)
    output = jnp.einsum("...ts,...sd->...td", weights, value)
    return output, weights


def causal_mask(seq_len: int) -> jax.Array:
    """Build the ``(T, T)`` mask that lets position i attend to positions <= i.

    Raises:
        ValueError: if ``seq_len`` is not a positive integer.
    """
    if (
        isinstance(seq_len, bool)
        or not isinstance(seq_len, int | np.integer)
        or seq_len < 1
    ):
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """Turn a ``(B, S)`` 0/1 attention mask into a ``(B, 1, 1, S)`` key mask.

    The result broadcasts against scores of shape ``(B, N, T, S)``: every head
    and every query may attend to the keys whose ``attention_mask`` is 1.

    Raises:
        ValueError: if ``attention_mask`` is not 2-D or contains values other
            than 0 and 1 (checked only on concrete arrays, not under jit).
    """
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must have shape (B, S), got shape {attention_mask.shape}"
        )
    if not isinstance(attention_mask, jax.core.Tracer):
        values = np.unique(np.asarray(attention_mask))
        if not np.isin(values, [0, 1]).all():
            raise ValueError(
                f"attention_mask must contain only 0 and 1, got values {values}"
            )
    # (B, 1, 1, S)
    return (attention_mask != 0)[:, None, None, :]


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """Reshape ``(..., T, D)`` into ``(..., N, T, D / N)``.

    Raises:
        ValueError: if ``x`` has fewer than 2 dimensions or ``D`` is not
            divisible by ``num_heads``.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, D), got shape {x.shape}")
    if not isinstance(num_heads, int | np.integer) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if x.shape[-1] % num_heads != 0:
        raise ValueError(
            f"the last dimension {x.shape[-1]} of x (shape {x.shape}) is not "
            f"divisible by num_heads={num_heads}"
        )
    *batch, seq_len, d_model = x.shape
    head_dim = d_model // num_heads
    # (..., T, N, head_dim) -> (..., N, T, head_dim)
    x = x.reshape(*batch, seq_len, num_heads, head_dim)
    return jnp.swapaxes(x, -3, -2)


def merge_heads(x: jax.Array) -> jax.Array:
    """Reshape ``(..., N, T, head_dim)`` into ``(..., T, N * head_dim)``.

    The inverse of :func:`split_heads`.

    Raises:
        ValueError: if ``x`` has fewer than 3 dimensions.
    """
    if x.ndim < 3:
        raise ValueError(f"x must have shape (..., N, T, head_dim), got {x.shape}")
    # (..., N, T, head_dim) -> (..., T, N, head_dim)
    x = jnp.swapaxes(x, -3, -2)
    *batch, seq_len, num_heads, head_dim = x.shape
    return x.reshape(*batch, seq_len, num_heads * head_dim)


class MultiHeadAttention(nnx.Module):
    """Multi-head self-attention with learned Q, K, V and output projections.

    Each of the ``num_heads`` heads attends with its own slice of size
    ``head_dim = d_model // num_heads``, and its scores are scaled by
    ``1 / sqrt(head_dim)``. The projections are ``nnx.Linear`` layers whose
    kernels have shape ``(d_model, d_model)`` (in, out).

    Args:
        d_model: model width D.
        num_heads: number of heads N; must divide ``d_model``.
        rngs: random number streams for the initial weights.
        use_bias: whether the four projections have biases.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
    ) -> None:
        if d_model < 1 or num_heads < 1 or d_model % num_heads != 0:
            raise ValueError(
                f"d_model={d_model} must be a positive multiple of "
                f"num_heads={num_heads}"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads

        def linear() -> nnx.Linear:
            return nnx.Linear(d_model, d_model, use_bias=use_bias, rngs=rngs)

        self.query = linear()
        self.key = linear()
        self.value = linear()
        self.output = linear()

    def _head_mask(self, mask: jax.Array, batch: int, q_len: int) -> jax.Array:
        """Bring a (T, S), (B, T, S) or (B, 1, T, S) mask to 4 dimensions."""
        mask = jnp.asarray(mask)
        given_shape = mask.shape
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        elif mask.ndim != 4:
            raise ValueError(
                "mask must have shape (T, S), (B, T, S) or (B, 1, T, S), got "
                f"shape {mask.shape}"
            )
        _check_mask(mask, (batch, self.num_heads, q_len, q_len), given_shape)
        return mask

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        return_weights: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Attend from every position of ``x`` to every allowed position.

        Args:
            x: ``(B, T, D)`` input.
            mask: optional boolean mask of shape ``(T, S)``, ``(B, T, S)`` or
                ``(B, 1, T, S)`` (the same for every head), with S = T;
                True means "may attend". Any shape that broadcasts to
                ``(B, N, T, S)``, such as a ``(B, 1, 1, S)`` padding mask,
                is accepted too.
            return_weights: also return the attention weights.

        Returns:
            The ``(B, T, D)`` output, or ``(output, weights)`` with weights
            ``(B, N, T, S)`` when ``return_weights`` is True.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, {self.d_model}), got shape {x.shape}"
            )
        batch, seq_len, _ = x.shape
        if mask is not None:
            mask = self._head_mask(mask, batch, seq_len)

        # (B, N, T, head_dim) each
        query = split_heads(self.query(x), self.num_heads)
        key = split_heads(self.key(x), self.num_heads)
        value = split_heads(self.value(x), self.num_heads)

        heads, weights = scaled_dot_product_attention(query, key, value, mask)
        # (B, T, D)
        output = self.output(merge_heads(heads))
        if return_weights:
            return output, weights
        return output
