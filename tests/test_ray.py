"""Ray jobs on a real local Ray (CPU): the 2-worker store equals the single-process one, killed
workers change nothing, a submitted job runs on a cluster we start (and stop) ourselves, and the
embedding job equals a direct encode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from influcoder.gradient_job import run_local  # noqa: E402
from influcoder.ray_jobs import run_ray  # noqa: E402
from influcoder.ray_submit import SubmitError, entrypoint  # noqa: E402
from influcoder.store import StoreMismatch  # noqa: E402

from test_store import arrays, assert_same, tiny  # noqa: E402  (the same store comparisons)

BIN = Path(sys.executable).parent


def short_tmp(prefix: str) -> str:
    """Ray's unix sockets live under its temp dir, so it must be short: not pytest's tmp_path."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def wait_done(store: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            done = int(zarr.open_group(str(store), mode="r")["done"][:].sum())
        except Exception:
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.02)
    raise AssertionError(f"{store}: fewer than {at_least} shards done after {timeout}s")


@pytest.fixture(scope="module")
def local_ray():
    tmp = short_tmp("icr-")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_cli_runs_on_ray_by_default_and_equals_single_process(root, tmp_path):
    temp = short_tmp("icg-")
    try:
        r = subprocess.run([sys.executable, "-m", "influcoder", "gradients", str(root / "configs" / "tiny.yaml"),
                            "--set", f"out_dir={tmp_path / 'ray'}", "--set", "ray.num_workers=2", "--set", f"ray.temp_dir={temp}",
                            "--no-progress"], capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["workers"] == 2 and summary["retries"] == 0 and summary["shards_run"] == summary["shards"] > 1
    assert summary["examples_per_s"] > 0 and summary["tokens_per_s"] > 0
    clean = run_local(tiny(root, tmp_path / "local"), progress=False)
    assert summary["store"] == str(tmp_path / "ray" / "tiny" / "grads.zarr")
    assert_same(arrays(clean.store), arrays(summary["store"]))


def test_preconditioned_url_store_equals_local_and_resumes(root, tmp_path, local_ray):
    # second_moment: worker 0 estimates the preconditioner once; the other loads it. Output as a URL.
    extra = ("gradients.preconditioner=second_moment", "gradients.precondition_sample=32")
    url = f"file://{tmp_path}/ray/grads.zarr"
    s = run_ray(tiny(root, tmp_path / "ray", *extra), out=url, progress=False, num_workers=2)
    assert s.store == str(tmp_path / "ray" / "grads.zarr") and s.workers == 2 and s.shards_run == s.shards
    # the single-process reference goes through fsspec (memory://), as an s3:// store would
    clean = run_local(tiny(root, tmp_path / "local", *extra), out="memory://influcoder-test/grads.zarr", progress=False)
    assert clean.store == "memory://influcoder-test/grads.zarr"
    assert_same(arrays(clean.store), arrays(tmp_path / "ray" / "grads.zarr"))
    with pytest.raises(RuntimeError, match="memory://"):
        run_ray(tiny(root, tmp_path / "ray", *extra), out=clean.store, progress=False)
    # a driver that died mid-shard: shard 1 half written, never marked done
    g = zarr.open_group(url, mode="r+")
    g["done"][1] = False
    g["grads"][40:50] = np.float16(7)
    again = run_ray(tiny(root, tmp_path / "ray", *extra), out=url, progress=False, num_workers=2)
    assert again.shards_run == 1 and again.workers == 1
    assert_same(arrays(clean.store), arrays(tmp_path / "ray" / "grads.zarr"))
    with pytest.raises(StoreMismatch, match="sketch.seed"):
        run_ray(tiny(root, tmp_path / "ray", *extra, "gradients.seed=3"), out=url, progress=False, num_workers=1)


def test_killed_workers_still_give_a_complete_identical_store(root, tmp_path, local_ray):
    extra = ("data.demo.n=800", "gradients.shard_size=16")
    cfg = tiny(root, tmp_path / "ray", *extra)
    res: dict = {}

    def job():
        try:
            res["summary"] = run_ray(cfg, progress=False, num_workers=2)
        except BaseException as e:  # surfaced by the asserts below
            res["error"] = e

    th = threading.Thread(target=job, daemon=True)
    th.start()
    store = tmp_path / "ray" / "tiny" / "grads.zarr"
    wait_done(store, 3)
    names = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if x["name"].startswith("influcoder-gradients-")]
    progress = ray.get_actor(next(n for n in names if n.endswith("-progress")))
    pid, (name, _) = next(iter(ray.get(progress.workers.remote()).items()))
    os.kill(pid, signal.SIGKILL)  # a crash mid-shard: Ray restarts the actor, its shard is redone
    done = wait_done(store, 0)
    wait_done(store, done + 2)
    other = next(n for n in names if not n.endswith("-progress") and n != name)
    ray.kill(ray.get_actor(other))  # gone for good (ray.kill does not restart): the first worker finishes
    th.join(timeout=240)
    assert not th.is_alive() and "error" not in res, res.get("error")
    s = res["summary"]
    assert s.retries >= 1 and s.worker_restarts >= 1 and s.workers_lost == 1
    assert s.shards_run == s.shards == 50 and s.rows == 800
    clean = run_local(tiny(root, tmp_path / "local", *extra), progress=False)
    assert_same(arrays(clean.store), arrays(store))


