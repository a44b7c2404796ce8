"""The pre-training corpus of ``defectlab-mini``: many procedural product types, regenerated from a seed.

It plays ImageNet's role for the small shipped base model: 18 product types (nut, screw, pill,
washer, cable, fabric, wood, …) drawn with random pose, colour, lighting and background, each
either good or with one *generic* defect (stain, missing chunk, scuff, specks, fold, smear). A
class is a (product, defect) pair — ``nut``, ``nut_stain``, ``nut_fold``, … — the way ImageNet has
fine-grained classes that differ in a detail: the base has to learn that a class embedding
controls a small local mark, which is exactly what a few-shot defect class asks of it (version 1
had one class per product and put the marks at random, so no class ever meant a mark). The
embedded dataset's own defect drawers (crack, cut, hole, print, scratch_head, thread_side,
thread_top, manipulated_front) are never used, and its products are not either: ``nut`` and
``screw`` are look-alike classes (a walnut-ish nut, a hex bolt), the way ImageNet has
"buckeye" (990) and "screw" (783) but no MVTec hazelnut — they are the anchors for
``--class-init anchor`` (``ANCHORS``).

Nothing is stored: ``image(i, seed)`` draws item ``i`` from its own ``numpy`` generator, seeded
from (seed, i) only, so the corpus is byte-identical whatever order or process draws it. The
class of item ``i`` is ``i % len(CLASSES)`` (consecutive items are balanced over classes).
Pictures are drawn at 2x and box-downsampled (anti-aliased edges, like the resized dataset).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .shapes import capsule as _capsule, disk as _disk, edge as _edge, grid as _grid, pick as _pick, smooth_noise as _smooth_noise

CORPUS_VERSION = 2   # bump whenever a picture changes: the model card records it

Array = np.ndarray


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(b"defectlab-corpus"), int(index)])


def _col(rng, rgb, jitter=0.15) -> Array:
    return np.asarray(rgb, np.float32) * rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32)


def _background(rng, s, dark: bool | None = None) -> Array:
    dark = rng.random() < 0.5 if dark is None else dark
    level = rng.uniform(10, 60) if dark else rng.uniform(150, 225)
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    img = np.full((s, s, 3), level, np.float32) * tint
    return img + rng.uniform(2, 8) * _smooth_noise(rng, s, int(rng.integers(3, 8)))[..., None]


def _frame(rng, s):
    """Centre, rotation and local coordinates (u along the axis, v across) of an object."""
    y, x = _grid(s)
    cy, cx = (float(v) for v in s / 2 + rng.uniform(-0.08, 0.08, 2) * s)
    th = rng.uniform(0, 2 * np.pi)
    c, sn = float(np.cos(th)), float(np.sin(th))
    return y, x, (x - cx) * c + (y - cy) * sn, -(x - cx) * sn + (y - cy) * c


def _shade(rng, u, v, r2) -> Array:
    z = np.sqrt(np.clip(1 - r2, 0, 1))
    lu, lv = (float(t) for t in rng.uniform(-0.5, 0.5, 2))
    return 0.5 + 0.5 * np.clip(0.8 * z + lu * u + lv * v, 0, 1)


# ----------------------------------------------------------------------------- products
# Each: (rng, size) -> (float image [S, S, 3] 0..255, object mask bool [S, S]).
def _nut(rng, s):   # walnut-like: rounder than the dataset's hazelnut, wrinkled, lighter shell
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    a = s * rng.uniform(0.22, 0.34)
    b = a * rng.uniform(0.75, 0.98)
    r2 = (u / a) ** 2 + (v / b) ** 2
    obj = r2 < 1
    wrinkle = 0.15 * np.sin(rng.uniform(10, 18) * np.sqrt(r2) + 3 * _smooth_noise(rng, s, 10))
    seam = np.where(np.abs(v / b) < 0.06, np.float32(0.6), np.float32(1.0))
    colour = _col(rng, (170, 120, 70), 0.2)
    nut = colour * (_shade(rng, u / a, v / b, r2) * seam * (1 + wrinkle))[..., None]
    return np.where(obj[..., None], nut, img), obj


def _screw(rng, s):  # hex bolt: flat hex head, straight thread, no pointed tip
    img = _background(rng, s, dark=rng.random() < 0.3)
    y, x, u, v = _frame(rng, s)
    half = s * rng.uniform(0.22, 0.34)
    hw, rw = s * rng.uniform(0.09, 0.12), s * rng.uniform(0.03, 0.045)
    head = (u > -half) & (u < -half + s * 0.07) & (np.abs(v) < hw)
    pitch = s * rng.uniform(0.03, 0.05)
    shaft = (u >= -half) & (u < half) & (np.abs(v) < rw * (1 + 0.15 * np.abs(np.sin(np.pi * u / pitch))))
    obj = head | shaft
    across = np.clip(1 - (v / np.where(head, np.float32(hw), np.float32(rw * 1.2))) ** 2, 0, 1)
    ridges = np.where(head, 0.0, 0.18 * np.sin(2 * np.pi * u / pitch))
    metal = _col(rng, (140, 140, 145), 0.25) * (0.6 + 0.5 * across + ridges)[..., None]
    return np.where(obj[..., None], metal, img), obj


def _pill(rng, s):
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    a, b = s * rng.uniform(0.2, 0.32), s * rng.uniform(0.1, 0.16)
    r2 = (u / a) ** 2 + (v / b) ** 2
    obj = r2 < 1
    body = _col(rng, rng.choice([(235, 235, 230), (230, 200, 120), (200, 90, 80), (150, 190, 230)]), 0.1)
    speck = 1 + 0.05 * rng.standard_normal((s, s)).astype(np.float32)
    pill = body * (_shade(rng, u / a, v / b, r2) * speck)[..., None]
    return np.where(obj[..., None], pill, img), obj


def _capsule_pill(rng, s):  # two-colour gel capsule
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    half, r = s * rng.uniform(0.18, 0.28), s * rng.uniform(0.08, 0.12)
    d2 = (np.clip(np.abs(u) - half, 0, None) ** 2 + v ** 2) / r ** 2
    obj = d2 < 1
    c1, c2 = _col(rng, rng.uniform(40, 240, 3)), _col(rng, rng.uniform(40, 240, 3))
    body = np.where((u < 0)[..., None], c1, c2)
    cap = body * (0.55 + 0.6 * np.sqrt(np.clip(1 - (v / r) ** 2, 0, 1)))[..., None]
    return np.where(obj[..., None], cap, img), obj


def _washer(rng, s):
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    d = np.sqrt(u ** 2 + v ** 2)
    ro = s * rng.uniform(0.24, 0.36)
    ri = ro * rng.uniform(0.35, 0.6)
    obj = (d < ro) & (d > ri)
    rings = 1 + 0.08 * np.sin(d * rng.uniform(1.0, 2.0))
    angle = np.arctan2(v, u)
    metal = _col(rng, (150, 150, 150), 0.3) * ((0.7 + 0.3 * np.cos(angle + rng.uniform(0, 6.3))) * rings)[..., None]
    return np.where(obj[..., None], metal, img), obj


def _cable(rng, s):  # cross-section: three coloured cores in a grey sheath
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    R = s * rng.uniform(0.3, 0.4)
    d = np.sqrt(u ** 2 + v ** 2)
    obj = d < R
    out = np.where(obj[..., None], _col(rng, (120, 125, 120), 0.3) * (0.8 + 0.2 * (1 - d / R))[..., None], img)
    cores = [(50, 160, 60), (40, 80, 200), (110, 70, 40), (200, 200, 40), (200, 60, 50)]
    rot = rng.uniform(0, 2 * np.pi)
    for k, j in enumerate(rng.permutation(len(cores))[:3]):
        a = rot + 2 * np.pi * k / 3
        cu, cv = 0.45 * R * np.cos(a), 0.45 * R * np.sin(a)
        core = (u - cu) ** 2 + (v - cv) ** 2 < (0.38 * R) ** 2
        wire = (u - cu) ** 2 + (v - cv) ** 2 < (0.18 * R) ** 2
        out = np.where(core[..., None], _col(rng, cores[j], 0.1), out)
        out = np.where(wire[..., None], _col(rng, (190, 120, 70), 0.1), out)
    return out, obj


def _full(s) -> Array:
    return np.ones((s, s), bool)


def _fabric(rng, s):  # plain weave
    y, x, u, v = _frame(rng, s)
    p = s * rng.uniform(0.04, 0.08)
    weave = np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p)
    colour = _col(rng, rng.uniform(40, 220, 3), 0.05)
    img = colour * (0.85 + 0.15 * weave + 0.05 * _smooth_noise(rng, s, 8))[..., None]
    return img, _full(s)


def _carpet(rng, s):  # fuzzy pile
    colour = _col(rng, rng.uniform(40, 200, 3), 0.05)
    fuzz = 0.12 * rng.standard_normal((s, s)).astype(np.float32) + 0.1 * _smooth_noise(rng, s, 16)
    return colour * (1 + fuzz)[..., None], _full(s)


def _wood(rng, s):
    y, x, u, v = _frame(rng, s)
    warp = 3.0 * _smooth_noise(rng, s, 4)
    grain = np.sin(2 * np.pi * (v / (s * rng.uniform(0.05, 0.1)) + warp))
    colour = _col(rng, (160, 110, 60), 0.2)
    return colour * (0.8 + 0.15 * grain + 0.05 * _smooth_noise(rng, s, 20))[..., None], _full(s)


def _tile(rng, s):  # ceramic tiles with grout lines
    y, x, u, v = _frame(rng, s)
    p = s * rng.uniform(0.2, 0.4)
    grout = (np.abs(((u / p) % 1) - 0.5) > 0.46) | (np.abs(((v / p) % 1) - 0.5) > 0.46)
    tile = _col(rng, rng.uniform(60, 230, 3), 0.05) * (1 + 0.04 * _smooth_noise(rng, s, 12))[..., None]
    return np.where(grout[..., None], _col(rng, (90, 90, 90), 0.3), tile), _full(s)


def _leather(rng, s):
    cells = np.abs(_smooth_noise(rng, s, 24)) + 0.5 * np.abs(_smooth_noise(rng, s, 12))
    colour = _col(rng, rng.choice([(90, 50, 30), (40, 35, 30), (150, 100, 60)]), 0.15)
    return colour * (0.75 + 0.25 * np.clip(cells, 0, 1.5))[..., None], _full(s)


def _metal_plate(rng, s):  # brushed metal
    y, x, u, v = _frame(rng, s)
    streak = np.asarray(rng.standard_normal(s * 4), np.float32)
    idx = np.clip(((v / s + 1) * s * 2).astype(int), 0, s * 4 - 1)
    grey = _col(rng, (165, 165, 170), 0.15)
    return grey * (0.9 + 0.05 * streak[idx] + 0.05 * _smooth_noise(rng, s, 3))[..., None], _full(s)


def _grid_mesh(rng, s):  # wire mesh over a background
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    p, w = s * rng.uniform(0.1, 0.2), rng.uniform(0.08, 0.18)
    wire = (np.abs(((u / p) % 1) - 0.5) > 0.5 - w) | (np.abs(((v / p) % 1) - 0.5) > 0.5 - w)
    return np.where(wire[..., None], _col(rng, (170, 170, 160), 0.3), img), wire


def _chip(rng, s):  # a dark IC package with legs
    img = _background(rng, s, dark=False)
    y, x, u, v = _frame(rng, s)
    a, b = s * rng.uniform(0.15, 0.25), s * rng.uniform(0.12, 0.2)
    body = (np.abs(u) < a) & (np.abs(v) < b)
    pitch = a * 2 / int(rng.integers(3, 7))
    legs = (np.abs(u) < a) & (np.abs(v) >= b) & (np.abs(v) < b + s * 0.08) & ((u + a) % pitch < pitch * 0.5)
    out = np.where(legs[..., None], _col(rng, (200, 200, 205), 0.1), img)
    out = np.where(body[..., None], _col(rng, (35, 35, 40), 0.2) * (1 + 0.05 * _smooth_noise(rng, s, 6))[..., None], out)
    return out, body | legs


def _bottle(rng, s):  # bottle seen from above: rim, neck, shadowed inside
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    d = np.sqrt(u ** 2 + v ** 2)
    R = s * rng.uniform(0.3, 0.42)
    obj = d < R
    glass = _col(rng, rng.choice([(60, 110, 50), (110, 70, 30), (170, 180, 180)]), 0.15)
    tone = np.where(d < 0.35 * R, 0.35, np.where(d < 0.55 * R, 1.1, 0.75 + 0.25 * np.cos(d / R * 6)))
    return np.where(obj[..., None], glass * tone[..., None], img), obj


def _zipper(rng, s):
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    tape = np.abs(v) < s * rng.uniform(0.2, 0.3)
    p = s * rng.uniform(0.05, 0.08)
    teeth = (np.abs(v) < s * 0.06) & (((u / p) % 1 < 0.5) ^ (v > 0))
    out = np.where(tape[..., None], _col(rng, rng.uniform(20, 200, 3), 0.05), img)
    return np.where(teeth[..., None], _col(rng, (190, 175, 120), 0.2), out), tape


def _gear(rng, s):
    img = _background(rng, s)
    y, x, u, v = _frame(rng, s)
    d, ang = np.sqrt(u ** 2 + v ** 2), np.arctan2(v, u)
    R = s * rng.uniform(0.25, 0.35)
    teeth = int(rng.integers(8, 16))
    rim = R * (1 + 0.12 * (np.cos(teeth * ang) > 0))
    obj = (d < rim) & (d > R * rng.uniform(0.15, 0.3))
    metal = _col(rng, (150, 140, 120), 0.3) * (0.75 + 0.25 * np.cos(ang + rng.uniform(0, 6.3)))[..., None]
    return np.where(obj[..., None], metal, img), obj


def _bead(rng, s):  # a pile of small spheres
    img = _background(rng, s)
    y, x = _grid(s)
    obj = np.zeros((s, s), bool)
    colour = _col(rng, rng.uniform(50, 240, 3), 0.1)
    for _ in range(int(rng.integers(3, 8))):
        c = s / 2 + rng.uniform(-0.25, 0.25, 2) * s
        r = s * rng.uniform(0.07, 0.13)
        r2 = ((y - c[0]) ** 2 + (x - c[1]) ** 2) / r ** 2
        ball = r2 < 1
        img = np.where(ball[..., None], colour * _shade(rng, (x - c[1]) / r, (y - c[0]) / r, r2)[..., None], img)
        obj |= ball
    return img, obj


PRODUCTS = {  # order fixes the class ids (PAIRS below); never reorder, only append (and bump CORPUS_VERSION)
    "nut": _nut, "screw": _screw, "pill": _pill, "capsule": _capsule_pill, "washer": _washer,
    "cable": _cable, "fabric": _fabric, "carpet": _carpet, "wood": _wood, "tile": _tile,
    "leather": _leather, "metal_plate": _metal_plate, "mesh": _grid_mesh, "chip": _chip,
    "bottle": _bottle, "zipper": _zipper, "gear": _gear, "beads": _bead,
}


# ----------------------------------------------------------------------------- generic defects
# Each: (rng, img float, obj bool, s) -> (shape bool, paint float [S,S,3] or None = darken/lighten)
def _stain(rng, img, obj, s):
    y, x = _grid(s)
    c = _pick(obj, rng)
    r = s * rng.uniform(0.06, 0.14)
    blob = (np.sqrt((y - c[0]) ** 2 + (x - c[1]) ** 2) / r + 0.5 * _smooth_noise(rng, s, 8)) < 1
    tint = _col(rng, rng.uniform(30, 230, 3), 0.0)
    return blob, 0.5 * img + 0.5 * tint


def _missing(rng, img, obj, s):  # a chunk broken off the outline: background shows through
    y, x = _grid(s)
    e = _edge(obj) if not obj.all() else np.ones_like(obj)
    c = _pick(e, rng)
    shape = _disk(y, x, c, s * rng.uniform(0.05, 0.1))
    return shape, _background(rng, s)


def _scuff(rng, img, obj, s):  # a rough patch of changed brightness
    y, x, u, v = _frame(rng, s)
    c = _pick(obj, rng)
    a, b = s * rng.uniform(0.05, 0.12), s * rng.uniform(0.03, 0.06)
    cu = (x - c[1]) * 0.6 - (y - c[0]) * 0.8
    cv = (x - c[1]) * 0.8 + (y - c[0]) * 0.6
    shape = (np.abs(cu) < a) & (np.abs(cv) < b)
    gain = rng.choice([0.6, 1.4]) * (1 + 0.2 * rng.standard_normal((s, s)).astype(np.float32))
    return shape, img * gain[..., None]


def _specks(rng, img, obj, s):
    y, x = _grid(s)
    shape = np.zeros((s, s), bool)
    for _ in range(int(rng.integers(4, 12))):
        shape |= _disk(y, x, _pick(obj, rng), s * rng.uniform(0.008, 0.018))
    return shape, np.broadcast_to(_col(rng, rng.choice([(80, 160, 70), (200, 40, 160), (240, 220, 60)]), 0.1),
                                  (s, s, 3))


def _fold(rng, img, obj, s):  # a long wavy crease: a light and a dark edge side by side
    y, x = _grid(s)
    p = _pick(obj, rng)
    ang = rng.uniform(0, np.pi)
    q = (p[0] + 0.3 * s * np.sin(ang), p[1] + 0.3 * s * np.cos(ang))
    p0 = (p[0] - 0.3 * s * np.sin(ang), p[1] - 0.3 * s * np.cos(ang))
    w = s * rng.uniform(0.012, 0.02)
    dark = _capsule(y, x, p0, q, w)
    off = (w * 1.6 * np.cos(ang), -w * 1.6 * np.sin(ang))
    light = _capsule(y, x, (p0[0] + off[0], p0[1] + off[1]), (q[0] + off[0], q[1] + off[1]), w) & ~dark
    return dark | light, np.where(dark[..., None], img * 0.55, img * 1.35)


def _smear(rng, img, obj, s):  # a smeared swipe, blurred colour along a stroke
    y, x = _grid(s)
    p = _pick(obj, rng)
    ang = rng.uniform(0, 2 * np.pi)
    L = s * rng.uniform(0.1, 0.2)
    q = (p[0] + L * np.sin(ang), p[1] + L * np.cos(ang))
    shape = _capsule(y, x, p, q, s * rng.uniform(0.03, 0.05))
    return shape, 0.4 * img + 0.6 * _col(rng, rng.uniform(20, 120, 3), 0.1) * (1 + 0.3 * _smooth_noise(rng, s, 12))[..., None]


DEFECTS = {"stain": _stain, "missing": _missing, "scuff": _scuff, "specks": _specks, "fold": _fold, "smear": _smear}

# ----------------------------------------------------------------------------- classes
# class id → (product, "good" | defect), product-major: nut, nut_stain, …, nut_smear, screw, …
PAIRS = [(p, d) for p in PRODUCTS for d in ("good", *DEFECTS)]
CLASSES = [p if d == "good" else f"{p}_{d}" for p, d in PAIRS]
# embedded-dataset product → corpus class id of its good look-alike (ImageNet: hazelnut→990, screw→783)
ANCHORS = {"hazelnut": CLASSES.index("nut"), "screw": CLASSES.index("screw")}


# ----------------------------------------------------------------------------- items
def _draw(index: int, seed: int, size: int) -> tuple[Array, int, str, Array]:
    """Item ``index`` and its defect's coverage per pixel (float32 [size, size] in [0, 1]; 0 for good)."""
    k = int(index) % len(CLASSES)
    product, defect = PAIRS[k]
    rng = _rng(seed, index)
    s = 2 * int(size)                     # drawn at 2x, box-downsampled: anti-aliased edges
    img, obj = PRODUCTS[product](rng, s)
    shape = np.zeros((s, s), bool)
    if defect != "good":
        shape, paint = DEFECTS[defect](rng, img, obj if obj.any() else np.ones_like(obj), s)
        img = np.where(shape[..., None], paint, img)
    img = np.clip(img, 0, 255).reshape(size, 2, size, 2, 3).mean((1, 3))
    return np.rint(img).astype(np.uint8), k, defect, shape.reshape(size, 2, size, 2).mean((1, 3), dtype=np.float32)


def item(index: int, seed: int = 0, size: int = 64) -> tuple[Array, int, str]:
    """Corpus item ``index``: ``(uint8 [size, size, 3], class id, defect name or "good")``."""
    return _draw(index, seed, size)[:3]


def batch(start: int, count: int, seed: int = 0, size: int = 64, masks: bool = False):
    """Items ``start .. start+count-1`` as ``(float32 [count, 3, size, size] in [-1, 1], labels)``;
    with ``masks``, also each defect's coverage ``[count, 1, size, size]`` (pre-training's
    ``--mask-loss``, as the fine-tune weights its defect masks)."""
    drawn = [_draw(i, seed, size) for i in range(start, start + count)]
    x = torch.from_numpy(np.stack([d[0] for d in drawn])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.tensor([d[1] for d in drawn])
    return (x, labels, torch.from_numpy(np.stack([d[3] for d in drawn]))[:, None]) if masks else (x, labels)
