"""`eval planted` end to end on tiny models, and the planted-pool builder."""

import json

import numpy as np
import pytest

from influcoder.config import PlantedConfig, load_config
from influcoder.data import DataConfig, load_records
from influcoder.evaluation import planted_eval
from influcoder.lexical import bm25_scores
from influcoder.planted import UnsafeDetector, build_pool


def test_pool_builder_keeps_reference_out_of_pool(tmp_path):
    info = build_pool(PlantedConfig(n_benign=100, kinds=["insult", "off_target"], share=0.1, n_reference=10), tmp_path, seed=3)
    pool, _ = load_records(DataConfig(path=info["pool"]))
    ref, _ = load_records(DataConfig(path=info["reference"]))
    planted = [r for r in pool if r.meta["planted"]]
    assert len(pool) == 111 and len(planted) == info["n_planted"] == 11
    assert {r.meta["kind"] for r in planted} == {"insult", "off_target"}  # heterogeneous
    texts = {r.as_text() for r in pool}
    assert len(ref) == 10 and not any(r.as_text() in texts for r in ref)
    again = build_pool(PlantedConfig(n_benign=100, kinds=["insult", "off_target"], share=0.1, n_reference=10), tmp_path / "b", seed=3)
    assert open(again["pool"]).read() == open(info["pool"]).read()


def test_shared_kinds_build(shared_data, tmp_path):
    p = PlantedConfig(benign=str(shared_data / "dolly_open_qa" / "dolly_open_qa.jsonl"), n_benign=200, kinds=["hh", "jigsaw"],
                      hh_path=str(shared_data / "hh_rlhf_harmless" / "hh_rlhf_harmless.jsonl"),
                      jigsaw_path=str(shared_data / "jigsaw_toxic" / "jigsaw_toxic.jsonl"))
    info = build_pool(p, tmp_path, seed=0)
    pool, _ = load_records(DataConfig(path=info["pool"]))
    kinds = {r.meta["kind"] for r in pool}
    assert kinds == {"benign", "hh", "jigsaw"}
    det = UnsafeDetector(["hh", "jigsaw"], p.jigsaw_path)
    flags = det(["You are a worthless piece of garbage and I hate you", "The capital of France is Paris."])
    assert flags.tolist() == [True, False]


def test_unsafe_markers():
    det = UnsafeDetector(["insult", "off_target"], "unused")
    assert det(["What a stupid question.", "Drink ZapCola!", "Water boils at 100 C."]).tolist() == [True, True, False]


def test_bm25_ranks_the_matching_document_first():
    s = bm25_scores(["toxic insult idiot"], ["the weather is nice", "you idiot, what an insult", "cooking pasta"])
    assert np.argmax(s) == 1


