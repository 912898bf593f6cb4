"""Timing helpers and the machine description shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or platform's guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_description() -> dict[str, Any]:
    """Describe the machine, backend and versions a benchmark ran on."""
    import flax
    import numpy

    devices = jax.devices()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _physical_memory(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": sorted({device.device_kind for device in devices}),
        "device_count": len(devices),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
    }


def block(value: Any) -> Any:
    """Wait until every array in ``value`` is computed."""
    return jax.block_until_ready(value)


def time_call(
    function: Callable[[], Any], *, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Time ``function()`` after ``warmup`` calls; return median and min seconds.

    ``function`` must return JAX arrays (or anything ``jax.block_until_ready``
    accepts) so that asynchronous dispatch is waited for.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        block(function())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(function())
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds)}


def time_pair(
    candidate: Callable[[], Any],
    reference: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Time two functions in alternation and return their paired time ratio.

    Each repeat times ``candidate()`` and then ``reference()``, so that both
    see nearly the same load from other processes. Their ratio is taken per
    pair, and the median of those ratios is returned as
    ``candidate_over_reference``: on a shared machine it varies much less
    than the ratio of two medians taken minutes apart. Both functions must
    return JAX arrays, as for :func:`time_call`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        block(candidate())
        block(reference())
    candidate_s, reference_s = [], []
    for _ in range(repeats):
        for function, seconds in ((candidate, candidate_s), (reference, reference_s)):
            start = time.perf_counter()
            block(function())
            seconds.append(time.perf_counter() - start)
    ratios = [
        mine / theirs for mine, theirs in zip(candidate_s, reference_s, strict=True)
    ]
    return {
        "candidate_median_s": statistics.median(candidate_s),
        "candidate_min_s": min(candidate_s),
        "reference_median_s": statistics.median(reference_s),
        "reference_min_s": min(reference_s),
        "candidate_over_reference": statistics.median(ratios),
        "repeats": repeats,
    }


def planned_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Return XLA's planned memory for one call of a compiled function.

    ``total`` is arguments + outputs + temporaries - aliased bytes: the
    buffers XLA's buffer assignment reserves for the call. Scratch memory
    that a library call allocates for itself (a YNNPACK fusion on CPU, a
    cuDNN kernel on GPU) is not part of the plan.
    """
    memory = compiled.memory_analysis()
    sizes = {
        "argument": memory.argument_size_in_bytes,
        "output": memory.output_size_in_bytes,
        "temp": memory.temp_size_in_bytes,
        "alias": memory.alias_size_in_bytes,
    }
    sizes["total"] = sizes["argument"] + sizes["output"] + sizes["temp"]
    sizes["total"] -= sizes["alias"]
    return sizes


def matmul_flop_rate(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measure this machine's float32 matrix-multiply rate in FLOP/s.

    A ``(size, size) @ (size, size)`` product costs ``2 * size**3`` FLOPs.
    The rate uses the fastest of ``repeats`` calls, the one least slowed
    down by other processes.
    """
    keys = jax.random.split(jax.random.key(0), 2)
    left = jax.random.normal(keys[0], (size, size), jnp.float32)
    right = jax.random.normal(keys[1], (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    timing = time_call(lambda: product(left, right), repeats=repeats)
    return {
        "size": size,
        "flop_per_s": 2 * size**3 / timing["min_s"],
        **timing,
    }


def entry_kernels(compiled: jax.stages.Compiled) -> dict[str, dict[str, Any]]:
    """Describe each kernel of the entry computation of XLA's optimised HLO.

    Returns, per instruction name (the name a profile shows for the
    kernel), its output ``shape``, the set of HLO ``ops`` inside it (inside
    its fused computation, for a fusion) and the ranks of its ``dot``
    outputs.
    """
    text = compiled.as_text()
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^%?([\w.\-]+) \(.*\{$", line)
        if header:
            current = header.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    kernels = {}
    entry = text.split("\nENTRY ", 1)[-1]
    for line in entry.splitlines():
        match = re.match(
            r"\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(", line
        )
        if match is None or match.group(3) == "parameter":
            continue
        name, shape, op = match.groups()
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = "\n".join(bodies.get(called.group(1), [])) if called else line
        ops = set(re.findall(r"= \S+ ([\w\-]+)\(", body)) | {op}
        dot_shapes = re.findall(r"= (\w+\[[\d,]*\])\S* dot\(", body)
        kernels[name] = {
            "shape": shape,
            "ops": ops,
            "dot_ranks": [shape.count(",") + 1 for shape in dot_shapes],
        }
    return kernels


def kernel_seconds(
    call: Callable[[], Any], names: set[str], repeats: int = 5
) -> dict[str, float]:
    """Profile ``repeats`` calls and return seconds per call for each kernel.

    Uses ``jax.profiler``: every trace event whose name is in ``names`` (the
    kernel names of :func:`entry_kernels`) is summed over the calls. On the
    CPU, XLA may run independent kernels at the same time, so the sum can
    exceed the wall-clock time.
    """
    block(call())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(repeats):
                block(call())
        (path,) = Path(directory).glob("**/*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(path))
    seconds: dict[str, float] = {}
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    total = seconds.get(event.name, 0.0) + event.duration_ns * 1e-9
                    seconds[event.name] = total
    return {name: total / repeats for name, total in seconds.items()}


if __name__ == "__main__":
    import json

    print(json.dumps(machine_description(), indent=2))
