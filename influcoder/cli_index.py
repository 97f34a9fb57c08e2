"""CLI commands of the attribution index, the query engine and the HTTP API.

Register them on the main app (influcoder/cli.py):

    from .cli_index import index_app, query, serve
    app.add_typer(index_app, name="index")   # influcoder index build|add|remove|info
    app.command("query")(query)              # influcoder query --index index/NAME "text"
    app.command("serve")(serve)              # influcoder serve --index index/NAME

Until then (and in tests) `python -m influcoder.cli_index index|query|serve …` runs them standalone.
Errors a user can fix (missing index, unknown ids, bad rows, bad bind) print one line and exit 2.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)
index_app = typer.Typer(help="Build and maintain attribution indexes (index/<name>/).", no_args_is_help=True)

IndexOpt = Annotated[str, typer.Option("--index", "-i", help="Index folder (e.g. index/tiny) or a name under index/.")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config key: --set index.factory=HNSW32 (repeatable).")]
RuntimeSetOpt = Annotated[list[str], typer.Option("--set", help="Override a run-time setting of the index's saved config: --set index.torch_threads=2, --set service.max_batch=16 (repeatable).")]
RunDirOpt = Annotated[Optional[Path], typer.Option(help="Run folder (gradient store, decoder settings) for --rerank, when it moved since the build.")]


def _friendly(fn):
    """Known, fixable errors → one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import ConfigError
        from .data import DataError
        from .engine import InputError, RerankUnavailable
        from .index import IndexStoreError
        from .models import ModelError
        from .store import StoreMismatch

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, InputError, IndexStoreError, ModelError, RerankUnavailable, StoreMismatch) as e:
            console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


