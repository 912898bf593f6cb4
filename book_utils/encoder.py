"""A BERT-style encoder in Flax NNX, built on the book's own attention.

The encoder turns token ids into one contextual vector per token:

1. :class:`Embeddings` adds a token (word) row, a position row and a
   token-type (segment) row, then applies LayerNorm. Its output is the
   first entry of ``hidden_states``.
2. Each :class:`EncoderBlock` is a post-LayerNorm block, as in BERT:
   ``x = LayerNorm(x + Attention(x))`` then ``x = LayerNorm(x + FFN(x))``,
   where the feed-forward network is ``Linear -> GELU -> Linear``.

Attention is :class:`book_utils.attention.MultiHeadAttention`, with a
padding mask so that no position attends to padding. There is no dropout:
the module is for inference with pretrained weights.

Shape letters: ``B`` batch size, ``T`` sequence length (padded), ``D``
model width (``d_model``), ``N`` heads, ``L`` layers, ``V`` vocabulary size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from book_utils.attention import MultiHeadAttention, padding_mask
from book_utils.configs import TransformerConfig

__all__ = ["Embeddings", "Encoder", "EncoderBlock", "EncoderOutput"]


class EncoderOutput(NamedTuple):
    """Hidden states and attention weights of every layer.

    Attributes:
        hidden_states: ``(L + 1, B, T, D)``. Entry 0 is the embedding output
            and entry ``l`` the output of block ``l``.
        attentions: ``(L, B, N, T, T)`` softmax weights of every block, with
            zero weight on padded keys.
    """

    hidden_states: jax.Array
    attentions: jax.Array


def _layer_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False computes E[(x - mean)^2], as torch does. The
    # faster E[x^2] - mean^2 loses digits to cancellation when the mean is
    # large next to the spread (on all-MiniLM-L6-v2 both stay within 3e-6).
    return nnx.LayerNorm(
        config.d_model,
        epsilon=config.layer_norm_eps,
        use_fast_variance=False,
        rngs=rngs,
    )


def _check_ids(
    name: str, ids: jax.Array, shapes: tuple[tuple[int, ...], ...], limit: int
) -> jax.Array:
    """Check an id array's shape, dtype and (outside jit) value range."""
    ids = jnp.asarray(ids)
    if ids.shape not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{name} must have shape {expected}, got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        # NumPy, not jnp: inside jit, jnp operations on a concrete array that
        # the traced function closes over would return tracers.
        values = np.asarray(ids)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= limit:
            raise ValueError(
                f"{name} must lie in [0, {limit}), got values from {low} to {high}"
            )
    return ids


