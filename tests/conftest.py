import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not here (a user's clone has no shared datasets)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data_or_demo():
    """Real text: Dolly pairs from ../shared/data when present, else the embedded demo corpus."""
    from influcoder.config import DataConfig
    from influcoder.data import load_records

    dolly = SHARED_DATA / "dolly_open_qa" / "dolly_open_qa.jsonl"
    if dolly.is_file():
        return load_records(DataConfig(path=str(dolly), limit=256))[0]
    return load_records(DataConfig(demo={"n": 256}))[0]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny run (gradients, teacher, distilled student) of configs/tiny.yaml, built once per
    test session; the index, engine, service and filter tests share it."""
    from influcoder.config import load_config
    from influcoder.distill import distill, encoder_path
    from influcoder.gradient_job import run_local
    from influcoder.teacher import build_teacher

    base = tmp_path_factory.getbasetemp() / "tiny-run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"out_dir={base}", f"index.root={base / 'index'}"])
    if not (encoder_path(cfg) / "modules.json").is_file():
        run_local(cfg, progress=False)
        run_local(cfg, "queries", progress=False)
        build_teacher(cfg)
        distill(cfg, progress=False)
    return cfg
