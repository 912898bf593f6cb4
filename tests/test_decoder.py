"""GPT-style decoder block and model: causality, pre-LN structure, jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from book_utils import configs, counting
from book_utils.attention import causal_mask, merge_heads, split_heads
from book_utils.configs import TransformerConfig
from book_utils.decoder import (
    GPT,
    DecoderBlock,
    FeedForward,
    create_stacked_blocks,
    run_stacked_blocks,
)

TINY = TransformerConfig(
    name="tiny",
    vocab_size=50,
    max_positions=16,
    d_model=16,
    num_layers=3,
    num_heads=4,
    d_ff=40,
    kind="decoder",
)
BATCH, SEQ_LEN = 2, 7


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def make_block(seed: int = 0) -> DecoderBlock:
    return DecoderBlock.from_config(TINY, rngs=nnx.Rngs(seed))


def random_input(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, SEQ_LEN, TINY.d_model))


def random_ids(seed: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (BATCH, SEQ_LEN), 0, 50)


def reference_layer_norm(x, norm: nnx.LayerNorm) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    normed = (x - mean) / jnp.sqrt(variance + norm.epsilon)
    return normed * norm.scale[...] + norm.bias[...]


def reference_attention(x, attention) -> jax.Array:
    """Causal multi-head attention from the projections' raw weights."""

    def project(linear):
        projected = x @ linear.kernel[...] + linear.bias[...]
        return split_heads(projected, attention.num_heads)

    query, key, value = (
        project(attention.query),
        project(attention.key),
        project(attention.value),
    )
    scores = query @ jnp.swapaxes(key, -1, -2) / jnp.sqrt(query.shape[-1])
    scores = jnp.where(causal_mask(x.shape[1]), scores, -jnp.inf)
    heads = jax.nn.softmax(scores, axis=-1) @ value
    output = attention.output
    return merge_heads(heads) @ output.kernel[...] + output.bias[...]


def reference_block(x, block: DecoderBlock) -> jax.Array:
    """x + Attn(LN1(x)), then x + MLP(LN2(x)), written out by hand."""
    x = x + reference_attention(
        reference_layer_norm(x, block.attention_norm), block.attention
    )
    hidden = reference_layer_norm(x, block.mlp_norm)
    mlp = block.mlp
    hidden = jax.nn.gelu(
        hidden @ mlp.hidden.kernel[...] + mlp.hidden.bias[...], approximate=True
    )
    return x + hidden @ mlp.output.kernel[...] + mlp.output.bias[...]


def test_block_output_shape() -> None:
    assert make_block()(random_input()).shape == (BATCH, SEQ_LEN, TINY.d_model)


def test_block_matches_reference() -> None:
    block, x = make_block(), random_input()
    np.testing.assert_allclose(block(x), reference_block(x, block), atol=1e-5)


def test_block_is_causal() -> None:
    block, x = make_block(), random_input()
    changed = x.at[:, 4].add(10.0)
    before, after = block(x), block(changed)
    np.testing.assert_array_equal(before[:, :4], after[:, :4])
    assert not np.allclose(before[:, 4:], after[:, 4:])


def test_block_weights_are_causal() -> None:
    _, weights = make_block()(random_input(), return_weights=True)
    assert weights.shape == (BATCH, TINY.num_heads, SEQ_LEN, SEQ_LEN)
    upper = np.triu(np.ones((SEQ_LEN, SEQ_LEN), dtype=bool), k=1)
    assert np.all(np.asarray(weights)[..., upper] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def zero_branches(block: DecoderBlock) -> None:
    for linear in (block.attention.output, block.mlp.output):
        linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
        linear.bias[...] = jnp.zeros_like(linear.bias[...])


def test_pre_ln_residual_path_is_identity() -> None:
    # With both branches silenced, a pre-LN block passes its input through
    # untouched; a post-LN block would return LayerNorm(x) instead.
    block, x = make_block(), 5.0 + 3.0 * random_input()
    zero_branches(block)
    np.testing.assert_array_equal(block(x), x)


def test_pre_ln_keeps_feature_shift() -> None:
    # Adding c to every feature changes no LayerNorm output, so in a pre-LN
    # block the shift rides the residual path to the output unchanged. A
    # post-LN block ends in a LayerNorm and would remove it.
    block, x = make_block(), random_input()
    shift = 4.0
    np.testing.assert_allclose(block(x + shift) - shift, block(x), atol=1e-4)


def test_block_uses_config_epsilon() -> None:
    config = dataclasses.replace(TINY, layer_norm_eps=1e-3)
    block = DecoderBlock.from_config(config, rngs=nnx.Rngs(0))
    assert block.attention_norm.epsilon == 1e-3
    assert block.mlp_norm.epsilon == 1e-3


def test_block_rejects_2d_input() -> None:
    with pytest.raises(ValueError, match=r"\(7, 16\)"):
        make_block()(random_input()[0])


def test_feed_forward_gelu_choice() -> None:
    tanh = FeedForward(8, 32, rngs=nnx.Rngs(0))
    exact = FeedForward(8, 32, rngs=nnx.Rngs(0), approximate_gelu=False)
    x = 3.0 * jax.random.normal(jax.random.key(0), (5, 8))
    assert not np.allclose(tanh(x), exact(x), atol=1e-6)
    np.testing.assert_allclose(tanh(x), exact(x), atol=1e-2)


def make_model(config: TransformerConfig = TINY) -> GPT:
    return GPT(config, rngs=nnx.Rngs(0))


def reference_logits(model: GPT, token_ids: jax.Array) -> jax.Array:
    """Embeddings, a Python loop over the blocks, final LN, tied output."""
    table = model.token_embedding.embedding[...]
    positions = model.position_embedding.embedding[...][: token_ids.shape[1]]
    x = table[token_ids] + positions
    for index in range(model.config.num_layers):
        x = reference_block(x, model.block(index))
    return reference_layer_norm(x, model.final_norm) @ table.T


def test_gpt_logits_shape() -> None:
    assert make_model()(random_ids()).shape == (BATCH, SEQ_LEN, TINY.vocab_size)


def test_gpt_matches_reference() -> None:
    model, token_ids = make_model(), random_ids()
    np.testing.assert_allclose(
        model(token_ids), reference_logits(model, token_ids), atol=1e-4
    )


def test_gpt_is_causal() -> None:
    model, token_ids = make_model(), random_ids()
    changed = token_ids.at[:, 3].set((token_ids[:, 3] + 1) % TINY.vocab_size)
    before, after = model(token_ids), model(changed)
    np.testing.assert_array_equal(before[:, :3], after[:, :3])
    assert not np.allclose(before[:, 3:], after[:, 3:])


def test_gpt_hidden_states_per_layer() -> None:
    model, token_ids = make_model(), random_ids()
    logits, hidden = model(token_ids, return_hidden_states=True)
    assert hidden.shape == (TINY.num_layers, BATCH, SEQ_LEN, TINY.d_model)
    np.testing.assert_allclose(hidden[1], model.block(1)(hidden[0]), atol=1e-5)
    tied = model.token_embedding.attend(model.final_norm(hidden[-1]))
    np.testing.assert_allclose(logits, tied, atol=1e-5)


def test_gpt_layers_differ() -> None:
    model = make_model()
    first = model.block(0).attention.query.kernel[...]
    second = model.block(1).attention.query.kernel[...]
    assert not np.allclose(first, second)


def test_gpt_block_negative_index() -> None:
    model = make_model()
    last = model.block(-1).mlp.hidden.kernel[...]
    np.testing.assert_array_equal(last, model.block(2).mlp.hidden.kernel[...])


def test_gpt_block_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="layer index 3"):
        make_model().block(3)


