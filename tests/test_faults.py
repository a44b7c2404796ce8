"""Faults and bad input at the command line, one table: every row is one bad setting,
bad file or file-system fault. Each must exit 2 with one line naming the path or setting, no
traceback, and leave every file as it was: nothing removed, nothing half-written, no empty run
folder."""
import errno
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import SafetensorError

from defectlab.base import paths, runs
from defectlab.core import model
from defectlab.stages import train
from defectlab.reports import export
from test_data import make_mvtec
from test_export import latent_base  # noqa: F401  (a fixture: a tiny latent DiTPipeline folder)
from test_reliability import assert_one_line_error, run_cli
from test_train import tiny_cfg

TINY = ["--model", "tiny", "--image-size", "16", "--epochs", "1", "--val-per-class", "1", "--val-timesteps", "2",
        "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset whose class ``dent`` has all-black masks, a tiny run trained on it, model
    folders with a malformed scheduler_config.json / model_index.json, and files for the rows."""
    tmp = tmp_path_factory.mktemp("faults")
    data = make_mvtec(tmp / "data")
    for mask in (data / "widget/ground_truth/dent").iterdir():
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    with pytest.warns(UserWarning, match="hold no defect pixel"):
        run = train.run(train.TrainConfig(data=str(data), product="widget", model="tiny", method="bitfit",
                                          image_size=16, epochs=1, val_per_class=1, val_timesteps=2,
                                          batch_size=2, runs_dir=str(tmp / "runs"), progress=False))
    broken_best = shutil.copytree(run, tmp / "runs" / "900-no-best-key")
    (broken_best / "checkpoints" / "best.json").write_text('{"step": 3}')
    model.load("tiny")
    sched = "scheduler/scheduler_config.json"
    for name, rel, text in (("bad-scheduler", sched, '{"num_train_timesteps": 1000,'),
                            ("bad-index", "model_index.json", '{"num_train_timesteps": 1000,'),
                            ("negative-timesteps", sched, '{"num_train_timesteps": -5}'),
                            ("unknown-betas", sched, '{"beta_schedule": "cubic"}'),
                            ("betas-out-of-range", sched, '{"beta_start": 0.1, "beta_end": 2}')):
        folder = shutil.copytree(paths.MODELS / "tiny", tmp / "models" / name)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (tmp / "user-folder").mkdir()
    (tmp / "user-folder" / "notes.txt").write_text("the user's, not an export's\n")
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "readonly").mkdir()
    return tmp, data, run


def readonly(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: chmod where the mode binds; as root, whom chmod does not stop
    (and with no read-only mount to bind), creating a file or folder under it raises EACCES."""
    folder.chmod(0o555)
    if os.geteuid() != 0 and not os.access(folder, os.W_OK):
        return
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder)

    def deny_open(path, flags, *a, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    def deny_mkdir(path, *a, **kw):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(os, "mkdir", deny_mkdir)


def _cases(tmp: Path, data: Path, run: Path) -> dict:
    """name → (CLI args, words the error line must contain, fault to set up or None)."""
    ro = tmp / "readonly"
    finetune = ["finetune", "--data", data, "--product", "widget", "--runs-dir", tmp / "runs", *TINY]
    return {
        # data and model (the first ones are tests/test_reliability.py's, now also leaving no run folder)
        "unknown product": (["finetune", "--data", data, "--product", "gizmo", "--runs-dir", tmp / "runs"], ("gizmo",), None),
        "crop too large": ([*finetune, "--crop", "64"], ("crop",), None),
        "unknown model path": ([*finetune, "--model", tmp / "no-model"], ("no-model",), None),
        "unknown method": ([*finetune, "--method", "prompt"], ("prompt", "difffit"), None),
        "batch larger than data": ([*finetune, "--batch-size", "50"], ("batch_size 50",), None),
        "image size not a patch multiple": ([*finetune, "--image-size", "10"], ("image_size 10", "multiple of 4"), None),
        "lr schedule": ([*finetune, "--lr-schedule", "bogus"], ("lr_schedule", "bogus"), None),
        "negative max steps": ([*finetune, "--max-steps", "-5"], ("max_steps", "-5"), None),
        "negative warmup": ([*finetune, "--warmup-steps", "-3"], ("warmup_steps", "-3"), None),
        "malformed scheduler_config.json": ([*finetune, "--model", tmp / "models/bad-scheduler"],
                                            ("scheduler_config.json",), None),
        "malformed model_index.json": ([*finetune, "--model", tmp / "models/bad-index"], ("model_index.json",), None),
        "scheduler: negative timesteps": ([*finetune, "--model", tmp / "models/negative-timesteps"],
                                          ("scheduler_config.json", "num_train_timesteps -5"), None),
        "scheduler: negative timesteps, sampling": (["sample", "--run", "base", "--model", tmp / "models/negative-timesteps",
                                                     "--per-class", "1", "--steps", "2", "--out", tmp / "base-samples"],
                                                    ("scheduler_config.json", "num_train_timesteps -5"), None),
        "scheduler: unknown beta_schedule": ([*finetune, "--model", tmp / "models/unknown-betas"],
                                             ("scheduler_config.json", "beta_schedule 'cubic'"), None),
        "scheduler: beta_end above 1": ([*finetune, "--model", tmp / "models/betas-out-of-range"],
                                        ("scheduler_config.json", "beta_end 2"), None),
        # flag values argparse refuses: one line, not a usage block
        "lr not a number": (["finetune", "--lr", "abc"], ("finetune", "--lr", "'abc' is not a float"), None),
        "list item not a number": ([*finetune, "--rotations", "45,x"], ("--rotations", "'x' is not an int"), None),
        "unknown flag": (["finetune", "--lr-typo", "1"], ("--lr-typo",), None),
        # export: never into a folder or onto a file it did not write
        "export out holds the user's files": (["export", "--run", run, "--out", tmp / "user-folder"],
                                               (str(tmp / "user-folder"), "--force"), None),
        "export out is a file": (["export", "--run", run, "--out", tmp / "a-file"], ("a-file", "is a file"), None),
        "resume changes lr": (["finetune", "--resume", run, "--lr", "0.5"], ("--lr", "may not change"), None),
        "resume changes method": (["finetune", "--resume", run, "--method", "full"], ("--method",), None),
        "runs dir is a file": ([*finetune, "--runs-dir", tmp / "a-file"], ("a-file", "not a folder"), None),
        "runs dir read-only": ([*finetune, "--runs-dir", ro], (str(ro), "writable"), readonly),
        # sample / synthesize
        "checkpoint not a number": (["sample", "--run", run, "--checkpoint", "abc"], ("checkpoint", "abc"), None),
        "sample size not a patch multiple": (["sample", "--run", run, "--image-size", "10", "--per-class", "1"],
                                             ("image_size 10",), None),
        "best.json without its key": (["sample", "--run", tmp / "runs/900-no-best-key"], ("best.json",), None),
        "sample out is a file": (["sample", "--run", run, "--per-class", "1", "--steps", "2", "--out", tmp / "a-file"],
                                 ("a-file",), None),
        "sample out read-only": (["sample", "--run", run, "--per-class", "1", "--steps", "2", "--out", ro],
                                 (str(ro),), readonly),
        "all-black dataset mask": (["synthesize", "--run", run, "--classes", "dent", "--per-class", "1", "--steps", "2",
                                    "--out", tmp / "pairs"], ("dent", "_mask.png", "no defect pixel"), None),
        # data synth / fetch / params
        "synth per class": (["data", "synth", "--out", tmp / "synth", "--per-class", "-1"], ("per_class",), None),
        "synth size": (["data", "synth", "--out", tmp / "synth", "--size", "7"], ("size", "7"), None),
        "synth out is a file": (["data", "synth", "--out", tmp / "a-file", "--size", "32", "--per-class", "1"],
                                ("a-file",), None),
        "synth out read-only": (["data", "synth", "--out", ro, "--size", "32", "--per-class", "1"], (str(ro),), readonly),
        "fetch dest read-only": (["data", "fetch", "defectspectrum", "--dest", ro], (str(ro),), readonly),
        "params not UTF-8": (["notebooks", "--params", tmp / "latin1.yaml"], ("latin1.yaml", "UTF-8"), None),
        "sweep spec not UTF-8": (["sweep", tmp / "latin1.yaml"], ("latin1.yaml", "UTF-8"), None),
    }


CASES = list(_cases(Path("t"), Path("d"), Path("r")))


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time, and every folder."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns) if path.is_file() else "dir"
    return out


@pytest.mark.parametrize("case", CASES)
def test_bad_input_or_fault_is_one_line_exit_2_and_changes_no_file(case, world, capsys, monkeypatch):
    tmp, data, run = world
    argv, needles, fault = _cases(*world)[case]
    if fault is not None:
        fault(monkeypatch, tmp / "readonly")
    before = _tree(tmp)
    code, _, err = run_cli(capsys, *argv)
    monkeypatch.undo()
    (tmp / "readonly").chmod(0o755)
    assert_one_line_error(code, err, *needles)
    assert _tree(tmp) == before  # nothing removed, added or rewritten: no run folder, no temp file


def test_disk_full_while_writing_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC as its own error type; the second checkpoint fails, the first
    stays complete, no temp folder is left, and --resume finishes the run once space is back."""
    real, calls = runs.save_file, {"n": 0}

    def full_on_the_second_checkpoint(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # two files (trained tensors, optimizer) per checkpoint
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(runs, "save_file", full_on_the_second_checkpoint)
    argv = ["finetune", "--model", "tiny", "--method", "bitfit", "--image-size", "16", "--epochs", "2",
            "--val-every", "1", "--val-per-class", "1", "--val-timesteps", "2", "--no-progress",
            "--runs-dir", tmp_path]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "disk full while writing", "checkpoints", "--resume")
    folder = next(tmp_path.glob("0*"))
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert [n for n in names if n.isdigit()] == [runs.latest_checkpoint(folder).name]
    assert not [n for n in names if n.startswith(".")]  # the half-written checkpoint is gone
    monkeypatch.setattr(runs, "save_file", real)
    code, _, err = run_cli(capsys, "finetune", "--resume", folder, "--no-progress")
    assert code == 0, err
    assert runs.read_json(runs.latest_checkpoint(folder) / runs.META_FILE)["epoch"] == 2


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    """A failure inside the loop (here: the loss) before any checkpoint removes the new folder,
    and ``latest`` passes over folders without a checkpoint."""
    from defectlab.base.errors import DefectlabError

    good = train.run(train.TrainConfig(model="tiny", method="bitfit", image_size=16, epochs=1, val_per_class=1,
                                       val_timesteps=2, runs_dir=str(tmp_path), progress=False))

    def nan_loss(self, *a, **kw):
        raise DefectlabError("loss became nan at step 0")

    monkeypatch.setattr(train.Objective, "loss", nan_loss)
    with pytest.raises(DefectlabError, match="loss became nan"):
        train.run(train.TrainConfig(model="tiny", method="bitfit", image_size=16, epochs=1, val_per_class=1,
                                    val_timesteps=2, runs_dir=str(tmp_path), progress=False, name="doomed"))
    assert [p.name for p in runs.numbered(tmp_path)] == [good.name]
    (tmp_path / "005-empty").mkdir()  # e.g. a run killed by kill -9 before its first checkpoint
    assert runs.resolve("latest", tmp_path) == good


def test_any_other_file_system_fault_is_still_one_line(capsys, monkeypatch):
    """The CLI's last resort for a write fault that no stage turned into its own line."""
    def read_only(cfg):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run/log.jsonl")

    monkeypatch.setattr(train, "run", read_only)
    code, _, err = run_cli(capsys, "finetune")
    assert_one_line_error(code, err, "/mnt/ro/run/log.jsonl", "Read-only file system")

    def bug(cfg):
        raise OSError(errno.EBADF, "Bad file descriptor")  # not a disk fault: a bug, shown as one

    monkeypatch.setattr(train, "run", bug)
    with pytest.raises(OSError):
        run_cli(capsys, "finetune")


def test_disk_full_on_the_first_checkpoint_names_no_run_to_resume(tmp_path, monkeypatch, capsys):
    """A new run that cannot write its first checkpoint is removed (nothing to resume), so the
    error line suggests no ``--resume`` of a folder that is gone."""
    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(runs, "save_file", full)
    code, _, err = run_cli(capsys, "finetune", "--model", "tiny", "--method", "bitfit", "--image-size", "16",
                           "--epochs", "1", "--val-per-class", "1", "--val-timesteps", "2", "--no-progress",
                           "--runs-dir", tmp_path)
    assert_one_line_error(code, err, "disk full while writing", "no checkpoint to resume")
    assert "--resume" not in err
    assert runs.numbered(tmp_path) == []  # the folder it would have named is gone


def test_a_mistyped_hub_id_fails_fast_once_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    """Not a folder, not a preset, not cached: one request with no retries, then one line saying
    why; offline: no request at all."""
    import httpx2
    import huggingface_hub.constants as hub

    requests = []

    def unreachable(self, request, **kw):
        if "mistyped-dit" in str(request.url):  # (the hub client may also ask other endpoints once)
            requests.append(str(request.url))
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(httpx2.Client, "send", unreachable)  # no traffic leaves the test
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(model.DefectlabError) as err:
        model.load("someone/mistyped-dit")
    assert time.monotonic() - start < 5 and len(requests) == 1  # retries would sleep 1 + 2 + 4 + … s
    msg = str(err.value)
    assert "\n" not in msg and "'someone/mistyped-dit'" in msg and "not cached" in msg and "unreachable" in msg
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(model.DefectlabError, match="not cached, and the hub is offline"):
        model.load("someone/mistyped-dit")
    assert len(requests) == 1


def test_export_force_writes_beside_the_users_files_and_an_export_replaces_its_own(world, tmp_path, capsys):
    _, _, run = world
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    code, _, err = run_cli(capsys, "export", "--run", run, "--out", mine, "--force")
    assert code == 0, err
    notice = [line for line in err.splitlines() if "--force" in line]
    assert len(notice) == 1 and str(mine) in notice[0]
    assert (mine / "notes.txt").read_text() == "mine\n"
    names = {p.name for p in mine.iterdir()}
    assert names == {"notes.txt", "transformer", "scheduler", "model_index.json", model.SIDECAR, "README.md"}
    code, _, err = run_cli(capsys, "export", "--run", run, "--out", mine)  # still holds the user's file
    assert_one_line_error(code, err, str(mine), "--force")
    ours = tmp_path / "ours"
    for _ in range(2):  # a folder holding only an earlier export is replaced without --force
        code, _, err = run_cli(capsys, "export", "--run", run, "--out", ours)
        assert code == 0 and "--force" not in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or .old folder left
    assert model.load(str(ours)).default_image_size == 16  # the run's size, from model.SIDECAR (tiny's own: 64)


def test_an_export_loads_in_dit_pipeline_without_warnings(tmp_path, latent_base):  # noqa: F811
    """model_index.json holds only what DiTPipeline expects; the classes and numerics are in
    ``model.SIDECAR``, which defectlab reads and the model card passes on as ``id2label``."""
    from diffusers import DiTPipeline

    folder = train.run(tiny_cfg(tmp_path, model=str(latent_base), method="bitfit", image_size=16, epochs=1,
                                max_steps=1, report_to="none"))
    out = export.run(export.ExportConfig(run=str(folder), out=str(tmp_path / "export")))
    assert not [k for k in json.loads((out / "model_index.json").read_text()) if k.startswith(("id2label", "defectlab"))]
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DiTPipeline.from_pretrained(out)
            pipe = DiTPipeline.from_pretrained(out, id2label={0: "crack", 1: "cut", 2: "hole", 3: "print"})
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and [r.getMessage() for r in records] == []
    assert pipe.get_label_ids(["print", "crack"]) == [3, 0]
    assert "id2label={0: 'crack', 1: 'cut', 2: 'hole', 3: 'print'}" in (out / "README.md").read_text()
    base = model.load(str(out))
    assert base.class_names[:4] == ["crack", "cut", "hole", "print"] and base.numerics == "diffusers"
    assert base.default_image_size == 16

