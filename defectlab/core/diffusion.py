"""DiT's training objective: noise MSE plus the variational bound for the learned variance.

DiT predicts noise *and* a per-pixel interpolation between the two variance bounds
(``learned_range``). Training only the MSE leaves the variance head wherever it was, which
is fine when fine-tuning a pre-trained base and wrong when training from scratch, so the
loss is the one DiT was trained with: ``mse(eps) + L_vlb`` where the bound term sees a
frozen (detached) mean, exactly as in guided-diffusion / DiT.

The first half of the output is what the schedule's ``prediction_type`` says: ``epsilon`` (DiT)
or ``v_prediction`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022). In x0 terms
the eps loss weights timestep t by SNR(t), which is ~0 where the image layout is decided; v
weights it by SNR(t) + 1, so a small model trained briefly still learns what a clean image
looks like at high noise (defectlab-mini uses it). The bound term always sees the eps implied
by the output, so the variance head trains the same way under both.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from ..base.errors import DefectlabError


PREDICTION_TYPES = ("epsilon", "v_prediction")


class Objective:
    """Holds the noise schedule tensors; ``loss(model_out, x0, xt, noise, t)``."""

    def __init__(self, scheduler_config: dict, device: torch.device | str = "cpu"):
        sched = DDPMScheduler.from_config(scheduler_config)
        self.scheduler = sched
        self.num_timesteps = sched.config.num_train_timesteps
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise DefectlabError(f"prediction_type {self.prediction_type!r} is not supported for training; "
                                 f"choose one of {', '.join(PREDICTION_TYPES)}")
        betas = sched.betas.double()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        self.buffers = {
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_betas": torch.log(betas),
            "coef1": betas * abar_prev.sqrt() / (1 - abar),
            "coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
        }
        self.to(device)

    def to(self, device) -> "Objective":
        self.buffers = {k: v.to(device=device, dtype=torch.float32) for k, v in self.buffers.items()}
        return self

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.buffers[name][t].view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_abar", t, x0.ndim) * x0 + self._at("sqrt_1m_abar", t, x0.ndim) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the first half of the output is trained to be: the noise, or v."""
        if self.prediction_type == "epsilon":
            return noise
        return self._at("sqrt_abar", t, x0.ndim) * noise - self._at("sqrt_1m_abar", t, x0.ndim) * x0

    def eps(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by the first half of the output."""
        if self.prediction_type == "epsilon":
            return pred
        return self._at("sqrt_abar", t, xt.ndim) * pred + self._at("sqrt_1m_abar", t, xt.ndim) * xt

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses ``(mse, vb)``, each of shape [B]. ``weight`` ([B,1,h,w], ≥ 0, not all
        0 in a sample): the MSE becomes a weighted mean over positions (``masks.loss_weights``)."""
        c = x0.shape[1]
        model_out = model_out.float()
        pred = model_out[:, :c]
        err, dims = (pred - self.target(x0, noise, t)) ** 2, tuple(range(1, x0.ndim))
        mse = err.mean(dim=dims) if weight is None else (err * weight).mean(dim=dims) / weight.expand_as(err).mean(dim=dims)
        if model_out.shape[1] != 2 * c:  # no learned variance: the prediction MSE alone
            return mse, torch.zeros_like(mse)
        v = model_out[:, c:]
        nd = x0.ndim
        frac = (v + 1) / 2
        min_log, max_log = self._at("post_logvar", t, nd), self._at("log_betas", t, nd)
        model_logvar = frac * max_log + (1 - frac) * min_log
        # frozen mean: the bound only trains the variance (guided-diffusion's learn_sigma trick)
        eps = self.eps(pred.detach(), xt, t)
        x0_pred = (xt - self._at("sqrt_1m_abar", t, nd) * eps) / self._at("sqrt_abar", t, nd)
        model_mean = self._at("coef1", t, nd) * x0_pred + self._at("coef2", t, nd) * xt
        true_mean = self._at("coef1", t, nd) * x0 + self._at("coef2", t, nd) * xt
        true_logvar = min_log.expand_as(model_logvar)
        kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        kl = kl.mean(dim=tuple(range(1, nd))) / math.log(2.0)
        nll = -_discretized_gaussian_loglik(x0, model_mean, 0.5 * model_logvar)
        nll = nll.mean(dim=tuple(range(1, nd))) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse, vb


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_loglik(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` in [-1, 1] under a Gaussian discretised to 256 bins (DiT's t=0 term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_1m_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_min, log_delta))


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # those DDPM, DDIM and DPM-Solver all build


def schedule_problem(s: dict) -> str | None:
    """What keeps diffusers' schedulers from building the training schedule ``s`` (None: nothing)."""
    def unit(*values) -> bool:  # numbers strictly between 0 and 1
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values)
    n, betas, kind, pred = (s.get(k) for k in ("num_train_timesteps", "trained_betas", "beta_schedule", "prediction_type"))
    return next((says for bad, says in (
        (type(n) is not int or n < 1, f"num_train_timesteps {n!r} is not a positive integer"),
        (betas is not None and not (isinstance(betas, list) and len(betas) == n and unit(*betas)),
         f"trained_betas must be {n} numbers in (0, 1)"),
        (betas is None and kind not in BETA_SCHEDULES, f"beta_schedule {kind!r} is not one of {', '.join(BETA_SCHEDULES)}"),
        (betas is None and not unit(s["beta_start"], s["beta_end"]),
         f"beta_start {s['beta_start']!r} and beta_end {s['beta_end']!r} must be numbers in (0, 1)"),
        (pred not in ("epsilon", "v_prediction", "sample"), f"prediction_type {pred!r} is not epsilon, v_prediction or sample"),
    ) if bad), None)
