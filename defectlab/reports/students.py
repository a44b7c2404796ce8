"""A distilled student beside its teacher: the same seeds drawn by both, transformer forwards and
wall time per image, and a figure a report can use (teacher row over student row, per class).

The teacher draws as the student was distilled from it (``distilled`` in the student's
``config.json``): DDIM at ``teacher_steps`` with the teacher's guidance (two forwards per guided
step); the student at its own steps, guidance 1 (one forward).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..base import runs
from ..base.errors import DefectlabError
from ..core import restore, sampler, viz


@dataclass
class Side:
    name: str
    steps: int
    guidance: float
    forwards: int             # transformer forwards per image
    seconds: float            # wall time per image (this machine, batch of all images)
    images: torch.Tensor      # [classes × per_class, 3, H, W] in [-1, 1]


def compare(student: str | Path, per_class: int = 4, seed: int = 0) -> tuple[Figure, list[Side]]:
    """Draw ``per_class`` images of each class with the teacher and the student (same seeds)."""
    folder = runs.resolve(student)
    how = runs.load_config(folder).get("distilled")
    if not how:
        raise DefectlabError(f"run {folder.name} is not a distilled student (its config.json has no 'distilled')")
    teacher_folder = runs.resolve(Path(how["settings"]["run"]))
    sides = []
    for name, r, steps, guidance in (
            (f"teacher {teacher_folder.name}", restore.restore(teacher_folder, how["teacher_checkpoint"]),
             how["teacher_steps"], how["teacher_guidance"]),
            (f"student {folder.name}", restore.restore(folder, "latest"), how["steps"], 1.0)):
        labels = [c for c in range(len(r.classes)) for _ in range(per_class)]
        gens = [g for c in r.classes for g in sampler.generators(seed, c, range(per_class))]
        size = r.config.get("image_size") or r.base.default_image_size
        t0 = time.perf_counter()
        images = sampler.generate(r.model, r.base.codec, labels, gens, steps=steps, guidance=guidance, scheduler="ddim",
                                  timestep_spacing=how["timestep_spacing"], scheduler_config=r.base.scheduler_config,
                                  image_size=size, progress=False)
        seconds = (time.perf_counter() - t0) / max(len(labels), 1)
        sides.append(Side(name, steps, guidance, steps * (2 if guidance != 1 else 1), seconds, images))
        classes = r.classes
    return _figure(sides, classes, per_class), sides


def _figure(sides: list[Side], classes: list[str], per_class: int) -> Figure:
    groups = {f"{side.name.split()[0]}: {side.steps} steps, guidance {side.guidance:g}, {side.forwards} forwards":
              {c: side.images[i * per_class:(i + 1) * per_class] for i, c in enumerate(classes)} for side in sides}
    return viz.stacked_figure(groups, rows=per_class, title="teacher and student from the same seeds")


def table(sides: list[Side]) -> str:
    """A Markdown table: steps, guidance, forwards and wall time per image, and the ratios."""
    t, s = sides
    rows = ["| | steps | guidance | forwards / image | s / image (this machine) |", "|---|---|---|---|---|"]
    rows += [f"| {x.name} | {x.steps} | {x.guidance:g} | {x.forwards} | {x.seconds:.4f} |" for x in sides]
    rows.append(f"| teacher ÷ student | | | {t.forwards / s.forwards:.1f}× | {t.seconds / max(s.seconds, 1e-9):.1f}× |")
    return "\n".join(rows)
