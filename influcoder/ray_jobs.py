"""Ray jobs: the gradient store (and the embedding store) computed by N worker actors.

The driver starts a local Ray (or joins `ray.address` / `$RAY_ADDRESS`), creates N actors that each
load the model once, lets actor 0 create or resume the store (it tokenises and, for
`second_moment`, estimates the preconditioner once, before any other worker computes a row), then
hands out pending shards one at a time to whichever worker is free (`ray.wait`). A shard is one
zarr chunk of every per-row array and `done[s]` is set only after its rows are written, so a
worker that dies mid-shard leaves nothing the store counts: the driver puts the shard back in the
queue and gives it to the next free worker. Ray restarts the dead actor (`ray.max_restarts`);
Ray's own task retries are off (`max_task_retries=0`) so that one place, the driver, decides
retries and counts them. A driver that dies leaves a store the next run resumes.
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, NodeDiedError, ObjectLostError, OutOfMemoryError,
                            RayActorError, RayTaskError, WorkerCrashedError)

from .config import Config, RayConfig
from .gradient_job import GradientWorker, JobSummary, default_store_path, open_job, prepare_examples
from .store import RESUME_KEYS, GradStore, check_compatible

# A worker process went away (crash, OOM kill, ray.kill, lost node): its shard is redone elsewhere.
WORKER_LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError, ObjectLostError, NodeDiedError)
# Driver environment worth passing to workers on a cluster (offline hubs, model caches).
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "INFLUCODER_CACHE")
# Unix socket paths (<temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store) must fit in 107 bytes.
MAX_TEMP_DIR = 43


class JobFailed(RuntimeError):
    """The job could not finish; finished shards stay in the store and a rerun resumes."""


def is_url(path: str | Path | None) -> bool:
    return path is not None and "://" in str(path)


def resolve_out(path: str | Path) -> str:
    """An fsspec URL as given; a local path (or file:// URL: zarr's fsspec store would not create its
    folders) made absolute, so every worker writes the same place."""
    p = str(path)
    if p.startswith("file://"):
        p = p[len("file://"):]
    return p if is_url(p) else str(Path(p).expanduser().resolve())


# --- Ray start-up ------------------------------------------------------------------------------

def init_ray(rc: RayConfig, address: str | None = None, min_cpus: int = 0) -> bool:
    """Join `address` / `ray.address` / `$RAY_ADDRESS`, else start a local Ray (with at least `min_cpus`
    CPUs, so asking for more workers than cores oversubscribes instead of waiting forever); True when
    started here."""
    if ray.is_initialized():
        return False
    addr = address or rc.address
    if addr or os.environ.get("RAY_ADDRESS"):
        ray.init(address=addr, log_to_driver=True)  # a Ray job's driver lands here via $RAY_ADDRESS
        return True
    temp = str(Path(rc.temp_dir).expanduser().resolve()) if rc.temp_dir else None
    if temp and len(temp) > MAX_TEMP_DIR:
        raise JobFailed(f"ray.temp_dir={temp!r} is {len(temp)} characters; Ray's unix sockets live under it and need "
                        f"it to be at most {MAX_TEMP_DIR} (e.g. /tmp/ray-{os.getuid()})")
    ray.init(address="local", num_cpus=rc.num_cpus or max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
             _temp_dir=temp, log_to_driver=True)
    return True


def worker_options(cfg: Config, num_workers: int | None) -> tuple[int, dict]:
    """(how many workers, actor options): one per GPU, else one per `num_cpus_per_worker` CPUs."""
    rc, res = cfg.ray, ray.cluster_resources()
    gpus = rc.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if res.get("GPU", 0) >= 1 and cfg.model.device != "cpu" else 0.0
    n = num_workers or rc.num_workers or (int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 1) // rc.num_cpus_per_worker))
    threads = str(cfg.gradients.torch_threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in PASS_ENV if k in os.environ}}
    need, have = (n * gpus, res.get("GPU", 0)) if gpus else (n * rc.num_cpus_per_worker, res.get("CPU", 0))
    if need > have:
        warnings.warn(f"{n} workers need {need:g} {'GPUs' if gpus else 'CPUs'} but the cluster has {have:g}; "
                      "the rest wait until an autoscaler adds nodes (or lower ray.num_workers)", stacklevel=2)
    opts = dict(num_cpus=rc.num_cpus_per_worker, num_gpus=gpus, max_restarts=rc.max_restarts,
                max_task_retries=0, runtime_env={"env_vars": env})
    return max(1, n), opts


# --- actors ------------------------------------------------------------------------------------

class Progress:
    """Rows done per shard (latest attempt only, so a redone shard is not counted twice) and which
    worker pid runs which shard. One per job; the driver's progress bar polls it."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int]] = {}
        self.running: dict[int, tuple[str, int]] = {}

    def add(self, shard: int, attempt: int, rows: int, worker: tuple[int, str] | None = None) -> None:
        if attempt >= self.rows.get(shard, (-1, 0))[0]:
            self.rows[shard] = (attempt, rows)
        if worker is not None:
            self.running[worker[0]] = (worker[1], shard)

    def total(self) -> int:
        return sum(r for _, r in self.rows.values())

    def workers(self) -> dict[int, tuple[str, int]]:
        """{worker pid: (actor name, shard it started last)}."""
        return dict(self.running)


