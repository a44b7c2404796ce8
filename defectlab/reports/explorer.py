"""Sample a fine-tuned model interactively: class, scheduler, steps, seed, guidance and a Run button.

The model is loaded once by the caller (``restore.restore``) and handed in; ``render`` only
samples, with per-image generators (``sampler.generators(seed, class, range(n))``), so a seed
gives exactly the images ``sample.run`` exports for the same settings. Images are cached per
(checkpoint, sampler settings, seed, size, class): a setting seen before shows at once, and
more images of it sample only the new ones. The sampler is fast by default (``FAST``:
DPM-Solver++, 25 steps). ``widget()`` builds the ipywidgets UI, displayed after a static copy of
its grid that a saved notebook shows where the widget cannot run (a live widget hides it);
``render`` is the same thing without a browser. ``defectlab explore`` serves it as a web page.
"""
from __future__ import annotations

import base64
import html
import time
from collections import OrderedDict

import ipywidgets as w
from IPython.display import display
import torch
from matplotlib.figure import Figure

from ..base.errors import DefectlabError
from ..core import sampler
from ..core.viz import figure_png, grid_figure
from ..stages import sample

ALL_CLASSES = "(all classes)"
FAST = ("dpmsolver", 25)      # the explorer's sampler where the given one is slow (DDPM, or > FAST_STEPS steps)
FAST_STEPS = 50
CACHE_ENTRIES = 256           # (settings, class) entries kept, least recently used dropped first


class Explorer:
    """``steps`` 0 = the scheduler's default (``sampler.DEFAULT_STEPS``), as in ``sample.SampleConfig``."""

    def __init__(self, restored, steps: int = 0, guidance: float = sampler.GUIDANCE, seed: int = 0, n: int = 4,
                 scheduler: str = FAST[0], cfg_channels: str = "all", image_size: int = 0, max_steps: int = 250,
                 guidance_interval: tuple[float, float] | None = None, timestep_spacing: str = "auto"):
        self.restored, self.classes = restored, list(restored.classes)
        self.steps = steps or sampler.DEFAULT_STEPS.get(scheduler, 1)
        self.guidance, self.seed, self.n = guidance, seed, n
        self.scheduler, self.cfg_channels, self.max_steps = scheduler, cfg_channels, max(max_steps, self.steps)
        self.guidance_interval, self.timestep_spacing = guidance_interval, timestep_spacing
        self.image_size = image_size or restored.config.get("image_size") or restored.base.default_image_size
        self.last_images: torch.Tensor | None = None
        self.last_figure: Figure | None = None
        self.controls: dict = {}
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, restored, config: sample.SampleConfig, n: int = 4, fast: bool = True) -> Explorer:
        """An explorer that starts from the settings of a ``sample.SampleConfig`` (what ``sample.run``
        exports); ``fast``: a slow sampler there (DDPM, or more than ``FAST_STEPS`` steps) becomes ``FAST``."""
        steps = config.steps or sampler.DEFAULT_STEPS.get(config.scheduler, 1)
        scheduler = config.scheduler
        if fast and (scheduler == "ddpm" or steps > FAST_STEPS):
            scheduler, steps = FAST
        return cls(restored, steps=steps, guidance=config.guidance, seed=config.seed, n=n, scheduler=scheduler,
                   cfg_channels=config.cfg_channels, image_size=config.image_size,
                   guidance_interval=sample.guidance_interval(config), timestep_spacing=config.timestep_spacing)

    def render(self, class_name: str, steps: int | None = None, seed: int | None = None,
               guidance: float | None = None, n: int | None = None, scheduler: str | None = None,
               progress: bool = False) -> Figure:
        """One class: ``n`` images in a row; ``ALL_CLASSES`` (or ""): columns = classes, rows = ``n``.
        Settings not given are the explorer's own; ``progress``: a bar while sampling."""
        steps, seed = steps or self.steps, self.seed if seed is None else seed
        guidance, n = self.guidance if guidance is None else guidance, self.n if n is None else n
        scheduler = scheduler or self.scheduler
        if n < 1:
            raise DefectlabError(f"n must be ≥ 1 (got {n})")
        names = self.classes if class_name in ("", ALL_CLASSES) else [class_name]
        if names[0] not in self.classes:
            raise DefectlabError(f"unknown class {class_name!r} (known: {', '.join(self.classes)})")
        plan = sampler.Sampling(steps, guidance, scheduler, self.cfg_channels, self.guidance_interval,
                                self.timestep_spacing)
        images = self._images(plan, seed, names, n, progress)
        self.last_images = images
        title = f"{scheduler} {steps} steps · guidance {guidance:g} · seed {seed}"
        if len(names) == 1:
            fig = grid_figure(images, [f"{names[0]} #{i}" for i in range(n)], rows=1, title=title)
        else:
            fig = grid_figure(images, names, rows=n, title=title, row_labels=[f"#{i}" for i in range(n)])
        self.last_figure = fig
        return fig

    def _images(self, plan: sampler.Sampling, seed: int, names: list[str], n: int, progress: bool) -> torch.Tensor:
        """Images 0..n-1 of each class in ``names`` (class-major), sampling only what the cache lacks."""
        settings = (str(self.restored.checkpoint), plan, seed, self.image_size)
        have = {c: self._cache.get((settings, c)) for c in names}
        missing = [(c, i) for c in names for i in range(0 if have[c] is None else len(have[c]), n)]
        if missing:
            base = self.restored.base
            new = sampler.generate(self.restored.model, base.codec, [self.classes.index(c) for c, _ in missing],
                                   [sampler.generators(seed, c, [i])[0] for c, i in missing], plan,
                                   scheduler_config=base.scheduler_config, image_size=self.image_size,
                                   progress=progress)
            for c in names:
                part = new[[k for k, (name, _) in enumerate(missing) if name == c]]
                have[c] = part if have[c] is None else torch.cat([have[c], part])
        for c in names:
            self._cache[(settings, c)] = have[c]
            self._cache.move_to_end((settings, c))
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return torch.cat([have[c][:n] for c in names])

    def widget(self) -> ExplorerBox:
        """The ipywidgets UI, showing the explorer's grid (the first class, or the last one
        rendered); nothing else is sampled until Run is pressed."""
        if self.last_figure is None:
            self.render(self.classes[0])
        c = self.controls = {
            "class": w.Dropdown(options=[*self.classes, ALL_CLASSES], value=self.classes[0], description="class"),
            "scheduler": w.Dropdown(options=list(sampler.SCHEDULERS), value=self.scheduler, description="sampler"),
            "steps": w.IntSlider(value=self.steps, min=1, max=self.max_steps, description="steps",
                                 continuous_update=False),
            "seed": w.IntText(value=self.seed, description="seed"),
            "guidance": w.FloatSlider(value=self.guidance, min=1.0, max=8.0, step=0.25, description="guidance",
                                      continuous_update=False),
            "n": w.IntSlider(value=self.n, min=1, max=16, description="images", continuous_update=False),
            "run": w.Button(description="Run", button_style="primary", icon="play"),
            "status": w.HTML(value="press Run to sample"),
            "progress": w.Output(),
            "image": _image(figure_png(self.last_figure)),
            "hide_static": w.HTML(f"<style>img.{STATIC} {{display: none !important}}</style>"),
        }

        def on_run(_button=None):
            c["run"].disabled, t0 = True, time.time()
            c["status"].value = "sampling…"
            c["progress"].clear_output()
            try:
                with c["progress"]:  # the sampler's progress bar, one per Run
                    fig = self.render(c["class"].value, c["steps"].value, c["seed"].value, c["guidance"].value,
                                      c["n"].value, c["scheduler"].value, progress=True)
                png = figure_png(fig)
                c["image"].value, c["image"].layout.width = png, f"{_width(png)}px"
                c["status"].value = f"done in {time.time() - t0:.1f} s"
            except DefectlabError as err:
                c["status"].value = f"<span style='color:#b00020'>{html.escape(str(err))}</span>"
            finally:
                c["run"].disabled = False

        c["run"].on_click(on_run)
        return ExplorerBox([c["hide_static"], w.HBox([c["class"], c["scheduler"]]), w.HBox([c["steps"], c["seed"]]),
                            w.HBox([c["guidance"], c["n"]]), w.HBox([c["run"], c["status"]]), c["progress"],
                            c["image"]])


