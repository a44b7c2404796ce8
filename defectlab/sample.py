"""Sample a (fine-tuned) class-conditional DiT: guided sampler, per-sample seeds, bulk export.

``generate`` is the sampler. Guidance is DiT's: conditional and unconditional halves in one
forward, the null class is ``config.num_embeds_ada_norm`` (K after class surgery), and it is
applied to all latent channels (diffusers' ``DiTPipeline``) or to the first three only (the
original ``forward_with_cfg``, which gave FID 2.27 at scale 1.5). At scale 1 the
unconditional pass is skipped. Every image has its own ``torch.Generator`` seeded from
(seed, class name, index), so an image does not depend on batch size or batch companions.

``run(SampleConfig(...))`` writes MVTec-style PNGs ``<out>/<product>/test/<class>/<NNNN>.png``,
``manifest.jsonl``, ``sample_config.json`` and a grid figure; it is resumable and splits the
work across processes under ``accelerate launch``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from . import model as model_mod, paths, runs, viz
from .errors import DefectlabError

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
# ddpm: the original experiments found 100-500 steps best for the fine-tuned model (1000 worse)
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpmsolver": 25}
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
GRID_ROWS, GRID_CLASSES = 8, 16    # the saved grid figure shows at most this many rows / columns


@dataclass
class SampleConfig:
    run: str = "latest"            # run folder/name/number, latest, or base (the pre-trained model, its own class ids)
    model: str = "mini"            # base model sampled when run=base (mini | tiny | hub id | folder | .pt)
    classes: str = ""              # comma-separated class names ("" = all); for run=base: class ids
    per_class: int = 8             # images per class
    steps: int = 0                 # denoising steps (0 = scheduler default: ddpm 250, ddim 50, dpmsolver 25)
    guidance: float = 1.5          # classifier-free guidance scale (1 = off: one forward per step)
    cfg_channels: str = "all"      # all (diffusers DiTPipeline) | first3 (original DiT: latent channels 0-2)
    guidance_lo: float = 0.0       # guide only at timesteps t ≥ this (0..1000 scale)
    guidance_hi: float = 1000.0    # ... and t ≤ this
    scheduler: str = "ddpm"        # ddpm | ddim | dpmsolver (DPM-Solver++)
    timestep_spacing: str = "auto"  # auto | leading (0, s, …: 25 DDIM steps visit 960…0, never 999) | trailing (999, 959, …, 39: never 0) | linspace (999 … 0, both ends); auto = the original DiT's respacing for original-trained weights, else ddim trailing
    model_heads: int = 0           # run=base: attention heads of an original .pt whose width is not DiT-S/B/L/XL
    numerics: str = "auto"         # auto (the run's / model's own) | original (DiT's timestep frequencies) | diffusers (DiTPipeline's)
    seed: int = 0                  # image i of class c is seeded from (seed, c, i)
    batch_size: int = 16           # images per forward (never changes the images)
    checkpoint: str = "best"       # best | latest | step number
    out: str = ""                  # output folder ("" = <run>/samples/<tag>/)
    formats: str = "png"           # grid figure formats, comma-separated: png, pdf, svg
    image_size: int = 0            # image side in px (0 = the run's training size)


# sample_config.json fields that change pixels: an out folder is reused only if they all agree
# (per_class, classes, batch_size, out and formats may differ between calls)
PIXEL_FIELDS = ("run", "model", "checkpoint", "steps", "guidance", "cfg_channels", "guidance_lo",
                "guidance_hi", "scheduler", "timestep_spacing", "numerics", "seed", "image_size")


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
    # a peft wrapper (LoRA) hides the diffusers config one level down
    inner = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    return inner.config


def _check(steps, guidance, scheduler, cfg_channels, interval=None, num_train=1000) -> None:
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


@torch.no_grad()
def generate(transformer, codec, labels: list[int], generators: list[torch.Generator], steps: int | None = None,
             guidance: float = 1.5, scheduler: str = "ddpm", cfg_channels: str = "all",
             guidance_interval: tuple[float, float] | None = None, scheduler_config: dict | None = None,
             batch_size: int = 16, image_size: int | None = None, progress: bool = True,
             cond: torch.Tensor | None = None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             resample: int = 1, fast: bool | dict = False, timestep_spacing: str = "auto") -> torch.Tensor:
    """Images [N,3,H,W] in [-1, 1] (CPU, float32), image ``i`` of class ``labels[i]`` from ``generators[i]``.

    ``fast``: sample with ``engine.sampler(transformer)`` (bf16 on CUDA, fused q/k/v, tied
    conditioning, LoRA merged); a dict passes options, e.g. ``{"compile": "reduce-overhead"}``.

    ``timestep_spacing``: ``auto`` = the original DiT's respacing when the transformer computes with
    the original numerics (``model.set_numerics``), else ``SPACING``; or leading/trailing/linspace.

    ``steps=None`` = ``DEFAULT_STEPS[scheduler]`` (ddpm 250, ddim 50, dpmsolver 25). Guidance is
    applied at timesteps ``lo ≤ t ≤ hi`` of ``guidance_interval`` (None = all). DDPM uses the
    learned variance (``learned_range``); DDIM (eta 0) and DPM-Solver++ use the eps half; the
    guided eps replaces channels [0, k) and the rest (incl. variance) is the conditional half's.
    ``image_size`` None = the transformer's native latent size, else ``codec.latent_shape(size)``.
    ``scheduler_config`` None = DiT's training schedule, clipping x0 when ``codec.clip_sample``
    (pixel space; unclipped pixel samples saturate); pass ``Base.scheduler_config`` normally.

    Masks (masks.py): ``cond`` [N,c,h,w] extra input channels (the defect mask of a mask-conditioned
    model; area-resized to the latent grid), concatenated at every step, the same for both guidance
    halves. Inpainting: ``known`` [N,C,h,w] clean latents and ``keep`` [N,1,h,w] (1 = keep): before
    every step the kept region is ``known`` noised to that step (per-sample generators), and the
    result is blended with ``known``; ``resample`` > 1 re-noises each step and repeats it (RePaint).
    """
    steps = DEFAULT_STEPS.get(scheduler, 1) if steps is None else steps
    if scheduler_config is None:  # DiT's schedule; clip x0 where the codec says it is bounded (pixels)
        scheduler_config = {**TRAINING_SCHEDULE, "clip_sample": getattr(codec, "clip_sample", False)}
    _check(steps, guidance, scheduler, cfg_channels, guidance_interval,
           scheduler_config.get("num_train_timesteps", 1000))
    if batch_size < 1:
        raise DefectlabError(f"batch_size must be ≥ 1 (got {batch_size})")
    if len(labels) != len(generators):
        raise DefectlabError(f"{len(labels)} labels but {len(generators)} generators (one per image)")
    spacing = spacing_for(scheduler, model_mod.numerics_of(transformer), timestep_spacing)
    if fast:  # engine.sampler: a cached copy with fused q/k/v, tied conditioning, merged LoRA (bf16 on CUDA)
        from . import engine
        transformer = engine.sampler(transformer, **(fast if isinstance(fast, dict) else {}))
    conf = _dit_config(transformer)
    null = conf.num_embeds_ada_norm  # the null ("unconditional") class row, K after class surgery
    bad = [y for y in labels if not 0 <= int(y) < null]
    if bad:
        raise DefectlabError(f"class labels {bad} out of range: the model has {null} classes (0..{null - 1})")
    shape = tuple(codec.latent_shape(image_size)) if image_size else (conf.in_channels, conf.sample_size, conf.sample_size)
    if cond is not None and tuple(cond.shape[-2:]) != shape[1:]:  # masks: pixel grid → latent grid
        cond = torch.nn.functional.interpolate(cond.float(), size=shape[1:], mode="area")
    if (known is None) != (keep is None):
        raise DefectlabError("inpainting needs both known (clean latents) and keep (1 = region to keep)")
    if resample < 1 or (resample > 1 and scheduler == "dpmsolver"):  # DPM-Solver keeps multistep history
        raise DefectlabError(f"resample must be ≥ 1, and 1 with dpmsolver (got {resample})")
    if any(t is not None and (len(t) != len(labels) or tuple(t.shape[-2:]) != shape[1:]) for t in (known, keep)):
        raise DefectlabError(f"known/keep must be one [*, {shape[1]}, {shape[2]}] latent per image")
    param = next(transformer.parameters())
    was_training = transformer.training
    transformer.eval()  # label dropout off: eval mode is what makes the conditional pass conditional
    out = []
    bar = tqdm(total=-(-len(labels) // batch_size) * steps * resample, desc="sampling", unit="step",
               disable=not progress, leave=False)
    try:
        for start in range(0, len(labels), batch_size):
            y = torch.tensor([int(v) for v in labels[start:start + batch_size]], device=param.device)
            gens = list(generators[start:start + batch_size])
            part = [None if v is None else v[start:start + batch_size].to(param.device) for v in (cond, known, keep)]
            z = _denoise(transformer, y, gens, shape, null, steps, guidance, scheduler, cfg_channels,
                         guidance_interval, scheduler_config, param, bar, *part, resample, spacing)
            out.append(codec.decode(z).float().clamp(-1, 1).cpu())
    finally:
        bar.close()
        transformer.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, 0, 0)


def _denoise(transformer, y, gens, shape, null, steps, guidance, scheduler, cfg_channels, interval,
             scheduler_config, param, bar, extra=None, known=None, keep=None, resample=1,
             spacing=None) -> torch.Tensor:
    c = shape[0]
    learned = _dit_config(transformer).out_channels == 2 * c
    sched = make_scheduler(scheduler, scheduler_config, learned_sigma=learned, spacing=spacing)
    sched.set_timesteps(steps)
    # per-sample draws in float32 on the CPU (diffusers' randn_tensor does the same for a list)
    x = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]).to(param.device)
    x = x * sched.init_noise_sigma
    y_null = torch.full_like(y, null)
    k = c if cfg_channels == "all" else min(3, c)
    for t, last in ((t, r == resample - 1) for t in sched.timesteps for r in range(resample)):
        if known is not None:  # inpainting: the kept region is the known image noised to t
            x = keep * sched.add_noise(known, _noise(gens, shape, x), t.reshape(1)) + (1 - keep) * x
        guided = guidance != 1 and (interval is None or interval[0] <= float(t) <= interval[1])
        xin = sched.scale_model_input(x, t).to(param.dtype)
        if extra is not None:  # mask channel(s) (generate's cond), before the duplication: same for both halves
            xin = torch.cat([xin, extra.to(xin)], 1)
        if guided:  # one forward for both halves, as DiT does
            xin, labels = torch.cat([xin, xin]), torch.cat([y, y_null])
        else:
            labels = y
        tt = t.reshape(1).to(param.device).expand(len(xin))
        pred = transformer(xin, timestep=tt, class_labels=labels).sample.float()
        if guided:
            cond, uncond = pred.chunk(2)
            eps = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
            pred = torch.cat([eps, cond[:, k:]], dim=1)
        if not (scheduler == "ddpm" and learned):
            pred = pred[:, :c]
        # a list of generators: each sample's step noise comes from its own generator
        x = sched.step(pred, t, x, generator=gens).prev_sample
        if not last:  # RePaint: jump back from the previous timestep to t and denoise t again
            prev = int(sched.previous_timestep(t)) if hasattr(sched, "previous_timestep") else \
                int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
            ratio = sched.alphas_cumprod[int(t)] / (sched.alphas_cumprod[prev] if prev >= 0 else 1.0)
            x = ratio.sqrt().to(x) * x + (1 - ratio).sqrt().to(x) * _noise(gens, shape, x)
        bar.update(1)
    if known is not None:
        x = keep * known + (1 - keep) * x
    return x


def _noise(gens, shape, like) -> torch.Tensor:
    """Per-sample float32 CPU draws from each image's own generator (inpainting, RePaint)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]).to(like)


