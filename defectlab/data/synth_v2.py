"""Generator version 2 of the embedded procedural dataset: products whose appearance varies per
image, and defects rendered *through* that appearance (``synth.py`` dispatches here on
``version=2``; version 1 stays in ``synth.py``, bit for bit).

Per image: albedo (hue, saturation, brightness), texture (veins / blotches / grain of random
strength and scale), lighting (direction, elevation, strength, ambient, specular highlight),
pose (position, rotation, size, aspect) and exposure / white balance. Defects take their colour
from the pixels they land on and the light read off the product: a crack darkens the local
colour with a lit lip on the side away from the light, a hole is a shadowed pit whose dark wall
faces the light, a cut exposes paler flesh of the local colour shaded by its facet, a print
is ink of a random hue multiplied into the local texture; on the screw, scratches catch the
light, a thread-side dent bites the outline (background shows through), a thread-top patch
mottles the local metal, a bent tip is metal shaded like the screw. Classes therefore differ
by shape and structure, not by a fixed colour, and a defect cut from one image and pasted onto
another carries the wrong colour and lighting at its border.

Same conventions as version 1: ``(rng, size) -> (float image [H, W, 3], part map)`` drawers,
defect drawers ``(rng, y, x, region, s, look) -> (shape, paint)``, only masked pixels change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .shapes import capsule as _capsule, edge as _edge, grid as _grid, pick as _pick, smooth_noise as _noise

Array = np.ndarray
BACKGROUND, BODY, HEAD, NECK, TIP = 0, 1, 2, 3, 4   # the part labels of synth.py


# ----------------------------------------------------------------------------- primitives
def _shift(mask: Array, dy: int, dx: int) -> Array:
    """``mask`` moved by (dy, dx) px, without wrapping."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def _hsv(h: float, s: float, v: float) -> Array:
    """One HSV colour (h in turns) as RGB floats in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _light(rng: np.random.Generator) -> tuple[Array, float, float, float]:
    """A light direction (unit, (y, x, z)), its strength, the ambient level and the specular weight."""
    phi, elev = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.85)
    d = np.array([elev * np.sin(phi), elev * np.cos(phi), np.sqrt(1 - elev * elev)], np.float32)
    return d, float(rng.uniform(0.55, 1.0)), float(rng.uniform(0.15, 0.4)), float(rng.uniform(0.05, 0.4))


def _expose(rng: np.random.Generator, img: Array) -> Array:
    """Exposure and white balance of the whole picture: per-channel gain."""
    return img * (rng.uniform(0.8, 1.15) * rng.uniform(0.96, 1.04, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- products
def _background(rng, size, level, tint, grain) -> Array:
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(*level) * (1 + rng.uniform(-tint, tint, 3)).astype(np.float32)
    return img + grain * rng.uniform(0.5, 1.5) * _noise(rng, size, int(rng.integers(4, 9)))[..., None]


def _placed(rng: np.random.Generator, size: int, level, tint: float, grain: float, shift: float):
    """The start every product drawer shares, in one RNG order: pixel grid, side, the background,
    the product's centre (within ``shift`` × side of the middle) and its turn (cos, sin)."""
    y, x = _grid(size)
    s = float(size)
    img = _background(rng, size, level, tint, grain)
    cy, cx = (float(v) for v in s / 2 + rng.uniform(-shift, shift, 2) * s)
    theta = rng.uniform(0, 2 * np.pi)
    return y, x, s, img, cy, cx, float(np.cos(theta)), float(np.sin(theta))