class Embeddings(nnx.Module):
    """Token, position and token-type embeddings, summed and normalised.

    Attributes:
        word: ``nnx.Embed`` whose ``embedding`` is the ``(V, D)`` token table.
        position: ``nnx.Embed`` with the ``(max_positions, D)`` table.
        token_type: ``nnx.Embed`` with the ``(type_vocab_size, D)`` table.
        norm: LayerNorm applied to the sum.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs) -> None:
        if config.type_vocab_size < 1:
            raise ValueError(
                "an encoder needs a token-type table: type_vocab_size must be "
                f">= 1, got {config.type_vocab_size}"
            )
        self.word = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.position = nnx.Embed(config.max_positions, config.d_model, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, config.d_model, rngs=rngs)
        self.norm = _layer_norm(config, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        token_type_ids: jax.Array,
        position_ids: jax.Array,
    ) -> jax.Array:
        """Look up and add the three rows of every token, then normalise.

        Args:
            input_ids: ``(B, T)`` integer token ids.
            token_type_ids: ``(B, T)`` segment ids.
            position_ids: ``(B, T)`` or ``(T,)`` positions.

        Returns:
            ``(B, T, D)`` embedding output.
        """
        summed = (
            self.word(input_ids)
            + self.position(position_ids)
            + self.token_type(token_type_ids)
        )
        return self.norm(summed)


class EncoderBlock(nnx.Module):
    """One post-LayerNorm transformer block: attention, then feed-forward.

    Attributes:
        attention: multi-head self-attention with Q, K, V and output
            projections.
        attention_norm: LayerNorm after the attention residual.
        intermediate: ``Linear(D, d_ff)``, followed by GELU.
        output: ``Linear(d_ff, D)``.
        output_norm: LayerNorm after the feed-forward residual.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        rngs: nnx.Rngs,
        approximate_gelu: bool = False,
    ) -> None:
        self.approximate_gelu = approximate_gelu
        self.attention = MultiHeadAttention(config.d_model, config.num_heads, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
        self.output = nnx.Linear(config.d_ff, config.d_model, rngs=rngs)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Transform ``x`` and return it with this block's attention weights.

        Args:
            x: ``(B, T, D)`` output of the previous layer.
            mask: boolean mask broadcastable to ``(B, N, T, T)``; True means
                "may attend".

        Returns:
            ``(y, weights)``: ``y`` is ``(B, T, D)`` and ``weights`` is
            ``(B, N, T, T)``.
        """
        attended, weights = self.attention(x, mask, return_weights=True)
        x = self.attention_norm(x + attended)
        # (B, T, d_ff)
        hidden = jax.nn.gelu(self.intermediate(x), approximate=self.approximate_gelu)
        x = self.output_norm(x + self.output(hidden))
        return x, weights


class Encoder(nnx.Module):
    """BERT-style encoder: embeddings followed by ``num_layers`` blocks.

    The token table is ``encoder.embeddings.word.embedding`` (shape
    ``(V, D)``), and block ``l``'s attention projections are
    ``encoder.blocks[l].attention.query`` (and ``.key``, ``.value``,
    ``.output``): ``nnx.Linear`` layers with ``(in, out)`` kernels.

    Args:
        config: a :class:`TransformerConfig` with ``kind="encoder"``.
        rngs: random streams for the initial weights.
        approximate_gelu: use the tanh approximation of GELU. BERT models
            whose config sets ``"hidden_act": "gelu"`` were trained with the
            exact (erf) GELU, the default here.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        rngs: nnx.Rngs,
        approximate_gelu: bool = False,
    ) -> None:
        if config.kind != "encoder":
            raise ValueError(
                f"Encoder needs a config with kind='encoder', got kind={config.kind!r}"
            )
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.blocks = nnx.List(
            [
                EncoderBlock(config, rngs=rngs, approximate_gelu=approximate_gelu)
                for _ in range(config.num_layers)
            ]
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> EncoderOutput:
        """Encode a batch of token ids into contextual vectors.

        Args:
            input_ids: ``(B, T)`` token ids, padded on the right.
            attention_mask: ``(B, T)`` with 1 for real tokens and 0 for
                padding; None means every token is real. Padded keys get
                zero attention weight.
            token_type_ids: ``(B, T)`` segment ids; None means all zeros
                (a single segment).
            position_ids: ``(B, T)`` or ``(T,)`` positions; None means
                ``0, 1, ..., T - 1``.

        Returns:
            An :class:`EncoderOutput` with hidden states ``(L + 1, B, T, D)``
            and attentions ``(L, B, N, T, T)``.

        Raises:
            ValueError: if a shape does not match ``input_ids`` or an id is
                out of range for its table (the range is checked outside
                jit only).
            TypeError: if an id array is not integer.
        """
        config = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (B, T), got shape {input_ids.shape}"
            )
        shape = input_ids.shape
        if shape[1] > config.max_positions:
            raise ValueError(
                f"sequence length {shape[1]} exceeds the model's "
                f"{config.max_positions} learned positions"
            )
        input_ids = _check_ids("input_ids", input_ids, (shape,), config.vocab_size)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, dtype=jnp.int32)
        if jnp.shape(attention_mask) != shape:
            raise ValueError(
                f"attention_mask must have shape {shape}, got shape "
                f"{jnp.shape(attention_mask)}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, dtype=jnp.int32)
        token_type_ids = _check_ids(
            "token_type_ids", token_type_ids, (shape,), config.type_vocab_size
        )
        if position_ids is None:
            position_ids = jnp.arange(shape[1], dtype=jnp.int32)
        position_ids = _check_ids(
            "position_ids", position_ids, (shape, shape[1:]), config.max_positions
        )

        # (B, 1, 1, T): every query may attend to the real keys of its row.
        mask = padding_mask(attention_mask)
        x = self.embeddings(
            input_ids, token_type_ids=token_type_ids, position_ids=position_ids
        )
        hidden_states = [x]
        attentions = []
        for block in self.blocks:
            x, weights = block(x, mask)
            hidden_states.append(x)
            attentions.append(weights)
        # (L + 1, B, T, D) and (L, B, N, T, T)
        return EncoderOutput(jnp.stack(hidden_states), jnp.stack(attentions))
