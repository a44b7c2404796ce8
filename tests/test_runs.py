"""Run folders: atomic writes, numbering, checkpoints, path safety."""
import json

import pytest
import torch

from defectlab import runs
from defectlab.errors import DefectlabError


def test_create_never_reuses_a_folder(tmp_path):
    a = runs.create("demo", {"x": 1}, base=tmp_path)
    b = runs.create("demo", {"x": 2}, base=tmp_path)
    assert a != b and a.name.startswith("000-") and b.name.startswith("001-")
    assert runs.load_config(a) == {"x": 1} and runs.load_config(b) == {"x": 2}
    assert "torch" in runs.read_json(a / "config.json")["versions"]
    assert runs.resolve("1", tmp_path) == b and runs.resolve(a) == a
    with pytest.raises(DefectlabError, match="run not found"):
        runs.resolve("nope", tmp_path)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.json"
    runs.write_json(target, {"ok": True})

    def broken(tmp):
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        runs.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_disk_full_is_a_clear_error(tmp_path):
    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(DefectlabError, match="disk full while writing .*x.png"):
        runs.atomic_write(tmp_path / "x.png", full)


def test_checkpoints_prune_but_keep_best(tmp_path):
    for step in (1, 2, 3, 4):
        runs.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"epoch": step}, keep=2)
        if step == 1:
            runs.mark(tmp_path, "best", 1, val_loss=0.1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["0000001", "0000003", "0000004"]
    assert runs.find_checkpoint(tmp_path, "best").name == "0000001"
    assert runs.find_checkpoint(tmp_path, "latest").name == "0000004"
    w = runs.load_tensors(runs.find_checkpoint(tmp_path, "3") / runs.STATE_FILE)["w"]
    assert torch.equal(w, torch.full((2,), 3.0))


def test_missing_checkpoint_and_corrupt_file(tmp_path):
    with pytest.raises(DefectlabError, match="no checkpoint in run folder"):
        runs.find_checkpoint(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DefectlabError, match="not a valid safetensors file"):
        runs.load_tensors(bad)


def test_safe_join_refuses_escape(tmp_path):
    assert runs.safe_join(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()
    for evil in ("../x.png", "/etc/passwd", "a/../../x"):
        with pytest.raises(DefectlabError, match="escapes its folder"):
            runs.safe_join(tmp_path, evil)


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    tensors, skeleton = runs.flatten_optimizer(opt.state_dict())
    json.dumps(skeleton)  # the skeleton must be plain JSON
    state = runs.unflatten_optimizer(tensors, skeleton)
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
