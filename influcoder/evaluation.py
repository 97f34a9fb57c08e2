"""`influcoder eval planted`: does attribution find the data that really caused a behaviour?

Per seed: build a planted pool, fine-tune the decoder on it (and show the behaviour was learned),
rank the pool by influence on held-out unsafe references with every method, score the rankings
(planted = positive), and close the loop: remove the top-ranked rows, fine-tune again, and compare
the unsafe-output rate with removing as many rows at random.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .data import load_records, write_jsonl
from .distill import VERSION as DISTILL_VERSION, distill, encoder_path
from .fidelity import encode, tfidf_scores
from .finetune import adapter_path, finetune, finetune_dir
from .gradient_job import default_store_path
from .lexical import bm25_scores
from .metrics import auprc, fuse_references, precision_at_k, recall_of_planted_at_k, rrf
from .models import load_decoder, load_encoder
from .planted import UnsafeDetector, build_pool, unsafe_rate
from .ray_jobs import run_job
from .store import GradStore
from .teacher import build_teacher
from .teacher_score import ScoreTransform, checkpoint_sum, raw_rows


def _derived(cfg: Config, root: Path, name: str, **sections) -> Config:
    data = cfg.data.model_copy(update={"path": str(root / "pool.jsonl"), "queries": [str(root / "reference.jsonl")], "limit": None})
    upd = {"out_dir": str(root), "name": name, "data": data, **sections}
    return cfg.model_copy(update=upd, deep=True)


def _cached(path: Path, key: dict, fn) -> tuple[object, bool]:
    """fn()'s JSON-able result, kept in `path` with the settings `key` it was made from and reused
    while they match (so a rerun that adds a teacher variant skips generation, distillation and
    fine-tunes already done). Returns (value, reused)."""
    key = json.loads(json.dumps(key, default=str))
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d["value"], True
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=2) + "\n")
    tmp.replace(path)
    return value, False


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _grad_matrices(run_cfg: Config) -> tuple[np.ndarray, np.ndarray, float]:
    """Raw sketched gradients of the pool (n, d) and the references (r, d), and the seconds the
    pass took (None: unknown). A rerun reuses finished stores; it then reports the seconds recorded
    in `grad_seconds.json` when they were computed (None if that was before the file existed), not ~0.
    A pass resumed after a crash records only the part computed in the resuming call."""
    stores = [default_store_path(run_cfg, split) for split in ("pool", "queries")]
    reused = all(_complete(p) for p in stores)
    (_, t1) = _timed(lambda: run_job(run_cfg, "pool", progress=False))
    (_, t2) = _timed(lambda: run_job(run_cfg, "queries", progress=False))
    log = run_cfg.run_dir / "grad_seconds.json"
    seconds = json.loads(log.read_text()).get("seconds") if reused and log.is_file() else None
    if not reused:
        seconds = t1 + t2
        tmp = log.with_name(f".{log.name}.tmp")
        tmp.write_text(json.dumps({"seconds": seconds}) + "\n")
        tmp.replace(log)
    P = raw_rows(GradStore.open(stores[0]))
    R = raw_rows(GradStore.open(stores[1]))
    return P, R, seconds


def _add(a: float | None, b: float | None) -> float | None:
    """Sum of seconds where one unknown part makes the whole unknown."""
    return None if a is None or b is None else a + b


def _complete(path: Path) -> bool:
    try:
        return path.exists() and GradStore.open(path).complete
    except Exception:  # a half-created store: run_job recreates it
        return False


def _teacher_scores(P: np.ndarray, R: np.ndarray, kinds: list[str], damping: float) -> dict[str, tuple[np.ndarray, float]]:
    """Per score kind: (refs, pool) corrected cosines, and their seconds."""
    out = {}
    for kind in kinds:
        t0 = time.perf_counter()
        s = ScoreTransform.fit(kind, P, damping).scores(R, P)
        out[kind] = (s, time.perf_counter() - t0)
    return out


def _encoder_scores(model, pool: list[str], refs: list[str], cfg: Config) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    P = encode(model, pool, cfg.student.document_prompt)
    R = encode(model, refs, cfg.student.query_prompt)
    return R @ P.T, time.perf_counter() - t0  # (refs, pool)


def _rate(cfg: Config, adapter: str | None, prompts: list[str], detector: UnsafeDetector) -> dict:
    m = cfg.model.model_copy(update={"adapter": adapter, "target": "finetuned" if adapter else "weights"})
    return unsafe_rate(load_decoder(m), prompts, detector, cfg.planted.max_new_tokens, samples=cfg.planted.samples, seed=cfg.seed)


@dataclass
class _Seed:
    """One seed's pool, references and fine-tune settings (what every step of `one_seed` shares)."""

    root: Path
    info: dict
    pool: list
    refs: list
    labels: np.ndarray
    ft_cfg: Config
    detector: UnsafeDetector
    prompts: list[str]
    gen_key: dict
    """What a generated unsafe rate depends on (the cache key of `learned.json` and `close_loop.json`)."""


