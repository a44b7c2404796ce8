"""Run folders: atomic writes, numbering, checkpoints, path safety."""
import json
import os
import stat

import pytest
import torch

from defectlab.base import folders, runs
from defectlab.base.errors import DefectlabError


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


def _create_many(args):
    base, worker = args
    return [runs.create(f"w{worker}-{i}", {}, base=base).name for i in range(8)]


def test_concurrent_creates_never_share_a_number(tmp_path):
    """Processes creating runs with different names at once got the same number."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        names = [n for part in pool.map(_create_many, [(tmp_path, w) for w in range(4)]) for n in part]
    numbers = [n.split("-")[0] for n in names]
    assert len(set(numbers)) == len(numbers) == 32


def test_resolve_refuses_a_shared_number_and_latest_needs_a_checkpoint(tmp_path):
    a = runs.create("a", {}, base=tmp_path)
    (tmp_path / "000-b").mkdir()  # two folders with one number (made by an older version)
    with pytest.raises(DefectlabError, match="run number 0 is shared by 000-a, 000-b"):
        runs.resolve("0", tmp_path)
    assert runs.resolve("000-a", tmp_path) == a
    with pytest.raises(DefectlabError, match="no run with a checkpoint"):
        runs.resolve("latest", tmp_path)
    runs.save_checkpoint(a, 1, {"w": torch.zeros(1)}, {})
    runs.create("newer-but-empty", {}, base=tmp_path)
    assert runs.resolve("latest", tmp_path) == a


def test_safe_join_allows_symlinks_named_inside(tmp_path):
    """A dataset of symlinks: the guard is about the name, not where a link points."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(b"png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    assert runs.safe_join(tmp_path / "data", "x.png").read_bytes() == b"png"
    with pytest.raises(DefectlabError, match="escapes"):
        runs.safe_join(tmp_path / "data", "sub/../../elsewhere/x.png")


def test_checkpoint_names_and_best_json_errors(tmp_path):
    runs.save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {})
    with pytest.raises(DefectlabError, match="checkpoint must be best, latest or a step number"):
        runs.find_checkpoint(tmp_path, "abc")
    (tmp_path / "checkpoints" / "best.json").write_text('{"val_loss": 0.1}')
    with pytest.raises(DefectlabError, match="best.json names no checkpoint"):
        runs.find_checkpoint(tmp_path, "best")


def test_lock_refuses_a_second_trainer(tmp_path):
    held = runs.lock(tmp_path)
    with pytest.raises(DefectlabError, match="being trained by another process"):
        runs.lock(tmp_path)
    held.release()
    runs.lock(tmp_path).release()


def test_truncate_log_drops_the_steps_after_the_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        runs.log(tmp_path, {"step": step, "loss": 0.1})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # cut by a kill
    runs.truncate_log(tmp_path, 2)
    runs.log(tmp_path, {"step": 3, "loss": 0.2})
    assert [r["step"] for r in runs.read_log(tmp_path)] == [1, 2, 3]


def test_write_faults_are_one_line_naming_the_path(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "disk full while writing" in str(runs.write_error(err, tmp_path / "x"))
    assert "read-only file system" in str(runs.write_error(OSError(errno.EROFS, "ro"), tmp_path / "x"))
    assert runs.write_error(ValueError("os error 28"), tmp_path / "x") is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(DefectlabError, match="--out .*file: .*file is a file, not a folder"):
        runs.ensure_dir(tmp_path / "file", "--out")
    with pytest.raises(DefectlabError, match="--out .*file/sub: .*file is a file, not a folder"):
        runs.ensure_dir(tmp_path / "file" / "sub", "--out")

    def full(tensors, path, metadata=None):
        raise err

    monkeypatch.setattr(runs, "save_file", full)
    with pytest.raises(DefectlabError, match="disk full while writing .*checkpoints/0000002.*no checkpoint to resume"):
        runs.save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, {})  # nothing to resume from: no --resume offered
    assert not list((tmp_path / "checkpoints").iterdir())
    monkeypatch.undo()
    runs.save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {})
    monkeypatch.setattr(runs, "save_file", full)
    with pytest.raises(DefectlabError, match="disk full while writing .*checkpoints/0000002.*--resume"):
        runs.save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, {})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["0000001"]  # the earlier one stays


def test_a_built_folder_is_readable_like_any_file_the_user_writes(tmp_path):
    umask = os.umask(0o22)
    os.umask(umask)
    with folders.building(tmp_path / "m") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.safetensors").write_bytes(b"x")
        (tmp / "sub" / "w.safetensors").chmod(0o600)  # as diffusers' save_pretrained leaves weights
    mode = stat.S_IMODE((tmp_path / "m" / "sub" / "w.safetensors").stat().st_mode)
    assert mode & (0o444 & ~umask) == 0o444 & ~umask and mode & 0o022 == 0, oct(mode)
