"""Shared JAX and Flax NNX code for the book Contextual Embeddings from Scratch."""

from importlib.metadata import PackageNotFoundError, version

from book_utils.book import describe_backend

try:
    __version__ = version("book_utils")
except PackageNotFoundError:  # imported from a source tree without installing
    __version__ = "0+unknown"

__all__ = ["__version__", "describe_backend"]
