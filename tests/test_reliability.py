"""Reliability at the command line: one-line errors with exit code 2 and no traceback,
interrupted runs that resume to the same result, untrusted files refused, determinism."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from defectlab.base import runs
from defectlab.app import cli
from test_data import make_mvtec


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("defectlab: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _broken_roots(tmp: Path) -> dict[str, tuple[list, tuple]]:
    """name → (CLI args, words the error line must contain)."""
    ok = make_mvtec(tmp / "ok")
    neither = tmp / "neither"
    (neither / "stuff").mkdir(parents=True)
    corrupt = make_mvtec(tmp / "corrupt")
    (corrupt / "widget/test/dent/001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    mismatch = make_mvtec(tmp / "mismatch")
    Image.new("L", (20, 20)).save(mismatch / "widget/ground_truth/dent/000_mask.png")
    empty = make_mvtec(tmp / "empty")
    (empty / "widget/test/scuff").mkdir()
    return {
        "missing root": (["data", "info", tmp / "nowhere"], ("nowhere",)),
        "neither layout": (["data", "info", neither], (str(neither), "MVTec")),
        "unknown product": (["finetune", "--data", ok, "--product", "gizmo"], ("gizmo", "widget")),
        "empty class": (["finetune", "--data", empty, "--product", "widget"], ("scuff",)),
        "corrupt image": (["finetune", "--data", corrupt, "--product", "widget"], ("001.png",)),
        "mask size": (["finetune", "--data", mismatch, "--product", "widget"], ("000_mask.png",)),
        "crop too large": (["finetune", "--data", ok, "--product", "widget", "--crop", "64"], ("crop",)),
        "unknown model path": (["finetune", "--model", tmp / "no-model"], ("no-model",)),
        "hub offline": (["finetune", "--model", "someone/not-cached-dit"], ("someone/not-cached-dit",)),
        "unknown method": (["finetune", "--method", "prompt"], ("prompt", "difffit")),
        "bad guidance": (["sample", "--run", "base", "--guidance", "-1"], ("guidance",)),
        "no run": (["sample", "--run", tmp / "no-run"], ("no-run",)),
    }


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return _broken_roots(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", [
    "missing root", "neither layout", "unknown product", "empty class", "corrupt image", "mask size",
    "crop too large", "unknown model path", "hub offline", "unknown method", "bad guidance", "no run"])
def test_bad_input_is_one_line_exit_2(capsys, broken, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, needles = broken[case]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *needles)


def test_debug_flag_shows_the_traceback(broken):
    argv, _ = broken["missing root"]
    with pytest.raises(Exception):
        cli.main(["--debug", *map(str, argv)])


def test_out_of_memory_suggests_what_to_change(capsys, monkeypatch):
    from defectlab.stages import train

    def oom(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "run", oom)
    code, _, err = run_cli(capsys, "finetune")
    assert_one_line_error(code, err, "out of GPU memory", "--batch-size", "--grad-accum")


def test_malicious_pickle_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "DiT-evil.pt"
    torch.save({"model": Evil()}, bad)
    code, _, err = run_cli(capsys, "finetune", "--model", bad)
    assert code == 2 and not (tmp_path / "pwned").exists()
    assert "DiT-evil.pt" in err


# ----------------------------------------------------------------------------- a CLI process (test_resume: kill -9, SIGTERM)
def _cli(home: Path, *args, **kw):
    env = {**os.environ, "DEFECTLAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "defectlab", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_same_config_and_seed_give_the_same_checkpoint(tmp_path):
    from defectlab.stages import train

    cfg = dict(model="tiny", method="bitfit", image_size=16, epochs=1, val_per_class=1, val_timesteps=2,
               lr=2e-3, runs_dir=str(tmp_path), progress=False)
    a = train.run(train.TrainConfig(**cfg))
    b = train.run(train.TrainConfig(**cfg))
    ta = runs.load_tensors(runs.find_checkpoint(a, "latest") / runs.STATE_FILE)
    tb = runs.load_tensors(runs.find_checkpoint(b, "latest") / runs.STATE_FILE)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    versions = runs.read_json(a / "config.json")["versions"]
    assert {"torch", "diffusers", "python"} <= versions.keys()
