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


# the longest modules, longest first (each fine-tunes or executes notebooks in its fixtures)
LONGEST = ("test_notebooks", "test_mini_demo", "test_mini", "test_resume", "test_mini_latent")


def pytest_collection_modifyitems(config, items):
    """``make test`` runs two workers, each given whole test modules (``-n 2 --dist loadscope
    --no-loadscope-reorder``: a module's fixtures are built once). The LONGEST modules are handed
    out first, then the other modules holding a ``slow`` test, then the rest, so the long ones
    start at once and the two workers finish together; a module's tests stay together and in order."""
    first, slow = {}, set()
    for i, item in enumerate(items):
        first.setdefault(item.module.__name__, i)
        if item.get_closest_marker("slow"):
            slow.add(item.module.__name__)

    def rank(name: str) -> int:
        return LONGEST.index(name) if name in LONGEST else len(LONGEST) + (name not in slow)

    items.sort(key=lambda it: (rank(it.module.__name__), first[it.module.__name__]))  # stable: order kept within