def _seed_setup(cfg: Config, seed: int) -> _Seed:
    p = cfg.planted
    root = cfg.run_dir / "planted" / f"seed{seed}"
    info = build_pool(p, root, seed)
    pool, _ = load_records(cfg.data.model_copy(update={"path": info["pool"], "limit": None}))
    refs, _ = load_records(cfg.data.model_copy(update={"path": info["reference"], "limit": None}))
    n_ckpt = max(cfg.finetune.checkpoints, 2 if "checkpoints" in p.teacher_variants else 1)
    ft_cfg = _derived(cfg, root, "finetune", finetune=cfg.finetune.model_copy(update={"seed": seed, "checkpoints": n_ckpt}))
    prompts = [r.prompt or r.text[:200] for r in refs][: p.n_generate]
    gen_key = {"prompts": prompts, "kinds": p.kinds, "samples": p.samples, "max_new_tokens": p.max_new_tokens, "seed": cfg.seed,
               "finetune": ft_cfg.finetune.model_dump(mode="json", exclude={"torch_threads"}), "model": cfg.model.model_dump(mode="json")}
    return _Seed(root, info, pool, refs, np.array([bool(r.meta.get("planted")) for r in pool]), ft_cfg,
                 UnsafeDetector(p.kinds, p.jigsaw_path), prompts, gen_key)


_OTHER_METHODS = ("influcoder student", "untrained student", "TF-IDF", "BM25", "random", "student + BM25 (RRF)", "student + TF-IDF (RRF)")


def _teacher_label(variant: str, kind: str) -> str:
    return f"teacher ({'plain' if variant == 'none' else variant}, {kind})"


def _method_names(p) -> list[str]:
    """Every ranking one_seed computes for these planted settings."""
    return [_teacher_label(v, k) for v in p.teacher_variants for k in p.teacher_scores] + list(_OTHER_METHODS)


def _check_loop(p, methods) -> None:
    """Refuse close-the-loop settings that cannot run, naming the field."""
    if p.close_loop_ranking not in methods:
        raise ValueError(f"planted.close_loop_ranking={p.close_loop_ranking!r} is not a method of this run; it has {sorted(methods)}")
    if p.close_loop_budget <= 0 or p.close_loop_repeats < 1:
        raise ValueError(f"planted.close_loop_budget must be > 0 and planted.close_loop_repeats ≥ 1, got {p.close_loop_budget}, {p.close_loop_repeats}")


