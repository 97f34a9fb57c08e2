"""Teacher rankings: cosine of anchors' and pool's stored gradients, anchors × pool.

Anchors are a sample of the pool itself (taken out of the teacher's pool, so no row is scored
against itself) plus every query set the config names. Anchors and pool are each split into a
training and a held-out part; the student trains on train × train and is judged on eval × eval,
a block it never saw. The split is recorded in the store.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .config import Config
from .gradient_job import default_store_path
from .store import GradStore, StoreMismatch, check_compatible
from .teacher_score import ScoreTransform, raw_rows

TEACHER_VERSION = 1
TRANSFORM_FILE = "score_transform.npz"


def teacher_path(cfg: Config) -> Path:
    return cfg.run_dir / "teacher.zarr"


def fit_transform(cfg: Config, pool: GradStore) -> ScoreTransform:
    """The configured teacher score, fitted on (a seeded sample of) the pool's raw gradients."""
    t = cfg.teacher
    if t.score == "cosine":
        return ScoreTransform("cosine")
    rows = np.arange(pool.n)
    if pool.n > t.score_sample:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(pool.n, t.score_sample, replace=False))
    return ScoreTransform.fit(t.score, raw_rows(pool, rows), t.score_damping)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _split(n: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean eval mask with round(frac·n) held out (at least one each side when n ≥ 2)."""
    k = int(round(frac * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:k]] = True
    return mask


def _strings(g: zarr.Group, name: str, values) -> None:
    """A variable-length UTF-8 array (the string type zarr v3 specifies)."""
    arr = g.create_array(name, shape=(len(values),), chunks=(max(len(values), 1),), dtype=str)
    if len(values):
        arr[:] = np.asarray(values, dtype=object).astype(str)


def _check_preconditioners(pool: dict, queries: dict) -> None:
    p, q = pool.get("preconditioner", {}), queries.get("preconditioner", {})
    if p.get("kind") != q.get("kind") or (p.get("kind") == "second_moment" and p.get("sha256") != q.get("sha256")):
        raise StoreMismatch(f"pool and query gradients used different preconditioners: {p} vs {q}")


@dataclass
class TeacherSummary:
    path: str
    n_anchors: int
    n_pool: int
    n_eval_anchors: int
    n_eval_pool: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def build_teacher(cfg: Config, out: str | Path | None = None, chunk_rows: int = 4096) -> TeacherSummary:
    pool = GradStore.open(default_store_path(cfg, "pool"))
    pool.require_complete()
    t = cfg.teacher
    rng = np.random.default_rng(cfg.seed)
    n = pool.n
    n_data = min(t.n_anchors, n // 2)
    data_anchor = np.sort(rng.choice(n, size=n_data, replace=False)) if n_data else np.zeros(0, int)
    pool_rows = np.setdiff1d(np.arange(n), data_anchor)
    pool_ids = np.asarray(pool.ids(), dtype=object)

    tf = fit_transform(cfg, pool)
    anchors = [raw_rows(pool, data_anchor)] if n_data else []
    anchor_ids = list(pool_ids[data_anchor])
    source = ["pool"] * n_data
    qpath = default_store_path(cfg, "queries")
    queries_manifest = None
    if cfg.data.queries:
        if not Path(qpath).exists():
            raise FileNotFoundError(f"{qpath}: no query gradients; run `influcoder gradients CONFIG --split queries` first")
        q = GradStore.open(qpath)
        q.require_complete()
        check_compatible(pool.manifest, q.manifest, what="pool and query gradient stores")
        _check_preconditioners(pool.manifest, q.manifest)
        anchors.append(raw_rows(q))
        anchor_ids += q.ids()
        source += ["queries"] * q.n
        queries_manifest = q.manifest
    if not anchor_ids:
        raise ValueError("no anchors: set teacher.n_anchors > 0 or name query sets in data.queries")
    A = tf.query(np.concatenate(anchors))  # (n_anchors, d) unit rows

    final = Path(out) if out else teacher_path(cfg)
    tmp = final.with_name(final.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w")
    na, npool = len(A), len(pool_rows)
    scores = g.create_array("scores", shape=(na, npool), chunks=(min(na, 256), min(npool, chunk_rows)), dtype="float16")
    full = np.empty((na, npool), np.float32)
    for start in range(0, npool, chunk_rows):
        rows = pool_rows[start:start + chunk_rows]
        block = tf.pool(raw_rows(pool, rows))
        full[:, start:start + len(rows)] = A @ block.T
    scores[:] = full.astype(np.float16)
    k = min(t.topk, npool)
    top = np.argsort(-full, axis=1, kind="stable")[:, :k]
    g.create_array("topk_index", data=top.astype(np.int32))
    g.create_array("topk_score", data=np.take_along_axis(full, top, 1).astype(np.float16))
    _strings(g, "anchor_ids", anchor_ids)
    _strings(g, "pool_ids", list(pool_ids[pool_rows]))
    g.create_array("pool_rows", data=pool_rows.astype(np.int64))
    _strings(g, "anchor_source", source)
    g.create_array("anchor_eval", data=_split(na, t.eval_fraction, rng))
    g.create_array("pool_eval", data=_split(npool, t.eval_fraction, rng))
    g.attrs["manifest"] = {
        "teacher_version": TEACHER_VERSION, "score": tf.kind, "score_damping": tf.damping,
        "score_note": "cosine of stored (sketched, preconditioned) gradients after the score's correction",
        "gradients": {k: pool.manifest[k] for k in ("model", "loss", "sketch", "preconditioner", "a_gradients")},
        "pool_store": str(pool.path), "pool_fingerprint": pool.manifest["dataset"]["fingerprint"],
        "queries_fingerprint": queries_manifest["dataset"]["fingerprint"] if queries_manifest else None,
        "n_anchors": na, "n_anchors_from_pool": n_data, "n_pool": npool, "topk": k, "seed": cfg.seed,
        "eval_fraction": t.eval_fraction, "influcoder_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tf.save(tmp / TRANSFORM_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    tch = Teacher.open(final)
    return TeacherSummary(str(final), na, npool, int(tch.anchor_eval.sum()), int(tch.pool_eval.sum()))


class Teacher:
    """Read side of teacher.zarr."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        self.anchor_ids = [str(x) for x in group["anchor_ids"][:]]
        self.pool_ids = [str(x) for x in group["pool_ids"][:]]
        self.anchor_eval = group["anchor_eval"][:]
        self.pool_eval = group["pool_eval"][:]
        self.anchor_source = [str(x) for x in group["anchor_source"][:]]

    @classmethod
    def open(cls, path: str | Path) -> "Teacher":
        g = zarr.open_group(str(path), mode="r")
        if g.attrs.get("manifest", {}).get("teacher_version") != TEACHER_VERSION:
            raise StoreMismatch(f"{path}: not a teacher store of version {TEACHER_VERSION}")
        return cls(g, str(path))

    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["manifest"])

    def scores(self) -> np.ndarray:
        """(anchors, pool) float32."""
        return self.group["scores"][:].astype(np.float32)

    def block(self, eval_anchors: bool, eval_pool: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (a, p), anchor indices, pool indices) of the train or held-out block."""
        a = np.flatnonzero(self.anchor_eval == eval_anchors)
        p = np.flatnonzero(self.pool_eval == eval_pool)
        return self.scores()[np.ix_(a, p)], a, p