# ----------------------------------------------------------------------------- run(cfg)
@dataclass
class _Source:
    """What run() samples from: a fine-tuned run folder, or the pre-trained base."""
    model: torch.nn.Module
    codec: object
    scheduler_config: dict
    names: list[str]          # all class names (folder names); label = index, or the id for base
    labels: list[int]
    titles: list[str]         # figure column titles
    product: str
    folder: Path              # run folder (base: outputs/base/<model>) → samples/, figures/
    run: str                  # recorded in manifest / sample_config
    checkpoint: str
    spec: str
    image_size: int


def _load_source(cfg: SampleConfig, device) -> _Source:
    if cfg.run == "base":
        base = model_mod.load(cfg.model, device=device, numerics=cfg.numerics, heads=cfg.model_heads)
        k = _dit_config(base.transformer).num_embeds_ada_norm
        names = [str(i) for i in range(k)]
        known = base.class_names or []
        titles = [f"{i}: {known[i].split(',')[0]}" if i < len(known) else str(i) for i in range(k)]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model).strip("-")
        return _Source(base.transformer, base.codec, base.scheduler_config, names, list(range(k)), titles, "base",
                       paths.OUTPUTS / "base" / slug, "base", "base", base.spec,
                       cfg.image_size or base.default_image_size)
    folder = runs.resolve(cfg.run)
    ckpt = runs.find_checkpoint(folder, cfg.checkpoint)  # DefectlabError before the model loads
    from . import train

    r = train.restore(folder, checkpoint=cfg.checkpoint, device=device, numerics=cfg.numerics)
    size = cfg.image_size or r.config.get("image_size") or r.base.default_image_size
    return _Source(r.model, r.base.codec, r.base.scheduler_config, list(r.classes), list(range(len(r.classes))),
                   list(r.classes), r.config.get("product", "product"), folder, folder.name,
                   Path(r.checkpoint or ckpt).name, r.base.spec, size)


