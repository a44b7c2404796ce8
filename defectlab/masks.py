"""Mask-conditioned defect synthesis: defects where the user puts them, as image + mask pairs.

``condition``: a run fine-tuned with ``--mask-condition`` gets the mask on the latent grid (image
grid for tiny/mini, /8 for DiT-XL) as an extra input channel, zero-initialised (step 0 = the base)
and trained under every method. ``inpaint``: any run generates inside the mask of a defect-free
image (latent blending every step, optional RePaint resampling, exact pixel composite).
Masks: the run's training masks (moved / rotated / scaled), a PNG, or drawn (ellipse, stroke,
blob); float [1, S, S] in {0, 1}, positions as fractions of the side (x right, y down), angles in
degrees counter-clockwise as shown. ``run(MaskSampleConfig)`` writes MVTec AD layout +
``manifest.jsonl``, which ``data.load(DataConfig(data=out, product=…))`` reads back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from . import data as data_mod, runs
from .errors import DefectlabError

KINDS = ("ellipse", "stroke", "blob")
MODES = ("condition", "inpaint")
MAX_COVER = 0.95      # a mask over more of the image leaves no product context and nothing to keep
DETECT_SIZE = 32      # defect detector's working side: downsampling averages out per-pixel grain


# ----------------------------------------------------------------------------- the mask channel
class MaskPatchEmbed(nn.Module):
    """``conv(x[:, :C]) + mask_conv(x[:, C:])`` with mask_conv zero at init and bias-free (the base
    bias already shifts every patch). Holds the base conv's own parameters, so their keys stay
    ``pos_embed.proj.weight/bias``. ``config.in_channels`` stays C on purpose: sample/model read it
    as the latent channels; ``train.restore`` re-adds the channel through ``train.build``."""

    def __init__(self, conv: nn.Conv2d, extra: int = 1):
        super().__init__()
        self.weight, self.bias, self.channels = conv.weight, conv.bias, conv.in_channels
        self.stride, self.padding = conv.stride, conv.padding
        self.mask_weight = nn.Parameter(torch.zeros(conv.out_channels, extra, *conv.kernel_size,
                                                    device=conv.weight.device, dtype=conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the slice of a concatenated input is a strided view: a contiguous copy gives the base
        # conv the same memory layout (same kernels, same bits) as without the mask
        out = F.conv2d(x[:, :self.channels].contiguous(), self.weight, self.bias, self.stride, self.padding)
        if x.shape[1] == self.channels:  # no mask passed: the same as an all-zero mask
            return out
        return out + F.conv2d(x[:, self.channels:].contiguous(), self.mask_weight, None, self.stride, self.padding)


def add_mask_channel(transformer: nn.Module, extra: int = 1) -> nn.Module:
    """Give a (plain, not yet ``methods.apply``-ed) DiT ``extra`` zero-initialised input channels."""
    if not isinstance(transformer.pos_embed.proj, MaskPatchEmbed):
        transformer.pos_embed.proj = MaskPatchEmbed(transformer.pos_embed.proj, extra)
    return transformer


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.mask_weight for m in model.modules() if isinstance(m, MaskPatchEmbed)]


def has_mask_channel(model: nn.Module) -> bool:
    return bool(mask_parameters(model))


def latent_mask(mask: torch.Tensor, hw, hard: bool = False) -> torch.Tensor:
    """[N,1,S,S] → [N,1,h,w]: area coverage (a thin crack survives /8 as a small value); ``hard``:
    1 wherever any masked pixel falls, so a blended-in region covers the whole mask."""
    hw = tuple(int(v) for v in hw)
    if tuple(mask.shape[-2:]) == hw:
        return mask.float()
    m = F.interpolate(mask.float(), size=hw, mode="area")
    return (m > 0).float() if hard else m


# ----------------------------------------------------------------------------- masks
def procedural_mask(kind: str, size: int, cx: float = 0.5, cy: float = 0.5, scale: float = 0.25,
                    angle: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``[1, size, size]`` in {0, 1}. Before rotation the shape's bounding box has its longest side
    ``scale * size`` and its centre at ``(cx, cy) * size``; it is then rotated by ``angle`` about
    that centre. ellipse: axes 1 : 0.6; stroke: a crack-like random walk; blob: overlapping disks."""
    if kind not in KINDS:
        raise DefectlabError(f"unknown mask kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 < scale <= 2:
        raise DefectlabError(f"mask scale must be in (0, 2] (a fraction of the image side), got {scale}")
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = x - cx * size, y - cy * size
    u, v = dx * c - dy * s, dx * s + dy * c  # shape-frame coordinates (inverse rotation; y is down)
    length = scale * size
    if kind == "ellipse":
        return torch.from_numpy(((u / (length / 2)) ** 2 + (v / (0.3 * length)) ** 2 <= 1).astype(np.float32))[None]
    rng = np.random.default_rng(seed)
    if kind == "stroke":  # a walk whose heading drifts, like synth's cracks
        heading = np.cumsum(rng.uniform(-0.6, 0.6, rng.integers(5, 9)))
        pts = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1), 0)])
        caps = [(pts[i], pts[i + 1], 0.25) for i in range(len(pts) - 1)]
    else:
        centres = rng.normal(0, 0.3, (rng.integers(4, 8), 2))
        caps = [(p, p, r) for p, r in zip(centres, rng.uniform(0.25, 0.45, len(centres)))]
    lo = np.min([np.minimum(a, b) - r for a, b, r in caps], 0)
    hi = np.max([np.maximum(a, b) + r for a, b, r in caps], 0)
    f, mid = length / (hi - lo).max(), (lo + hi) / 2  # bounding box → centred, longest side = length
    out = np.zeros((size, size), bool)
    for a, b, r in caps:  # capsule = points within r of segment a-b (a disk when a == b)
        (ax, ay), (bx, by) = (a - mid) * f, (b - mid) * f
        ex, ey = bx - ax, by - ay
        t = np.clip(((u - ax) * ex + (v - ay) * ey) / max(ex * ex + ey * ey, 1e-9), 0, 1)
        out |= (u - ax - t * ex) ** 2 + (v - ay - t * ey) ** 2 <= max(r * f, 0.75) ** 2  # ≥ 1.5 px wide
    return torch.from_numpy(out.astype(np.float32))[None]


