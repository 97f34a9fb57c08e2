import json
import shutil

import faiss
import numpy as np
import pytest

from influcoder.engine import Engine, InputError, RerankUnavailable
from influcoder.index_build import build_index

QUERIES = ["You are an idiot, look it up yourself.", "How long should I boil an egg?", "What is compound interest?",
           "Roll soft clothes to save space in a suitcase."]


@pytest.fixture(scope="module")
def cfg(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def engine(cfg, tmp_path_factory):
    return Engine.load(build_index(cfg, out=tmp_path_factory.mktemp("engine") / "tiny"))


@pytest.fixture(scope="module")
def brute(cfg):
    """Student embeddings of the pool (document prompt) computed directly: (ids, P (n, dim), model)."""
    from sentence_transformers import SentenceTransformer

    from influcoder.data import load_records
    from influcoder.distill import encoder_path

    model = SentenceTransformer(str(encoder_path(cfg)), device="cpu")
    pool = load_records(cfg.data)[0]
    P = model.encode([r.as_text() for r in pool], prompt=cfg.student.document_prompt, normalize_embeddings=True)
    return [r.id for r in pool], P, model


def _brute_top(brute, cfg, texts, k):
    ids, P, model = brute
    Q = model.encode(texts, prompt=cfg.student.query_prompt, normalize_embeddings=True)
    S = Q @ P.T  # (queries, pool) cosine
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order], np.take_along_axis(S, order, 1)


def test_engine_equals_brute_force_cosine(cfg, engine, brute):
    answers = engine.attribute([{"text": t} for t in QUERIES], k=10)
    want_ids, want_scores = _brute_top(brute, cfg, QUERIES, 10)
    for ans, ids, scores in zip(answers, want_ids, want_scores):
        assert [h["id"] for h in ans["results"]] == ids
        assert np.allclose([h["score"] for h in ans["results"]], scores, atol=1e-5)
        assert [h["rank"] for h in ans["results"]] == list(range(1, 11))
        assert ans["scores"] == "student cosine" and set(ans["results"][0]) >= {"id", "score", "rank", "preview", "metadata"}


def test_pairs_are_embedded_like_the_pool_and_bad_inputs_name_the_field(engine):
    pair = engine.attribute([{"prompt": "How do I boil an egg?", "response": "Simmer it."}], k=5)[0]
    text = engine.attribute([{"text": "How do I boil an egg?\nSimmer it."}], k=5)[0]
    assert pair["results"] == text["results"]
    for bad, field in [({"prompt": "x"}, "inputs.0.response"), ({"text": ""}, "inputs.0.text"),
                       ({"text": "a", "prompt": "b", "response": "c"}, "inputs.0.text"), ("text", "inputs.0")]:
        with pytest.raises(InputError) as e:
            engine.attribute([bad])
        assert e.value.field == field
    assert len(engine.attribute([{"text": "x"}], k=10_000)[0]["results"]) == engine.count  # k over the pool: all rows


def test_ood_signal_is_calibrated_on_the_distillation_anchors(cfg, engine):
    from influcoder.fidelity import texts_by_id
    from influcoder.teacher import Teacher, teacher_path

    ref = engine.ood_ref
    assert len(ref) == 88
    assert engine.ood(-1.0)["ood"] is True and engine.ood(-1.0)["ood_percentile"] == 0 and "note" in engine.ood(-1.0)
    assert engine.ood(1.0) == {"ood": False, "ood_percentile": 100.0, "top1_score": 1.0}
    # A query-set anchor (not a pool row) asked again lands where its own top-1 sits in the reference.
    t = Teacher.open(teacher_path(cfg))
    q_ids = [a for a, s in zip(t.anchor_ids, t.anchor_source) if s == "queries"]
    texts = texts_by_id(cfg)
    answers = engine.attribute([{"text": texts[a]} for a in q_ids], k=1)
    tops = np.array([a["top1_score"] for a in answers])
    pct = np.array([a["ood_percentile"] for a in answers])
    assert np.all(np.diff(pct[np.argsort(tops)]) >= 0)  # monotone in the best-match score
    assert np.mean([a["ood"] for a in answers]) < 0.25  # the distillation queries are mostly in-distribution


def test_rerank_equals_the_exact_teacher_score(cfg, engine):
    """The re-rank scores equal the teacher's score (the default `fisher` correction, as teacher.zarr
    saved it) of the stored query gradient against the stored pool gradients."""
    from influcoder.data import load_split
    from influcoder.gradient_job import default_store_path
    from influcoder.store import GradStore
    from influcoder.teacher import TRANSFORM_FILE, teacher_path
    from influcoder.teacher_score import ScoreTransform, raw_rows

    qrecs = load_split(cfg.data, "queries")[0][:3]
    inputs = [{"prompt": r.prompt, "response": r.response} if r.is_pair else {"text": r.text} for r in qrecs]
    plain = engine.attribute(inputs, k=20)
    answers = engine.attribute(inputs, k=20, rerank=True, rerank_k=20)
    pool, qstore = GradStore.open(default_store_path(cfg, "pool")), GradStore.open(default_store_path(cfg, "queries"))
    prow = {x: i for i, x in enumerate(pool.ids())}
    qrow = {x: i for i, x in enumerate(qstore.ids())}
    tf = ScoreTransform.load(teacher_path(cfg) / TRANSFORM_FILE)
    assert tf.kind == cfg.teacher.score == "fisher"
    for rec, ans, before in zip(qrecs, answers, plain):
        assert ans["scores"] == "teacher gradient fisher (re-ranked)"
        assert {h["id"] for h in ans["results"]} == {h["id"] for h in before["results"]}  # same K′ candidates
        got = np.array([h["score"] for h in ans["results"]])
        want = tf.scores(raw_rows(qstore, [qrow[rec.id]]), raw_rows(pool, [prow[h["id"]] for h in ans["results"]]))[0]
        assert all(h["score_kind"] == "teacher" for h in ans["results"])
        assert np.allclose(got, want, atol=3e-3), np.abs(got - want).max()
        assert np.all(np.diff(got) <= 0) and [h["rank"] for h in ans["results"]] == list(range(1, 21))
        assert {h["id"]: h["student_score"] for h in ans["results"]} == {h["id"]: h["score"] for h in before["results"]}


