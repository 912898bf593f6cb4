"""Shared JAX and Flax NNX code for the book Contextual Embeddings from Scratch."""

from importlib.metadata import PackageNotFoundError, version

import jax

try:
    __version__ = version("book_utils")
except PackageNotFoundError:  # imported from a source tree without installing
    __version__ = "0+unknown"


def describe_backend() -> str:
    """Describe the JAX backend and devices this process runs on, in one line."""
    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    return (
        f"JAX {jax.__version__} on backend '{jax.default_backend()}' with "
        f"{len(devices)} device(s): {', '.join(kinds)}"
    )
