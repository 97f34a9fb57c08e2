"""The gradient store: a zarr v3 group of per-example sketched gradients.

Arrays: `grads` (n, d) float16 L2-normalised, `norm` (n,) float32 (norm before normalising),
`loss` (n,) float32, `n_tokens` (n,) int32, `ids` (n,) str, `done` (n_shards,) bool. A shard is
exactly one chunk of every per-row array, so concurrent writers never share a chunk; `done[s]` is
set only after shard s's rows are written, so a crash leaves the shard to be redone. `attrs`
hold the manifest: every setting that decides what the numbers mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA_VERSION = 1
# Settings that must agree for two stores' gradients to be compared (anchors vs pool).
COMPARE_KEYS = ("model", "loss", "sketch", "modules")
# Settings that must agree for a rerun to resume a store instead of starting again.
RESUME_KEYS = COMPARE_KEYS + ("preconditioner", "dataset", "shard_size", "schema")


class StoreMismatch(ValueError):
    """Two manifests disagree on a setting that decides what the gradients mean."""


# Where things were on disk does not change what the gradients mean (the adapter's sha256 does).
LOCATION_KEYS = {"model.adapter.path", "model.source"}


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if path in LOCATION_KEYS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def check_compatible(a: dict, b: dict, keys: tuple[str, ...] = COMPARE_KEYS, what: str = "stores") -> None:
    """Raise StoreMismatch naming every setting in `keys` where manifests a and b differ."""
    diffs = [d for k in keys for d in _diff(a.get(k), b.get(k), k)]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; … {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise StoreMismatch(f"{what} were made with different settings: {shown}")


class ShardedStore:
    """A zarr group of per-row arrays written shard by shard (one shard = one chunk of each), with
    `ids`, `done` flags and a manifest in `attrs`. Subclasses name their main array and add theirs."""

    ROWS = "rows"
    KIND: str | None = None
    """`manifest["kind"]` a store must carry to be opened as this class (None: not checked)."""
    SCHEMA = SCHEMA_VERSION
    RESUME: tuple[str, ...] = ()

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path

    @classmethod
    def _create_arrays(cls, g: zarr.Group, n: int, dim: int, shard_size: int) -> None:
        raise NotImplementedError

    @classmethod
    def create_or_resume(cls, path: str | Path, ids: list[str], dim: int, shard_size: int, manifest: dict):
        """Open the store at `path` to resume it when its manifest matches, else create it."""
        path = str(path)
        if Path(path).exists() or "://" in path:
            try:
                old = cls.open(path, mode="r+")
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
                old = None
            if old is not None:
                check_compatible(old.manifest, manifest, cls.RESUME, what=f"{path} and this run")
                return old
        n = len(ids)
        g = zarr.open_group(path, mode="w")
        cls._create_arrays(g, n, dim, shard_size)
        g.create_array("ids", shape=(n,), chunks=(max(n, 1),), dtype=str)
        g.create_array("done", shape=(max(1, -(-n // shard_size)),), chunks=(1,), dtype=bool, fill_value=False)
        if n:
            g["ids"][:] = np.asarray(ids, dtype=object).astype(str)
        g.attrs["manifest"] = manifest
        return cls(g, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r"):
        g = zarr.open_group(str(path), mode=mode)
        m = g.attrs.get("manifest")
        if m is None or (cls.KIND is not None and m.get("kind") != cls.KIND):
            raise KeyError(f"{path}: not an influcoder {cls.__name__} (no matching manifest)")
        if m.get("schema") != cls.SCHEMA:
            raise StoreMismatch(f"{path}: store schema {m.get('schema')} is not {cls.SCHEMA}")
        return cls(g, str(path))

    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["manifest"])

    @property
    def n(self) -> int:
        return self.group[self.ROWS].shape[0]

    @property
    def dim(self) -> int:
        return self.group[self.ROWS].shape[1]

    @property
    def shard_size(self) -> int:
        return self.group[self.ROWS].chunks[0]

    @property
    def n_shards(self) -> int:
        return self.group["done"].shape[0]

    def shard_rows(self, s: int) -> range:
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.n))

    def pending(self) -> list[int]:
        done = self.group["done"][:]
        return [s for s in range(self.n_shards) if not done[s]]

    @property
    def complete(self) -> bool:
        return not self.pending()

    def ids(self) -> list[str]:
        return [str(x) for x in self.group["ids"][:]]

    def require_complete(self) -> None:
        p = self.pending()
        if p:
            raise ValueError(f"{self.path}: {len(p)} of {self.n_shards} shards are not done; rerun the job that writes it to finish it")


class GradStore(ShardedStore):
    ROWS = "grads"
    RESUME = RESUME_KEYS

    @classmethod
    def _create_arrays(cls, g: zarr.Group, n: int, dim: int, shard_size: int) -> None:
        comp = (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
        g.create_array("grads", shape=(n, dim), chunks=(shard_size, dim), dtype="float16", compressors=comp, fill_value=0)
        for name, dt in (("norm", "float32"), ("loss", "float32"), ("n_tokens", "int32")):
            g.create_array(name, shape=(n,), chunks=(shard_size,), dtype=dt, compressors=comp, fill_value=0)

    # --- rows ------------------------------------------------------------------------------------

    def write_shard(self, s: int, vectors: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray) -> None:
        """vectors (m, d) float32, unnormalised; written as unit rows + norms, then marked done."""
        rows = self.shard_rows(s)
        if vectors.shape != (len(rows), self.dim):
            raise ValueError(f"shard {s}: expected {(len(rows), self.dim)} rows, got {vectors.shape}")
        norm = np.linalg.norm(vectors, axis=1).astype(np.float32)
        unit = np.divide(vectors, norm[:, None], out=np.zeros_like(vectors), where=norm[:, None] > 0)
        sl = slice(rows.start, rows.stop)
        self.group["grads"][sl] = unit.astype(np.float16)
        self.group["norm"][sl] = norm
        self.group["loss"][sl] = loss.astype(np.float32)
        self.group["n_tokens"][sl] = n_tokens.astype(np.int32)
        self.group["done"][s] = True

    def grads(self, rows: slice | None = None) -> np.ndarray:
        """(n, d) float16 unit rows."""
        return self.group["grads"][rows or slice(None)]

    def array(self, name: str) -> np.ndarray:
        return self.group[name][:]
