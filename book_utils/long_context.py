"""Exact attention for long sequences: chunked, sliding-window, sequence-parallel.

Dense attention (:func:`book_utils.attention.scaled_dot_product_attention`)
builds the whole ``(..., T, S)`` score matrix, so its memory grows with the
square of the length. The functions here give the same result while holding
only part of that matrix at a time:

- :func:`chunked_attention` walks over blocks of keys and keeps a running
  maximum and a running sum per query (the "online softmax"), so its memory
  grows linearly with the length. The arithmetic is the same ``O(T S d_k)``.
- :func:`sliding_window_attention` lets each query see itself and the
  ``window - 1`` keys before it and computes, block by block, only the scores
  that window needs: ``O(T w)`` time and memory.
- :func:`sequence_parallel_attention` splits the sequence axis across the
  devices of a one-axis mesh and passes key and value blocks around a ring.

Shape letters follow :mod:`book_utils.attention`: ``T`` is the query length,
``S`` the key and value length, ``d_k`` the query and key size and ``d_v`` the
value size. ``...`` stands for leading batch and head dimensions, which
broadcast. Masks are boolean and
True means "may attend"; a query with no allowed key gets a zero output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from book_utils.attention import _check_mask, _check_qkv

__all__ = [
    "chunked_attention",
    "sequence_parallel_attention",
    "sliding_window_attention",
    "sliding_window_mask",
]

# Queries handled per step of sliding_window_attention's loop. Several small
# blocks share a step, so that a window of a few tokens over a long sequence
# does not turn into a loop of millions of tiny steps.
_SLIDING_QUERIES_PER_STEP = 4096

# Running state of the online softmax, per query row:
# (running_max (..., T), running_sum (..., T), accumulator (..., T, d_v)).
_SoftmaxState = tuple[jax.Array, jax.Array, jax.Array]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _initial_state(
    rows: tuple[int, ...], value_size: int, dtype: jnp.dtype
) -> _SoftmaxState:
    """Start every query row at max -inf, sum 0 and a zero accumulator."""
    return (
        jnp.full(rows, -jnp.inf, dtype),
        jnp.zeros(rows, dtype),
        jnp.zeros((*rows, value_size), dtype),
    )


def _online_softmax_update(
    state: _SoftmaxState,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    allowed: jax.Array | None,
    scale: float | None = None,
) -> _SoftmaxState:
    r"""Fold one block of keys and values into the running softmax state.

    The scores are ``query @ key.T`` times ``scale``; with ``scale=None``,
    ``query`` must already be scaled by :math:`1/\sqrt{d_k}`. Scaling the
    scores instead saves a scaled copy of the queries. All inputs must be in
    the state's floating dtype. ``allowed`` broadcasts to the
    block's scores ``(..., T, C)``, and None allows every key. With the block's
    maximum score :math:`m_b`, the new maximum is
    :math:`m' = \max(m, m_b)`, and the old sum and accumulator are rescaled
    by :math:`e^{m - m'}` before the block's :math:`e^{s - m'}` are added.
    """
    running_max, running_sum, accumulator = state
    # (..., T, C)
    scores = jnp.einsum("...td,...sd->...ts", query, key)
    if scale is not None:
        scores = scores * scale
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)

    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    # A row with no allowed key so far keeps the maximum -inf. Subtracting 0
    # instead keeps exp() away from (-inf) - (-inf) = NaN, and every term for
    # such a row is exp(-inf) = 0.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    correction = jnp.exp(running_max - shift)
    # (..., T, C): exp(-inf) = 0 for the masked keys
    probabilities = jnp.exp(scores - shift[..., None])

    running_sum = running_sum * correction + probabilities.sum(axis=-1)
    # (..., T, d_v)
    block_output = jnp.einsum("...ts,...sd->...td", probabilities, value)
    accumulator = accumulator * correction[..., None] + block_output
    return new_max, running_sum, accumulator


def _final_output(state: _SoftmaxState, dtype: jnp.dtype) -> jax.Array:
    """Divide the accumulator by the sum, giving 0 where no key was allowed."""
    _, running_sum, accumulator = state
    has_key = running_sum > 0
    denominator = jnp.where(has_key, running_sum, 1.0)
    output = jnp.where(has_key[..., None], accumulator / denominator[..., None], 0.0)
    return output.astype(dtype)


def _chunk_last_axis(array: jax.Array, num_chunks: int, axis: int) -> jax.Array:
    """Split ``axis`` into ``(num_chunks, chunk)`` and move the chunks first."""
    axis = axis % array.ndim
    shape = array.shape
    chunked = array.reshape(
        *shape[:axis], num_chunks, shape[axis] // num_chunks, *shape[axis + 1 :]
    )
    return jnp.moveaxis(chunked, axis, 0)


def _pad_axis(array: jax.Array, axis: int, before: int, after: int, value=0):
    widths = [(0, 0)] * array.ndim
    widths[axis % array.ndim] = (before, after)
    return jnp.pad(array, widths, constant_values=value)


def chunked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int,
    causal: bool = False,
    unroll: int | bool = 1,
) -> jax.Array:
    r"""Compute exact attention one chunk of keys at a time (online softmax).

    The result equals :func:`book_utils.attention.scaled_dot_product_attention`
    (its output only), but the ``(..., T, S)`` score matrix is never built.
    A :func:`jax.lax.scan` walks over the keys in chunks of ``chunk_size``.
    For each query row it keeps the largest score seen so far :math:`m`, the
    sum :math:`\ell = \sum_j e^{s_j - m}` and the accumulator
    :math:`a = \sum_j e^{s_j - m} v_j`, rescales both by :math:`e^{m - m'}`
    when a chunk raises the maximum to :math:`m'`, and returns
    :math:`a / \ell` at the end. The largest temporary is one chunk of scores,
    ``(..., T, chunk_size)``, so memory grows linearly with ``S``; the
    arithmetic is still :math:`O(T S d_k)`, as for dense attention.

    A key length ``S`` that is not a multiple of ``chunk_size`` is padded
    with zero keys up to the next multiple, and the padded keys are masked
    out, so any length works.

    Scores and the running state are float32 (or wider, for float64 inputs),
    also for bfloat16 inputs; the output takes the dtype of ``value``.

    Args:
        query: ``(..., T, d_k)``.
        key: ``(..., S, d_k)``.
        value: ``(..., S, d_v)``.
        mask: optional boolean array broadcastable to ``(..., T, S)``; True
            means the query may attend to that key. A full ``(T, S)`` mask
            costs ``T * S`` bytes itself; a ``(..., 1, S)`` padding mask or
            ``causal=True`` keeps memory linear.
        chunk_size: number of keys per chunk.
        causal: also forbid key ``j`` for query ``i`` when ``j > i``, the
            convention of :func:`book_utils.attention.causal_mask`, without
            building a ``(T, S)`` mask.
        unroll: passed to :func:`jax.lax.scan`. True unrolls the loop over
            chunks completely, so that XLA's cost analysis, which counts a
            loop body once, counts every chunk.

    Returns:
        The ``(..., T, d_v)`` output; zero for a query with no allowed key.

    Raises:
        ValueError: if the sizes do not match, the mask does not broadcast,
            or ``chunk_size`` is not positive.
        TypeError: if the mask is not boolean or ``chunk_size`` not an int.
    """
    batch_shape = _check_qkv(query, key, value)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_mask(mask, (*batch_shape, query.shape[-2], key.shape[-2]))
    return _chunked_attention(
        query, key, value, mask, chunk_size=chunk_size, causal=causal, unroll=unroll
    )


@partial(jax.jit, static_argnames=("chunk_size", "causal", "unroll"))
def _chunked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    chunk_size: int,
    causal: bool,
    unroll: int | bool,
) -> jax.Array:
    """Run :func:`chunked_attention` on validated inputs, as one compiled program."""
    batch_shape = jnp.broadcast_shapes(
        query.shape[:-2], key.shape[:-2], value.shape[:-2]
    )
    query_len, key_len = query.shape[-2], key.shape[-2]
    if mask is not None:
        mask = mask.reshape((1,) * (len(batch_shape) + 2 - mask.ndim) + mask.shape)

    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    num_chunks = -(-key_len // chunk_size)
    padding = num_chunks * chunk_size - key_len

    query = query.astype(compute_dtype)
    scale = 1.0 / math.sqrt(query.shape[-1])
    # Padded only when the length is not a multiple of chunk_size; each step
    # slices its chunk out of these arrays instead of a re-laid-out copy.
    padded_key = key.astype(compute_dtype)
    padded_value = value.astype(compute_dtype)
    if padding:
        padded_key = _pad_axis(padded_key, -2, 0, padding)
        padded_value = _pad_axis(padded_value, -2, 0, padding)
    padded_mask = None
    if mask is not None and mask.shape[-1] != 1:
        padded_mask = _pad_axis(mask, -1, 0, padding, False) if padding else mask
    query_positions = jnp.arange(query_len)

    def step(state, chunk_index):
        start = chunk_index * chunk_size
        key_chunk = jax.lax.dynamic_slice_in_dim(padded_key, start, chunk_size, -2)
        value_chunk = jax.lax.dynamic_slice_in_dim(padded_value, start, chunk_size, -2)
        key_positions = start + jnp.arange(chunk_size)
        allowed = None
        if padding:
            allowed = (key_positions < key_len)[None, :]
        if causal:
            causal_allowed = key_positions[None, :] <= query_positions[:, None]
            allowed = causal_allowed if allowed is None else allowed & causal_allowed
        if padded_mask is not None:
            mask_chunk = jax.lax.dynamic_slice_in_dim(
                padded_mask, start, chunk_size, -1
            )
            allowed = mask_chunk if allowed is None else allowed & mask_chunk
        elif mask is not None:
            allowed = mask if allowed is None else allowed & mask
        state = _online_softmax_update(
            state, query, key_chunk, value_chunk, allowed, scale
        )
        return state, None

    initial = _initial_state((*batch_shape, query_len), value.shape[-1], compute_dtype)
    state, _ = jax.lax.scan(step, initial, jnp.arange(num_chunks), unroll=unroll)
    return _final_output(state, value.dtype)


def sliding_window_mask(seq_len: int, window: int) -> jax.Array:
    """Build the ``(T, T)`` mask of a causal sliding window.

    Query ``i`` may attend to keys ``j`` with ``i - window < j <= i``: itself
    and the ``window - 1`` positions before it, so it attends to
    ``min(i + 1, window)`` keys. ``window = 1`` lets each position see only
    itself; ``window >= T`` gives :func:`book_utils.attention.causal_mask`.

    This builds all ``T * T`` entries and is meant for checking
    :func:`sliding_window_attention` on short sequences.

    Raises:
        ValueError: if ``seq_len`` or ``window`` is not a positive integer.
    """
    seq_len = _check_positive_int("seq_len", seq_len)
    window = _check_positive_int("window", window)
    positions = jnp.arange(seq_len)
    # (T, T): offset[i, j] = i - j
    offset = positions[:, None] - positions[None, :]
    return (offset >= 0) & (offset < window)


def sliding_window_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    window: int,
) -> jax.Array:
    """Attend from each position to itself and the ``window - 1`` before it.

    The result equals dense attention with ``sliding_window_mask(T, window)``.
    It is computed per block of ``b = min(window, T)`` queries. The keys that
    a block needs lie in the same block and the one before it, so each block
    scores ``b`` queries against ``2 b`` keys and masks the rest. Time and memory are
    ``O(T * window)``, never ``O(T^2)``, and no ``(T, T)`` mask is built. A
    length that is not a multiple of ``b`` is padded at the end; padded keys
    lie after every real query, so the causal band never reaches them.

    Scores are float32 (or wider) also for bfloat16 inputs; the output takes
    the dtype of ``value``.

    Args:
        query: ``(..., T, d_k)``.
        key: ``(..., T, d_k)``; the same length as ``query``.
        value: ``(..., T, d_v)``.
        window: number of keys each query sees, itself included (fewer for
            the first ``window - 1`` positions).

    Returns:
        The ``(..., T, d_v)`` output.

    Raises:
        ValueError: if the sizes do not match, key and query lengths differ,
            or ``window`` is not positive.
        TypeError: if ``window`` is not an int.
    """
    _check_qkv(query, key, value)
    window = _check_positive_int("window", window)
    seq_len = query.shape[-2]
    if key.shape[-2] != seq_len:
        raise ValueError(
            "sliding_window_attention needs keys at the query positions (S = T), "
            f"got query {query.shape} and key {key.shape}"
        )
    return _sliding_window_attention(query, key, value, window=window)


@partial(jax.jit, static_argnames=("window",))
def _sliding_window_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, window: int
) -> jax.Array:
    """Run :func:`sliding_window_attention` on validated inputs, compiled."""
    batch_shape = jnp.broadcast_shapes(
        query.shape[:-2], key.shape[:-2], value.shape[:-2]
    )
    seq_len = query.shape[-2]
    block = min(window, seq_len)
    num_blocks = -(-seq_len // block)
    padding = num_blocks * block - seq_len
    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)

    # Shapes (..., num_blocks * block, d): queries padded at the end. Keys and
    # values also get one block of zeros in front, so that block i's keys
    # start at row i * block of the padded arrays.
    scaled_query = query.astype(compute_dtype) / math.sqrt(query.shape[-1])
    scaled_query = jnp.broadcast_to(
        scaled_query, (*batch_shape, *scaled_query.shape[-2:])
    )
    scaled_query = _pad_axis(scaled_query, -2, 0, padding)
    padded_key = _pad_axis(key.astype(compute_dtype), -2, block, padding)
    padded_value = _pad_axis(value.astype(compute_dtype), -2, block, padding)

    def attend_block(block_index):
        start = block_index * block
        # (..., block, d_k), (..., 2 block, d_k), (..., 2 block, d_v)
        query_block = jax.lax.dynamic_slice_in_dim(scaled_query, start, block, -2)
        key_block = jax.lax.dynamic_slice_in_dim(padded_key, start, 2 * block, -2)
        value_block = jax.lax.dynamic_slice_in_dim(padded_value, start, 2 * block, -2)
        query_positions = start + jnp.arange(block)
        key_positions = start - block + jnp.arange(2 * block)
        # (block, 2 block): i - window < j <= i, and j >= 0
        offset = query_positions[:, None] - key_positions[None, :]
        allowed = (offset >= 0) & (offset < window) & (key_positions >= 0)
        state = _initial_state((*batch_shape, block), value.shape[-1], compute_dtype)
        state = _online_softmax_update(
            state, query_block, key_block, value_block, allowed
        )
        return _final_output(state, value.dtype)

    batch_size = max(1, _SLIDING_QUERIES_PER_STEP // block)
    # (num_blocks, ..., block, d_v)
    blocks = jax.lax.map(attend_block, jnp.arange(num_blocks), batch_size=batch_size)
    # (..., num_blocks, block, d_v) -> (..., T, d_v)
    output = jnp.moveaxis(blocks, 0, -3)
    output = output.reshape(*output.shape[:-3], num_blocks * block, output.shape[-1])
    return output[..., :seq_len, :]


def _shard_map(
    function: Callable, mesh: Mesh, in_specs, out_specs: PartitionSpec
) -> Callable:
    """Call ``jax.shard_map``, or ``jax.experimental.shard_map`` where it is missing.

    NOTE: the fallback for older jax is untested here (jax 0.10.2 has
    ``jax.shard_map``).
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            function, mesh=mesh, in_specs=in_specs, out_specs=out_specs
        )
    from jax.experimental.shard_map import shard_map

    return shard_map(
        function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False
    )


