"""The query engine: "which training examples caused this?" for texts or prompt/response pairs.

One encoder pass (query prompt) + one FAISS search per batch of inputs. Scores are student
cosines in [-1, 1], higher = more implicated; with `rerank=True` the top K′ candidates are
re-scored with the teacher itself (cosine of the decoder's LoRA gradients, the same space as the
run's gradient store) and re-ordered by that score. Every answer carries an out-of-distribution
signal: the query's best match is compared with the best matches of the queries the student was
distilled on; the student's rankings are only trustworthy near that distribution.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .config import Config, IndexConfig
from .data import Record
from .index import IndexVersion, dir_sha256, encoder_dir, load_student, open_index, run_config, search, tune
from .teacher_score import ScoreTransform, raw_rows

OOD_NOTE = ("The best match is weaker than for almost all queries the student was distilled on: the student is "
            "off its training distribution, so treat these rankings as weak evidence (re-rank with the teacher if you can).")


class InputError(ValueError):
    """An input the engine cannot use; `field` names it (e.g. `inputs.2.response`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class RerankUnavailable(RuntimeError):
    """The run's gradient store or decoder is not at hand, so the teacher cannot re-rank."""


def pin_threads(ic: IndexConfig) -> None:
    """faiss-cpu's OpenMP pool and torch's can oversubscribe the cores and slow torch badly:
    give faiss few threads and torch the rest, explicitly."""
    import torch

    faiss.omp_set_num_threads(max(1, ic.faiss_threads))
    torch.set_num_threads(ic.torch_threads or os.cpu_count() or 1)


def input_record(inp: dict[str, Any], i: int = 0) -> Record:
    """`{"text": ...}` or `{"prompt": ..., "response": ...}` → Record (loss on all tokens / the response)."""
    if not isinstance(inp, dict):
        raise InputError(f"inputs.{i}", "must be an object with `text`, or `prompt` and `response`")
    for key in ("text", "prompt", "response"):
        if inp.get(key) is not None and (not isinstance(inp[key], str) or not inp[key].strip()):
            raise InputError(f"inputs.{i}.{key}", "must be a non-empty string")
    if inp.get("text") is not None:
        if inp.get("prompt") is not None or inp.get("response") is not None:
            raise InputError(f"inputs.{i}.text", "give `text` or `prompt` + `response`, not both")
        return Record(f"query-{i}", text=inp["text"], source=f"inputs.{i}")
    for key in ("prompt", "response"):
        if inp.get(key) is None:
            raise InputError(f"inputs.{i}.{key}", "is required (give `text`, or both `prompt` and `response`)")
    return Record(f"query-{i}", prompt=inp["prompt"], response=inp["response"], source=f"inputs.{i}")


class TeacherScorer:
    """Exact teacher scores: the query's sketched LoRA gradient (decoder backward, the run's
    settings) against the stored pool rows of the candidates, with the teacher's score correction
    (teacher.zarr's score_transform*.npz; plain cosine when the run has no teacher). With
    `teacher.checkpoints`, one decoder per checkpoint and the learning-rate-weighted mean."""

    def __init__(self, cfg: Config):
        from .gradient_job import GradientWorker, checkpoint_configs, default_store_path
        from .store import GradStore, StoreMismatch, check_compatible
        from .teacher import teacher_path, transform_file

        self.parts = []  # (weight, worker, store, transform)
        try:
            sources = checkpoint_configs(cfg)
            for k, (scfg, w) in enumerate(sources):
                path = default_store_path(scfg, "pool")
                if not Path(path).exists():
                    raise RerankUnavailable(f"{path}: no pool gradient store, so the teacher cannot re-rank")
                store = GradStore.open(path)
                store.require_complete()
                worker = GradientWorker(scfg, "queries")  # split != pool: loads (never estimates) a preconditioner
                worker.setup_preconditioner([])
                m = worker.manifest({})
                check_compatible(store.manifest, m, what="the pool gradient store and this engine's decoder")
                p, q = store.manifest.get("preconditioner", {}), m["preconditioner"]
                if p.get("kind") != q.get("kind") or p.get("sha256") != q.get("sha256"):
                    raise StoreMismatch(f"pool gradients used preconditioner {p}, the engine has {q}")
                tf = teacher_path(cfg) / transform_file(k)
                self.parts.append((w, worker, store, ScoreTransform.load(tf) if tf.is_file() else ScoreTransform("cosine")))
        except RerankUnavailable:
            raise
        except (ValueError, RuntimeError, OSError, KeyError) as e:  # ModelError, StoreMismatch, PreconditionerError, …
            raise RerankUnavailable(f"the teacher cannot re-rank with the run at {cfg.run_dir}: {e}") from e
        pin_threads(cfg.index)  # the worker set torch's threads for gradient jobs
        self.cfg = cfg
        self.weight = sum(w for w, *_ in self.parts)
        self.ids = self.parts[0][2].ids()
        self.row_of = {x: i for i, x in enumerate(self.ids)}
        self.lock = threading.Lock()  # the decoder's hooks are not re-entrant

    def scores(self, records: list[Record], candidates: list[list[str]]) -> list[dict[str, float]]:
        """Per query, {candidate id: teacher score} for candidates that have a stored gradient."""
        from .tokenization import tokenize_records

        rows = [sorted({self.row_of[c] for c in cands if c in self.row_of}) for cands in candidates]
        total = [np.zeros(len(r)) for r in rows]
        # every checkpoint shares the base model's tokenizer: tokenize once
        ex, _ = tokenize_records(records, self.parts[0][1].decoder.tokenizer, self.cfg.data.max_length, self.cfg.data.chat_template)
        for w, worker, store, tf in self.parts:
            with self.lock:
                V = tf.query(worker.vectors(ex)[0])  # (n_queries, d) unit rows
            for t, v, have in zip(total, V, rows):
                if have:
                    t += (w / self.weight) * (tf.pool(raw_rows(store, have)) @ v)  # (m,) corrected cosines
        return [dict(zip([self.ids[r] for r in have], t.tolist())) for t, have in zip(total, rows)]


class Engine:
    def __init__(self, version: IndexVersion, model, cfg: Config, run_dir: Path | None):
        self.version, self.model, self.cfg, self.run_dir = version, model, cfg, run_dir
        self.path = version.path
        self.manifest = version.manifest
        self.prompts: dict[str, str] = self.manifest["encoder"]["prompts"]
        self.records = version.records
        self.fids = self.records.column("fid").to_numpy()  # ascending: build, add and remove keep the order
        self.row_of_id = {x: i for i, x in enumerate(self.records.column("id").to_pylist())}
        ood = self.manifest.get("ood") or {}
        self.ood_ref = np.asarray(ood.get("reference", []), np.float32)  # sorted top-1 scores of the anchors
        self.encode_lock = threading.Lock()
        self._teacher: TeacherScorer | None = None
        self._teacher_lock = threading.Lock()
        self.overrides: list[str] = []

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, index_dir: str | Path, run_dir: str | Path | None = None, device: str = "auto",
             overrides: list[str] | None = None, mmap: bool = True) -> "Engine":
        """Open one consistent version of `index_dir` (memory-mapped) and its student.
        `run_dir`: where the run (gradient store, decoder settings) is now, for re-ranking.
        `overrides`: `--set`-style changes to the run config saved in the manifest, for run-time
        knobs (`index.torch_threads=2`, `index.hnsw_ef_search=256`, `service.max_batch=16`, …)."""
        d = Path(index_dir)
        for _ in range(20):
            v = open_index(d, mmap=mmap)
            cfg = run_config(v.manifest["run"]["config"], overrides)
            pin_threads(cfg.index)
            enc = encoder_dir(d, v.manifest)
            if not v.manifest["encoder"]["copied"] and dir_sha256(enc) != v.manifest["encoder"]["sha256"]:
                raise ValueError(f"{enc}: the encoder changed since the index was built (sha256 differs); rebuild the index")
            model = load_student(enc, device=device)
            if json.loads((d / "manifest.json").read_text()).get("build_id") == v.manifest["build_id"]:
                break  # the encoder we read belongs to this version
            time.sleep(0.02)
        else:
            raise ValueError(f"{d}: the index kept changing while loading")
        tune(v.index, cfg.index)
        if cfg.index.use_gpu and faiss.get_num_gpus() > 0:
            try:
                v.index = faiss.index_cpu_to_all_gpus(v.index)
                v.read_mode += "+gpu"
            except RuntimeError:
                pass  # e.g. HNSW has no GPU version: stay on the CPU
        rd = Path(run_dir) if run_dir else Path(v.manifest["run"]["run_dir"])
        cfg.out_dir, cfg.name = str(rd.parent), rd.name
        eng = cls(v, model, cfg, rd)
        eng.overrides = list(overrides or [])
        return eng

    def reload(self) -> "Engine":
        """A fresh engine for the same folder, run and overrides (the folder may hold a newer version)."""
        return Engine.load(self.path, self.run_dir, overrides=self.overrides)

    @property
    def build_id(self) -> str:
        return self.manifest["build_id"]

    @property
    def count(self) -> int:
        return int(self.version.index.ntotal)

    def info(self) -> dict:
        """The manifest without the OOD reference list (long), plus how the index is held."""
        m = json.loads(json.dumps(self.manifest))
        if m.get("ood"):
            m["ood"].pop("reference", None)
        m["run"]["config"].get("service", {}).pop("api_key", None)
        return {**m, "read_mode": self.version.read_mode, "rerank_available": self.rerank_available()}

    # --- pieces ----------------------------------------------------------------------------------

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 unit rows, in batches of `index.embed_batch_size`."""
        from .index import embed

        with self.encode_lock:
            return embed(self.model, texts, self.prompts["query"], self.cfg.index.embed_batch_size)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """q (m, dim) → (scores (m, k), fids (m, k)). OpenMP's thread count is per calling thread,
        so it is pinned here, in whichever thread (a server's worker pool) runs the search."""
        faiss.omp_set_num_threads(max(1, self.cfg.index.faiss_threads))
        return search(self.version.index, q, k)

    def _rows(self, fids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.fids, fids)
        ok = (rows < len(self.fids)) & (self.fids[np.minimum(rows, len(self.fids) - 1)] == fids)
        return np.where(ok, rows, -1)

    def _hits(self, scores: np.ndarray, fids: np.ndarray) -> list[dict]:
        """One query's search row → [{id, score, rank, preview, source, metadata}] (rank from 1)."""
        keep = fids >= 0
        rows = self._rows(fids[keep])
        sc = scores[keep][rows >= 0]
        recs = self.records.take(rows[rows >= 0]).to_pylist()
        return [{"id": r["id"], "score": round(float(s), 6), "rank": i + 1, "preview": r["preview"], "source": r["source"],
                 "metadata": json.loads(r["metadata"])} for i, (s, r) in enumerate(zip(sc, recs))]

    def ood(self, top1: float | None) -> dict:
        """{ood, ood_percentile, top1_score}: the percentile of the query's best-match score among
        the distillation anchors' best-match scores; below `index.ood_percentile` ⇒ out of distribution."""
        if top1 is None or not len(self.ood_ref):
            return {"ood": None, "ood_percentile": None, "top1_score": top1}
        pct = 100.0 * float(np.searchsorted(self.ood_ref, top1, side="right")) / len(self.ood_ref)
        out: dict[str, Any] = {"ood": pct < self.cfg.index.ood_percentile, "ood_percentile": round(pct, 2), "top1_score": round(top1, 6)}
        if out["ood"]:
            out["note"] = OOD_NOTE
        return out

    def rerank_available(self) -> bool:
        from .gradient_job import checkpoint_configs, default_store_path

        if self._teacher is not None:
            return True
        try:
            return all(Path(default_store_path(c, "pool")).exists() for c, _ in checkpoint_configs(self.cfg))
        except (ValueError, RuntimeError):  # ModelError: the fine-tune lacks the checkpoints the teacher names
            return False

    def teacher(self) -> TeacherScorer:
        with self._teacher_lock:
            if self._teacher is None:
                self._teacher = TeacherScorer(self.cfg)
            return self._teacher

    # --- queries ---------------------------------------------------------------------------------

    def attribute(self, inputs: list[dict[str, Any]], k: int = 10, rerank: bool = False, rerank_k: int | None = None) -> list[dict]:
        """Per input: {results: ranked [{id, score, rank, preview, source, metadata}], scores, ood, …}."""
        records = [input_record(x, i) for i, x in enumerate(inputs)]
        return self.answer(records, self.embed_queries([r.as_text() for r in records]), k, rerank, rerank_k)

    def answer(self, records: list[Record], q: np.ndarray, k: int, rerank: bool = False, rerank_k: int | None = None) -> list[dict]:
        """`attribute` from precomputed query embeddings q (n, dim) (the service batches the encoder)."""
        if k < 1:
            raise InputError("k", "must be at least 1")
        kk = max(k, rerank_k or self.cfg.index.rerank_k) if rerank else k
        D, I = self.search(q, kk)  # (n, kk)
        hits = [self._hits(D[i], I[i]) for i in range(len(records))]
        out = []
        if rerank:
            teacher = self.teacher()
            exact = teacher.scores(records, [[h["id"] for h in hs] for hs in hits])
            kind = teacher.parts[0][3].kind  # the score teacher.zarr was built with, not today's config default
            hits = [self._rerank(hs, ex) for hs, ex in zip(hits, exact)]
        for hs in hits:
            top1 = max((h.get("student_score", h["score"]) for h in hs), default=None)
            out.append({"results": hs[:k], "scores": f"teacher gradient {kind} (re-ranked)" if rerank else "student cosine",
                        **self.ood(top1)})
        return out

    @staticmethod
    def _rerank(hits: list[dict], exact: dict[str, float]) -> list[dict]:
        """Teacher-scored candidates first, by teacher cosine; candidates without a stored gradient
        (added after the run) follow in student order, marked `score_kind: student`."""
        scored = [{**h, "student_score": h["score"], "score": round(exact[h["id"]], 6), "score_kind": "teacher"} for h in hits if h["id"] in exact]
        rest = [{**h, "student_score": h["score"], "score_kind": "student"} for h in hits if h["id"] not in exact]
        scored.sort(key=lambda h: -h["score"])
        return [{**h, "rank": i + 1} for i, h in enumerate(scored + rest)]

    def example(self, id_: str) -> dict | None:
        row = self.row_of_id.get(id_)
        if row is None:
            return None
        r = self.records.slice(row, 1).to_pylist()[0]
        return {"id": r["id"], "preview": r["preview"], "source": r["source"], "metadata": json.loads(r["metadata"])}
