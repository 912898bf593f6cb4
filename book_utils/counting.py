"""Parameter and FLOP counts of a transformer, from its configuration alone.

Two independent ways to count parameters:

- :func:`count_parameters` builds the model with ``nnx.eval_shape`` and
  adds up the sizes. ``nnx.eval_shape`` traces the constructors and returns
  the parameters as shapes, without allocating or initialising any array.
  Decoders are :class:`book_utils.decoder.GPT`, and encoders are
  :class:`book_utils.encoder.Encoder` plus BERT's pooler.
- :func:`count_parameters_by_formula` sums the closed-form sizes of
  :func:`parameter_breakdown`.

FLOPs per token follow the accounting of Kaplan et al. (2020), "Scaling Laws
for Neural Language Models", section 2.1. A forward pass costs
``C_forward = 2 N + 2 n_layer n_ctx d_model`` per token. ``N`` is the number
of parameters in the blocks, at 2 FLOPs (a multiply and an add) per weight.
The second term is the attention scores and weighted sum over a context of
``n_ctx`` tokens. Training costs about three forward passes, because the
backward pass costs about twice the forward one: ``C_train = 3 C_forward``,
the familiar ``6 N`` per token. As in that paper, embedding lookups, the
output layer's ``2 d_model V`` and element-wise operations are left out.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from book_utils.configs import TransformerConfig
from book_utils.decoder import GPT
from book_utils.encoder import Encoder

__all__ = [
    "abstract_model",
    "count_parameters",
    "count_parameters_by_formula",
    "forward_flops_per_token",
    "layer_parameters",
    "parameter_breakdown",
    "training_flops_per_token",
]


class _EncoderWithPooler(nnx.Module):
    """BERT as ``BertModel`` has it: the encoder plus the pooler.

    The pooler is ``tanh(Linear(D, D))`` on the first token's final vector.
    :class:`book_utils.encoder.Encoder` leaves it out because sentence
    embedding models do not use it, but BERT's published totals include it.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs) -> None:
        self.encoder = Encoder(config, rngs=rngs)
        self.pooler = nnx.Linear(config.d_model, config.d_model, rngs=rngs)


def _check_config(config: TransformerConfig) -> None:
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"config must be a TransformerConfig, got {type(config).__name__}"
        )


