"""Masks for defect synthesis: shapes, inpainting, and a defect detector to check where defects land.

Masks are the run's training masks (moved / rotated / scaled), a PNG, or drawn (ellipse, stroke,
blob); float [1, S, S] in {0, 1}, positions as fractions of the side (x right, y down), angles in
degrees counter-clockwise as shown. ``inpaint``: any run generates inside the mask of a
defect-free image (latent blending every step, optional RePaint resampling, exact pixel
composite). The mask as an input channel of a mask-conditioned model is ``methods.add_mask_channel``
(zero-initialised: step 0 = the base); ``latent_mask`` puts a mask on the latent grid (image grid
for tiny/mini, /8 for DiT-XL). The stage that writes image + mask pairs is ``synthesize.py``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..base import manifest, runs
from ..base.errors import DefectlabError
from ..base.images import load_png, quantised
from ..data import dataset
from . import methods, sampler

KINDS = ("ellipse", "stroke", "blob")
MODES = ("condition", "inpaint")
MAX_COVER = 0.95      # a mask over more of the image leaves no product context and nothing to keep
CARRY_SIDE = 64       # masks.carry searches poses on foregrounds at most this many px wide
DETECT_SIZE = 32      # defect detector's working side: downsampling averages out per-pixel grain
NEEDS = ("file", "mask")   # a synthesized pair is finished when both its files exist


def latent_mask(mask: torch.Tensor, hw, hard: bool = False) -> torch.Tensor:
    """[N,1,S,S] → [N,1,h,w]: area coverage (a thin crack survives /8 as a small value); ``hard``:
    1 wherever any masked pixel falls, so a blended-in region covers the whole mask."""
    hw = tuple(int(v) for v in hw)
    if tuple(mask.shape[-2:]) == hw:
        return mask.float()
    m = F.interpolate(mask.float(), size=hw, mode="area")
    return (m > 0).float() if hard else m


def loss_weights(mask: torch.Tensor, hw, strength: float) -> torch.Tensor:
    """Per-position loss weights ``1 + strength × m`` on the latent grid ``hw``, m the defect
    mask's area coverage there ([N,1,S,S] → [N,1,h,w]; ``train``'s ``--mask-loss``). A defect
    covers a few % of an image, so the plain loss barely sees it; at strength 20 a mark on 2 %
    of the image carries ~30 % of the weight."""
    return 1 + strength * latent_mask(mask, hw)


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


def warp_poses(x: torch.Tensor, src_c, dst_c, angles: torch.Tensor, flips: torch.Tensor, mode: str) -> torch.Tensor:
    """[1,1,S,S] → [A,1,S,S]: pixel p of output a shows x at src_c + F_a R_a^-1 (p - dst_c)."""
    s = x.shape[-1]
    c = (torch.arange(s, dtype=torch.float32) + 0.5)
    py, px = torch.meshgrid(c - dst_c[0], c - dst_c[1], indexing="ij")
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    u = (cos * px + sin * py) * flips[:, None, None]          # rotate by -angle, then mirror x
    v = -sin * px + cos * py
    grid = torch.stack([(u + src_c[1]) / s * 2 - 1, (v + src_c[0]) / s * 2 - 1], -1)
    return F.grid_sample(x.float().expand(len(angles), -1, -1, -1), grid, mode=mode, align_corners=False)


def rotations(step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The poses a search tries: angles (radians) every ``step`` degrees, each plain and mirrored
    (flips 1 / -1), for ``warp_poses``."""
    n = int(round(360 / step))
    angles = torch.deg2rad(torch.arange(n, dtype=torch.float32) * step).repeat(2)
    return angles, torch.tensor([1.0, -1.0]).repeat_interleave(n)


def centroid(f: torch.Tensor) -> tuple[float, float]:
    """``(y, x)`` pixel-centre coordinates of the mean of a non-empty bool foreground [S,S]."""
    ys, xs = torch.nonzero(f, as_tuple=True)
    return float(ys.float().mean()) + 0.5, float(xs.float().mean()) + 0.5


