"""Batch filtering (`influcoder filter`): invariants, resume, planted recovery, threshold modes,
bad rows, other formats, the CLI.

The student is the real embedded MiniLM (the tiny distilled test student is a random BERT trained
for seconds; its rankings are too weak to show planted rows far above chance). It is put in a
run folder as that run's "distilled" encoder and indexed with `build_index`, so `--index` is what
is tested, the way users run it.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from influcoder import corpus
from influcoder.config import FilterConfig, load_config
from influcoder.data import DataError
from influcoder.filter_io import SCORE_FIELD, TOP_FIELD
from influcoder.filtering import FilterError, FilterRun, Scorer, aggregate, calibrate, decide, filter_dataset, student_from_index

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
N, SHARE, CHUNK = 240, 0.05, 64
FC = FilterConfig(chunk_size=CHUNK, torch_threads=1, report_top=10)  # one thread: the test box is a busy 2-core CPU


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_jsonl_varied(rows: list[dict], path: Path) -> None:
    """Lines a reader must give back byte for byte: mixed key order, spacing, non-ASCII, CRLF,
    a blank line, and no newline at the end."""
    lines = []
    for i, r in enumerate(rows):
        r = dict(reversed(list(r.items()))) if i % 3 == 1 else dict(r)
        if i == 5:
            r["prompt"] += " — café ☕"
        text = json.dumps(r, ensure_ascii=False, separators=(",", ":") if i % 2 else (", ", ": "))
        if i == 9:
            text = " " + text + "  "
        lines.append(text + ("\r\n" if i == 7 else "\n"))
        if i == 10:
            lines.append("\n")
    path.write_bytes("".join(lines).rstrip("\n").encode())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("filter-data")
    rows = corpus.generate(n=N, planted_share=SHARE, seed=3, kind="insult")
    write_jsonl_varied(rows, d / "data.jsonl")
    for name, rs in {"behaviours": corpus.behaviour_examples(20), "reference": corpus.normal_examples(20),
                     "canaries": corpus.behaviour_examples(12, seed=5)}.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return d


@pytest.fixture(scope="module")
def index(files, tmp_path_factory):
    """An index whose student is MiniLM (saved as a run's encoder, no distillation)."""
    from influcoder.distill import encoder_path
    from influcoder.index_build import build_index
    from influcoder.models import load_encoder

    base = tmp_path_factory.mktemp("filter-run")
    cfg = load_config(None, [f"out_dir={base}", "name=minilm", f"data.path={files / 'data.jsonl'}", "index.torch_threads=1"])
    load_encoder(MINILM, device="cpu").save(str(encoder_path(cfg)))
    return build_index(cfg, out=base / "index" / "minilm")


@pytest.fixture(scope="module")
def student(index):
    return student_from_index(index, device="cpu")


@pytest.fixture(scope="module")
def budget_run(files, student, tmp_path_factory):
    """One full scoring pass, kept (--keep-work) so the other threshold modes reuse its scores."""
    d = tmp_path_factory.mktemp("filter-out")
    before = sha(files / "data.jsonl")
    run = FilterRun(files / "data.jsonl", files / "behaviours.jsonl", d / "out", "budget", 0.05,
                    reference=files / "reference.jsonl", work_dir=d / "work", keep_work=True)
    rep = filter_dataset(student, run, FC)
    assert sha(files / "data.jsonl") == before, "the input was modified"
    return run, rep


def input_lines(path: Path) -> list[str]:
    """Non-blank lines as the reader splits them (universal newlines, endings kept)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [ln for ln in fh if ln.strip()]


def check_invariants(out: Path, data: Path) -> tuple[list[dict], list[dict]]:
    """kept + flagged = input: every id once, input order within each file, kept rows byte-identical,
    flagged rows = the original line + the filter's fields; outputs complete, no temp leftovers."""
    assert {p.name for p in out.iterdir()} == {"kept.jsonl", "flagged.jsonl", "scores.parquet", "report.json", "report.html"}
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    src = input_lines(data)
    ids = [json.loads(ln)["id"] for ln in src]
    kept_txt = (out / "kept.jsonl").read_text(encoding="utf-8")
    flagged_txt = (out / "flagged.jsonl").read_text(encoding="utf-8")
    kept = [json.loads(x) for x in kept_txt.splitlines()]
    flagged = [json.loads(x) for x in flagged_txt.splitlines()]
    got = [r["id"] for r in kept] + [r["id"] for r in flagged]
    assert sorted(got) == sorted(ids) and len(set(got)) == len(ids)
    pos = {x: i for i, x in enumerate(ids)}
    for rows in (kept, flagged):
        assert [pos[r["id"]] for r in rows] == sorted(pos[r["id"]] for r in rows)
    by_id = dict(zip(ids, src))
    with open(out / "kept.jsonl", encoding="utf-8", newline="") as fh:
        for ln in fh:
            orig = by_id[json.loads(ln)["id"]]
            assert ln == (orig if orig.endswith(("\n", "\r")) else orig + "\n")
    with open(out / "flagged.jsonl", encoding="utf-8", newline="") as fh:
        for ln in fh:
            row = json.loads(ln)
            orig = by_id[row["id"]].rstrip()
            assert ln.startswith(orig[:-1]) and {k: v for k, v in row.items() if not k.startswith("_influcoder")} == json.loads(orig)
            assert isinstance(row[SCORE_FIELD], float) and 1 <= len(row[TOP_FIELD]) <= 3
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["flagged"] == len(flagged) and rep["counts"]["kept"] == len(kept) and rep["counts"]["rows"] == len(ids)
    return kept, flagged


def test_budget_invariants_and_planted_rows_far_above_chance(files, budget_run):
    run, rep = budget_run
    kept, flagged = check_invariants(run.out, files / "data.jsonl")
    assert len(flagged) == round(0.05 * N)  # exactly round(budget · n)
    ev = rep["evaluation"]
    print(f"\nplanted: AUPRC {ev['auprc']:.3f} (base rate {ev['base_rate']:.3f}), recall@flagged {ev['flagged_recall']:.3f}, "
          f"{rep['timings']['rows_per_s']} rows/s")
    assert ev["n_positive"] == round(SHARE * N)
    assert ev["auprc"] >= 3 * ev["base_rate"], ev
    assert ev["flagged_recall"] >= 3 * 0.05, ev  # chance recall at a 5% budget is 5%
    scores = pq.read_table(run.out / "scores.parquet").to_pandas()
    flagged_scores = sorted((r[SCORE_FIELD] for r in flagged), reverse=True)
    assert min(flagged_scores) >= scores["score"][~scores["flagged"]].max()  # the top of the ranking, nothing else
    assert flagged_scores == sorted(scores["score"][scores["flagged"]], reverse=True)
    html = (run.out / "report.html").read_text()
    assert "data:image/png;base64," in html and rep["top_flagged"][0]["id"] in html
    assert rep["top_flagged"][0]["score"] == max(flagged_scores) and rep["distribution"]["histogram"]["flagged"]
    assert rep["settings"]["reference"]["n"] == 20 and rep["threshold"]["mode"] == "budget"


def test_threshold_mode_flags_exactly_rows_at_or_above(files, student, budget_run, tmp_path):
    run, _ = budget_run
    scores = pq.read_table(run.out / "scores.parquet").column("score").to_numpy()
    T = float(np.sort(scores)[-30])  # a score that occurs: ≥ must include it
    rep = filter_dataset(student, FilterRun(run.dataset, run.behaviours, tmp_path / "out", "threshold", T, run.reference,
                                            work_dir=run.work_dir, keep_work=True), FC)
    assert rep["timings"]["rows_scored"] == 0 and rep["timings"]["chunks_resumed"] == rep["timings"]["chunks"]  # reused scores
    kept, flagged = check_invariants(tmp_path / "out", files / "data.jsonl")
    want = {i for i, s in zip(pq.read_table(run.out / "scores.parquet").column("id").to_pylist(), scores) if s >= T}
    assert {r["id"] for r in flagged} == want and len(want) == 30


def test_bm25_fusion_ranks_by_rrf_of_student_and_bm25_and_reuses_the_scores(files, student, budget_run, tmp_path):
    from influcoder.data import iter_records
    from influcoder.metrics import auprc, rrf
    from test_lexical import bm25s_reference

    run, _ = budget_run
    fc = FC.model_copy(update={"fusion": "bm25"})
    rep = filter_dataset(student, FilterRun(run.dataset, run.behaviours, tmp_path / "out", "budget", 0.05, run.reference,
                                            work_dir=run.work_dir, keep_work=True), fc)
    assert rep["timings"]["rows_scored"] == 0  # fusion is a decision setting: the encoder pass is reused
    kept, flagged = check_invariants(tmp_path / "out", files / "data.jsonl")
    assert len(flagged) == round(0.05 * N)
    plain = pq.read_table(run.out / "scores.parquet").to_pandas()
    fused = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    student_score = plain["score"].to_numpy()
    lexical = bm25s_reference([r.as_text() for r in iter_records(run.behaviours)], [r.as_text() for r in iter_records(run.dataset)])
    assert np.allclose(fused["bm25_score"], lexical, atol=1e-6) and plain["bm25_score"].isna().all()
    want = rrf(student_score, fused["bm25_score"].to_numpy())
    assert np.allclose(fused["score"], want)
    top = set(fused["id"][np.argsort(-want, kind="stable")[:len(flagged)]])
    assert {r["id"] for r in flagged} == top
    ev, labels = rep["evaluation"], np.array([r.meta["planted"] for r in iter_records(run.dataset)])
    assert ev["auprc_of_parts"] == {"student": round(auprc(labels, student_score), 6), "bm25": round(auprc(labels, lexical), 6)}
    assert ev["auprc"] == round(auprc(labels, want), 6) and rep["settings"]["fusion"] == "bm25" and "fusion" in rep["scoring"]
    print(f"\nfusion: AUPRC fused {ev['auprc']:.3f}, student {ev['auprc_of_parts']['student']:.3f}, bm25 {ev['auprc_of_parts']['bm25']:.3f}")
    with pytest.raises(FilterError, match="needs --budget"):
        filter_dataset(student, FilterRun(run.dataset, run.behaviours, tmp_path / "t", "threshold", 0.1, work_dir=run.work_dir,
                                          keep_work=True), fc)


def test_target_precision_is_reached_on_the_canary_calibration(files, student, budget_run, tmp_path):
    run, _ = budget_run
    P = 0.9
    rep = filter_dataset(student, FilterRun(run.dataset, run.behaviours, tmp_path / "out", "precision", P, run.reference,
                                            canaries=files / "canaries.jsonl", work_dir=run.work_dir, keep_work=True), FC)
    cal, t = rep["threshold"]["calibration"], rep["threshold"]["threshold"]
    _, flagged = check_invariants(tmp_path / "out", files / "data.jsonl")
    # recompute from scratch: canaries scored here, dataset scores from scores.parquet
    from influcoder.data import iter_records

    can = list(iter_records(files / "canaries.jsonl"))
    scorer = Scorer(student.embed([r.as_text() for r in iter_records(run.behaviours)], "query"),
                    student.embed([r.as_text() for r in iter_records(run.reference)], "query"), FC.aggregate, FC.top_m)
    cs = scorer.score(student.embed([r.as_text() for r in can], "document"))["score"].astype(np.float64)
    ds = pq.read_table(tmp_path / "out" / "scores.parquet").column("score").to_numpy()
    neg = ds[np.random.default_rng(FC.seed).choice(len(ds), len(cs), replace=False)]  # the documented sample: ratio 1

    def precision(th):
        tp = (cs >= th).sum()
        return tp / (tp + (neg >= th).sum())

    assert precision(t) >= P and cal["precision"] >= P and abs(cal["precision"] - precision(t)) < 1e-9
    assert all(precision(c) < P for c in cs if c < t)  # the lowest such threshold
    assert len(flagged) == int((ds >= t).sum()) and all(r[SCORE_FIELD] >= t for r in flagged)
    print(f"\ntarget precision {P}: threshold {t:.4f}, precision {cal['precision']:.3f}, canary recall {cal['canary_recall']:.3f}, "
          f"{len(flagged)} flagged")
    with pytest.raises(FilterError, match="no threshold reaches precision"):
        calibrate(np.array([0.9, 0.8]), np.array([0.1, 0.2]), 0.9)


def test_crash_mid_run_resumes_by_chunk_to_identical_outputs(files, student, budget_run, tmp_path):
    run, first = budget_run
    out, work = tmp_path / "out", tmp_path / "work"
    again = FilterRun(run.dataset, run.behaviours, out, "budget", 0.05, run.reference, work_dir=work)

    def crash(k):
        if k == 1:
            raise RuntimeError("injected crash after chunk 1")

    with pytest.raises(RuntimeError, match="injected"):
        filter_dataset(student, again, FC, on_chunk=crash)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    assert sorted(json.loads((work / "manifest.json").read_text())["done"]) == ["0", "1"]
    rep = filter_dataset(student, again, FC)
    assert rep["timings"]["chunks_resumed"] == 2 and rep["timings"]["rows_scored"] == N - 2 * CHUNK
    assert not work.exists()  # cleaned after success (no --keep-work)
    for name in ("kept.jsonl", "flagged.jsonl"):
        assert (out / name).read_bytes() == (run.out / name).read_bytes()
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(run.out / "scores.parquet"))
    a, b = json.loads((out / "report.json").read_text()), json.loads((run.out / "report.json").read_text())
    for r in (a, b):
        r.pop("timings"), r.pop("created")
    assert a == b
    # same settings again (work kept): everything reused; other settings: the old scores are not
    keep = FilterRun(run.dataset, run.behaviours, out, "budget", 0.05, run.reference, work_dir=work, keep_work=True)
    assert filter_dataset(student, keep, FC)["timings"]["chunks_resumed"] == 0
    assert filter_dataset(student, keep, FC)["timings"]["chunks_resumed"] == 4
    assert filter_dataset(student, keep, FC.model_copy(update={"aggregate": "max"}))["timings"]["chunks_resumed"] == 0