STATIC = "defectlab-static-grid"  # the saved notebook's copy of the grid; a live widget hides it


class ExplorerBox(w.VBox):
    """The explorer's controls, displayed after a static copy of the grid they start from: a saved
    notebook (nbconvert, GitHub, papermill output), where no widget can run, still shows the
    grid. The live widget carries a style that hides that copy, so a frontend that runs it
    (JupyterLab, Voilà) shows one grid, the live one, which Run updates."""

    def _repr_mimebundle_(self, **kwargs):  # the PNG too, for frontends that pick one representation
        data = super()._repr_mimebundle_(**kwargs) or {}
        image = self.children[-1].value
        return {**data, "image/png": base64.b64encode(image).decode("ascii")} if image else data

    def _ipython_display_(self):
        png = self.children[-1].value
        if png:  # the static twin: an <img> a live widget's style hides, PNG for renderers without HTML
            data = base64.b64encode(png).decode("ascii")
            display({"text/html": f'<img class="{STATIC}" src="data:image/png;base64,{data}">',
                     "image/png": data, "text/plain": "<the explorer's grid>"}, raw=True)
        display(self._repr_mimebundle_(), raw=True)


def _image(png: bytes) -> w.Image:
    """The grid at its own pixel size (not stretched to the page: stretching blurs it)."""
    return w.Image(value=png, format="png", layout=w.Layout(width=f"{_width(png)}px", max_width="100%"))


def _width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the PNG header's IHDR width
