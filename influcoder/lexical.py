"""BM25 of streamed dataset rows against behaviour examples, with exact whole-dataset statistics.

The filter's lexical half of `filter.fusion = bm25`, and the BM25 row of the planted benchmark and
the demo (`bm25_scores`, the same on texts in memory). Tokens come from
`bm25s.tokenize` (lower case, `\\w\\w+`, English stopwords removed), idf is Lucene's
ln(1 + (N − df + 0.5)/(df + 0.5)) and the term weight tf/(tf + k1·(1 − b + b·len/avglen)), k1 1.5,
b 0.75, summed over the query's tokens (repeats count). A dataset too big for memory arrives in
chunks, and idf and avglen need all of it, so the scoring pass keeps per row only the counts of the
behaviours' own terms (the only ones BM25 reads) and the row's length (`count`); the decision pass
adds up df and lengths over every chunk, then scores (`Bm25.scores`). Per behaviour the scores are
divided by their maximum over the dataset, then averaged over behaviours. Tested equal to `bm25s.BM25`
holding every row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

K1, B = 1.5, 0.75
TOKENS = "bm25s.tokenize(lower=True, stopwords='english'); Lucene BM25 k1=1.5 b=0.75; per-behaviour max-scaled, mean over behaviours"


def tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, return_ids=False, show_progress=False)


class Bm25:
    """BM25 against fixed query texts (the behaviour examples)."""

    def __init__(self, queries: list[str]):
        toks = tokenize(queries)
        self.vocab = {t: i for i, t in enumerate(sorted({t for q in toks for t in q}))}
        rows = [(qi, self.vocab[t]) for qi, q in enumerate(toks) for t in q]
        qi, ti = (np.array(x, np.int64) for x in zip(*rows)) if rows else (np.zeros(0, np.int64),) * 2
        # (m, V) query term multiplicities
        self.Q = sp.csr_matrix((np.ones(len(qi)), (qi, ti)), shape=(len(queries), len(self.vocab)))

    def count(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Per row: counts of the query vocabulary (CSR parts) and the token count; what `scores` needs."""
        indptr, indices, counts, lengths = [0], [], [], []
        for doc in tokenize(texts):
            ids = np.array([self.vocab[t] for t in doc if t in self.vocab], np.int64)
            u, c = np.unique(ids, return_counts=True)
            indices.append(u)
            counts.append(c)
            indptr.append(indptr[-1] + len(u))
            lengths.append(len(doc))
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        return {"lex_indptr": np.array(indptr, np.int64), "lex_indices": cat(indices, np.int32),
                "lex_counts": cat(counts, np.int32), "lex_length": np.array(lengths, np.int32)}

    def scores(self, n_chunks: int, load: Callable[[int, str], np.ndarray], per_query: bool = False) -> np.ndarray:
        """(rows,) the scaled mean BM25 over chunks 0..n_chunks-1, read with `load(k, key)`; with
        `per_query`, (rows, queries): each query's BM25 scaled by its best row, before the mean."""
        V = len(self.vocab)

        def tf(k: int) -> tuple[sp.csr_matrix, np.ndarray]:  # (rows, V) counts, (rows,) lengths
            length = load(k, "lex_length").astype(np.float64)
            c = sp.csr_matrix((load(k, "lex_counts").astype(np.float64), load(k, "lex_indices"), load(k, "lex_indptr")),
                              shape=(len(length), V))
            return c, length

        df, total, n = np.zeros(V), 0.0, 0
        for k in range(n_chunks):
            c, length = tf(k)
            df += np.bincount(c.indices, minlength=V)
            total += length.sum()
            n += len(length)
        if n == 0:
            return np.zeros((0, self.Q.shape[0])) if per_query else np.zeros(0)
        avg = total / n
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))  # (V,)

        def raw(k: int) -> np.ndarray:  # (c, m)
            c, length = tf(k)
            norm = K1 * (1 - B + B * np.repeat(length, np.diff(c.indptr)) / avg) if avg > 0 else np.full(c.nnz, K1)
            w = c.copy()
            w.data = c.data / (c.data + norm) * idf[c.indices]
            return np.asarray((w @ self.Q.T).todense())

        top = np.zeros(self.Q.shape[0])
        for k in range(n_chunks):
            top = np.maximum(top, raw(k).max(0, initial=0.0))
        scale = np.where(top > 0, top, 1.0)
        return np.concatenate([raw(k) / scale if per_query else (raw(k) / scale).mean(1) for k in range(n_chunks)])


def bm25_scores(queries: list[str], docs: list[str], per_query: bool = False) -> np.ndarray:
    """(docs,) the same score over texts in memory (one chunk); with `per_query`, (queries, docs)."""
    bm = Bm25(queries)
    counts = bm.count(docs)
    s = bm.scores(1, lambda k, key: counts[key], per_query)
    return s.T if per_query else s