def bbox(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the nonzero pixels, pixel edges (pixel i spans [i, i + 1))."""
    ys, xs = torch.nonzero(mask.reshape(mask.shape[-2:]) > 0.5, as_tuple=True)
    if not len(ys):
        raise DefectlabError("mask is empty (no pixel set)")
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1


def transform_mask(mask: torch.Tensor, cx: float | None = None, cy: float | None = None,
                   angle: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Rotate (counter-clockwise) and scale a [1,S,S] mask about its bounding-box centre, then move
    that centre to ``(cx, cy)`` (fractions of the side; None = stays). Nearest: stays in {0, 1}."""
    if scale <= 0:
        raise DefectlabError(f"mask scale factor must be > 0, got {scale}")
    x0, y0, x1, y1 = bbox(mask)
    bx, by = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = mask.shape[-2:]
    move = [0.0 if cx is None else cx * w - bx, 0.0 if cy is None else cy * h - by]
    # torchvision's affine angle is clockwise; ours is counter-clockwise like F.rotate
    return TF.affine(mask.float(), angle=-angle, translate=move, scale=scale, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, center=[bx, by])


def fit_mask(mask: torch.Tensor, size: int, what: str = "mask") -> torch.Tensor:
    """A square mask of another size is resized to ``size`` with a warning (area + ``> 0``, so thin
    strokes survive); a non-square one is refused (resizing would distort it)."""
    h, w = mask.shape[-2:]
    if (h, w) == (size, size):
        return mask.float()
    if h != w:
        raise DefectlabError(f"{what} is {w}x{h}, not square: the images are {size}x{size}")
    warnings.warn(f"{what} is {w}x{h}; resized to the {size}x{size} images", stacklevel=2)
    m = F.interpolate(mask.float().reshape(-1, 1, h, w), size=(size, size), mode="area") > 0
    return m.float().reshape(*mask.shape[:-2], size, size)


def check_mask(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    cover = float((mask > 0.5).float().mean())
    if cover == 0:
        raise DefectlabError(f"{what} is empty (no pixel set; moved off the image?)")
    if cover >= MAX_COVER:
        raise DefectlabError(f"{what} covers {cover:.0%} of the image (max {MAX_COVER:.0%}): nothing to keep around the defect")
    return mask


def load_mask_png(path: Path, size: int) -> torch.Tensor:
    """Any non-black pixel of a PNG counts (grey, RGB or colour masks)."""
    try:
        with Image.open(path) as im:
            m = torch.from_numpy((np.asarray(im.convert("RGB")).max(-1) > 0).astype(np.float32))[None]
    except (OSError, ValueError) as err:
        raise DefectlabError(f"cannot read mask {path}: {err}") from err
    return fit_mask(m, size, f"mask {path}")


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def inpaint(model, codec, good: torch.Tensor, mask: torch.Tensor, labels: list[int], gens: list, steps=None,
            guidance: float = 1.5, scheduler: str = "ddpm", resample: int = 1, scheduler_config: dict | None = None,
            batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Class ``labels[i]`` generated inside ``mask[i]`` on ``good[i]`` ([N,3,S,S] in [-1, 1]);
    outside the mask the result *is* the good image (final composite in pixel space)."""
    from . import sample

    size = good.shape[-1]
    mask = fit_mask(mask, size, "inpainting mask").cpu()
    for m in mask:
        check_mask(m, "inpainting mask")
    known = codec.encode(good.to(next(model.parameters()).device))
    hw = known.shape[-2:]
    cond = latent_mask(mask, hw) if has_mask_channel(model) else None
    out = sample.generate(model, codec, labels, gens, steps, guidance, scheduler, scheduler_config=scheduler_config,
                          batch_size=batch_size, image_size=size, progress=progress, cond=cond, known=known,
                          keep=1 - latent_mask(mask, hw, hard=True), resample=resample)
    return mask * out + (1 - mask) * good.float().cpu()


# ----------------------------------------------------------------------------- measurements
def change_share(result: torch.Tensor, good: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the absolute pixel change from ``good`` that lies inside ``mask`` (pooled)."""
    diff = (result.float() - good.float()).abs().sum(-3, keepdim=True)
    total = float(diff.sum())
    return float((diff * (mask > 0.5)).sum()) / total if total > 0 else float("nan")


def defect_pixels(images: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """[N,1,S,S] bool: a channel deviates > ``threshold`` ([-1, 1] units, ≈ 38 grey levels) from a
    per-channel median background (window 1/4 side, at DETECT_SIZE px), which erases defects and
    keeps a large product; edges of the background itself (the outline) don't count. Embedded
    hazelnut, 32 px: 97% of found pixels lie in the true masks, ~0 on good images. Not for thin
    products (screw: the window erases the product itself, ~12% inside)."""
    n, c, s, _ = images.shape
    x = F.interpolate(images.float(), size=(DETECT_SIZE,) * 2, mode="area") if s > DETECT_SIZE else images.float()
    k = max(3, (x.shape[-1] // 4) | 1)
    cols = F.unfold(F.pad(x, (k // 2,) * 4, mode="reflect"), k)
    bg = cols.view(n, c, k * k, -1).median(2).values.view_as(x)
    edge = (F.max_pool2d(bg, 3, 1, 1) + F.max_pool2d(-bg, 3, 1, 1)).amax(1, keepdim=True)
    found = ((x - bg).abs().amax(1, keepdim=True) > threshold) & (edge <= threshold)
    return F.interpolate(found.float(), size=(s, s), mode="nearest") > 0.5


def mask_metrics(images: torch.Tensor, masks: torch.Tensor, good: torch.Tensor | None = None) -> dict:
    """``defect_in_mask_share``: detected defect pixels inside the mask / all detected (chance =
    ``mask_fraction``); ``defect_mask_recall``: mask pixels detected. With ``good`` (inpainting):
    ``change_in_mask_share`` and ``max_change_outside`` (exact, on the given images)."""
    found, m = defect_pixels(images), masks > 0.5
    hit = float((found & m).sum())
    out = {"n": len(images), "defect_in_mask_share": hit / float(found.sum()) if found.any() else float("nan"),
           "defect_mask_recall": hit / max(float(m.sum()), 1.0), "defect_fraction": float(found.float().mean()),
           "mask_fraction": float(m.float().mean())}
    if good is not None:
        out["change_in_mask_share"] = change_share(images, good, masks)
        out["max_change_outside"] = float(((images - good).abs() * ~m).amax())
    return out


def _quantised(x: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of ``x`` reads back as: the kept region then matches the saved file exactly."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def summarize(out: Path) -> dict:
    """Metrics of a ``run(cfg)`` output folder, overall and per class (read from its manifest)."""
    from . import sample

    out = Path(out)
    cfg = runs.read_json(out / "mask_config.json")
    recs = sorted(sample._read_records(out).values(), key=lambda r: (r["class"], r["index"]))
    if not recs:
        raise DefectlabError(f"no finished image + mask pairs in {out}")
    size, crop = cfg["image_size"], cfg.get("crop", 0)
    images = torch.stack([sample.load_png(out / r["file"]) for r in recs])
    mask = torch.stack([load_mask_png(out / r["mask"], size) for r in recs])
    good = (torch.stack([_quantised(data_mod.load_image(Path(r["good"]), size, crop)) for r in recs])
            if cfg["mode"] == "inpaint" else None)
    pick = lambda c: [j for j, r in enumerate(recs) if r["class"] == c]  # noqa: E731
    per_class = {c: mask_metrics(images[pick(c)], mask[pick(c)], None if good is None else good[pick(c)])
                 for c in sorted({r["class"] for r in recs})}
    return {"mode": cfg["mode"], "mask": cfg["mask"], "run": cfg["run"], "overall": mask_metrics(images, mask, good),
            "per_class": per_class,
            "detector": "median background (1/4-side window at 32 px), deviation > 0.3; see masks.defect_pixels"}


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
    good: str = ""                 # inpaint: a defect-free image or folder of them ("" = the dataset's good images)
    steps: int = 0                 # denoising steps (0 = scheduler default: ddpm 250, ddim 50, dpmsolver 25)
    scheduler: str = "ddpm"        # ddpm | ddim | dpmsolver
    guidance: float = 1.5          # classifier-free guidance scale (on the class; both halves see the mask)
    resample: int = 1              # inpaint: RePaint repeats per step (1 = plain latent blending; ddpm/ddim)
    seed: int = 0                  # pair i of class c is seeded from (seed, c, i): noise, drawn mask shape and place
    image_size: int = 0            # side in px (0 = the run's training size)
    checkpoint: str = "best"       # best | latest | step number
    batch_size: int = 8            # images per forward (never changes the images)
    out: str = ""                  # output folder ("" = <run>/synthesized/<mode>-<mask>-<scheduler><steps>-s<seed>-<size>px)


PIXEL_FIELDS = ("run", "checkpoint", "mode", "mask", "cx", "cy", "scale", "angle", "good", "steps", "scheduler",
                "guidance", "resample", "seed", "image_size")  # an out folder is reused only if these agree


def _check(cfg: MaskSampleConfig) -> None:
    if cfg.mode not in MODES:
        raise DefectlabError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.mask not in ("dataset", *KINDS) and not Path(cfg.mask).expanduser().is_file():
        raise DefectlabError(f"mask {cfg.mask!r} is not dataset, {', '.join(KINDS)} or an existing PNG file")
    if cfg.per_class < 1 or cfg.batch_size < 1 or cfg.steps < 0 or cfg.resample < 1 or cfg.scale < 0:
        raise DefectlabError("per_class, batch_size and resample must be ≥ 1; steps and scale ≥ 0")
    if cfg.resample > 1 and (cfg.mode != "inpaint" or cfg.scheduler == "dpmsolver"):
        raise DefectlabError("resample applies to --mode inpaint only, with --scheduler ddpm or ddim")
    if any(not (v == -1 or 0 <= v <= 1) for v in (cfg.cx, cfg.cy)):
        raise DefectlabError(f"cx and cy are fractions of the side in [0, 1], or -1 (got {cfg.cx}, {cfg.cy})")


def _mask_for(cfg: MaskSampleConfig, size: int, pool: list, i: int, seed: int) -> tuple[torch.Tensor, str]:
    if cfg.mask in KINDS:
        rng = np.random.default_rng(seed)  # place and shape follow the pair's own seed
        cx, cy = (v if v >= 0 else float(rng.uniform(0.35, 0.65)) for v in (cfg.cx, cfg.cy))
        angle = cfg.angle + (0.0 if cfg.cx >= 0 and cfg.cy >= 0 else float(rng.uniform(0, 360)))
        return procedural_mask(cfg.mask, size, cx, cy, cfg.scale or 0.25, angle, seed), cfg.mask
    mask, source = pool[i % len(pool)]
    return transform_mask(mask, cfg.cx if cfg.cx >= 0 else None, cfg.cy if cfg.cy >= 0 else None,
                          cfg.angle, cfg.scale or 1.0), source


def _sources(cfg: MaskSampleConfig, dd, names: list[str], size: int, crop: int, run_name: str) -> tuple[dict, list]:
    """``({class: [(mask, source)]}, good image paths)``: masks of the run's *training* split only
    (test-split shapes never leak into synthetic training data), or the one PNG for every class."""
    png = [(load_mask_png(Path(cfg.mask).expanduser(), size), cfg.mask)] if cfg.mask not in ("dataset", *KINDS) else []
    pools = {n: png or [(data_mod.load_mask(s.mask, size, crop), s.mask.relative_to(dd.root).as_posix())
                        for s in (dd.train if cfg.mask == "dataset" else []) if s.defect == n and s.mask is not None]
             for n in names}
    if cfg.mask == "dataset" and (empty := [n for n, pool in pools.items() if not pool]):
        raise DefectlabError(f"class {empty[0]!r} has no masks in the training split of run {run_name}; "
                             "use --mask ellipse, stroke, blob or a PNG")
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
    from . import sample, train

    _check(cfg)
    steps = cfg.steps or sample.DEFAULT_STEPS.get(cfg.scheduler, 1)
    sample._check(steps, cfg.guidance, cfg.scheduler, "all")
    folder = runs.resolve(cfg.run)
    if cfg.mode == "condition" and not runs.load_config(folder).get("mask_condition"):
        raise DefectlabError(f"run {folder.name} was trained without mask conditioning: --mode condition needs a run "
                             "fine-tuned with --mask-condition (defectlab finetune --mask-condition …); "
                             "--mode inpaint works with any run")
    r = train.restore(folder, checkpoint=cfg.checkpoint)
    size = cfg.image_size or r.config["image_size"]
    dcfg = data_mod.DataConfig(**{**{f.name: r.config[f.name] for f in dataclasses.fields(data_mod.DataConfig)},
                                  "image_size": size})
    names = [c.strip() for c in cfg.classes.split(",") if c.strip()] or list(r.classes)
    if unknown := [c for c in names if c not in r.classes]:
        raise DefectlabError(f"unknown class {', '.join(unknown)} (known: {', '.join(r.classes)})")
    need_data = cfg.mask == "dataset" or (cfg.mode == "inpaint" and not cfg.good)
    dd = data_mod.load(dcfg, manifest=folder / "split.json") if need_data else None
    pools, goods = _sources(cfg, dd, names, size, dcfg.crop, folder.name)

    slug = cfg.mask if cfg.mask in ("dataset", *KINDS) else Path(cfg.mask).stem
    out = Path(cfg.out) if cfg.out else folder / "synthesized" / f"{cfg.mode}-{slug}-{cfg.scheduler}{steps}-s{cfg.seed}-{size}px"
    resolved = {**dataclasses.asdict(cfg), "run": folder.name, "checkpoint": Path(r.checkpoint).name, "steps": steps,
                "image_size": size, "crop": dcfg.crop, "product": dcfg.product, "out": str(out)}
    if out.is_dir() and any(out.iterdir()):
        old = runs.read_json(out / "mask_config.json") if (out / "mask_config.json").is_file() else None
        if old is None or (diff := [k for k in PIXEL_FIELDS if old.get(k) != resolved[k]]):
            raise DefectlabError(f"out folder {out} holds other files or pairs of another configuration "
                                 f"({', '.join(diff) if old else 'no mask_config.json'}): choose another --out")
    done = {k for k, rec in sample._read_records(out).items() if (out / rec["mask"]).is_file()}
    work = []  # (class, index, seed, mask, mask source): every mask is checked before anything is written
    for n, i in ((n, i) for n in names for i in range(cfg.per_class) if (n, i) not in done):
        seed = sample.sample_seed(cfg.seed, n, i)
        mask, src = _mask_for(cfg, size, pools[n], i, seed)
        work.append((n, i, seed, check_mask(mask, f"mask for {n} #{i} ({src})"), src))
    runs.write_json(out / "mask_config.json", resolved)
    common = {k: resolved[k] for k in ("mode", "steps", "scheduler", "guidance", "resample", "seed", "run", "checkpoint")}
    kw = dict(scheduler_config=r.base.scheduler_config, batch_size=cfg.batch_size, progress=False)
    for start in range(0, len(work), cfg.batch_size):
        chunk = work[start:start + cfg.batch_size]
        batch_masks = torch.stack([w[3] for w in chunk])
        labels = [r.classes.index(n) for n, *_ in chunk]
        gens = [sample.generators(cfg.seed, n, [i])[0] for n, i, *_ in chunk]
        if cfg.mode == "inpaint":  # the good image as its PNG reads back: the kept region matches exactly
            good = torch.stack([_quantised(data_mod.load_image(goods[w[1] % len(goods)], size, dcfg.crop)) for w in chunk])
            images = inpaint(r.model, r.base.codec, good, batch_masks, labels, gens, steps, cfg.guidance, cfg.scheduler,
                             cfg.resample, **kw)
        else:
            images = sample.generate(r.model, r.base.codec, labels, gens, steps, cfg.guidance, cfg.scheduler,
                                     image_size=size, cond=batch_masks, **kw)
        lines = []
        for (n, i, seed, mask, src), img in zip(chunk, images):
            rel, mrel = f"{dcfg.product}/test/{n}/{i:04d}.png", f"{dcfg.product}/ground_truth/{n}/{i:04d}_mask.png"
            arr = (mask[0] > 0.5).numpy().astype(np.uint8) * 255
            runs.atomic_write(runs.safe_join(out, mrel), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
            sample.save_png(img, runs.safe_join(out, rel))  # the image last: it marks the pair finished
            lines.append(json.dumps({"file": rel, "mask": mrel, "class": n, "label": r.classes.index(n), "index": i,
                                     "sample_seed": seed, "mask_source": src,
                                     "good": str(goods[i % len(goods)]) if goods else None, **common}))
        with open(out / ".manifest-part-0.jsonl", "a") as f:  # one write per batch: a kill loses at most it
            f.write("\n".join(lines) + "\n")
    records = sorted(sample._read_records(out).values(), key=lambda rec: (rec["class"], rec["index"]))
    runs.write_text(out / "manifest.jsonl", "".join(json.dumps(rec) + "\n" for rec in records))
    (out / ".manifest-part-0.jsonl").unlink(missing_ok=True)
    return out
