"""Measure encoding throughput of the book's encoder against the reference.

Two workloads, each a batch of 32 sentences: short sentences (about 10
tokens) and inputs of exactly 128 tokens. For each it times

- ``jax_embeddings``: tokenize, pad to the length bucket and run the jitted
  encoder with mean pooling, returning only the sentence embeddings (the
  same work as the reference);
- ``jax_encode``: :func:`book_utils.pretrained.encode`, which also copies
  every layer's hidden states and attention weights to NumPy;
- ``torch_reference``: ``SentenceTransformer.encode`` on torch (CPU), where
  torch and sentence-transformers are importable,

and prints one JSON object with sentences per second (median of the
repeats, after one untimed warm-up call that compiles) and the ratio
``jax_embeddings / torch_reference`` (above 1: JAX is faster).

Run it in the reference environment described in tools/make_reference.py,
with jax and flax installed there too:

    /tmp/ref/bin/pip install jax==0.10.2 flax==0.12.8
    HF_HUB_OFFLINE=1 PYTHONPATH=. /tmp/ref/bin/python benchmarks/bench_encoder.py

Without torch it measures the JAX side only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import book_utils
from book_utils import pretrained

SHORT = [
    "I went to the bank to deposit money",
    "The river bank was muddy",
    "She sat on the bank and watched the water",
    "The bank raised its interest rates again",
]


def workloads() -> dict[str, list[str]]:
    """Return the two batches of 32 sentences, by name."""
    long_sentence = " ".join(["bank"] * 126)
    return {
        "short_batch32": [SHORT[index % len(SHORT)] for index in range(32)],
        "tokens128_batch32": [long_sentence] * 32,
    }


@nnx.jit
def _embed(model, input_ids, attention_mask):
    with jax.default_matmul_precision("highest"):
        output = model(input_ids, attention_mask=attention_mask)
        return pretrained.pool_sentence_embeddings(
            output.hidden_states[-1], attention_mask
        )


def jax_embeddings(sentences: list[str]) -> np.ndarray:
    """Tokenize, pad to a length bucket and return ``(B, D)`` embeddings."""
    loaded = pretrained.load()
    encodings = loaded.tokenizer.encode_batch(sentences)
    longest = max(len(encoding.ids) for encoding in encodings)
    seq_len = min(bucket for bucket in pretrained.LENGTH_BUCKETS if bucket >= longest)
    input_ids = np.zeros((len(sentences), seq_len), dtype=np.int32)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
    lengths = np.array([len(encoding.ids) for encoding in encodings])
    # (B, T): 1 before each sentence's end, 0 after
    attention_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    embeddings = _embed(
        loaded.model, jnp.asarray(input_ids), jnp.asarray(attention_mask)
    )
    return np.asarray(embeddings)


def throughput(function, sentences: list[str], repeats: int) -> float:
    """Return sentences per second: the median over ``repeats`` timed calls."""
    function(sentences)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(sentences)
        seconds.append(time.perf_counter() - start)
    return len(sentences) / statistics.median(seconds)


def torch_encoder():
    """Return the reference's encode function, or None without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(pretrained.load().model_dir), device="cpu")

    def encode(sentences: list[str]) -> np.ndarray:
        return model.encode(sentences, batch_size=len(sentences))

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls")
    args = parser.parse_args()

    reference = torch_encoder()
    results: dict[str, object] = {
        "backend": book_utils.describe_backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "repeats": args.repeats,
        "unit": "sentences per second",
    }
    if reference is None:
        results["torch"] = "not installed: JAX measured alone"
    else:
        import torch

        results["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
    for name, sentences in workloads().items():
        if reference is not None:
            # Both sides must compute the same thing before they are timed.
            np.testing.assert_allclose(
                jax_embeddings(sentences), reference(sentences), atol=1e-5
            )
        row = {
            "jax_embeddings": throughput(jax_embeddings, sentences, args.repeats),
            "jax_encode": throughput(pretrained.encode, sentences, args.repeats),
        }
        if reference is not None:
            row["torch_reference"] = throughput(reference, sentences, args.repeats)
            row["ratio_jax_to_torch"] = row["jax_embeddings"] / row["torch_reference"]
        results[name] = {key: round(value, 2) for key, value in row.items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
