"""The one optimizer step of the package, and the one checkpoint format every training loop uses.

Fine-tuning (``train``), base pre-training (``pretrain``) and the autoencoder (``autoencoder``)
each compute a loss their own way and hand it to a ``Stepper``: backward (through accelerate when
the loop has an ``Accelerator``: gradient accumulation, mixed precision, several processes),
gradient clipping, the optimizer and learning-rate steps, the EMA update after each whole step.
Changing how parameters move (clipping, EMA, precision) is one edit here.

``save``/``load`` write and read a checkpoint (``runs.save_checkpoint``: safetensors, atomic,
the newest ``keep`` kept): the model's tensors as the loop gives them (all of them, or a
fine-tune's trainable ones), the EMA shadow as ``ema.<name>``, the optimizer (moments optionally
rounded to bfloat16), the learning-rate schedule, named RNG states, and the loop's own metadata
(epoch and batch, images seen, wall time, …). Resuming puts all of it back, so a run stopped at
step s and resumed trains bit for bit as one that never stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base import runs
from ..base.errors import DefectlabError

OPTIMIZER_DTYPES = ("float32", "bfloat16")


class Stepper:
    """Takes the optimizer steps of one training loop (see module doc).

    ``named``: the trained parameters with their names (the names key the EMA shadow in
    checkpoints). ``grad_clip`` 0 measures the gradient norm without clipping, None does neither
    (a small classifier's loop). ``acc``: an
    ``accelerate.Accelerator`` the model, optimizer and scheduler were prepared with (None: plain
    ``loss.backward()``, one micro-batch per step)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], opt, sched=None, ema=None,
                 grad_clip: float | None = 0.0, acc=None):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.opt, self.sched, self.ema, self.grad_clip, self.acc = opt, sched, ema, grad_clip, acc

    @property
    def whole(self) -> bool:
        """True when this micro-batch completes an optimizer step (always without accumulation)."""
        return self.acc is None or self.acc.sync_gradients

    def lr(self) -> float:
        return self.sched.get_last_lr()[0] if self.sched is not None else self.opt.param_groups[0]["lr"]

    def __call__(self, loss: torch.Tensor, where: str = "", hint: str | Callable[[], str] = "lower --lr") -> float | None:
        """One micro-batch: refuse a non-finite ``loss`` (one line: ``where`` it happened and the
        ``hint``, a callable when it costs something to say, e.g. looks at the disk), backward, and
        on a whole step clip, step, schedule and update the EMA. Returns the gradient norm before
        clipping (None mid-accumulation)."""
        if not torch.isfinite(loss):
            hint = hint() if callable(hint) else hint
            raise DefectlabError(f"loss became {loss.item()} {where}; {hint}".replace(" ;", ";"))
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()
        norm = None
        if self.whole and self.grad_clip is not None:  # max_norm inf (grad_clip 0): the norm, for the log, without clipping
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = float(self.acc.clip_grad_norm_(self.params, clip) if self.acc is not None
                         else torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.opt.step()  # accelerate's prepared optimizer and scheduler skip mid-accumulation
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.whole and self.ema is not None:
            self.ema.step(self.params)
        return norm


def save(folder: Path, step: int, stepper: Stepper, state: dict[str, torch.Tensor], keep: int,
         rng: dict[str, torch.Tensor] | None = None, optimizer_dtype: str = "float32", **meta) -> Path:
    """A checkpoint of the loop after ``step`` optimizer steps (see module doc). ``state``: the
    model tensors to keep; ``rng``: named generator states; ``meta``: the loop's JSON fields.
    ``optimizer_dtype`` bfloat16 stores the moments rounded (step counts stay float32); a resume
    then continues from the rounded moments instead of bit for bit."""
    if optimizer_dtype not in OPTIMIZER_DTYPES:
        raise DefectlabError(f"optimizer_dtype must be one of {', '.join(OPTIMIZER_DTYPES)} (got {optimizer_dtype!r})")
    tensors = dict(state)
    if stepper.ema is not None:
        tensors.update({f"ema.{n}": p for n, p in zip(stepper.names, stepper.ema.shadow_params)})
    opt_tensors, skeleton = runs.flatten_optimizer(stepper.opt.state_dict())
    if optimizer_dtype != "float32":
        opt_tensors = {k: v if k.endswith(".step") else v.to(getattr(torch, optimizer_dtype))
                       for k, v in opt_tensors.items()}
    opt_tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
    meta = {**meta, "optimizer": skeleton, "optimizer_dtype": optimizer_dtype,
            "lr_scheduler": stepper.sched.state_dict() if stepper.sched is not None else None,
            "ema_step": stepper.ema.optimization_step if stepper.ema is not None else 0}
    return runs.save_checkpoint(folder, step, tensors, meta, optimizer=opt_tensors, keep=keep)


@dataclass
class Loaded:
    """A checkpoint read back: the model tensors (without the EMA), its metadata, its RNG states."""
    state: dict[str, torch.Tensor]
    meta: dict
    rng: dict[str, torch.Tensor]


def load(ckpt: Path, stepper: Stepper) -> Loaded:
    """Put a checkpoint's optimizer, schedule and EMA back into ``stepper``; the model tensors,
    metadata and RNG states are returned for the loop to put where they belong."""
    meta = runs.read_json(Path(ckpt) / runs.META_FILE)
    tensors = runs.load_tensors(Path(ckpt) / runs.STATE_FILE)
    if stepper.ema is not None:
        with torch.no_grad():
            for n, e in zip(stepper.names, stepper.ema.shadow_params):
                e.copy_(tensors[f"ema.{n}"].to(e.device))
        stepper.ema.optimization_step = meta.get("ema_step", meta["step"])  # the decay warm-up depends on it
    opt_tensors = runs.load_tensors(Path(ckpt) / runs.OPTIM_FILE)
    stepper.opt.load_state_dict(runs.unflatten_optimizer(opt_tensors, meta["optimizer"]))
    if stepper.sched is not None and meta.get("lr_scheduler"):
        stepper.sched.load_state_dict(meta["lr_scheduler"])
    return Loaded({k: v for k, v in tensors.items() if not k.startswith("ema.")}, meta,
                  {k[4:]: v for k, v in opt_tensors.items() if k.startswith("rng.")})
