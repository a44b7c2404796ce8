"""Stopping and resuming: which settings a --resume may change, one trainer per run
folder, no repeated log lines, checkpoints on SIGTERM and on a timer, mid-epoch resume bit for bit,
and run configs that work from any working folder."""
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from defectlab.base import runs
from defectlab.data import sources
from defectlab.stages import train
from defectlab.base.errors import DefectlabError
from test_data import make_mvtec
from test_reliability import _cli


def tiny(tmp_path, **kw):
    base = dict(model="tiny", method="difffit", product="hazelnut", image_size=16, epochs=3, lr=2e-3,
                batch_size=4, grad_accum=2, val_every=1, val_per_class=1, val_timesteps=2,
                runs_dir=str(tmp_path), progress=False, seed=0, ema=0.9)
    return train.TrainConfig(**{**base, **kw})


def _same_weights(a, b) -> bool:
    ta = runs.load_tensors(runs.find_checkpoint(a, "latest") / runs.STATE_FILE)
    tb = runs.load_tensors(runs.find_checkpoint(b, "latest") / runs.STATE_FILE)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _steps(folder):
    return [(r["step"], r["loss"]) for r in runs.read_log(folder) if "loss" in r]


class _Kill(Exception):
    pass


def test_resume_with_more_max_steps_trains_on_and_matches_a_straight_run(tmp_path, capsys):
    """``--resume 036-refA --max-steps 60`` used to exit 0 without training. max_steps stops in
    the middle of an epoch; the resumed run continues from that batch."""
    straight = train.run(tiny(tmp_path, max_steps=9, name="straight"))
    short = train.run(tiny(tmp_path, max_steps=4, name="short"))
    train.run(train.TrainConfig(resume=str(short), progress=False))  # nothing new asked: a note, no training
    assert "is done at step 4" in capsys.readouterr().out
    assert train.run(train.TrainConfig(resume=str(short), max_steps=9, progress=False)) == short
    assert runs.latest_checkpoint(short).name == "0000009" and _same_weights(straight, short)
    assert _steps(short) == _steps(straight)
    train.run(train.TrainConfig(resume=str(short), max_steps=500, progress=False))  # on to the end of epoch 3
    with pytest.raises(DefectlabError, match=r"done at step 21, epoch 3 \(--epochs 3\): raise --epochs"):
        train.run(train.TrainConfig(resume=str(short), max_steps=600, progress=False))
    with pytest.raises(DefectlabError, match="--batch-size may not change on --resume"):
        train.run(train.TrainConfig(resume=str(short), batch_size=2, progress=False))


def test_vpt_resumes_bit_for_bit(tmp_path):
    """Deep prompts (new tokens at every block) + EMA, stopped mid-epoch and resumed."""
    kw = dict(method="vpt", vpt_tokens=3, vpt_depth="deep", lr=2e-2)
    straight = train.run(tiny(tmp_path, max_steps=5, name="straight", **kw))
    short = train.run(tiny(tmp_path, max_steps=2, name="short", **kw))
    train.run(train.TrainConfig(resume=str(short), max_steps=5, progress=False))
    assert _same_weights(straight, short) and _steps(short) == _steps(straight)
    state = runs.load_tensors(runs.find_checkpoint(short, "latest") / runs.STATE_FILE)
    assert state["prompts.weight"].shape[:2] == (4, 3) and "ema.prompts.weight" in state  # tiny: 4 blocks
    with pytest.raises(DefectlabError, match="--vpt-tokens may not change on --resume"):
        train.run(train.TrainConfig(resume=str(short), max_steps=6, vpt_tokens=4, progress=False))
    before = sorted(tmp_path.iterdir())
    for bad in ({"vpt_tokens": 0}, {"vpt_tokens": -2}, {"vpt_depth": "middle"}):
        with pytest.raises(DefectlabError, match="vpt_tokens must be ≥ 1 and vpt_depth shallow or deep"):
            train.run(tiny(tmp_path, **{**kw, **bad}, name="bad"))
    assert sorted(tmp_path.iterdir()) == before  # no run folder


def test_two_trainers_of_one_run_folder_are_refused(tmp_path):
    folder = train.run(tiny(tmp_path, epochs=1))
    held = runs.lock(folder)  # another process is training it
    try:
        with pytest.raises(DefectlabError, match="being trained by another process"):
            train.run(train.TrainConfig(resume=str(folder), epochs=2, progress=False))
    finally:
        held.release()
    train.run(train.TrainConfig(resume=str(folder), epochs=2, progress=False))


def _killed_at_batch(monkeypatch, cfg, n: int):
    """Run ``cfg`` and kill it in its ``n``-th training batch; the run folder."""
    real_loss, calls = train.Objective.loss, {"n": 0}

    def dying(self, *a, **kw):
        if torch.is_grad_enabled():  # training, not validation
            calls["n"] += 1
            if calls["n"] == n:
                raise _Kill
        return real_loss(self, *a, **kw)

    with monkeypatch.context() as patched:
        patched.setattr(train.Objective, "loss", dying)
        with pytest.raises(_Kill):
            train.run(cfg)
    return next(p for p in Path(cfg.runs_dir).iterdir() if p.name.endswith(cfg.name))


