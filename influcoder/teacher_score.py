"""How the teacher turns stored gradients into scores: cosine after optional corrections.

- `centre`: subtract the pool's mean gradient from both sides. The sketch is linear, so
  centring sketched gradients is exactly the sketch of centred gradients.
- `fisher` (query side, as in influence functions / LoGra / TRAK): q ← (F + λI)⁻¹ q with
  F = Uᵀ U / n the empirical Fisher of the pool's *unit* gradients (uncentred: the second moment,
  which is what the Fisher is), so directions that every training example shares, such as the
  reply format, are down-weighted. Unit rows first: it is the geometry the cosine lives in, and
  raw norms would let a few high-loss examples set F. F has rank ≤ n, so the inverse is exact
  from a thin SVD of U: (F + λI)⁻¹ q = (q − V diag(s²/(s² + nλ)) Vᵀ q) / λ. Measured on the
  planted benchmark (README Results), this lifted every seed over plain cosine; the earlier
  version (centred raw gradients) did not.
- Checkpoint sums (TracIn / LESS): Σ_c η_c · score_c / Σ_c η_c over saved checkpoints, η_c the
  learning rate of the stretch of training each checkpoint closes.

The fitted statistics are a pure function of the pool store and the settings; they are saved
with a version that is checked on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRANSFORM_VERSION = 2  # 2: fisher on unit, uncentred gradients
SCORES = ("cosine", "centred", "fisher")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@dataclass
class ScoreTransform:
    kind: str  # cosine | centred | fisher
    mean: np.ndarray | None = None  # (d,) mean raw pool gradient (centred)
    basis: np.ndarray | None = None  # (r, d) right singular vectors of the unit pool rows (fisher)
    shrink: np.ndarray | None = None  # (r,) s² / (s² + nλ) (fisher)
    damping: float = 0.0  # λ, absolute

    @classmethod
    def fit(cls, kind: str, pool_raw: np.ndarray, damping: float = 1.0) -> "ScoreTransform":
        """pool_raw (n, d): unnormalised sketched pool gradients. `damping` is relative: λ =
        damping · (mean non-zero eigenvalue of F)."""
        if kind not in SCORES:
            raise ValueError(f"teacher score {kind!r}: choose from {SCORES}")
        if kind == "cosine":
            return cls(kind)
        X = np.asarray(pool_raw, np.float64)
        if kind == "centred":
            return cls(kind, mean=X.mean(0).astype(np.float32))
        U = unit(X).astype(np.float64)  # (n, d)
        n = len(U)
        _, s, vt = np.linalg.svd(U, full_matrices=False)  # U = W diag(s) Vᵀ, F = V diag(s²/n) Vᵀ
        keep = s > s.max() * 1e-6 if len(s) else s > 0
        s, vt = s[keep], vt[keep]
        lam = damping * float((s ** 2).sum() / n / max(len(s), 1))
        lam = max(lam, 1e-30)
        return cls(kind, None, vt.astype(np.float32), (s ** 2 / (s ** 2 + n * lam)).astype(np.float32), lam)

    def pool(self, raw: np.ndarray) -> np.ndarray:
        """(m, d) raw pool gradients -> unit rows the queries are compared with."""
        x = np.asarray(raw, np.float32)
        if self.mean is not None:
            x = x - self.mean
        return unit(x)

    def query(self, raw: np.ndarray) -> np.ndarray:
        """(m, d) raw query (anchor) gradients -> unit rows."""
        x = np.asarray(raw, np.float32)
        if self.mean is not None:
            x = x - self.mean
        if self.kind == "fisher":
            x = unit(x)
            x = x - ((x @ self.basis.T) * self.shrink) @ self.basis  # λ·(F+λI)⁻¹x; the scale drops in the cosine
        return unit(x)

    def scores(self, query_raw: np.ndarray, pool_raw: np.ndarray) -> np.ndarray:
        """(queries, pool) corrected cosines."""
        return self.query(query_raw) @ self.pool(pool_raw).T

    def save(self, path: str | Path) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".part.npz")
        arrays = {k: v for k, v in (("mean", self.mean), ("basis", self.basis), ("shrink", self.shrink)) if v is not None}
        np.savez(tmp, version=TRANSFORM_VERSION, kind=self.kind, damping=self.damping, **arrays)
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> "ScoreTransform":
        with np.load(path, allow_pickle=False) as z:
            version, kind = int(z["version"]), str(z["kind"])
            if version != TRANSFORM_VERSION and not (version == 1 and kind in ("cosine", "centred")):  # v2 changed fisher only
                raise ValueError(f"{path}: score transform version {version} ({kind}), this influcoder reads {TRANSFORM_VERSION}; "
                                 "rebuild the teacher (`influcoder teacher CONFIG`)")
            return cls(str(z["kind"]), *(z[k] if k in z else None for k in ("mean", "basis", "shrink")), float(z["damping"]))


def raw_rows(store, rows=slice(None)) -> np.ndarray:
    """Unnormalised sketched gradients of a GradStore (unit rows × stored norms)."""
    if isinstance(rows, slice):
        g, nrm = store.group["grads"][rows], store.group["norm"][rows]
    else:
        g = store.group["grads"].get_orthogonal_selection((np.asarray(rows), slice(None)))
        nrm = store.group["norm"].get_orthogonal_selection((np.asarray(rows),))
    return g.astype(np.float32) * nrm.astype(np.float32)[:, None]


def checkpoint_sum(scores: list[np.ndarray], lrs: list[float]) -> np.ndarray:
    """Σ_c η_c · scores_c / Σ_c η_c (the TracIn/LESS sum over checkpoints)."""
    if len(scores) != len(lrs) or not scores:
        raise ValueError(f"{len(scores)} score matrices for {len(lrs)} learning rates")
    w = np.asarray(lrs, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"checkpoint learning rates must be ≥ 0 with a positive sum, got {lrs}")
    return sum(float(wi) * np.asarray(s, np.float64) for wi, s in zip(w, scores)).astype(np.float32) / float(w.sum())