class ShardActor:
    """Base of a worker actor: loads its model in __init__ (again after a restart), then
    `open` (worker 0: create or resume the store), `attach` (the others) and `run` shards."""

    def __init__(self, progress: str | None = None, cwd: str | None = None) -> None:
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in the config mean what they mean to the driver
        # Looked up by name, not passed as a handle: a handle argument would live in the object
        # store, and Ray could not restart this actor once that object was gone.
        try:
            self._progress = ray.get_actor(progress) if progress else None
        except ValueError:
            self._progress = None
        self._attached = False

    def ready(self) -> int:
        return os.getpid()

    def open(self) -> dict:
        info = self._open()
        self._attached = True
        return info

    def attach(self) -> int:
        if not self._attached:  # lazily too: a restarted actor has lost its state
            self._attach()
            self._attached = True
        return os.getpid()

    def run(self, shard: int, attempt: int) -> dict:
        self.attach()
        t0, seen, pid = time.perf_counter(), [0, 0], os.getpid()
        if self._progress is not None:
            self._progress.add.remote(shard, attempt, 0, (pid, ray.get_runtime_context().get_actor_name()))

        def on_batch(n: int, tokens: int) -> None:
            seen[0] += n
            seen[1] += tokens
            if self._progress is not None:
                self._progress.add.remote(shard, attempt, seen[0])

        rows = self._run(shard, on_batch)
        return {"shard": shard, "rows": rows, "tokens": seen[1], "seconds": time.perf_counter() - t0, "pid": pid}

    def pending(self) -> list[int]:
        self.attach()
        return self.store.pending()

    def _open(self) -> dict:
        raise NotImplementedError

    def _attach(self) -> None:
        raise NotImplementedError

    def _run(self, shard: int, on_batch: Callable[[int, int], None]) -> int:
        raise NotImplementedError


def shard_info(store: Any) -> dict:
    """What the driver needs from a store it never opens itself: pending shards and their rows."""
    return {"store": store.path, "rows": store.n, "shards": store.n_shards,
            "pending": {s: len(store.shard_rows(s)) for s in store.pending()}}


class GradientActor(ShardActor):
    def __init__(self, cfg: Config, split: str, store: str, progress: str | None = None, cwd: str | None = None) -> None:
        super().__init__(progress, cwd)
        self.cfg, self.split, self.path = cfg, split, store
        self.worker = GradientWorker(cfg, split)

    def _open(self) -> dict:
        self.store, self.examples = open_job(self.cfg, self.split, self.path, self.worker)
        return shard_info(self.store)

    def _attach(self) -> None:
        self.store = GradStore.open(self.path, mode="r+")
        self.examples, dataset = prepare_examples(self.cfg, self.split, self.worker.decoder.tokenizer)
        self.worker.setup_preconditioner(self.examples)  # loads the file worker 0 estimated
        # Every worker must compute exactly what the store's manifest promises.
        check_compatible(self.store.manifest, self.worker.manifest(dataset), RESUME_KEYS, what=f"{self.path} and worker {os.getpid()}")

    def _run(self, shard: int, on_batch: Callable[[int, int], None]) -> int:
        return self.worker.run_shard(self.store, self.examples, shard, on_batch)


# --- the driver ----------------------------------------------------------------------------------

@dataclass
class DriveStats:
    rows: int = 0
    tokens: int = 0
    shards_run: int = 0
    retries: int = 0
    restarts: int = 0
    lost: int = 0
    seconds: float = 0.0


