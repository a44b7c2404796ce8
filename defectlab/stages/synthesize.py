"""The synthesize stage: image + mask pairs, defects where the user puts them.

``run(MaskSampleConfig)`` (CLI ``defectlab synthesize``) writes ``per_class`` pairs per class of a
fine-tuned run in MVTec AD layout (``<product>/test/<class>/NNNN.png`` +
``<product>/ground_truth/<class>/NNNN_mask.png``) with ``manifest.jsonl`` and ``mask_config.json``,
resumable like ``sample``; ``data.load(DataConfig(data=out, product=…))`` reads it back.
``condition`` needs a run fine-tuned with ``--mask-condition``; ``inpaint`` works with any run.
The masks, inpainting and the defect detector are ``masks.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import manifest, runs
from ..base.errors import DefectlabError
from ..base.images import quantised, save_mask_png, save_png
from ..base.progress import tqdm
from ..data import dataset, sources as data_mod
from ..core import restore, sampler
from ..core.codec import check_image_size
from ..core.masks import KINDS, MODES, NEEDS, carry, check_mask, deform, inpaint, load_mask_png, paste, procedural_mask, transform_mask



# ----------------------------------------------------------------------------- run(cfg)
@dataclass
class MaskSampleConfig:
    run: str = "latest"            # run folder/name/number, or latest
    mode: str = "inpaint"          # condition (needs a --mask-condition run) | inpaint (onto defect-free images, any run)
    classes: str = ""              # comma-separated class names ("" = all)
    per_class: int = 8             # image + mask pairs per class
    mask: str = "dataset"          # dataset (the run's training masks of the class) | ellipse | stroke | blob | a PNG file
    cx: float = -1.0               # mask centre x, fraction of the width (-1: dataset/PNG masks stay, drawn ones random 0.35-0.65)
    cy: float = -1.0               # mask centre y, fraction of the height (-1: as for cx)
    scale: float = 0.0             # drawn: longest side, fraction of the image side (0 = 0.25); dataset/PNG: resize factor (0 = 1)
    angle: float = 0.0             # rotation, degrees counter-clockwise (drawn masks placed at random also get a random angle)
    source: str = "model"          # model (the run draws each defect) | cutpaste (the training defect's own pixels under its carried mask, same poses and good images: the copy baseline, no model) | refine (the cut-paste pair, then the run redraws the mask's content from it noised by strength: SDEdit)
    strength: float = 0.6          # refine: how far into the schedule the pasted defect is noised before the run redraws it (0 = the copy, 1 = from noise)
    detail: bool = False           # refine: add back what the latent codec loses of the pasted defect (its fine structure stays as copied; the model changes light and colour)
    deform: float = 0.0            # share of dataset masks deformed into new shapes (scale, rotation, elastic), the rest copied: 0 = all training shapes (cutpaste/refine: the defect's pixels bend with it)
    good: str = ""                 # inpaint: a defect-free image or folder of them ("" = the dataset's good images)
    place: str = "carry"           # inpaint, dataset masks: carry (moved with the product onto the good image: masks.carry) | keep (same pixels)
    steps: int = 0                 # denoising steps (0 = scheduler default: ddpm 250, ddim 50, dpmsolver 25)
    scheduler: str = "ddpm"        # ddpm | ddim | dpmsolver
    guidance: float = sampler.GUIDANCE  # classifier-free guidance scale (on the class; both halves see the mask)
    resample: int = 1              # inpaint: RePaint repeats per step (1 = plain latent blending; ddpm/ddim)
    seed: int = 0                  # pair i of class c is seeded from (seed, c, i): noise, drawn mask shape and place, deformation; it uses good image i + seed
    image_size: int = 0            # side in px (0 = the run's training size)
    checkpoint: str = "best"       # best | latest | step number
    batch_size: int = 8            # images per forward (never changes the images)
    out: str = ""                  # output folder ("" = <run>/synthesized/<mode>-<mask>-<scheduler><steps>-s<seed>-<size>px)


PLACES = ("carry", "keep")
SOURCES = ("model", "cutpaste", "refine")
COPIED = ("cutpaste", "refine")  # sources that start from the training defect's own pixels
PIXEL_FIELDS = ("run", "checkpoint", "mode", "source", "strength", "detail", "deform", "mask", "cx", "cy", "scale", "angle", "good", "place", "steps", "scheduler",
                "guidance", "resample", "seed", "image_size")  # an out folder is reused only if these agree


def check_source(source: str, detail: bool) -> None:
    """A known source, and ``detail`` only where there is a pasted defect to keep (refine)."""
    if source not in SOURCES:
        raise DefectlabError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if detail and source != "refine":
        raise DefectlabError(f"detail keeps a pasted defect's fine structure: it needs --source refine (got {source})")


def source_tag(source: str, strength: float, detail: bool) -> str:
    """How a source names its folders: ``cutpaste``, ``refine0.3``, ``refine0.3-detail``; "" for model."""
    return {"cutpaste": "cutpaste", "refine": f"refine{strength:g}" + ("-detail" if detail else "")}.get(source, "")


def _check(cfg: MaskSampleConfig) -> None:
    if cfg.mode not in MODES:
        raise DefectlabError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    check_source(cfg.source, cfg.detail)
    if cfg.source in COPIED and (cfg.mode != "inpaint" or cfg.mask != "dataset"):
        raise DefectlabError(f"--source {cfg.source} starts from the training defects' own pixels: it needs "
                             "--mode inpaint and --mask dataset")
    if not 0 < cfg.strength <= 1:
        raise DefectlabError(f"strength must be in (0, 1] (got {cfg.strength})")
    if not 0 <= cfg.deform <= 1:
        raise DefectlabError(f"deform is a share of the pairs, in [0, 1] (got {cfg.deform})")
    if cfg.place not in PLACES:
        raise DefectlabError(f"unknown place {cfg.place!r}; choose one of {', '.join(PLACES)}")
    if cfg.mask not in ("dataset", *KINDS) and not Path(cfg.mask).expanduser().is_file():
        raise DefectlabError(f"mask {cfg.mask!r} is not dataset, {', '.join(KINDS)} or an existing PNG file")
    if cfg.per_class < 1 or cfg.batch_size < 1 or cfg.steps < 0 or cfg.resample < 1 or cfg.scale < 0:
        raise DefectlabError("per_class, batch_size and resample must be ≥ 1; steps and scale ≥ 0")
    if cfg.resample > 1 and (cfg.mode != "inpaint" or cfg.scheduler == "dpmsolver"):
        raise DefectlabError("resample applies to --mode inpaint only, with --scheduler ddpm or ddim")
    if any(not (v == -1 or 0 <= v <= 1) for v in (cfg.cx, cfg.cy)):
        raise DefectlabError(f"cx and cy are fractions of the side in [0, 1], or -1 (got {cfg.cx}, {cfg.cy})")


def _mask_for(cfg: MaskSampleConfig, size: int, pool: list, i: int, seed: int,
              good: torch.Tensor | None = None) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """Pair ``i``'s mask, its source, and (``source`` cutpaste) the defect image moved with it; a
    dataset mask is carried onto ``good``'s product (``place`` carry), and deformed into a new
    shape for a ``deform`` share of the pairs (``masks.deform``, drawn from the pair's seed)."""
    if cfg.mask in KINDS:
        rng = np.random.default_rng(seed)  # place and shape follow the pair's own seed
        cx, cy = (v if v >= 0 else float(rng.uniform(0.35, 0.65)) for v in (cfg.cx, cfg.cy))
        angle = cfg.angle + (0.0 if cfg.cx >= 0 and cfg.cy >= 0 else float(rng.uniform(0, 360)))
        return procedural_mask(cfg.mask, size, cx, cy, cfg.scale or 0.25, angle, seed), cfg.mask, None
    mask, source, image = pool[i % len(pool)]
    pixels = image
    if image is not None and good is not None and cfg.place == "carry":
        mask, pixels = carry(mask, image, good, pixels=True)
        if not mask.any():  # carried off the image: the pose match failed; keep the mask where it was drawn
            mask, pixels = pool[i % len(pool)][0], image
    mask = transform_mask(mask, cfg.cx if cfg.cx >= 0 else None, cfg.cy if cfg.cy >= 0 else None,
                          cfg.angle, cfg.scale or 1.0)
    rng = np.random.default_rng(seed)
    copied = cfg.source in COPIED
    if cfg.deform and rng.uniform() < cfg.deform:  # a new shape where this defect type occurs
        if copied:  # the copied pixels bend with the mask
            mask, pixels = deform(mask, rng, pixels=pixels)
            return mask, f"{source} (deformed)", pixels
        return deform(mask, rng), f"{source} (deformed)", None
    return mask, source, pixels if copied else None


def _inside(mask: torch.Tensor, y: int, x: int, size: int) -> torch.Tensor:
    out = torch.zeros_like(mask)
    out[..., y:y + size, x:x + size] = mask[..., y:y + size, x:x + size]
    return out


def _sources(cfg: MaskSampleConfig, dd, names: list[str], size: int, crop: int, run_name: str) -> tuple[dict, list]:
    """``({class: [(mask, source, its image or None)]}, good image paths)``: masks of the run's
    *training* split only (test-split shapes never leak into synthetic training data), with the
    defect image they were drawn on (``place`` carry), or the one PNG for every class."""
    png = [(load_mask_png(Path(cfg.mask).expanduser(), size), cfg.mask, None)] if cfg.mask not in ("dataset", *KINDS) else []
    image = (lambda s: dataset.load_image(s.image, size, crop)) if cfg.mode == "inpaint" and \
        (cfg.place == "carry" or cfg.source in COPIED) else (lambda s: None)
    pools = {n: png or [(dataset.load_mask(s.mask, size, crop), s.mask.relative_to(dd.root).as_posix(), image(s))
                        for s in (dd.train if cfg.mask == "dataset" else []) if s.defect == n and s.mask is not None]
             for n in names}
    if cfg.mask == "dataset" and (empty := [n for n, pool in pools.items() if not pool]):
        raise DefectlabError(f"class {empty[0]!r} has no masks in the training split of run {run_name}; "
                             "use --mask ellipse, stroke, blob or a PNG")
    if blank := [src for pool in pools.values() for mask, src, _ in pool if not mask.any()]:
        where = dd.root / blank[0] if cfg.mask == "dataset" else blank[0]
        raise DefectlabError(f"mask {where} holds no defect pixel at {size} px (all black, or outside the crop): "
                             "fix or delete it, or use --mask ellipse, stroke or blob")
    if cfg.mode != "inpaint":
        return pools, []
    g = Path(cfg.good).expanduser() if cfg.good else None
    goods = (dd.good if g is None else [g] if g.is_file() else
             sorted(p for p in g.glob("*") if p.suffix.lower() in data_mod.IMAGE_SUFFIXES) if g.is_dir() else [])
    if not goods:
        raise DefectlabError(f"no defect-free images for inpainting in {cfg.good or 'the dataset'}; pass --good")
    return pools, goods


def run(cfg: MaskSampleConfig) -> Path:
    """Write ``per_class`` image + mask pairs per class (see module doc); returns the out folder."""
    _check(cfg)
    folder = runs.resolve(cfg.run)
    saved = runs.load_config(folder)
    cfg = sampler.distilled(cfg, saved)
    steps = cfg.steps or sampler.DEFAULT_STEPS.get(cfg.scheduler, 1)
    sampler.check(steps, cfg.guidance, cfg.scheduler, "all")
    if (zoom := data_mod.from_settings(saved).zoom) > 1 and cfg.mode != "inpaint":
        raise DefectlabError(f"run {folder.name} was trained on --zoom {zoom} windows: synthesize it with --mode inpaint")
    if cfg.mode == "condition" and not saved.get("mask_condition"):
        raise DefectlabError(f"run {folder.name} was trained without mask conditioning: --mode condition needs a run "
                             "fine-tuned with --mask-condition (defectlab finetune --mask-condition …); "
                             "--mode inpaint works with any run")
    r = restore.restore(folder, checkpoint=cfg.checkpoint)
    size = check_image_size(cfg.image_size or r.config["image_size"], r.base.codec, r.model.config.patch_size,
                            r.base.spec)
    grey = bool(r.config.get("greyscale"))  # a greyscale dataset: grey pairs, as the images it trained on
    dcfg = data_mod.from_settings(r.config, image_size=size)
    full = size * dcfg.zoom  # a --zoom run generates size windows of full-size images
    names = [c.strip() for c in cfg.classes.split(",") if c.strip()] or list(r.classes)
    if unknown := [c for c in names if c not in r.classes]:
        raise DefectlabError(f"unknown class {', '.join(unknown)} (known: {', '.join(r.classes)})")
    need_data = cfg.mask == "dataset" or (cfg.mode == "inpaint" and not cfg.good)
    dd = data_mod.load(dcfg, manifest=folder / "split.json") if need_data else None
    pools, goods = _sources(cfg, dd, names, full, dcfg.crop, folder.name)

    slug = cfg.mask if cfg.mask in ("dataset", *KINDS) else Path(cfg.mask).stem
    how = source_tag(cfg.source, cfg.strength, cfg.detail) or f"{cfg.mode}-{slug}"
    if cfg.source != "cutpaste":  # copies depend on no sampler
        how += f"-{cfg.scheduler}{steps}"
    tag = (f"{how}-s{cfg.seed}-{size}px" + (f"-zoom{dcfg.zoom}" if dcfg.zoom > 1 else "")
           + (f"-deform{cfg.deform:g}" if cfg.deform else ""))
    out = Path(cfg.out) if cfg.out else folder / "synthesized" / tag
    resolved = {**dataclasses.asdict(cfg), "run": folder.name, "checkpoint": Path(r.checkpoint).name, "steps": steps,
                "image_size": size, "zoom": dcfg.zoom, "crop": dcfg.crop, "product": dcfg.product, "out": str(out),
                "strength": cfg.strength if cfg.source == "refine" else None}  # only refine's pixels depend on it
    manifest.check_reuse(out, "mask_config.json", resolved, PIXEL_FIELDS, legacy={"detail": False})
    done = set(manifest.read_records(out, NEEDS))
    work = []  # (class, index, seed, mask, mask source, window corner, copied pixels): every mask is checked first
    good_path = lambda i: goods[(i + cfg.seed) % len(goods)]  # noqa: E731  another seed, other pairings

    @functools.cache
    def good_of(i: int) -> torch.Tensor | None:  # each good image read once (it serves the mask's pose and the inpainting)
        return quantised(dataset.load_image(good_path(i), full, dcfg.crop)) if goods else None

    for n, i in ((n, i) for n in names for i in range(cfg.per_class) if (n, i) not in done):
        seed = sampler.sample_seed(cfg.seed, n, i)
        mask, src, pixels = _mask_for(cfg, full, pools[n], i, seed, good_of(i) if cfg.mask == "dataset" else None)
        if dcfg.zoom > 1:  # the model sees one window: the defect is what falls inside it
            mask = _inside(mask, *dataset.window(mask, size), size)
        corner = dataset.window(mask, size)  # where the model draws ((0, 0) at zoom 1: all of it)
        work.append((n, i, seed, check_mask(mask, f"mask for {n} #{i} ({src})"), src, corner, pixels))
    runs.ensure_dir(out, "--out")
    runs.write_json(out / "mask_config.json", resolved)
    common = {k: resolved[k] for k in ("mode", "steps", "scheduler", "guidance", "resample", "seed", "run", "checkpoint")}
    if cfg.source == "refine":
        common.update(strength=cfg.strength, detail=cfg.detail)
    kw = dict(scheduler_config=r.base.scheduler_config, batch_size=cfg.batch_size, progress=False)
    for start in tqdm(range(0, len(work), cfg.batch_size), desc=f"image + mask pairs → {out.name}", unit="batch"):
        chunk = work[start:start + cfg.batch_size]
        batch_masks = torch.stack([w[3] for w in chunk])
        labels = [r.classes.index(n) for n, *_ in chunk]
        gens = [sampler.generators(cfg.seed, n, [i])[0] for n, i, *_ in chunk]
        if cfg.source == "cutpaste":  # no model: the training defect's pixels under its mask, in the same window
            images = torch.stack([paste(good_of(w[1]), w[6], w[3]) for w in chunk])
        elif cfg.mode == "inpaint":  # the good image as its PNG reads back: the kept region matches exactly
            good = torch.stack([good_of(w[1]) for w in chunk])
            corners = [w[5] for w in chunk]
            cut = lambda t: torch.stack([v[:, y:y + size, x:x + size] for v, (y, x) in zip(t, corners)])  # noqa: E731
            start = torch.stack([paste(good_of(w[1]), w[6], w[3]) for w in chunk]) if cfg.source == "refine" else None
            drawn = inpaint(r.model, r.base.codec, cut(good), cut(batch_masks), labels, gens, steps, cfg.guidance,
                            cfg.scheduler, cfg.resample, **kw, init=None if start is None else cut(start),
                            strength=cfg.strength, detail=cfg.detail)  # inpaint uses them only with an init
            images = good.float().clone()
            for img, d, (y, x) in zip(images, drawn, corners):  # the window back into the full image (zoom 1: all of it)
                img[:, y:y + size, x:x + size] = d
        else:
            images = sampler.generate(r.model, r.base.codec, labels, gens,
                                      sampler.Sampling(steps, cfg.guidance, cfg.scheduler), image_size=size,
                                      cond=batch_masks, **kw)
        lines = []
        for (n, i, seed, mask, src, *_), img in zip(chunk, images):
            rel, mrel = f"{dcfg.product}/test/{n}/{i:04d}.png", f"{dcfg.product}/ground_truth/{n}/{i:04d}_mask.png"
            save_mask_png(mask, runs.safe_join(out, mrel))
            save_png(img, runs.safe_join(out, rel), grey=grey)  # the image last: it marks the pair finished
            lines.append({"file": rel, "mask": mrel, "class": n, "label": r.classes.index(n), "index": i,
                          "sample_seed": seed, "mask_source": src,
                          "good": str(good_path(i)) if goods else None, "source": cfg.source, **common})
        manifest.append(out, lines)
    manifest.finish(out, NEEDS)
    return out
