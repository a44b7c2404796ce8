"""Pre-train ``defectlab-mini``: a small pixel-space class-conditional DiT on the procedural corpus.

``run(PretrainConfig(...))`` (CLI: ``defectlab pretrain-mini``) trains a ``DiTTransformer2DModel``
from scratch on ``corpus.py`` (each product good or with one generic defect a class, like
ImageNet's fine-grained classes for DiT) with DiT's
objective (``diffusion.Objective``: mse + vb, learned sigma; v-prediction by default: a small
model learns the image layout at high noise far sooner than with DiT's eps), class-label
dropout 0.1 (once per sample, to the null row), AdamW and an EMA of the weights, then exports the EMA weights with
``save_pretrained`` (fp16 storage; ``model.load`` casts to fp32) plus ``model_index.json``
(class names, anchors) and ``MODEL_CARD.md`` (recipe, seeds, corpus version, sha256).

Resumable: a run folder (``defectlab.base.runs``) holds atomic checkpoints with the full weights, the
EMA, the optimizer and the step; item ``i`` of the corpus and the noise of step ``s`` are seeded
from (seed, i) and (seed, s), so 2 steps + resume + 2 steps give the same weights as 4 steps.
``time_budget`` (minutes) stops the loop by itself, checkpoints and exports.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..data import corpus
from ..core import loop, masks, methods, model as model_mod, resume, sampler, viz
from ..core.codec import VAECodec
from ..core.diffusion import Objective

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class PretrainConfig:
    out: str = ""                  # folder the model is exported to ("" = the shipped defectlab/assets/mini)
    name: str = "pretrain-mini"    # run folder name (checkpoints, log)
    resume: str = ""               # run folder/name/number to continue from its last checkpoint
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    image_size: int = 32           # corpus / model resolution (px)
    patch_size: int = 4            # DiT patch size (32 px / 4 = 64 tokens of 48 values, 4x narrower than width)
    width: int = 192               # hidden size (heads x 64)
    heads: int = 3                 # attention heads
    depth: int = 6                 # transformer blocks
    corpus_seed: int = 0           # seed of the procedural corpus
    seed: int = 0                  # seeds the init, noise, timesteps and label dropout
    batch_size: int = 32           # images per optimizer step
    lr: float = 5e-4               # AdamW learning rate (after warmup)
    warmup_steps: int = 100        # linear learning-rate warmup
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max gradient norm (0 = off)
    ema: float = 0.998             # EMA decay of the weights (the EMA is what ships)
    label_dropout: float = 0.1     # class-label dropout (to the null row) for classifier-free guidance
    max_steps: int = 100000        # optimizer steps (the time budget usually stops first)
    time_budget: float = 0.0       # wall-clock minutes for this call (0 = none); then checkpoint + export
    checkpoint_every: int = 100    # optimizer steps between checkpoints
    threads: int = 0               # torch CPU threads (0 = torch's default)
    fp16: bool = True              # store the exported weights as float16 (half the file size)
    progress: bool = True          # print a line every 20 steps
    preview: int = 2               # samples per class drawn into <out>/samples.png after export (0 = none)
    prediction_type: str = "v_prediction"  # what the output predicts: v_prediction | epsilon (DiT's)
    vae: str = ""                  # autoencoder folder (pretrain-ae's export) for a latent base, shipped as its vae/ ("" = pixels)
    optimizer_dtype: str = "float32"  # AdamW moments in checkpoints: float32 (exact resume) | bfloat16 (a third smaller, to commit)
    mask_loss: float = 0.0         # loss weight 1 + mask_loss × the corpus defect's coverage per cell (0 = plain), as finetune's --mask-loss


# What a --resume may change (the rest decides what the run computes), and what each call sets anew
# (mask_loss and optimizer_dtype are logged per record / per checkpoint).
MAY_CHANGE = ("resume", "runs_dir", "out", "max_steps", "checkpoint_every", "preview", "fp16")
PER_CALL = ("time_budget", "threads", "progress", "mask_loss", "optimizer_dtype")


def vae_path(vae: str) -> str:
    """``--vae`` as a run's config stores it: relative to the checkout when it lies inside, so a
    run folder committed there resumes from any clone; absolute otherwise."""
    folder = Path(vae).expanduser().resolve()
    return str(folder.relative_to(paths.CHECKOUT)) if folder.is_relative_to(paths.CHECKOUT) else str(folder)


def vae_folder(vae: str) -> Path:
    """Where ``--vae`` is: a relative path is looked up from the current folder, then the checkout."""
    folder = Path(vae).expanduser()
    return paths.CHECKOUT / folder if not folder.is_absolute() and not folder.exists() else folder


def codec(cfg: PretrainConfig) -> VAECodec | None:
    """The latent base's autoencoder (``cfg.vae``, found by ``vae_folder``), or None for a pixel-space base."""
    if not cfg.vae:
        return None
    folder = vae_folder(cfg.vae)
    if not (folder / "config.json").is_file():
        raise DefectlabError(f"--vae {cfg.vae}: no autoencoder there (expected a pretrain-ae export with config.json)")
    return VAECodec(AutoencoderKL.from_pretrained(folder))


