"""What the transformer works on: pixels (tiny, mini) or VAE latents (DiT-XL). One interface,
``encode(x in [-1, 1]) → z``, ``decode(z) → x``, ``latent_shape(size)``; training and sampling
never ask which one they have.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from ..base.errors import DefectlabError


class PixelCodec:
    """Identity: the transformer works on pixels in [-1, 1] (tiny / mini)."""
    channels, downsample = 3, 1
    clip_sample = True  # x0 lives in [-1, 1]: samplers clip its prediction (without it samples saturate)

    def to(self, device=None, dtype=None) -> "PixelCodec":
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (3, image_size, image_size)


class VAECodec:
    """Stable-Diffusion VAE latents, scaled to about unit variance as DiT was trained.

    ``encode`` returns the posterior *mean* by default: the SD VAE's posterior std is tiny, so
    sampling adds almost nothing while the mean makes latents deterministic (cacheable per
    augmented view, identical across runs). ``sample=True`` gives DiT's ``latent_dist.sample()``.
    """

    clip_sample = False  # latents are unbounded: no clipping, as the original DiT samples

    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None, sample: bool = False):
        # None: the VAE's own (SD VAE 0.18215; pretrain-ae stores 1 / its latents' std)
        scaling_factor = scaling_factor or getattr(vae.config, "scaling_factor", None) or 0.18215
        self.vae, self.scaling_factor, self.sample = vae.eval().requires_grad_(False), scaling_factor, sample
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "VAECodec":
        self.vae.to(device)
        if dtype is not None and self.vae.dtype != dtype:  # diffusers warns on any .to(dtype)
            self.vae.to(dtype)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mean
        return (z * self.scaling_factor).to(x.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.scaling_factor).to(self.vae.device, self.vae.dtype)).sample
        return x.to(z.dtype).clamp(-1, 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.channels, image_size // self.downsample, image_size // self.downsample)


def check_image_size(size: int, codec, patch_size: int, model: str) -> int:
    """``size`` if a transformer with ``patch_size`` can work on it through ``codec``: a multiple of
    patch x codec downsampling; otherwise one line saying which sizes work."""
    down = getattr(codec, "downsample", 1)  # pixels per latent cell (a codec without it: 1)
    step = patch_size * down
    if size < step or size % step:
        raise DefectlabError(f"image_size {size} must be a positive multiple of {step} for {model} "
                             f"(patch {patch_size} x {down} px per latent cell)")
    return size