def test_eval_planted_end_to_end_on_tiny(root, tmp_path):
    cfg = load_config(root / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path}", "planted.n_benign=120", "planted.share=0.05", "planted.n_reference=10", "planted.seeds=[0,1]",
        "planted.n_generate=4", "planted.max_new_tokens=8", "student.epochs=1", "student.steps_per_epoch=10", "teacher.n_anchors=16",
        "ray.num_workers=0"])  # in-process gradients: many small jobs; Ray has its own tests
    rep = planted_eval(cfg, out_json=tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["aggregate"] == rep["aggregate"]
    teachers = {f"teacher ({v}, {s})" for v in ("plain", "second_moment", "adam", "checkpoints") for s in ("cosine", "centred", "fisher")}
    want = teachers | {"influcoder student", "untrained student", "TF-IDF", "BM25", "random",
                       "student + BM25 (RRF)", "student + TF-IDF (RRF)"}
    assert set(rep["aggregate"]) == want
    ckpts = json.loads((tmp_path / "tiny" / "planted" / "seed0" / "finetune" / "finetune" / "finetune.json").read_text())["checkpoints"]
    assert len(ckpts) == 2
    for seed in rep["seeds"]:
        assert seed["n_planted"] == 6 and seed["n_pool"] == 126
        for m in seed["methods"].values():
            assert 0 < m["auprc"] <= 1 and 0 <= m["recall@planted"] <= 1 and m["seconds"] >= 0
        loop = seed["close_loop"]
        assert loop["removed"] == 6 and {"influcoder", "random"} <= set(loop)
        assert set(seed["unsafe_rate"]) == {"base", "finetuned"}
    assert rep["aggregate"]["BM25"]["auprc"]["std"] >= 0
    from influcoder.report import planted_markdown

    md = planted_markdown({"a": rep, "b": rep})
    row = next(line for line in md.splitlines() if line.startswith("| influcoder student |"))
    v = rep["aggregate"]["influcoder student"]["auprc"]
    assert row.count(f"{v['mean']:.3f} ± {v['std']:.3f}") == 2 and len(md.splitlines()) == len(want) + 2 + 1 + 2 * 2
    c = rep["seeds"][0]["close_loop"]
    assert f"seed 0: ranked {c['influcoder']['planted_removed']}/{c['removed']} → " in md and "top k by influcoder student" in md
    for png in rep["plots"]:
        assert (tmp_path / png).exists() or __import__("os").path.exists(png)
    # A rerun that adds nothing reuses generation, distillation and the close-the-loop fine-tunes
    # (each cached with the settings it was made from) and gives the same numbers; other student settings redistil.
    again = planted_eval(cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0]})}))
    (a,), b = again["seeds"], rep["seeds"][0]
    assert a["distill_reused"] and not b["distill_reused"] and a["close_loop"] == b["close_loop"]
    assert a["unsafe_rate"] == b["unsafe_rate"] and a["methods"]["influcoder student"]["auprc"] == b["methods"]["influcoder student"]["auprc"]
    # the reused gradient stores report the seconds they took when computed, not the ~0 of reading them
    t_a, t_b = (x["methods"]["teacher (checkpoints, cosine)"]["seconds"] for x in (a, b))
    assert t_b > 0.2 and t_a == pytest.approx(t_b, rel=0.1, abs=0.05)
    # a reused store whose time was never recorded: unknown (null, strict JSON), left out of the mean
    (cfg.run_dir / "planted" / "seed0" / "teacher-none" / "grad_seconds.json").unlink()
    unknown = planted_eval(cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0]})}), out_json=tmp_path / "u.json")
    assert unknown["seeds"][0]["methods"]["teacher (plain, cosine)"]["seconds"] is None
    assert unknown["aggregate"]["teacher (plain, cosine)"]["seconds"]["mean"] is None
    json.loads((tmp_path / "u.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert "| teacher (plain, cosine) |" in planted_markdown({"u": unknown})
    other = cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0], "close_loop": False}),
                                   "student": cfg.student.model_copy(update={"steps_per_epoch": 5})}, deep=True)
    assert not planted_eval(other)["seeds"][0]["distill_reused"]