def model_config(cfg: PretrainConfig, vae: VAECodec | None = None) -> dict:
    if vae is None and cfg.vae:
        vae = codec(cfg)
    if vae is None:
        return model_mod.mini_config(cfg.image_size, cfg.patch_size, cfg.width, cfg.heads, cfg.depth)
    channels, size, _ = vae.latent_shape(cfg.image_size)
    return model_mod.mini_config(size, cfg.patch_size, cfg.width, cfg.heads, cfg.depth, channels=channels)


def schedule(cfg: PretrainConfig) -> dict:
    """The training schedule, exported as ``scheduler/scheduler_config.json`` beside the weights
    (``model.load`` reads its ``prediction_type``); x0 clipped in pixel space only."""
    return model_mod.mini_schedule(cfg.prediction_type, clip_sample=not cfg.vae)


def build(cfg: PretrainConfig, vae: VAECodec | None = None) -> DiTTransformer2DModel:
    return model_mod.build_mini(model_config(cfg, vae), cfg.seed)


def _step_generator(cfg: PretrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def _loop_pieces(cfg: PretrainConfig, params: list) -> tuple:
    """train.py's pieces: diffusers' ``EMAModel`` (``update_after_step=-1``: the decay after s
    optimizer steps is min(ema, (1 + s) / (10 + s)), DiT's warm-up) and AdamW."""
    ema = EMAModel(params, decay=cfg.ema, update_after_step=-1, foreach=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return ema, opt


def _schedule(cfg: PretrainConfig, opt, step: int):
    """diffusers' ``get_scheduler`` warm-up, built at ``last_epoch=step`` (LambdaLR then steps once
    more), so optimizer step s trains at lr · min(1, (s + 1) / warmup), on resume too."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return get_scheduler("constant_with_warmup", opt, num_warmup_steps=max(cfg.warmup_steps, 1), last_epoch=step)


def run(cfg: PretrainConfig) -> Path:
    """Train (or resume) and export; returns the export folder."""
    if cfg.resume:
        folder = runs.resolve(cfg.resume, Path(cfg.runs_dir) if cfg.runs_dir else None)
        saved = {"prediction_type": "epsilon", **runs.load_config(folder)}  # runs from before the field: eps
        cfg = PretrainConfig(**resume.settings(saved, dataclasses.asdict(cfg), dataclasses.asdict(PretrainConfig()),
                                               folder, MAY_CHANGE, PER_CALL))
    if cfg.mask_loss < 0:
        raise DefectlabError(f"mask_loss must be ≥ 0 (got {cfg.mask_loss})")
    if cfg.optimizer_dtype not in loop.OPTIMIZER_DTYPES:
        raise DefectlabError(f"optimizer_dtype must be one of {', '.join(loop.OPTIMIZER_DTYPES)} (got {cfg.optimizer_dtype!r})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.vae and not cfg.resume:
        cfg = dataclasses.replace(cfg, vae=vae_path(cfg.vae))
    vae = codec(cfg)  # a bad --vae fails before a run folder exists
    if vae is not None:
        vae.to(device)
    if not cfg.resume:
        folder = runs.create(cfg.name, dataclasses.asdict(cfg), base=Path(cfg.runs_dir) if cfg.runs_dir else None)
    net = build(cfg, vae).to(device).train()
    named = list(net.named_parameters())
    ema, opt = _loop_pieces(cfg, [p for _, p in named])
    stepper = loop.Stepper(named, opt, ema=ema, grad_clip=cfg.grad_clip)
    objective = Objective(schedule(cfg), device)
    k = len(corpus.CLASSES)
    step, seen, wall = 0, 0, 0.0
    last = runs.latest_checkpoint(folder)
    if last is not None:
        got = loop.load(last, stepper)
        net.load_state_dict(got.state)
        step, seen, wall = got.meta["step"], got.meta["images"], got.meta["wall_s"]
        print(f"resumed {folder.name} at step {step} ({seen:,} images, {wall / 60:.1f} min)")
    stepper.sched = _schedule(cfg, opt, step)  # rebuilt at the step: warm-up changes never break a resume
    saved_step = step if last is not None else -1
    runs.log(folder, {"step": step, "event": "start", "mask_loss": cfg.mask_loss})  # per-call settings, for the card
    t0, loss_avg, losses = time.time(), None, []
    while step < cfg.max_steps:
        if cfg.time_budget and time.time() - t0 > cfg.time_budget * 60:
            break
        x0, labels, *cover = corpus.batch(step * cfg.batch_size, cfg.batch_size, cfg.corpus_seed, cfg.image_size,
                                          masks=cfg.mask_loss > 0)  # coverage only when it weighs something
        x0 = x0.to(device) if vae is None else vae.encode(x0.to(device))  # latent base: the posterior mean
        weight = masks.loss_weights(cover[0], x0.shape[-2:], cfg.mask_loss).to(x0) if cover else None
        gen = _step_generator(cfg, step)
        t = torch.randint(0, objective.num_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(len(x0), generator=gen) < cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, k), labels)
        t, noise, labels = t.to(device), noise.to(device), labels.to(device)
        xt = objective.add_noise(x0, noise, t)
        out = net(xt, timestep=t, class_labels=labels).sample
        mse, vb = objective.loss(out, x0, xt, noise, t, weight)
        loss = (mse + vb).mean()
        lr = stepper.lr()  # the rate this step trains at
        stepper(loss, f"at step {step}")
        step += 1
        seen += len(x0)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        losses.append(loss.item())
        if step % 20 == 0:
            rec = {"step": step, "loss": sum(losses) / len(losses), "mse": mse.mean().item(),
                   "images": seen, "time": round(wall + time.time() - t0, 1), "lr": lr, "mask_loss": cfg.mask_loss}
            runs.log(folder, rec)
            losses = []
            if cfg.progress:
                print(f"step {step} loss {rec['loss']:.4f} (avg {loss_avg:.4f}) images {seen:,} "
                      f"{rec['time'] / 60:.1f} min", flush=True)
        if step % cfg.checkpoint_every == 0:
            _save(folder, stepper, net, step, seen, wall + time.time() - t0, loss_avg, cfg.optimizer_dtype)
            saved_step = step
    wall += time.time() - t0
    if step > saved_step:
        _save(folder, stepper, net, step, seen, wall, loss_avg, cfg.optimizer_dtype)
    meta = runs.read_json(runs.latest_checkpoint(folder) / runs.META_FILE)
    out = export(folder, Path(cfg.out) if cfg.out else paths.ASSETS / "mini", cfg, device=str(device),
                 final_loss=meta.get("loss"))
    if cfg.preview:
        preview(out, cfg.preview)
    return out


def preview(folder: Path, per_class: int = 2, seed: int = 0, steps: int = 50, guidance: float = 3.0) -> Path:
    """``<folder>/samples.png``: ``per_class`` samples of every product (good) and of every
    defect class of the first product (DDIM, guidance, image ``i`` of class ``c`` seeded by
    ``sampler.generators(seed, name, i)``), the model card's picture of what the base draws."""
    base = model_mod.load(str(folder))
    all_names = base.class_names or [str(c) for c in range(methods.num_classes(base.transformer))]
    shown = list(range(len(all_names)))
    if all_names == corpus.CLASSES:  # product-major ids: the first product's classes, then the other goods
        first = corpus.PAIRS[0][0]
        shown = [c for c, (product, defect) in enumerate(corpus.PAIRS) if defect == "good" or product == first]
    names = [all_names[c] for c in shown]
    labels = [c for c in shown for _ in range(per_class)]
    gens = [g for name in names for g in sampler.generators(seed, name, range(per_class))]
    images = sampler.generate(base.transformer, base.codec, labels, gens, sampler.Sampling(steps, guidance, "ddim"),
                              scheduler_config=base.scheduler_config, batch_size=64, progress=False)
    fig = viz.grid_figure(images, names, title=f"{folder.name}: DDIM {steps} steps, guidance {guidance:g}, "
                          f"seed {seed} (offline proxy base, procedural corpus)")
    return viz.save_figure(fig, folder, "samples", "png")[0]


def _save(folder, stepper: loop.Stepper, net, step, seen, wall, loss, optimizer_dtype: str = "float32") -> Path:
    """Weights, EMA and AdamW state (``loop.save``; ``optimizer_dtype`` bfloat16 rounds the moments)."""
    return loop.save(folder, step, stepper, net.state_dict(), keep=2, optimizer_dtype=optimizer_dtype,
                     images=seen, wall_s=wall, loss=loss)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(folder: Path, out: Path, cfg: PretrainConfig | None = None, device: str = "cpu",
           final_loss: float | None = None) -> Path:
    """EMA weights of the run's latest checkpoint → a diffusers folder ``out`` (replaced atomically)."""
    cfg = cfg or PretrainConfig(**runs.load_config(folder))
    ckpt = runs.latest_checkpoint(folder)
    if ckpt is None:
        raise DefectlabError(f"no checkpoint in {folder}")
    meta = runs.read_json(ckpt / runs.META_FILE)
    state = runs.load_tensors(ckpt / runs.STATE_FILE)
    net = build(cfg)
    names = [n for n, _ in net.named_parameters()]
    net.load_state_dict({n: state[f"ema.{n}"] for n in names}, strict=False)  # pos_embed buffer is recomputed
    return save_model(net, out, cfg, card={"step": meta["step"], "images": meta["images"], "wall_s": meta["wall_s"],
                                           "device": device, "loss": final_loss, "run": folder.name,
                                           "mask_loss": mask_history(folder, meta["step"])})


def mask_history(folder: Path, upto: int) -> list[tuple[int, float]]:
    """``[(first step, --mask-loss)]`` over the run's log up to step ``upto``: a per-call setting,
    so a run continued with another weight says where it changed (records before it: 0)."""
    out: list[tuple[int, float]] = []
    for rec in runs.read_log(folder):
        if isinstance(rec.get("step"), int) and rec["step"] <= upto and ("loss" in rec or "event" in rec):
            w = float(rec.get("mask_loss", 0.0))
            if not out or out[-1][1] != w:  # a start record has its exact step; logs before them, one per 20
                out.append((0 if not out else rec["step"] if "event" in rec else max(rec["step"] - 20, 0), w))
    return out or [(0, 0.0)]


def save_model(net: DiTTransformer2DModel, out: Path, cfg: PretrainConfig, card: dict | None = None) -> Path:
    """``model.save_folder`` (weights, class names, schedule) + ``MODEL_CARD.md``, swapped in atomically."""
    n_params = sum(p.numel() for p in net.parameters())
    extra = {} if card is None else {"MODEL_CARD.md": lambda tmp: model_card(cfg, card, sha256(tmp / WEIGHTS), n_params)}
    return model_mod.save_folder(net, out, schedule(cfg), fp16=cfg.fp16, extra_files=extra, image_size=cfg.image_size,
                                 vae=vae_folder(cfg.vae) if cfg.vae else None)


def model_card(cfg: PretrainConfig, info: dict, digest: str, n_params: int) -> str:
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "runs_dir", "progress")}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()
                     if k not in ("name", "fp16", "time_budget", "max_steps"))
    loss = f"{info['loss']:.4f}" if info.get("loss") is not None else "n/a"
    space = ("pixel space" if not cfg.vae else "on the latents of the small autoencoder in `vae/` (`defectlab "
             "pretrain-ae`, loaded through `VAECodec` like DiT-XL's SD VAE)")
    return f"""# defectlab-mini

A small class-conditional DiT (diffusers `DiTTransformer2DModel`, {space}, {cfg.image_size} px,
patch {cfg.patch_size}, width {cfg.width}, {cfg.heads} heads, depth {cfg.depth}, learned sigma,
`ada_norm_zero`) pre-trained from scratch on defectlab's procedural multi-product corpus
(`defectlab/data/corpus.py`), so that the offline default fine-tunes a *pre-trained* base. It plays
DiT-XL/2's role at toy scale; it is not an ImageNet model and makes no claim beyond this corpus.

| | |
|---|---|
| weights file | `{WEIGHTS}` ({'float16' if cfg.fp16 else 'float32'}; `model.load` casts to float32) |
| sha256 | `{digest}` |
| parameters | {n_params:,} |
| classes | {len(corpus.CLASSES)} (null row = index {len(corpus.CLASSES)}): {', '.join(corpus.CLASSES)} |
| anchors (`--class-init anchor`) | {', '.join(f'{p} → {corpus.CLASSES[i]} ({i})' for p, i in corpus.ANCHORS.items())} |
| corpus | `defectlab.data.corpus` version {corpus.CORPUS_VERSION}, seed {cfg.corpus_seed}, item i = class i % {len(corpus.CLASSES)}; a class is a product ({len(corpus.PRODUCTS)}) good or with one generic defect ({', '.join(corpus.DEFECTS)}) |
| optimizer steps | {info['step']:,} (batch {cfg.batch_size}) |
| images seen | {info['images']:,} |
| wall time | {info['wall_s'] / 60:.1f} min on {info['device']}, {cfg.threads or 'default'} torch thread(s), {info['images'] / max(info['wall_s'], 1e-9):.0f} images/s |
| final training loss | {loss} (mse + vb, running mean) |
| defect-weighted loss (`--mask-loss`) | {'; '.join(f'{w:g} from step {a:,}' for a, w in info.get('mask_loss', [(0, cfg.mask_loss)]))} |
| run folder | `{info.get('run', '')}` |

## Recipe

DiT objective (`defectlab.core.diffusion.Objective`: MSE on the {cfg.prediction_type} output + variational
bound on the learned variance, 1000-step linear schedule; `scheduler/scheduler_config.json`
records the prediction type for samplers and fine-tuning), class-label dropout {cfg.label_dropout} (once per sample, to the
null row), AdamW lr {cfg.lr:g} (linear warmup {cfg.warmup_steps} steps), weight decay
{cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, EMA {cfg.ema} (shipped weights = EMA), seed
{cfg.seed}; training stopped by the wall-clock budget ({cfg.time_budget:g} min per call).

Settings: `{json.dumps(recipe)}`

Rebuild (the corpus and each step's noise are seeded per index, so the result depends only on
these settings and the step count):

    defectlab pretrain-mini {flags} --max-steps {info['step']} --out my-mini
    sha256sum my-mini/{WEIGHTS}

(bit-identical only with the same torch version/device/thread count; float reductions differ
across them.)

The embedded dataset's defect types (hazelnut crack/cut/hole/print, screw scratch_head/
thread_side/thread_top/manipulated_front) and its two products are **not** in the corpus: the
corpus has look-alike `nut` / `screw` classes with other generic defects, which is what
few-shot transfer needs to start from.

`samples.png` (when present) shows what this base draws for each product (its good class) and
for each defect class of `nut` (`defectlab.stages.pretrain.preview`). Limitations: a short CPU pre-training (see images seen) on a
procedural corpus; a proxy for DiT-XL's ImageNet pre-training, not a model of real products.
"""
