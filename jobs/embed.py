"""Ray job: embed the pool's texts with a sentence-transformers encoder into a resumable zarr
store (what the index builder reads). `python -m jobs.embed --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.embed", description="Embed every pool text into an (n, dim) float32 zarr array + ids, on Ray workers.")
    p.add_argument("config", help="YAML run config (a path inside the job's working dir); its `data` section names the pool.")
    p.add_argument("--encoder", required=True, help="Sentence-transformers folder or name (e.g. <run>/encoder, all-MiniLM-L6-v2, random:bert).")
    p.add_argument("--out", required=True, help="Store folder or fsspec URL.")
    p.add_argument("--prompt", default="", help="Prompt prepended to every text (e.g. the student's document prompt).")
    p.add_argument("--batch-size", type=int, default=0, help="Texts per encoder forward pass; 0: index.embed_batch_size, else 8 on a CPU, 64 on a GPU.")
    p.add_argument("--shard-size", type=int, default=1024, help="Rows per shard (one zarr chunk, one unit of work and of resume).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a config key (repeatable).")
    p.add_argument("--workers", type=int, default=None, help="Worker actors; default ray.num_workers, else one per GPU or CPU. 0: in this process, no Ray.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from influcoder.config import load_config
    from influcoder.embed import embed_pool

    cfg = load_config(a.config, a.overrides)
    summary = embed_pool(cfg, a.encoder, a.out, a.prompt, batch_size=a.batch_size, shard_size=a.shard_size,
                         progress=not a.no_progress, num_workers=a.workers)
    print(json.dumps(summary.as_dict(), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