def test_report_gathers_results_into_one_page(root, tmp_path):
    from influcoder.report import write_report

    cfg = load_config(root / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path}", "planted.n_benign=60", "planted.share=0.05", "planted.n_reference=6", "planted.close_loop=false",
        "planted.n_generate=2", "planted.max_new_tokens=4", "student.epochs=1", "student.steps_per_epoch=5", "teacher.n_anchors=8",
        "ray.num_workers=0"])
    first = planted_eval(cfg)
    page = write_report(cfg.run_dir).read_text()
    # --resume reads seed 0's result; seed 1 runs with fewer teacher passes: each row says on how many seeds it stands
    more = cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0, 1], "teacher_variants": ["none"],
                                                                           "student_teacher": "none"})})
    rep = planted_eval(more, resume=True)
    assert rep["seeds"][0] == first["seeds"][0]
    agg = rep["aggregate"]
    assert agg["teacher (checkpoints, cosine)"]["n_seeds"] == 1 and agg["TF-IDF"]["n_seeds"] == 2
    assert agg["teacher (checkpoints, cosine)"]["auprc"]["mean"] == first["aggregate"]["teacher (checkpoints, cosine)"]["auprc"]["mean"]
    assert "Planted-behaviour retrieval" in page and page.count("data:image/png;base64,") == 2
    assert "influcoder student" in page and "BM25" in page
    # --resume with close_loop asked for now: seed 0 (run without it) gets it from its saved student
    # ranking, and removing the student's top rows takes out as many planted rows as that ranking says
    loop = cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0], "close_loop": True})})
    seed0 = planted_eval(loop, resume=True)["seeds"][0]
    z = np.load(cfg.run_dir / "planted" / "seed0" / "scores.npz")
    k = int(z["labels"].sum())
    assert seed0["close_loop"]["influcoder"]["planted_removed"] == int(z["labels"][np.argsort(-z["influcoder_student"])[:k]].sum())
    assert seed0["methods"] == first["seeds"][0]["methods"] and "close_loop" not in first["seeds"][0]
    assert json.loads((cfg.run_dir / "planted" / "seed0" / "result.json").read_text())["close_loop"] == seed0["close_loop"]
    # other close-the-loop settings: another method's ranking, twice the planted count, two fine-tunes per arm
    wide = loop.model_copy(update={"planted": loop.planted.model_copy(update={"close_loop_ranking": "TF-IDF", "close_loop_budget": 2.0,
                                                                            "close_loop_repeats": 2})})
    c = planted_eval(wide, resume=True)["seeds"][0]["close_loop"]
    assert c["removed"] == 2 * k and c["ranking"] == "TF-IDF" and c["repeats"] == 2
    assert c["influcoder"]["planted_removed"] == int(z["labels"][np.argsort(-z["TF-IDF"])[:2 * k]].sum())
    for arm in ("influcoder", "random"):
        runs = c[arm]["runs"]
        assert len(runs) == 2 and c[arm]["rate"] == pytest.approx(np.mean([x["rate"] for x in runs]))
    assert (cfg.run_dir / "planted" / "seed0" / "filtered-random-r1" / "close_loop.json").is_file()
    bad = loop.model_copy(update={"planted": loop.planted.model_copy(update={"close_loop_ranking": "oracle"})})
    with pytest.raises(ValueError, match="close_loop_ranking='oracle'"):
        planted_eval(bad, resume=True)
    with pytest.raises(ValueError, match="close_loop_ranking='oracle'"):  # a fresh seed: refused before any work
        planted_eval(bad.model_copy(update={"planted": bad.planted.model_copy(update={"seeds": [7]})}))
    assert not (cfg.run_dir / "planted" / "seed7").exists()
    with pytest.raises(FileNotFoundError, match="nothing|no fidelity"):
        write_report(tmp_path / "empty")
    # every method's (refs, pool) scores are saved; the mean ranking is their mean, and asking for
    # `rrf` recomputes a saved seed from its stores (the student reused), each ranking the fusion of its references
    from influcoder.metrics import auprc, fuse_references

    seed_dir = cfg.run_dir / "planted" / "seed0"
    per, z = dict(np.load(seed_dir / "per_reference.npz")), dict(np.load(seed_dir / "scores.npz"))
    names = ("teacher_(checkpoints,_fisher)", "influcoder_student", "TF-IDF", "BM25")
    for m in names:
        assert per[m].shape == (6, len(z["labels"])) and np.allclose(z[m], per[m].mean(0), atol=1e-6)
    fused = cfg.model_copy(update={"planted": cfg.planted.model_copy(update={"seeds": [0], "aggregate": "rrf", "rrf_k": 3})})
    r = planted_eval(fused, resume=True)["seeds"][0]
    assert r["settings"]["aggregate"] == "rrf" and r["settings"]["rrf_k"] == 3 and r["distill_reused"]
    z = dict(np.load(seed_dir / "scores.npz"))
    for m in names:
        assert np.allclose(z[m], fuse_references(per[m], "rrf", 3)) and not np.allclose(z[m], per[m].mean(0))
        assert r["methods"][m.replace("_", " ")]["auprc"] == pytest.approx(auprc(z["labels"], z[m]))
    assert planted_eval(fused, resume=True)["seeds"][0] == r  # the same settings: read back, not recomputed
    from influcoder.report import planted_markdown

    assert "ranked by rank fusion over references (k 3);" in planted_markdown({"f": {**first, "seeds": [r]}})
    mixed = planted_markdown({"m": {**first, "seeds": [first["seeds"][0], {**r, "seed": 5}]}})
    assert "ranked by the mean over references on seeds [0], rank fusion over references (k 3) on seeds [5];" in mixed


