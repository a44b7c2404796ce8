"""Fine-tuning on the tiny model and the embedded dataset: learning, resume, run folder, bad input."""
import dataclasses

import pytest
import torch

from defectlab.base import runs
from defectlab.core import methods, restore
from defectlab.stages import train
from defectlab.base.errors import DefectlabError


def tiny_cfg(tmp_path, **kw):
    base = dict(model="tiny", method="full", product="hazelnut", image_size=32, epochs=3, lr=2e-3,
                batch_size=4, grad_accum=2, val_every=1, val_per_class=1, val_timesteps=4,
                runs_dir=str(tmp_path), progress=False, seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def test_validation_loss_goes_down_and_run_folder_is_complete(tmp_path):
    folder = train.run(tiny_cfg(tmp_path, epochs=4))
    log = runs.read_log(folder)
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(val) == 4
    assert min(val[1:]) < val[0]  # fixed noise, fixed timesteps: comparable across epochs
    for name in ("config.json", "classes.json", "split.json", "log.jsonl", "figures/loss_curve.png"):
        assert (folder / name).is_file(), name
    cfg = runs.load_config(folder)
    assert cfg["lr"] == 2e-3 and cfg["image_size"] == 32 and cfg["method"] == "full"
    assert runs.read_json(folder / "classes.json") == ["crack", "cut", "hole", "print"]
    best = runs.read_json(folder / "checkpoints" / "best.json")
    assert best["val_loss"] == pytest.approx(min(val))


def test_mask_loss_weights_the_defect_and_is_recorded(tmp_path):
    """Same seed, same batches and noise: only the weighting differs, so the first logged
    losses differ, and the run records the weight it trained with."""
    plain = train.run(tiny_cfg(tmp_path, epochs=1, max_steps=2, name="plain", report_to="none"))
    weighted = train.run(tiny_cfg(tmp_path, epochs=1, max_steps=2, name="weighted", mask_loss=20.0, report_to="none"))
    first = [next(r["mse"] for r in runs.read_log(f) if "mse" in r) for f in (plain, weighted)]
    assert first[0] != pytest.approx(first[1], rel=1e-3)
    assert runs.load_config(weighted)["mask_loss"] == 20.0 and runs.load_config(plain)["mask_loss"] == 0.0


def test_restore_gives_the_checkpointed_parameters(tmp_path):
    folder = train.run(tiny_cfg(tmp_path, method="difffit", epochs=2))
    restored = restore.restore(folder, "latest")
    saved = runs.load_tensors(runs.find_checkpoint(folder, "latest") / runs.STATE_FILE)
    state = methods.trainable_state(restored.model)
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert restored.classes == ["crack", "cut", "hole", "print"]
    # only trained tensors are stored: DiffFit keeps a small share of the model
    n_saved = sum(v.numel() for v in saved.values())
    n_all = sum(p.numel() for p in restored.model.parameters())
    assert n_saved < 0.5 * n_all


class _Interrupt(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, method="difffit", epochs=4, ema=0.9)
    straight = train.run(cfg)

    real_save = train._save_state
    calls = {"n": 0}

    def save_then_die(*args, **kw):
        out = real_save(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Interrupt
        return out

    monkeypatch.setattr(train, "_save_state", save_then_die)
    with pytest.raises(_Interrupt):
        train.run(dataclasses.replace(cfg, name="interrupted"))
    monkeypatch.setattr(train, "_save_state", real_save)
    interrupted = next(p for p in tmp_path.iterdir() if p.name.endswith("interrupted"))
    assert runs.latest_checkpoint(interrupted) is not None
    resumed = train.run(train.TrainConfig(resume=str(interrupted), progress=False))
    assert resumed == interrupted
    a = runs.load_tensors(runs.find_checkpoint(straight, "latest") / runs.STATE_FILE)
    b = runs.load_tensors(runs.find_checkpoint(resumed, "latest") / runs.STATE_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("override, message", [
    ({"method": "prefix"}, "unknown method 'prefix'"),
    ({"model": "/no/such/model"}, "/no/such/model"),
    ({"batch_size": 500}, "batch_size 500 is larger than the"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"class_init": "closest"}, "unknown class_init 'closest'"),
])
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    with pytest.raises(DefectlabError, match=message) as err:
        train.run(tiny_cfg(tmp_path, **override))
    assert "\n" not in str(err.value)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, epochs=3)
    real_loss = train.Objective.loss
    state = {"calls": 0}

    def poisoned(self, *a, **kw):
        mse, vb = real_loss(self, *a, **kw)
        state["calls"] += 1
        if state["calls"] > 30 and torch.is_grad_enabled():
            mse = mse * float("nan")
        return mse, vb

    monkeypatch.setattr(train.Objective, "loss", poisoned)
    with pytest.raises(DefectlabError, match=r"loss became nan at step \d+ .*last good checkpoint: .*0000"):
        train.run(cfg)
    folder = next(tmp_path.iterdir())
    assert runs.latest_checkpoint(folder) is not None


def test_two_cpu_processes_under_accelerate_launch_write_one_run(tmp_path, home):
    """The same loop under ``accelerate launch``: one run folder, shared by both processes."""
    import os
    import subprocess
    import sys

    runs_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "defectlab", "finetune",
           "--model", "tiny", "--method", "difffit", "--image-size", "16", "--epochs", "2", "--val-every", "1",
           "--val-per-class", "1", "--val-timesteps", "2", "--no-progress", "--runs-dir", str(runs_dir)]
    env = {**os.environ, "DEFECTLAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folders = runs.numbered(runs_dir)
    assert len(folders) == 1  # the main process made the folder, the other joined it
    log = runs.read_log(folders[0])
    assert [r["epoch"] for r in log if "val_loss" in r] == [0, 1]
    assert runs.latest_checkpoint(folders[0]) is not None
    assert all(r["loss"] == r["loss"] for r in log if "loss" in r)  # finite, logged once per step
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))  # only the main process logs


def test_tensorboard_gets_the_logged_scalars_and_a_sample_grid(tmp_path):
    """--report-to tensorboard (the default): event files inside the run folder, with every
    log.jsonl scalar at its step and a sample grid at each validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = train.run(tiny_cfg(tmp_path, epochs=2, report_to="tensorboard"))
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    assert {f"train/{k}" for k in ("loss", "mse", "vb", "lr", "grad_norm")} | {"val/loss", "val/best"} <= set(tags["scalars"])
    log = runs.read_log(folder)
    steps = [r for r in log if "loss" in r]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in steps]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps])
    assert all(r["grad_norm"] > 0 for r in steps)  # logged whether or not it clips
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([r["val_loss"] for r in log if "val_loss" in r])
    assert not [p for p in (folder / "tensorboard").iterdir() if p.is_dir()]  # one TensorBoard run per run folder
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # the settings, in the same run
    grids = events.Images("val/samples")
    assert len(grids) == 2 and grids[0].width > 4 * 32 + 5  # one column per class, and room for the class names
    import io

    import numpy as np
    from PIL import Image
    grid = np.asarray(Image.open(io.BytesIO(grids[0].encoded_image_string)).convert("L"))
    top = grid[: grid.shape[0] // 8]  # the class names, above the first row of samples
    assert grid.shape == (grids[0].height, grids[0].width) and (top > 250).mean() > 0.5 and (top < 100).any()
    none = train.run(tiny_cfg(tmp_path, epochs=1, report_to="none", name="quiet"))
    assert not (none / "tensorboard").exists()
    with pytest.raises(DefectlabError, match="unknown report_to 'tensorbord'"):
        train.run(tiny_cfg(tmp_path, report_to="tensorbord"))
