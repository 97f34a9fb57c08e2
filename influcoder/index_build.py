"""Building and changing an index: `build_index` (a whole version from a run), `add_records` and
`remove_ids` (a new version from the current one). Writers take a lock on the index folder; every
write is a whole folder renamed into place (see `index`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from . import __version__
from .config import Config
from .data import Record
from .index import (FORMAT_VERSION, IndexStoreError, IndexVersion, _now, _without, _write_version, atomic_dir,
                    auto_factory, dir_sha256, embed, encoder_dir, index_dir, load_student, make_index, open_index,
                    prompts_of, records_table, run_config, search, tune)


# --- build / add / remove ------------------------------------------------------------------------

def _run_summary(cfg: Config) -> dict[str, Any]:
    """What the run says about the scores: gradient, teacher and fidelity settings (when present)."""
    from .gradient_job import default_store_path
    from .teacher import teacher_path

    config = cfg.model_dump(mode="json")
    config["service"]["api_key"] = None  # never store a secret in a file the API serves
    out: dict[str, Any] = {"run_dir": str(cfg.run_dir.resolve()), "config": config}
    gpath = default_store_path(cfg, "pool")
    if gpath.exists():
        from .store import GradStore

        gm = GradStore.open(gpath).manifest
        out["gradients"] = {k: gm.get(k) for k in ("model", "loss", "sketch", "preconditioner", "a_gradients")}
        out["gradients"]["dataset_fingerprint"] = gm["dataset"]["fingerprint"]
    tpath = teacher_path(cfg)
    if tpath.exists():
        import zarr

        tm = dict(zarr.open_group(str(tpath), mode="r").attrs["manifest"])
        out["teacher"] = {k: tm.get(k) for k in ("score", "n_anchors", "n_anchors_from_pool", "n_pool", "eval_fraction", "created")}
    fpath = cfg.run_dir / "fidelity.json"
    if fpath.is_file():
        rep = json.loads(fpath.read_text())
        out["fidelity"] = {"student": rep["rows"]["student"], "tfidf": rep["rows"].get("tfidf"), "best_epoch": rep.get("best_epoch")}
    return out


def calibrate_ood(cfg: Config, model, index: faiss.Index, fid_to_id: dict[int, str], prompt: str) -> dict | None:
    """Top-1 similarity of the run's teacher anchors (the distillation queries) to the pool,
    excluding an anchor's own row: the reference distribution of an in-distribution query."""
    from .fidelity import texts_by_id
    from .teacher import Teacher, teacher_path

    if not teacher_path(cfg).exists() or index.ntotal < 2:
        return None
    anchors = Teacher.open(teacher_path(cfg)).anchor_ids
    texts = texts_by_id(cfg)
    q = embed(model, [texts[a] for a in anchors], prompt, cfg.index.embed_batch_size)
    D, I = search(index, q, 2)  # (n_anchors, 2)
    top = [next(float(s) for s, f in zip(D[i], I[i]) if f >= 0 and fid_to_id.get(int(f)) != a) for i, a in enumerate(anchors)]
    ref = np.sort(np.asarray(top, np.float32))
    if len(ref) > 1000:
        ref = np.quantile(ref, np.linspace(0, 1, 1000)).astype(np.float32)
    return {"method": "top-1 cosine of the run's teacher anchors to the pool (own row excluded)", "n_anchors": len(anchors),
            "reference": [round(float(x), 5) for x in ref], "percentile_threshold": cfg.index.ood_percentile}


