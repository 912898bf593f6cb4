"""Tests for book_utils.pretrained: all-MiniLM-L6-v2 on the book's encoder.

The reference is sentence-transformers 6.3.0 on torch 2.13.0 (CPU), stored
in tests/data/reference_minilm.npz by tools/make_reference.py. Where torch
and sentence-transformers are importable, test_live_reference also runs the
reference here and compares every token of every layer.
"""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from book_utils import configs, pretrained
from book_utils.encoder import Encoder

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests/data/reference_minilm.npz"
FINANCE = "I went to the bank to deposit money"
RIVER = "The river bank was muddy"
# Tolerances on max abs differences against the reference.
HIDDEN_ATOL = 1e-5
EMBEDDING_ATOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def sentences(reference):
    return [str(sentence) for sentence in reference["sentences"]]


@pytest.fixture(scope="module")
def encoded(sentences):
    return pretrained.encode(sentences)


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@nnx.jit
def forward(model, input_ids, attention_mask, token_type_ids):
    return model(
        input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
    )


def run_model(model, input_ids, attention_mask=None, token_type_ids=None):
    with jax.default_matmul_precision("highest"):
        return forward(model, input_ids, attention_mask, token_type_ids)


def build_model(config, **kwargs):
    model = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0), **kwargs))
    pretrained.load_weights(model, pretrained.load().weights)
    return model


def max_hidden_difference(model, reference):
    """Largest difference from the reference over every stored value."""
    count = len(reference["sentences"])
    lengths = [len(reference[f"ids_{index}"]) for index in range(count)]
    input_ids = np.zeros((count, max(lengths)), dtype=np.int32)
    for index, length in enumerate(lengths):
        input_ids[index, :length] = reference[f"ids_{index}"]
    attention_mask = (input_ids != 0).astype(np.int32)
    hidden_states = np.asarray(
        run_model(model, input_ids, attention_mask).hidden_states
    )
    differences = []
    for index in range(count):
        positions = reference[f"positions_{index}"]
        ours = hidden_states[:, index, positions]
        differences.append(np.abs(ours - reference[f"hidden_{index}"]).max())
    return max(differences)


def test_reference_file_small():
    assert REFERENCE.stat().st_size < 500_000


def test_token_ids_match_reference(encoded, reference):
    for index, tokens in enumerate(encoded.tokens):
        ours = encoded.input_ids[index, : len(tokens)]
        np.testing.assert_array_equal(ours, reference[f"ids_{index}"])


def test_hidden_states_match_reference(encoded, reference):
    for index in range(len(encoded.tokens)):
        positions = reference[f"positions_{index}"]
        ours = encoded.hidden_states[:, index, positions]
        for layer, expected in enumerate(reference[f"hidden_{index}"]):
            np.testing.assert_allclose(
                ours[layer],
                expected,
                rtol=0,
                atol=HIDDEN_ATOL,
                err_msg=f"sentence {index}, hidden state {layer}",
            )


def test_sentence_embeddings_match_reference(encoded, reference):
    np.testing.assert_allclose(
        encoded.sentence_embeddings,
        reference["sentence_embeddings"],
        rtol=0,
        atol=EMBEDDING_ATOL,
    )


def test_attentions_match_reference(encoded, reference):
    length = len(reference["ids_1"])
    ours = encoded.attentions[:, 1, :, :length, :length]
    np.testing.assert_allclose(ours, reference["attentions_1"], rtol=0, atol=1e-5)


