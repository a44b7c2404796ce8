"""The embedded default dataset: procedural products with localized defects, in MVTec AD layout.

Two products stand in for the real ones: ``hazelnut`` (brown textured nut on a dark background)
and ``screw`` (metal screw on a light background). Each defect class has its own shape AND its
own colour/intensity signature, so a small classifier can tell the classes apart even at
32-64 px, and every changed pixel lies inside the defect's mask.

Everything is drawn with numpy on coordinate grids (no per-pixel Python loops) and driven by one
``numpy.random.Generator`` per image, seeded from (seed, product, class, index): the same seed
gives byte-identical PNGs, whatever order the images are generated in.

The drawers are tables (``PRODUCTS``, ``DEFECTS``) so a new product or defect is one function
plus one row; ``product_image`` and ``draw_defect`` are reused by mask conditioning and by larger
procedural corpora.

Two drawing versions, chosen with ``version=`` on ``product_image``, ``draw_defect`` and
``generate`` (``None`` = ``GENERATOR_VERSION``, the package default): 1 is the original set
above, kept bit for bit; 2 (``synth_v2.py``) varies each product's albedo, texture, lighting
and pose and renders the defects through that appearance, so classes differ by shape rather
than by one colour each. Both use the same classes, parts, layout and per-image seeds.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..base.errors import DefectlabError
from ..base.runs import atomic_write, ensure_dir
from . import synth_v2
from .shapes import capsule as _capsule, disk as _disk, edge as _edge, grid as _grid, pick as _pick, smooth_noise as _smooth_noise

MIN_SIZE = 32           # px: below this the defects no longer fit (or show) on the products
VERSIONS = (1, 2)       # drawing versions: 1 = flat colour-coded defects, 2 = synth_v2 (varied appearance)
GENERATOR_VERSION = 1   # the default drawing version; the embedded dataset's stamp and a judge's record carry
                        # the version drawn, so changing it regenerates stale copies (data.py, judge.py)

# Part labels in the object map returned by ``product_image`` (0 = background). Defects say
# which part they belong on; a product without that part gets them anywhere on the object.
BACKGROUND, BODY, HEAD, NECK, TIP = 0, 1, 2, 3, 4

Array = np.ndarray


# ----------------------------------------------------------------------------- products
def _placed(rng: np.random.Generator, size: int, level: tuple[float, float], grain: float, cells: int,
            shift: float):
    """An even background of brightness ``level`` with smooth grain, and where the object goes:
    its centre (jittered by ``shift`` of the side) and a random in-plane rotation (cos, sin)."""
    y, x = _grid(size)
    s = float(size)
    img = np.full((size, size, 3), rng.uniform(*level), np.float32)
    img += grain * _smooth_noise(rng, size, cells)[..., None]
    cy, cx = (float(v) for v in s / 2 + rng.uniform(-shift, shift, 2) * s)
    theta = rng.uniform(0, 2 * np.pi)
    return y, x, s, img, cy, cx, float(np.cos(theta)), float(np.sin(theta))


def _hazelnut(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    # Dark, slightly uneven background (MVTec hazelnuts lie on black felt).
    y, x, s, img, cy, cx, c, sn = _placed(rng, size, (16, 30), 4, 6, 0.05)
    a = s * rng.uniform(0.29, 0.33)
    b = a * rng.uniform(0.82, 0.92)
    u = ((x - cx) * c + (y - cy) * sn) / a           # long axis, -1 = pointed tip
    v = (-(x - cx) * sn + (y - cy) * c) / b
    r2 = u ** 2 + (v * (1 + 0.2 * u)) ** 2              # egg shape: narrower towards the tip
    obj = r2 < 1
    # Lighting: a sphere lit from a jittered direction, so each nut is shaded differently.
    z = np.sqrt(np.clip(1 - r2, 0, 1))
    lu, lv = (float(v) for v in rng.uniform(-0.5, 0.5, 2))
    shade = 0.45 + 0.55 * np.clip(0.75 * z + lu * u + lv * v, 0, 1)
    # Texture: longitudinal veins plus blotchy noise, both varying per nut.
    veins = 0.10 * np.sin(2 * np.pi * (rng.uniform(5, 8) * v + 0.4 * u * u) + rng.uniform(0, 6.3))
    blotch = 0.08 * _smooth_noise(rng, size, 12) + 0.04 * rng.standard_normal((size, size), np.float32)
    cap = np.where(u < -0.72, np.float32(0.65), np.float32(1.0))  # darker pointed tip
    brown = np.array([150, 96, 52], np.float32) * rng.uniform(0.85, 1.12, 3).astype(np.float32)
    nut = brown * (shade * cap * (1 + veins + blotch))[..., None]
    img = np.where(obj[..., None], nut, img)
    return img, obj.astype(np.uint8) * BODY


def _screw(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x, s, img, cy, cx, c, sn = _placed(rng, size, (185, 212), 5, 5, 0.06)  # MVTec screws lie at any angle
    t = (x - cx) * c + (y - cy) * sn                    # along the axis: head (-) to tip (+)
    w = -(x - cx) * sn + (y - cy) * c                   # across the axis
    half = s * rng.uniform(0.25, 0.28)
    rh, rw = s * 0.085, s * 0.036                       # head and shaft half-widths
    head_len, neck_len, tip_len = s * 0.06, s * 0.10, s * 0.08
    pitch = s * rng.uniform(0.028, 0.034)
    head = (t > -half) & (t < -half + head_len) & (np.abs(w) < rh)
    shaft_t = (t >= -half + head_len) & (t < half - tip_len)
    thread = np.abs(w) < rw * (1 + 0.18 * np.abs(np.sin(np.pi * t / pitch)))
    shaft = shaft_t & thread
    neck = shaft & (t < -half + head_len + neck_len)
    tip = (t >= half - tip_len) & (t < half) & (np.abs(w) < rw * (half - t) / tip_len)
    parts = np.zeros((size, size), np.uint8)
    parts[shaft] = BODY
    parts[neck] = NECK
    parts[head] = HEAD
    parts[tip] = TIP
    # Metal: a cylinder highlight across the axis, thread ridges along it, a grey tint per screw.
    across = np.clip(1 - (w / np.where(head, np.float32(rh), np.float32(rw * 1.2))) ** 2, 0, 1)
    ridges = np.where(head, 0.0, 0.22 * np.sin(2 * np.pi * t / pitch + 0.5 * w / rw))
    grey = np.float32(rng.uniform(95, 130)) * np.array([1.0, 1.0, 1.04], np.float32)
    grain = 0.03 * rng.standard_normal((size, size), np.float32)
    metal = grey * (0.7 + 0.55 * across ** 2 + ridges + grain)[..., None]
    img = np.where((parts > 0)[..., None], metal, img)
    return img, parts


@dataclass(frozen=True)
class Product:
    draw: Callable[[np.random.Generator, int], tuple[Array, Array]]
    defects: tuple[str, ...]
    description: str


PRODUCTS: dict[str, Product] = {
    "hazelnut": Product(_hazelnut, ("crack", "cut", "hole", "print"), "brown textured nut on dark felt"),
    "screw": Product(_screw, ("manipulated_front", "scratch_head", "thread_side", "thread_top"),
                     "metal screw on a light background"),
}


def version_of(version: int | None) -> int:
    """``version``, or the package default for ``None``; an unknown one is a user error."""
    v = GENERATOR_VERSION if version is None else version
    if v not in VERSIONS:
        raise DefectlabError(f"version: synthetic generator version must be one of {', '.join(map(str, VERSIONS))} (got {v!r})")
    return int(v)


def embedded(data: str, version: int | None = None) -> int | None:
    """The drawing version a ``data`` setting names: ``synthetic`` → ``version`` (None: the
    default), ``synthetic-v<N>`` → N (checked); None for anything else (a dataset folder)."""
    named = re.fullmatch(r"synthetic(?:-v(\d+))?", str(data))
    if named is None:
        return None
    if named.group(1) is None:
        return version_of(version)
    if int(named.group(1)) not in VERSIONS:
        raise DefectlabError(f"data: {data} names no drawing version of the embedded dataset "
                             f"(synthetic-v{' or synthetic-v'.join(map(str, VERSIONS))})")
    return int(named.group(1))


def product_image(product: str, rng: np.random.Generator, size: int = 256,
                  version: int | None = None) -> tuple[Array, Array]:
    """A clean product picture: ``(uint8 [H, W, 3], part map uint8 [H, W])``.

    The part map is the object mask (``> 0`` = object) with part labels (``BODY``, ``HEAD``,
    ``NECK``, ``TIP``) that ``draw_defect`` uses to put each defect where it belongs."""
    if product not in PRODUCTS:
        raise DefectlabError(f"unknown synthetic product {product!r}; available: {', '.join(PRODUCTS)}")
    draw = PRODUCTS[product].draw if version_of(version) == 1 else synth_v2.PRODUCTS[product]
    img, parts = draw(rng, int(size))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), parts


# ----------------------------------------------------------------------------- defects
# Each drawer: (rng, y, x, region, size) -> (shape bool [H, W], paint float [H, W, 3]).
# Signatures, so classes differ in shape AND colour: crack = thin jagged near-black line,
# cut = straight wide cream band, hole = dark disk with a pale rim, print = blue ink ring + bar;
# scratch_head = thin white lines, thread_side = black notch on the edge, thread_top = orange
# rust blotch, manipulated_front = bent blue-steel tip sticking out.
def _colour(rng, rgb, jitter=0.08) -> Array:
    return np.asarray(rgb, np.float32) * rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32)


def _crack(rng, y, x, region, s):
    p = _pick(region, rng, int(s * 0.06))
    angle = rng.uniform(0, 2 * np.pi)
    radius = max(1.0, s * rng.uniform(0.008, 0.012))
    shape = np.zeros(region.shape, bool)
    for _ in range(rng.integers(6, 10)):               # a random walk with drifting direction
        angle += rng.uniform(-0.7, 0.7)
        step = s * rng.uniform(0.025, 0.045)
        q = (p[0] + step * np.sin(angle), p[1] + step * np.cos(angle))
        shape |= _capsule(y, x, p, q, radius)
        p = q
    return shape, np.broadcast_to(_colour(rng, (18, 12, 8), 0.2), (*region.shape, 3))


def _cut(rng, y, x, region, s):
    p = _pick(region, rng, int(s * 0.08))
    angle, length = rng.uniform(0, np.pi), s * rng.uniform(0.14, 0.2)
    dy, dx = 0.5 * length * np.sin(angle), 0.5 * length * np.cos(angle)
    radius = s * rng.uniform(0.018, 0.025)
    shape = _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), radius)
    return shape, np.broadcast_to(_colour(rng, (235, 214, 160)), (*region.shape, 3))


def _hole(rng, y, x, region, s):
    radius = s * rng.uniform(0.045, 0.065)
    p = _pick(region, rng, int(radius) + 2)
    d = np.sqrt((y - p[0]) ** 2 + (x - p[1]) ** 2)
    inside, rim = _colour(rng, (25, 20, 16), 0.2), _colour(rng, (205, 168, 118))
    paint = np.where((d < 0.62 * radius)[..., None], inside, rim)
    return d <= radius, paint


def _print(rng, y, x, region, s):
    outer = s * rng.uniform(0.055, 0.075)
    p = _pick(region, rng, int(outer) + 2)
    d = np.sqrt((y - p[0]) ** 2 + (x - p[1]) ** 2)
    ring = (d <= outer) & (d >= outer - max(1.5, s * 0.016))
    angle = rng.uniform(0, np.pi)
    dy, dx = outer * np.sin(angle), outer * np.cos(angle)
    bar = _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), max(1.0, s * 0.009))
    return ring | bar, np.broadcast_to(_colour(rng, (55, 70, 205)), (*region.shape, 3))


def _scratch_head(rng, y, x, region, s):
    shape = np.zeros(region.shape, bool)
    radius = max(1.0, s * 0.008)
    for _ in range(rng.integers(2, 4)):
        p = _pick(region, rng)
        angle, half = rng.uniform(0, np.pi), s * rng.uniform(0.04, 0.07)
        dy, dx = half * np.sin(angle), half * np.cos(angle)
        shape |= _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), radius)
    return shape, np.broadcast_to(_colour(rng, (250, 250, 244), 0.02), (*region.shape, 3))


def _thread_side(rng, y, x, region, s):
    p = _pick(_edge(region), rng)                       # a dent breaking the thread's outline
    shape = _disk(y, x, p, s * rng.uniform(0.028, 0.038))
    return shape, np.broadcast_to(_colour(rng, (22, 22, 28), 0.2), (*region.shape, 3))


def _thread_top(rng, y, x, region, s):
    shape = np.zeros(region.shape, bool)
    for _ in range(rng.integers(3, 6)):                 # an irregular blotch of overlapping spots
        shape |= _disk(y, x, _pick(region, rng), s * rng.uniform(0.018, 0.03))
    return shape, np.broadcast_to(_colour(rng, (190, 96, 38)), (*region.shape, 3))


def _manipulated_front(rng, y, x, region, s):
    p = _pick(region, rng)
    angle = rng.uniform(0, 2 * np.pi)
    q = (p[0] + s * 0.06 * np.sin(angle), p[1] + s * 0.06 * np.cos(angle))
    r = (q[0] + s * 0.04 * np.sin(angle + 1.2), q[1] + s * 0.04 * np.cos(angle + 1.2))
    radius = s * rng.uniform(0.018, 0.024)
    shape = _capsule(y, x, p, q, radius) | _capsule(y, x, q, r, radius * 0.8)
    return shape, np.broadcast_to(_colour(rng, (60, 72, 130)), (*region.shape, 3))


@dataclass(frozen=True)
class Defect:
    draw: Callable
    part: int            # preferred part label; falls back to the whole object
    clip: bool = True    # keep the defect on the object (False: it may stick out, e.g. a bent tip)
    alpha: float = 1.0   # ink is slightly translucent


DEFECTS: dict[str, Defect] = {
    "crack": Defect(_crack, BODY),
    "cut": Defect(_cut, BODY),
    "hole": Defect(_hole, BODY),
    "print": Defect(_print, BODY, alpha=0.85),
    "scratch_head": Defect(_scratch_head, HEAD),
    "thread_side": Defect(_thread_side, BODY, clip=False),
    "thread_top": Defect(_thread_top, NECK),
    "manipulated_front": Defect(_manipulated_front, TIP, clip=False),
}


def draw_defect(img: Array, defect: str, rng: np.random.Generator,
                mask_region: Array | None = None, version: int | None = None) -> tuple[Array, Array]:
    """Paint ``defect`` onto a copy of ``img`` (uint8 [H, W, 3]): ``(new image, mask bool [H, W])``.

    ``mask_region`` says where the defect may go: a boolean mask, or a part map from
    ``product_image`` (the defect then lands on its own part). ``None`` = the central half.
    Only pixels inside the returned mask change. Version 2 reads the light and the local colour
    off ``img`` (the object: the part map's non-zero pixels, else the region) and paints through them."""
    if defect not in DEFECTS:
        raise DefectlabError(f"unknown synthetic defect {defect!r}; available: {', '.join(DEFECTS)}")
    v1 = version_of(version) == 1
    spec = DEFECTS[defect] if v1 else synth_v2.DEFECTS[defect]
    h, w = img.shape[:2]
    if mask_region is None:
        region = np.zeros((h, w), bool)
        region[h // 4: h - h // 4, w // 4: w - w // 4] = True
    elif mask_region.dtype == bool:
        region = mask_region
    else:
        own = mask_region == spec.part
        region = own if own.any() else mask_region > 0
    if not region.any():
        raise DefectlabError(f"no room for defect {defect!r}: the region mask is empty")
    y, x = _grid(h) if h == w else np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    extra = () if v1 else (synth_v2.look(img, region if mask_region is None or mask_region.dtype == bool
                                         else mask_region > 0),)
    for _ in range(8):  # retry placements that would mostly fall off the region
        shape, paint = spec.draw(rng, y, x, region, float(min(h, w)), *extra)
        kept = shape & region if spec.clip else shape
        if kept.sum() >= 0.6 * shape.sum() and kept.any():
            break
    out = img.copy()
    alpha = spec.alpha if v1 else 1.0
    blend = img[kept].astype(np.float32) * (1 - alpha) + paint[kept] * alpha
    out[kept] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)  # only masked pixels change
    return out, kept


# ----------------------------------------------------------------------------- dataset
def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """One generator per image, independent of generation order (crc32 is stable across runs)."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def _save(array: Array, path: Path) -> None:
    # atomic: a full disk or a kill leaves whole PNGs only; PNG bytes are deterministic at any level
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", compress_level=1))


def generate(out: Path, seed: int = 0, size: int = 256, per_class: int = 20, good: int = 20,
             products: tuple[str, ...] = ("hazelnut", "screw"), version: int | None = None) -> Path:
    """Write a dataset in MVTec AD layout under ``out`` and return ``out``:
    ``<product>/train/good/NNN.png`` (``good`` images), ``<product>/test/good/`` (a few),
    ``<product>/test/<defect>/NNN.png`` (``per_class`` each) and
    ``<product>/ground_truth/<defect>/NNN_mask.png`` (0/255), drawn with ``version``
    (``None``: ``GENERATOR_VERSION``); the per-image seeds are the same in every version."""
    out = Path(out)
    version = version_of(version)
    if size < MIN_SIZE:
        raise DefectlabError(f"size must be at least {MIN_SIZE} px (got {size}): smaller pictures cannot hold the defects")
    if per_class < 1 or good < 0:
        raise DefectlabError(f"per_class must be ≥ 1 and good ≥ 0 (got {per_class}, {good})")
    ensure_dir(out, "--out")
    for product in products:
        if product not in PRODUCTS:
            raise DefectlabError(f"unknown synthetic product {product!r}; available: {', '.join(PRODUCTS)}")
        root = out / product
        for split, count in (("train", good), ("test", max(2, good // 5))):
            for i in range(count):
                img, _ = product_image(product, _rng(seed, product, split, "good", i), size, version)
                _save(img, root / split / "good" / f"{i:03d}.png")
        for defect in PRODUCTS[product].defects:
            for i in range(per_class):
                rng = _rng(seed, product, "test", defect, i)
                clean, parts = product_image(product, rng, size, version)
                img, mask = draw_defect(clean, defect, rng, parts, version)
                _save(img, root / "test" / defect / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out
