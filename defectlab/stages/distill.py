"""Distil a fine-tuned run into a cheaper student: fewer sampling steps, or a smaller DiT.

``run(DistillConfig(...))`` (``defectlab distill``, notebook 05, sweeps) writes a run folder like
a fine-tune's (``config.json``, ``classes.json``, ``split.json``, checkpoints), so ``sample``,
``synthesize``, ``benchmark``, ``evaluate`` and ``export`` take the student as any run. Its
``config.json`` records ``distilled``: the sampler it was made for (DDIM, its steps and spacing,
guidance 1: the teacher's guidance is inside the student), which those stages use whenever their
own sampling settings are left at their defaults (``sampler.distilled``).

The student starts from the teacher: the teacher's model merged into a plain DiT (LoRA merged,
DiffFit's γ folded, VPT prompts kept; ``restore.plain``) and saved as ``<student>/base/``, trained
with method ``full``.

- ``steps``: progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling
  of Diffusion Models", ICLR 2022, Algorithm 2), with the teacher's classifier-free guidance
  distilled in on the way (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023):
  the first phase's teacher is the guided teacher (two forwards per step), every later phase's is
  the previous phase's student. The teacher samples DDIM on ``student_steps × 2^phases`` steps;
  each phase trains a student to make, in one DDIM step from t to s, its teacher's two steps
  t → (t+s)//2 → s. The last grid is exactly the (t, t − 1000 // n) pairs the sampler's DDIM visits
  in n = ``student_steps`` steps. Target (their eq. 8): x̃ = (z_s − σ_s/σ_t · z_t) / (α_s − σ_s/σ_t · α_t),
  learnt in the student's own output (noise, or v for the small bases).
- ``size``: a DiT with fewer blocks — the teacher's evenly spaced blocks, embeddings and output
  layer to start from (DistilBERT's layer init, Sanh et al. 2019) — trained to give the teacher's
  guided output (noise or v, and the variance channels) at every timestep on the teacher's
  training images noised: distillation of the denoiser (Hinton et al. 2015), guidance included.

Both take their optimizer steps through ``loop.Stepper`` and checkpoint with ``loop.save``. Every
draw (images, views, timesteps, noise, dropped labels) is keyed by (seed, step), so a resumed
distillation trains bit for bit as one that never stopped; phase p's teacher is kept in
``teachers/`` for that.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import folders, runs
from ..base.errors import DefectlabError
from ..base.progress import tqdm
from ..data import dataset, product, sources as data_mod
from ..core import loop, methods, restore, sampler
from ..core.diffusion import Objective
from ..core.model import PROMPTS, SIDECAR

MODES = ("steps", "size")
BASE, TEACHERS = "base", "teachers"   # the student's own starting model, phase teachers (in its run folder)


@dataclass
class DistillConfig:
    run: str = "latest"            # the teacher: run folder/name/number, or latest
    checkpoint: str = "best"       # the teacher's checkpoint: best | latest | step number
    mode: str = "steps"            # steps (a student sampling in student_steps DDIM steps) | size (a DiT with fewer blocks)
    student_steps: int = 4         # steps: the student's DDIM steps (its first teacher samples in student_steps × 2^phases)
    phases: int = 3                # steps: halvings of the teacher's step count, iterations optimizer steps each
    student_layers: int = 0        # size: the student's transformer blocks (0 means the most that keep it within a quarter of the teacher's parameters, at least 1)
    sample_steps: int = 20         # size: DDIM steps the student samples with by default (any count works)
    guidance: float = sampler.GUIDANCE  # the teacher's classifier-free guidance, distilled in: the student samples at guidance 1
    iterations: int = 300          # optimizer steps (per phase in steps mode)
    batch_size: int = 8            # images per optimizer step
    lr: float = 0.0                # 0 means the teacher's fine-tuning lr
    grad_clip: float = 1.0         # max gradient norm (0 means off)
    label_dropout: float = -1.0    # share of labels drawn as the null class (the unconditional / good class); -1 means the teacher's
    name: str = ""                 # the student's run name ("" means <teacher>-<mode>)
    runs_dir: str = ""             # parent of the student's run folder ("" means the teacher's)
    resume: str = ""               # a student run folder/name/number to continue (its saved settings)
    keep_checkpoints: int = 2      # newest checkpoints kept
    checkpoint_every: int = 100    # checkpoint every N optimizer steps (and at the end of each phase)
    seed: int = 0                  # keys every draw: images, views, timesteps, noise, dropped labels
    progress: bool = True          # tqdm progress bar


def _check(cfg: DistillConfig) -> None:
    if cfg.mode not in MODES:
        raise DefectlabError(f"mode must be steps or size (got {cfg.mode!r})")
    for key in ("student_steps", "phases", "sample_steps", "iterations", "batch_size", "keep_checkpoints",
                "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"--{key.replace('_', '-')} must be ≥ 1 (got {getattr(cfg, key)})")
    if cfg.student_layers < 0:
        raise DefectlabError(f"--student-layers must be ≥ 0 (got {cfg.student_layers})")
    if not (cfg.guidance >= 1 and cfg.lr >= 0 and cfg.grad_clip >= 0 and math.isfinite(cfg.lr)):
        raise DefectlabError(f"guidance must be ≥ 1, lr and grad_clip ≥ 0 (got {cfg.guidance}, {cfg.lr}, {cfg.grad_clip})")
    if not (cfg.label_dropout == -1 or 0 <= cfg.label_dropout < 1):
        raise DefectlabError(f"label_dropout must be in [0, 1), or -1 for the teacher's (got {cfg.label_dropout})")


# ----------------------------------------------------------------------------- grids and DDIM
def grids(scheduler_config: dict, spacing: str, steps: int, phases: int) -> list[list[tuple[int, int]]]:
    """The (t, s) pairs of each level: level 0 is the sampler's own DDIM pairs for ``steps``
    (s = −1: the end, ᾱ = 1), level ℓ + 1 splits each pair of level ℓ in two; phase p's student
    learns level ``phases − 1 − p`` from its teacher's two steps on level ``phases − p``."""
    sched = sampler.make_scheduler("ddim", scheduler_config, spacing=spacing)
    sched.set_timesteps(steps)
    jump = sched.config.num_train_timesteps // steps
    levels = [[(int(t), max(int(t) - jump, -1)) for t in sched.timesteps]]  # before 0: the clean end
    for _ in range(phases):
        finer = []
        for t, s in levels[-1]:
            m = (t + s) // 2
            if not t > m > s:
                raise DefectlabError(f"--student-steps {steps} × 2^{phases} does not fit the schedule's "
                                     f"{sched.config.num_train_timesteps} timesteps: use fewer phases")
            finer += [(t, m), (m, s)]
        levels.append(finer)
    return levels


