"""From files to training tensors: image and mask pixels, the one augmentation, the datasets.

Images are read as ``[3,S,S]`` float in [-1, 1] (RGB; MVTec screws are greyscale PNGs), masks
as ``[1,S,S]`` in {0, 1}, both centre-cropped and resized the same way so they stay aligned.
The augmentation is a ``View`` (flips, then a rotation): ``draw_view`` draws one with torch's
RNG, ``apply_view`` applies it. ``DefectDataset`` and the ``LatentCache`` (each (image, view)
encoded once by a frozen codec) use the same views, so a run with the cache sees the same
augmentations, noise and timesteps as one without.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .data import UNREADABLE, DataConfig, Sample, check_config
from .errors import DefectlabError
from .images import from_pil


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
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    im = _crop_resize(im, size, crop, Image.BICUBIC, path).convert("RGB")  # resize before RGB: 3x cheaper
    return from_pil(im)


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
    binary = np.asarray(im.convert("RGB")).max(axis=-1) > 0
    im = _crop_resize(Image.fromarray(binary.astype(np.uint8) * 255), size, crop, Image.BOX, path)
    return torch.from_numpy((np.asarray(im) > 0).astype(np.float32))[None]


def augment_pair(image: torch.Tensor, mask: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and a rotation from ``{0, *cfg.rotations}``, identical for image and mask:
    ``apply_view(draw_view(cfg))``. Draws from torch's global RNG, which DataLoader seeds per
    worker, so a fixed seed reproduces a run."""
    return apply_view(image, mask, draw_view(cfg))


class DefectDataset(torch.utils.data.Dataset):
    """``{"image": [3,S,S] in [-1,1], "mask": [1,S,S] in {0,1}, "label": int}`` per sample."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, augment: bool = True):
        check_config(cfg)
        self.samples, self.cfg, self.augment = list(samples), cfg, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s, cfg = self.samples[i], self.cfg
        im = _open(s.image)
        mask = load_mask(s.mask, cfg.image_size, cfg.crop, im.size)
        image = _to_tensor(im, cfg.image_size, cfg.crop, s.image)
        if self.augment:
            image, mask = augment_pair(image, mask, cfg)
        return {"image": image, "mask": mask, "label": s.label}


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


def draw_view(cfg: DataConfig) -> View:
    """The view ``augment_pair`` would apply now: the same torch RNG calls, in the same order."""
    h = bool(cfg.hflip and torch.rand(()) < 0.5)
    v = bool(cfg.vflip and torch.rand(()) < 0.5)
    angles = (0, *cfg.rotations)
    return View(h, v, angles[int(torch.randint(len(angles), ()))])


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

    def dataset(self, augment: bool = True) -> "CachedLatentDataset":
        return CachedLatentDataset(self, augment)


class CachedLatentDataset(torch.utils.data.Dataset):
    """``DefectDataset`` with the image replaced by its cached latent: same views for the same
    RNG state (``draw_view``), mask augmented with the view, label."""

    def __init__(self, cache: LatentCache, augment: bool = True):
        self.cache, self.augment = cache, augment

    def __len__(self) -> int:
        return len(self.cache.samples)

    def __getitem__(self, i: int) -> dict:
        view = draw_view(self.cache.cfg) if self.augment else View()
        mask, label = self.cache.mask_label(i)
        return {"latent": self.cache.get(i, view), "mask": apply_view(None, mask, view)[1], "label": label}