def _build(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    if config.kind == "decoder":
        return GPT(config, rngs=rngs)
    if config.pooler:
        return _EncoderWithPooler(config, rngs=rngs)
    return Encoder(config, rngs=rngs)


def abstract_model(config: TransformerConfig) -> nnx.Module:
    """Build the model of ``config`` with shapes only, allocating nothing.

    Every parameter of the returned module is a ``jax.ShapeDtypeStruct``.
    A decoder is a :class:`~book_utils.decoder.GPT`. An encoder is a
    :class:`~book_utils.encoder.Encoder`, wrapped with BERT's pooler
    (``.encoder`` and ``.pooler``) when ``config.pooler`` is True.

    Raises:
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
        ValueError: if the model rejects the configuration.
    """
    _check_config(config)
    return nnx.eval_shape(lambda: _build(config, nnx.Rngs(0)))


def count_parameters(config: TransformerConfig) -> int:
    """Count the trainable parameters of the model built from ``config``.

    The model is built with :func:`abstract_model` and the sizes of its
    ``nnx.Param`` leaves are added up. A tied output layer is the token
    table, so it is counted once. Results are cached per configuration.

    Raises:
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
    """
    _check_config(config)
    return _count_parameters_cached(config)


@functools.lru_cache(maxsize=64)
def _count_parameters_cached(config: TransformerConfig) -> int:
    state = nnx.state(abstract_model(config), nnx.Param)
    return sum(leaf.size for leaf in jax.tree.leaves(state))


def _block_parts(config: TransformerConfig) -> dict[str, int]:
    """Parameters of one block, by sub-layer."""
    d_model, d_ff = config.d_model, config.d_ff
    return {
        # Q, K, V and output projections, each (D, D) plus a bias of D.
        "attention": 4 * (d_model * d_model + d_model),
        # (D, d_ff) + d_ff and (d_ff, D) + D.
        "feed-forward": 2 * d_model * d_ff + d_ff + d_model,
        # Two LayerNorms, each a scale and a shift of D.
        "block LayerNorms": 2 * 2 * d_model,
    }


def parameter_breakdown(config: TransformerConfig) -> dict[str, int]:
    """Split the parameter count of ``config`` by component, in closed form.

    With ``V`` the vocabulary, ``P`` the positions, ``D`` the width,
    ``F = d_ff`` and ``L`` layers, each block has ``4 (D^2 + D)`` attention
    parameters, ``2 D F + F + D`` feed-forward parameters and ``4 D``
    LayerNorm parameters. The head count does not appear: the heads split
    the ``D`` columns of the projections among themselves.

    Returns:
        Component name to parameter count, with 0 for the components a
        model does not have. Only encoders have a token-type table, an
        embedding LayerNorm and (BERT) a pooler. Only decoders have a final
        LayerNorm and, when untied, an output layer.

    Raises:
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
    """
    _check_config(config)
    d_model = config.d_model
    encoder = config.kind == "encoder"
    blocks = {
        name: config.num_layers * count for name, count in _block_parts(config).items()
    }
    return {
        "token embedding": config.vocab_size * d_model,
        "position embedding": config.max_positions * d_model,
        "token-type embedding": config.type_vocab_size * d_model if encoder else 0,
        "embedding LayerNorm": 2 * d_model if encoder else 0,
        **blocks,
        "final LayerNorm": 0 if encoder else 2 * d_model,
        "pooler": d_model * d_model + d_model if encoder and config.pooler else 0,
        "output layer": (
            0 if encoder or config.tied_embeddings else config.vocab_size * d_model
        ),
    }


def count_parameters_by_formula(config: TransformerConfig) -> int:
    """Count the parameters of ``config`` in closed form.

    The result is the sum of :func:`parameter_breakdown`, and it equals
    :func:`count_parameters`, which builds the model.

    Raises:
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
    """
    return sum(parameter_breakdown(config).values())


def layer_parameters(config: TransformerConfig) -> int:
    """Count the parameters inside the ``num_layers`` blocks.

    This is Kaplan et al.'s ``N`` (non-embedding parameters),
    ``2 n_layer d_model (2 d_attn + d_ff) = 12 n_layer d_model^2`` when
    ``d_ff = 4 d_model``, except that the biases and LayerNorms they call
    sub-leading are included here: 13 D per layer more for ``d_ff = 4 D``.

    Raises:
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
    """
    _check_config(config)
    return config.num_layers * sum(_block_parts(config).values())


def forward_flops_per_token(
    config: TransformerConfig, context_length: int | None = None
) -> int:
    """Estimate the FLOPs of one forward pass per token.

    ``C_forward = 2 N + 2 L n_ctx D``, with ``N`` from
    :func:`layer_parameters` (Kaplan et al. 2020, section 2.1).

    Args:
        config: the model.
        context_length: tokens each query attends over, ``n_ctx``. The
            default is ``config.max_positions``.

    Raises:
        ValueError: if ``context_length`` is not a positive integer no larger
            than ``config.max_positions``.
        TypeError: if ``config`` is not a :class:`TransformerConfig`.
    """
    _check_config(config)
    if context_length is None:
        context_length = config.max_positions
    if (
        not isinstance(context_length, int)
        or not 1 <= context_length <= config.max_positions
    ):
        raise ValueError(
            f"context_length must be an integer in [1, {config.max_positions}] "
            f"for {config.name!r}, got {context_length!r}"
        )
    attention = 2 * config.num_layers * context_length * config.d_model
    return 2 * layer_parameters(config) + attention


def training_flops_per_token(
    config: TransformerConfig, context_length: int | None = None
) -> int:
    """Estimate the FLOPs of one training step per token: 3 forward passes.

    The backward pass costs about twice the forward pass, because it
    computes gradients with respect to both the activations and the
    weights. See :func:`forward_flops_per_token` for the arguments.
    """
    return 3 * forward_flops_per_token(config, context_length)
