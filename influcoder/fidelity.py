"""How well an encoder reproduces the teacher on the held-out block (eval anchors × eval pool),
next to the untrained encoder and a TF-IDF baseline: the rows of the Influcoder paper's table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import Config
from .data import Record, load_split
from .metrics import fidelity, per_anchor_spearman
from .teacher import Teacher


def texts_by_id(cfg: Config) -> dict[str, str]:
    """Every pool and query record's text, by id."""
    out: dict[str, str] = {}
    splits = ["pool"] + (["queries"] if cfg.data.queries else [])
    for split in splits:
        recs: list[Record] = load_split(cfg.data, split)[0]
        for r in recs:
            if r.id in out:
                raise ValueError(f"{r.source}: id '{r.id}' is both a pool row and a query; ids must be unique across them")
            out[r.id] = r.as_text()
    return out


def encode(model, texts: list[str], prompt: str, batch_size: int = 64) -> np.ndarray:
    """(n, dim) unit rows."""
    return model.encode(texts, prompt=prompt, batch_size=batch_size, convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=False)


def encoder_scores(model, anchors: list[str], pool: list[str], cfg: Config) -> tuple[np.ndarray, float]:
    """(student cosine (a, p), ms per pool text)."""
    t0 = time.perf_counter()
    P = encode(model, pool, cfg.student.document_prompt)
    ms = 1000 * (time.perf_counter() - t0) / max(len(pool), 1)
    A = encode(model, anchors, cfg.student.query_prompt)
    return A @ P.T, ms


def tfidf_scores(anchors: list[str], pool: list[str], fit_on: list[str]) -> tuple[np.ndarray, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True).fit(fit_on)
    t0 = time.perf_counter()
    P = vec.transform(pool)
    ms = 1000 * (time.perf_counter() - t0) / max(len(pool), 1)
    return (vec.transform(anchors) @ P.T).toarray(), ms


class HeldOut:
    """The teacher's held-out block with its texts."""

    def __init__(self, cfg: Config, teacher: Teacher, texts: dict[str, str]):
        self.cfg = cfg
        self.Y, a, p = teacher.block(eval_anchors=True, eval_pool=True)
        self.anchors = [texts[teacher.anchor_ids[i]] for i in a]
        self.pool = [texts[teacher.pool_ids[i]] for i in p]
        self.all_pool = [texts[i] for i in teacher.pool_ids]

    def score(self, model) -> tuple[dict, np.ndarray]:
        S, ms = encoder_scores(model, self.anchors, self.pool, self.cfg)
        return {**fidelity(self.Y, S, self.cfg.student.eval_k), "ms_per_sample": round(ms, 3)}, S

    def tfidf(self) -> dict:
        S, ms = tfidf_scores(self.anchors, self.pool, self.all_pool)
        return {**fidelity(self.Y, S, self.cfg.student.eval_k), "ms_per_sample": round(ms, 4)}


def write_report(run_dir: Path, report: dict, Y: np.ndarray, S: np.ndarray, S0: np.ndarray | None) -> None:
    """fidelity.json + fidelity.png (teacher vs student scores, per-anchor ρ, ρ per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "fidelity.json.part"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run_dir / "fidelity.json")

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    rng = np.random.default_rng(0)
    idx = rng.choice(Y.size, size=min(Y.size, 5000), replace=False)
    ax[0].scatter(Y.ravel()[idx], S.ravel()[idx], s=3, alpha=0.4)
    ax[0].set(xlabel="teacher score (gradient cosine)", ylabel="student cosine", title="held-out anchors × pool")
    bins = np.linspace(-1, 1, 41)
    ax[1].hist(per_anchor_spearman(Y, S), bins=bins, alpha=0.7, label="trained student")
    if S0 is not None:
        ax[1].hist(per_anchor_spearman(Y, S0), bins=bins, alpha=0.5, label="untrained")
    ax[1].set(xlabel="Spearman ρ per anchor", ylabel="anchors", title="per-anchor fidelity")
    ax[1].legend()
    ep = report.get("epochs", [])
    if ep:
        ax[2].plot([e["epoch"] for e in ep], [e["per_anchor_spearman"] for e in ep], marker="o", label="per-anchor ρ")
        ax[2].plot([e["epoch"] for e in ep], [e["aggregated_spearman"] for e in ep], marker="s", label="aggregated ρ")
        ax[2].legend()
    ax[2].set(xlabel="epoch (0 = untrained)", ylabel="ρ on held-out block", title="fidelity per epoch")
    fig.tight_layout()
    fig.savefig(run_dir / "fidelity.png.part.png", dpi=110)
    plt.close(fig)
    (run_dir / "fidelity.png.part.png").replace(run_dir / "fidelity.png")


def eval_fidelity(cfg: Config, encoder: str | None = None) -> dict:
    """Recompute the held-out fidelity of any encoder (default: the run's trained student)."""
    from .distill import encoder_path
    from .models import load_encoder
    from .teacher import teacher_path

    teacher = Teacher.open(teacher_path(cfg))
    held = HeldOut(cfg, teacher, texts_by_id(cfg))
    name = encoder or str(encoder_path(cfg))
    row, _ = held.score(load_encoder(name, seed=cfg.student.seed))
    return {"encoder": name, "sizes": {"eval_anchors": len(held.anchors), "eval_pool": len(held.pool)},
            "student": row, "tfidf": held.tfidf()}
