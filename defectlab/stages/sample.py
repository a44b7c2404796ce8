"""The sample stage: ``run(SampleConfig(...))`` writes MVTec-style PNGs
``<out>/<product>/test/<class>/<NNNN>.png``, ``manifest.jsonl``, ``sample_config.json`` and a grid
figure for a fine-tuned run (or the base model); it is resumable and splits the work across
processes under ``accelerate launch``. The drawing itself is ``sampler.generate``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from ..base import manifest, paths, runs
from ..base.errors import DefectlabError
from ..base.images import load_png, save_png
from ..base.progress import tqdm
from ..data import product
from ..core import methods, model as model_mod, restore, sampler, viz
from ..core.codec import check_image_size

GRID_ROWS, GRID_CLASSES = 8, 16    # the saved grid figure shows at most this many rows / columns


@dataclass
class SampleConfig:
    run: str = "latest"            # run folder/name/number, latest, or base (the pre-trained model, its own class ids)
    model: str = "mini"            # base model sampled when run=base (mini | tiny | hub id | folder | .pt)
    classes: str = ""              # comma-separated class names ("" means all); class ids when run is base
    per_class: int = 8             # images per class
    steps: int = 0                 # denoising steps (0 means the scheduler default: ddpm 250, ddim 50, dpmsolver 25)
    guidance: float = sampler.GUIDANCE  # classifier-free guidance scale (1 means off: one forward per step)
    cfg_channels: str = "all"      # all (diffusers DiTPipeline) | first3 (original DiT: latent channels 0-2)
    guidance_lo: float = 0.0       # guide only at timesteps t ≥ this (0..1000 scale)
    guidance_hi: float = 1000.0    # ... and t ≤ this
    scheduler: str = "ddpm"        # ddpm | ddim | dpmsolver (DPM-Solver++)
    timestep_spacing: str = "auto"  # auto | leading (0, s, …: 25 DDIM steps visit 960…0, never 999) | trailing (999, 959, …, 39: never 0) | linspace (999 … 0, both ends); auto = the original DiT's respacing for original-trained weights, else ddim trailing
    model_heads: int = 0           # run=base: attention heads of an original .pt whose width is not DiT-S/B/L/XL
    numerics: str = "auto"         # auto (the run's / model's own) | original (DiT's timestep frequencies) | diffusers (DiTPipeline's)
    seed: int = 0                  # image i of class c is seeded from (seed, c, i)
    batch_size: int = 16           # images per forward (never changes the images)
    checkpoint: str = "best"       # best | latest | step number
    out: str = ""                  # output folder ("" = <run>/samples/<tag>/)
    formats: str = "png"           # grid figure formats, comma-separated: png, pdf, svg
    image_size: int = 0            # image side in px (0 = the run's training size)


# sample_config.json fields that change pixels: an out folder is reused only if they all agree
# (per_class, classes, batch_size, out and formats may differ between calls)
PIXEL_FIELDS = ("run", "model", "checkpoint", "steps", "guidance", "cfg_channels", "guidance_lo",
                "guidance_hi", "scheduler", "timestep_spacing", "numerics", "seed", "image_size")


# ----------------------------------------------------------------------------- run(cfg)
@dataclass
class _Source:
    """What run() samples from: a fine-tuned run folder, or the pre-trained base."""
    model: torch.nn.Module
    codec: object
    scheduler_config: dict
    names: list[str]          # all class names (folder names); label = index, or the id for base
    labels: list[int]
    titles: list[str]         # figure column titles
    product: str
    folder: Path              # run folder (base: outputs/base/<model>) → samples/, figures/
    run: str                  # recorded in manifest / sample_config
    checkpoint: str
    spec: str
    image_size: int
    greyscale: bool = False   # the run trained on greyscale images: write grey PNGs
    config: dict = dataclasses.field(default_factory=dict)  # the run's config.json settings (base: none)


def guidance_interval(cfg: SampleConfig) -> tuple[float, float] | None:
    """The timesteps guided (None = all): ``guidance_lo ≤ t ≤ guidance_hi`` on the 0..1000 scale."""
    return None if cfg.guidance_lo <= 0 and cfg.guidance_hi >= 1000 else (cfg.guidance_lo, cfg.guidance_hi)


def sampling(cfg: SampleConfig) -> sampler.Sampling:
    """The sampler settings a ``SampleConfig`` stands for (steps 0 → the scheduler's default)."""
    return sampler.Sampling(cfg.steps or None, cfg.guidance, cfg.scheduler, cfg.cfg_channels,
                            guidance_interval(cfg), cfg.timestep_spacing)


def _load_source(cfg: SampleConfig, device) -> _Source:
    if cfg.run == "base":
        base = model_mod.load(cfg.model, device=device, numerics=cfg.numerics, heads=cfg.model_heads)
        k = methods.num_classes(base.transformer)
        names = [str(i) for i in range(k)]
        known = base.class_names or []
        titles = [f"{i}: {known[i].split(',')[0]}" if i < len(known) else str(i) for i in range(k)]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model).strip("-")
        return _Source(base.transformer, base.codec, base.scheduler_config, names, list(range(k)), titles, "base",
                       paths.OUTPUTS / "base" / slug, "base", "base", base.spec,
                       cfg.image_size or base.default_image_size)
    folder = runs.resolve(cfg.run)
    runs.find_checkpoint(folder, cfg.checkpoint)  # DefectlabError before the model loads
    return _from_restored(cfg, restore.restore(folder, checkpoint=cfg.checkpoint, device=device, numerics=cfg.numerics))


