"""Stopping and resuming a training run anywhere, bit for bit.

A checkpoint holds the loop's whole state: trained tensors (+ EMA), optimizer, lr scheduler,
torch's RNG, and the position in the data: the epoch, how many of its batches are done, and the
data loader's RNG as the epoch began (training draws each item's augmentation from its own
generator, ``dataset.view_generator``, so batches skipped on resume need no RNG replay).
``Stopper`` says when to checkpoint between validations: every ``checkpoint_minutes``, and at
once on Ctrl-C or SIGTERM. ``settings`` is the rule for what a ``--resume`` may change.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import DefectlabError
from . import loop, methods

# Settings a --resume may change: how long to train, when to validate and checkpoint, how to log,
# and speed switches. Every other setting decides what the run computes and must stay.
MAY_CHANGE = ("epochs", "max_steps", "patience", "keep_checkpoints", "val_every", "checkpoint_minutes",
              "progress", "report_to", "log_samples", "resume", "runs_dir", "grad_checkpointing", "compile",
              "latent_cache", "greyscale", "formats")


def settings(saved: dict, given: dict, defaults: dict, folder: Path, may_change: tuple = MAY_CHANGE,
             per_call: tuple = ()) -> dict:
    """The settings a resumed run trains with (every training stage's one rule): the saved ones,
    updated by the flags given (those that differ from their defaults) in ``may_change``, and the
    ``per_call`` ones always as given (a time budget, threads: this call's, not the first's); any
    other flag that differs from the saved value is refused, naming it."""
    out = dict(saved)
    for key, value in given.items():
        if key in per_call:
            out[key] = value
            continue
        if key not in defaults or value == defaults[key]:
            continue
        if key in may_change:
            out[key] = value
        elif _plain(value) != _plain(saved.get(key, defaults[key])):
            raise DefectlabError(f"--{key.replace('_', '-')} may not change on --resume: run {Path(folder).name} "
                                 f"trained with {saved.get(key, defaults[key])!r}, not {value!r} (start a new run "
                                 f"for other settings; {', '.join(may_change[:6])}, … may change)")
    return {**out, "resume": str(folder)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def finished(folder: Path, epoch: int, step: int, bad: int, cfg, extended: bool) -> bool:
    """True when the run has nothing left to do (with a note); an error when the user asked for
    more (``extended``: --epochs or --max-steps given) but a limit still stops it."""
    limit = ("--epochs" if epoch >= cfg.epochs else "--max-steps" if cfg.max_steps and step >= cfg.max_steps
             else "--patience" if cfg.patience and bad >= cfg.patience else "")
    if not limit:
        return False
    note = (f"run {Path(folder).name} is done at step {step}, epoch {epoch} ({limit} "
            f"{getattr(cfg, limit[2:].replace('-', '_'))}): raise {limit} to train further")
    if extended:
        raise DefectlabError(note)
    print(note)
    return True


@dataclass
class Position:
    """Where the loop stands: after ``step`` optimizer steps, ``batch`` batches into ``epoch``."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    best: float = float("inf")
    bad: int = 0


def loader_state(loader) -> torch.Tensor:
    """The data loader's RNG (it decides the epoch's order), or torch's when it has none."""
    gen = getattr(loader, "generator", None)
    return gen.get_state() if gen is not None else torch.get_rng_state()


def _unwrapped(stepper: loop.Stepper, net):
    return stepper.acc.unwrap_model(net) if stepper.acc is not None else net


def save(folder: Path, stepper: loop.Stepper, net, at: Position, epoch_rng: torch.Tensor, keep: int, **meta) -> Path:
    """A fine-tune's checkpoint at ``at`` (``loop.save`` of its trainable tensors); ``epoch_rng``:
    ``loader_state`` as epoch ``at.epoch`` began."""
    state = methods.trainable_state(_unwrapped(stepper, net))
    return loop.save(folder, at.step, stepper, state, keep, rng={"torch": torch.get_rng_state(), "loader": epoch_rng},
                     epoch=at.epoch, batch=at.batch, best=at.best, bad=at.bad, **meta)


def load(ckpt: Path, stepper: loop.Stepper, net, loader) -> Position:
    """Put a checkpoint's state back; the loader's RNG as its epoch began (skip ``batch`` batches)."""
    got = loop.load(ckpt, stepper)
    methods.load_trainable_state(_unwrapped(stepper, net), got.state)
    torch.set_rng_state(got.rng["torch"])
    if getattr(loader, "generator", None) is not None:
        loader.generator.set_state(got.rng["loader"])
    m = got.meta
    return Position(m["step"], m["epoch"], m.get("batch", 0), m["best"], m["bad"])


class Stopper:
    """When to checkpoint between validations: ``minutes`` after the last checkpoint (0 = never),
    and at the next optimizer step after Ctrl-C or SIGTERM, which then stops the run
    (``KeyboardInterrupt``). A second signal stops at once, without a checkpoint."""

    def __init__(self, minutes: float):
        self.every, self.last, self.signal, self._old = minutes * 60, time.monotonic(), None, {}
        self.stopping = False  # a signal came (to any process): stop after this checkpoint

    def __enter__(self) -> "Stopper":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._old = {s: signal.signal(s, self._catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _catch(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def due(self, acc) -> bool:
        """Checkpoint now? Every process of a multi-process run gets the same answers."""
        timer = self.every > 0 and time.monotonic() - self.last >= self.every
        flags = torch.tensor([float(self.signal is not None), float(timer)], device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "sum")
        self.stopping = bool(flags[0] > 0)
        return bool(flags.sum() > 0)

    def saved(self, acc, folder: Path, step: int) -> None:
        """After a checkpoint: restart the clock, or stop when a signal asked for it."""
        self.last = time.monotonic()
        if self.stopping:
            acc.print(f"{self.signal or 'signal'}: checkpoint saved at step {step}; continue with: "
                      f"defectlab finetune --resume {folder}")
            raise KeyboardInterrupt