def _pick(cfg: SampleConfig, src: _Source) -> list[int]:
    """Indices into src.names of the classes asked for (all when empty)."""
    wanted = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if not wanted:
        return list(range(len(src.names)))
    unknown = [c for c in wanted if c not in src.names]
    if unknown:
        known = f"0..{len(src.names) - 1}" if cfg.run == "base" else ", ".join(src.names)
        raise DefectlabError(f"unknown class {', '.join(unknown)} (known: {known})")
    return [src.names.index(c) for c in dict.fromkeys(wanted)]


def _read_records(out: Path) -> dict[tuple[str, int], dict]:
    """Finished images: manifest + per-process parts of an interrupted call, file present."""
    done = {}
    for path in [out / "manifest.jsonl", *sorted(out.glob(".manifest-part-*.jsonl"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if (out / rec["file"]).is_file():
                    done[(rec["class"], rec["index"])] = rec
    return done


def _check_out(out: Path, resolved: dict) -> None:
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "sample_config.json").is_file():
        raise DefectlabError(f"out folder {out} is not empty and holds no sample_config.json: choose another --out")
    old = runs.read_json(out / "sample_config.json")
    # folders sampled before the fields existed used diffusers' numerics and the SPACING table
    old = {"numerics": "diffusers", "timestep_spacing": SPACING.get(old.get("scheduler"), ""), **old}
    diff = [f"{k}: {old.get(k)!r} ≠ {resolved[k]!r}" for k in PIXEL_FIELDS if old.get(k) != resolved[k]]
    if diff:
        raise DefectlabError(f"out folder {out} holds samples from a different configuration "
                             f"({'; '.join(diff)}): choose another --out")


def save_png(image: torch.Tensor, path: Path) -> Path:
    """[3,H,W] in [-1, 1] → 8-bit RGB PNG, written atomically."""
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return runs.atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def load_png(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def run(cfg: SampleConfig) -> Path:
    """Sample ``per_class`` images per class into the out folder (see module doc); returns it."""
    from accelerate import PartialState

    steps = cfg.steps or DEFAULT_STEPS.get(cfg.scheduler, 1)
    if cfg.steps < 0:
        raise DefectlabError(f"steps must be ≥ 1, or 0 for the scheduler default (got {cfg.steps})")
    _check(steps, cfg.guidance, cfg.scheduler, cfg.cfg_channels, (cfg.guidance_lo, cfg.guidance_hi))
    model_mod.check_numerics(cfg.numerics)
    spacing_for(cfg.scheduler, "diffusers", cfg.timestep_spacing)  # a bad name fails before the model loads
    if cfg.per_class < 1 or cfg.batch_size < 1:
        raise DefectlabError(f"per_class and batch_size must be ≥ 1 (got {cfg.per_class}, {cfg.batch_size})")
    bad = [f for f in cfg.formats.split(",") if f.strip() and f.strip().lower() not in viz.FORMATS]
    if bad:  # before sampling, not after an hour of it
        raise DefectlabError(f"unknown figure format {', '.join(bad)}; use {', '.join(viz.FORMATS)}")
    # several processes without CUDA (torchrun on a CPU box) need accelerate's gloo backend
    state = PartialState(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    src = _load_source(cfg, str(state.device))
    chosen = _pick(cfg, src)
    interval = None if cfg.guidance_lo <= 0 and cfg.guidance_hi >= 1000 else (cfg.guidance_lo, cfg.guidance_hi)
    numerics = model_mod.numerics_of(src.model)
    spacing = spacing_for(cfg.scheduler, numerics, cfg.timestep_spacing)
    tag = (f"{src.checkpoint}-{cfg.scheduler}{steps}-g{cfg.guidance:g}-{cfg.cfg_channels}"
           + (f"-t{cfg.guidance_lo:g}-{cfg.guidance_hi:g}" if interval else "")
           + (f"-{spacing}" if cfg.timestep_spacing != "auto" else "")
           + (f"-{numerics}" if cfg.numerics != "auto" else "") + f"-s{cfg.seed}-{src.image_size}px")
    out = Path(cfg.out) if cfg.out else src.folder / "samples" / tag
    resolved = {**dataclasses.asdict(cfg), "run": src.run, "model": src.spec, "checkpoint": src.checkpoint,
                "steps": steps, "image_size": src.image_size, "out": str(out),
                "numerics": numerics, "timestep_spacing": spacing,
                "classes": ",".join(src.names[j] for j in chosen)}
    _check_out(out, resolved)
    done = _read_records(out)
    state.wait_for_everyone()  # everyone has checked and read before anything is written
    if state.is_main_process:
        runs.write_json(out / "sample_config.json", resolved)
    out.mkdir(parents=True, exist_ok=True)

    work = [(j, i) for j in chosen for i in range(cfg.per_class) if (src.names[j], i) not in done]
    mine = work[state.process_index::state.num_processes]  # seeds do not depend on who samples
    part = out / f".manifest-part-{state.process_index}.jsonl"
    common = {"seed": cfg.seed, "steps": steps, "guidance": cfg.guidance, "cfg_channels": cfg.cfg_channels,
              "guidance_interval": interval, "scheduler": cfg.scheduler, "timestep_spacing": spacing,
              "numerics": numerics, "run": src.run, "checkpoint": src.checkpoint}
    bar = tqdm(total=len(mine), desc=f"images → {out.name}", unit="img", disable=not state.is_main_process)
    for start in range(0, len(mine), cfg.batch_size):
        chunk = mine[start:start + cfg.batch_size]
        gens = [generators(cfg.seed, src.names[j], [i])[0] for j, i in chunk]
        images = generate(src.model, src.codec, [src.labels[j] for j, _ in chunk], gens, steps, cfg.guidance,
                          cfg.scheduler, cfg.cfg_channels, interval, src.scheduler_config, cfg.batch_size,
                          src.image_size, progress=state.is_main_process, timestep_spacing=spacing)
        lines = []
        for (j, i), img in zip(chunk, images):
            rel = f"{src.product}/test/{src.names[j]}/{i:04d}.png"
            save_png(img, runs.safe_join(out, rel))
            lines.append(json.dumps({"file": rel, "class": src.names[j], "label": src.labels[j], "index": i,
                                     "sample_seed": sample_seed(cfg.seed, src.names[j], i), **common}))
        with open(part, "a") as f:  # one write per batch: a kill loses at most this batch
            f.write("\n".join(lines) + "\n")
        bar.update(len(chunk))
    bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        records = sorted(_read_records(out).values(), key=lambda r: (r["class"], r["index"]))
        runs.write_text(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        for p in out.glob(".manifest-part-*.jsonl"):
            p.unlink()
        _grid(out, src, chosen, cfg, steps, tag)
    state.wait_for_everyone()
    return out


def _grid(out: Path, src: _Source, chosen: list[int], cfg: SampleConfig, steps: int, tag: str) -> None:
    cols, rows = chosen[:GRID_CLASSES], min(cfg.per_class, GRID_ROWS)
    images = torch.stack([load_png(out / f"{src.product}/test/{src.names[j]}/{i:04d}.png")
                          for j in cols for i in range(rows)])
    title = f"{src.run} · {cfg.scheduler} {steps} steps · guidance {cfg.guidance:g} ({cfg.cfg_channels})"
    fig = viz.grid_figure(images, [src.titles[j] for j in cols], rows, title=title)
    viz.save_figure(fig, src.folder / "figures", f"samples-{tag}", cfg.formats)
