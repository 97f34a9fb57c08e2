"""Gradient store: resume after a crash ends identical to a clean run; mismatches are refused."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from influcoder.config import load_config
from influcoder.gradient_job import run_local
from influcoder.store import GradStore, StoreMismatch, check_compatible


def tiny(root, tmp_path, *extra):
    return load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", *extra])


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("grads", "norm", "loss", "n_tokens", "ids", "done")}


def assert_same(a, b):
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_store_schema_and_manifest(root, tmp_path):
    cfg = tiny(root, tmp_path)
    s = run_local(cfg, progress=False)
    st = GradStore.open(s.store)
    assert st.complete and st.n == 192 and st.dim == 256 and st.n_shards == 6
    assert st.group["grads"].dtype == np.float16 and st.group["grads"].chunks == (32, 256)
    norms = np.linalg.norm(st.grads().astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=1e-2) and (st.array("norm") > 0).all()
    m = st.manifest
    assert m["sketch"]["kind"] == "countsketch" and m["sketch"]["version"] >= 1
    assert m["a_gradients"].startswith("skipped") and m["model"]["adapter"]["fresh"]
    assert m["dataset"]["n"] == 192 and len(m["dataset"]["fingerprint"]) == 64
    assert (cfg.run_dir / "adapter" / "adapter_config.json").is_file()
    assert st.ids()[:2] == ["demo-00000", "demo-00001"]


def test_resume_after_partial_shard_equals_clean_run(root, tmp_path):
    clean = run_local(tiny(root, tmp_path / "a"), progress=False)
    cfg = tiny(root, tmp_path / "b")
    first = run_local(cfg, progress=False)
    g = zarr.open_group(first.store, mode="r+")
    # a crash mid-shard: rows half written, done flag never set
    g["done"][1] = False
    g["grads"][40:48] = np.float16(7)
    g["loss"][40:48] = -1
    again = run_local(cfg, progress=False)
    assert again.shards_run == 1
    assert_same(arrays(clean.store), arrays(again.store))


def test_killed_process_resumes_to_identical_store(root, tmp_path):
    args = ["--set", f"out_dir={tmp_path}", "--set", "data.demo.n=1500", "--set", "gradients.shard_size=16", "--no-progress"]
    cmd = [sys.executable, "-m", "influcoder", "gradients", str(root / "configs" / "tiny.yaml"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = tmp_path / "tiny" / "grads.zarr"
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        try:
            done = zarr.open_group(str(store), mode="r")["done"][:]
        except Exception:
            done = np.zeros(1, bool)
        if 2 <= done.sum() < len(done):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    assert 0 < zarr.open_group(str(store), mode="r")["done"][:].sum() < 94
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = run_local(tiny(root, tmp_path / "clean", "data.demo.n=1500", "gradients.shard_size=16"), progress=False)
    assert_same(arrays(clean.store), arrays(store))


def test_changed_settings_are_refused_naming_the_difference(root, tmp_path):
    run_local(tiny(root, tmp_path), progress=False)
    with pytest.raises(StoreMismatch, match="sketch.seed: 0 != 1"):
        run_local(tiny(root, tmp_path, "gradients.seed=1"), progress=False)
    with pytest.raises(StoreMismatch, match="model.seed"):
        run_local(tiny(root, tmp_path, "model.seed=5"), progress=False)


def test_pool_and_queries_compare_and_mismatch(root, tmp_path):
    pool = GradStore.open(run_local(tiny(root, tmp_path), progress=False).store)
    queries = GradStore.open(run_local(tiny(root, tmp_path), "queries", progress=False).store)
    check_compatible(pool.manifest, queries.manifest)
    other = GradStore.open(run_local(tiny(root, tmp_path / "o", "gradients.sketch=sjlt"), "queries", progress=False).store)
    with pytest.raises(StoreMismatch, match="sketch.kind: 'countsketch' != 'sjlt'"):
        check_compatible(pool.manifest, other.manifest)


def test_locations_do_not_matter_but_adapter_content_does():
    a = {"model": {"name": "m", "source": "/cache/a", "adapter": {"fresh": False, "path": "runs/x/adapter", "sha256": "1"}}}
    b = {"model": {"name": "m", "source": "/other/cache", "adapter": {"fresh": False, "path": "/abs/runs/x/adapter", "sha256": "1"}}}
    check_compatible(a, b, keys=("model",))
    b["model"]["adapter"]["sha256"] = "2"
    with pytest.raises(StoreMismatch, match="model.adapter.sha256"):
        check_compatible(a, b, keys=("model",))
