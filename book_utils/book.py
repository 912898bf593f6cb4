"""Helpers for the chapters themselves: glued numbers and the backend line."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

__all__ = ["describe_backend", "glue"]


def describe_backend() -> str:
    """Describe the JAX backend and devices this process runs on, in one line."""
    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    return (
        f"JAX {jax.__version__} on backend '{jax.default_backend()}' with "
        f"{len(devices)} device(s): {', '.join(kinds)}"
    )


def _plain(value: Any) -> Any:
    """Turn NumPy and JAX scalars into Python numbers.

    NumPy 2 prints a scalar as ``np.float32(0.5)``, which the book's
    ``{glue:text}`name:.3f``` role cannot format; a Python float prints as
    ``0.5``.
    """
    if isinstance(value, jax.Array | np.ndarray | np.generic) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, bool | numbers.Integral):
        return int(value) if not isinstance(value, bool) else value
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Store ``value`` under ``name`` for the book's prose and return it.

    In the book build this is ``myst_nb.glue``, and the prose inserts the
    value with ``{glue:text}`name```. Where myst_nb is not installed (a bare
    Colab runtime) nothing is stored, and the value is only returned.
    """
    value = _plain(value)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=display)
    return value
