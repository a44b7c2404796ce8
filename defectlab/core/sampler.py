"""The guided sampler core: per-image seeds, schedulers, timestep spacing, and ``generate``.

Guidance is DiT's: conditional and unconditional halves in one forward, the null class is
``config.num_embeds_ada_norm`` (K after class surgery), applied to all latent channels (diffusers'
``DiTPipeline``) or to the first three only (the original ``forward_with_cfg``, which gave FID
2.27 at scale 1.5). At scale 1 the unconditional pass is skipped. Every image has its own
``torch.Generator`` seeded from (seed, class name, index), so an image does not depend on batch
size or batch companions. ``sample.py`` (the stage) writes images to disk; this module only draws.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ..base.errors import DefectlabError
from ..base.progress import tqdm
from . import model as model_mod

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
# ddpm: the original experiments found 100-500 steps best for the fine-tuned model (1000 worse)
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpmsolver": 25}
GUIDANCE = 1.5  # DiT's classifier-free guidance scale (its FID-best): every default guidance in the package is this one
CFG_CHANNELS = ("all", "first3")
# DiT's training schedule, used when the caller has none (model.Base.scheduler_config normally)
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                     "beta_end": 0.02, "variance_type": "learned_range"}
# How inference steps are spaced is a sampling choice, not part of the training schedule.
# "auto" follows the model's numerics (model.NUMERICS). For weights trained by the original
# DiT code it is the original's respacing: "250" (DDPM) visits round(i * 999 / 249) = 999 … 0,
# diffusers' "linspace"; "ddimN" visits 0, s, 2s, … with s = 1000 / N, i.e. 960 … 0 for 25
# steps, diffusers' DDIM "leading" (equal to the original whenever N divides 1000). For
# defectlab's own models "auto" keeps what they have always sampled with: DDIM "trailing"
# (999, 959, …, 39). No clipping for latents: DiT samples with clip_denoised=False.
SPACINGS = ("leading", "trailing", "linspace")
SPACING = {"ddpm": "linspace", "ddim": "trailing", "dpmsolver": "linspace"}            # diffusers numerics
ORIGINAL_SPACING = {"ddpm": "linspace", "ddim": "leading", "dpmsolver": "linspace"}   # original numerics


def sample_seed(seed: int, class_name: str, index: int) -> int:
    """Stable across processes and machines (crc32, not Python's salted ``hash``)."""
    return zlib.crc32(f"{seed}/{class_name}/{index}".encode())


def generators(seed: int, class_name: str, indices) -> list[torch.Generator]:
    """One CPU generator per image: CPU draws are the same on every device."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, class_name, i)) for i in indices]


def spacing_for(scheduler: str, numerics: str, spacing: str = "auto") -> str:
    """The timestep spacing ``auto`` stands for, given the model's numerics (see ``SPACING``)."""
    if spacing not in ("auto", *SPACINGS):
        raise DefectlabError(f"unknown timestep_spacing {spacing!r}; choose auto, {', '.join(SPACINGS)}")
    if spacing != "auto":
        return spacing
    return (ORIGINAL_SPACING if numerics == "original" else SPACING)[scheduler]


def make_scheduler(name: str, scheduler_config: dict | None = None, learned_sigma: bool = True,
                   spacing: str | None = None):
    """A fresh scheduler (multistep solvers keep state) built from the training schedule;
    ``spacing`` None = ``SPACING[name]`` (diffusers numerics' default)."""
    if name not in SCHEDULERS:
        raise DefectlabError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    # clip_sample comes from the base: on for pixel-space models (x0 lives in [-1, 1]), off for
    # VAE latents, as the original DiT samples
    cfg = {"clip_sample": False, **(scheduler_config or TRAINING_SCHEDULE),
           "timestep_spacing": spacing or SPACING[name]}
    if name == "ddpm":
        # learned_range needs the variance half of the output; a model without it uses DiT's fixed_large
        if not learned_sigma and cfg.get("variance_type") in ("learned", "learned_range"):
            cfg["variance_type"] = "fixed_large"
    else:
        # DDIM/DPM-Solver take the eps half only (DPM-Solver's learned_range slices [:, :3])
        cfg["variance_type"] = None
    if name == "dpmsolver":
        cfg["algorithm_type"] = "dpmsolver++"
    return SCHEDULERS[name].from_config(cfg)


def _dit_config(transformer):
    return model_mod.unwrap(transformer).config


def check(steps, guidance, scheduler, cfg_channels, interval=None, num_train=1000) -> None:
    """One-line errors for bad sampling settings, before anything loads."""
    if scheduler not in SCHEDULERS:
        raise DefectlabError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if cfg_channels not in CFG_CHANNELS:
        raise DefectlabError(f"unknown cfg_channels {cfg_channels!r}; choose one of {', '.join(CFG_CHANNELS)}")
    if steps is not None and not 1 <= steps <= num_train:
        raise DefectlabError(f"steps must be between 1 and {num_train} (got {steps})")
    if not guidance >= 0:
        raise DefectlabError(f"guidance must be ≥ 0 (got {guidance})")
    if interval is not None and not interval[0] <= interval[1]:
        raise DefectlabError(f"guidance interval must have lo ≤ hi (got {tuple(interval)})")


@dataclass(frozen=True)
class Sampling:
    """How to denoise: the settings the CLI's sampling flags fill (the rest of ``generate``'s
    arguments are the data and how to run it)."""
    steps: int | None = None                           # None = DEFAULT_STEPS[scheduler]
    guidance: float = GUIDANCE                         # classifier-free guidance scale (1 = off)
    scheduler: str = "ddpm"                            # ddpm | ddim | dpmsolver
    cfg_channels: str = "all"                          # all (DiTPipeline) | first3 (the original DiT)
    guidance_interval: tuple[float, float] | None = None  # guide only at lo ≤ t ≤ hi (None = every step)
    timestep_spacing: str = "auto"                     # auto | leading | trailing | linspace (spacing_for)
    resample: int = 1                                  # inpainting: RePaint repeats per step
    strength: float = 1.0                              # with ``init``: start from it noised this far into the schedule (SDEdit; 1 = from noise)

    def skipped(self) -> int:
        """Steps an ``init`` image saves: the schedule's first ``1 - strength`` share (never all)."""
        return min(int(round(self.steps * (1 - self.strength))), self.steps - 1) if self.strength < 1 else 0

    def resolved(self, transformer, num_train: int = 1000) -> "Sampling":
        """Defaults filled from the model (steps, spacing by its numerics); bad values refused."""
        steps = DEFAULT_STEPS.get(self.scheduler, 1) if self.steps is None else self.steps
        check(steps, self.guidance, self.scheduler, self.cfg_channels, self.guidance_interval, num_train)
        if self.resample < 1 or (self.resample > 1 and self.scheduler == "dpmsolver"):  # multistep history
            raise DefectlabError(f"resample must be ≥ 1, and 1 with dpmsolver (got {self.resample})")
        if not 0 < self.strength <= 1:
            raise DefectlabError(f"strength must be in (0, 1] (got {self.strength})")
        spacing = spacing_for(self.scheduler, model_mod.numerics_of(transformer), self.timestep_spacing)
        return dataclasses.replace(self, steps=steps, timestep_spacing=spacing)


SAMPLING_FIELDS = ("scheduler", "steps", "guidance", "timestep_spacing")  # what a distilled run fixes


def distilled(cfg, run_config: dict, say=print):
    """A stage's settings (``SampleConfig``, ``MaskSampleConfig``, ``BenchmarkConfig``) for a run:
    a distilled student (``run_config["distilled"]``, see ``distill.py``) samples as it was
    distilled to — DDIM, its steps and spacing, guidance 1 — when every sampling field is left
    at the stage's default; settings given explicitly are kept as given."""
    how = run_config.get("distilled")
    fields = [f for f in SAMPLING_FIELDS if hasattr(cfg, f)]
    if not how or any(getattr(cfg, f) != getattr(type(cfg)(), f) for f in fields):
        return cfg
    say(f"distilled run: sampling as distilled, {how['scheduler']} {how['steps']} steps, guidance 1 "
        f"(the teacher's {how['teacher_guidance']:g} is distilled in)")
    return dataclasses.replace(cfg, **{f: how[f] for f in fields})


@torch.no_grad()
def generate(transformer, codec, labels: list[int], generators: list[torch.Generator],
             sampling: Sampling | None = None, *, scheduler_config: dict | None = None,
             image_size: int | None = None, batch_size: int = 16, progress: bool = True,
             cond: torch.Tensor | None = None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             init: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """Images [N,3,H,W] in [-1, 1] (CPU, float32), image ``i`` of class ``labels[i]`` from ``generators[i]``.

    ``sampling`` (or its fields as keywords, e.g. ``steps=25, scheduler="ddim"``): how to denoise.
    Guidance is applied at timesteps ``lo ≤ t ≤ hi`` of ``guidance_interval``. DDPM uses the
    learned variance (``learned_range``); DDIM (eta 0) and DPM-Solver++ use the eps half; the
    guided eps replaces channels [0, k) and the rest (incl. variance) is the conditional half's.
    ``timestep_spacing`` ``auto`` = the original DiT's respacing when the transformer computes with
    the original numerics (``model.set_numerics``), else ``SPACING``.

    ``image_size`` None = the transformer's native latent size, else ``codec.latent_shape(size)``.
    ``scheduler_config`` None = DiT's training schedule, clipping x0 when ``codec.clip_sample``
    (pixel space; unclipped pixel samples saturate); pass ``Base.scheduler_config`` normally.
    The fast sampling copy (fused q/k/v, tied conditioning, LoRA merged, bf16 on CUDA) is a
    transformer like any other: pass ``engine.sampler(transformer, **options)``.

    Masks (masks.py): ``cond`` [N,c,h,w] extra input channels (the defect mask of a mask-conditioned
    model; area-resized to the latent grid), concatenated at every step, the same for both guidance
    halves. Inpainting: ``known`` [N,C,h,w] clean latents and ``keep`` [N,1,h,w] (1 = keep): before
    every step the kept region is ``known`` noised to that step (per-sample generators), and the
    result is blended with ``known``; ``resample`` > 1 re-noises each step and repeats it (RePaint).
    ``init`` [N,C,h,w] clean latents to start from (SDEdit, Meng et al. 2022): noised to the
    timestep a ``strength`` share from the end of the schedule, then denoised from there.
    """
    if unknown := set(settings) - {f.name for f in dataclasses.fields(Sampling)}:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    if scheduler_config is None:  # DiT's schedule; clip x0 where the codec says it is bounded (pixels)
        scheduler_config = {**TRAINING_SCHEDULE, "clip_sample": getattr(codec, "clip_sample", False)}
    plan = dataclasses.replace(sampling or Sampling(), **settings).resolved(
        transformer, scheduler_config.get("num_train_timesteps", 1000))
    if batch_size < 1:
        raise DefectlabError(f"batch_size must be ≥ 1 (got {batch_size})")
    if len(labels) != len(generators):
        raise DefectlabError(f"{len(labels)} labels but {len(generators)} generators (one per image)")
    conf = _dit_config(transformer)
    null = conf.num_embeds_ada_norm  # the null ("unconditional") class row, K after class surgery
    bad = [y for y in labels if not 0 <= int(y) <= null]  # null itself: the unconditional sample (a run's "good")
    if bad:
        raise DefectlabError(f"class labels {bad} out of range: the model has {null} classes (0..{null - 1}, "
                             f"{null} = unconditional)")
    shape = tuple(codec.latent_shape(image_size)) if image_size else (conf.in_channels, conf.sample_size, conf.sample_size)
    if cond is not None and tuple(cond.shape[-2:]) != shape[1:]:  # masks: pixel grid → latent grid
        cond = torch.nn.functional.interpolate(cond.float(), size=shape[1:], mode="area")
    if (known is None) != (keep is None):
        raise DefectlabError("inpainting needs both known (clean latents) and keep (1 = region to keep)")
    if any(t is not None and (len(t) != len(labels) or tuple(t.shape[-2:]) != shape[1:]) for t in (known, keep, init)):
        raise DefectlabError(f"known/keep/init must be one [*, {shape[1]}, {shape[2]}] latent per image")
    if (init is None) != (plan.strength == 1):
        raise DefectlabError("an init image and a strength below 1 go together (strength 1 = from noise)")
    param = next(transformer.parameters())
    was_training = transformer.training
    transformer.eval()  # label dropout off: eval mode is what makes the conditional pass conditional
    out = []
    bar = tqdm(total=-(-len(labels) // batch_size) * (plan.steps - plan.skipped()) * plan.resample, desc="sampling", unit="step",
               disable=not progress, leave=False)
    try:
        for start in range(0, len(labels), batch_size):
            y = torch.tensor([int(v) for v in labels[start:start + batch_size]], device=param.device)
            part = [None if v is None else v[start:start + batch_size].to(param.device) for v in (cond, known, keep, init)]
            batch = _Batch(y, list(generators[start:start + batch_size]), *part)
            z = _denoise(transformer, plan, scheduler_config, batch, shape, param, bar)
            out.append(codec.decode(z).float().clamp(-1, 1).cpu())
    finally:
        bar.close()
        transformer.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, 0, 0)


@dataclass
class _Batch:
    """One batch's data: labels, per-image generators, and the optional mask channel / inpainting."""
    y: torch.Tensor
    gens: list
    cond: torch.Tensor | None = None
    known: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    init: torch.Tensor | None = None


def _denoise(transformer, plan: Sampling, scheduler_config: dict, b: _Batch, shape, param, bar) -> torch.Tensor:
    c, conf = shape[0], _dit_config(transformer)
    learned = conf.out_channels == 2 * c
    sched = make_scheduler(plan.scheduler, scheduler_config, learned_sigma=learned, spacing=plan.timestep_spacing)
    sched.set_timesteps(plan.steps)
    x = _noise(b.gens, shape, param) * sched.init_noise_sigma
    timesteps = sched.timesteps
    if b.init is not None:  # SDEdit: the init image noised to the first timestep kept
        skip = plan.skipped()
        timesteps = timesteps[skip:]
        x = sched.add_noise(b.init.float(), x, timesteps[:1])
        if hasattr(sched, "set_begin_index"):  # multistep solvers index their sigmas from here
            sched.set_begin_index(skip)
    y_null = torch.full_like(b.y, conf.num_embeds_ada_norm)
    k = c if plan.cfg_channels == "all" else min(3, c)
    interval = plan.guidance_interval
    for t, last in ((t, r == plan.resample - 1) for t in timesteps for r in range(plan.resample)):
        if b.known is not None:  # inpainting: the kept region is the known image noised to t
            x = b.keep * sched.add_noise(b.known, _noise(b.gens, shape, x), t.reshape(1)) + (1 - b.keep) * x
        guided = plan.guidance != 1 and (interval is None or interval[0] <= float(t) <= interval[1])
        xin = sched.scale_model_input(x, t).to(param.dtype)
        if b.cond is not None:  # mask channel(s), before the duplication: the same for both halves
            xin = torch.cat([xin, b.cond.to(xin)], 1)
        if guided:  # one forward for both halves, as DiT does
            xin, labels = torch.cat([xin, xin]), torch.cat([b.y, y_null])
        else:
            labels = b.y
        tt = t.reshape(1).to(param.device).expand(len(xin))
        pred = transformer(xin, timestep=tt, class_labels=labels).sample.float()
        if guided:
            cond, uncond = pred.chunk(2)
            eps = uncond[:, :k] + plan.guidance * (cond[:, :k] - uncond[:, :k])
            pred = torch.cat([eps, cond[:, k:]], dim=1)
        if not (plan.scheduler == "ddpm" and learned):
            pred = pred[:, :c]
        # a list of generators: each sample's step noise comes from its own generator
        x = sched.step(pred, t, x, generator=b.gens).prev_sample
        if not last:  # RePaint: jump back from the previous timestep to t and denoise t again
            prev = int(sched.previous_timestep(t)) if hasattr(sched, "previous_timestep") else \
                int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
            ratio = sched.alphas_cumprod[int(t)] / (sched.alphas_cumprod[prev] if prev >= 0 else 1.0)
            x = ratio.sqrt().to(x) * x + (1 - ratio).sqrt().to(x) * _noise(b.gens, shape, x)
        bar.update(1)
    if b.known is not None:
        x = b.keep * b.known + (1 - b.keep) * x
    return x


def _noise(gens, shape, like) -> torch.Tensor:
    """Per-sample float32 CPU draws from each image's own generator (diffusers' randn_tensor does
    the same for a list of generators), on ``like``'s device; the state stays float32."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]).to(like.device)