def pool_vectors(cfg: Config, model, enc: Path, records: list[Record], prompt: str, embeddings: str | Path | None,
                 workers: int | None) -> np.ndarray:
    """(n, dim) unit rows of the pool: embedded here, or read from an embedding store (the Ray
    embedding job, `influcoder.embed`; run first with `workers` Ray workers) after checking that it
    holds these records, this prompt and this encoder."""
    if workers:
        from .embed import embed_pool

        embeddings = cfg.run_dir / "pool-embeddings.zarr"
        embed_pool(cfg, str(enc), embeddings, prompt, shard_size=1024, progress=False, num_workers=workers)
    if embeddings is None:
        return embed(model, [r.as_text() for r in records], prompt, cfg.index.embed_batch_size)
    from .embed import EmbedStore, encoder_fingerprint

    st = EmbedStore.open(embeddings)
    m = st.manifest
    if st.ids() != [r.id for r in records]:
        raise IndexStoreError(f"{embeddings}: embeds other records than {cfg.data.path}")
    if m["prompt"] != prompt or m["encoder"].get("weights_sha256") != encoder_fingerprint(str(enc)).get("weights_sha256"):
        raise IndexStoreError(f"{embeddings}: made with another encoder or prompt ({m['encoder']}, {m['prompt']!r})")
    X = st.vectors().astype(np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def build_index(cfg: Config, name: str | None = None, factory: str | None = None, out: str | Path | None = None,
                embeddings: str | Path | None = None, workers: int | None = None) -> Path:
    """Embed the configured pool with the run's student (or take its vectors from `embeddings`, or
    from a Ray embedding job with `workers` workers) and write `index/<name>/` atomically."""
    from .data import load_records
    from .distill import encoder_path

    ic = cfg.index
    enc = encoder_path(cfg)
    if not (enc / "modules.json").is_file():
        raise IndexStoreError(f"{enc}: no trained student; run `influcoder distill CONFIG` first")
    target = Path(out) if out else index_dir(cfg, name)
    records = load_records(cfg.data)[0]
    model = load_student(enc)
    prompts = prompts_of(model, cfg)
    X = pool_vectors(cfg, model, enc, records, prompts["document"], embeddings, workers)  # (n, dim)
    n, dim = X.shape
    requested = factory or ic.factory
    fac = auto_factory(n, ic) if requested == "auto" else requested
    rng = np.random.default_rng(cfg.seed)
    sample = X[rng.choice(n, size=min(n, ic.train_sample), replace=False)] if n else X
    index = make_index(fac, dim, sample)
    fids = np.arange(n, dtype=np.int64)
    index.add_with_ids(X, fids)
    tune(index, ic)
    sha = dir_sha256(enc)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION, "name": target.name, "build_id": uuid.uuid4().hex, "created": _now(), "updated": _now(),
        "influcoder_version": __version__, "faiss_version": faiss.__version__,
        "count": n, "dim": dim, "next_fid": n, "factory": fac, "factory_requested": requested,
        "metric": "inner product of unit rows (cosine)", "id_map": type(index).__name__,
        "encoder": {"copied": ic.copy_encoder, "path": "encoder" if ic.copy_encoder else str(enc.resolve()), "sha256": sha,
                    "prompts": prompts, "base": cfg.student.base, "dim": dim},
        "data": {"path": cfg.data.path, "n_records": n},
        "run": _run_summary(cfg),
        "ood": calibrate_ood(cfg, model, index, {i: r.id for i, r in enumerate(records)}, prompts["query"]),
        "history": [{"op": "build", "count": n, "at": _now()}],
    }
    table = records_table(fids, records, ic.preview_chars)

    def fill(tmp: Path) -> None:
        if ic.copy_encoder:
            shutil.copytree(enc, tmp / "encoder")
        _write_version(tmp, index, table, manifest)

    with writer_lock(target):
        atomic_dir(target, fill)
    return target


@contextmanager
def writer_lock(d: Path) -> Iterator[None]:
    """One writer per index at a time (an flock on a sibling file): two concurrent add/remove
    calls would otherwise both start from the same version and one change would be lost."""
    d = Path(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.with_name(f".{d.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rewrite(d: Path, v: IndexVersion, index: faiss.Index, table: pa.Table, event: dict, next_fid: int) -> dict:
    """Write a new version of `d` with the same encoder (hard links when it was copied)."""
    m = dict(v.manifest)
    m.update(build_id=uuid.uuid4().hex, updated=_now(), count=index.ntotal, next_fid=next_fid,
             history=m.get("history", []) + [{**event, "at": _now()}])

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def fill(tmp: Path) -> None:
        if m["encoder"]["copied"]:
            shutil.copytree(d / "encoder", tmp / "encoder", copy_function=link)
        _write_version(tmp, index, table, m)

    atomic_dir(d, fill)
    return m


def add_records(d: str | Path, records: list[Record], batch_size: int = 0) -> dict:
    """Embed `records` with the index's student (no backward pass) and append them. New rows get
    fids above every fid ever used, so a removed row's fid is never reused."""
    d = Path(d)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise IndexStoreError(f"{d}: the records to add repeat ids, e.g. {[x for x in ids if ids.count(x) > 1][:5]}")
    with writer_lock(d):
        v = open_index(d, mmap=False)
        have = set(v.records.column("id").to_pylist())
        dup = [x for x in ids if x in have]
        if dup:
            raise IndexStoreError(f"{d}: {len(dup)} id(s) already in the index, e.g. {dup[:5]}; remove them first to replace them")
        model = load_student(encoder_dir(d, v.manifest))
        X = embed(model, [r.as_text() for r in records], v.manifest["encoder"]["prompts"]["document"], batch_size)  # (m, dim)
        start = v.manifest["next_fid"]
        fids = np.arange(start, start + len(records), dtype=np.int64)
        if len(records):
            v.index.add_with_ids(X, fids)
        preview = run_config(v.manifest["run"]["config"]).index.preview_chars
        table = pa.concat_tables([v.records.replace_schema_metadata(None), records_table(fids, records, preview)])
        return _rewrite(d, v, v.index, table, {"op": "add", "n": len(records)}, start + len(records))


def remove_ids(d: str | Path, ids: list[str], missing_ok: bool = False) -> dict:
    """Take examples out (take-down requests): from the FAISS index and from records.parquet."""
    d = Path(d)
    with writer_lock(d):
        v = open_index(d, mmap=False)
        id_col = v.records.column("id").to_pylist()
        want = set(ids)
        missing = sorted(want - set(id_col))
        if missing and not missing_ok:
            raise IndexStoreError(f"{d}: {len(missing)} id(s) not in the index: {missing[:10]}")
        keep = np.array([i not in want for i in id_col], bool)
        drop = v.records.column("fid").to_numpy()[~keep]
        index = _without(v.index, v.manifest["factory"], drop) if len(drop) else v.index
        tune(index, run_config(v.manifest["run"]["config"]).index)
        table = v.records.replace_schema_metadata(None).filter(pa.array(keep))
        m = _rewrite(d, v, index, table, {"op": "remove", "n": int(len(drop)), "missing": len(missing)}, v.manifest["next_fid"])
        return {**m, "removed": int(len(drop)), "missing": missing}
