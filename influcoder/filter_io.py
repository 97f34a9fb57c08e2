"""Rows in and out of the batch filter, and its resumable per-chunk score store.

Rows are read with `data.py`'s readers and validation (same errors, same `file:line`), but each
record keeps what it was read from, so the filter can write it back unchanged:
- JSONL: the original line, character for character (line ending included). A second handle on
  the file splits lines exactly as the reader does (universal newlines, untranslated), so the two
  stay aligned by line number. Kept rows are these lines as they were; flagged rows are the line
  with the filter's fields inserted before its closing brace, so the original bytes stay a prefix.
- JSON, CSV, Parquet, Hugging Face folders: the parsed row dict, written as one JSON line
  (values JSON cannot hold, e.g. dates, become strings).

Score store (`<work>/`): `chunks/NNNNNN.npz` per chunk of `chunk_size` good rows (written to a temp
name and renamed), and `manifest.json` (fingerprint of settings + input, and the finished chunks
with their row count and id hash), rewritten atomically after each chunk. A run whose fingerprint
differs starts over; a run with the same one scores only the chunks not yet done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .data import DataError, LoadReport, Record, checked_rows, detect_format

SCORE_FIELD = "_influcoder_score"
TOP_FIELD = "_influcoder_top_behaviours"


@dataclass
class Row:
    record: Record
    raw: str | None
    """JSONL: the original line, with its line ending."""
    parsed: dict[str, Any] | None
    """Other formats: the row as read."""

    def kept_line(self) -> str:
        if self.raw is not None:
            return self.raw if self.raw.endswith(("\n", "\r")) else self.raw + "\n"
        return json.dumps(self.parsed, ensure_ascii=False, default=str) + "\n"

    def flagged_line(self, extra: dict[str, Any]) -> str:
        add = json.dumps(extra, ensure_ascii=False)[1:-1]  # '"k": v, …' without braces
        if self.raw is None:
            return json.dumps(self.parsed, ensure_ascii=False, default=str)[:-1] + ", " + add + "}\n"
        body = self.raw.rstrip()
        ending = self.raw[len(self.raw.rstrip("\r\n")):] or "\n"
        if not body.endswith("}"):  # cannot happen for a line that parsed to an object
            raise DataError(f"{self.record.source}: not a JSON object line")
        return body[:-1] + ", " + add + "}" + ending


class _Lines:
    """Original lines of a text file by number, read forward only."""

    def __init__(self, path: Path):
        self.fh = open(path, encoding="utf-8", newline="")  # universal splitting, nothing translated
        self.n = 0
        self.line = ""

    def at(self, lineno: int) -> str:
        while self.n < lineno:
            self.line = self.fh.readline()
            self.n += 1
        return self.line

    def close(self) -> None:
        self.fh.close()


def iter_rows(path: str | Path, fields: DataConfig, report: LoadReport) -> Iterator[Row]:
    """Like `data.iter_records` (same checks; `fields.limit` ignored), keeping each row's original
    form; ids are remembered as digests (`checked_rows(compact_ids=True)`)."""
    p = Path(path)
    lines = _Lines(p) if p.exists() and detect_format(p) == "jsonl" else None
    try:
        for loc, row, rec in checked_rows(p, fields, report, compact_ids=True):
            raw = lines.at(int(loc.rsplit(":", 1)[1])) if lines is not None else None
            yield Row(rec, raw, None if raw is not None else row)
    finally:
        if lines is not None:
            lines.close()


def chunked(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    buf: list[Row] = []
    for r in rows:
        buf.append(r)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (relative names + bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def ids_sha(ids: list[str]) -> str:
    return hashlib.sha256("\0".join(ids).encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ChunkStore:
    """Per-chunk score arrays under `<work>/`, and the manifest of finished chunks."""

    def __init__(self, path: Path, fingerprint: str, settings: dict):
        self.path, self.fingerprint = Path(path), fingerprint
        self.resumed = self.restarted = False
        m = self._read()
        if m is not None and m.get("fingerprint") == fingerprint:
            self.done: dict[str, dict] = m["done"]
            self.resumed = bool(self.done)
        else:
            self.restarted = m is not None  # settings or input changed: old scores are useless
            shutil.rmtree(self.path, ignore_errors=True)
            self.done = {}
        (self.path / "chunks").mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self._write_manifest()

    def _read(self) -> dict | None:
        try:
            return json.loads((self.path / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_manifest(self) -> None:
        body = {"fingerprint": self.fingerprint, "settings": self.settings, "done": self.done}
        _atomic_write(self.path / "manifest.json", json.dumps(body, indent=1).encode())

    def file(self, k: int) -> Path:
        return self.path / "chunks" / f"{k:06d}.npz"

    def has(self, k: int, ids: list[str]) -> bool:
        d = self.done.get(str(k))
        return d is not None and d["n"] == len(ids) and d["ids"] == ids_sha(ids) and self.file(k).is_file()

    def put(self, k: int, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
        tmp = self.path / "chunks" / f".{k:06d}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.file(k))
        self.done[str(k)] = {"n": len(ids), "ids": ids_sha(ids)}
        self._write_manifest()  # the manifest, not the file, says a chunk is done

    def load(self, k: int, key: str) -> np.ndarray:
        with np.load(self.file(k)) as z:
            return z[key]

    def column(self, n_chunks: int, key: str) -> np.ndarray:
        """One array over every chunk, in row order (only this key is read)."""
        parts = [self.load(k, key) for k in range(n_chunks)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