def hazelnut(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x, s, img, cy, cx, c, sn = _placed(rng, size, (8, 40), 0.12, 4, 0.07)
    a = s * rng.uniform(0.26, 0.34)
    b = a * rng.uniform(0.76, 0.95)
    u = ((x - cx) * c + (y - cy) * sn) / a
    v = (-(x - cx) * sn + (y - cy) * c) / b
    r2 = u ** 2 + (v * (1 + rng.uniform(0.1, 0.3) * u)) ** 2
    obj = r2 < 1
    z = np.sqrt(np.clip(1 - r2, 0, 1))
    light, strength, ambient, spec = _light(rng)
    ny, nx = (y - cy) / a, (x - cx) / a                  # sphere-like normals in image axes
    norm = np.sqrt(ny ** 2 + nx ** 2 + z ** 2) + 1e-6
    ny, nx, nz = ny / norm, nx / norm, z / norm
    lam = np.clip(ny * light[0] + nx * light[1] + nz * light[2], 0, 1)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    hl = np.clip(ny * half[0] + nx * half[1] + nz * half[2], 0, 1)
    shade = ambient + strength * lam
    veins = rng.uniform(0.02, 0.09) * np.sin(2 * np.pi * (rng.uniform(4, 9) * v + 0.4 * u * u) + rng.uniform(0, 6.3))
    blotch = rng.uniform(0.03, 0.12) * _noise(rng, size, int(rng.integers(6, 18)))
    grain = rng.uniform(0.02, 0.07) * rng.standard_normal((size, size), np.float32)
    cap = 1 - rng.uniform(0.15, 0.5) * np.clip((-u - rng.uniform(0.6, 0.75)) / 0.15, 0, 1)  # darker pointed tip
    albedo = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.85)) * 255
    nut = albedo * (shade * cap * (1 + veins + blotch + grain))[..., None]
    nut += (spec * 255 * hl ** rng.uniform(12, 40))[..., None]
    img = np.where(obj[..., None], nut, img)
    return _expose(rng, img), obj.astype(np.uint8) * BODY


def screw(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x, s, img, cy, cx, c, sn = _placed(rng, size, (150, 225), 0.02, 5, 0.06)
    t = (x - cx) * c + (y - cy) * sn
    w = -(x - cx) * sn + (y - cy) * c
    half = s * rng.uniform(0.23, 0.29)
    rh, rw = s * rng.uniform(0.075, 0.095), s * rng.uniform(0.032, 0.04)
    head_len, neck_len, tip_len = s * rng.uniform(0.05, 0.07), s * 0.10, s * rng.uniform(0.07, 0.09)
    pitch = s * rng.uniform(0.026, 0.036)
    head = (t > -half) & (t < -half + head_len) & (np.abs(w) < rh)
    shaft = (t >= -half + head_len) & (t < half - tip_len) & (
        np.abs(w) < rw * (1 + 0.18 * np.abs(np.sin(np.pi * t / pitch))))
    neck = shaft & (t < -half + head_len + neck_len)
    tip = (t >= half - tip_len) & (t < half) & (np.abs(w) < rw * (half - t) / tip_len)
    parts = np.zeros((size, size), np.uint8)
    parts[shaft], parts[neck], parts[head], parts[tip] = BODY, NECK, HEAD, TIP
    light, strength, ambient, spec = _light(rng)
    # a cylinder along the axis: across-axis normal (w), lit from the light's across component
    across = np.clip(w / np.where(head, np.float32(rh), np.float32(rw * 1.2)), -1, 1)
    nz = np.sqrt(1 - across ** 2)
    lw = float(-light[1] * sn + light[0] * c)            # light's component across the axis
    lam = np.clip(across * lw + nz * light[2], 0, 1)
    ridges = np.where(head, 0.0, rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * t / pitch + 0.5 * w / rw))
    grey = np.float32(rng.uniform(75, 150)) * (1 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    grain = rng.uniform(0.015, 0.05) * rng.standard_normal((size, size), np.float32)
    metal = grey * (ambient + 1.1 * strength * lam + ridges + grain)[..., None]
    metal += (spec * 255 * np.clip(across * lw + nz * light[2], 0, 1) ** rng.uniform(15, 50))[..., None]
    img = np.where((parts > 0)[..., None], metal, img)
    return _expose(rng, img), parts


PRODUCTS = {"hazelnut": hazelnut, "screw": screw}


# ----------------------------------------------------------------------------- reading the product
@dataclass(frozen=True)
class Look:
    """What a defect reads off the picture it is drawn on."""
    img: Array          # float32 [H, W, 3], the picture
    local: Array        # float32 [H, W, 3], its blurred colour (texture removed)
    light: tuple        # unit (dy, dx) towards the brighter side of the object
    contrast: float     # 0..1, how strongly the object is shaded
    background: Array   # RGB of the background (median outside the object)


def look(img: Array, obj: Array) -> Look:
    """Lighting and local colour of ``img`` (uint8), read from its pixels: the light points from
    the object's centroid to its luminance-weighted centroid."""
    f = img.astype(np.float32)
    local = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(max(1.0, img.shape[0] / 64))),
                       np.float32)
    lum = f.mean(-1)
    ys, xs = np.nonzero(obj)
    if len(ys) < 4:
        return Look(f, local, (0.0, 1.0), 0.5, np.median(f.reshape(-1, 3), axis=0))
    wgt = lum[ys, xs] - lum[ys, xs].mean()
    d = np.array([(wgt * ys).sum(), (wgt * xs).sum()]) / max(np.abs(wgt).sum(), 1e-6)
    n = float(np.hypot(*d))
    lo, hi = np.percentile(lum[ys, xs], (10, 90))
    bg = np.median(f[~obj], axis=0) if (~obj).any() else np.full(3, 128.0, np.float32)
    return Look(f, local, (float(d[0] / n), float(d[1] / n)) if n > 1e-3 else (0.0, 1.0),
                float(np.clip((hi - lo) / max(hi, 1.0), 0, 1)), bg.astype(np.float32))


