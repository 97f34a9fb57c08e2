"""Ray job: compute (or resume) a gradient store. `python -m jobs.gradients --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.gradients", description="Per-example LoRA gradients into a resumable zarr store, on Ray workers.")
    p.add_argument("config", help="YAML run config (a path inside the job's working dir).")
    p.add_argument("--split", default="pool", help="`pool` (data.path) or `queries` (every file in data.queries).")
    p.add_argument("--out", default=None, help="Store folder or fsspec URL; default <run>/grads.zarr (pool) or <run>/grads-<split>.zarr.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a config key (repeatable).")
    p.add_argument("--workers", type=int, default=None, help="Worker actors; default ray.num_workers, else one per GPU or CPU. 0: in this process, no Ray.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from influcoder.config import load_config
    from influcoder.ray_jobs import run_job

    summary = run_job(load_config(a.config, a.overrides), a.split, a.out, progress=not a.no_progress, num_workers=a.workers)
    print(json.dumps(summary.as_dict(), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
