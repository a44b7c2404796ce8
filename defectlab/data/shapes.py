"""Drawing primitives shared by the procedural generators (``synth``, ``synth_v2``, ``corpus``):
pixel grids, smooth noise, capsules, disks, region edges and random points inside a region.
Pure numpy + PIL; a change here changes every procedural picture (``synth.GENERATOR_VERSION``)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

Array = np.ndarray


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x); cached and read-only, never modified in place."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def smooth_noise(rng: np.random.Generator, size: int | tuple[int, int], cells: int) -> Array:
    """Low-frequency noise (zero mean, unit-ish std): a coarse random grid upsampled bicubically."""
    h, w = (size, size) if isinstance(size, int) else size
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC))


def capsule(y: Array, x: Array, p0, p1, radius: float) -> Array:
    """Pixels within ``radius`` of the segment p0-p1 (points are (y, x))."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((y - y0) * dy + (x - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (y - y0 - t * dy) ** 2 + (x - x0 - t * dx) ** 2 <= radius * radius


def disk(y: Array, x: Array, centre, radius: float) -> Array:
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius * radius


def edge(region: Array) -> Array:
    """Boundary pixels of a boolean region (region minus its 1-px erosion)."""
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return region & ~inner


def erode(region: Array, k: int) -> Array:
    for _ in range(k):
        region = region & ~edge(region)
    return region


def pick(region: Array, rng: np.random.Generator, margin: int = 0) -> tuple[float, float]:
    """A random pixel of ``region``, at least ``margin`` px inside it when there is room."""
    inner = erode(region, margin) if margin else region
    ys, xs = np.nonzero(inner if inner.any() else region)
    i = rng.integers(len(ys))
    return float(ys[i]) + 0.5, float(xs[i]) + 0.5
