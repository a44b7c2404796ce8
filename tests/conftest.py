"""Test-wide setup: a private DEFECTLAB_HOME so tests never write into the checkout's data/ or
outputs/, CPU only, a few threads, deterministic algorithms."""
import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="defectlab-tests-"))
os.environ["DEFECTLAB_HOME"] = str(_home)  # never a user's real data or outputs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread per test process: tiny models gain little from threads, and tests run two
# processes at once (pytest -n 2, subprocess tests), where OpenMP oversubscription is ruinous
torch.set_num_threads(1)

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