def _unwrap(e: RayTaskError) -> BaseException:
    """The worker's own exception (StoreMismatch, ModelError…), so callers see its type and message."""
    try:
        return e.as_instanceof_cause()
    except Exception:
        return e


def drive(actors: list, pending: dict[int, int], warming: list, progress: Any, bar: Any, max_shard_retries: int) -> DriveStats:
    """Run every pending shard on `actors` (free now) or `warming` (free once `attach` returns)."""
    queue, attempts, st = deque(sorted(pending)), {s: 0 for s in pending}, DriveStats()
    idle = list(actors)
    inflight: dict[Any, tuple[Any, int]] = {}
    # attach/ping ref → (actor, after a failure?): the actor is free once it answers, gone if it cannot.
    waiting: dict[Any, tuple[Any, bool]] = {a.attach.remote(): (a, False) for a in warming}
    t0 = time.perf_counter()
    while queue or inflight:
        while queue and idle:
            a, s = idle.pop(), queue.popleft()
            inflight[a.run.remote(s, attempts[s])] = (a, s)
        if not inflight and not waiting:
            raise JobFailed(f"every worker is gone; {len(queue)} shards were not computed (rerun to resume)")
        ready, _ = ray.wait(list(inflight) + list(waiting), num_returns=1, timeout=0.5)
        if bar is not None and progress is not None:
            try:
                delta = min(bar.total, ray.get(progress.total.remote(), timeout=5)) - bar.n
                if delta > 0:  # update() throttles redraws (a job's log is not a terminal)
                    bar.set_postfix(busy=len(inflight), retries=st.retries, refresh=False)
                    bar.update(delta)
            except Exception:  # the bar is cosmetic; never let it stop the job
                pass
        for ref in ready:
            if ref in waiting:
                a, recovering = waiting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(a)
                    st.restarts += recovering
                except ActorUnavailableError:  # not restarted yet: ask again shortly
                    time.sleep(0.2)
                    waiting[a.ready.remote()] = (a, recovering)
                except WORKER_LOST:
                    st.lost += 1  # out of restarts, or killed for good
                except RayTaskError as e:
                    raise _unwrap(e) from None
                continue
            a, s = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except WORKER_LOST as e:
                attempts[s] += 1
                st.retries += 1
                if attempts[s] > max_shard_retries:
                    raise JobFailed(f"shard {s} lost its worker {attempts[s]} times (ray.max_shard_retries={max_shard_retries}): {e}") from None
                queue.appendleft(s)
                if progress is not None:
                    progress.add.remote(s, attempts[s], 0)
                waiting[a.ready.remote()] = (a, True)  # answers once Ray has restarted it
                continue
            except RayTaskError as e:
                raise _unwrap(e) from None
            st.rows += res["rows"]
            st.tokens += res["tokens"]
            st.shards_run += 1
            idle.append(a)
    st.seconds = time.perf_counter() - t0
    if bar is not None and bar.total > bar.n:
        bar.update(bar.total - bar.n)
    return st


def start_actors(cls: type, args: tuple, n: int, opts: dict, kind: str) -> tuple[list, Any]:
    """n named actors of `cls(*args, progress actor name, cwd)` and the job's progress actor."""
    tag = secrets.token_hex(3)
    name = f"influcoder-{kind}-{tag}-progress"
    progress = ray.remote(Progress).options(num_cpus=0, name=name).remote()
    actors = [ray.remote(cls).options(name=f"influcoder-{kind}-{tag}-{i}", **opts).remote(*args, name, os.getcwd())
              for i in range(n)]
    return actors, progress


def _check_complete(actors: list) -> None:
    """Ask a live worker whether every shard is marked done (the driver never opens the store)."""
    for a in actors:
        try:
            left = ray.get(a.pending.remote())
        except WORKER_LOST:
            continue
        if left:
            raise JobFailed(f"shards {left[:10]} are still not done after the run; rerun to resume")
        return
    raise JobFailed("no worker is left to confirm the store is complete; rerun to resume")