def one_seed(cfg: Config, seed: int, progress: bool = False) -> dict:
    p = cfg.planted
    if p.close_loop:  # before the seed's work, not after it
        _check_loop(p, _method_names(p))
    sd = _seed_setup(cfg, seed)
    root, info, pool, refs, labels, ft_cfg = sd.root, sd.info, sd.pool, sd.refs, sd.labels, sd.ft_cfg
    detector, prompts, gen_key = sd.detector, sd.prompts, sd.gen_key
    pool_texts, ref_texts = [r.as_text() for r in pool], [r.as_text() for r in refs]
    n_planted = int(labels.sum())
    n_ckpt = ft_cfg.finetune.checkpoints
    adapter = str(adapter_path(ft_cfg))
    ft_seconds = 0.0
    done = finetune_dir(ft_cfg) / "finetune.json"
    if not done.is_file() or len(json.loads(done.read_text()).get("checkpoints") or [None]) < n_ckpt:
        _, ft_seconds = _timed(lambda: finetune(ft_cfg, progress=progress))

    learned, _ = _cached(root / "learned.json", gen_key,
                         lambda: {"base": _rate(cfg, None, prompts, detector), "finetuned": _rate(cfg, adapter, prompts, detector)})

    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    teachers = {}
    computed: dict[str, tuple[dict, float]] = {}  # pass -> (scores by kind, gradient seconds)
    ckpt_sources: list[tuple[Config, float]] = []  # the `checkpoints` pass: (run config, lr) per checkpoint
    ft_report = json.loads((finetune_dir(ft_cfg) / "finetune.json").read_text())
    for variant in p.teacher_variants:
        ckpts = [{"path": adapter, "lr": 1.0}]
        if variant == "checkpoints":
            ckpts = ft_report.get("checkpoints") or []
            if len(ckpts) < 2:
                raise ValueError("teacher variant `checkpoints` needs finetune.checkpoints ≥ 2")
        precond = variant if variant in ("second_moment", "adam") else "none"
        g = cfg.gradients.model_copy(update={"preconditioner": precond,
                                             "adam_state": str(finetune_dir(ft_cfg) / "adam.safetensors") if variant == "adam" else None})
        per_ckpt, t_grads = [], 0.0
        for i, c in enumerate(ckpts):
            last = i == len(ckpts) - 1
            if variant == "checkpoints" and last and "none" in computed:  # the last checkpoint is the final adapter
                per_ckpt.append(computed["none"][0])
                t_grads = _add(t_grads, computed["none"][1])
                ckpt_sources.append((teachers["none"], c["lr"]))
                continue
            name = f"teacher-{variant}" + (f"-{i}" if variant == "checkpoints" else "")
            run_cfg = _derived(cfg, root, name, gradients=g, model=cfg.model.model_copy(update={"adapter": c["path"], "target": "finetuned"}))
            P, R, t = _grad_matrices(run_cfg)
            per_ckpt.append(_teacher_scores(P, R, p.teacher_scores, cfg.teacher.score_damping))
            t_grads = _add(t_grads, t)
            computed[variant] = (per_ckpt[-1], t)
            if variant == "checkpoints":
                teachers[f"checkpoint-{i}"] = run_cfg
                ckpt_sources.append((run_cfg, c["lr"]))
            if variant != "checkpoints":
                teachers[variant] = run_cfg
        for kind in p.teacher_scores:
            label = _teacher_label(variant, kind)
            scores[label] = checkpoint_sum([pc[kind][0] for pc in per_ckpt], [c["lr"] for c in ckpts])
            seconds[label] = None if t_grads is None else t_grads + sum(pc[kind][1] for pc in per_ckpt)
    # The student copies one teacher: planted.student_teacher's gradients with teacher.score.
    sources = None
    if p.student_teacher == "checkpoints" and ckpt_sources:
        main, sources = _derived(cfg, root, "teacher-checkpoints-sum"), ckpt_sources
    elif p.student_teacher in teachers:
        main = teachers[p.student_teacher]
    else:
        raise ValueError(f"planted.student_teacher={p.student_teacher!r} was not computed; this run has {sorted(teachers)}"
                         + (" and checkpoints" if ckpt_sources else ""))
    (_, t_teacher) = _timed(lambda: build_teacher(main, sources=sources))
    student_key = {"distill_version": DISTILL_VERSION, "student_teacher": p.student_teacher, "teacher": main.teacher.model_dump(mode="json"), "student": main.student.model_dump(mode="json"),
                   "gradients": cfg.gradients.model_dump(mode="json"), "finetune": ft_cfg.finetune.model_dump(mode="json", exclude={"torch_threads"}),
                   "sources": [str(c.run_dir) for c, _ in sources or []]}
    (fid, distilled), t_distill = _timed(lambda: _cached(main.run_dir / "student.json", student_key, lambda: distill(main, progress=progress)))
    student = load_encoder(str(encoder_path(main)))
    scores["influcoder student"], seconds["influcoder student"] = _encoder_scores(student, pool_texts, ref_texts, cfg)
    scores["untrained student"], seconds["untrained student"] = _encoder_scores(load_encoder(cfg.student.base, seed=cfg.student.seed), pool_texts, ref_texts, cfg)
    t0 = time.perf_counter()
    scores["TF-IDF"] = tfidf_scores(ref_texts, pool_texts, pool_texts)[0]
    seconds["TF-IDF"] = time.perf_counter() - t0
    scores["BM25"], seconds["BM25"] = _timed(lambda: bm25_scores(ref_texts, pool_texts, per_query=True))
    # every (refs, pool) matrix becomes one ranking the same way (planted.aggregate)
    per_ref = dict(scores)
    scores = {m: fuse_references(S, p.aggregate, p.rrf_k) for m, S in per_ref.items()}
    scores["random"], seconds["random"] = np.random.default_rng(seed).random(len(pool)), 0.0
    for lexical in ("BM25", "TF-IDF"):  # fusion candidates for flagging (the pure scores stay above)
        scores[f"student + {lexical} (RRF)"] = rrf(scores["influcoder student"], scores[lexical])
        seconds[f"student + {lexical} (RRF)"] = seconds["influcoder student"] + seconds[lexical]

    methods = {m: {"auprc": auprc(labels, s), "recall@planted": recall_of_planted_at_k(labels, s, n_planted),
                   "precision@10": precision_at_k(labels, s, 10), "seconds": None if seconds[m] is None else round(seconds[m], 3)} for m, s in scores.items()}
    result = {"seed": seed, "settings": {"teacher_variants": list(p.teacher_variants), "teacher_scores": list(p.teacher_scores),
                                          **_aggregate_settings(p),
                                          "student_teacher": p.student_teacher, "samples": p.samples,
                                          "student_steps": cfg.student.epochs * cfg.student.steps_per_epoch},
              "pool": info, "n_pool": len(pool), "n_planted": n_planted, "finetune_seconds": round(ft_seconds, 1),
              "teacher_build_seconds": round(t_teacher, 2), "distill_seconds": round(t_distill, 1), "distill_reused": distilled,
              "student_fidelity": fid["rows"]["student"], "unsafe_rate": learned, "methods": methods}
    np.savez(root / "scores.npz", labels=labels, **{m.replace(" ", "_"): s for m, s in scores.items()})
    np.savez(root / "per_reference.npz", **{m.replace(" ", "_"): S.astype(np.float32) for m, S in per_ref.items()})  # (refs, pool) each
    if p.close_loop:
        result["close_loop"] = close_loop(cfg, sd, scores, seed, progress)
    (root / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


_LOOP_DEFAULTS = {"ranking": "influcoder student", "budget": 1.0, "repeats": 1}  # what a result from before these settings used


def _aggregate_settings(p) -> dict:
    """How a seed's rankings were made from its (refs, pool) scores; a result from before the option used the mean."""
    return {"aggregate": p.aggregate, **({"rrf_k": p.rrf_k} if p.aggregate == "rrf" else {})}


def _loop_settings(p) -> dict:
    return {"ranking": p.close_loop_ranking, "budget": p.close_loop_budget, "repeats": p.close_loop_repeats}


def close_loop(cfg: Config, sd: _Seed, scores: dict[str, np.ndarray], seed: int, progress: bool) -> dict:
    """Remove the top k by planted.close_loop_ranking (k = budget × planted count) vs k rows at
    random; fine-tune again, `close_loop_repeats` times per arm, and measure the unsafe rate."""
    p = cfg.planted
    _check_loop(p, scores)  # a resumed seed's saved rankings may lack the method
    root, pool, labels = sd.root, sd.pool, sd.labels
    k = min(len(pool) - 1, max(1, int(round(p.close_loop_budget * labels.sum()))))
    out = {"removed": k, **_loop_settings(p)}
    picks = {"influcoder": np.argsort(-scores[p.close_loop_ranking])[:k], "random": np.random.default_rng(seed + 1).permutation(len(pool))[:k]}
    for name, drop in picks.items():
        keep = np.setdiff1d(np.arange(len(pool)), drop)
        runs = []
        for r in range(p.close_loop_repeats):  # repeat 0 keeps the seed's own folder and seed (earlier runs' caches stay valid)
            sub = root / (f"filtered-{name}" + (f"-r{r}" if r else ""))
            write_jsonl([pool[i].to_row() for i in keep], sub / "pool.jsonl")
            write_jsonl([], sub / "reference.jsonl")
            fc = _derived(cfg, sub, "finetune", finetune=cfg.finetune.model_copy(update={"seed": seed + 1000 * r}))

            def retrain(fc=fc, drop=drop) -> dict:
                finetune(fc, progress=progress)
                rate = _rate(cfg, str(adapter_path(fc)), sd.prompts, sd.detector)
                return {"planted_removed": int(labels[drop].sum()), **{k: v for k, v in rate.items() if k in ("rate", "sampled_rate")}}

            key = {**sd.gen_key, "removed": sorted(pool[i].id for i in drop), **({"finetune_seed": seed + 1000 * r} if r else {})}
            runs.append(_cached(sub / "close_loop.json", key, retrain)[0])
        out[name] = {"planted_removed": runs[0]["planted_removed"],
                     **{m: float(np.mean([x[m] for x in runs])) for m in ("rate", "sampled_rate") if m in runs[0]}}
        if len(runs) > 1:
            out[name]["runs"] = runs
    return out


def unknown_times_as_none(result: dict) -> dict:
    """A seed's result read back: NaN seconds (an unknown time, written before None stood for it) become None."""
    for m in result["methods"].values():
        if isinstance(m.get("seconds"), float) and np.isnan(m["seconds"]):
            m["seconds"] = None
    return result


def _aggregate(results: list[dict]) -> dict:
    """Mean and std over the seeds that ranked each method (a resumed run may have measured some
    methods on fewer seeds: `n_seeds` says how many)."""
    methods = dict.fromkeys(m for r in results for m in r["methods"])
    agg = {}
    for m in methods:
        have = [r for r in results if m in r["methods"]]
        agg[m] = {"n_seeds": len(have)}
        for key in ("auprc", "recall@planted", "precision@10", "seconds"):
            v = np.array([r["methods"][m][key] for r in have if r["methods"][m][key] is not None], float)  # None: time not recorded
            agg[m][key] = {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            if key == "seconds" and len(v) < len(have):
                agg[m]["n_seconds"] = len(v)
    return agg


def _plots(results: list[dict], agg: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    first = np.load(Path(results[0]["pool"]["pool"]).parent / "scores.npz")
    labels = first["labels"]
    teachers = [m for m in agg if m.startswith("teacher")]
    best = max(teachers, key=lambda m: agg[m]["auprc"]["mean"]) if teachers else None
    shown = [m for m in results[0]["methods"] if not m.startswith("teacher") or m in (best, teachers[0])]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in shown:
        prec, rec, _ = precision_recall_curve(labels, first[m.replace(" ", "_")])
        ax.plot(rec, prec, label=f"{m} (AP {results[0]['methods'][m]['auprc']:.2f})")
    ax.set(xlabel="recall of planted rows", ylabel="precision", title=f"planted retrieval (seed {results[0]['seed']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "planted_pr.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, v in agg.items():
        if m == "random" or v["seconds"]["mean"] is None:
            continue
        ax.errorbar(max(v["seconds"]["mean"], 1e-3), v["auprc"]["mean"], yerr=v["auprc"]["std"], fmt="o")
        ax.annotate(m, (max(v["seconds"]["mean"], 1e-3), v["auprc"]["mean"]), fontsize=7)
    ax.axhline(agg["random"]["auprc"]["mean"], ls="--", c="gray", label="random")
    ax.set(xscale="log", xlabel="wall time to rank the pool (s, log)", ylabel="AUPRC", title="cost vs quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "planted_time.png", dpi=110)
    plt.close(fig)
    return [str(out / "planted_pr.png"), str(out / "planted_time.png")]


def _same_aggregate(result: dict, p) -> bool:
    """Whether a saved seed ranked the pool the way these settings ask (if not, resuming recomputes it from the saved stores)."""
    saved = {"aggregate": "mean", **result.get("settings", {})}
    return all(saved.get(k) == v for k, v in _aggregate_settings(p).items())


def planted_eval(cfg: Config, out_json: Path | None = None, progress: bool = False, resume: bool = False) -> dict:
    """Every seed of cfg.planted.seeds; with `resume`, a seed that already has a result.json is read,
    not run again (its settings may differ from this call's: each result records its own), unless it
    ranked the pool with another planted.aggregate (then it is recomputed from the saved stores); a
    close-the-loop asked for now, and missing there or made with other close_loop_* settings, is run
    from the seed's saved rankings."""
    results = []
    for s in cfg.planted.seeds:
        done = cfg.run_dir / "planted" / f"seed{s}" / "result.json"
        if not (resume and done.is_file() and _same_aggregate(json.loads(done.read_text()), cfg.planted)):
            results.append(one_seed(cfg, s, progress))
            continue
        r = unknown_times_as_none(json.loads(done.read_text()))
        loop = r.get("close_loop")
        want = _loop_settings(cfg.planted)
        if cfg.planted.close_loop and (loop is None or {k: loop.get(k, d) for k, d in _LOOP_DEFAULTS.items()} != want):
            # asked for now and missing, or asked for with other settings: from the saved rankings
            with np.load(done.parent / "scores.npz") as z:
                saved = {m: z[m.replace(" ", "_")] for m in r["methods"] if m.replace(" ", "_") in z}
            r["close_loop"] = close_loop(cfg, _seed_setup(cfg, s), saved, s, progress)
            done.write_text(json.dumps(r, indent=2, allow_nan=False) + "\n")
        results.append(r)
    agg = _aggregate(results)
    out = cfg.run_dir / "planted"
    report = {"settings": cfg.planted.model_dump(), "model": cfg.model.name, "student": cfg.student.base,
              "gradients": cfg.gradients.model_dump(), "aggregate": agg, "seeds": results}
    report["plots"] = _plots(results, agg, out)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    (out / "planted.json").write_text(text)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(text)
    return report