def _ring_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: str,
    num_devices: int,
    causal: bool,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """Attend from this device's query block to every key block of the ring.

    Runs inside ``shard_map``: each argument is this device's block along the
    sequence axis. After each step the key and value blocks move one device
    forward, so at step ``s`` device ``i`` holds the block of device
    ``i - s``.
    """
    device = jax.lax.axis_index(axis_name)
    query_len, key_len = query.shape[-2], key.shape[-2]
    query_positions = device * query_len + jnp.arange(query_len)
    forward = [(source, (source + 1) % num_devices) for source in range(num_devices)]

    rows = (*query.shape[:-1],)
    state = _initial_state(rows, value.shape[-1], query.dtype)
    for step in range(num_devices):
        owner = (device - step) % num_devices
        allowed = None
        if causal:
            key_positions = owner * key_len + jnp.arange(key_len)
            allowed = key_positions[None, :] <= query_positions[:, None]
        state = _online_softmax_update(state, query, key, value, allowed)
        if step < num_devices - 1:
            key, value = jax.lax.ppermute((key, value), axis_name, perm=forward)
    return _final_output(state, out_dtype)


def sequence_parallel_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh: Mesh,
    causal: bool = False,
) -> jax.Array:
    """Compute exact attention with the sequence split across a device mesh.

    Ring attention: the sequence axis (-2) of query, key and value is split
    into one block per device of the one-axis ``mesh``. Each device keeps its
    query block and, for ``P`` steps (``P`` devices), folds the key and value
    block it holds into an online softmax, then sends that block to the next
    device with :func:`jax.lax.ppermute`. After ``P`` steps every query has
    seen every key. Each device stores ``T / P`` rows of the queries and
    ``S / P`` rows of the keys and values, and computes scores in
    ``(T / P, S / P)`` blocks. The arithmetic is the same as for dense
    attention, spread over ``P`` devices. With ``causal=True`` the blocks that
    lie after the queries are still computed, then masked.

    NOTE: the ``P`` steps are unrolled in Python, and XLA may keep several
    blocks of scores alive at once. With 8 simulated CPU devices and
    T = S = 16384, d_k = 64, XLA planned 70 MB of temporaries per device,
    against 17 MB for one float32 block.

    Args:
        query: ``(..., T, d_k)``.
        key: ``(..., S, d_k)``.
        value: ``(..., S, d_v)``.
        mesh: a :class:`jax.sharding.Mesh` with exactly one axis; a mesh of
            one device works too.
        causal: forbid key ``j`` for query ``i`` when ``j > i``, the
            convention of :func:`book_utils.attention.causal_mask`.

    Returns:
        The ``(..., T, d_v)`` output, sharded along T over the mesh.

    Raises:
        ValueError: if the sizes do not match, the mesh has more than one
            axis, or T or S is not divisible by the number of devices.
        TypeError: if ``mesh`` is not a ``jax.sharding.Mesh``.
    """
    _check_qkv(query, key, value)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh)}")
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"mesh must have exactly one axis, got axes {mesh.axis_names} of "
            f"shape {dict(mesh.shape)}"
        )
    num_devices = mesh.devices.size
    for name, array in (("query", query), ("key", key)):
        if array.shape[-2] % num_devices != 0:
            raise ValueError(
                f"the length of {name} (axis -2 of shape {array.shape}) must be "
                f"divisible by the {num_devices} devices of the mesh"
            )

    return _ring_attention_jit(query, key, value, mesh=mesh, causal=bool(causal))


