"""Experiment tracking through accelerate's trackers: ``--report-to tensorboard|wandb|mlflow|none``.

Every record ``train.py`` writes to ``log.jsonl`` (loss, lr, grad norm per optimizer step; the
validation loss) goes to the tracker as well, with a grid of samples at each validation
(TensorBoard and W&B; MLflow gets the scalars). TensorBoard, the default, writes into the run
folder (``<run>/tensorboard/``), so ``tensorboard --logdir outputs/runs`` shows every run.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available
from PIL import Image

from ..base import paths, runs
from ..base.errors import DefectlabError
from . import sampler, viz

REPORT_TO = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
             "none": lambda: True}
# log.jsonl key → tracker tag, grouped so the dashboards show train/… and val/… sections
SCALARS = {"loss": "train/loss", "mse": "train/mse", "vb": "train/vb", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "val_loss": "val/loss", "best": "val/best"}
GRID_TAG = "val/samples"
GRID = sampler.Sampling(steps=25, scheduler="ddim")       # the validation sample grid


def accelerator_args(cfg) -> dict:
    """``Accelerator`` keywords for ``cfg.report_to`` (a ``train.TrainConfig``); a one-line error
    for an unknown tracker or a missing package. ``project_dir`` is the parent of the run folder:
    the run folder does not exist yet when the accelerator is made, and each run's TensorBoard
    tracker is named ``<run>/tensorboard``, so it writes inside the run folder all the same."""
    if cfg.report_to not in REPORT_TO:
        raise DefectlabError(f"unknown report_to {cfg.report_to!r}; choose one of {', '.join(REPORT_TO)}")
    if not REPORT_TO[cfg.report_to]():
        raise DefectlabError(f"report_to {cfg.report_to} needs the {cfg.report_to} package "
                             f"(pip install {cfg.report_to}), or use --report-to none")
    if cfg.report_to == "none":
        return {}
    root = Path(cfg.resume).parent if cfg.resume else Path(cfg.runs_dir or paths.RUNS)
    return {"log_with": cfg.report_to, "project_dir": str(root)}


def _hparams(config: dict) -> dict:
    """Settings as the trackers take them (TensorBoard's hparams: bool, int, float or str only)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class Tracker:
    """``log.jsonl`` and the accelerator's trackers, written together (on the main process)."""

    def __init__(self, acc: Accelerator, folder: Path, cfg, base, classes: list[str]):
        self.acc, self.folder, self.cfg, self.base, self.classes = acc, Path(folder), cfg, base, list(classes)
        if acc.log_with:  # init_trackers runs on the main process only
            name = f"{self.folder.name}/tensorboard" if cfg.report_to == "tensorboard" else "defectlab"
            board = cfg.report_to == "tensorboard"  # its add_hparams would open a second, empty run in a sub-folder
            acc.init_trackers(name, config=None if board else _hparams(dataclasses.asdict(cfg)), init_kwargs={
                "wandb": {"name": self.folder.name, "dir": str(self.folder)},
                "mlflow": {"run_name": self.folder.name}})
            if board and acc.is_main_process:
                from torch.utils.tensorboard.summary import hparams  # tensorboard is there: init_trackers checked

                writer = acc.get_tracker("tensorboard", unwrap=True)
                for summary in hparams(_hparams(dataclasses.asdict(cfg)), {}):  # the settings, in this run's own file
                    writer._get_file_writer().add_summary(summary)
                writer.flush()

    def log(self, record: dict, model: torch.nn.Module | None = None) -> None:
        """One record to ``log.jsonl`` and its scalars to the tracker at ``record["step"]``;
        ``model`` given (at a validation): a grid of samples from it too."""
        if not self.acc.is_main_process:
            return
        runs.log(self.folder, record)
        scalars = {tag: float(record[k]) for k, tag in SCALARS.items() if k in record}
        if self.acc.trackers and scalars:
            self.acc.log(scalars, step=record["step"])
        # compiled training (CUDA graphs) would recompile for the grid's batch: no grid there
        if model is not None and self.acc.trackers and self.cfg.log_samples > 0 and not self.cfg.compile:
            self.log_images(self.samples(model), record["step"])

    def samples(self, model: torch.nn.Module) -> torch.Tensor:
        """``log_samples`` images per class (``GRID``: DDIM 25, guidance 1.5), seeded as ``sample.run``
        seeds them (``cfg.seed``); rows = index, columns = classes. Drawn with the weights being
        trained (with ``--ema``, validation and checkpoints use the EMA weights instead)."""
        n, k = self.cfg.log_samples, len(self.classes)
        gens = {c: sampler.generators(self.cfg.seed, c, range(n)) for c in self.classes}
        return sampler.generate(model, self.base.codec, [j for _ in range(n) for j in range(k)],
                                [gens[c][i] for i in range(n) for c in self.classes], GRID,
                                scheduler_config=self.base.scheduler_config, image_size=self.cfg.image_size,
                                progress=False)

    def log_images(self, images: torch.Tensor, step: int) -> None:
        """The grid with its class names over the columns (``viz.grid_figure``), as the trackers take it."""
        k = len(self.classes)
        by_class = images.reshape(-1, k, *images.shape[1:]).transpose(0, 1).reshape(images.shape)  # class-major
        png = viz.figure_png(viz.grid_figure(by_class, self.classes, rows=len(images) // k))
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)  # [3,H,W] uint8
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_image(GRID_TAG, pixels, global_step=step)
                tracker.tracker.flush()
            elif tracker.name == "wandb":
                tracker.log_images({GRID_TAG: [pixels.permute(1, 2, 0).numpy()]}, step=step)

    def finish(self) -> None:
        """Close the trackers. Not ``Accelerator.end_training``: that also destroys the process
        group, and a launched process may sample or evaluate after training."""
        for tracker in self.acc.trackers:
            tracker.finish()