def _toward(lk: Look, y, x, p) -> Array:
    """Position along the light direction relative to ``p``: > 0 on the lit side."""
    return (y - p[0]) * lk.light[0] + (x - p[1]) * lk.light[1]


def _lip(shape: Array, lk: Look, k: int) -> tuple[Array, Array]:
    """The shape's edge pixels on the side away from the light (lit wall) and towards it (shadow)."""
    dy, dx = int(round(lk.light[0] * k)), int(round(lk.light[1] * k))
    return shape & ~_shift(shape, -dy, -dx), shape & ~_shift(shape, dy, dx)


# ----------------------------------------------------------------------------- defects
def _crack(rng, y, x, region, s, lk):
    p = _pick(region, rng, int(s * 0.06))
    angle = rng.uniform(0, 2 * np.pi)
    radius = max(1.0, s * rng.uniform(0.011, 0.017))
    shape = np.zeros(region.shape, bool)
    for _ in range(rng.integers(7, 11)):
        angle += rng.uniform(-0.8, 0.8)
        step = s * rng.uniform(0.022, 0.045)
        q = (p[0] + step * np.sin(angle), p[1] + step * np.cos(angle))
        shape |= _capsule(y, x, p, q, radius * rng.uniform(0.7, 1.2))
        p = q
    dark = rng.uniform(0.12, 0.4)
    lit, _ = _lip(shape, lk, 2)
    factor = np.where(lit, np.float32(1.1 + 0.4 * lk.contrast), np.float32(dark))
    return shape, lk.img * factor[..., None]


def _cut(rng, y, x, region, s, lk):
    p = _pick(region, rng, int(s * 0.08))
    angle, length = rng.uniform(0, np.pi), s * rng.uniform(0.16, 0.24)
    dy, dx = 0.5 * length * np.sin(angle), 0.5 * length * np.cos(angle)
    radius = s * rng.uniform(0.02, 0.03)
    shape = _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), radius)
    grey = lk.local.mean(-1, keepdims=True)
    flesh = (0.45 * lk.local + 0.55 * grey) * rng.uniform(1.3, 1.7) + rng.uniform(20, 50)
    facet = 1 + 0.35 * lk.contrast * np.sign(-np.sin(angle) * lk.light[1] + np.cos(angle) * lk.light[0] + 1e-6)
    wall, _ = _lip(shape, lk, 2)
    paint = np.where(wall[..., None], lk.img * rng.uniform(0.35, 0.6), flesh * facet)
    return shape, paint * (1 + 0.05 * rng.standard_normal(shape.shape, np.float32))[..., None]


def _hole(rng, y, x, region, s, lk):
    radius = s * rng.uniform(0.05, 0.075)
    p = _pick(region, rng, int(radius) + 2)
    d = np.sqrt((y - p[0]) ** 2 + (x - p[1]) ** 2)
    along = _toward(lk, y, x, p) / radius                       # -1 far from the light .. +1 near it
    pit = d < rng.uniform(0.6, 0.8) * radius
    depth = rng.uniform(0.05, 0.2) + (0.25 + 0.35 * lk.contrast) * np.clip(0.5 - 0.5 * along, 0, 1)
    rim = 1 + (0.15 + 0.3 * lk.contrast) * along                # lip: bright where it faces the light
    factor = np.where(pit, depth, rim)
    return d <= radius, lk.local * factor[..., None]