def _place_on_mesh(arrays: list[jax.Array], sharding: NamedSharding) -> list:
    """Constrain the arrays' layout to ``sharding`` inside jit.

    A mesh with explicit axes (the default of ``jax.make_mesh`` in jax 0.10.2)
    accepts only ``jax.reshard``. A mesh with automatic axes (the default of
    ``Mesh(...)``, and every mesh of a jax without ``jax.sharding.AxisType``)
    takes a sharding constraint.
    """
    axis_types = getattr(sharding.mesh, "axis_types", ())
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is not None and explicit in axis_types:
        return jax.reshard(arrays, sharding)
    return jax.lax.with_sharding_constraint(arrays, sharding)


@partial(jax.jit, static_argnames=("mesh", "causal"))
def _ring_attention_jit(
    query: jax.Array, key: jax.Array, value: jax.Array, *, mesh: Mesh, causal: bool
) -> jax.Array:
    """Run :func:`_ring_attention` under ``shard_map`` and jit.

    Outside jit, shard_map dispatches every operation on its own. That took
    about 40 s for (2, 3, 64, 16) inputs on 8 simulated CPU devices with jax
    0.10.2, against about 3 s compiled.
    """
    (axis_name,) = mesh.axis_names
    batch_shape = jnp.broadcast_shapes(
        query.shape[:-2], key.shape[:-2], value.shape[:-2]
    )
    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    scaled_query = query.astype(compute_dtype) / math.sqrt(query.shape[-1])
    # Every array gets the full batch shape, so that one spec fits all three.
    arrays = [
        jnp.broadcast_to(array.astype(compute_dtype), (*batch_shape, *array.shape[-2:]))
        for array in (scaled_query, key, value)
    ]
    spec = PartitionSpec(*([None] * len(batch_shape)), axis_name, None)
    arrays = _place_on_mesh(arrays, NamedSharding(mesh, spec))
    ring = partial(
        _ring_attention,
        axis_name=axis_name,
        num_devices=mesh.devices.size,
        causal=causal,
        out_dtype=value.dtype,
    )
    sharded = _shard_map(ring, mesh, in_specs=(spec, spec, spec), out_specs=spec)
    return sharded(*arrays)
