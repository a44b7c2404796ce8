"""An independent reference of the original DiT algorithm (facebookresearch/DiT ``models.py`` and
``diffusion/``), written for the tests from the paper's equations and the original's structure:
the model's forward (timestep frequencies ``/ half``), the 1000-step linear schedule in float64,
respacing (``"250"`` and ``"ddimN"``), the learned-range posterior, DDPM and DDIM (eta 0)
sampling with classifier-free guidance as ``forward_with_cfg`` does it, and the training loss
(eps MSE + the variational bound on a frozen mean). Nothing here imports defectlab.

Noise is drawn per sample from the caller's generators (``[N]`` of them, one ``randn`` of shape
``[1, C, H, W]`` each), in the order a diffusers scheduler with a list of generators draws it,
so the two implementations can be fed identical randomness.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------- the model
def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_2d(dim, grid):  # the original's get_2d_sincos_pos_embed (numpy there, float64 here)
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    g = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(g, g, indexing="xy")               # np.meshgrid(grid_w, grid_h)
    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], 1)


class RefBlock(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def attention(self, x):  # timm Attention
        B, N, C = x.shape
        q, k, v = self.attn.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1)
        return self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa[:, None] * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        hidden = self.mlp.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp))
        mlp = self.mlp.fc2(nn.functional.gelu(hidden, approximate="tanh"))
        return x + gate_mlp[:, None] * mlp


class RefDiT(nn.Module):
    """The original DiT forward, compact; random (not zero) init so every path matters.

    ``freq_shift`` 0 is the original's timestep embedding (``/ half``); 1 reproduces diffusers'
    ``Timesteps(downscale_freq_shift=1)`` (``/ (half - 1)``), for the tests that show the gap."""

    def __init__(self, input_size=8, patch=2, in_ch=4, hidden=128, depth=2, heads=2, classes=10, freq_shift=0):
        super().__init__()
        self.patch, self.out_ch, self.freq_shift = patch, 2 * in_ch, freq_shift
        self.x_embedder, self.t_embedder, self.y_embedder, self.final_layer = (nn.Module() for _ in range(4))
        self.x_embedder.proj = nn.Conv2d(in_ch, hidden, patch, patch)
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, hidden)   # + the CFG null row
        pos = sincos_2d(hidden, input_size // patch).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(hidden, heads) for _ in range(depth))
        self.final_layer.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden, patch * patch * self.out_ch)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.num_classes = classes

    def timestep_embedding(self, t, dim=256, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - self.freq_shift))
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(self.timestep_embedding(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, 1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        n, p, c_out = x.shape[0], self.patch, self.out_ch
        h = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, h, h, p, p, c_out))
        return x.reshape(n, c_out, h * p, h * p)

    def forward_with_cfg(self, x, t, y, scale, channels=3):
        """The original's guided forward: the first half of the batch is duplicated, the guided eps
        (``channels`` of it: 3 as in the original, or all) replaces both halves' eps."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :channels], out[:, channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], 1)


