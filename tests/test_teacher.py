import numpy as np
import pytest

from influcoder.config import load_config
from influcoder.gradient_job import default_store_path, run_local
from influcoder.store import GradStore, StoreMismatch
from influcoder.teacher import Teacher, build_teacher


@pytest.fixture(scope="module")
def tiny_run(root, tmp_path_factory):
    # plain cosine here, compared with brute force below; the corrected scores have their own test
    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path_factory.mktemp('teacher')}", "teacher.score=cosine"])
    run_local(cfg, progress=False)
    run_local(cfg, "queries", progress=False)
    build_teacher(cfg)
    return cfg


def unit(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_teacher_equals_brute_force_cosine(tiny_run):
    cfg = tiny_run
    t = Teacher.open(cfg.run_dir / "teacher.zarr")
    pool, queries = GradStore.open(default_store_path(cfg, "pool")), GradStore.open(default_store_path(cfg, "queries"))
    vecs = dict(zip(pool.ids(), pool.grads())) | dict(zip(queries.ids(), queries.grads()))
    A = unit(np.stack([vecs[i] for i in t.anchor_ids]))
    P = unit(np.stack([vecs[i] for i in t.pool_ids]))
    brute = A @ P.T
    assert np.abs(t.scores() - brute).max() < 2e-3  # float16 storage
    top = t.group["topk_index"][:]
    assert (top[:, 0] == brute.argmax(1)).mean() > 0.95
    assert t.anchor_source.count("queries") == queries.n == 40
    assert t.anchor_source.count("pool") == 48


def test_splits_are_disjoint_and_anchors_leave_the_pool(tiny_run):
    t = Teacher.open(tiny_run.run_dir / "teacher.zarr")
    assert not set(t.anchor_ids) & set(t.pool_ids)  # no row is scored against itself
    assert len(set(t.pool_ids)) == len(t.pool_ids) == 192 - 48
    for mask in (t.anchor_eval, t.pool_eval):
        assert 0 < mask.sum() < len(mask)
    _, a_tr, p_tr = t.block(False, False)
    _, a_ev, p_ev = t.block(True, True)
    assert not set(a_tr) & set(a_ev) and not set(p_tr) & set(p_ev)
    assert len(a_tr) + len(a_ev) == len(t.anchor_ids) and len(p_tr) + len(p_ev) == len(t.pool_ids)
    m = t.manifest
    assert m["n_anchors"] == 88 and m["eval_fraction"] == 0.25 and m["gradients"]["sketch"]["kind"] == "countsketch"


def test_mismatched_query_store_is_refused(tiny_run, tmp_path):
    cfg = tiny_run
    other = load_config(None, [f"out_dir={tmp_path}"]).model_copy(update={"model": cfg.model, "data": cfg.data,
                                                                           "gradients": cfg.gradients.model_copy(update={"seed": 9})})
    run_local(other, "queries", out=tmp_path / "q.zarr", progress=False)
    import shutil

    shutil.copytree(cfg.run_dir / "grads.zarr", other.run_dir / "grads.zarr")
    shutil.copytree(tmp_path / "q.zarr", other.run_dir / "grads-queries.zarr")
    with pytest.raises(StoreMismatch, match="sketch.seed: 0 != 9"):
        build_teacher(other)


@pytest.mark.parametrize("score", ["centred", "fisher"])
def test_corrected_teacher_equals_brute_force(tiny_run, tmp_path, score):
    from influcoder.teacher import TRANSFORM_FILE
    from influcoder.teacher_score import ScoreTransform

    cfg = tiny_run.model_copy(update={"teacher": tiny_run.teacher.model_copy(update={"score": score})})
    build_teacher(cfg, out=tmp_path / "t.zarr")
    t = Teacher.open(tmp_path / "t.zarr")
    pool, queries = GradStore.open(default_store_path(cfg, "pool")), GradStore.open(default_store_path(cfg, "queries"))

    def raw(s):
        return s.grads().astype(np.float64) * s.group["norm"][:][:, None]

    vecs = dict(zip(pool.ids(), raw(pool))) | dict(zip(queries.ids(), raw(queries)))
    A = np.stack([vecs[i] for i in t.anchor_ids])
    P = np.stack([vecs[i] for i in t.pool_ids])
    if score == "centred":
        mu = raw(pool).mean(0)  # the statistics come from every pool row (anchors included)
        A, P = A - mu, P - mu
    else:
        U = unit(raw(pool)).astype(np.float64)
        F = U.T @ U / len(U)  # the empirical Fisher of the pool's unit gradients
        lam = ScoreTransform.load(tmp_path / "t.zarr" / TRANSFORM_FILE).damping
        A = np.linalg.solve(F + lam * np.eye(len(F)), unit(A).T).T
    brute = unit(A) @ unit(P).T
    assert np.abs(t.scores() - brute).max() < 5e-3  # float16 gradients and scores
    assert t.manifest["score"] == score


def test_checkpoint_sum_teacher_and_rerank_match_a_loop(root, tmp_path):
    """teacher.checkpoints: one store per saved checkpoint, the teacher (and the engine's exact
    re-rank) the learning-rate-weighted mean of the per-checkpoint cosines."""
    from influcoder.data import load_split
    from influcoder.engine import TeacherScorer
    from influcoder.finetune import finetune
    from influcoder.gradient_job import checkpoint_configs
    from influcoder.ray_jobs import run_job

    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "model.target=finetuned", "data.demo.n=64",
                                                       "finetune.checkpoints=2", "finetune.lr=3e-3", "teacher.checkpoints=[0,1]",
                                                       "teacher.n_anchors=8", "ray.num_workers=0", "teacher.score=cosine"])
    finetune(cfg, progress=False)
    run_job(cfg, "pool", progress=False)
    run_job(cfg, "queries", progress=False)
    parts = checkpoint_configs(cfg)
    assert [default_store_path(c, "pool").name for c, _ in parts] == ["grads-ckpt0.zarr", "grads-ckpt1.zarr"]
    build_teacher(cfg)
    t = Teacher.open(cfg.run_dir / "teacher.zarr")
    want = 0
    for c, w in parts:
        pool, q = GradStore.open(default_store_path(c, "pool")), GradStore.open(default_store_path(c, "queries"))
        vecs = dict(zip(pool.ids(), pool.grads())) | dict(zip(q.ids(), q.grads()))
        want = want + w * (unit(np.stack([vecs[i] for i in t.anchor_ids])) @ unit(np.stack([vecs[i] for i in t.pool_ids])).T)
    want /= sum(w for _, w in parts)
    assert np.abs(t.scores() - want).max() < 3e-3
    assert [s["checkpoint"] for s in t.manifest["sources"]] == [0, 1] and parts[0][1] > parts[1][1] > 0

    qrecs = load_split(cfg.data, "queries")[0][:2]
    rows = [t.anchor_ids.index(r.id) for r in qrecs]
    got = TeacherScorer(cfg).scores(qrecs, [t.pool_ids[:10]] * 2)
    for r, g in zip(rows, got):
        assert np.allclose([g[x] for x in t.pool_ids[:10]], want[r, :10], atol=3e-3)
    # One checkpoint picked ([-1]): the job writes that checkpoint's store, the one the teacher reads.
    one = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoints": [-1]})})
    (part, _), = checkpoint_configs(one)
    run_job(one, "pool", progress=False)
    assert default_store_path(part, "pool").name == "grads-ckpt1.zarr" and not (cfg.run_dir / "grads.zarr").exists()
    run_job(one, "queries", progress=False)
    build_teacher(one)
    assert [s["checkpoint"] for s in Teacher.open(cfg.run_dir / "teacher.zarr").manifest["sources"]] == [1]
