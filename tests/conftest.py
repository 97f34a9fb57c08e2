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