def test_embed_job_equals_direct_encode_and_resumes(root, tmp_path, local_ray):
    from influcoder.data import load_records
    from influcoder.embed import EmbedStore, embed_pool
    from influcoder.models import load_encoder

    cfg = tiny(root, tmp_path)
    out = tmp_path / "emb.zarr"
    s = embed_pool(cfg, "random:bert", out, prompt="passage: ", shard_size=50, progress=False, num_workers=2)
    assert s.workers == 2 and s.shards == 4 and s.shards_run == 4
    records, _ = load_records(cfg.data)
    direct = load_encoder("random:bert").encode([r.as_text() for r in records], prompt="passage: ", convert_to_numpy=True)
    st = EmbedStore.open(out)
    assert st.ids() == [r.id for r in records]
    emb = st.vectors()
    assert emb.dtype == np.float32 and emb.shape == direct.shape and st.group["emb"].chunks == (50, direct.shape[1])
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    again = embed_pool(cfg, "random:bert", out, prompt="passage: ", shard_size=50, progress=False, num_workers=0)
    assert again.shards_run == 0
    with pytest.raises(StoreMismatch, match="prompt"):
        embed_pool(cfg, "random:bert", out, prompt="query: ", shard_size=50, progress=False, num_workers=0)


def test_entrypoint_is_relative_to_the_uploaded_dir(root, tmp_path):
    ep = entrypoint("gradients", root / "configs" / "tiny.yaml", root, ["--set=out_dir=/x y"])
    assert ep == "python -m jobs.gradients configs/tiny.yaml '--set=out_dir=/x y'"
    outside = tmp_path / "c.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(SubmitError, match="inside the working dir"):
        entrypoint("gradients", outside, root, [])
    with pytest.raises(SubmitError, match="not an influcoder checkout"):
        entrypoint("gradients", outside, tmp_path, [])


# --- a real cluster on loopback, submitted to through the Jobs API ----------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """`ray start --head --block` on loopback with its own temp dir and ports; torn down by killing
    exactly the processes it started (`ray stop` would stop every Ray on the machine)."""
    temp = short_tmp("icc-")
    dash = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp, "--num-cpus", "2",
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=2).read()
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError(f"the test cluster did not come up (ray start exit {head.poll()})")
                time.sleep(0.5)
        yield address, env
    finally:
        procs = {}
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and any(temp in c for c in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        try:
            root_proc = psutil.Process(head.pid)
            procs.update({c.pid: c for c in [root_proc, *root_proc.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
        for p in list(procs.values()):
            procs.update({c.pid: c for c in _children(p)})
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=15)
        head.wait(timeout=15)
        shutil.rmtree(temp, ignore_errors=True)


def _children(p):
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_submit_gradients_to_a_cluster(root, tmp_path, cluster):
    address, env = cluster

    def cli(*args, timeout=300):
        return subprocess.run([sys.executable, "-m", "influcoder", *args], capture_output=True, text=True, cwd=root, env=env, timeout=timeout)

    r = cli("submit", "gradients", "configs/tiny.yaml", "--address", address, "--set", f"out_dir={tmp_path / 'job'}",
            "--set", "ray.num_workers=2", "--wait")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    job_id = r.stdout.strip().splitlines()[-1]
    assert '"workers": 2' in r.stderr  # the job's summary, streamed back from its logs
    st = json.loads(cli("jobs", "status", job_id, "--address", address).stdout)
    assert st["status"] == "SUCCEEDED" and "jobs.gradients" in st["entrypoint"]
    logs = cli("jobs", "logs", job_id, "--address", address).stdout
    assert "grads.zarr" in logs
    clean = run_local(tiny(root, tmp_path / "local"), progress=False)
    assert_same(arrays(clean.store), arrays(tmp_path / "job" / "tiny" / "grads.zarr"))
    # the embedding job goes the same way
    r = cli("submit", "embed", "configs/tiny.yaml", "--address", address, "--encoder", "random:bert",
            "--out", str(tmp_path / "emb.zarr"), "--set", "ray.num_workers=1", "--wait")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    from influcoder.embed import EmbedStore

    emb = EmbedStore.open(tmp_path / "emb.zarr")
    assert emb.vectors().shape[0] == len(emb.ids()) == 192
