"""Training records: read JSONL, JSON, CSV, Parquet and Hugging Face `save_to_disk` folders.

Every record has a stable string id and either prompt + response or text; other fields pass
through as metadata. A malformed row is an error naming file and line (or row), or, with
`skip_bad_rows`, is skipped and counted — never dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig

FORMATS = ("jsonl", "json", "csv", "parquet", "hf")


class DataError(ValueError):
    """A row or file that cannot be read; the message names the file and line."""


@dataclass
class Record:
    id: str
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """Where the row came from: `file:line` (or `file:row N`)."""

    @property
    def is_pair(self) -> bool:
        return self.prompt is not None

    def as_text(self) -> str:
        """One string for encoders and lexical baselines."""
        return f"{self.prompt}\n{self.response}" if self.is_pair else str(self.text)

    def to_row(self, fields: DataConfig | None = None) -> dict[str, Any]:
        f = fields or DataConfig()
        row: dict[str, Any] = {f.id_field: self.id}
        if self.is_pair:
            row[f.prompt_field], row[f.response_field] = self.prompt, self.response
        else:
            row[f.text_field] = self.text
        row.update(self.meta)
        return row


@dataclass
class LoadReport:
    n_rows: int = 0
    n_bad: int = 0
    bad: list[str] = field(default_factory=list)
    """The first bad-row messages (at most 50), each naming file and line."""

    def note_bad(self, msg: str) -> None:
        self.n_bad += 1
        if len(self.bad) < 50:
            self.bad.append(msg)


def content_id(prompt: str | None, response: str | None, text: str | None) -> str:
    digest = hashlib.sha256(json.dumps([prompt, response, text], ensure_ascii=False).encode()).hexdigest()
    return f"h-{digest[:16]}"


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf"
        raise DataError(f"{path}: a folder, but not a Hugging Face `save_to_disk` dataset (no dataset_info.json)")
    suffix = path.suffix.lower()
    fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: unknown data format '{suffix}'; use one of .jsonl .json .csv .parquet or an HF dataset folder")
    return fmt


# Raw rows: (location, row-or-error). A row that cannot even be parsed comes as a DataError.
RawRow = tuple[str, "dict[str, Any] | DataError"]


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, DataError(f"{loc}: invalid JSON: {e.msg} (column {e.colno})")


def _json_rows(path: Path) -> Iterator[RawRow]:
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:pos + 1] == "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        items = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise DataError(f"{path}:1: expected a JSON array of objects (or an object with a 'data' array)")
        for i, item in enumerate(items, 1):
            yield f"{path}:item {i}", item
        return
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        loc = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            item, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield loc, item


def _csv_rows(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, restkey="\0extra", restval=None)
        for row in reader:
            loc = f"{path}:{reader.line_num}"
            if "\0extra" in row or any(v is None for v in row.values()):
                yield loc, DataError(f"{loc}: expected {len(reader.fieldnames or [])} columns, got a different number")
                continue
            yield loc, {k: v for k, v in row.items() if v != ""}


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _hf_rows(path: Path) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; point at one split's folder")
    for i, row in enumerate(ds, 1):
        yield f"{path}:row {i}", row


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "hf": _hf_rows}


def _nonempty_str(row: dict[str, Any], key: str, loc: str) -> str | None:
    if key not in row or row[key] is None:
        return None
    v = row[key]
    if not isinstance(v, str):
        raise DataError(f"{loc}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def to_record(row: Any, loc: str, f: DataConfig) -> Record:
    """Map one raw row to a Record, or raise a DataError naming `loc` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{loc}: expected an object with fields, got {type(row).__name__}")
    prompt = _nonempty_str(row, f.prompt_field, loc)
    response = _nonempty_str(row, f.response_field, loc)
    text = _nonempty_str(row, f.text_field, loc)
    if prompt is not None or response is not None:
        if not prompt or not response:
            missing = f.response_field if prompt else f.prompt_field
            raise DataError(f"{loc}: field '{missing}' is missing or empty (a pair needs both '{f.prompt_field}' and '{f.response_field}')")
        text = None
    elif not text:
        raise DataError(f"{loc}: needs '{f.prompt_field}' + '{f.response_field}' or a non-empty '{f.text_field}' (fields: {sorted(row)})")
    raw_id = row.get(f.id_field)
    if raw_id is None or raw_id == "":
        rid = content_id(prompt, response, text)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        rid = str(raw_id)
    else:
        raise DataError(f"{loc}: field '{f.id_field}' must be a string or integer, got {type(raw_id).__name__}")
    used = {f.id_field, f.prompt_field, f.response_field, f.text_field}
    meta = {k: v for k, v in row.items() if k not in used}
    return Record(rid, prompt if text is None else None, response if text is None else None, text, meta, loc)


