"""Transformer configurations: the numbers that fix a model's shape."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["TransformerConfig"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of a BERT-style encoder or GPT-style decoder.

    Attributes:
        name: human-readable model name.
        vocab_size: number of rows of the token embedding table.
        max_positions: number of learned position embeddings.
        d_model: width of every hidden vector.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block; must divide ``d_model``.
        d_ff: hidden width of each block's feed-forward network.
        kind: ``"encoder"`` (bidirectional, post-LayerNorm, BERT) or
            ``"decoder"`` (causal, pre-LayerNorm, GPT).
        tied_embeddings: whether the output layer reuses the token table.
        type_vocab_size: rows of the token-type (segment) table; 0 for none.
        layer_norm_eps: epsilon of every LayerNorm.
        pooler: whether the model has BERT's pooler layer on the first token.
    """

    name: str
    vocab_size: int
    max_positions: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    kind: Literal["encoder", "decoder"]
    tied_embeddings: bool = True
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-5
    pooler: bool = False

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "max_positions",
            "d_model",
            "num_layers",
            "num_heads",
            "d_ff",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.kind not in ("encoder", "decoder"):
            raise ValueError(f"kind must be 'encoder' or 'decoder', got {self.kind!r}")
        if self.type_vocab_size < 0:
            raise ValueError(
                f"type_vocab_size must be >= 0, got {self.type_vocab_size}"
            )

    @property
    def head_dim(self) -> int:
        """Size of each head's query, key and value vectors: d_model / num_heads."""
        return self.d_model // self.num_heads