def test_gpt_untied_head() -> None:
    config = dataclasses.replace(TINY, tied_embeddings=False)
    model, token_ids = make_model(config), random_ids()
    assert model.lm_head.kernel[...].shape == (TINY.d_model, TINY.vocab_size)
    _, hidden = model(token_ids, return_hidden_states=True)
    expected = model.final_norm(hidden[-1]) @ model.lm_head.kernel[...]
    np.testing.assert_allclose(model(token_ids), expected, atol=1e-5)


def test_gpt_parameter_count_matches_counting() -> None:
    state = nnx.state(make_model(), nnx.Param)
    count = sum(leaf.size for leaf in jax.tree.leaves(state))
    assert count == counting.count_parameters_by_formula(TINY)


def test_gpt_jit_matches_eager() -> None:
    model, token_ids = make_model(), random_ids()
    compiled = nnx.jit(lambda model, ids: model(ids))
    np.testing.assert_allclose(compiled(model, token_ids), model(token_ids), atol=1e-5)


def test_gpt_gradients_are_finite() -> None:
    model, token_ids = make_model(), random_ids()

    def loss(model: GPT) -> jax.Array:
        return model(token_ids).mean()

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(leaf).all() for leaf in leaves)
    assert any(np.abs(leaf).max() > 0 for leaf in leaves)


def test_gpt_rejects_encoder_config() -> None:
    with pytest.raises(ValueError, match="kind='encoder'"):
        GPT(configs.BERT_BASE, rngs=nnx.Rngs(0))


def test_gpt_rejects_pooler() -> None:
    config = dataclasses.replace(TINY, pooler=True)
    with pytest.raises(ValueError, match="pooler=True"):
        GPT(config, rngs=nnx.Rngs(0))


def test_gpt_rejects_long_sequence() -> None:
    token_ids = jnp.zeros((1, 17), dtype=jnp.int32)
    with pytest.raises(ValueError, match="17 exceeds max_positions=16"):
        make_model()(token_ids)


def test_gpt_rejects_float_ids() -> None:
    with pytest.raises(TypeError, match="float32"):
        make_model()(jnp.zeros((1, 4)))


def test_gpt_rejects_1d_ids() -> None:
    with pytest.raises(ValueError, match=r"\(4,\)"):
        make_model()(jnp.zeros(4, dtype=jnp.int32))


def test_stacked_blocks_leading_axis() -> None:
    blocks = create_stacked_blocks(TINY, rngs=nnx.Rngs(0))
    assert blocks.mlp.hidden.kernel.shape == (3, 16, 40)
    assert blocks.attention_norm.scale.shape == (3, 16)


def test_run_stacked_blocks_custom_layer() -> None:
    blocks = create_stacked_blocks(TINY, rngs=nnx.Rngs(0))
    x = random_input()

    def mlp_only(block: DecoderBlock, x: jax.Array) -> jax.Array:
        return x + block.mlp(x)

    output, hidden = run_stacked_blocks(blocks, x, mlp_only)
    assert hidden.shape == (3, BATCH, SEQ_LEN, TINY.d_model)
    expected = x
    for index in range(3):
        mlp = jax.tree.map(lambda array, i=index: array[i], nnx.state(blocks.mlp))
        layer = nnx.merge(nnx.graphdef(blocks.mlp), mlp)
        expected = expected + layer(expected)
    np.testing.assert_allclose(output, expected, atol=1e-5)
    np.testing.assert_array_equal(hidden[-1], output)


@pytest.mark.parametrize("bad_id", [-1, 50])
def test_gpt_rejects_out_of_range_ids(bad_id):
    token_ids = np.zeros((1, 4), dtype=np.int32)
    token_ids[0, 2] = bad_id
    with pytest.raises(ValueError, match=rf"\[0, {TINY.vocab_size}\)"):
        make_model()(token_ids)