def test_live_reference(encoded, sentences, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reason = "the live comparison needs torch and sentence-transformers: {}"
    pytest.importorskip("torch", reason=reason.format("torch is not installed"))
    pytest.importorskip(
        "sentence_transformers",
        reason=reason.format("sentence-transformers is not installed"),
    )
    spec = importlib.util.spec_from_file_location(
        "make_reference", ROOT / "tools/make_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    live = module.compute_reference(sentences)

    for index, ids in enumerate(live["ids"]):
        np.testing.assert_array_equal(encoded.input_ids[index, : len(ids)], ids)
    mask = live["attention_mask"].astype(bool)
    length = mask.shape[1]
    ours = encoded.hidden_states[:, :, :length]
    np.testing.assert_allclose(
        ours[:, mask], live["hidden_states"][:, mask], rtol=0, atol=HIDDEN_ATOL
    )
    np.testing.assert_allclose(
        encoded.sentence_embeddings,
        live["sentence_embeddings"],
        rtol=0,
        atol=EMBEDDING_ATOL,
    )
    # (L, N, queries, T) at the real queries of each sentence. The rows of
    # padding queries carry no meaning, so they are left out.
    for index in range(len(sentences)):
        real = mask[index]
        np.testing.assert_allclose(
            encoded.attentions[:, index, :, :length, :length][:, :, real],
            live["attentions"][:, index][:, :, real],
            rtol=0,
            atol=1e-5,
            err_msg=f"attentions of sentence {index}",
        )


def test_vocabulary_ids():
    tokenizer = pretrained.load().tokenizer
    ids = {word: tokenizer.token_to_id(word) for word in ("bank", "river", "money")}
    assert ids == {"bank": 2924, "river": 2314, "money": 2769}


def test_simultaneously_one_token():
    encoding = pretrained.load().tokenizer.encode("simultaneously")
    assert encoding.tokens == ["[CLS]", "simultaneously", "[SEP]"]
    assert encoding.ids[1] == 7453


def test_embeddings_splits_into_pieces():
    encoding = pretrained.load().tokenizer.encode("embeddings")
    assert encoding.tokens[1:-1] == ["em", "##bed", "##ding", "##s"]


def test_bank_cosine(encoded, reference):
    ours = cosine(encoded.hidden_states[-1, 0, 5], encoded.hidden_states[-1, 1, 3])
    expected = cosine(reference["hidden_0"][-1, 5], reference["hidden_1"][-1, 3])
    assert encoded.tokens[0][5] == encoded.tokens[1][3] == "bank"
    assert abs(ours - expected) < 1e-5
    assert round(expected, 4) == 0.7533


def test_tanh_gelu_differs(reference):
    model = build_model(pretrained.load().config, approximate_gelu=True)
    # Measured: 3.5e-3 with the tanh approximation, 3e-6 with exact GELU.
    assert max_hidden_difference(model, reference) > 1e-3


def test_layer_norm_eps():
    loaded = pretrained.load()
    model = loaded.model
    norms = [model.embeddings.norm]
    for block in model.blocks:
        norms += [block.attention_norm, block.output_norm]
    assert loaded.config_json["layer_norm_eps"] == 1e-12
    assert loaded.config.layer_norm_eps == 1e-12
    assert {norm.epsilon for norm in norms} == {1e-12}


def test_default_eps_differs(reference):
    # NNX's default LayerNorm epsilon is 1e-6; measured gap 7.6e-4.
    config = dataclasses.replace(pretrained.load().config, layer_norm_eps=1e-6)
    assert max_hidden_difference(build_model(config), reference) > 1e-4


def test_omitted_token_types_equal_zeros():
    model = pretrained.load().model
    ids = np.array([[101, 1996, 2314, 2924, 102]])
    omitted = run_model(model, ids).hidden_states
    zeros = run_model(model, ids, token_type_ids=np.zeros_like(ids)).hidden_states
    ones = run_model(model, ids, token_type_ids=np.ones_like(ids)).hidden_states
    np.testing.assert_array_equal(omitted, zeros)
    assert np.abs(ones[-1] - zeros[-1]).max() > 1e-2


def test_embedding_output_from_tables(encoded):
    """Rebuild hidden state 0 from the three tables, positions from 0."""
    weights = pretrained.load().weights
    length = len(encoded.tokens[0])
    summed = (
        weights["embeddings.word_embeddings.weight"][encoded.input_ids[0, :length]]
        + weights["embeddings.position_embeddings.weight"][:length]
        + weights["embeddings.token_type_embeddings.weight"][0]
    )
    mean = summed.mean(-1, keepdims=True)
    variance = summed.var(-1, keepdims=True)
    normed = (summed - mean) / np.sqrt(variance + 1e-12)
    normed = (
        normed * weights["embeddings.LayerNorm.weight"]
        + weights["embeddings.LayerNorm.bias"]
    )
    np.testing.assert_allclose(
        encoded.hidden_states[0, 0, :length], normed, rtol=0, atol=1e-5
    )


def test_padding_keeps_vectors(encoded, sentences):
    alone = pretrained.encode([RIVER])
    padded = pretrained.encode([RIVER, sentences[-1]])
    length = len(alone.tokens[0])
    assert padded.input_ids.shape[1] > alone.input_ids.shape[1]
    np.testing.assert_allclose(
        padded.hidden_states[:, 0, :length],
        alone.hidden_states[:, 0, :length],
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        padded.sentence_embeddings[0], alone.sentence_embeddings[0], atol=1e-6
    )


def test_padded_keys_zero_attention(encoded):
    padding = encoded.attention_mask == 0
    # (L, B, N, T, T): True where the key is a padding position
    on_padding = np.broadcast_to(
        padding[None, :, None, None, :], encoded.attentions.shape
    )
    assert padding.any()
    assert np.all(encoded.attentions[on_padding] == 0.0)


def test_sentence_embeddings_are_pooled(encoded):
    mask = encoded.attention_mask[..., None]
    mean = (encoded.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(encoded.sentence_embeddings, mean, atol=1e-6)


def test_result_shapes(encoded):
    batch_size, seq_len = encoded.input_ids.shape
    assert (batch_size, seq_len) == (5, 64)
    assert encoded.hidden_states.shape == (7, 5, 64, 384)
    assert encoded.attentions.shape == (6, 5, 12, 64, 64)
    assert encoded.sentence_embeddings.shape == (5, 384)


def test_result_is_frozen(encoded):
    with pytest.raises(dataclasses.FrozenInstanceError):
        encoded.tokens = []


def test_result_arrays_read_only(encoded):
    with pytest.raises(ValueError, match="read-only"):
        encoded.hidden_states[0, 0, 0, 0] = 1.0


def test_long_input_raises():
    with pytest.raises(ValueError, match="302 tokens"):
        pretrained.encode(["word " * 300])


def test_truncate_keeps_256():
    result = pretrained.encode(["word " * 300], truncate=True)
    assert len(result.tokens[0]) == 256
    assert result.tokens[0][-1] == "[SEP]"
    assert result.input_ids.shape == (1, 256)


def test_one_trace_per_bucket():
    # Batch size 64 is used by no other test: the first call traces anew.
    short = [f"bank {'word ' * (index % 12)}" for index in range(64)]
    before = pretrained.trace_count()
    pretrained.encode(short)
    first = pretrained.trace_count()
    pretrained.encode([sentence + " river" for sentence in short])
    pretrained.encode(short[:40])
    assert first == before + 1
    assert pretrained.trace_count() == first


def test_rejects_single_string():
    with pytest.raises(TypeError, match="list"):
        pretrained.encode(FINANCE)


def test_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        pretrained.encode([])


def test_load_is_cached():
    assert pretrained.load() is pretrained.load()


def test_load_exposes_tables():
    loaded = pretrained.load()
    table = loaded.model.embeddings.word.embedding[...]
    stored = loaded.weights["embeddings.word_embeddings.weight"]
    assert table.shape == (30522, 384)
    np.testing.assert_array_equal(table, stored)


def test_load_transposes_linear():
    loaded = pretrained.load()
    kernel = loaded.model.blocks[0].attention.query.kernel[...]
    stored = loaded.weights["encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_array_equal(kernel, stored.T)


def test_load_weights_rejects_missing():
    weights = dict(pretrained.load().weights)
    del weights["encoder.layer.3.output.dense.bias"]
    model = nnx.eval_shape(lambda: Encoder(pretrained.load().config, rngs=nnx.Rngs(0)))
    with pytest.raises(KeyError, match="layer.3.output.dense.bias"):
        pretrained.load_weights(model, weights)


def test_load_weights_rejects_unexpected():
    weights = dict(pretrained.load().weights)
    weights["encoder.layer.6.output.dense.bias"] = np.zeros(384, np.float32)
    model = nnx.eval_shape(lambda: Encoder(pretrained.load().config, rngs=nnx.Rngs(0)))
    with pytest.raises(KeyError, match="layer.6"):
        pretrained.load_weights(model, weights)


def test_load_weights_rejects_shape():
    weights = dict(pretrained.load().weights)
    query = weights["encoder.layer.0.attention.self.query.weight"]
    weights["encoder.layer.0.attention.self.query.weight"] = query[:, :100]
    model = nnx.eval_shape(lambda: Encoder(pretrained.load().config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="query.weight"):
        pretrained.load_weights(model, weights)


def test_config_matches_configs_module():
    config = pretrained.load().config
    assert config == configs.minilm_config()
    assert (config.kind, config.type_vocab_size) == ("encoder", 2)


def test_config_rejects_tanh_gelu():
    config_json = dict(pretrained.load().config_json, hidden_act="gelu_new")
    with pytest.raises(ValueError, match="hidden_act"):
        pretrained.config_from_json(config_json)
