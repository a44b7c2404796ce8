"""From files to training tensors: image and mask pixels, the one augmentation, the datasets.

Images of any mode and bit depth (16-bit, palette, CMYK, …: ``images.plain``) are read as
``[3,S,S]`` float in [-1, 1] (RGB; MVTec screws are greyscale PNGs), masks as ``[1,S,S]`` in
{0, 1}, both centre-cropped and resized the same way so they stay aligned.
The augmentation is a ``View`` (flips, then a rotation): ``draw_view`` draws one with torch's
RNG, or, given a seed, with a generator of its own per (seed, epoch, item) (``view_generator``:
what training uses, so a run resumed mid-epoch sees the same views); ``apply_view`` applies it.
``DefectDataset`` and the ``LatentCache`` (each (image, view) encoded once by a frozen codec) use
the same views, so a run with the cache sees the same augmentations, noise and timesteps as one without.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..base.errors import DefectlabError
from ..base.images import from_pil, plain
from .sources import UNREADABLE, DataConfig, Sample, check_config


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now, so a truncated file fails here with its name
        return im
    except UNREADABLE as err:
        raise DefectlabError(f"unreadable or corrupt image {path}: {err}") from err


def _crop_resize(im: Image.Image, size: int, crop: int, resample, path: Path) -> Image.Image:
    if crop:
        w, h = im.size
        if crop > min(w, h):
            raise DefectlabError(f"crop {crop} px is larger than image {path} ({w}x{h})")
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
    return im.resize((size, size), resample)


def load_image(path: Path, size: int, crop: int = 0) -> torch.Tensor:
    """``[3, size, size]`` float in [-1, 1], always RGB (MVTec screw PNGs are greyscale)."""
    return _to_tensor(_open(path), size, crop, path)


def _to_tensor(im: Image.Image, size: int, crop: int, path: Path) -> torch.Tensor:
    # any mode and bit depth → L, RGB or F (16-bit kept unquantised); resized before RGB: 3x cheaper
    return from_pil(_crop_resize(plain(im), size, crop, Image.BICUBIC, path))


def load_mask(path: Path | None, size: int, crop: int = 0,
              image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[1, size, size]`` in {0, 1}; zeros when ``path`` is None. Colour masks count any
    non-black pixel. Area resampling + ``> 0`` keeps thin scratches that NEAREST would drop
    when 1024 px shrink to 64 (same crop box and scale as the image, so still aligned)."""
    if path is None:
        return torch.zeros(1, size, size)
    im = _open(path)
    if image_size is not None and im.size != image_size:
        raise DefectlabError(f"mask {path} is {im.size[0]}x{im.size[1]} but its image is "
                             f"{image_size[0]}x{image_size[1]}")
    binary = _defect_pixels(im)
    im = _crop_resize(Image.fromarray(binary.astype(np.uint8) * 255), size, crop, Image.BOX, path)
    return torch.from_numpy((np.asarray(im) > 0).astype(np.float32))[None]


def _defect_pixels(im: Image.Image) -> np.ndarray:
    """``[H, W]`` bool: any non-black pixel of a mask (grey, colour or 16-bit)."""
    return np.asarray(plain(im)).reshape(im.size[1], im.size[0], -1).max(axis=-1) > 0


def check_masks(samples: list[Sample], crop: int = 0) -> None:
    """Before training: warn, naming files, about masks with no defect pixel and about defects a
    centre ``crop`` cuts away entirely or in part (the crop box of ``_crop_resize``)."""
    empty, cut, part = [], [], []
    for s in (s for s in samples if s.mask is not None):
        pixels = _defect_pixels(_open(s.mask))
        h, w = pixels.shape
        left, top = (w - crop) // 2, (h - crop) // 2
        kept = int(pixels[top:top + crop, left:left + crop].sum()) if crop else int(pixels.sum())
        if not pixels.any():
            empty.append(s.mask)
        elif kept == 0:
            cut.append(s.mask)
        elif kept < pixels.sum():
            part.append(s.mask)
    if empty:
        warnings.warn(f"{len(empty)} mask(s) hold no defect pixel (all black), e.g. {empty[0]}: fix or "
                      "delete them (an image without a mask file trains without one)", stacklevel=2)
    if cut or part:
        n = sum(s.mask is not None for s in samples)
        warnings.warn(f"crop {crop} px cuts {len(cut)} of {n} defect masks away entirely and {len(part)} partly "
                      f"(e.g. {(cut or part)[0]}): use a larger --crop, or none", stacklevel=2)