def checked_rows(path: str | Path, f: DataConfig, report: LoadReport, compact_ids: bool = False) -> Iterator[tuple[str, Any, Record]]:
    """(location, parsed row, record) for every good row of a file or folder. Bad rows (duplicate ids
    included) raise, or are counted in `report` when `f.skip_bad_rows` is set. `compact_ids` remembers
    ids as 12-byte digests (a dataset larger than memory still fits its id set) at the cost of naming
    the first occurrence of a duplicate."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    seen: dict[Any, str] = {}
    for loc, row in _READERS[detect_format(p)](p):
        try:
            if isinstance(row, DataError):
                raise row
            rec = to_record(row, loc, f)
            key = hashlib.blake2b(rec.id.encode(), digest_size=12).digest() if compact_ids else rec.id
            if key in seen:
                first = "an earlier row has the same id" if compact_ids else f"first at {seen[key]}"
                raise DataError(f"{loc}: duplicate id '{rec.id}' ({first})")
        except DataError as e:
            if not f.skip_bad_rows:
                raise
            report.note_bad(str(e))
            continue
        seen[key] = "" if compact_ids else loc
        report.n_rows += 1
        yield loc, row, rec


def iter_records(path: str | Path, fields: DataConfig | None = None, report: LoadReport | None = None) -> Iterator[Record]:
    """Stream records from a file or folder (see `checked_rows`), up to `fields.limit`."""
    f = fields or DataConfig()
    report = report if report is not None else LoadReport()
    for _, _, rec in checked_rows(path, f, report):
        yield rec
        if f.limit is not None and report.n_rows >= f.limit:
            return


def _demo_rows(source: str, fields: DataConfig) -> list[dict[str, Any]]:
    from . import corpus

    d = fields.demo
    if source == "demo":
        return corpus.generate(n=d.n, planted_share=d.planted_share, seed=d.seed, kind=d.kind)
    if source == "demo:behaviours":
        return corpus.behaviour_examples(kind=d.kind)
    if source == "demo:normal":
        return corpus.normal_examples(kind=d.kind)
    raise DataError(f"{source}: unknown demo source; use demo, demo:behaviours or demo:normal")


def load_records(fields: DataConfig, path: str | Path | None = None) -> tuple[list[Record], LoadReport]:
    """All records of the configured pool (`fields.path`, or `path`); `demo` is the embedded corpus."""
    source = str(path if path is not None else fields.path)
    report = LoadReport()
    if source.startswith("demo"):
        rows = _demo_rows(source, fields)
        recs = [to_record(r, f"{source}:{i + 1}", fields) for i, r in enumerate(rows)]
        recs = recs[: fields.limit] if fields.limit is not None else recs
        report.n_rows = len(recs)
        return recs, report
    return list(iter_records(source, fields, report)), report


SPLITS = ("pool", "queries")


def load_split(fields: DataConfig, split: str) -> tuple[list[Record], LoadReport]:
    """`pool`: the training data; `queries`: every query set in `data.queries`, in order."""
    if split == "pool":
        return load_records(fields)
    if split != "queries":
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if not fields.queries:
        raise DataError("the `queries` split is empty: name query files in data.queries")
    records, total = [], LoadReport()
    seen: dict[str, str] = {}
    for q in fields.queries:
        recs, rep = load_records(fields.model_copy(update={"limit": None}), q)
        for r in recs:
            if r.id in seen:
                raise DataError(f"{r.source}: duplicate id '{r.id}' across query sets (first at {seen[r.id]})")
            seen[r.id] = r.source
        records += recs
        total.n_rows += rep.n_rows
        total.n_bad += rep.n_bad
        total.bad += rep.bad
    return records, total


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows atomically: to `<path>.part`, then rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
