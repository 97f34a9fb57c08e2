"""`influcoder filter`: flag and remove toxic or off-target training data, with an audit report.

Register it on the main app (influcoder/cli.py):

    from .cli_filter import filter_cmd
    app.command("filter")(filter_cmd)   # influcoder filter --index index/NAME --behaviors B.jsonl --dataset D.jsonl …

Until then (and in tests) `python -m influcoder.cli_filter …` runs it standalone (same options).
Errors a user can fix (bad rows, missing files, unreachable precision) print one line and exit 2.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def _friendly(fn):
    """Known, fixable errors → one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError
        from .data import DataError
        from .filtering import FilterError
        from .index import IndexStoreError
        from .models import ModelError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, FilterError, IndexStoreError, ModelError) as e:
            console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@_friendly
def filter_cmd(
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="Training data to filter: JSONL, JSON, CSV, Parquet or a Hugging Face folder (need not be in the index; streamed in chunks). Never modified.")],
    behaviors: Annotated[Path, typer.Option("--behaviors", "--behaviours", "-b", help="Examples of the unwanted behaviour (e.g. toxic replies): `text` or `prompt` + `response` rows.")],
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Index folder (e.g. index/NAME) or a name under index/: its student encoder, prompts, data fields and `filter` settings are used.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Instead of --index: any sentence-transformers encoder (folder or name, e.g. sentence-transformers/all-MiniLM-L6-v2), with its own prompts.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", "-r", help="Wanted outputs: the same aggregation over these is subtracted, so rows are flagged for being close to the behaviour and not to the reference (off-target, not merely on-topic).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (kept.jsonl, flagged.jsonl, scores.parquet, report.json, report.html), replaced atomically; default <dataset stem>-filtered next to the dataset.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Flag exactly round(budget × rows) rows, the highest scores (ties by file order). The default mode, at filter.budget (0.02).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Flag every row whose score is at least this.")] = None,
    target_precision: Annotated[Optional[float], typer.Option(help="Flag at the lowest threshold whose precision on the canary calibration (canaries = positives; filter.calibration_ratio (1) random dataset rows per canary = presumed negatives) reaches this; needs --canaries.")] = None,
    canaries: Annotated[Optional[Path], typer.Option(help="Known-bad training examples, scored like dataset rows, that calibrate --target-precision.")] = None,
    aggregate: Annotated[Optional[str], typer.Option(help="How cosines to the behaviours combine: mean (default), max or topm; default filter.aggregate.")] = None,
    top_m: Annotated[Optional[int], typer.Option(min=1, help="topm: how many best-matching behaviours are averaged; default filter.top_m.")] = None,
    fusion: Annotated[Optional[str], typer.Option(help="bm25: rank by reciprocal-rank fusion of the student score with a BM25 score against the same behaviours (beat both alone on the planted benchmark; --budget only); none: the student score alone. Default filter.fusion (none).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(min=1, help="Rows embedded and scored per chunk (the unit of resume); default filter.chunk_size (4096).")] = None,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Skip malformed dataset rows and count them in the report instead of stopping at the first one.")] = False,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where per-chunk scores go while running (resume state); default .<out name>.work next to --out.")] = None,
    keep_work: Annotated[bool, typer.Option("--keep-work", help="Keep the per-chunk scores after success, so a rerun with another threshold skips the scoring.")] = False,
    device: Annotated[str, typer.Option(help="Encoder device: auto, cpu, cuda, cuda:N.")] = "auto",
    set_: Annotated[list[str], typer.Option("--set", help="Override a filter setting: --set filter.text=response, --set filter.torch_threads=1 (repeatable).")] = [],
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
) -> None:
    """Score every dataset example against behaviour examples with the student encoder and split the data into kept and flagged rows (kept + flagged = input), with report.json and report.html.

    Score: AGG over behaviours of cos(student(example, document prompt), student(behaviour, query prompt)), minus the same AGG over --reference; higher = more like the behaviour. A crashed run resumes by chunk when started again with the same settings.
    """
    from pydantic import ValidationError

    from .config import Config, ConfigError, apply_overrides
    from .filtering import FilterError, FilterRun, filter_dataset, student_from_encoder, student_from_index

    if (index is None) == (encoder is None):
        raise FilterError("give exactly one of --index (a built index) or --encoder (a sentence-transformers encoder)")
    modes = {k: v for k, v in {"budget": budget, "threshold": threshold, "precision": target_precision}.items() if v is not None}
    if len(modes) > 1:
        raise FilterError("give at most one of --budget, --threshold, --target-precision")
    if canaries is not None and "precision" not in modes:
        raise FilterError("--canaries only calibrates --target-precision")
    mode, value = next(iter(modes.items()), ("budget", None))
    student = student_from_index(index, device) if index is not None else student_from_encoder(encoder, device)  # type: ignore[arg-type]
    raw = {"filter": student.defaults.model_dump(mode="json")}
    for key, v in {"aggregate": aggregate, "top_m": top_m, "fusion": fusion, "chunk_size": chunk_size}.items():
        if v is not None:
            raw["filter"][key] = v
    bad = [x for x in set_ if not x.split("=", 1)[0].strip().startswith("filter.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only filter.* settings can be changed here")
    try:
        fc = Config.model_validate(apply_overrides(raw, set_)).filter
    except ValidationError as e:
        raise ConfigError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    out = out or dataset.with_name(f"{dataset.stem}-filtered")
    run = FilterRun(dataset, behaviors, out, mode, value, reference, canaries, skip_bad_rows, work_dir, keep_work)
    rep = filter_dataset(student, run, fc, progress=progress)
    summary = {"out": str(out), **rep["counts"], "threshold": rep["threshold"].get("threshold"), "mode": mode,
               "evaluation": rep.get("evaluation"), "rows_per_s": rep["timings"]["rows_per_s"]}
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def _standalone() -> typer.Typer:
    """The command on its own (`python -m influcoder.cli_filter …`), before or without cli.py."""
    app = typer.Typer(help="influcoder filter", pretty_exceptions_enable=False, add_completion=False)
    app.command("filter")(filter_cmd)

    @app.callback()
    def _root() -> None:
        """influcoder batch filtering (standalone entry point)."""

    return app


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _standalone()()
