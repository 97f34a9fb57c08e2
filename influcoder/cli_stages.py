"""CLI commands for the stages after the gradients: finetune, teacher, distill, eval, demo.

Registered on the main app in `influcoder.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import load_config

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see `influcoder config template`).")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config key: --set student.epochs=5 (repeatable).")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]

eval_app = typer.Typer(help="Evaluate: student fidelity, planted-behaviour retrieval, and an HTML report.", no_args_is_help=True)


def _print(obj: dict) -> None:
    print(json.dumps(obj, indent=2, default=str))


def finetune_cmd(config: ConfigArg, set_: SetOpt = [], progress: ProgressOpt = True) -> None:
    """LoRA fine-tune of the decoder on the pool: the checkpoint gradients are taken at by default.

    Writes <run>/finetune/adapter/ (a PEFT adapter), adam.safetensors (optimizer moments, for the
    `adam` preconditioner) and finetune.json (loss curve)."""
    from .finetune import finetune

    rep = finetune(load_config(config, set_), progress)
    _print({k: v for k, v in rep.items() if k != "log"})


def teacher_cmd(config: ConfigArg, set_: SetOpt = [],
                out: Annotated[Optional[Path], typer.Option(help="Output folder; default <run>/teacher.zarr.")] = None) -> None:
    """Teacher rankings: gradient cosine of anchors × pool, with disjoint train/held-out slices.

    Reads the pool (and, when data.queries is set, the queries) gradient stores; writes
    <run>/teacher.zarr (float16 scores, top-k per anchor, the splits, a manifest)."""
    from .teacher import build_teacher

    _print(build_teacher(load_config(config, set_), out).as_dict())


def distill_cmd(config: ConfigArg, set_: SetOpt = [], progress: ProgressOpt = True) -> None:
    """Distil the teacher into a sentence-transformers student encoder.

    Writes <run>/encoder/ (loadable with SentenceTransformer(path)) and <run>/fidelity.json +
    fidelity.png: trained vs untrained student vs TF-IDF on the held-out block."""
    from .distill import distill

    rep = distill(load_config(config, set_), progress)
    _print({"encoder": rep["encoder"], "best_epoch": rep["best_epoch"], "sizes": rep["sizes"], "rows": rep["rows"]})


@eval_app.command("fidelity")
def eval_fidelity_cmd(config: ConfigArg, set_: SetOpt = [],
                      encoder: Annotated[Optional[str], typer.Option(help="Encoder to score (folder or name); default the run's student.")] = None) -> None:
    """Recompute the held-out fidelity (per-anchor and aggregated Spearman, recall@k, NDCG@k) of any encoder."""
    from .fidelity import eval_fidelity

    _print(eval_fidelity(load_config(config, set_), encoder))


@eval_app.command("planted")
def eval_planted_cmd(config: ConfigArg, set_: SetOpt = [],
                     json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report to this JSON file.")] = None,
                     progress: ProgressOpt = False,
                     resume: Annotated[bool, typer.Option("--resume", help="Read the result of a seed that already has one instead of running it again; a close-the-loop asked for now (planted.close_loop), and missing there or made with other planted.close_loop_* settings, is run from the seed's saved rankings.")] = False) -> None:
    """Planted-behaviour retrieval (the DATE-LM toxicity protocol), every method in one run.

    Plants unsafe examples in a benign pool, fine-tunes, ranks the pool by influence on held-out
    unsafe references (teachers, student, untrained student, TF-IDF, BM25, random), reports
    AUPRC / recall / precision / time per seed and their spread, and closes the loop by removing
    the top-ranked rows and fine-tuning again."""
    from .evaluation import planted_eval

    rep = planted_eval(load_config(config, set_), json_out, progress, resume)
    _print({"aggregate": rep["aggregate"], "plots": rep["plots"]})


@eval_app.command("table")
def eval_table_cmd(reports: Annotated[list[str], typer.Argument(metavar="REPORT...",
        help="Planted reports (`eval planted --json` files), one column each, named by file stem; or NAME=A.json,B.json: "
             "one column named NAME pooling the seeds of several runs of the same variant (mean ± std over all of them).")]) -> None:
    """Print a markdown table of mean ± std AUPRC per method (what the README's Results section shows)."""
    from .report import merge_planted, planted_markdown

    columns = {}
    for arg in reports:
        name, _, paths = arg.partition("=") if "=" in arg else ("", "", arg)  # a path may hold "=", a name may not
        files = [Path(x) for x in paths.split(",") if x]
        for f in files:
            if not f.is_file():
                raise typer.BadParameter(f"{f}: no such report", param_hint="REPORTS")
        reps = [json.loads(f.read_text()) for f in files]
        try:
            columns[name or files[0].stem] = reps[0] if len(reps) == 1 else merge_planted(reps, [str(f) for f in files])
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="REPORTS") from e
    print(planted_markdown(columns), end="")


@eval_app.command("report")
def eval_report_cmd(run_dir: Annotated[Path, typer.Argument(help="A run folder (e.g. runs/demo).")]) -> None:
    """Write RUN_DIR/report.html: fidelity, planted retrieval and cost results with their plots."""
    from .report import write_report

    print(write_report(run_dir))


def demo_cmd(
    config: Annotated[Optional[Path], typer.Option(help="Run config; default configs/demo.yaml (or configs/tiny.yaml with --quick).")] = None,
    set_: SetOpt = [],
    quick: Annotated[bool, typer.Option("--quick", help="Tiny random models: the whole pipeline in seconds.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Redo every stage instead of reusing cached artefacts.")] = False,
) -> None:
    """Run the whole pipeline on the embedded default and show which training data caused a behaviour."""
    from .demo import run_demo

    root = Path(__file__).resolve().parents[1] / "configs"
    path = config or root / ("tiny.yaml" if quick else "demo.yaml")
    run_demo(load_config(path, set_), fresh=fresh)