def _print(rng, y, x, region, s, lk):
    outer = s * rng.uniform(0.06, 0.085)
    p = _pick(region, rng, int(outer) + 2)
    d = np.sqrt((y - p[0]) ** 2 + (x - p[1]) ** 2)
    ring = (d <= outer) & (d >= outer - max(1.5, s * rng.uniform(0.018, 0.026)))
    angle = rng.uniform(0, np.pi)
    dy, dx = outer * np.sin(angle), outer * np.cos(angle)
    shape = ring | _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), max(1.0, s * 0.012))
    ink = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5))
    opacity = rng.uniform(0.7, 0.95)
    return shape, lk.img * (1 - opacity + opacity * ink)        # ink multiplies the local texture


def _scratch_head(rng, y, x, region, s, lk):
    shape = np.zeros(region.shape, bool)
    radius = max(1.0, s * rng.uniform(0.009, 0.013))
    for _ in range(rng.integers(2, 4)):
        p = _pick(region, rng)
        angle, half = rng.uniform(0, np.pi), s * rng.uniform(0.04, 0.07)
        dy, dx = half * np.sin(angle), half * np.cos(angle)
        shape |= _capsule(y, x, (p[0] - dy, p[1] - dx), (p[0] + dy, p[1] + dx), radius)
    catch = rng.uniform(0.55, 0.95)                             # how much the groove catches the light
    bright = np.maximum(lk.local * 1.7, lk.local + 70)
    return shape, lk.img * (1 - catch) + bright * catch


def _thread_side(rng, y, x, region, s, lk):
    p = _pick(_edge(region), rng)
    r = s * rng.uniform(0.035, 0.05)
    d = np.sqrt((y - p[0]) ** 2 + (x - p[1]) ** 2)
    bite = d < rng.uniform(0.55, 0.75) * r                      # material gone: background shows
    wall = lk.local * (rng.uniform(0.35, 0.65) + 0.3 * lk.contrast * np.clip(_toward(lk, y, x, p) / r, -1, 1))[..., None]
    return d <= r, np.where(bite[..., None], lk.background + 4 * rng.standard_normal((*d.shape, 1)), wall)


def _thread_top(rng, y, x, region, s, lk):
    shape = np.zeros(region.shape, bool)
    for _ in range(rng.integers(3, 6)):
        c = _pick(region, rng)
        shape |= (y - c[0]) ** 2 + (x - c[1]) ** 2 <= (s * rng.uniform(0.022, 0.035)) ** 2
    tint = 1 + rng.uniform(0, 0.5) * np.array([0.35, 0.0, -0.45], np.float32)   # grey .. brownish
    mottle = rng.uniform(0.3, 0.6) * (1 + 0.3 * _noise(rng, region.shape, 24))
    return shape, lk.local * (mottle[..., None] * tint)


def _manipulated_front(rng, y, x, region, s, lk):
    p = _pick(region, rng)
    angle = rng.uniform(0, 2 * np.pi)
    q = (p[0] + s * 0.06 * np.sin(angle), p[1] + s * 0.06 * np.cos(angle))
    bend = angle + rng.choice([-1, 1]) * rng.uniform(0.8, 1.5)
    r = (q[0] + s * 0.04 * np.sin(bend), q[1] + s * 0.04 * np.cos(bend))
    radius = s * rng.uniform(0.016, 0.024)
    shape = _capsule(y, x, p, q, radius) | _capsule(y, x, q, r, radius * 0.8)
    metal = np.median(lk.img[region], axis=0)
    # a bent rod: its across-normal taken from the offset to the first segment's axis, lit like the screw
    nrm = ((y - p[0]) * np.cos(angle) - (x - p[1]) * np.sin(angle)) / radius
    side = -lk.light[0] * np.cos(angle) + lk.light[1] * np.sin(angle)
    shade = 0.75 + 0.6 * lk.contrast * np.clip(-nrm * side, -1, 1)
    return shape, metal * shade[..., None]


@dataclass(frozen=True)
class Defect:
    draw: object
    part: int
    clip: bool = True


DEFECTS = {
    "crack": Defect(_crack, BODY),
    "cut": Defect(_cut, BODY),
    "hole": Defect(_hole, BODY),
    "print": Defect(_print, BODY),
    "scratch_head": Defect(_scratch_head, HEAD),
    "thread_side": Defect(_thread_side, BODY),
    "thread_top": Defect(_thread_top, NECK),
    "manipulated_front": Defect(_manipulated_front, TIP, clip=False),
}
