"""The attribution index: FAISS over the student's embeddings of the training pool.

`index/<name>/` holds
  faiss.index      inner product on unit rows (= cosine); int64 faiss ids ("fid") name the rows of
  records.parquet  fid, id (the dataset's string id), preview, source (file:line), metadata (JSON)
  encoder/         the student that embedded the pool (or, with `copy_encoder: false`, a reference
                   to the run's encoder by path + sha256, checked on load)
  manifest.json    counts, encoder hash + prompts, run/teacher/gradient settings, factory string,
                   the OOD calibration, a fresh `build_id` per version, and a history of add/remove.

Every write (build, add, remove) assembles a whole folder next to the target, then renames the old
version aside, renames the new one in, and deletes the old one: a reader sees the old version, the
new one, or (for the instant between the two renames) none, never half of one. `open_index` reads
the manifest before and after the other files and retries when the build id changed, so it never
mixes two versions. GPU: install `faiss-gpu-cu12` instead of `faiss-cpu` (same `faiss` module) and
the engine moves Flat/IVF indexes to the GPUs it sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from .config import Config, ConfigError, IndexConfig, apply_overrides
from .data import Record

FORMAT_VERSION = 1
FILES = ("faiss.index", "records.parquet", "manifest.json")


class IndexStoreError(ValueError):
    """An index folder that is missing, inconsistent, or asked to do something it cannot."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def index_dir(cfg: Config, name: str | None = None) -> Path:
    return Path(cfg.index.root) / (name or cfg.index.name)


def resolve_index(spec: str | Path, root: str | Path = "index") -> Path:
    """A folder holding manifest.json, or a bare name under `root`."""
    for cand in (Path(spec), Path(root) / str(spec)):
        if (cand / "manifest.json").is_file():
            return cand
    raise IndexStoreError(f"{spec}: no index there (no manifest.json); build one with `influcoder index build CONFIG`")


def run_config(saved: dict, overrides: list[str] | None = None) -> Config:
    """The run config saved in a manifest, plus overrides. Keys this version no longer knows
    (an index built by another influcoder version) are dropped rather than refusing to load."""
    raw = apply_overrides(json.loads(json.dumps(saved)), overrides or [])
    for _ in range(50):
        try:
            return Config.model_validate(raw)
        except ValidationError as e:
            extra = [x["loc"] for x in e.errors() if x["type"] == "extra_forbidden"]
            bad = [x for x in e.errors() if x["type"] != "extra_forbidden"]
            if bad or not extra:
                raise ConfigError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in (bad or e.errors()))) from None
            for loc in extra:
                node = raw
                for part in loc[:-1]:
                    node = node[part]
                node.pop(loc[-1], None)
    raise ConfigError("run config in the manifest could not be read")


# --- FAISS -------------------------------------------------------------------------------------

def auto_factory(n: int, ic: IndexConfig) -> str:
    """Exact Flat for small pools; graph (HNSW) for mid-size; IVF + 8-bit SQ for large ones."""
    if n <= ic.auto_flat_max:
        return "Flat"
    if n <= ic.auto_hnsw_max:
        return "HNSW32"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(n))))
    return f"IVF{nlist},SQ8"


def make_index(factory: str, dim: int, train: np.ndarray | None = None) -> faiss.Index:
    """An empty index that takes our int64 ids. IVF indexes keep ids natively; anything else is
    wrapped in IDMap2 (IDMap over IVF would renumber wrongly on remove)."""
    base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        if train is None or len(train) == 0:
            raise IndexStoreError(f"factory {factory!r} needs training vectors")
        base.train(np.ascontiguousarray(train, dtype=np.float32))
    if factory.startswith("IDMap") or faiss.try_extract_index_ivf(base) is not None:
        return base
    return faiss.IndexIDMap2(base)


def tune(index: faiss.Index, ic: IndexConfig) -> None:
    """Search-time knobs: HNSW efSearch, IVF nprobe (no-ops for other kinds)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ic.hnsw_ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ic.ivf_nprobe, ivf.nlist)


def stored_ids(index: faiss.Index) -> np.ndarray:
    """(ntotal,) int64 fids in the index's internal order."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.invlists
    out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def _without(index: faiss.Index, factory: str, drop: np.ndarray) -> faiss.Index:
    """Remove fids; kinds that cannot (HNSW) are rebuilt from their own stored vectors."""
    try:
        index.remove_ids(faiss.IDSelectorBatch(drop.astype(np.int64)))
        return index
    except RuntimeError:
        pass
    fids = stored_ids(index)
    keep = ~np.isin(fids, drop)
    vecs = index.index.reconstruct_n(0, index.ntotal)[keep]  # (n_keep, d)
    new = make_index(factory, index.d, vecs)
    new.add_with_ids(vecs, fids[keep])
    return new


