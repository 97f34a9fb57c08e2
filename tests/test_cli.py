import json
import subprocess
import sys

import yaml

from influcoder import __version__


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "influcoder", *args], capture_output=True, text=True, cwd=cwd)


def test_version_and_help():
    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "config" in r.stdout and "data" in r.stdout


def test_config_template_and_show(tmp_path, root):
    r = cli("config", "template")
    assert r.returncode == 0 and "sketch: countsketch" in r.stdout
    r = cli("config", "show", str(root / "configs" / "tiny.yaml"), "--set", "gradients.dim=128")
    assert r.returncode == 0
    assert yaml.safe_load(r.stdout)["gradients"]["dim"] == 128


def test_bad_config_exits_2_naming_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher:\n  topkk: 5\n")
    r = cli("config", "show", str(p))
    assert r.returncode == 2 and "teacher.topkk" in r.stderr and str(p) in r.stderr


def test_data_check_and_demo(tmp_path, root):
    r = cli("data", "demo", "--out", str(tmp_path / "d"), "--n", "50", "--planted-share", "0.1")
    assert r.returncode == 0, r.stderr
    pool = [json.loads(x) for x in (tmp_path / "d" / "pool.jsonl").read_text().splitlines()]
    assert len(pool) == 50 and sum(x["planted"] for x in pool) == 5
    bad = tmp_path / "d" / "pool.jsonl"
    bad.write_text(bad.read_text() + "{oops\n")
    args = ["data", "check", str(root / "configs" / "tiny.yaml"), "--set", f"data.path={bad}", "--json"]
    r = cli(*args)
    assert r.returncode == 2 and f"{bad}:51" in r.stderr
    r = cli(*args, "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows"] == 50 and out["bad_rows"] == 1 and out["n_truncated"] == 0
