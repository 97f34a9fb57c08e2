"""Streamed BM25 (`lexical.Bm25`) against the bm25s library holding the whole corpus, and
reciprocal-rank fusion and reference aggregation by hand."""

import random

import numpy as np
import pytest

from influcoder.lexical import Bm25, bm25_scores
from influcoder.metrics import fuse_references, rrf


def bm25s_reference(queries: list[str], docs: list[str]) -> np.ndarray:
    """The slow obvious path: bm25s indexes every doc at once; per query, scores / max; mean over queries."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, show_progress=False), show_progress=False)
    total = np.zeros(len(docs))
    for q in bm25s.tokenize(queries, show_progress=False, return_ids=False):
        s = retriever.get_scores(q)
        total += s / s.max() if s.max() > 0 else s
    return total / len(queries)


def streamed(queries: list[str], docs: list[str], chunk: int) -> np.ndarray:
    bm = Bm25(queries)
    parts = [bm.count(docs[i:i + chunk]) for i in range(0, len(docs), chunk)]
    return bm.scores(len(parts), lambda k, key: parts[k][key])


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_streamed_bm25_equals_bm25s_on_the_whole_corpus(chunk):
    rng = random.Random(0)
    words = "the cat dog idiot stupid moron apple pie math add sum total is a of question brain Café ZAP".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(61)]
    docs[3], docs[5] = "", "the of a is"  # an empty row and a stopword-only row (length 0)
    queries = ["Stupid idiot question!", "add the sum sum", "moron brain pie apple idiot", "zap café"]
    ref = bm25s_reference(queries, docs)
    got = streamed(queries, docs, chunk)
    assert got.shape == (len(docs),) and ref.max() > 0
    assert np.allclose(got, ref, atol=1e-6), np.abs(got - ref).max()  # bm25s keeps float32
    if chunk == 1000:  # per query (what eval planted aggregates): each row scaled by its best document, their mean is the score
        per = bm25_scores(queries, docs, per_query=True)
        assert per.shape == (len(queries), len(docs)) and np.allclose(per.max(1), 1.0)
        assert np.allclose(per.mean(0), got)


def test_queries_with_no_known_terms_score_zero():
    assert np.array_equal(streamed(["the of", "zebra"], ["a cat", "a dog sat"], 1), [0.0, 0.0])


def test_rrf_by_hand():
    a, b = np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0])  # ranks a: 1,2,3; b: 3,1,2
    assert np.allclose(rrf(a, b, k=1), [1 / 2 + 1 / 4, 1 / 3 + 1 / 2, 1 / 4 + 1 / 3])


def test_rrf_gives_ties_their_mean_rank():
    a = np.array([5.0, 1.0, 1.0, 0.0])  # ranks 1, 2.5, 2.5, 4 whatever the row order
    assert np.allclose(rrf(a, k=0), [1, 1 / 2.5, 1 / 2.5, 1 / 4])


def test_reference_fusion_by_hand():
    S = np.array([[0.9, 0.1, 0.5],    # reference 0 ranks rows 0, 2, 1
                  [0.0, 0.3, 0.2]])   # reference 1 (a far smaller scale) ranks rows 1, 2, 0
    assert np.allclose(fuse_references(S, "mean"), [0.45, 0.2, 0.35])
    k = 2
    want = [(1 / (k + 1) + 1 / (k + 3)) / 2, (1 / (k + 3) + 1 / (k + 1)) / 2, (1 / (k + 2) + 1 / (k + 2)) / 2]
    assert np.allclose(fuse_references(S, "rrf", k), want)
    # the mean follows reference 0's scale (row 0 first); rank fusion gives both references one vote each (rows 0 and 1 tie)
    assert np.argmax(fuse_references(S, "mean")) == 0 and np.isclose(want[0], want[1])
    with pytest.raises(ValueError, match="mean or rrf"):
        fuse_references(S, "max")
    with pytest.raises(ValueError, match="shape"):
        fuse_references(S[0], "mean")