@index_app.command("build")
@_friendly
def index_build(
    config: Annotated[Path, typer.Argument(help="YAML run config whose run (student encoder, teacher) the index is built from.")],
    name: Annotated[Optional[str], typer.Option(help="Index name; default index.name from the config.")] = None,
    factory: Annotated[Optional[str], typer.Option(help="FAISS factory string (Flat, HNSW32, IVF1024,SQ8, …); default index.factory (auto).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the index to this folder instead of <index.root>/<name>/.")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Take the pool's vectors from this embedding store (written by the Ray embedding job) instead of embedding here.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Embed the pool with this many Ray workers first (into <run>/pool-embeddings.zarr; resumable).")] = None,
    set_: SetOpt = [],
) -> None:
    """Embed the training pool with the run's student and write the index atomically (temp folder, then rename)."""
    from .config import load_config
    from .index import read_manifest
    from .index_build import build_index

    cfg = load_config(config, set_)
    path = build_index(cfg, name=name, factory=factory, out=out, embeddings=embeddings, workers=workers)
    m = read_manifest(path)
    _print_json({"index": str(path), "count": m["count"], "factory": m["factory"], "build_id": m["build_id"],
                 "ood_calibrated": m.get("ood") is not None})


@index_app.command("add")
@_friendly
def index_add(
    index: IndexOpt,
    data: Annotated[Path, typer.Argument(help="Records to add: JSONL, JSON, CSV, Parquet or a Hugging Face folder (same fields as the run's data).")],
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Skip malformed rows and count them instead of stopping.")] = False,
) -> None:
    """Embed new training examples and append them (no backward pass; they have no teacher scores)."""
    from .config import DataConfig
    from .data import LoadReport, iter_records
    from .index import read_manifest, resolve_index
    from .index_build import add_records

    d = resolve_index(index)
    fields = DataConfig.model_validate(read_manifest(d)["run"]["config"]["data"]).model_copy(update={"skip_bad_rows": skip_bad_rows, "limit": None})
    report = LoadReport()
    records = list(iter_records(data, fields, report))
    m = add_records(d, records)
    _print_json({"index": str(d), "added": len(records), "bad_rows": report.n_bad, "count": m["count"], "build_id": m["build_id"]})


@index_app.command("remove")
@_friendly
def index_remove(
    index: IndexOpt,
    ids: Annotated[list[str], typer.Option("--ids", help="Example ids to take out; comma-separated and/or repeated.")] = [],
    ids_file: Annotated[Optional[Path], typer.Option(help="A file with one id per line.")] = None,
    missing_ok: Annotated[bool, typer.Option("--missing-ok", help="Ignore ids that are not in the index instead of failing.")] = False,
) -> None:
    """Take examples out of the index (take-down requests); the rewrite is atomic."""
    from .index import IndexStoreError, resolve_index
    from .index_build import remove_ids

    want = [x.strip() for item in ids for x in item.split(",") if x.strip()]
    if ids_file:
        want += [ln.strip() for ln in ids_file.read_text().splitlines() if ln.strip()]
    if not want:
        raise IndexStoreError("no ids given: use --ids a,b,c or --ids-file FILE")
    d = resolve_index(index)
    m = remove_ids(d, want, missing_ok=missing_ok)
    _print_json({"index": str(d), "removed": m["removed"], "missing": m["missing"], "count": m["count"], "build_id": m["build_id"]})


@index_app.command("info")
@_friendly
def index_info(index: IndexOpt, as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False) -> None:
    """Print an index's manifest: counts, factory, encoder hash, run and teacher settings, history."""
    from .index import read_manifest, resolve_index

    d = resolve_index(index)
    m = read_manifest(d)
    if as_json:
        _print_json(m)
        return
    table = Table(title=f"index {d}", show_header=False)
    fid = (m["run"].get("fidelity") or {}).get("student") or {}
    rows = {"count": m["count"], "dim": m["dim"], "factory": f"{m['factory']} (asked: {m['factory_requested']})",
            "build id": m["build_id"], "created": m["created"], "updated": m["updated"],
            "encoder": f"{m['encoder']['base']} → {m['encoder']['path']} sha256 {m['encoder']['sha256'][:16]}…",
            "data": m["data"]["path"], "run": m["run"]["run_dir"],
            "student fidelity": ", ".join(f"{k} {v:.3f}" for k, v in fid.items() if isinstance(v, float)) or "-",
            "OOD calibration": f"{m['ood']['n_anchors']} anchors, flag below percentile {m['ood']['percentile_threshold']}" if m.get("ood") else "none",
            "history": "; ".join(f"{h['op']} {h.get('n', h.get('count'))}" for h in m.get("history", []))}
    for k, v in rows.items():
        table.add_row(k, str(v))
    Console().print(table)


def _query_inputs(texts: list[str], file: Path | None) -> list[dict]:
    from .config import DataConfig
    from .data import iter_records

    inputs = [{"text": t} for t in texts]
    if file is not None:
        for r in iter_records(file, DataConfig()):
            inputs.append({"prompt": r.prompt, "response": r.response} if r.is_pair else {"text": r.text})
    return inputs


@_friendly
def query(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Model outputs to attribute (one answer per text).")] = None,
    index: IndexOpt = "default",
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="JSONL/CSV/… of inputs with `text` or `prompt` + `response` fields.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Training examples per input.")] = 10,
    rerank: Annotated[bool, typer.Option("--rerank", help="Re-score the top candidates with the exact gradient teacher (needs the run's gradient store).")] = False,
    rerank_k: Annotated[Optional[int], typer.Option(min=1, help="Candidates the teacher re-scores (K′); default index.rerank_k.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answers as JSON instead of tables.")] = False,
    run_dir: RunDirOpt = None,
    set_: RuntimeSetOpt = [],
) -> None:
    """Which training examples caused this output? Ranked ids, scores and previews, with an OOD flag."""
    from .engine import Engine, InputError
    from .index import resolve_index

    inputs = _query_inputs(texts or [], file)
    if not inputs:
        raise InputError("texts", "give one or more texts, or --file")
    engine = Engine.load(resolve_index(index), run_dir=run_dir, overrides=set_)
    answers = engine.attribute(inputs, k=k, rerank=rerank, rerank_k=rerank_k)
    if as_json:
        _print_json({"index": str(engine.path), "build_id": engine.build_id, "answers": answers})
        return
    out = Console()
    for inp, ans in zip(inputs, answers):
        shown = inp.get("text") or f"{inp['prompt']} → {inp['response']}"
        table = Table(title=escape(shown[:100]), caption=f"scores: {ans['scores']}", title_justify="left")
        for col in ("rank", "score", "id", "preview"):
            table.add_column(col, overflow="fold" if col == "preview" else "ellipsis")
        for h in ans["results"]:
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", escape(h["id"]), escape(h["preview"].replace("\n", " ⏎ ")[:160]))
        out.print(table)
        if ans.get("ood"):
            out.print(f"[yellow]out of distribution[/] (best match at percentile {ans['ood_percentile']} of the distillation queries): {ans['note']}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@_friendly
def serve(
    index: IndexOpt = "default",
    host: Annotated[Optional[str], typer.Option(help="Bind address; default service.host from the index's run config (127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port; default service.port (8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="INFLUCODER_API_KEY", help="Require this key in the X-API-Key header (also $INFLUCODER_API_KEY).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Allow a non-loopback address without an API key.")] = False,
    run_dir: RunDirOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    set_: RuntimeSetOpt = [],
) -> None:
    """Serve the HTTP API (/v1/attribute, /v1/flag, /v1/examples/{id}, /v1/index, /docs).

    `kill -HUP <pid>` or `POST /v1/admin/reload` swaps in a rebuilt index without dropping requests."""
    import uvicorn

    from .engine import Engine
    from .index import IndexStoreError, resolve_index
    from .service import create_app

    from .engine import run_config
    from .index import read_manifest

    d = resolve_index(index)
    svc = run_config(read_manifest(d)["run"]["config"], set_).service
    host, port = host or svc.host, port or svc.port
    key = api_key or svc.api_key or os.environ.get("INFLUCODER_API_KEY")
    if not is_loopback(host) and not key and not force:  # checked before loading anything
        raise IndexStoreError(f"refusing to serve on {host} without an API key: pass --api-key (or $INFLUCODER_API_KEY), or --force")
    engine = Engine.load(d, run_dir=run_dir, overrides=set_)
    app = create_app(engine, api_key=key, sighup_reload=True)
    console.print(f"serving {d} ({engine.count} examples, build {engine.build_id[:8]}) on http://{host}:{port} — docs at /docs")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _standalone() -> typer.Typer:
    """These commands on their own (`python -m influcoder.cli_index …`), before or without cli.py."""
    app = typer.Typer(help="influcoder index commands", no_args_is_help=True, pretty_exceptions_enable=False)
    app.add_typer(index_app, name="index")
    app.command("query")(query)
    app.command("serve")(serve)
    return app


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _standalone()()
