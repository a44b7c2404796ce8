"""Sample a fine-tuned model interactively: class, steps, seed, guidance and a Run button.

The model is loaded once by the caller (``train.restore``) and handed in; ``render`` only
samples, with per-image generators (``sampler.generators(seed, class, range(n))``), so a seed
gives exactly the images ``sample.run`` exports for the same settings. ``widget()`` builds
the ipywidgets UI; ``render`` is the same thing without a browser.
"""
from __future__ import annotations

import html
import time

import ipywidgets as w
import torch
from matplotlib.figure import Figure

from . import sample, sampler
from .errors import DefectlabError
from .viz import figure_png, grid_figure

ALL_CLASSES = "(all classes)"


class Explorer:
    """``steps`` 0 = the scheduler's default (``sampler.DEFAULT_STEPS``), as in ``sample.SampleConfig``."""

    def __init__(self, restored, steps: int = 50, guidance: float = 1.5, seed: int = 0, n: int = 4,
                 scheduler: str = "ddim", cfg_channels: str = "all", image_size: int = 0, max_steps: int = 250,
                 guidance_interval: tuple[float, float] | None = None, timestep_spacing: str = "auto"):
        self.restored, self.classes = restored, list(restored.classes)
        self.steps = steps or sampler.DEFAULT_STEPS.get(scheduler, 1)
        self.guidance, self.seed, self.n = guidance, seed, n
        self.scheduler, self.cfg_channels, self.max_steps = scheduler, cfg_channels, max(max_steps, self.steps)
        self.guidance_interval, self.timestep_spacing = guidance_interval, timestep_spacing
        self.image_size = image_size or restored.config.get("image_size") or restored.base.default_image_size
        self.last_images: torch.Tensor | None = None
        self.controls: dict = {}

    @classmethod
    def from_config(cls, restored, config: sample.SampleConfig, n: int = 4) -> Explorer:
        """An explorer that starts from the settings of a ``sample.SampleConfig`` (what ``sample.run`` exports)."""
        interval = sample.guidance_interval(config)
        return cls(restored, steps=config.steps, guidance=config.guidance, seed=config.seed, n=n,
                   scheduler=config.scheduler, cfg_channels=config.cfg_channels, image_size=config.image_size,
                   guidance_interval=interval, timestep_spacing=config.timestep_spacing)

    def render(self, class_name: str, steps: int | None = None, seed: int | None = None,
               guidance: float | None = None, n: int | None = None) -> Figure:
        """One class: ``n`` images in a row; ``ALL_CLASSES`` (or ""): columns = classes, rows = ``n``.
        Settings not given are the explorer's own."""
        steps, seed = steps or self.steps, self.seed if seed is None else seed
        guidance, n = self.guidance if guidance is None else guidance, self.n if n is None else n
        if n < 1:
            raise DefectlabError(f"n must be ≥ 1 (got {n})")
        names = self.classes if class_name in ("", ALL_CLASSES) else [class_name]
        if names[0] not in self.classes:
            raise DefectlabError(f"unknown class {class_name!r} (known: {', '.join(self.classes)})")
        labels = [self.classes.index(c) for c in names for _ in range(n)]
        gens = [g for c in names for g in sampler.generators(seed, c, range(n))]
        base = self.restored.base
        plan = sampler.Sampling(steps, guidance, self.scheduler, self.cfg_channels, self.guidance_interval,
                                self.timestep_spacing)
        images = sampler.generate(self.restored.model, base.codec, labels, gens, plan,
                                  scheduler_config=base.scheduler_config, image_size=self.image_size, progress=False)
        self.last_images = images
        title = f"{self.scheduler} {steps} steps · guidance {guidance:g} · seed {seed}"
        if len(names) == 1:
            return grid_figure(images, [f"{names[0]} #{i}" for i in range(n)], rows=1, title=title)
        return grid_figure(images, names, rows=n, title=title)

    def widget(self) -> w.VBox:
        """The ipywidgets UI; nothing is sampled until Run is pressed."""
        c = self.controls = {
            "class": w.Dropdown(options=[*self.classes, ALL_CLASSES], value=self.classes[0], description="class"),
            "steps": w.IntSlider(value=self.steps, min=1, max=self.max_steps, description="steps",
                                 continuous_update=False),
            "seed": w.IntText(value=self.seed, description="seed"),
            "guidance": w.FloatSlider(value=self.guidance, min=1.0, max=8.0, step=0.25, description="guidance",
                                      continuous_update=False),
            "n": w.IntSlider(value=self.n, min=1, max=16, description="images", continuous_update=False),
            "run": w.Button(description="Run", button_style="primary", icon="play"),
            "status": w.HTML(value="press Run to sample"),
            "image": w.Image(format="png"),
        }

        def on_run(_button=None):
            c["run"].disabled, t0 = True, time.time()
            c["status"].value = "sampling…"
            try:
                fig = self.render(c["class"].value, c["steps"].value, c["seed"].value, c["guidance"].value, c["n"].value)
                c["image"].value = figure_png(fig)
                c["status"].value = f"done in {time.time() - t0:.1f} s"
            except DefectlabError as err:
                c["status"].value = f"<span style='color:#b00020'>{html.escape(str(err))}</span>"
            finally:
                c["run"].disabled = False

        c["run"].on_click(on_run)
        return w.VBox([w.HBox([c["class"], c["steps"]]), w.HBox([c["seed"], c["guidance"]]),
                       w.HBox([c["n"], c["run"], c["status"]]), c["image"]])