# ----------------------------------------------------------------------------- the diffusion
def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The original's respacing: "ddimN" = range(0, T, s) with the integer stride s giving N
    steps; "N" = N steps at round(i * (T - 1) / (N - 1)) over one section."""
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives {want} steps")
    count = int(spec)
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


class RefDiffusion:
    """A (possibly respaced) Gaussian diffusion with learned-range variance, eps prediction."""

    def __init__(self, use_timesteps: list[int] | None = None, num_timesteps: int = 1000):
        base_betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
        base_abar = np.cumprod(1.0 - base_betas)
        used = list(range(num_timesteps)) if use_timesteps is None else sorted(use_timesteps)
        betas, last = [], 1.0
        for i in used:  # the betas that make the kept timesteps' alpha-bars exact
            betas.append(1 - base_abar[i] / last)
            last = base_abar[i]
        self.timestep_map = used
        self.betas = np.array(betas)
        alphas = 1.0 - self.betas
        self.abar = np.cumprod(alphas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.post_var = self.betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = self.betas * np.sqrt(self.abar_prev) / (1.0 - self.abar)
        self.coef2 = (1.0 - self.abar_prev) * np.sqrt(alphas) / (1.0 - self.abar)

    @staticmethod
    def _at(arr, i, like):
        return torch.from_numpy(np.asarray(arr))[i].float().view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0, noise, i):
        return self._at(np.sqrt(self.abar), i, x0) * x0 + self._at(np.sqrt(1 - self.abar), i, x0) * noise

    def p_mean_variance(self, out, x, i):
        c = x.shape[1]
        eps, var_values = out[:, :c], out[:, c:]
        frac = (var_values + 1) / 2
        log_var = frac * self._at(np.log(self.betas), i, x) + (1 - frac) * self._at(self.post_logvar, i, x)
        x0 = self._at(np.sqrt(1 / self.abar), i, x) * x - self._at(np.sqrt(1 / self.abar - 1), i, x) * eps
        mean = self._at(self.coef1, i, x) * x0 + self._at(self.coef2, i, x) * x
        return mean, log_var, x0

    def _model(self, fn, x, i):
        t = torch.tensor([self.timestep_map[j] for j in i])  # respaced index → the model's timestep
        return fn(x, t)

    def ddpm(self, fn, noise0, gens):
        """p_sample_loop: ``fn(x, t)`` is the (guided) model, ``noise0`` the start, ``gens`` per-sample."""
        x = noise0
        for j in reversed(range(len(self.betas))):
            i = torch.full((len(x),), j)
            mean, log_var, _ = self.p_mean_variance(self._model(fn, x, i), x, i)
            if j > 0:
                z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens])
                x = mean + torch.exp(0.5 * log_var) * z
            else:
                x = mean
        return x

    def ddim(self, fn, noise0):
        """ddim_sample_loop, eta 0 (no noise after the start)."""
        x = noise0
        for j in reversed(range(len(self.betas))):
            i = torch.full((len(x),), j)
            _, _, x0 = self.p_mean_variance(self._model(fn, x, i), x, i)
            eps = (self._at(np.sqrt(1 / self.abar), i, x) * x - x0) / self._at(np.sqrt(1 / self.abar - 1), i, x)
            x = x0 * self._at(np.sqrt(self.abar_prev), i, x) + self._at(np.sqrt(1 - self.abar_prev), i, x) * eps
        return x

    def training_losses(self, model, x0, t, y, noise):
        """Per-sample (mse, vb) of the original's training_losses (learn_sigma, LossType.MSE)."""
        xt = self.q_sample(x0, noise, t)
        out = model(xt, t, y)
        c = x0.shape[1]
        mse = ((out[:, :c] - noise) ** 2).mean(dim=(1, 2, 3))
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], 1)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        true_mean = self._at(self.coef1, t, x0) * x0 + self._at(self.coef2, t, x0) * xt
        true_logvar = self._at(self.post_logvar, t, x0)
        kl = 0.5 * (-1.0 + log_var - true_logvar + torch.exp(true_logvar - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_loglik(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return mse, torch.where(t == 0, nll, kl)


def _cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_loglik(x, means, log_scales):
    centered, inv = x - means, torch.exp(-log_scales)
    plus, minus = _cdf(inv * (centered + 1 / 255)), _cdf(inv * (centered - 1 / 255))
    log_plus = torch.log(plus.clamp(min=1e-12))
    log_1m_minus = torch.log((1 - minus).clamp(min=1e-12))
    log_delta = torch.log((plus - minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_1m_minus, log_delta))


def guided(model: RefDiT, y: torch.Tensor, scale: float, channels: int):
    """``fn(x, t)`` for the sampling loops: the original's sample.py doubles z and labels
    (``y_null`` = num_classes) and samples with ``forward_with_cfg``; keep the first half."""
    null = torch.full_like(y, model.num_classes)

    def fn(x, t):
        both = torch.cat([x, x])
        out = model.forward_with_cfg(both, torch.cat([t, t]), torch.cat([y, null]), scale, channels)
        return out[: len(x)]
    return fn
