"""Ranking metrics for fidelity (student vs teacher) and retrieval (planted rows).

Score matrices are (anchors, pool): row a holds every pool item's score for anchor a.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def _row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)
    y = y - y.mean(1, keepdims=True)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    return np.divide((x * y).sum(1), den, out=np.zeros(len(x)), where=den > 0)


def per_anchor_spearman(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """ρ of each anchor's row (ties get average ranks, as in scipy.stats.spearmanr)."""
    t = rankdata(np.asarray(teacher, np.float64), axis=1)
    s = rankdata(np.asarray(student, np.float64), axis=1)
    return _row_pearson(t, s)


def mean_per_anchor_spearman(teacher: np.ndarray, student: np.ndarray) -> float:
    return float(per_anchor_spearman(teacher, student).mean())


def aggregated_spearman(teacher: np.ndarray, student: np.ndarray) -> float:
    """Average the score matrices over anchors first, then one ρ over the pool."""
    return float(spearmanr(np.asarray(teacher, np.float64).mean(0), np.asarray(student, np.float64).mean(0)).statistic)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, idx, 1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1)


def recall_at_k(teacher: np.ndarray, student: np.ndarray, k: int) -> float:
    """Mean share of the teacher's top-k that are in the student's top-k."""
    t, s = _topk(np.asarray(teacher, np.float64), k), _topk(np.asarray(student, np.float64), k)
    return float(np.mean([len(set(a) & set(b)) / t.shape[1] for a, b in zip(t, s)]))


def ndcg_at_k(teacher: np.ndarray, student: np.ndarray, k: int) -> float:
    """NDCG@k of the student's ranking with the teacher's scores, min-max scaled per anchor to
    [0, 1], as graded relevance."""
    t = np.asarray(teacher, np.float64)
    lo, hi = t.min(1, keepdims=True), t.max(1, keepdims=True)
    rel = np.divide(t - lo, hi - lo, out=np.zeros_like(t), where=(hi - lo) > 0)
    k = min(k, t.shape[1])
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    got = np.take_along_axis(rel, _topk(np.asarray(student, np.float64), k), 1) @ disc
    ideal = np.take_along_axis(rel, _topk(rel, k), 1) @ disc
    return float(np.mean(np.divide(got, ideal, out=np.zeros_like(got), where=ideal > 0)))


def fidelity(teacher: np.ndarray, student: np.ndarray, k: int = 10) -> dict[str, float]:
    return {
        "per_anchor_spearman": mean_per_anchor_spearman(teacher, student),
        "aggregated_spearman": aggregated_spearman(teacher, student),
        f"recall@{k}": recall_at_k(teacher, student, k),
        f"ndcg@{k}": ndcg_at_k(teacher, student, k),
    }


# --- planted-row retrieval --------------------------------------------------------------------

def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of a ranking (planted = positive): mean precision at each positive's rank."""
    labels = np.asarray(labels, bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = labels[order]
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(prec[hits].mean())


def precision_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
    return float(np.asarray(labels, bool)[order].mean())


def recall_of_planted_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    labels = np.asarray(labels, bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
    return float(labels[order].sum() / max(labels.sum(), 1))


def rrf(*scores: np.ndarray, k: int = 60) -> np.ndarray:
    """Reciprocal-rank fusion: Σ 1/(k + rank), rank 1 = highest score; tied scores share their mean rank."""
    from scipy.stats import rankdata

    total = np.zeros(len(scores[0]))
    for s in scores:
        total += 1.0 / (k + rankdata(-np.asarray(s, np.float64), method="average"))
    return total


def fuse_references(S: np.ndarray, how: str, k: int = 5) -> np.ndarray:
    """(pool,) one score per pool row from S (refs, pool), the scores to each reference: `mean`, or
    `rrf`, the mean over references of 1/(k + rank) with each reference ranking the pool itself, so
    every reference has an equal say at the top of the ranking whatever the scale of its scores."""
    S = np.asarray(S, np.float64)
    if S.ndim != 2 or not S.shape[0]:
        raise ValueError(f"need (references, pool) scores, got shape {S.shape}")
    if how == "mean":
        return S.mean(0)
    if how == "rrf":
        return rrf(*S, k=k) / len(S)
    raise ValueError(f"reference aggregation must be mean or rrf, got {how!r}")
