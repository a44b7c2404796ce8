"""Pixels, in one place: images as models see them (float in [-1, 1], ``[N,3,H,W]``) and as files,
torch-fidelity and figures hold them (8-bit). Every conversion between the two goes through here,
so a PNG written by one stage reads back identically in another.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DefectlabError
from .runs import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float → uint8 of the same shape (round half to even, as PNG writers expect)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (or 0..255 float) → float in [-1, 1], same shape."""
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32) if isinstance(pixels, np.ndarray) else pixels).float()
    return (x / 127.5 - 1).clamp(-1, 1)


def quantised(images: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of ``images`` reads back as."""
    return from_uint8(to_uint8(images))


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] (or [3,H,W]; 1 channel is repeated) in [-1, 1] → float [N,H,W,3] in [0, 1] for imshow."""
    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DefectlabError(f"expected images shaped [N,3,H,W], got {tuple(images.shape)}")
    x = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # one colour channel
_WIDE = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit PNG / TIFF pixels: 0..65535


def plain(im: Image.Image) -> Image.Image:
    """Any PIL mode as L, RGB or F (grey on the 0..255 scale), the modes ``from_pil`` reads: 16-bit
    (``I;16*``, and ``I``, which is how Pillow may open 16-bit files) is scaled by 65535; ``F`` is
    read as 0..1 when no pixel exceeds 1, else as 0..255 (Pillow's own scale); alpha is dropped;
    palette, CMYK and other colour modes become RGB."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in _WIDE or im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255 / 65535 if im.mode in _WIDE else (255.0 if top <= 1 else 1.0)
        return Image.fromarray(np.nan_to_num(arr * scale).clip(0, 255).astype(np.float32))
    return im.convert("L" if im.mode in GREY_MODES else "RGB")


def from_pil(im: Image.Image) -> torch.Tensor:
    """A PIL image of any mode and bit depth (see ``plain``) → [3, H, W] in [-1, 1]."""
    im = plain(im)
    if im.mode == "F":  # float grey, kept unquantised
        return from_uint8(torch.from_numpy(np.asarray(im, dtype=np.float32).copy())[None].repeat(3, 1, 1))
    arr = np.asarray(im.convert("RGB"), dtype=np.float32).copy()
    return from_uint8(torch.from_numpy(arr).permute(2, 0, 1))


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] → the same shape with all three channels set to the luma (ITU-R
    601, as Pillow's ``convert("L")``): greyscale datasets stay greyscale in generated images."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (images * weights).sum(-3, keepdim=True).expand_as(images).clone()


def save_png(image: torch.Tensor, path: Path, grey: bool = False) -> Path:
    """[3,H,W] in [-1, 1] → 8-bit RGB PNG (``grey``: 8-bit L of ``to_grey``), written atomically."""
    arr = to_uint8(to_grey(image)[:1] if grey else image).permute(1, 2, 0).cpu().numpy()
    arr = arr[..., 0] if grey else arr
    return atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_mask_png(mask: torch.Tensor, path: Path) -> Path:
    """[1,H,W] (> 0.5 = defect) → 8-bit 0/255 PNG, written atomically."""
    arr = (mask[0] > 0.5).cpu().numpy().astype(np.uint8) * 255
    return atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def load_png(path: Path) -> torch.Tensor:
    """A PNG written by ``save_png`` (or any RGB image) → [3,H,W] in [-1, 1]."""
    with Image.open(path) as im:
        return from_pil(im)