def test_rerank_uses_the_teachers_score_correction(cfg, tmp_path):
    from influcoder.data import load_split
    from influcoder.engine import TeacherScorer
    from influcoder.gradient_job import default_store_path
    from influcoder.store import GradStore
    from influcoder.teacher import TRANSFORM_FILE, build_teacher, teacher_path
    from influcoder.teacher_score import ScoreTransform, raw_rows

    shutil.copytree(cfg.run_dir, tmp_path / cfg.name, ignore=shutil.ignore_patterns("index*"))
    c = cfg.model_copy(update={"out_dir": str(tmp_path), "teacher": cfg.teacher.model_copy(update={"score": "fisher"})})
    build_teacher(c)
    qrecs = load_split(c.data, "queries")[0][:2]
    pool, qstore = GradStore.open(default_store_path(c, "pool")), GradStore.open(default_store_path(c, "queries"))
    cands = pool.ids()[:15]
    got = TeacherScorer(c).scores(qrecs, [cands, cands])
    tf = ScoreTransform.load(teacher_path(c) / TRANSFORM_FILE)
    want = tf.scores(raw_rows(qstore, [qstore.ids().index(r.id) for r in qrecs]), raw_rows(pool, list(range(15))))
    plain = ScoreTransform("cosine").scores(raw_rows(qstore, [qstore.ids().index(r.id) for r in qrecs]), raw_rows(pool, list(range(15))))
    for i in range(2):
        g = np.array([got[i][x] for x in cands])
        assert np.allclose(g, want[i], atol=3e-3) and not np.allclose(g, plain[i], atol=3e-2)


def test_rerank_needs_the_gradient_store(engine, tmp_path):
    moved = Engine.load(engine.path, run_dir=tmp_path / "nowhere")
    with pytest.raises(RerankUnavailable):
        moved.attribute([{"text": "x"}], rerank=True)


def test_flag_scores_rows_by_similarity_to_the_behaviours(cfg, engine, brute):
    from influcoder.filter_index import flag_index

    ids, P, model = brute
    behaviours = ["Look it up yourself, idiot.", "Nobody with half a brain would ask that."]
    Q = model.encode(behaviours, prompt=cfg.student.query_prompt, normalize_embeddings=True)
    S = Q @ P.T  # (behaviours, pool)
    for agg, score in (("mean", S.mean(0)), ("max", S.max(0))):
        out = flag_index(engine, engine.embed_queries(behaviours), None, k=15, aggregate=agg)
        order = np.argsort(-score, kind="stable")[:15]
        assert [h["id"] for h in out["results"]] == [ids[j] for j in order], agg
        assert np.allclose([h["score"] for h in out["results"]], score[order], atol=1e-5)
        assert out["exact"] and out["n_examples"] == 2


def test_threads_are_pinned_and_the_index_is_memory_mapped(engine):
    import torch

    import threading

    assert faiss.omp_get_max_threads() == engine.cfg.index.faiss_threads == 1
    seen = []

    def other_thread():  # OpenMP settings are per thread: a server's worker threads must be pinned too
        faiss.omp_set_num_threads(2)  # what an unpinned worker thread has on a 2-core machine
        engine.attribute([{"text": "hello"}], k=3)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == [1]
    assert torch.get_num_threads() >= 1
    assert engine.version.read_mode.startswith("mmap")
    info = engine.info()
    assert "reference" not in info["ood"] and info["rerank_available"] is True


def test_referenced_encoder_is_checked_by_hash(cfg, tmp_path):
    ref_cfg = cfg.model_copy(deep=True)
    ref_cfg.index.copy_encoder = False
    d = build_index(ref_cfg, out=tmp_path / "ref")
    assert not (d / "encoder").exists()
    assert Engine.load(d).count == 192
    man = json.loads((d / "manifest.json").read_text())
    changed = tmp_path / "changed-encoder"
    shutil.copytree(man["encoder"]["path"], changed)
    (changed / "README.md").write_text("edited after the build")
    man["encoder"]["path"] = str(changed)
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="sha256"):
        Engine.load(d)


def test_saved_config_tolerates_unknown_keys_and_takes_overrides(engine):
    from influcoder.config import ConfigError
    from influcoder.index import run_config

    saved = json.loads(json.dumps(engine.manifest["run"]["config"]))
    saved["index"]["retired_knob"] = 3
    saved["gone_section"] = {"x": 1}
    cfg = run_config(saved, ["index.hnsw_ef_search=256", "service.max_batch=4"])
    assert cfg.index.hnsw_ef_search == 256 and cfg.service.max_batch == 4
    with pytest.raises(ConfigError, match="index.faiss_threads"):
        run_config(saved, ["index.faiss_threads=many"])
    e2 = Engine.load(engine.path, overrides=["index.rerank_k=7", "index.ood_percentile=50"])
    assert e2.cfg.index.rerank_k == 7 and e2.reload().cfg.index.ood_percentile == 50
