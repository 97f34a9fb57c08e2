"""Send influcoder jobs to a Ray cluster through the Ray Jobs API, and follow them.

A submitted job is `python -m jobs.<kind> CONFIG ...` run on the head node in a copy of the working
directory (the repository: `influcoder/`, `jobs/`, `configs/`), so the cluster runs the code you
have here. Outputs are paths as the cluster sees them: give an absolute shared path or an fsspec
URL (s3://, gs://); a relative one lands in the job's temporary working directory.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__

# Never uploaded: environments, history, outputs, built indexes, caches (gitignore syntax).
EXCLUDES = ["/.venv/", "/.git/", "/runs/", "/index/*", "/.ray/", "/.pytest_cache/", "__pycache__/", "*.egg-info/",
            "/build/", "*.zarr/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A job that cannot be submitted as asked; the message says what to change."""


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address`; None: Ray's choice ($RAY_API_SERVER_ADDRESS,
    $RAY_ADDRESS, a running local Ray, else http://127.0.0.1:8265)."""
    from ray.job_submission import JobSubmissionClient

    if address is None:
        return JobSubmissionClient(None)
    # Ray lets $RAY_ADDRESS override an explicit address; an address typed on the command line should win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def entrypoint(kind: str, config: str | Path, working_dir: str | Path, args: list[str], python: str = "python") -> str:
    """`python -m jobs.<kind> <config relative to working_dir> args…`, shell-quoted."""
    wd, cfg = Path(working_dir).resolve(), Path(config).resolve()
    if not (wd / "jobs" / f"{kind}.py").is_file() or not (wd / "influcoder").is_dir():
        raise SubmitError(f"{wd}: not an influcoder checkout (no jobs/{kind}.py); run from the repository root or pass --working-dir")
    try:
        rel = cfg.relative_to(wd)
    except ValueError:
        raise SubmitError(f"{config}: the config must be inside the working dir {wd}, which is what the cluster receives") from None
    return " ".join(shlex.quote(x) for x in [python, "-m", f"jobs.{kind}", rel.as_posix(), *args])


def runtime_env(working_dir: str | Path, excludes: list[str] | None = None) -> dict[str, Any]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES + list(excludes or []), "env_vars": env}


def submit(address: str | None, kind: str, config: str | Path, args: list[str], working_dir: str | Path = ".",
           excludes: list[str] | None = None, python: str = "python", job_id: str | None = None) -> str:
    """Submit `jobs.<kind>`; returns the job id."""
    ep = entrypoint(kind, config, working_dir, args, python)
    return client(address).submit_job(entrypoint=ep, runtime_env=runtime_env(working_dir, excludes), submission_id=job_id,
                                      metadata={"influcoder": __version__, "kind": kind, "config": str(config)})


def status(address: str | None, job_id: str) -> dict[str, Any]:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata}


def logs(address: str | None, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str | None, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    return [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status),
             "entrypoint": j.entrypoint, "start_time": j.start_time} for j in client(address).list_jobs()]


def follow(address: str | None, job_id: str, out: Callable[[str], None] | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status."""
    c, shown, t0 = client(address), 0, time.monotonic()
    out = out or (lambda s: (sys.stderr.write(s), sys.stderr.flush()))
    while True:
        st = c.get_job_status(job_id)
        st = str(st.value if hasattr(st, "value") else st)
        text = c.get_job_logs(job_id)
        if len(text) > shown:
            out(text[shown:])
            shown = len(text)
        if st in TERMINAL:
            return st
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {st} after {timeout_s:.0f}s")
        time.sleep(poll_s)
