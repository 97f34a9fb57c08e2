"""Embedding job: a pool's texts → an (n, dim) float32 zarr array + ids, for the index builder.

The same pattern as the gradient job (see `ray_jobs`): N Ray worker actors each load the
sentence-transformers encoder once, take shards (one zarr chunk each) from the driver, write them,
and mark them done; a worker that dies has its shard redone elsewhere; a rerun resumes.
`num_workers=0` runs the same worker class in this process (debugging, notebooks, `memory://`).

Store: `emb` (n, dim) float32 (chunks of `shard_size` rows), `ids` (n,) str, `done` (n_shards,)
bool; `attrs["manifest"]` names the encoder, prompt and dataset fingerprint, and a rerun with
other settings is refused instead of mixing two encoders' vectors.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from . import __version__
from .config import Config
from .ray_jobs import JobFailed, RayJobSummary, ShardActor, init_ray, is_url, resolve_out, run_actors, shard_info, worker_options
from .store import ShardedStore, check_compatible

SCHEMA_VERSION = 1
RESUME_KEYS = ("schema", "encoder", "prompt", "dataset", "shard_size", "dim")


class EmbedStore(ShardedStore):
    ROWS = "emb"
    KIND = "embeddings"
    SCHEMA = SCHEMA_VERSION
    RESUME = RESUME_KEYS

    @classmethod
    def _create_arrays(cls, g: zarr.Group, n: int, dim: int, shard_size: int) -> None:
        g.create_array("emb", shape=(n, dim), chunks=(shard_size, dim), dtype="float32", fill_value=0)

    def write_shard(self, s: int, vectors: np.ndarray) -> None:
        rows = self.shard_rows(s)
        if vectors.shape != (len(rows), self.dim):
            raise ValueError(f"shard {s}: expected {(len(rows), self.dim)}, got {vectors.shape}")
        self.group["emb"][rows.start:rows.stop] = vectors.astype(np.float32)
        self.group["done"][s] = True  # only after the rows: a crash in between redoes the shard

    def vectors(self, rows: slice | None = None) -> np.ndarray:
        """(n, dim) float32; refuses a store with shards still to compute."""
        if self.pending():
            raise ValueError(f"{self.path}: {len(self.pending())} of {self.n_shards} shards are not done; rerun the embedding job")
        return self.group["emb"][rows or slice(None)]


def encoder_fingerprint(name: str) -> dict:
    """What identifies the encoder: its name and, for a folder, a hash of its weight files."""
    from .models import resolve_encoder

    out: dict = {"name": name}
    if name.startswith("random:"):
        return out
    src = Path(resolve_encoder(name))
    if src.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in src.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
            h.update(f.relative_to(src).as_posix().encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        out["weights_sha256"] = h.hexdigest()
    return out


class EmbedActor(ShardActor):
    """One loaded encoder: shards of the pool's texts in, rows of the embedding store out."""

    def __init__(self, cfg: Config, encoder: str, store: str, prompt: str, batch_size: int | None, shard_size: int,
                 progress: str | None = None, cwd: str | None = None) -> None:
        super().__init__(progress, cwd)
        import torch

        from .models import load_encoder

        torch.set_num_threads(cfg.gradients.torch_threads)
        self.cfg, self.encoder, self.path, self.prompt = cfg, encoder, store, prompt
        self.model = load_encoder(encoder, device=cfg.model.device, seed=cfg.model.seed, cache_dir=cfg.model.cache_dir)
        # 0/None: the index builder's setting, else small batches on a CPU (padding costs more than batching saves)
        self.batch_size = batch_size or getattr(cfg.index, "embed_batch_size", 0) or (64 if self.model.device.type == "cuda" else 8)
        self.shard_size = shard_size

    def _load(self) -> tuple[list[str], dict]:
        from .data import load_records

        records, report = load_records(self.cfg.data)
        self.texts = [r.as_text() for r in records]
        h = hashlib.sha256()
        for r, t in zip(records, self.texts):
            h.update(json.dumps([r.id, t], ensure_ascii=False).encode())
        return [r.id for r in records], {"source": self.cfg.data.path, "n": len(records), "fingerprint": h.hexdigest(), "bad_rows": report.n_bad}

    def _manifest(self, dataset: dict) -> dict:
        return {"schema": SCHEMA_VERSION, "kind": "embeddings", "encoder": encoder_fingerprint(self.encoder),
                "prompt": self.prompt, "dim": int(self.model.get_embedding_dimension()), "dataset": dataset,
                "shard_size": self.shard_size, "influcoder_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _open(self) -> dict:
        ids, dataset = self._load()
        m = self._manifest(dataset)
        if isinstance(self.path, str) and not is_url(self.path):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.store = EmbedStore.create_or_resume(self.path, ids, m["dim"], self.shard_size, m)
        return shard_info(self.store)

    def _attach(self) -> None:
        self.store = EmbedStore.open(self.path, mode="r+")
        _, dataset = self._load()
        check_compatible(self.store.manifest, self._manifest(dataset), RESUME_KEYS, what=f"{self.path} and this worker")

    def _run(self, shard: int, on_batch: Callable[[int, int], None]) -> int:
        rows = self.store.shard_rows(shard)
        vec = self.model.encode(self.texts[rows.start:rows.stop], prompt=self.prompt or None, batch_size=self.batch_size,
                                convert_to_numpy=True, show_progress_bar=False)
        self.store.write_shard(shard, np.asarray(vec, dtype=np.float32))
        on_batch(len(rows), 0)
        return len(rows)


def embed_pool(cfg: Config, encoder_name_or_path: str, out: str | Path, prompt: str = "", *, batch_size: int = 0,
               shard_size: int = 1024, progress: bool = True, num_workers: int | None = None,
               address: str | None = None) -> RayJobSummary:
    """Embed every text of `cfg.data`'s pool (`Record.as_text()`, with `prompt` prepended) into the
    store at `out` (a folder or fsspec URL). Ray workers by default; `num_workers=0`: in this process."""
    t_wall = time.perf_counter()
    store = resolve_out(out)
    args = (cfg, encoder_name_or_path, store, prompt, batch_size, shard_size)
    if num_workers == 0:
        from tqdm.auto import tqdm

        a = EmbedActor(*args)
        info = a.open()
        t0, rows = time.perf_counter(), 0
        with tqdm(total=sum(info["pending"].values()), unit="ex", desc="embed", disable=not progress) as bar:
            for s in info["pending"]:
                rows += a.run(s, 0)["rows"]
                bar.update(info["pending"][s])
        dt, k, retries, restarts, lost = time.perf_counter() - t0, 0, 0, 0, 0
    else:
        if store.startswith("memory://"):
            raise JobFailed(f"{store}: a memory:// store lives in one process; Ray workers cannot share it (use num_workers=0)")
        started = init_ray(cfg.ray, address, min_cpus=int((num_workers or cfg.ray.num_workers or 0) * cfg.ray.num_cpus_per_worker))
        try:
            n, opts = worker_options(cfg, num_workers)
            info, st, k = run_actors(EmbedActor, args, n, opts, cfg, "embed", progress, "embed")
        finally:
            if started:
                import ray

                ray.shutdown()
        dt, rows, retries, restarts, lost = st.seconds, st.rows, st.retries, st.restarts, st.lost
    return RayJobSummary(store, info["rows"], info["shards"], len(info["pending"]), round(dt, 3),
                         round(rows / dt, 3) if rows else 0.0, 0.0, k, retries, restarts, lost,
                         round(time.perf_counter() - t_wall, 3))