def _from_restored(cfg: SampleConfig, r: restore.Restored) -> _Source:
    """A run already loaded (notebooks load once for sampling and the explorer)."""
    if cfg.numerics not in ("auto", model_mod.numerics_of(r.model)):
        raise DefectlabError(f"numerics {cfg.numerics!r} differs from the loaded run's "
                             f"({model_mod.numerics_of(r.model)}): restore it with numerics={cfg.numerics!r}")
    size = cfg.image_size or r.config.get("image_size") or r.base.default_image_size
    names, labels = list(r.classes), list(range(len(r.classes)))
    record = r.folder / product.RECORD if r.folder is not None else None
    if record is not None and record.is_file() and product.used(r.config, runs.read_json(record)):
        # the null class learned the defect-free product
        names, labels = names + [product.GOOD], labels + [len(names)]
    return _Source(r.model, r.base.codec, r.base.scheduler_config, names, labels,
                   names, r.config.get("product", "product"), r.folder, r.folder.name,
                   Path(r.checkpoint).name, r.base.spec, size, bool(r.config.get("greyscale")), r.config)


def _pick(cfg: SampleConfig, src: _Source) -> list[int]:
    """Indices into src.names of the classes asked for (all when empty)."""
    wanted = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if not wanted:
        return list(range(len(src.names)))
    unknown = [c for c in wanted if c not in src.names]
    if unknown:
        known = f"0..{len(src.names) - 1}" if cfg.run == "base" else ", ".join(src.names)
        raise DefectlabError(f"unknown class {', '.join(unknown)} (known: {known})")
    return [src.names.index(c) for c in dict.fromkeys(wanted)]


