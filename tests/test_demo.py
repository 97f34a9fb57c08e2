"""`influcoder demo --quick`: the whole pipeline end to end on tiny models."""

import json
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path, root):
    cmd = [sys.executable, "-m", "influcoder", "demo", "--quick", "--set", f"out_dir={tmp_path}", "--set", f"index.root={tmp_path}/index"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "tiny"
    summary = json.loads((run / "demo-summary.json").read_text())
    for f in ("grads.zarr", "grads-queries.zarr", "teacher.zarr", "encoder/modules.json", "fidelity.json", "fidelity.png"):
        assert (run / f).exists(), f
    assert "which training examples made the model say this?" in r.stdout and "influcoder serve --index" in r.stdout
    assert (tmp_path / "index" / "tiny" / "faiss.index").exists()
    ret = summary["retrieval"]
    assert summary["n_planted"] == 19 and set(ret) >= {"student (influcoder filter)", "teacher (gradient fisher)", "TF-IDF", "random"}
    for m in ret.values():
        assert 0 <= m["auprc"] <= 1
    c = summary["filter"]["counts"]
    assert c["rows"] == 192 and c["kept"] + c["flagged"] == 192 and (run / "filtered" / "report.html").exists()
    fid = summary["fidelity"]
    assert fid["student"]["per_anchor_spearman"] > fid["untrained"]["per_anchor_spearman"]
    # a rerun is cached: no stage runs again
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert r2.returncode == 0 and "cached" in r2.stdout
    assert json.loads((run / "demo-summary.json").read_text())["timings_s"] == {}


def test_demo_quick_at_the_finetuned_checkpoints(tmp_path, root):
    """The default attribution point on tiny models: fine-tune (2 checkpoints), one store per
    checkpoint, the learning-rate-weighted teacher, and what the fine-tune learned."""
    cmd = [sys.executable, "-m", "influcoder", "demo", "--quick", "--set", f"out_dir={tmp_path}", "--set", f"index.root={tmp_path}/index",
           "--set", "model.target=finetuned", "--set", "data.demo.n=96", "--set", "planted.n_generate=2", "--set", "planted.max_new_tokens=4",
           "--set", "planted.samples=1", "--set", "student.epochs=1", "--set", "ray.num_workers=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "tiny"
    for f in ("grads-ckpt0.zarr", "grads-ckpt1.zarr", "grads-queries-ckpt0.zarr", "grads-queries-ckpt1.zarr", "finetune/learned.json"):
        assert (run / f).exists(), f
    summary = json.loads((run / "demo-summary.json").read_text())
    assert "sampled_rate" in summary["learned"]["finetuned"] and 0 <= summary["retrieval"]["teacher (gradient fisher)"]["auprc"] <= 1
    assert "learned?" in r.stdout
    # --fresh redoes every stage, the index too (it lives outside the run folder and must not be reused)
    before = json.loads((tmp_path / "index" / "tiny" / "manifest.json").read_text())["build_id"]
    r2 = subprocess.run(cmd + ["--fresh"], capture_output=True, text=True, cwd=root, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "index" in json.loads((run / "demo-summary.json").read_text())["timings_s"]
    assert json.loads((tmp_path / "index" / "tiny" / "manifest.json").read_text())["build_id"] != before