def carry(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor, step: float = 3.0,
          pixels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Move a defect ``mask`` [1,S,S] drawn on image ``source`` onto the same place of the product
    in ``target`` (both [3,S,S]): the rotation (every ``step`` degrees, mirrored or not) and shift
    that best overlay ``source``'s product on ``target``'s (``dataset.foreground``, IoU) move the mask too.
    A scratch on a screw head lands on the other screw's head, whatever the two poses.
    ``pixels``: also return ``source`` moved by the same pose ([3,S,S]): the defect's own pixels
    where the mask lands (the copy-paste baseline, ``paste``)."""
    fs, ft = dataset.foreground(source), dataset.foreground(target)
    if not fs.any() or not ft.any():  # no product found on a plain background: leave the mask where it is
        return (mask.float(), source.float()) if pixels else mask.float()
    cs, ct = centroid(fs), centroid(ft)
    angles, flips = rotations(step)
    f = max(1, fs.shape[-1] // CARRY_SIDE)  # the pose search at ≤ CARRY_SIDE px: poses do not need more
    small = lambda m: F.avg_pool2d(m.float()[None, None], f)[0, 0] if f > 1 else m.float()  # noqa: E731
    moved = warp_poses(small(fs)[None, None], [c / f for c in cs], [c / f for c in ct], angles, flips, "bilinear")[:, 0] > 0.5
    ft = small(ft) > 0.5
    iou = (moved & ft).sum((-2, -1)) / (moved | ft).sum((-2, -1)).clamp(min=1)
    best = int((iou - 0.02 * (flips < 0)).argmax())  # mirrored only where it fits clearly better (symmetric products)
    pose = (cs, ct, angles[best:best + 1], flips[best:best + 1])
    out = warp_poses(mask.reshape(1, 1, *mask.shape[-2:]), *pose, "nearest")[0].float()
    if not pixels:
        return out
    moved = torch.cat([warp_poses(c[None, None], *pose, "bilinear")[0] for c in source.float()])
    return out, moved


def paste(good: torch.Tensor, defect: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The copy-paste baseline: ``defect``'s pixels under ``mask`` on ``good`` (both [3,S,S]),
    nothing else changed — what a generated defect must beat."""
    m = (mask > 0.5).to(good.dtype)
    return good * (1 - m) + defect.to(good.dtype) * m


def deform(mask: torch.Tensor, rng: np.random.Generator, elastic: float = 0.08,
           pixels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A new defect shape from a training mask [1,S,S]: scaled 0.7-1.4x and turned ±40° about its
    own centre (``transform_mask``), then bent by a smooth random displacement of up to ``elastic``
    × the defect's size (elastic deformation, Simard et al. 2003). It stays where the defect type
    occurs; a shape that would vanish keeps the scaled and turned one. ``pixels`` [3,S,S] (the
    defect's own image): moved by the same warp and returned beside the mask, so a copied defect
    can take the new shape."""
    angle, scale = float(rng.uniform(-40, 40)), float(rng.uniform(0.7, 1.4))
    moved = transform_mask(mask, None, None, angle, scale)
    if not moved.any():
        return mask.float() if pixels is None else (mask.float(), pixels.float())
    x0, y0, x1, y1 = bbox(moved)
    s = moved.shape[-1]
    amp = elastic * max(x1 - x0, y1 - y0) * 2 / s  # in grid units ([-1, 1] spans the side)
    coarse = torch.from_numpy(rng.normal(size=(1, 2, 4, 4)).astype(np.float32)) * amp
    flow = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    c = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None] + flow
    out = F.grid_sample(moved.float().reshape(1, 1, s, s), grid, mode="nearest", align_corners=False)[0]
    bent_ok = bool(out.any())
    out = out if bent_ok else moved.float()
    if pixels is None:
        return out
    mx0, my0, mx1, my1 = bbox(mask)  # transform_mask turned the mask about this box's centre
    turned = TF.affine(pixels.float(), angle=-angle, translate=[0.0, 0.0], scale=scale, shear=[0.0, 0.0],
                       interpolation=InterpolationMode.BILINEAR, center=[(mx0 + mx1) / 2, (my0 + my1) / 2])
    bent = F.grid_sample(turned[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    return out, (bent if bent_ok else turned)


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
            guidance: float = sampler.GUIDANCE, scheduler: str = "ddpm", resample: int = 1, scheduler_config: dict | None = None,
            batch_size: int = 16, progress: bool = False, init: torch.Tensor | None = None,
            strength: float = 1.0, detail: bool = False) -> torch.Tensor:
    """Class ``labels[i]`` generated inside ``mask[i]`` on ``good[i]`` ([N,3,S,S] in [-1, 1]);
    outside the mask the result *is* the good image (final composite in pixel space).
    ``init`` [N,3,S,S] and ``strength`` < 1: the mask's content starts from ``init`` (e.g. a pasted
    defect) noised ``strength`` into the schedule and is redrawn from there (SDEdit). ``detail``
    (with ``init``): what the codec loses of ``init`` (``init`` − decode(encode(``init``))) is added
    back, so the model changes the copy's light and colour while the fine structure a small latent
    cannot hold stays as copied (a pixel-space codec loses nothing: no change)."""
    size = good.shape[-1]
    mask = fit_mask(mask, size, "inpainting mask").cpu()
    for m in mask:
        check_mask(m, "inpainting mask")
    known = codec.encode(good.to(next(model.parameters()).device))
    hw = known.shape[-2:]
    cond = latent_mask(mask, hw) if methods.has_mask_channel(model) else None
    start = codec.encode(init.to(known.device)) if init is not None and strength < 1 else None
    out = sampler.generate(model, codec, labels, gens,
                           sampler.Sampling(steps, guidance, scheduler, resample=resample,
                                            strength=strength if start is not None else 1.0),
                           scheduler_config=scheduler_config, batch_size=batch_size, image_size=size,
                           progress=progress, cond=cond, known=known, keep=1 - latent_mask(mask, hw, hard=True),
                           init=start)
    if detail and start is not None:
        lost = init.float().cpu() - codec.decode(start).float().cpu()
        out = (out.float().cpu() + lost).clamp(-1, 1)
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


# ----------------------------------------------------------------------------- a synthesize folder
def summarize(out: Path) -> dict:
    """Metrics of a ``synthesize.run`` output folder, overall and per class (read from its manifest)."""
    out = Path(out)
    cfg = runs.read_json(out / "mask_config.json")
    recs = sorted(manifest.read_records(out, NEEDS).values(), key=lambda r: (r["class"], r["index"]))
    if not recs:
        raise DefectlabError(f"no finished image + mask pairs in {out}")
    size, crop = cfg["image_size"] * cfg.get("zoom", 1), cfg.get("crop", 0)  # the full images a zoom run pastes into
    images = torch.stack([load_png(out / r["file"]) for r in recs])
    mask = torch.stack([load_mask_png(out / r["mask"], size) for r in recs])
    good = (torch.stack([quantised(dataset.load_image(Path(r["good"]), size, crop)) for r in recs])
            if cfg["mode"] == "inpaint" else None)
    pick = lambda c: [j for j, r in enumerate(recs) if r["class"] == c]  # noqa: E731
    per_class = {c: mask_metrics(images[pick(c)], mask[pick(c)], None if good is None else good[pick(c)])
                 for c in sorted({r["class"] for r in recs})}
    return {"mode": cfg["mode"], "mask": cfg["mask"], "run": cfg["run"], "overall": mask_metrics(images, mask, good),
            "per_class": per_class,
            "detector": "median background (1/4-side window at 32 px), deviation > 0.3; see masks.defect_pixels"}