def augment_pair(image: torch.Tensor, mask: torch.Tensor, cfg: DataConfig,
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and a rotation from ``{0, *cfg.rotations}``, identical for image and mask:
    ``apply_view(draw_view(cfg, gen))``. Without ``gen`` it draws from torch's global RNG, which
    DataLoader seeds per worker, so a fixed seed reproduces a run."""
    return apply_view(image, mask, draw_view(cfg, gen))


def view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of item ``index``'s view in ``epoch``: a view that depends on nothing drawn
    before it, so a run resumed in the middle of an epoch draws the same views."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class _Epochs:
    """Per-item seeded views (``seed``; None = torch's global RNG), keyed by the epoch that
    ``set_epoch`` names (accelerate's loader calls it; the training loop does before each epoch)."""
    seed: int | None = None
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, i: int) -> torch.Generator | None:
        return None if self.seed is None else view_generator(self.seed, self.epoch, i)


class DefectDataset(_Epochs, torch.utils.data.Dataset):
    """``{"image": [3,S,S] in [-1,1], "mask": [1,S,S] in {0,1}, "label": int}`` per sample."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, augment: bool = True, seed: int | None = None):
        check_config(cfg)
        self.samples, self.cfg, self.augment, self.seed = list(samples), cfg, augment, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s, cfg = self.samples[i], self.cfg
        im = _open(s.image)
        size = cfg.image_size * cfg.zoom
        mask = load_mask(s.mask, size, cfg.crop, im.size)
        image = _to_tensor(im, size, cfg.crop, s.image)
        gen = self._generator(i)
        if self.augment:
            image, mask = augment_pair(image, mask, cfg, gen)
        if cfg.zoom > 1:  # the window around the defect, jittered while training; a defect-free
            # image (product adaptation) shows the product's look anywhere on the product
            y, x = (product_window(image, cfg.image_size, gen, draw=self.augment) if s.mask is None else
                    window(mask, cfg.image_size, gen if self.augment else None, 0.25 if self.augment else 0.0))
            image, mask = image[:, y:y + cfg.image_size, x:x + cfg.image_size], mask[:, y:y + cfg.image_size, x:x + cfg.image_size]
        return {"image": image, "mask": mask, "label": s.label}


def foreground(image: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Bool [S,S]: pixels of ``image`` ([3,S,S] in [-1, 1]) whose mean absolute difference from
    the border's median colour exceeds ``threshold`` — the product on a plain background (MVTec)."""
    img = image.float().reshape(-1, *image.shape[-2:])
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
    return (img - border.median(dim=1).values[:, None, None]).abs().mean(0) > threshold


def product_window(image: torch.Tensor, size: int, gen: torch.Generator | None = None,
                   draw: bool = True) -> tuple[int, int]:
    """Top-left ``(y, x)`` of a ``size`` window centred on a product pixel (``foreground``) drawn
    from ``gen`` (torch's global RNG if None); the image centre when not ``draw`` or without a
    product: where a defect-free image shows the product's look at a zoom run's scale."""
    ys, xs = torch.nonzero(foreground(image), as_tuple=True)
    pick = torch.zeros((1, *image.shape[-2:]))
    if draw and len(ys):
        j = int(torch.randint(len(ys), (), generator=gen))
        pick[0, ys[j], xs[j]] = 1
    return window(pick, size)


def window(mask: torch.Tensor, size: int, gen: torch.Generator | None = None, jitter: float = 0.0) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size`` window centred on ``mask``'s bounding box (the image
    centre for an empty mask), shifted by up to ± ``jitter`` × ``size`` (drawn from ``gen``),
    kept inside the image (``DataConfig.zoom``)."""
    h, w = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(h, w) > 0.5, as_tuple=True)
    cy, cx = ((float(ys.min() + ys.max() + 1) / 2, float(xs.min() + xs.max() + 1) / 2) if len(ys) else (h / 2, w / 2))
    if jitter > 0:
        cy, cx = (c + float(torch.rand((), generator=gen) * 2 - 1) * jitter * size for c in (cy, cx))
    return (min(max(int(round(cy - size / 2)), 0), h - size), min(max(int(round(cx - size / 2)), 0), w - size))


# ----------------------------------------------------------------------------- augmentation views and the latent cache
@dataclass(frozen=True)
class View:
    """One augmentation: flips, then a rotation (degrees)."""
    hflip: bool = False
    vflip: bool = False
    angle: int = 0


def views(cfg: DataConfig) -> list[View]:
    """Every view ``augment_pair`` can produce for ``cfg`` (≤ 2 × 2 × (1 + len(rotations)))."""
    flips = lambda on: (False, True) if on else (False,)  # noqa: E731
    angles = list(dict.fromkeys((0, *cfg.rotations)))
    return [View(h, v, a) for h, v, a in itertools.product(flips(cfg.hflip), flips(cfg.vflip), angles)]


def draw_view(cfg: DataConfig, gen: torch.Generator | None = None) -> View:
    """The view ``augment_pair`` would apply now: the same torch RNG calls, in the same order."""
    h = bool(cfg.hflip and torch.rand((), generator=gen) < 0.5)
    v = bool(cfg.vflip and torch.rand((), generator=gen) < 0.5)
    angles = (0, *cfg.rotations)
    return View(h, v, angles[int(torch.randint(len(angles), (), generator=gen))])


def apply_view(image: torch.Tensor | None, mask: torch.Tensor | None, view: View):
    """``view`` applied to an image and/or its mask (tv_tensors.Mask makes torchvision rotate the
    mask with NEAREST); the exposed corners take the image's own border colour, not black: black
    corners on a light-background screw would be learned as part of the picture."""
    img = None if image is None else tv_tensors.Image(image)
    msk = None if mask is None else tv_tensors.Mask(mask)
    for on, flip in ((view.hflip, F.horizontal_flip), (view.vflip, F.vertical_flip)):
        if on:
            img, msk = (None if img is None else flip(img)), (None if msk is None else flip(msk))
    if view.angle:
        if img is not None:  # the un-augmented image's border colour, as augment_pair
            border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
            img = F.rotate(img, view.angle, interpolation=v2.InterpolationMode.BILINEAR,
                            fill=border.median(dim=1).values.tolist())
        if msk is not None:
            msk = F.rotate(msk, view.angle, fill=0)
    return (None if img is None else img.as_subclass(torch.Tensor),
            None if msk is None else msk.as_subclass(torch.Tensor))


class LatentCache:
    """Latents of the training images, one per (image, view), each encoded once.

    Keys are ``(image path, View)``: deterministic across epochs and processes. Encodes lazily
    (``get``) or all views at once (``fill``, batched). Needs a deterministic codec: the VAE's
    posterior mean (``VAECodec`` default) or pixels. ``dataset()`` replaces ``DefectDataset``
    in the training loader and yields ``{"latent", "mask", "label"}``."""

    def __init__(self, samples, cfg: DataConfig, codec, device="cpu", batch_size: int = 16):
        if getattr(codec, "sample", False):
            raise DefectlabError("latent cache: the codec samples its latents (VAECodec(sample=True)); "
                                 "only the deterministic posterior mean can be cached")
        if cfg.zoom > 1:
            raise DefectlabError("latent cache: --zoom draws a new window every epoch; train without --latent-cache")
        self.samples, self.cfg, self.codec = list(samples), cfg, codec
        self.device, self.batch_size = device, batch_size
        self._plain = DefectDataset(self.samples, cfg, augment=False)
        self._masks: dict[int, tuple[torch.Tensor, int]] = {}
        self._latents: dict[tuple[str, View], torch.Tensor] = {}
        self.encodes = 0   # images encoded so far (each key once)

    def key(self, i: int, view: View) -> tuple[str, View]:
        return str(self.samples[i].image), view

    def __len__(self) -> int:
        return len(self._latents)

    def mask_label(self, i: int) -> tuple[torch.Tensor, int]:
        if i not in self._masks:
            item = self._plain[i]
            self._masks[i] = (item["mask"], item["label"])
        return self._masks[i]

    def get(self, i: int, view: View) -> torch.Tensor:
        key = self.key(i, view)
        if key not in self._latents:
            self._encode([(i, view)])
        return self._latents[key]

    def fill(self) -> "LatentCache":
        """Encode every view of every image now, ``batch_size`` at a time."""
        todo = [(i, v) for i in range(len(self.samples)) for v in views(self.cfg) if self.key(i, v) not in self._latents]
        for start in range(0, len(todo), self.batch_size):
            self._encode(todo[start:start + self.batch_size])
        return self

    def _encode(self, items: list[tuple[int, View]]) -> None:
        plain = {i: self._plain[i]["image"] for i in dict.fromkeys(i for i, _ in items)}  # each file read once
        images = [apply_view(plain[i], None, view)[0] for i, view in items]
        with torch.no_grad():
            z = self.codec.encode(torch.stack(images).to(self.device)).float().cpu()
        for (i, view), latent in zip(items, z):
            self._latents[self.key(i, view)] = latent.clone()
        self.encodes += len(items)

    def dataset(self, augment: bool = True, seed: int | None = None) -> "CachedLatentDataset":
        return CachedLatentDataset(self, augment, seed)


class CachedLatentDataset(_Epochs, torch.utils.data.Dataset):
    """``DefectDataset`` with the image replaced by its cached latent: same views for the same
    RNG state or seed (``draw_view``), mask augmented with the view, label."""

    def __init__(self, cache: LatentCache, augment: bool = True, seed: int | None = None):
        self.cache, self.augment, self.seed = cache, augment, seed

    def __len__(self) -> int:
        return len(self.cache.samples)

    def __getitem__(self, i: int) -> dict:
        view = draw_view(self.cache.cfg, self._generator(i)) if self.augment else View()
        mask, label = self.cache.mask_label(i)
        return {"latent": self.cache.get(i, view), "mask": apply_view(None, mask, view)[1], "label": label}