class _Noise:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) of the training schedule, with t = −1 the clean end."""

    def __init__(self, objective: Objective):
        self.a = torch.cat([objective.buffers["sqrt_abar"], torch.ones(1, device=objective.buffers["sqrt_abar"].device)])
        self.s = torch.cat([objective.buffers["sqrt_1m_abar"], torch.zeros(1, device=self.a.device)])

    def __call__(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, *([1] * (ndim - 1)))
        return self.a[t].view(shape), self.s[t].view(shape)   # index −1: the appended clean end


def _ddim(x: torch.Tensor, eps: torch.Tensor, t, s, noise: _Noise, clip: bool) -> torch.Tensor:
    """One DDIM (η = 0) step t → s, as diffusers' (x0 clipped in pixel space, eps recomputed)."""
    a_t, s_t = noise(t, x.ndim)
    a_s, s_s = noise(s, x.ndim)
    x0 = (x - s_t * eps) / a_t
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - a_t * x0) / s_t
    return a_s * x0 + s_s * eps


def jump(z_t: torch.Tensor, z_s: torch.Tensor, t, s, noise: _Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x0, eps) with which one DDIM step t → s lands on ``z_s`` (Salimans & Ho 2022, eq. 8):
    x̃ = (z_s − σ_s/σ_t · z_t) / (α_s − σ_s/σ_t · α_t), ε̃ = (z_t − α_t x̃) / σ_t."""
    a_t, s_t = noise(t, z_t.ndim)
    a_s, s_s = noise(s, z_t.ndim)
    x0 = (z_s - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)
    return x0, (z_t - a_t * x0) / s_t


def _predict(net, z, t, labels, guidance: float, null: int) -> torch.Tensor:
    """The model output with classifier-free guidance on the whole prediction half (variance: the
    conditional half's), as ``sampler.generate`` applies it."""
    if guidance == 1:
        return net(z, timestep=t, class_labels=labels).sample.float()
    out = net(torch.cat([z, z]), timestep=torch.cat([t, t]),
              class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample.float()
    cond, uncond = out.chunk(2)
    c = z.shape[1]
    return torch.cat([uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], 1)


# ----------------------------------------------------------------------------- the student's base
def shrink(net: torch.nn.Module, layers: int) -> tuple[torch.nn.Module, list[int]]:
    """A DiT of ``layers`` blocks: the teacher's evenly spaced blocks (first and last kept), all
    embeddings and the output layer; returns the model and the kept block indices."""
    n = len(net.transformer_blocks)
    kept = sorted({round(i * (n - 1) / max(layers - 1, 1)) for i in range(layers)})
    small = type(net).from_config({**net.config, "num_layers": len(kept)})
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("transformer_blocks."):
            i, rest = key.split(".", 2)[1:]
            if int(i) in kept:
                state[f"transformer_blocks.{kept.index(int(i))}.{rest}"] = value
        else:
            state[key] = value
    small.load_state_dict(state, strict=True)
    return small, kept


def quarter(net: torch.nn.Module) -> int:
    """The most blocks that keep ``shrink(net, n)`` within a quarter of ``net``'s parameters (≥ 1)."""
    total = count(net)
    block = count(net.transformer_blocks[0])
    return max(1, (total // 4 - (total - block * len(net.transformer_blocks))) // block)


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def write_base(out: Path, teacher: restore.Restored, net: torch.nn.Module, layers: int = 0) -> Path:
    """The student's starting model as a model folder ``model.load`` reads: ``net``, the teacher
    merged (``restore.plain``: its own K classes), shrunk to ``layers`` blocks when given."""
    kept = None
    if layers:
        net, kept = shrink(net, layers)
    prompts = getattr(teacher.model, "prompts", None)
    sidecar = {"id2label": {str(i): c for i, c in enumerate(teacher.classes)},
               "defectlab_numerics": teacher.config["numerics"],
               "defectlab_image_size": teacher.config.get("image_size") or teacher.base.default_image_size}
    with folders.building(out) as tmp:
        net.save_pretrained(tmp / "transformer")
        runs.write_json(runs.ensure_dir(tmp / "scheduler", "scheduler folder") / "scheduler_config.json",
                        teacher.base.scheduler_config)
        if hasattr(teacher.base.codec, "vae"):
            teacher.base.codec.vae.save_pretrained(tmp / "vae")
        if prompts is not None:  # deep prompts: the kept blocks' rows
            weight = prompts.weight.detach().float()
            weight = weight[kept] if kept is not None and prompts.deep else weight
            runs.save_tensors(tmp / PROMPTS, {"weight": weight.contiguous()})
            sidecar["defectlab_prompts"] = prompts.settings
        runs.write_json(tmp / SIDECAR, sidecar)
    return Path(out)


# ----------------------------------------------------------------------------- run(cfg)
def run(cfg: DistillConfig) -> Path:
    """Distil; returns the student's run folder. Everything is checked before the folder exists,
    and a new run that fails before its first checkpoint leaves no folder behind."""
    folder = None
    if cfg.resume:
        folder = runs.resolve(cfg.resume, cfg.runs_dir or None)
        how = runs.load_config(folder).get("distilled")
        if not how:
            raise DefectlabError(f"--resume {folder}: not a distilled run (its config.json has no 'distilled')")
        cfg = dataclasses.replace(DistillConfig(**how["settings"]), progress=cfg.progress)
    _check(cfg)
    teacher_folder = runs.resolve(cfg.run)
    runs.find_checkpoint(teacher_folder, cfg.checkpoint)  # one line when the teacher has no checkpoint
    saved = runs.load_config(teacher_folder)
    if saved.get("distilled") and folder is None:
        raise DefectlabError(f"run {teacher_folder.name} is itself a distilled student: distil its teacher instead")
    if saved.get("mask_condition"):
        raise DefectlabError(f"run {teacher_folder.name} is mask-conditioned: distillation does not support the mask input")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = restore.restore(teacher_folder, cfg.checkpoint, device=device)
    plain = restore.plain(teacher.model)
    depth = len(plain.transformer_blocks)
    layers = (cfg.student_layers or quarter(plain)) if cfg.mode == "size" else 0
    if layers and layers >= depth:
        raise DefectlabError(f"--student-layers {layers}: the student must be smaller than its teacher "
                             f"({depth} blocks)")
    spacing = sampler.spacing_for("ddim", teacher.config["numerics"])
    if cfg.mode == "steps" and spacing != "trailing":  # leading DDIM ends on t = 0, a step no grid can halve
        raise DefectlabError(f"--mode steps needs DDIM's trailing timestep spacing, and run {teacher_folder.name} "
                             f"computes with the original DiT's numerics (DDIM {spacing}): use --mode size")
    levels = grids(teacher.base.scheduler_config, spacing, cfg.student_steps, cfg.phases) if cfg.mode == "steps" else None
    cfg = dataclasses.replace(cfg, run=str(teacher_folder), lr=cfg.lr or saved["lr"],
                              label_dropout=saved.get("label_dropout", 0.1) if cfg.label_dropout < 0 else cfg.label_dropout,
                              name=cfg.name or f"{teacher_folder.name.split('-', 1)[-1]}-{cfg.mode}", student_layers=layers)
    how = {"mode": cfg.mode, "teacher": teacher_folder.name, "teacher_checkpoint": Path(teacher.checkpoint).name,
           "teacher_guidance": cfg.guidance, "scheduler": "ddim", "timestep_spacing": spacing, "guidance": 1.0,
           "steps": cfg.student_steps if cfg.mode == "steps" else cfg.sample_steps,
           "teacher_steps": cfg.student_steps * 2 ** cfg.phases if cfg.mode == "steps" else cfg.sample_steps,
           "teacher_layers": depth, "student_layers": layers or depth, "teacher_params": count(plain),
           "student_params": count(shrink(plain, layers)[0]) if layers else count(plain),
           "settings": dataclasses.asdict(cfg)}
    new = folder is None
    if new:
        config = {**saved, "model": "", "method": "full", "name": cfg.name, "lr": cfg.lr, "resume": "",
                  "tie_embeddings": False, "model_heads": 0, "distilled": how}
        folder = runs.create(cfg.name, config, base=Path(cfg.runs_dir) if cfg.runs_dir else teacher_folder.parent)
    try:
        with runs.lock(folder):
            if new:
                base = write_base(folder / BASE, teacher, plain, layers)
                runs.update_config(folder, model=str(base.resolve()))
                for name in ("classes.json", "split.json", product.RECORD):
                    if (teacher_folder / name).is_file():
                        shutil.copy2(teacher_folder / name, folder / name)
            _fit(cfg, folder, teacher, levels, device)
        print(summary(how))
    except BaseException:
        if new and runs.latest_checkpoint(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def summary(how: dict) -> str:
    """What the student saves, in one line (forwards per image, parameters)."""
    teacher = how["teacher_steps"] * (2 if how["teacher_guidance"] != 1 else 1)
    line = (f"student of {how['teacher']}: {how['steps']} DDIM steps × 1 forward per image "
            f"(teacher: {how['teacher_steps']} × {teacher // how['teacher_steps']} = {teacher}")
    return line + (f"); {how['student_layers']} of {how['teacher_layers']} blocks, {how['student_params']:,} of "
                   f"{how['teacher_params']:,} parameters ({how['student_params'] / how['teacher_params']:.0%})")


def _draw(seed: int, step: int) -> torch.Generator:
    """The generator of one optimizer step's draws: depends on nothing drawn before it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1))


def _fit(cfg: DistillConfig, folder: Path, teacher: restore.Restored, levels, device) -> None:
    student_cfg = runs.load_config(folder)
    classes = teacher.classes
    k = len(classes)
    base, net = restore.build(student_cfg, classes, device=device, rows=lambda b: list(range(k)))
    teacher.model.requires_grad_(False)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    objective, clip = Objective(base.scheduler_config, device), bool(base.scheduler_config.get("clip_sample"))
    noise_at = _Noise(objective)
    dcfg = data_mod.from_settings(student_cfg)
    data = data_mod.load(dcfg, manifest=folder / "split.json")
    goods, _ = product.good_samples(data, student_cfg.get("good_images", 0), k)
    images = dataset.DefectDataset(data.train + goods, dcfg, augment=True, seed=cfg.seed)
    phases = cfg.phases if cfg.mode == "steps" else 1
    total = phases * cfg.iterations

    step, phase_teacher = 0, teacher.model
    last = runs.latest_checkpoint(folder)
    stepper = _stepper(cfg, named)
    if last is not None:
        meta = runs.read_json(last / runs.META_FILE)
        step = meta["step"]
        if step % cfg.iterations or step == total:  # mid-phase: the optimizer goes on too
            state = loop.load(last, stepper).state
        else:  # a phase ended here: the next one starts with a fresh optimizer
            state = {k_: v for k_, v in runs.load_tensors(last / runs.STATE_FILE).items() if not k_.startswith("ema.")}
        methods.load_trainable_state(net, state)
        print(f"resumed {folder.name} from {last.name} (step {step} of {total})")
    phase = min(step // cfg.iterations, phases - 1)
    if phase > 0:
        phase_teacher = _phase_teacher(folder, net, phase)

    bar = tqdm(total=total, initial=step, disable=not cfg.progress, desc=f"distill {cfg.mode} {folder.name}", unit="step")
    t0 = time.time()
    net.train()
    while step < total:
        if step and step % cfg.iterations == 0 and step // cfg.iterations != phase:  # a new halving
            phase = step // cfg.iterations
            phase_teacher = _phase_teacher(folder, net, phase)
            stepper = _stepper(cfg, named)
        g = _draw(cfg.seed, step)
        images.set_epoch(step)
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        batch = torch.utils.data.default_collate([images[int(i)] for i in idx])
        with torch.no_grad():
            x0 = base.codec.encode(batch["image"].to(device), generator=g) if hasattr(base.codec, "vae") \
                else base.codec.encode(batch["image"].to(device))
        labels = batch["label"].to(device)
        labels = torch.where(torch.rand(len(labels), generator=g).to(device) < cfg.label_dropout,
                             torch.full_like(labels, k), labels)
        eps = torch.randn(x0.shape, generator=g).to(device)
        guidance = cfg.guidance if phase == 0 else 1.0  # later teachers carry the guidance already
        if cfg.mode == "steps":
            pairs = torch.tensor(levels[cfg.phases - 1 - phase], device=device)
            t, s = pairs[torch.randint(len(pairs), (len(x0),), generator=g).to(device)].unbind(1)
            a_t, s_t = noise_at(t, x0.ndim)
            z = a_t * x0 + s_t * eps
            with torch.no_grad():
                m = (t + s) // 2
                z_m = _ddim(z, _eps(phase_teacher, z, t, labels, guidance, k, objective), t, m, noise_at, clip)
                z_s = _ddim(z_m, _eps(phase_teacher, z_m, m, labels, guidance, k, objective), m, s, noise_at, clip)
                target = objective.target(*jump(z, z_s, t, s, noise_at), t)
            c = x0.shape[1]
            out = net(z, timestep=t, class_labels=labels).sample[:, :c].float()
        else:
            t = torch.randint(0, objective.num_timesteps, (len(x0),), generator=g).to(device)
            z = objective.add_noise(x0, eps, t)
            with torch.no_grad():
                target = _predict(phase_teacher, z, t, labels, guidance, k)
            out = net(z, timestep=t, class_labels=labels).sample.float()
        loss = torch.nn.functional.mse_loss(out, target)
        norm = stepper(loss, f"at step {step} (phase {phase})")
        step += 1
        runs.log(folder, {"step": step, "phase": phase, "loss": loss.item(), "grad_norm": norm,
                          "time": round(time.time() - t0, 2)})
        bar.set_postfix(loss=f"{loss.item():.4f}", phase=phase)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step % cfg.iterations == 0:
            loop.save(folder, step, stepper, methods.trainable_state(net), cfg.keep_checkpoints, phase=phase)
    bar.close()


def _eps(net, z, t, labels, guidance, null, objective) -> torch.Tensor:
    c = z.shape[1]
    return objective.eps(_predict(net, z, t, labels, guidance, null)[:, :c], z, t)


def _stepper(cfg: DistillConfig, named) -> loop.Stepper:
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=0.0)
    return loop.Stepper(named, opt, grad_clip=cfg.grad_clip)


def _phase_teacher(folder: Path, net, phase: int):
    """Phase ``phase``'s teacher: the student as the previous phase left it, frozen (kept on disk
    under ``teachers/`` so that a resume finds the same one)."""
    path = folder / TEACHERS / f"phase-{phase}.safetensors"
    if path.is_file():
        state = runs.load_tensors(path)
    else:
        state = {k: v.detach().clone() for k, v in methods.trainable_state(net).items()}
        runs.save_tensors(runs.ensure_dir(path.parent, "teachers folder") / path.name, state)
    frozen = copy.deepcopy(net)
    methods.load_trainable_state(frozen, state)
    return frozen.requires_grad_(False).eval()
