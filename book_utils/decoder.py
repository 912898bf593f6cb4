"""A GPT-style decoder: causal self-attention blocks with pre-LayerNorm.

Each :class:`DecoderBlock` computes, for an input ``x`` of shape ``(B, T, D)``,

.. math::
    x &\\leftarrow x + \\mathrm{Attention}(\\mathrm{LN}_1(x)) \\\\
    x &\\leftarrow x + \\mathrm{MLP}(\\mathrm{LN}_2(x))

with a causal mask, so position ``i`` only attends to positions ``<= i``. The
LayerNorm sits before each sub-layer, inside the residual branch ("pre-LN",
as in GPT-2 and GPT-3), and the residual path from input to output passes
through no normalisation at all. :class:`GPT` adds token and position
embeddings below a stack of blocks and a final LayerNorm and output layer on
top.

:class:`GPT` creates its blocks stacked: every parameter of the blocks has a
leading axis of size ``num_layers`` and the forward pass runs them with
``nnx.scan``. Creating or compiling a 96-layer model then costs about as
much as a 1-layer one, which keeps ``nnx.eval_shape`` of GPT-3 fast.

Shape letters: ``B`` batch size, ``T`` sequence length, ``D`` model width,
``N`` heads, ``V`` vocabulary size, ``L`` number of layers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from book_utils.attention import MultiHeadAttention, causal_mask
from book_utils.configs import TransformerConfig

__all__ = [
    "GPT",
    "DecoderBlock",
    "FeedForward",
    "create_stacked_blocks",
    "run_stacked_blocks",
]


class FeedForward(nnx.Module):
    """Position-wise MLP: ``Linear(D -> d_ff)``, GELU, ``Linear(d_ff -> D)``.

    GPT-2 uses the tanh approximation of GELU (its ``gelu`` in
    openai/gpt-2 ``src/model.py``), so that is the default here.

    Args:
        d_model: model width D.
        d_ff: hidden width.
        rngs: random number streams for the initial weights.
        approximate_gelu: use the tanh approximation of GELU (True) or the
            exact erf form (False).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        approximate_gelu: bool = True,
    ) -> None:
        self.approximate_gelu = approximate_gelu
        self.hidden = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.output = nnx.Linear(d_ff, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map ``(..., D)`` to ``(..., D)`` through the hidden layer."""
        hidden = jax.nn.gelu(self.hidden(x), approximate=self.approximate_gelu)
        return self.output(hidden)


class DecoderBlock(nnx.Module):
    """One pre-LayerNorm decoder block with causal multi-head self-attention.

    Sub-layers, in the order they run: ``attention_norm`` (LayerNorm),
    ``attention`` (:class:`~book_utils.attention.MultiHeadAttention`),
    ``mlp_norm`` (LayerNorm) and ``mlp`` (:class:`FeedForward`).

    Args:
        d_model: model width D.
        num_heads: number of heads N; must divide ``d_model``.
        d_ff: hidden width of the feed-forward network.
        rngs: random number streams for the initial weights.
        layer_norm_eps: epsilon of both LayerNorms.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        if d_ff < 1:
            raise ValueError(f"d_ff must be a positive integer, got {d_ff!r}")
        self.attention_norm = nnx.LayerNorm(d_model, epsilon=layer_norm_eps, rngs=rngs)
        self.attention = MultiHeadAttention(d_model, num_heads, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, epsilon=layer_norm_eps, rngs=rngs)
        self.mlp = FeedForward(d_model, d_ff, rngs=rngs)

    @classmethod
    def from_config(cls, config: TransformerConfig, *, rngs: nnx.Rngs) -> DecoderBlock:
        """Create a block with the sizes of ``config``."""
        return cls(
            config.d_model,
            config.num_heads,
            config.d_ff,
            rngs=rngs,
            layer_norm_eps=config.layer_norm_eps,
        )

    def __call__(
        self, x: jax.Array, *, return_weights: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Run the block on ``x`` of shape ``(B, T, D)``.

        Args:
            x: ``(B, T, D)`` input.
            return_weights: also return the attention weights.

        Returns:
            The ``(B, T, D)`` output, or ``(output, weights)`` with weights
            ``(B, N, T, T)``, zero above the diagonal, when
            ``return_weights`` is True.
        """
        if x.ndim != 3:
            raise ValueError(f"x must have shape (B, T, D), got shape {x.shape}")
        mask = causal_mask(x.shape[1])
        attended, weights = self.attention(
            self.attention_norm(x), mask, return_weights=True
        )
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        if return_weights:
            return x, weights
        return x


def create_stacked_blocks(config: TransformerConfig, *, rngs: nnx.Rngs) -> DecoderBlock:
    """Create ``config.num_layers`` decoder blocks stacked along a new axis.

    The result is one :class:`DecoderBlock` whose parameters all have a
    leading axis of size ``L = num_layers``: the kernel of ``mlp.hidden``,
    for example, is ``(L, D, d_ff)``. Each layer gets its own random key,
    so the layers start with different weights. The constructor is traced
    once for all layers, which keeps ``nnx.eval_shape`` of a 96-layer model
    as fast as that of a 1-layer one.

    Args:
        config: sizes of each block and the number of layers.
        rngs: random number streams for the initial weights.
    """

    # split_rngs splits every stream into num_layers keys, and vmap creates
    # one block per key.
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock.from_config(config, rngs=rngs)

    return create_blocks(rngs)


def run_stacked_blocks(
    blocks: DecoderBlock,
    x: jax.Array,
    layer_fn: Callable[[DecoderBlock, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run stacked blocks one after another with ``nnx.scan``.

    Args:
        blocks: blocks from :func:`create_stacked_blocks`, leading axis L.
        x: ``(B, T, D)`` input of the first block.
        layer_fn: ``layer_fn(block, x)`` computes one layer's output from
            one layer's block and the previous layer's ``(B, T, D)`` output.
            The default is ``block(x)``. Another function can rewire the
            block's sub-layers, for example without the residual additions.

    Returns:
        ``(output, hidden_states)``: the last block's ``(B, T, D)`` output
        and every block's output stacked, ``(L, B, T, D)``.
    """
    if layer_fn is None:

        def layer_fn(block: DecoderBlock, x: jax.Array) -> jax.Array:
            return block(x)

    # Each step's carry is the next block's input, so layer l reads the
    # output of layer l - 1.
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run_blocks(x: jax.Array, block: DecoderBlock) -> tuple[jax.Array, jax.Array]:
        x = layer_fn(block, x)
        return x, x

    return run_blocks(x, blocks)


def _check_decoder_config(config: TransformerConfig) -> None:
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"config must be a TransformerConfig, got {type(config).__name__}"
        )
    if config.kind != "decoder":
        raise ValueError(
            f"GPT needs a config with kind='decoder', got kind={config.kind!r} "
            f"for {config.name!r}"
        )
    if config.pooler or config.type_vocab_size:
        raise ValueError(
            "GPT has no pooler and no token-type table, got "
            f"pooler={config.pooler} and type_vocab_size={config.type_vocab_size} "
            f"for {config.name!r}"
        )


class GPT(nnx.Module):
    """A GPT-2-style language model: embeddings, stacked blocks, LM head.

    Attributes:
        config: the configuration the model was built from.
        token_embedding: ``nnx.Embed`` with a ``(V, D)`` table.
        position_embedding: ``nnx.Embed`` with a ``(max_positions, D)`` table.
        blocks: one :class:`DecoderBlock` whose parameters all carry a
            leading axis of size ``num_layers``. Layer ``i`` is slice ``i``,
            and :meth:`block` returns it as a block of its own.
        final_norm: the LayerNorm after the last block.
        lm_head: ``nnx.Linear(D, V)`` without bias, or None when the output
            layer reuses the token table (``config.tied_embeddings``).

    Args:
        config: a decoder configuration (``kind="decoder"``, no pooler, no
            token types).
        rngs: random number streams for the initial weights.

    Raises:
        ValueError: if ``config`` is not a decoder configuration.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs) -> None:
        _check_decoder_config(config)
        self.config = config
        self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.position_embedding = nnx.Embed(
            config.max_positions, config.d_model, rngs=rngs
        )
        self.blocks = create_stacked_blocks(config, rngs=rngs)
        self.final_norm = nnx.LayerNorm(
            config.d_model, epsilon=config.layer_norm_eps, rngs=rngs
        )
        self.lm_head = (
            None
            if config.tied_embeddings
            else nnx.Linear(
                config.d_model, config.vocab_size, use_bias=False, rngs=rngs
            )
        )

    def block(self, index: int) -> DecoderBlock:
        """Return layer ``index`` as a separate :class:`DecoderBlock` (a copy).

        Raises:
            IndexError: if ``index`` is not in ``[0, num_layers)``.
        """
        num_layers = self.config.num_layers
        if not -num_layers <= index < num_layers:
            raise IndexError(
                f"layer index {index} is out of range for {num_layers} layers"
            )
        graphdef, state = nnx.split(self.blocks)
        # Every array loses its leading (num_layers,) axis.
        return nnx.merge(graphdef, jax.tree.map(lambda array: array[index], state))

    def _check_token_ids(self, token_ids: jax.Array) -> None:
        if token_ids.ndim != 2:
            raise ValueError(
                f"token_ids must have shape (B, T), got shape {token_ids.shape}"
            )
        if not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise TypeError(f"token_ids must be integers, got dtype {token_ids.dtype}")
        if token_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"sequence length {token_ids.shape[1]} exceeds max_positions="
                f"{self.config.max_positions} of {self.config.name!r}"
            )
        # nnx.Embed clamps or wraps out-of-range ids instead of failing, so they
        # are checked here (on concrete arrays only: a traced id has no value).
        if not isinstance(token_ids, jax.core.Tracer) and token_ids.size:
            values = np.asarray(token_ids)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"token_ids must lie in [0, {self.config.vocab_size}), got "
                    f"values from {low} to {high}"
                )

    def __call__(
        self, token_ids: jax.Array, *, return_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Compute next-token logits for every position.

        Args:
            token_ids: ``(B, T)`` integer token ids with ``T <= max_positions``.
            return_hidden_states: also return every block's output.

        Returns:
            Logits of shape ``(B, T, V)``, or ``(logits, hidden_states)``
            with hidden states ``(L, B, T, D)`` (block ``l``'s output, before
            the final LayerNorm) when ``return_hidden_states`` is True.

        Raises:
            ValueError: if ``token_ids`` is not 2-D, longer than
                ``max_positions`` or contains an id outside ``[0, vocab_size)``.
            TypeError: if ``token_ids`` is not an integer array.
        """
        token_ids = jnp.asarray(token_ids)
        self._check_token_ids(token_ids)
        positions = jnp.arange(token_ids.shape[1])
        # (B, T, D)
        x = self.token_embedding(token_ids) + self.position_embedding(positions)

        # (B, T, D) and (L, B, T, D)
        x, hidden_states = run_stacked_blocks(self.blocks, x)
        x = self.final_norm(x)
        if self.lm_head is None:
            # (B, T, V): scores against every row of the token table.
            logits = self.token_embedding.attend(x)
        else:
            logits = self.lm_head(x)
        if return_hidden_states:
            return logits, hidden_states
        return logits