def run(cfg: SampleConfig, restored: restore.Restored | None = None) -> Path:
    """Sample ``per_class`` images per class into the out folder (see module doc); returns it.
    ``restored``: the run already loaded (``restore.restore``: notebooks load it once)."""
    steps = cfg.steps or sampler.DEFAULT_STEPS.get(cfg.scheduler, 1)
    if cfg.steps < 0:
        raise DefectlabError(f"steps must be ≥ 1, or 0 for the scheduler default (got {cfg.steps})")
    sampler.check(steps, cfg.guidance, cfg.scheduler, cfg.cfg_channels, (cfg.guidance_lo, cfg.guidance_hi))
    model_mod.check_numerics(cfg.numerics)
    sampler.spacing_for(cfg.scheduler, "diffusers", cfg.timestep_spacing)  # a bad name fails before the model loads
    if cfg.per_class < 1 or cfg.batch_size < 1:
        raise DefectlabError(f"per_class and batch_size must be ≥ 1 (got {cfg.per_class}, {cfg.batch_size})")
    bad = [f for f in cfg.formats.split(",") if f.strip() and f.strip().lower() not in viz.FORMATS]
    if bad:  # before sampling, not after an hour of it
        raise DefectlabError(f"unknown figure format {', '.join(bad)}; use {', '.join(viz.FORMATS)}")
    # several processes without CUDA (torchrun on a CPU box) need accelerate's gloo backend
    state = PartialState(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    src = _load_source(cfg, str(state.device)) if restored is None else _from_restored(cfg, restored)
    cfg = sampler.distilled(cfg, src.config)  # a distilled run samples as distilled unless told otherwise
    steps = cfg.steps or sampler.DEFAULT_STEPS.get(cfg.scheduler, 1)
    check_image_size(src.image_size, src.codec, src.model.config.patch_size, src.spec)
    chosen = _pick(cfg, src)
    interval = guidance_interval(cfg)
    numerics = model_mod.numerics_of(src.model)
    spacing = sampler.spacing_for(cfg.scheduler, numerics, cfg.timestep_spacing)
    tag = (f"{src.checkpoint}-{cfg.scheduler}{steps}-g{cfg.guidance:g}-{cfg.cfg_channels}"
           + (f"-t{cfg.guidance_lo:g}-{cfg.guidance_hi:g}" if interval else "")
           + (f"-{spacing}" if cfg.timestep_spacing != "auto" else "")
           + (f"-{numerics}" if cfg.numerics != "auto" else "") + f"-s{cfg.seed}-{src.image_size}px")
    out = Path(cfg.out) if cfg.out else src.folder / "samples" / tag
    resolved = {**dataclasses.asdict(cfg), "run": src.run, "model": src.spec, "checkpoint": src.checkpoint,
                "steps": steps, "image_size": src.image_size, "out": str(out),
                "numerics": numerics, "timestep_spacing": spacing,
                "classes": ",".join(src.names[j] for j in chosen)}
    # folders sampled before numerics/spacing were recorded used diffusers' and the SPACING table
    manifest.check_reuse(out, "sample_config.json", resolved, PIXEL_FIELDS, legacy={
        "numerics": "diffusers", "timestep_spacing": sampler.SPACING.get(cfg.scheduler, "")})
    done = manifest.read_records(out)
    state.wait_for_everyone()  # everyone has checked and read before anything is written
    if state.is_main_process:
        runs.ensure_dir(out, "--out")
        runs.write_json(out / "sample_config.json", resolved)
    out.mkdir(parents=True, exist_ok=True)

    work = [(j, i) for j in chosen for i in range(cfg.per_class) if (src.names[j], i) not in done]
    mine = work[state.process_index::state.num_processes]  # seeds do not depend on who samples
    common = {"seed": cfg.seed, "steps": steps, "guidance": cfg.guidance, "cfg_channels": cfg.cfg_channels,
              "guidance_interval": interval, "scheduler": cfg.scheduler, "timestep_spacing": spacing,
              "numerics": numerics, "run": src.run, "checkpoint": src.checkpoint}
    plan = dataclasses.replace(sampling(cfg), steps=steps, timestep_spacing=spacing)
    bar = tqdm(total=len(mine), desc=f"images → {out.name}", unit="img", disable=not state.is_main_process)
    for start in range(0, len(mine), cfg.batch_size):
        chunk = mine[start:start + cfg.batch_size]
        gens = [sampler.generators(cfg.seed, src.names[j], [i])[0] for j, i in chunk]
        images = sampler.generate(src.model, src.codec, [src.labels[j] for j, _ in chunk], gens, plan,
                                  scheduler_config=src.scheduler_config, batch_size=cfg.batch_size,
                                  image_size=src.image_size, progress=state.is_main_process)
        lines = []
        for (j, i), img in zip(chunk, images):
            rel = f"{src.product}/test/{src.names[j]}/{i:04d}.png"
            save_png(img, runs.safe_join(out, rel), grey=src.greyscale)
            lines.append({"file": rel, "class": src.names[j], "label": src.labels[j], "index": i,
                          "sample_seed": sampler.sample_seed(cfg.seed, src.names[j], i), **common})
        manifest.append(out, lines, state.process_index)
        bar.update(len(chunk))
    bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        manifest.finish(out)
        _grid(out, src, chosen, cfg, steps, tag)
    state.wait_for_everyone()
    return out


def _grid(out: Path, src: _Source, chosen: list[int], cfg: SampleConfig, steps: int, tag: str) -> None:
    cols, rows = chosen[:GRID_CLASSES], min(cfg.per_class, GRID_ROWS)
    images = torch.stack([load_png(out / f"{src.product}/test/{src.names[j]}/{i:04d}.png")
                          for j in cols for i in range(rows)])
    title = f"{src.run} · {cfg.scheduler} {steps} steps · guidance {cfg.guidance:g} ({cfg.cfg_channels})"
    fig = viz.grid_figure(images, [src.titles[j] for j in cols], rows, title=title)
    viz.save_figure(fig, src.folder / "figures", f"samples-{tag}", cfg.formats)
