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
from .gradient_job import checkpoint_configs, default_store_path
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


def transform_file(k: int) -> str:
    """The k-th gradient source's fitted score correction inside teacher.zarr."""
    return TRANSFORM_FILE if k == 0 else f"score_transform-{k}.npz"


def _anchors(cfg: Config, pool: GradStore, data_anchor: np.ndarray) -> tuple[np.ndarray, list[str], dict | None]:
    """Raw anchor gradients of one source: sampled pool rows, then every query row; query ids; query manifest."""
    anchors = [raw_rows(pool, data_anchor)] if len(data_anchor) else []
    qids: list[str] = []
    qman = None
    if cfg.data.queries:
        qpath = default_store_path(cfg, "queries")
        if not Path(qpath).exists():
            raise FileNotFoundError(f"{qpath}: no query gradients; run `influcoder gradients CONFIG --split queries` first")
        q = GradStore.open(qpath)
        q.require_complete()
        check_compatible(pool.manifest, q.manifest, what="pool and query gradient stores")
        _check_preconditioners(pool.manifest, q.manifest)
        anchors.append(raw_rows(q))
        qids, qman = q.ids(), q.manifest
    if not anchors:
        raise ValueError("no anchors: set teacher.n_anchors > 0 or name query sets in data.queries")
    return np.concatenate(anchors), qids, qman


def build_teacher(cfg: Config, out: str | Path | None = None, chunk_rows: int = 4096,
                  sources: list[tuple[Config, float]] | None = None) -> TeacherSummary:
    """teacher.zarr from the gradient stores of `sources` ((config, weight) pairs; default one per
    teacher.checkpoints entry, else the run's own stores): Σ_s w_s · score_s / Σ_s w_s."""
    sources = sources or checkpoint_configs(cfg)
    first = GradStore.open(default_store_path(sources[0][0], "pool"))
    first.require_complete()
    t = cfg.teacher
    rng = np.random.default_rng(cfg.seed)
    n = first.n
    n_data = min(t.n_anchors, n // 2)
    data_anchor = np.sort(rng.choice(n, size=n_data, replace=False)) if n_data else np.zeros(0, int)
    pool_rows = np.setdiff1d(np.arange(n), data_anchor)
    pool_ids = np.asarray(first.ids(), dtype=object)
    weight = sum(w for _, w in sources)

    full = None
    transforms, described = [], []
    for scfg, w in sources:
        pool = GradStore.open(default_store_path(scfg, "pool"))
        pool.require_complete()
        if pool.ids() != first.ids():
            raise StoreMismatch(f"{pool.path} and {first.path} hold different examples; every checkpoint's store needs the same pool")
        tf = fit_transform(scfg, pool)
        raw, qids, qman = _anchors(scfg, pool, data_anchor)
        A = tf.query(raw)  # (n_anchors, d) unit rows
        if full is None:
            full = np.zeros((len(A), len(pool_rows)), np.float32)
            anchor_ids = list(pool_ids[data_anchor]) + qids
            source = ["pool"] * n_data + ["queries"] * len(qids)
            queries_manifest = qman
        elif len(A) != len(full):
            raise StoreMismatch(f"{default_store_path(scfg, 'queries')}: {len(A) - n_data} query rows, the first source has {len(full) - n_data}")
        for start in range(0, len(pool_rows), chunk_rows):
            rows = pool_rows[start:start + chunk_rows]
            full[:, start:start + len(rows)] += (w / weight) * (A @ tf.pool(raw_rows(pool, rows)).T)
        transforms.append(tf)
        described.append({"store": str(pool.path), "weight": w, "checkpoint": scfg.model.checkpoint,
                          "adapter": pool.manifest["model"].get("adapter")})

    final = Path(out) if out else teacher_path(cfg)
    tmp = final.with_name(final.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w")
    na, npool = full.shape
    scores = g.create_array("scores", shape=(na, npool), chunks=(min(na, 256), min(npool, chunk_rows)), dtype="float16")
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
        "teacher_version": TEACHER_VERSION, "score": transforms[0].kind, "score_damping": transforms[0].damping,
        "score_note": "cosine of stored (sketched, preconditioned) gradients after the score's correction; "
                      "with several sources (checkpoints) their learning-rate-weighted mean",
        "sources": described,
        "gradients": {k: first.manifest[k] for k in ("model", "loss", "sketch", "preconditioner", "a_gradients")},
        "pool_store": str(first.path), "pool_fingerprint": first.manifest["dataset"]["fingerprint"],
        "queries_fingerprint": queries_manifest["dataset"]["fingerprint"] if queries_manifest else None,
        "n_anchors": na, "n_anchors_from_pool": n_data, "n_pool": npool, "topk": k, "seed": cfg.seed,
        "eval_fraction": t.eval_fraction, "influcoder_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for i, tf in enumerate(transforms):
        tf.save(tmp / transform_file(i))
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
