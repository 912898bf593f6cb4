"""Tests for book_utils.encoder on a small encoder with random weights.

The reference is an independent float64 NumPy implementation of a BERT
encoder (post-LayerNorm blocks, exact erf GELU), fed the same weights.
The pretrained model is tested in test_pretrained.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from book_utils.configs import TransformerConfig
from book_utils.encoder import Encoder

CONFIG = TransformerConfig(
    name="tiny-bert",
    vocab_size=50,
    max_positions=16,
    d_model=16,
    num_layers=2,
    num_heads=4,
    d_ff=32,
    kind="encoder",
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
BATCH_SIZE, SEQ_LEN = 2, 7


def random_encoder(config=CONFIG, **kwargs):
    """Build an encoder and give every parameter (biases and LayerNorms too)
    random values, so that no part of it is an identity by chance."""
    model = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0), **kwargs))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    leaves = [
        jnp.asarray(0.5 * rng.standard_normal(leaf.shape), dtype=leaf.dtype)
        for leaf in leaves
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.fixture(scope="module")
def model():
    return random_encoder()


@pytest.fixture(scope="module")
def input_ids():
    ids = jax.random.randint(jax.random.key(2), (BATCH_SIZE, SEQ_LEN), 0, 50)
    return np.asarray(ids, dtype=np.int32)


# Second sentence: 4 real tokens, then 3 padding positions.
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3], dtype=np.int32)


def array(param):
    return np.asarray(param[...], dtype=np.float64)


def numpy_layer_norm(x, norm, eps):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * array(norm.scale) + array(norm.bias)


def numpy_linear(x, linear):
    return x @ array(linear.kernel) + array(linear.bias)


def numpy_bert(model, input_ids, mask, token_type_ids, position_ids):
    """Float64 BERT forward pass written independently of book_utils."""
    config = model.config
    emb = model.embeddings
    x = (
        array(emb.word.embedding)[input_ids]
        + array(emb.position.embedding)[position_ids]
        + array(emb.token_type.embedding)[token_type_ids]
    )
    x = numpy_layer_norm(x, emb.norm, config.layer_norm_eps)
    hidden_states, attentions = [x], []
    batch_size, seq_len, _ = x.shape
    heads, head_dim = config.num_heads, config.head_dim
    for block in model.blocks:
        attention = block.attention

        def heads_of(linear, x=x):
            y = numpy_linear(x, linear).reshape(batch_size, seq_len, heads, head_dim)
            return y.transpose(0, 2, 1, 3)

        query, key, value = (
            heads_of(attention.query),
            heads_of(attention.key),
            heads_of(attention.value),
        )
        scores = query @ key.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
        scores = np.where(mask[:, None, None, :] == 1, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ value).transpose(0, 2, 1, 3).reshape(x.shape)
        x = numpy_layer_norm(
            x + numpy_linear(context, attention.output),
            block.attention_norm,
            config.layer_norm_eps,
        )
        hidden = numpy_linear(x, block.intermediate)
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
        x = numpy_layer_norm(
            x + numpy_linear(hidden, block.output),
            block.output_norm,
            config.layer_norm_eps,
        )
        hidden_states.append(x)
        attentions.append(weights)
    return np.stack(hidden_states), np.stack(attentions)


@nnx.jit
def forward(model, input_ids, attention_mask, token_type_ids, position_ids):
    return model(
        input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
    )


def run(model, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
    """Run the model jitted (one compilation per shape, not per operation)."""
    with jax.default_matmul_precision("highest"):
        return forward(model, input_ids, attention_mask, token_type_ids, position_ids)


def test_matches_numpy_reference(model, input_ids):
    token_types = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0, 0]])
    positions = np.arange(SEQ_LEN)[None].repeat(BATCH_SIZE, 0)
    output = run(model, input_ids, attention_mask=MASK, token_type_ids=token_types)
    hidden, weights = numpy_bert(model, input_ids, MASK, token_types, positions)
    real = MASK == 1
    np.testing.assert_allclose(
        output.hidden_states[:, real], hidden[:, real], atol=1e-5
    )
    np.testing.assert_allclose(output.attentions, weights, atol=1e-6)


def test_output_shapes(model, input_ids):
    output = run(model, input_ids)
    assert output.hidden_states.shape == (3, BATCH_SIZE, SEQ_LEN, 16)
    assert output.attentions.shape == (2, BATCH_SIZE, 4, SEQ_LEN, SEQ_LEN)


def test_jit_matches_eager(model, input_ids):
    jitted = run(model, input_ids, attention_mask=MASK)
    with jax.default_matmul_precision("highest"):
        eager = model(jnp.asarray(input_ids), attention_mask=MASK)
    np.testing.assert_allclose(jitted.hidden_states, eager.hidden_states, atol=1e-6)


def test_jit_closing_over_ids(model, input_ids):
    """Concrete ids captured by a jitted function must not break the checks."""
    ids = jnp.asarray(input_ids)
    closed = nnx.jit(lambda model: model(ids).hidden_states)(model)
    np.testing.assert_allclose(closed, run(model, input_ids).hidden_states, atol=1e-6)


def test_ids_keyword_only(model, input_ids):
    with pytest.raises(TypeError):
        model(input_ids, MASK)
    with pytest.raises(TypeError):
        model(input_ids, MASK, np.zeros_like(input_ids))


def test_omitted_token_types_equal_zeros(model, input_ids):
    omitted = run(model, input_ids)
    zeros = run(model, input_ids, token_type_ids=np.zeros_like(input_ids))
    np.testing.assert_array_equal(omitted.hidden_states, zeros.hidden_states)


def test_token_types_ones_change_output(model, input_ids):
    zeros = run(model, input_ids)
    ones = run(model, input_ids, token_type_ids=np.ones_like(input_ids))
    assert np.abs(ones.hidden_states[-1] - zeros.hidden_states[-1]).max() > 1e-2


def test_positions_start_at_zero(model, input_ids):
    omitted = run(model, input_ids)
    from_zero = run(model, input_ids, position_ids=np.arange(SEQ_LEN))
    np.testing.assert_array_equal(omitted.hidden_states, from_zero.hidden_states)


def test_positions_per_row_equal_shared(model, input_ids):
    shared = run(model, input_ids, position_ids=np.arange(SEQ_LEN))
    per_row = np.arange(SEQ_LEN)[None].repeat(BATCH_SIZE, 0)
    rows = run(model, input_ids, position_ids=per_row)
    np.testing.assert_array_equal(shared.hidden_states, rows.hidden_states)


def test_positions_from_one_differ(model, input_ids):
    from_zero = run(model, input_ids)
    from_one = run(model, input_ids, position_ids=np.arange(1, SEQ_LEN + 1))
    assert np.abs(from_one.hidden_states[0] - from_zero.hidden_states[0]).max() > 1e-2


def test_padding_keeps_vectors(model, input_ids):
    alone = run(model, input_ids[1:, :4])
    padded = run(model, input_ids, attention_mask=MASK)
    np.testing.assert_allclose(
        padded.hidden_states[:, 1, :4], alone.hidden_states[:, 0], atol=1e-5
    )


def test_padding_ids_ignored(model, input_ids):
    other = input_ids.copy()
    other[1, 4:] = (other[1, 4:] + 1) % CONFIG.vocab_size
    first = run(model, input_ids, attention_mask=MASK)
    second = run(model, other, attention_mask=MASK)
    np.testing.assert_allclose(
        first.hidden_states[:, 1, :4], second.hidden_states[:, 1, :4], atol=1e-6
    )


def test_padded_keys_zero_weight(model, input_ids):
    output = run(model, input_ids, attention_mask=MASK)
    assert np.all(np.asarray(output.attentions)[:, 1, :, :, 4:] == 0.0)


def test_attention_rows_sum_to_one(model, input_ids):
    output = run(model, input_ids, attention_mask=MASK)
    np.testing.assert_allclose(output.attentions.sum(-1), 1.0, atol=1e-6)


def test_tanh_gelu_differs(model, input_ids):
    tanh_model = random_encoder(approximate_gelu=True)
    exact = run(model, input_ids)
    tanh = run(tanh_model, input_ids)
    assert np.abs(tanh.hidden_states[-1] - exact.hidden_states[-1]).max() > 1e-4


def test_layer_norm_eps_from_config():
    config = dataclasses.replace(CONFIG, layer_norm_eps=1e-7)
    model = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
    norms = [model.embeddings.norm]
    for block in model.blocks:
        norms += [block.attention_norm, block.output_norm]
    assert [norm.epsilon for norm in norms] == [1e-7] * 5


def test_rejects_decoder_config():
    config = dataclasses.replace(CONFIG, kind="decoder")
    with pytest.raises(ValueError, match="kind='encoder'"):
        Encoder(config, rngs=nnx.Rngs(0))


def test_rejects_one_dimensional_ids(model):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(jnp.arange(5))


def test_rejects_float_ids(model):
    with pytest.raises(TypeError, match="integers"):
        model(jnp.zeros((1, 5)))


def test_rejects_out_of_range_ids(model):
    with pytest.raises(ValueError, match="from 0 to 50"):
        model(jnp.array([[0, 50]]))


def test_rejects_out_of_range_types(model, input_ids):
    with pytest.raises(ValueError, match="token_type_ids"):
        model(input_ids, token_type_ids=np.full_like(input_ids, 2))


def test_rejects_mask_shape(model, input_ids):
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask=MASK[:, :3])


def test_rejects_position_shape(model, input_ids):
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids, position_ids=np.arange(SEQ_LEN + 1))


def test_rejects_too_long_input(model):
    with pytest.raises(ValueError, match="length 17"):
        model(jnp.zeros((1, 17), dtype=jnp.int32))