def _started(actors: list) -> list:
    """The actors whose model loaded. A constructor that raised stops the job with its message (every
    worker would fail the same way); a worker killed while loading is just one worker fewer."""
    alive = []
    for a, ref in [(a, a.ready.remote()) for a in actors]:
        try:
            ray.get(ref)
            alive.append(a)
        except ActorDiedError as e:
            if e.actor_init_failed:  # Ray keeps only the text; its last line names type and message
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                raise JobFailed(f"a worker could not start: {lines[-1] if lines else e}") from None
        except WORKER_LOST:
            pass
    if not alive:
        raise JobFailed("no worker could start")
    return alive


def run_actors(cls: type, args: tuple, n: int, opts: dict, cfg: Config, desc: str, progress: bool, kind: str) -> tuple[dict, DriveStats, int]:
    """Start n actors, open the store on one, drive its pending shards; (store info, stats, workers used)."""
    from tqdm.auto import tqdm

    actors, prog = start_actors(cls, args, n, opts, kind)
    try:
        alive = _started(actors)  # every model loaded before the clock starts
        for opener in alive:  # the only one that creates the store or estimates the preconditioner
            try:
                info = ray.get(opener.open.remote())
                break
            except WORKER_LOST:
                continue
        else:
            raise JobFailed("every worker died while opening the store; rerun to resume")
        others = [a for a in alive if a is not opener][: max(0, len(info["pending"]) - 1)]
        keep = {id(opener), *map(id, others)}
        for a in actors:
            if id(a) not in keep:
                ray.kill(a)  # more workers than pending shards
        total = sum(info["pending"].values())
        with tqdm(total=total, unit="ex", desc=f"{desc} ×{1 + len(others)}", disable=not progress or not total) as bar:
            st = drive([opener], info["pending"], others, prog, bar, cfg.ray.max_shard_retries)
        _check_complete([opener, *others])
        return info, st, 1 + len(others)
    except RayTaskError as e:
        raise _unwrap(e) from None
    finally:
        for a in [*actors, prog]:  # also when reusing a Ray that outlives this job (notebooks, tests)
            ray.kill(a)


@dataclass
class RayJobSummary(JobSummary):
    workers: int
    retries: int
    worker_restarts: int
    workers_lost: int
    wall_seconds: float


def run_ray(cfg: Config, split: str = "pool", out: str | Path | None = None, progress: bool = True,
            num_workers: int | None = None, address: str | None = None) -> RayJobSummary:
    """Compute (or finish) the split's gradient store with N Ray workers; see the module docstring."""
    t_wall = time.perf_counter()
    store = resolve_out(out or default_store_path(cfg, split))
    if store.startswith("memory://"):
        raise JobFailed(f"{store}: a memory:// store lives in one process; Ray workers cannot share it (use --workers 0)")
    started = init_ray(cfg.ray, address, min_cpus=int((num_workers or cfg.ray.num_workers or 0) * cfg.ray.num_cpus_per_worker))
    try:
        n, opts = worker_options(cfg, num_workers)
        info, st, k = run_actors(GradientActor, (cfg, split, store), n, opts, cfg, f"gradients [{split}]", progress, "gradients")
    finally:
        if started:
            ray.shutdown()
    dt = st.seconds
    return RayJobSummary(store, info["rows"], info["shards"], st.shards_run, round(dt, 3),
                         round(st.rows / dt, 3) if st.rows else 0.0, round(st.tokens / dt, 1) if st.rows else 0.0,
                         k, st.retries, st.restarts, st.lost, round(time.perf_counter() - t_wall, 3))


def run_job(cfg: Config, split: str = "pool", out: str | Path | None = None, progress: bool = True,
            num_workers: int | None = None, address: str | None = None) -> JobSummary:
    """The gradient job as `influcoder gradients` runs it: on Ray, or in this process when the
    worker count (`num_workers`, else `ray.num_workers`) is 0. With `teacher.checkpoints`, one job per
    checkpoint (each its own store); the last one's summary is returned."""
    from .gradient_job import checkpoint_configs

    parts = checkpoint_configs(cfg)
    if len(parts) > 1:
        if out:
            raise ValueError("--out with teacher.checkpoints: each checkpoint writes its own store under the run folder")
        return [run_job(c, split, None, progress, num_workers, address) for c, _ in parts][-1]
    cfg = parts[0][0]  # one checkpoint picked (e.g. [-1]): its own store, where the teacher looks for it
    if (cfg.ray.num_workers if num_workers is None else num_workers) == 0:
        from .gradient_job import run_local

        return run_local(cfg, split, resolve_out(out) if out else None, progress)
    return run_ray(cfg, split, out, progress, num_workers, address)