def test_a_killed_run_resumes_without_logging_steps_twice(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=3)
    straight = train.run(cfg)
    killed = _killed_at_batch(monkeypatch, dataclasses.replace(cfg, name="killed"), 20)  # 14 batches an epoch
    assert max(s for s, _ in _steps(killed)) > runs.read_json(runs.latest_checkpoint(killed) / "meta.json")["step"]
    train.run(train.TrainConfig(resume=str(killed), progress=False))
    assert _steps(killed) == _steps(straight)  # each step once, with the uninterrupted run's losses
    assert _same_weights(straight, killed)


def test_timed_checkpoints_resume_mid_epoch_bit_for_bit(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, epochs=2, val_every=2)
    straight = train.run(cfg)
    # checkpoint_minutes ~0: a checkpoint after every step (2 batches), none from validation yet
    timed = _killed_at_batch(monkeypatch, dataclasses.replace(cfg, name="timed", checkpoint_minutes=1e-9), 8)
    meta = runs.read_json(runs.latest_checkpoint(timed) / "meta.json")
    assert (meta["step"], meta["epoch"], meta["batch"]) == (3, 0, 6)  # 3 steps of 2 batches into epoch 0
    assert not [r for r in runs.read_log(timed) if "val_loss" in r]
    train.run(train.TrainConfig(resume=str(timed), progress=False))
    assert _same_weights(straight, timed) and _steps(timed) == _steps(straight)


ARGS = ["finetune", "--model", "tiny", "--method", "difffit", "--image-size", "16", "--epochs", "6", "--val-every",
        "100", "--val-per-class", "1", "--val-timesteps", "2", "--batch-size", "4", "--lr", "0.002", "--no-progress"]


def _wait_for(proc, ready, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_or_sigterm_then_resume_gives_the_uninterrupted_result(tmp_path, home):
    """Three CLI runs of one config at once: one straight; one killed with SIGKILL as soon as two
    checkpoints exist (every visible checkpoint is complete); one sent SIGTERM before its first
    validation, which saves a checkpoint at the next step and stops (exit 130; before, such a run
    kept nothing). Both resume to the straight run's weights and log. (Validation every epoch or
    never: the same weights, so the killed run checkpoints each epoch.)"""
    straight_dir, killed_dir, stopped_dir = tmp_path / "straight", tmp_path / "killed", tmp_path / "stopped"
    p = _cli(home, *ARGS, "--runs-dir", straight_dir)
    k = _cli(home, *ARGS, "--val-every", "1", "--runs-dir", killed_dir)
    q = _cli(home, *ARGS, "--runs-dir", stopped_dir)
    _wait_for(k, lambda: len(list(killed_dir.glob("*/checkpoints/*/meta.json"))) >= 2)
    os.kill(k.pid, signal.SIGKILL)
    k.wait()
    _wait_for(q, lambda: any(len(f.read_text().splitlines()) >= 3 for f in stopped_dir.glob("*/log.jsonl")))
    os.kill(q.pid, signal.SIGTERM)
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 130, out
    assert "checkpoint saved at step" in out and "--resume" in out
    killed, stopped = next(killed_dir.iterdir()), next(stopped_dir.iterdir())
    assert runs.latest_checkpoint(killed) is not None
    for ck in (killed / "checkpoints").iterdir():  # every visible checkpoint is complete
        if ck.is_dir() and not ck.name.startswith("."):
            assert {f.name for f in ck.iterdir()} >= {runs.STATE_FILE, runs.OPTIM_FILE, runs.META_FILE}
    meta = runs.read_json(runs.latest_checkpoint(stopped) / "meta.json")
    assert 3 <= meta["step"] < 42 and not [r for r in runs.read_log(stopped) if "val_loss" in r]
    resumed = [_cli(home, "finetune", "--resume", folder, "--no-progress") for folder in (killed, stopped)]
    assert p.wait(timeout=600) == 0, p.stdout.read()
    for r in resumed:
        out, _ = r.communicate(timeout=600)
        assert r.returncode == 0, out
    straight = next(straight_dir.iterdir())
    for folder in (killed, stopped):
        assert _same_weights(straight, folder) and _steps(folder) == _steps(straight), folder.name


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    """``cd / && defectlab evaluate --run 001`` failed: config.json held the path as typed."""
    make_mvtec(tmp_path / "mv")
    monkeypatch.chdir(tmp_path)
    folder = train.run(tiny(tmp_path / "runs", data="mv", product="widget", epochs=1, batch_size=2, max_steps=1))
    saved = runs.load_config(folder)
    assert saved["data"] == str(tmp_path / "mv")
    train.run(train.TrainConfig(resume=str(folder), data="mv", max_steps=2, progress=False))  # the same data
    monkeypatch.chdir("/")
    d = sources.load(sources.from_settings(saved), manifest=folder / "split.json")
    assert d.root == (tmp_path / "mv").resolve() and d.classes == ["bent", "dent"]