def test_bad_rows_error_names_the_line_or_are_skipped_and_counted(student, files, tmp_path):
    rows = corpus.generate(n=20, planted_share=0.1, seed=1)
    lines = [json.dumps(r) for r in rows]
    lines[6] = '{"id": "broken", "prompt": "no response"}'
    lines[11] = '{"id": "x", "prompt": '
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run = FilterRun(data, files / "behaviours.jsonl", tmp_path / "out", "budget", 0.1)
    with pytest.raises(DataError, match=r"bad\.jsonl:7: field 'response' is missing"):
        filter_dataset(student, run, FC)
    assert not (tmp_path / "out").exists()
    run.skip_bad_rows = True
    rep = filter_dataset(student, run, FC)
    assert rep["counts"]["bad_rows"] == 2 and rep["counts"]["rows"] == 18 and rep["counts"]["rows_read"] == 20
    assert any(":12: invalid JSON" in b for b in rep["bad_rows"])
    kept, flagged = [(tmp_path / "out" / f).read_text().splitlines() for f in ("kept.jsonl", "flagged.jsonl")]
    assert len(kept) + len(flagged) == 18 and len(flagged) == round(0.1 * 18)


def test_other_formats_write_parsed_rows_and_guards(student, files, tmp_path):
    import pyarrow as pa

    rows = corpus.generate(n=30, planted_share=0.1, seed=2)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    out = tmp_path / "pq-out"
    rep = filter_dataset(student, FilterRun(tmp_path / "data.parquet", files / "behaviours.jsonl", out, "budget", 0.1), FC)
    back = [json.loads(x) for f in ("kept.jsonl", "flagged.jsonl") for x in (out / f).read_text().splitlines()]
    assert sorted(r["id"] for r in back) == sorted(r["id"] for r in rows) and rep["counts"]["flagged"] == 3
    orig = {r["id"]: r for r in rows}
    assert all({k: v for k, v in r.items() if not k.startswith("_influcoder")} == orig[r["id"]] for r in back)
    # an --out that is not a filter output is never replaced; the dataset never lives inside --out
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FilterError, match="not a filter output"):
        filter_dataset(student, FilterRun(tmp_path / "data.parquet", files / "behaviours.jsonl", tmp_path / "precious"), FC)
    with pytest.raises(FilterError, match="would hold the input"):
        filter_dataset(student, FilterRun(tmp_path / "data.parquet", files / "behaviours.jsonl", tmp_path), FC)
    with pytest.raises(FilterError, match="needs --canaries"):
        filter_dataset(student, FilterRun(tmp_path / "data.parquet", files / "behaviours.jsonl", out, "precision", 0.9), FC)


