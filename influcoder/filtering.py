"""Batch filtering: score every training example against examples of an unwanted behaviour, and
split the dataset into kept and flagged rows, with an audit report.

**Score** (higher = more like the behaviour; the same definition behind `POST /v1/flag`):

    s(x) = AGG_b cos(doc(x), query(b))  −  AGG_r cos(doc(x), query(r))

`doc(x)`: the student's embedding of the training example with its document prompt; `query(b)`:
a behaviour example (an unwanted output: a toxic reply, an off-target answer) with its query
prompt; `r`: the optional reference set of wanted outputs, embedded like behaviours. AGG is `mean`
(default), `max` or `topm` (mean of the `top_m` largest), the same for both terms. Without a
reference the second term is 0 and s is a cosine in [-1, 1]; with one, s ∈ [-2, 2] and an example
is flagged for being close to the behaviour *and not* to what is wanted (off-target, not merely
on-topic: a benign answer on the same topic is close to both and cancels out). The reference set
should look like the data you want to keep (a sample of good rows), not like safe replies to the
same harmful prompts: those share the behaviour's topic and cancel the signal the student sees.
Measured with MiniLM, 2000 Dolly pairs + 40 planted HH-RLHF harmful replies (base rate 0.02),
20 other harmful replies as behaviours: AUPRC 0.60 without a reference, 0.60 with 20 Dolly rows as
reference, 0.05 with the HH "chosen" replies to the behaviours' prompts as reference.

**Pipeline** (`filter_dataset`): (1) a scoring pass streams the dataset in chunks of `chunk_size`
rows, embeds each with the student and writes its scores to a per-chunk file (resumable, see
`filter_io`); (2) a decision pass reads every score and picks the threshold (`budget`: the top
round(budget·n) rows, ties at the boundary broken by file order; `threshold`: score ≥ T;
`precision`: calibrated on canaries, see `calibrate`); (3) a writing pass streams the dataset again
into kept.jsonl / flagged.jsonl / scores.parquet / report.{json,html} in a temporary folder that is
renamed into place. The input is only read; kept + flagged = the input's good rows, each once, in
input order within each file.

**Outputs.** JSONL input: kept rows are the input lines exactly as read (`Record.to_row` would
re-order keys and add derived ids, so the raw line is kept instead); flagged rows are the same line
with `_influcoder_score` and `_influcoder_top_behaviours` ([{id, score}], the closest behaviour
examples) inserted before the closing brace (a row that already has these keys gets a duplicate key;
JSON readers take the last, ours). Other formats: the parsed row as one JSON line, plus the same
fields when flagged. `scores.parquet` holds every row's id, scores and decision. Bad rows (with
`skip_bad_rows`) are in neither file: they are counted and quoted in the report.

**Resume.** Per-chunk scores live in a work folder (default `.<out>.work` next to the output);
a rerun with the same settings and input (fingerprint: encoder hash, prompts, behaviour/reference
content, aggregation, chunk size, fields, dataset sha256) scores only the chunks not yet done, and the
outputs are byte-identical to an uninterrupted run. The threshold is not part of the fingerprint:
with `keep_work`, trying another budget or threshold costs no encoder pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import __version__
from .config import DataConfig, FilterConfig
from .data import LoadReport, Record, iter_records
from .filter_io import SCORE_FIELD, TOP_FIELD, ChunkStore, chunked, file_sha256, ids_sha, iter_rows
from .filter_thresholds import MODES, FilterError, calibrate, check_decision, decide  # noqa: F401 - part of this module's API
from .lexical import TOKENS, Bm25
from .metrics import rrf

SCORING = ("score = AGG over behaviour examples of cos(student(example, document prompt), student(behaviour, query prompt))"
           " − the same AGG over reference examples (0 without a reference set); higher = more like the behaviour")
FUSED = ("score = reciprocal-rank fusion Σ 1/(60 + rank) of the student score (AGG over behaviour examples of the student "
         "cosine − the same AGG over reference examples) and the BM25 score against the behaviour examples (" + TOKENS + ")")


def aggregate(S: np.ndarray, how: str, top_m: int) -> np.ndarray:
    """(n, m) cosines → (n,) scores."""
    if how == "mean":
        return S.mean(1)
    if how == "max":
        return S.max(1)
    if how == "topm":
        m = max(1, min(top_m, S.shape[1]))
        return np.partition(S, S.shape[1] - m, axis=1)[:, -m:].mean(1)
    raise FilterError(f"aggregate must be mean, max or topm, got {how!r}")


@dataclass
class Scorer:
    """The score of unit document rows X against behaviour rows B and reference rows R."""

    B: np.ndarray
    R: np.ndarray | None = None
    how: str = "mean"
    top_m: int = 5
    n_top: int = 3

    def __post_init__(self) -> None:
        aggregate(np.zeros((1, 1), np.float32), self.how, self.top_m)  # fail early on a bad name
        if len(self.B) == 0:
            raise FilterError("no behaviour examples")

    def score(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """score, behaviour, reference (n,) float32; top_idx / top_val (n, n_top): the behaviours
        closest to each row (stable order, ties by behaviour index)."""
        X = np.asarray(X, np.float32)
        SB = X @ self.B.T  # (n, m)
        beh = aggregate(SB, self.how, self.top_m)
        ref = aggregate(X @ self.R.T, self.how, self.top_m) if self.R is not None and len(self.R) else np.zeros(len(X), np.float32)
        t = min(self.n_top, SB.shape[1])
        top = np.argsort(-SB, axis=1, kind="stable")[:, :t]
        return {"score": (beh - ref).astype(np.float32), "behaviour": beh.astype(np.float32), "reference": ref.astype(np.float32),
                "top_idx": top.astype(np.int32), "top_val": np.take_along_axis(SB, top, 1).astype(np.float32)}


# --- the student -----------------------------------------------------------------------------------

@dataclass
class Student:
    """An encoder with its query/document prompts, the data fields and filter defaults that go with it."""

    model: Any
    prompts: dict[str, str]
    fields: DataConfig
    defaults: FilterConfig
    identity: dict[str, Any]
    """What the scores depend on (encoder hash, prompts) and, under `source`, where it came from."""

    def embed(self, texts: list[str], kind: Literal["query", "document"], batch_size: int = 0) -> np.ndarray:
        from .index import embed

        return embed(self.model, texts, self.prompts[kind], batch_size)


def student_from_index(index: str | Path, device: str = "auto") -> Student:
    """The student of a built index (`index/<name>/`), its data fields and its run's `filter` section."""
    from .index import dir_sha256, encoder_dir, load_student, read_manifest, resolve_index, run_config

    d = resolve_index(index)
    for _ in range(20):  # the folder may be swapped by a concurrent rebuild while we read it
        m = read_manifest(d)
        enc = encoder_dir(d, m)
        if not m["encoder"]["copied"] and dir_sha256(enc) != m["encoder"]["sha256"]:
            raise FilterError(f"{enc}: the encoder changed since the index was built (sha256 differs); rebuild the index")
        model = load_student(enc, device=device)
        if read_manifest(d)["build_id"] == m["build_id"]:
            break
    cfg = run_config(m["run"]["config"])
    ident = {"encoder_sha256": m["encoder"]["sha256"], "prompts": m["encoder"]["prompts"],
             "source": {"index": str(d), "build_id": m["build_id"], "encoder_base": m["encoder"]["base"], "count": m["count"]}}
    return Student(model, dict(m["encoder"]["prompts"]), cfg.data, cfg.filter, ident)


