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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``make test`` runs two workers (``-n 2 --dist loadgroup --no-loadscope-reorder``). Tests that
    share a module-scoped fixture form one group, so one worker builds it once; groups holding a
    ``slow`` test are handed out first, so the long ones start at once and the two workers finish
    together (the order inside a group, and every group's tests together, are kept)."""
    parent: dict[tuple, tuple] = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        names = sorted(n for n in getattr(item, "fixturenames", ())
                       if defs and (d := defs.name2fixturedefs.get(n)) and d[-1].scope == "module")
        keys = [(item.module.__name__, n) for n in names] if names else []
        for a, b in zip(keys, keys[1:]):
            parent[find(a)] = find(b)
        shared[item] = keys
    unit = {}
    for item in items:
        if shared[item]:
            root = find(shared[item][0])
            unit[item] = f"{root[0]}:{root[1]}"
            item.add_marker(pytest.mark.xdist_group(unit[item]))
        else:
            unit[item] = item.nodeid
    first, order, slow = {}, {}, set()
    for i, item in enumerate(items):
        first.setdefault(unit[item], i)
        order[item] = i
        if item.get_closest_marker("slow"):
            slow.add(unit[item])
    items.sort(key=lambda it: (unit[it] not in slow, first[unit[it]], order[it]))
