"""The batch filter's score over the rows of a built index: what `POST /v1/flag` answers.

Same definition as `filtering.Scorer` (AGG over behaviours of the student cosine, minus the same
AGG over reference examples), applied to the pool vectors stored in the FAISS index instead of a
dataset embedded on the fly, so the API and `influcoder filter` agree on every score.
- Flat index (exact): every stored vector is scored, in blocks; `exact: true`.
- Other kinds (HNSW, IVF): candidates come from approximate searches (each behaviour's top
  `filter.service_candidates`, plus the mean behaviour direction and, with a reference set, the
  mean behaviour − mean reference direction, which is exactly the `mean` score's ranking), then
  the candidates' stored vectors are scored exactly; `exact: false` (a row no search returned is
  missed). IVF-SQ vectors are decoded from 8-bit codes, so their cosines are approximate too.
"""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from .filtering import Scorer

BLOCK = 32768
_direct_map_lock = threading.Lock()


def _flat_blocks(index: faiss.Index):
    """(fids, vectors) blocks of an IDMap2-wrapped flat index, in storage order."""
    inner = faiss.downcast_index(index.index)
    fids = faiss.vector_to_array(index.id_map).astype(np.int64)
    for s in range(0, index.ntotal, BLOCK):
        e = min(s + BLOCK, index.ntotal)
        yield fids[s:e], inner.reconstruct_n(s, e - s)


def _vectors(index: faiss.Index, fids: np.ndarray) -> np.ndarray:
    """Stored vectors by fid; IVF indexes get a hash-table direct map (once) to allow it."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        with _direct_map_lock:
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # our fids are not 0..n-1
    return index.reconstruct_batch(np.ascontiguousarray(fids, np.int64))


def _select(parts: dict[str, np.ndarray], fids: np.ndarray, k: int, threshold: float | None) -> tuple[dict, np.ndarray]:
    """The k best rows by score (ties by fid), at or above `threshold` when given."""
    s = parts["score"].astype(np.float64)
    keep = np.nonzero(s >= threshold)[0] if threshold is not None else np.arange(len(s))
    order = keep[np.lexsort((fids[keep], -s[keep]))][:k]
    return {key: v[order] for key, v in parts.items()}, fids[order]


def flag_index(engine, B: np.ndarray, R: np.ndarray | None, k: int = 100, aggregate: str | None = None,
               top_m: int | None = None, threshold: float | None = None) -> dict[str, Any]:
    """The k index rows with the highest filter score against behaviour rows B (query prompt) and
    reference rows R. Defaults come from the index's run config (`filter.*`)."""
    fc = engine.cfg.filter
    scorer = Scorer(np.asarray(B, np.float32), None if R is None or not len(R) else np.asarray(R, np.float32),
                    aggregate or fc.aggregate, top_m or fc.top_m, fc.top_behaviours)
    index = engine.version.index
    exact = engine.manifest["factory"] == "Flat" and isinstance(index, faiss.IndexIDMap2)
    n_above: int | None = 0 if threshold is not None and exact else None
    if exact:
        best: dict[str, np.ndarray] | None = None
        best_f = np.zeros(0, np.int64)
        for f, X in _flat_blocks(index):
            p = scorer.score(X)
            if n_above is not None:
                n_above += int((p["score"].astype(np.float64) >= threshold).sum())
            p, f = _select(p, f, k, threshold)
            if best is not None:
                p = {key: np.concatenate([best[key], p[key]]) for key in p}
                f = np.concatenate([best_f, f])
                p, f = _select(p, f, k, None)
            best, best_f = p, f
        parts, fids = best or scorer.score(np.zeros((0, B.shape[1]), np.float32)), best_f
    else:
        dirs = [scorer.B, scorer.B.mean(0, keepdims=True)]
        if scorer.R is not None:
            dirs.append(scorer.B.mean(0, keepdims=True) - scorer.R.mean(0, keepdims=True))
        _, I = engine.search(np.vstack(dirs), max(k, fc.service_candidates))
        cand = np.unique(I[I >= 0])
        parts, fids = _select(scorer.score(_vectors(index, cand)), cand, k, threshold)
    rows = engine._rows(fids)
    ok = rows >= 0  # a fid always has a row; guard anyway so the lists stay aligned
    hits = engine._hits(parts["score"][ok], fids[ok])
    for h, beh, ref, ti, tv in zip(hits, parts["behaviour"][ok], parts["reference"][ok], parts["top_idx"][ok], parts["top_val"][ok]):
        h["behaviour_score"] = round(float(beh), 6)
        if scorer.R is not None:
            h["reference_score"] = round(float(ref), 6)
        h["top_behaviours"] = [{"example": int(i), "score": round(float(v), 6)} for i, v in zip(ti, tv)]
    out: dict[str, Any] = {"results": hits, "aggregate": scorer.how, "top_m": scorer.top_m if scorer.how == "topm" else None,
                           "n_examples": int(len(B)), "n_reference": 0 if scorer.R is None else int(len(scorer.R)),
                           "threshold": threshold, "exact": exact, "scoring": "filter score: " + _SCORING_SHORT}
    if n_above is not None:
        out["n_at_or_above_threshold"] = n_above
    return out


_SCORING_SHORT = ("AGG over the behaviour examples of the student cosine (query prompt) to the training example (document prompt), "
                  "minus the same AGG over the reference examples; higher = more like the behaviour")
