"""Test-wide setup: a private DEFECTLAB_HOME so tests never write into the checkout's data/ or
outputs/, CPU only, a few threads, deterministic algorithms."""
import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="defectlab-tests-"))
os.environ.setdefault("DEFECTLAB_HOME", str(_home))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

SHARED_SCREWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec-screw-sample"


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(os.environ["DEFECTLAB_HOME"])


@pytest.fixture(scope="session")
def shared_screws() -> Path:
    """The few real MVTec AD screw images beside the checkout (never copied into the repo)."""
    if not SHARED_SCREWS.is_dir():
        pytest.skip(f"real MVTec sample not present at {SHARED_SCREWS}")
    return SHARED_SCREWS