def test_scorer_and_decisions():
    S = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2]], np.float32)
    assert np.allclose(aggregate(S, "max", 2), [0.9, 0.2]) and np.allclose(aggregate(S, "topm", 2), [0.7, 0.2])
    assert np.allclose(aggregate(S, "mean", 2), [0.5, 0.2])
    B = np.eye(3, dtype=np.float32)[:2]
    out = Scorer(B, np.eye(3, dtype=np.float32)[2:], "max", 1).score(np.eye(3, dtype=np.float32))
    assert np.allclose(out["score"], [1, 1, -1]) and out["top_idx"][1].tolist() == [1, 0]
    mask, info = decide(np.array([0.3, 0.5, 0.5, 0.1]), "budget", 0.25)  # a tie at the boundary: the earlier row wins
    assert mask.tolist() == [False, True, False, False] and info["tied_rows_kept"] == 1
    assert decide(np.array([0.3, 0.5]), "threshold", 0.3)[0].tolist() == [True, True]


def test_cli_filter_via_python_m(index, files, tmp_path):
    rows = corpus.generate(n=40, planted_share=0.1, seed=4)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "influcoder.cli_filter", "filter", "--index", str(index), "--behaviors", str(files / "behaviours.jsonl"),
           "--dataset", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--budget", "0.1", "--no-progress",
           "--set", "filter.torch_threads=1", "--set", "filter.text=response"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["flagged"] == 4 and summary["kept"] == 36 and summary["evaluation"]["flagged_recall"] >= 0.5
    assert json.loads((tmp_path / "o" / "report.json").read_text())["settings"]["text"] == "response"
    bad = subprocess.run(cmd[:-4] + ["--threshold", "0.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "at most one of --budget" in bad.stderr