def read_faiss(path: Path, mmap: bool = True) -> tuple[faiss.Index, str]:
    """(index, how it was read). Flat codes map zero-copy with IO_FLAG_MMAP_IFC, IVF lists and
    HNSW graphs with IO_FLAG_MMAP; a kind that supports neither is read into memory."""
    flags = [("mmap_ifc", faiss.IO_FLAG_MMAP_IFC), ("mmap", faiss.IO_FLAG_MMAP)] if mmap else []
    for name, flag in flags + [("memory", 0)]:
        try:
            return faiss.read_index(str(path), flag), name
        except RuntimeError:
            if flag == 0:
                raise
    raise AssertionError("unreachable")


def search(index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """q (m, d) unit rows → (scores (m, k'), fids (m, k')) with k' = min(k, ntotal); -1 = none."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(q, dtype=np.float32), k)


# --- embedding ---------------------------------------------------------------------------------

def load_student(path: str | Path, device: str = "auto"):
    from .models import load_encoder

    return load_encoder(str(path), device=device)


def prompts_of(model, cfg: Config) -> dict[str, str]:
    p = getattr(model, "prompts", None) or {}
    return {"query": p.get("query", cfg.student.query_prompt), "document": p.get("document", cfg.student.document_prompt)}


def embed(model, texts: list[str], prompt: str, batch_size: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows; batch_size 0: 8 on a CPU, 64 on a GPU (see index.embed_batch_size)."""
    from .fidelity import encode

    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
    bs = batch_size or (64 if model.device.type == "cuda" else 8)
    return np.ascontiguousarray(encode(model, texts, prompt, bs), dtype=np.float32)


def dir_sha256(path: Path) -> str:
    """Hash of every file's relative path and bytes (the encoder's identity)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def encoder_dir(d: Path, manifest: dict) -> Path:
    enc = manifest["encoder"]
    return d / "encoder" if enc["copied"] else Path(enc["path"])


# --- records -----------------------------------------------------------------------------------

def _preview(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(n - 1, 0)].rstrip() + "…"


def records_table(fids: np.ndarray, records: list[Record], preview_chars: int) -> pa.Table:
    return pa.table({
        "fid": pa.array(fids, pa.int64()),
        "id": pa.array([r.id for r in records], pa.string()),
        "preview": pa.array([_preview(r.as_text(), preview_chars) for r in records], pa.string()),
        "source": pa.array([r.source for r in records], pa.string()),
        "metadata": pa.array([json.dumps(r.meta, ensure_ascii=False, default=str) for r in records], pa.string()),
    })


# --- atomic folders ----------------------------------------------------------------------------

def atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Run fill(tmp) on a fresh sibling folder, then swap it in for `target`. On any error the
    temp folder is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        fill(tmp)
        old = target.with_name(f".{target.name}.old-{tag}")
        had = target.exists()
        if had:
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if had:
                old.rename(target)
            raise
        if had:
            shutil.rmtree(old, ignore_errors=True)  # mapped files stay readable by open readers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_version(tmp: Path, index: faiss.Index, table: pa.Table, manifest: dict) -> None:
    faiss.write_index(index, str(tmp / "faiss.index"))
    pq.write_table(table.replace_schema_metadata({"build_id": manifest["build_id"]}), tmp / "records.parquet")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(d: Path) -> dict:
    try:
        m = json.loads((Path(d) / "manifest.json").read_text())
    except FileNotFoundError:
        raise IndexStoreError(f"{d}: no index there (no manifest.json)") from None
    if m.get("format") != FORMAT_VERSION:
        raise IndexStoreError(f"{d}: index format {m.get('format')} is not {FORMAT_VERSION}; rebuild it")
    return m


@dataclass
class IndexVersion:
    """One consistent version of an index folder."""

    path: Path
    manifest: dict
    index: faiss.Index
    records: pa.Table
    read_mode: str


def open_index(d: str | Path, mmap: bool = True, attempts: int = 50) -> IndexVersion:
    """Read manifest, FAISS index and records of one version (retrying across a concurrent swap)."""
    d = Path(d)
    for _ in range(attempts):
        try:
            m1 = read_manifest(d)
            index, mode = read_faiss(d / "faiss.index", mmap)
            table = pq.read_table(d / "records.parquet")
            m2 = read_manifest(d)
        except (IndexStoreError, FileNotFoundError, RuntimeError, OSError):
            time.sleep(0.05)  # a swap is between its two renames
            continue
        meta = table.schema.metadata or {}
        if m1["build_id"] == m2["build_id"] == meta.get(b"build_id", b"").decode():
            if not (index.ntotal == table.num_rows == m1["count"]):
                raise IndexStoreError(f"{d}: faiss has {index.ntotal} rows, records {table.num_rows}, manifest {m1['count']}")
            return IndexVersion(d, m1, index, table, mode)
        time.sleep(0.01)
    read_manifest(d)  # a clear error when it is simply not an index
    raise IndexStoreError(f"{d}: could not read a consistent version (is something rewriting it in a loop?)")