def student_from_encoder(name: str, device: str = "auto") -> Student:
    """Any sentence-transformers encoder (a folder, `sentence-transformers/all-MiniLM-L6-v2`, …),
    with the prompts it declares (none for MiniLM), default data fields and filter settings."""
    from .embed import encoder_fingerprint
    from .models import load_encoder

    model = load_encoder(name, device=device)
    p = getattr(model, "prompts", None) or {}
    prompts = {"query": p.get("query", ""), "document": p.get("document", "")}
    fp = encoder_fingerprint(name)
    ident = {"encoder_sha256": fp.get("weights_sha256", name), "prompts": prompts, "source": {"encoder": name}}
    return Student(model, prompts, DataConfig(), FilterConfig(), ident)


def text_of(rec: Record, mode: str) -> str:
    return rec.response if mode == "response" and rec.is_pair else rec.as_text()  # type: ignore[return-value]


def read_examples(path: str | Path, fields: DataConfig, what: str) -> list[Record]:
    """Behaviour, reference or canary examples: every row must be good (they are few and chosen)."""
    recs = list(iter_records(path, fields.model_copy(update={"skip_bad_rows": False, "limit": None})))
    if not recs:
        raise FilterError(f"{path}: no {what} examples")
    return recs


def label_of(rec: Record, name: str) -> int:
    """1/0 for a truthy/falsy label field, -1 when absent or unreadable."""
    v = rec.meta.get(name)
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return int(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return int(v.strip().lower() in ("true", "1", "yes"))
    return -1


# --- the pipeline ----------------------------------------------------------------------------------

@dataclass
class FilterRun:
    """What to filter and how (settings not given here come from `FilterConfig`)."""

    dataset: Path
    behaviours: Path
    out: Path
    mode: str = "budget"
    value: float | None = None
    """budget share, score threshold or target precision; None: `filter.budget` in budget mode."""
    reference: Path | None = None
    canaries: Path | None = None
    skip_bad_rows: bool = False
    work_dir: Path | None = None
    """Per-chunk scores (resume state); default `<out parent>/.<out name>.work`."""
    keep_work: bool = False


def _check_out(run: FilterRun) -> None:
    out, data = run.out.resolve(), run.dataset.resolve()
    if out == data or out in data.parents:
        raise FilterError(f"--out {run.out} would hold the input {run.dataset}; choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise FilterError(f"--out {run.out} exists and is not a filter output (no report.json); choose another folder")


def _torch_threads(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    return before


def filter_dataset(student: Student, run: FilterRun, fc: FilterConfig | None = None, progress: bool = False,
                   on_chunk: Callable[[int], None] | None = None) -> dict:
    """Score, decide, write. Returns report.json's content.

    `on_chunk(k)` is called after chunk k's scores are safely on disk (a test hook: raising there
    simulates a crash, and the next call with the same settings resumes after chunk k). One run
    per output folder at a time: a second waits on a lock, then reuses what the first left."""
    from .index_build import writer_lock

    run = dataclasses.replace(run, work_dir=run.work_dir or run.out.parent / f".{run.out.name}.work")
    with writer_lock(run.out):  # `.<out name>.lock` beside the output: one run per output folder at a time
        return _filter(student, run, fc, progress, on_chunk)


def _filter(student: Student, run: FilterRun, fc: FilterConfig | None, progress: bool,
            on_chunk: Callable[[int], None] | None) -> dict:
    import torch

    from . import filter_report
    from .index import atomic_dir

    t_start = time.perf_counter()
    fc = fc or student.defaults
    value = fc.budget if run.value is None and run.mode == "budget" else run.value
    if value is None:
        raise FilterError(f"mode {run.mode} needs a value")
    check_decision(run.mode, float(value), run.canaries)
    if fc.fusion != "none" and run.mode != "budget":
        raise FilterError(f"filter.fusion={fc.fusion} ranks rows (fused scores have no absolute scale), so it needs --budget, "
                          f"not --{'threshold' if run.mode == 'threshold' else 'target-precision'}")
    _check_out(run)
    fields = student.fields.model_copy(update={"skip_bad_rows": run.skip_bad_rows, "limit": None})
    beh = read_examples(run.behaviours, fields, "behaviour")
    ref = read_examples(run.reference, fields, "reference") if run.reference else []
    bs = fc.embed_batch_size
    threads = _torch_threads(fc.torch_threads)
    try:
        B = student.embed([text_of(r, fc.text) for r in beh], "query", bs)  # behaviours are outputs: query prompt
        R = student.embed([text_of(r, fc.text) for r in ref], "query", bs) if ref else None
        scorer = Scorer(B, R, fc.aggregate, fc.top_m, fc.top_behaviours)
        bm25 = Bm25([text_of(r, fc.text) for r in beh])  # its counts are kept whatever filter.fusion, so it can change on resume
        settings = {
            "scoring": SCORING, "lexical": TOKENS, "aggregate": fc.aggregate, "top_m": fc.top_m, "text": fc.text, "chunk_size": fc.chunk_size,
            "top_behaviours": fc.top_behaviours, "label_field": fc.label_field,
            "encoder": {k: v for k, v in student.identity.items() if k != "source"},
            "fields": fields.model_dump(mode="json", exclude={"demo", "queries", "path", "max_length", "chat_template"}),
            "behaviours": {"path": str(run.behaviours), "n": len(beh), "sha256": file_sha256(run.behaviours)},
            "reference": {"path": str(run.reference), "n": len(ref), "sha256": file_sha256(run.reference)} if run.reference else None,
            "dataset": {"path": str(run.dataset), "sha256": file_sha256(run.dataset)},
            "influcoder_version": __version__,
        }
        # what the scores depend on: contents, not where the files are or which index version holds the encoder
        same = {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v) for k, v in settings.items()}
        fingerprint = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()
        work: Path = run.work_dir  # type: ignore[assignment]
        store = ChunkStore(work, fingerprint, settings)

        # 1. scoring pass
        from tqdm.auto import tqdm

        load = LoadReport()
        t0, n_scored, resumed, n_chunks = time.perf_counter(), 0, 0, 0
        for k, rows in enumerate(tqdm(chunked(iter_rows(run.dataset, fields, load), fc.chunk_size), desc="score", unit="chunk",
                                      disable=not progress)):
            n_chunks = k + 1
            ids = [r.record.id for r in rows]
            if store.has(k, ids):
                resumed += 1
                continue
            texts = [text_of(r.record, fc.text) for r in rows]
            arrays = scorer.score(student.embed(texts, "document", bs)) | bm25.count(texts)
            arrays["label"] = np.array([label_of(r.record, fc.label_field) for r in rows], np.int8)
            store.put(k, ids, arrays)
            n_scored += len(rows)
            if on_chunk is not None:
                on_chunk(k)
        t_score = time.perf_counter() - t0
        if load.n_rows == 0:
            raise FilterError(f"{run.dataset}: no usable rows ({load.n_bad} bad)" + (f", e.g. {load.bad[0]}" if load.bad else ""))

        # 2. decision pass
        t1 = time.perf_counter()
        student_scores = store.column(n_chunks, "score")
        lexical = bm25.scores(n_chunks, store.load) if fc.fusion == "bm25" else None
        scores = student_scores if lexical is None else rrf(student_scores, lexical)
        canary_scores = None
        if run.mode == "precision":
            can = read_examples(run.canaries, fields, "canary")  # type: ignore[arg-type]
            canary_scores = scorer.score(student.embed([text_of(r, fc.text) for r in can], "document", bs))["score"]
        mask, decision = decide(scores, run.mode, float(value), canary_scores, fc.calibration_ratio, fc.seed)
        t_decide = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)

    # 3. writing pass, into a temp folder renamed into place
    t2 = time.perf_counter()
    top_rows = filter_report.top_flagged_rows(scores, mask, fc.report_top)
    top_set = set(top_rows)
    beh_ids = [r.id for r in beh]
    collected: dict[int, dict] = {}

    def fill(tmp: Path) -> None:
        writer = filter_report.ScoresWriter(tmp / "scores.parquet") if fc.write_scores else None
        at, check = 0, LoadReport()
        with open(tmp / "kept.jsonl", "w", encoding="utf-8", newline="") as kept, \
                open(tmp / "flagged.jsonl", "w", encoding="utf-8", newline="") as flagged:  # line endings as read
            for k, rows in enumerate(chunked(iter_rows(run.dataset, fields, check), fc.chunk_size)):
                ids = [r.record.id for r in rows]
                if k >= n_chunks or store.done.get(str(k), {}).get("ids") != ids_sha(ids):
                    raise FilterError(f"{run.dataset} changed while it was being filtered (chunk {k}); run again")
                z = {key: store.load(k, key) for key in ("behaviour", "reference", "top_idx", "top_val")}
                for i, r in enumerate(rows):
                    row = at + i
                    if not (mask[row] or row in top_set):
                        kept.write(r.kept_line())
                        continue
                    tops = [{"id": beh_ids[j], "score": round(float(v), 6)} for j, v in zip(z["top_idx"][i], z["top_val"][i])]
                    if mask[row]:
                        flagged.write(r.flagged_line({SCORE_FIELD: float(scores[row]), TOP_FIELD: tops}))
                    else:
                        kept.write(r.kept_line())
                    if row in top_set:
                        collected[row] = {"row": row, "id": r.record.id, "source": r.record.source, "score": float(scores[row]),
                                          "behaviour_score": float(z["behaviour"][i]), "reference_score": float(z["reference"][i]),
                                          "text": r.record.as_text()[:1000], "top_behaviours": tops}
                        if lexical is not None:
                            collected[row] |= {"student_score": float(student_scores[row]), "bm25_score": float(lexical[row])}
                if writer is not None:
                    writer.write(ids, scores[at:at + len(rows)], z["behaviour"], z["reference"], mask[at:at + len(rows)],
                                 None if lexical is None else lexical[at:at + len(rows)])
                at += len(rows)
        if writer is not None:
            writer.close()
        if at != len(scores):
            raise FilterError(f"{run.dataset} changed while it was being filtered ({at} rows now, {len(scores)} scored); run again")
        timings = {"scoring_s": round(t_score, 3), "rows_scored": n_scored, "chunks": n_chunks, "chunks_resumed": resumed,
                   "old_scores_discarded": store.restarted,  # a work folder from other settings or input
                   "rows_per_s": round(n_scored / t_score, 1) if n_scored and t_score > 0 else None,
                   "decision_s": round(t_decide, 3), "writing_s": round(time.perf_counter() - t2, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)}
        shown = settings | {"fusion": fc.fusion} | ({"scoring": FUSED} if lexical is not None else {})
        parts = None if lexical is None else {"student": student_scores, "bm25": lexical}
        rep = filter_report.build(settings=shown, parts=parts, source=student.identity.get("source", {}), run=run, value=float(value),
                                  scores=scores, mask=mask, labels=store.column(n_chunks, "label"), decision=decision,
                                  load=load, timings=timings, top=[collected[i] for i in top_rows if i in collected],
                                  behaviours=beh, canary_scores=canary_scores)
        if writer is None:
            rep["outputs"]["scores"] = None
        filter_report.write(tmp, rep)
        report.update(rep)

    report: dict = {}
    atomic_dir(run.out, fill)
    if not run.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report