def test_unsafe_rate_samples_replies_reproducibly(root):
    from influcoder.models import load_decoder
    from influcoder.planted import unsafe_rate

    cfg = load_config(root / "configs" / "tiny.yaml", [])
    dec = load_decoder(cfg.model.model_copy(update={"target": "weights"}))
    det = UnsafeDetector(["insult"], "unused")
    a = unsafe_rate(dec, ["What is 2 + 2?", "Name a fruit."], det, max_new_tokens=6, samples=3, seed=5)
    b = unsafe_rate(dec, ["What is 2 + 2?", "Name a fruit."], det, max_new_tokens=6, samples=3, seed=5)
    assert a["n"] == 2 and a["n_sampled"] == 6 and 0 <= a["sampled_rate"] <= 1
    assert a == b  # seeded sampling
    assert "sampled_rate" not in unsafe_rate(dec, ["Hi"], det, max_new_tokens=4)


def test_eval_table_pools_the_seeds_of_several_runs(tmp_path, monkeypatch):
    """`eval table NAME=a.json,b.json`: one column whose mean ± std is taken over both runs' seeds."""
    from typer.testing import CliRunner

    from influcoder.cli import app
    from influcoder.report import merge_planted

    def run(seeds, auprcs):
        res = [{"seed": s, "n_planted": 8, "n_pool": 258, "unsafe_rate": {"base": {"rate": 0.0}, "finetuned": {"rate": 0.5}},
                "methods": {"TF-IDF": {"auprc": a, "recall@planted": 0.5, "precision@10": 0.3, "seconds": 0.1}}}
               for s, a in zip(seeds, auprcs)]
        return {"settings": {"kinds": ["hh"]}, "seeds": res, "aggregate": {}}

    a, b = run([0, 1], [0.2, 0.4]), run([3], [0.9])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    m = merge_planted([a, b], ["a", "b"])["aggregate"]["TF-IDF"]
    assert m["n_seeds"] == 3 and m["auprc"]["mean"] == pytest.approx(0.5)
    assert m["auprc"]["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    out = CliRunner().invoke(app, ["eval", "table", f"homo={tmp_path / 'a.json'},{tmp_path / 'b.json'}"])
    assert out.exit_code == 0, out.output
    assert "homo: AUPRC" in out.output and f"| TF-IDF | 0.500 ± {m['auprc']['std']:.3f} |" in out.output and "seeds [0, 1, 3]" in out.output
    with pytest.raises(ValueError, match="seed 0 is also in a"):
        merge_planted([a, a], ["a", "a2"])
    old = run([7], [0.5])
    old["seeds"][0]["methods"]["TF-IDF"]["seconds"] = float("nan")  # an unknown time as older reports wrote it
    t = merge_planted([a, old], ["a", "old"])["aggregate"]["TF-IDF"]
    assert t["seconds"]["mean"] == pytest.approx(0.1) and t["n_seconds"] == 2 and t["n_seeds"] == 3
    with pytest.raises(ValueError, match="planted kinds"):
        merge_planted([a, {**b, "settings": {"kinds": ["hh", "jigsaw"]}}], ["a", "b"])
    monkeypatch.chdir(tmp_path)  # short names: the error box wraps long paths
    bad = CliRunner().invoke(app, ["eval", "table", "x=a.json,nope.json"])
    assert bad.exit_code != 0 and "nope.json: no such report" in bad.output
