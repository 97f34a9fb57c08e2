"""`influcoder demo`: the whole pipeline on the embedded default, with what it found.

Stages are cached by their artefacts, so a rerun skips what is done (`fresh` redoes everything).
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from .config import Config
from .data import load_split
from .distill import distill, encoder_path
from .fidelity import tfidf_scores
from .finetune import adapter_path, finetune, finetune_dir
from .gradient_job import default_store_path
from .index_build import build_index
from .lexical import bm25_scores
from .metrics import auprc, precision_at_k, recall_of_planted_at_k, rrf
from .store import GradStore
from .teacher import Teacher, build_teacher, teacher_path


def _store_done(cfg: Config, split: str) -> bool:
    from .gradient_job import checkpoint_configs

    paths = [default_store_path(c, split) for c, _ in checkpoint_configs(cfg)]
    return all(p.exists() and GradStore.open(p).complete for p in paths)


def _teacher_means(cfg: Config, query_ids: set[str]) -> np.ndarray:
    """(pool,) mean teacher score to the given query rows, over every pool row: the teacher's
    (checkpoint-weighted, corrected) gradient score, with the corrections teacher.zarr saved."""
    from .gradient_job import checkpoint_configs
    from .teacher import transform_file
    from .teacher_score import ScoreTransform, raw_rows

    parts = checkpoint_configs(cfg)
    total = 0.0
    for k, (c, w) in enumerate(parts):
        pg, qg = GradStore.open(default_store_path(c, "pool")), GradStore.open(default_store_path(c, "queries"))
        rows = [i for i, x in enumerate(qg.ids()) if x in query_ids]
        tf = ScoreTransform.load(teacher_path(cfg) / transform_file(k))
        total = total + w * tf.scores(raw_rows(qg, rows), raw_rows(pg)).mean(0)
    return total / sum(w for _, w in parts)


def _gradients(cfg: Config, splits: list[str]) -> None:
    """Both splits on one local Ray (started once), as `influcoder gradients` runs them."""
    from .ray_jobs import init_ray, run_job

    started = cfg.ray.num_workers != 0 and init_ray(cfg.ray)
    try:
        for split in splits:
            s = run_job(cfg, split).as_dict()
            Console().print(f"{split}: {s['rows']} rows, {s['examples_per_s']} examples/s, {s['tokens_per_s']} tokens/s → {s['store']}")
    finally:
        if started:
            import ray

            ray.shutdown()


def _learned(cfg: Config) -> dict:
    """Did the fine-tune learn the planted behaviour? Mean response loss of held-out behaviour and
    normal replies, and the share of greedy replies to held-out prompts that show it, base vs
    fine-tuned (cached in <run>/finetune/learned.json)."""
    path = finetune_dir(cfg) / "learned.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from .gradients import forward_loss
    from .models import load_decoder
    from .planted import UnsafeDetector, unsafe_rate
    from .tokenization import collate, tokenize_records

    queries, _ = load_split(cfg.data, "queries")
    sets = {"behaviour": [q for q in queries if q.meta.get("planted")], "normal": [q for q in queries if not q.meta.get("planted")]}
    prompts = [q.prompt for q in sets["behaviour"] if q.prompt][: cfg.planted.n_generate]
    detector = UnsafeDetector([cfg.data.demo.kind], cfg.planted.jigsaw_path)
    out = {}
    for name, adapter in (("base", None), ("finetuned", str(adapter_path(cfg)))):
        dec = load_decoder(cfg.model.model_copy(update={"adapter": adapter, "target": "finetuned" if adapter else "weights"}))
        row = unsafe_rate(dec, prompts, detector, cfg.planted.max_new_tokens, samples=cfg.planted.samples, seed=cfg.seed)
        for kind, recs in sets.items():
            ex, _ = tokenize_records(recs, dec.tokenizer, cfg.data.max_length, cfg.data.chat_template)
            with torch.no_grad():
                batch = {k: v.to(dec.device) for k, v in collate(ex, dec.tokenizer.pad_token_id).items()}
                row[f"{kind}_loss"] = float(forward_loss(dec.model, batch)[0].mean())
        out[name] = row
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _rank_table(title: str, query: str, rows: list[dict]) -> Table:
    t = Table(title=title, caption=f"query: {query[:110]!r}", show_lines=False)
    for col in ("rank", "score", "planted", "training example (id: preview)"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["rank"]), f"{r['score']:.3f}", "yes" if r["planted"] else "", f"{r['id']}: {r['preview'][:100]}")
    return t


def run_demo(cfg: Config, fresh: bool = False, console: Console | None = None) -> dict:
    con = console or Console()
    run = cfg.run_dir
    if fresh and run.exists():
        shutil.rmtree(run)
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            con.print(f"[dim]✓ {name}: cached[/]")
            return
        con.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)

    pool, _ = load_split(cfg.data, "pool")
    planted = np.array([bool(r.meta.get("planted")) for r in pool])
    con.print(f"[bold]pool[/]: {len(pool)} examples from {cfg.data.path!r}, {planted.sum()} planted "
              f"'{cfg.data.demo.kind}' replies; decoder {cfg.model.name}, student {cfg.student.base}")
    if cfg.model.target == "finetuned" and not cfg.model.adapter:
        stage("finetune", (adapter_path(cfg) / "adapter_config.json").exists(), lambda: finetune(cfg))
        stage("behaviour check (generation)", (finetune_dir(cfg) / "learned.json").exists(), lambda: _learned(cfg))
        b, f = (learned := _learned(cfg))["base"], learned["finetuned"]
        con.print(f"learned? loss of held-out {cfg.data.demo.kind} replies {b['behaviour_loss']:.2f} → {f['behaviour_loss']:.2f}, "
                  f"of normal replies {b['normal_loss']:.2f} → {f['normal_loss']:.2f} (base → fine-tuned); greedy replies "
                  f"showing it on {b['n']} held-out prompts: greedy {b['rate']:.0%} → {f['rate']:.0%}, sampled at T=1 "
                  f"{b.get('sampled_rate', 0):.0%} → {f.get('sampled_rate', 0):.0%}")
    todo = [s for s in ("pool", "queries") if not _store_done(cfg, s)]
    stage("gradients (Ray workers)", not todo, lambda: _gradients(cfg, todo))
    stage("teacher", teacher_path(cfg).exists(), lambda: build_teacher(cfg))
    stage("distill", (encoder_path(cfg) / "modules.json").exists() and (run / "fidelity.json").exists(), lambda: distill(cfg))
    fid = json.loads((run / "fidelity.json").read_text())

    # Which data caused this? The FAISS index over the student's embeddings, through the engine.
    from .engine import Engine
    from .index import dir_sha256, index_dir, read_manifest

    idx = index_dir(cfg)
    # The index lives outside the run folder: reuse it only if it holds this run's student.
    current = (idx / "manifest.json").exists() and not fresh and \
        read_manifest(idx)["encoder"]["sha256"] == dir_sha256(encoder_path(cfg))
    stage("index", current, lambda: build_index(cfg))
    engine = Engine.load(idx)
    texts = [r.as_text() for r in pool]
    queries, _ = load_split(cfg.data, "queries")
    bad = [q for q in queries if q.meta.get("planted")]
    good = [q for q in queries if not q.meta.get("planted")]

    def ask(q) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        (ans,) = engine.attribute([{"prompt": q.prompt, "response": q.response} if q.is_pair else {"text": q.text}], k=5)
        ms = 1000 * (time.perf_counter() - t0)
        return [{**h, "planted": bool(h["metadata"].get("planted"))} for h in ans["results"]], ms

    con.rule("[bold]which training examples made the model say this?")
    hits, ms = ask(bad[0])
    query_ms = round(ms, 1)
    con.print(_rank_table(f"behaviour output ({ms:.0f} ms)", bad[0].as_text(), hits))
    if good:
        hits, ms = ask(good[0])
        con.print(_rank_table(f"normal output, for contrast ({ms:.0f} ms)", good[0].as_text(), hits))

    # Filter the corpus against the behaviour outputs: kept + flagged = input, with a report.
    from .data import write_jsonl
    from .filtering import FilterRun, filter_dataset, student_from_index

    data_dir = run / "demo-data"
    write_jsonl([r.to_row(cfg.data) for r in pool], data_dir / "pool.jsonl")
    write_jsonl([q.to_row(cfg.data) for q in bad], data_dir / "behaviours.jsonl")
    frun = FilterRun(dataset=data_dir / "pool.jsonl", behaviours=data_dir / "behaviours.jsonl", out=run / "filtered",
                     mode="budget", value=float(planted.mean()))
    stage("filter", (run / "filtered" / "report.json").exists(), lambda: filter_dataset(student_from_index(idx), frun, cfg.filter))
    frep = json.loads((run / "filtered" / "report.json").read_text())
    import pyarrow.parquet as pq

    fscores = dict(zip(*[pq.read_table(run / "filtered" / "scores.parquet").column(c).to_pylist() for c in ("id", "score")]))
    ev = frep.get("evaluation") or {}
    con.print(f"[bold]filter[/]: flagged {frep['counts']['flagged']} of {frep['counts']['rows']} rows "
              f"(budget {frun.value:.1%}); {ev.get('flagged_precision', 0):.0%} of them planted, "
              f"{ev.get('flagged_recall', 0):.0%} of the planted rows caught; report: {run / 'filtered' / 'report.html'}")

    # Planted retrieval: mean similarity to the behaviour outputs, student vs teacher vs TF-IDF.
    methods = {"student (influcoder filter)": np.array([fscores[r.id] for r in pool])}
    score = Teacher.open(teacher_path(cfg)).manifest["score"]  # a cached teacher may predate today's default
    methods[f"teacher (gradient {score})"] = _teacher_means(cfg, {q.id for q in bad})
    methods["TF-IDF"] = tfidf_scores([q.as_text() for q in bad], texts, texts)[0].T.mean(1)
    methods["BM25"] = bm25_scores([q.as_text() for q in bad], texts)
    methods["student + BM25 (filter --fusion bm25)"] = rrf(methods["student (influcoder filter)"], methods["BM25"])
    methods["random"] = np.random.default_rng(0).random(len(pool))
    n_pl = int(planted.sum())
    retrieval = {m: {"auprc": auprc(planted, s), f"recall@{n_pl}": recall_of_planted_at_k(planted, s, n_pl),
                     "precision@10": precision_at_k(planted, s, 10)} for m, s in methods.items()}
    t = Table(title=f"planted-row retrieval ({n_pl} planted of {len(pool)}; random AUPRC ≈ {n_pl / len(pool):.3f})")
    for col in ("method", "AUPRC", f"recall@{n_pl}", "precision@10"):
        t.add_column(col)
    for m, r in retrieval.items():
        t.add_row(m, f"{r['auprc']:.3f}", f"{r[f'recall@{n_pl}']:.3f}", f"{r['precision@10']:.2f}")
    con.print(t)

    rows = fid["rows"]
    ft = Table(title=f"student fidelity to the teacher on the held-out block ({fid['sizes']['eval_anchors']} anchors × {fid['sizes']['eval_pool']} pool)")
    for col in ("encoder", "per-anchor ρ", "aggregated ρ", f"recall@{cfg.student.eval_k}", "ms/sample"):
        ft.add_column(col)
    for name, r in rows.items():
        ft.add_row(name, f"{r['per_anchor_spearman']:.3f}", f"{r['aggregated_spearman']:.3f}", f"{r[f'recall@{cfg.student.eval_k}']:.3f}", f"{r['ms_per_sample']:.2f}")
    con.print(ft)
    learned_path = finetune_dir(cfg) / "learned.json"
    summary = {"run_dir": str(run), "timings_s": timings, "query_ms": query_ms, "retrieval": retrieval, "fidelity": rows,
               "learned": json.loads(learned_path.read_text()) if learned_path.exists() else None,
               "filter": {"counts": frep["counts"], "evaluation": ev, "report": str(run / "filtered" / "report.html")},
               "n_pool": len(pool), "n_planted": n_pl, "plots": [str(run / "fidelity.png")]}
    (run / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    con.rule("[bold]summary")
    for k, v in timings.items():
        con.print(f"  {k:<24} {v:>8.1f} s")
    con.print(f"  {'one attribution query':<24} {query_ms:>8.1f} ms")
    con.print(f"artefacts in {run}/ (fidelity.png, fidelity.json, demo-summary.json, encoder/) and {idx}/")
    con.print(f"serve it:  influcoder serve --index {idx}\nthen ask:  curl -s localhost:{cfg.service.port}/v1/attribute "
              "-H 'content-type: application/json' -d '{\"inputs\": [{\"text\": \"What a stupid question, idiot.\"}], \"k\": 5}'")
    return summary
