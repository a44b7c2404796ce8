"""Fine-tune a class-conditional DiT on a few images per defect class.

``run(TrainConfig(...))`` is what the CLI (``defectlab finetune``), notebook 02 and the tests
call. The loop is plain accelerate: the same code runs on one CPU, one GPU, or several
processes under ``accelerate launch``. A run folder holds everything a later stage needs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..base import runs
from ..base.errors import DefectlabError
from ..base.progress import tqdm
from ..data import dataset, product, sources as data_mod, synth
from ..core import dit, engine, loop, masks, methods, model as model_mod, resume, tracking, validation, viz
from ..core.codec import check_image_size
from ..core.diffusion import Objective
from ..core.restore import build, restore  # noqa: F401  restore: the notebooks call train.restore
from . import classes as classes_mod

@dataclass
class TrainConfig(data_mod.DataConfig):
    image_size: int = 0            # 0 means the model's preset (tiny 64 px, mini 32 px, mini-latent 64 px, DiT-XL 128 px)
    model: str = "mini"            # mini (pre-trained, shipped) | mini-latent (pre-trained latent, shipped) | tiny (random) | mini-scratch | facebook/DiT-XL-2-256 | local folder | original .pt
    method: str = "difffit"        # full | bitfit | difffit | bias_norm | lora | vpt
    name: str = ""                 # run name ("" means <product>-<method>)
    lr: float = 0.0                # 0 means the preset (1e-5 real model, 1e-3 tiny/mini, 3e-3 mini-latent)
    epochs: int = 0                # 0 means the preset (100 real model, 60 tiny/mini, 200 mini-latent)
    max_steps: int = 0             # stop after this many optimizer steps (0 means no limit)
    batch_size: int = 4            # images per micro-batch (per process)
    grad_accum: int = 2            # micro-batches per optimizer step
    lr_schedule: str = "constant"  # constant | constant_with_warmup | cosine | linear
    warmup_steps: int = 0          # learning-rate warmup (optimizer steps)
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max gradient norm (0 = off)
    mixed_precision: str = "no"    # no | fp16 | bf16
    ema: float = 0.0               # EMA decay of the trained parameters (0 means off)
    label_dropout: float = 0.1     # class-label dropout, so guidance works after fine-tuning
    class_init: str = "anchor"     # anchor | nearest | topk (mean of 5 best) | mean | random | <class id>
    class_init_candidates: str = ""  # shortlist for nearest/topk, e.g. 990,783,0-99 ("" = all base classes)
    lora_rank: int = 8             # LoRA rank (method lora)
    difffit_blocks: int = 0        # blocks with DiffFit scales (0 = all)
    vpt_tokens: int = 8            # VPT: learnable prompt tokens (method=vpt)
    vpt_depth: str = "shallow"     # VPT: prompts at the input only (shallow) or new ones at every block (deep)
    vpt_bias: bool = False         # VPT: also train every bias
    val_per_class: int = 2         # training images per class held back for validation (0 means none: the training images validate)
    val_timesteps: int = 8         # fixed timesteps of the validation loss
    val_every: int = 5             # validate (and checkpoint) every N epochs
    patience: int = 0              # stop after N validations without improvement (0 means off)
    keep_checkpoints: int = 2      # newest checkpoints kept (plus the best)
    checkpoint_minutes: float = 10.0  # also checkpoint every N minutes, and on Ctrl-C / SIGTERM (0 = only at validation)
    greyscale: bool = False        # generated images grey (set by itself when every dataset image is greyscale)
    seed: int = 0                  # seeds data order, noise, dropout, new class rows
    resume: str = ""               # run folder/name/number to continue from its last checkpoint
    runs_dir: str = ""             # parent of run folders ("" means outputs/runs)
    progress: bool = True          # tqdm progress bar
    mask_condition: bool = False   # defect mask as an extra zero-initialised input channel (masks.py); trains with any method
    good_images: int = 0           # product adaptation: defect-free images trained as the null class, the product's look (-1 = all, 0 = none; product.py)
    mask_loss: float = 0.0         # loss weight 1 + mask_loss × defect-mask coverage per latent cell (0 = DiT's plain loss): a defect covers a few % of an image
    frozen_dtype: str = "float32"  # float32 | bfloat16: frozen weights' dtype (trained ones stay float32; bf16 runs under autocast)
    tie_embeddings: bool = False   # one timestep/class embedder for all blocks, as the original DiT (needs identical copies: hub DiT-XL)
    grad_checkpointing: int = 0    # blocks recomputed in backward to save memory: 0 none, N the first N, -1 all
    compile: str = ""              # torch.compile mode, CUDA only: "" off | default | reduce-overhead | max-autotune
    latent_cache: bool = False     # encode each (image, augmentation view) once; same views and noise as without
    model_heads: int = 0           # attention heads of an original .pt whose width is not DiT-S/B/L/XL (0 = from its shape)
    numerics: str = "auto"         # timestep frequencies: auto (original for DiT .pt / facebook/DiT-* / DiTPipeline folders, else diffusers) | original | diffusers; stored resolved
    report_to: str = "tensorboard"  # experiment tracker: tensorboard (into <run>/tensorboard/) | wandb | mlflow | none
    log_samples: int = 1           # images per class drawn (DDIM 25) at each validation for the tracker (0 = none)
    formats: str = "png"           # loss-curve figure formats, comma-separated: png, pdf, svg


def resolved(cfg: TrainConfig) -> TrainConfig:
    """Fill the preset-dependent zeros so the saved config says what actually ran."""
    defaults = model_mod.preset(cfg.model)
    out = dataclasses.replace(cfg)
    for key in ("lr", "image_size", "epochs"):
        if not getattr(out, key):
            setattr(out, key, defaults[key])
    if not out.name:
        out.name = f"{out.product}-{out.method}"
    out.data = _absolute(out.data)  # later stages find the data from any working folder
    return out


def _absolute(data: str) -> str:
    return data if synth.embedded(data) is not None else os.path.abspath(os.path.expanduser(data))


def _check(cfg: TrainConfig) -> None:
    if cfg.method not in methods.METHODS:
        raise DefectlabError(f"unknown method {cfg.method!r}; choose one of {', '.join(methods.METHODS)}")
    for key in ("batch_size", "grad_accum", "epochs", "val_every", "val_timesteps"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"{key} must be ≥ 1 (got {getattr(cfg, key)})")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise DefectlabError(f"lr must be a positive number (got {cfg.lr})")
    if not 0 <= cfg.label_dropout < 1:
        raise DefectlabError(f"label_dropout must be in [0, 1) (got {cfg.label_dropout})")
    if cfg.method == "vpt" and (cfg.vpt_tokens < 1 or cfg.vpt_depth not in dit.DEPTHS):
        raise DefectlabError(f"vpt_tokens must be ≥ 1 and vpt_depth shallow or deep (got {cfg.vpt_tokens}, "
                             f"{cfg.vpt_depth!r})")
    if cfg.good_images < -1:
        raise DefectlabError(f"good_images must be -1 (all), 0 (none) or a count (got {cfg.good_images})")
    model_mod.check_numerics(cfg.numerics)
    if cfg.frozen_dtype not in ("float32", "bfloat16"):
        raise DefectlabError(f"frozen_dtype must be float32 or bfloat16 (got {cfg.frozen_dtype!r})")
    if cfg.compile and cfg.compile not in engine.COMPILE_MODES:
        raise DefectlabError(f"compile must be '' or one of {', '.join(engine.COMPILE_MODES)} (got {cfg.compile!r})")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise DefectlabError(f"mixed_precision must be no, fp16 or bf16 (got {cfg.mixed_precision!r})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise DefectlabError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule!r})")
    for key in ("max_steps", "warmup_steps", "patience", "keep_checkpoints", "checkpoint_minutes", "grad_clip",
                "weight_decay", "ema", "mask_loss"):
        if not getattr(cfg, key) >= 0:
            raise DefectlabError(f"{key} must be ≥ 0 (got {getattr(cfg, key)})")


LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")


def class_init_rows(cfg: TrainConfig, base: model_mod.Base, data: data_mod.DefectData) -> str | int | list[int]:
    """What the new class rows start from (see ``model.set_classes``)."""
    if cfg.class_init == "anchor":
        anchor = model_mod.anchor_class(base, data.product)
        return anchor if anchor is not None else "mean"
    if cfg.class_init in ("nearest", "topk"):
        if cfg.class_init == "topk":  # mean of the 5 best-scoring base rows per defect class
            return classes_mod.topk_mean_rows(base, data, cfg, k=5)
        return classes_mod.nearest_rows(base, data, cfg)
    if cfg.class_init.lstrip("-").isdigit():
        return int(cfg.class_init)
    if cfg.class_init in ("mean", "random"):
        return cfg.class_init
    raise DefectlabError(f"unknown class_init {cfg.class_init!r}; use anchor, nearest, topk, mean, random or a class id")


def _drop_labels(labels: torch.Tensor, k: int, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=gen, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, k), labels)


def run(cfg: TrainConfig) -> Path:
    """Train; returns the run folder. Resumes when ``cfg.resume`` names a run (``resume.settings``
    says which flags may change). Settings, data and model are checked before a new run folder
    exists, and a new run that fails before its first checkpoint leaves no folder behind."""
    folder, extended = None, False
    if cfg.resume:
        folder = runs.resolve(cfg.resume, cfg.runs_dir or None)
        given, defaults = dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())
        extended = any(given[k] != defaults[k] for k in ("epochs", "max_steps", "patience"))
        saved = {"numerics": "diffusers", **runs.load_config(folder)}
        cfg = TrainConfig(**resume.settings(saved, {**given, "data": _absolute(cfg.data)}, defaults, folder))
    cfg = resolved(cfg)
    _check(cfg)
    if folder is not None and (last := runs.latest_checkpoint(folder)) is not None:
        meta = runs.read_json(last / runs.META_FILE)
        if resume.finished(folder, meta["epoch"], meta["step"], meta["bad"], cfg, extended):
            return folder
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available(), **tracking.accelerator_args(cfg))
    set_seed(cfg.seed)
    dcfg = data_mod.DataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(data_mod.DataConfig)})
    data = data_mod.load(dcfg, manifest=folder / "split.json" if folder else None)
    train_samples, val_samples = validation.split(data.train, cfg.val_per_class)
    goods, adapted = product.good_samples(data, cfg.good_images, len(data.classes))  # null label: K
    train_samples = train_samples + goods
    if cfg.batch_size > len(train_samples):
        raise DefectlabError(f"batch_size {cfg.batch_size} is larger than the {len(train_samples)} training images")
    base, net = build(cfg, data.classes, device=acc.device, rows=lambda base: class_init_rows(cfg, base, data))
    check_image_size(cfg.image_size, base.codec, base.transformer.config.patch_size, base.spec)
    # stored resolved: restore() computes as the run trained; grey data gives grey samples
    cfg.numerics, cfg.greyscale = base.numerics, cfg.greyscale or data.greyscale
    new = folder is None
    if new and acc.is_main_process:
        dataset.check_masks(data.train, cfg.crop)
        folder = runs.create(cfg.name, dataclasses.asdict(cfg), base=cfg.runs_dir or None)
        runs.write_json(folder / product.RECORD, adapted)
    folder = Path(broadcast_object_list([str(folder)])[0])  # every process writes into the same run
    held = runs.lock(folder) if acc.is_main_process else None
    try:
        with resume.Stopper(cfg.checkpoint_minutes) as stopper:
            return _fit(cfg, acc, folder, data, dcfg, base, net, train_samples, val_samples, stopper)
    except BaseException:
        if new and acc.is_main_process and runs.latest_checkpoint(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)  # nothing to resume: no empty run folder for `latest`
        raise
    finally:
        if held is not None:
            held.release()


def _fit(cfg, acc, folder, data, dcfg, base, net, train_samples, val_samples, stopper) -> Path:
    """The loop, in a run folder that is new or resumes from its last checkpoint."""
    if acc.is_main_process:
        if cfg.resume:  # config.json says what the run trains with now (new --max-steps, …)
            runs.update_config(folder, **{k: getattr(cfg, k) for k in resume.MAY_CHANGE
                                          if hasattr(cfg, k) and k not in ("resume", "runs_dir")})
        if not (folder / "split.json").is_file():
            data_mod.write_manifest(folder / "split.json", data, dcfg)
        runs.write_json(folder / "classes.json", data.classes)
    engine.prepare_for_training(net, frozen_dtype=cfg.frozen_dtype, grad_checkpointing=cfg.grad_checkpointing,
                                compile=cfg.compile)
    k = len(data.classes)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    acc.print(methods.summary(net))
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_set = dataset.DefectDataset(train_samples, dcfg, augment=True, seed=cfg.seed)
    if cfg.latent_cache:  # the codec is frozen: each (image, view) is encoded once, when first drawn
        train_set = dataset.LatentCache(train_samples, dcfg, base.codec, device=acc.device).dataset(seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size,
        shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    net, opt, loader, sched = acc.prepare(net, opt, loader, sched)
    objective = Objective(base.scheduler_config, acc.device)
    validate = validation.Validator(val_samples, dcfg, base, objective, cfg.val_timesteps, cfg.seed, acc.device,
                                    mask_condition=cfg.mask_condition, mask_loss=cfg.mask_loss)
    ema = EMAModel(trainable, decay=cfg.ema) if cfg.ema > 0 else None
    stepper = loop.Stepper(named, opt, sched, ema, cfg.grad_clip, acc)

    at = resume.Position()
    last = runs.latest_checkpoint(folder)
    if last is not None:
        at = resume.load(last, stepper, net, loader)
        if acc.is_main_process:
            runs.truncate_log(folder, at.step)  # the steps after the checkpoint are trained again
        acc.print(f"resumed {folder.name} from {last.name} (epoch {at.epoch}, batch {at.batch}, step {at.step})")
    step, start_epoch, skip, best, bad = at.step, at.epoch, at.batch, at.best, at.bad

    tracker = tracking.Tracker(acc, folder, cfg, base, data.classes)  # log.jsonl + --report-to
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and acc.is_main_process),
               desc=f"{cfg.method} {folder.name}", unit="step")
    net.train()
    t0, stop = time.time(), False
    for epoch in range(start_epoch, cfg.epochs):
        epoch_rng = resume.loader_state(loader)  # the epoch's order: what a mid-epoch checkpoint keeps
        loader.set_epoch(epoch)  # keys each item's augmentation (dataset.view_generator)
        for i, batch in enumerate(loader):
            if i < skip:  # resumed mid-epoch: these batches were trained before the checkpoint
                continue
            with acc.accumulate(net):
                engine.step_begin(net)  # CUDA-graph modes: a new iteration starts
                x0 = batch["latent"] if "latent" in batch else base.codec.encode(batch["image"])
                labels = _drop_labels(batch["label"], k, cfg.label_dropout)
                t = torch.randint(0, objective.num_timesteps, (len(x0),), device=x0.device)
                noise = torch.randn_like(x0)
                xt = objective.add_noise(x0, noise, t)
                inp = xt  # mask_condition: + the (augmented) defect mask on the latent grid as a channel
                if cfg.mask_condition:
                    inp = torch.cat([xt, masks.latent_mask(batch["mask"], x0.shape[-2:]).to(xt)], 1)
                out = net(inp, timestep=t, class_labels=labels).sample
                weight = masks.loss_weights(batch["mask"], x0.shape[-2:], cfg.mask_loss).to(xt) if cfg.mask_loss else None
                mse, vb = objective.loss(out, x0, xt, noise, t, weight)
                loss = (mse + vb).mean()
                grad_norm = stepper(loss, f"at step {step} (epoch {epoch})",  # None mid-accumulation
                                    lambda: f"last good checkpoint: {runs.latest_checkpoint(folder) or 'none'}; "
                                            "try a lower --lr")
            if stepper.whole:
                step += 1
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "mse": mse.mean().item(),
                       "vb": vb.mean().item(), "lr": sched.get_last_lr()[0], "time": round(time.time() - t0, 2),
                       "grad_norm": float(grad_norm)}
                tracker.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}")
                bar.update(1)
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = True
                    break
                if stopper.due(acc):  # checkpoint_minutes passed, or Ctrl-C / SIGTERM (then stops)
                    if acc.is_main_process:
                        _save_state(folder, cfg, stepper, net, resume.Position(step, epoch, i + 1, best, bad), epoch_rng)
                    stopper.saved(acc, folder, step)
        skip, end = 0, epoch + 1
        if end % cfg.val_every == 0 or end == cfg.epochs or stop:
            val = _ema_val(ema, trainable, validate, net) if ema is not None else validate(net)
            improved = val < best
            best, bad = (val, 0) if improved else (best, bad + 1)
            whole = not stop or i + 1 == len(loader)  # max_steps may stop mid-epoch
            if acc.is_main_process:
                tracker.log({"step": step, "epoch": epoch, "val_loss": val, "best": best,
                             "objective": objective.prediction_type}, model=acc.unwrap_model(net))
                _save_state(folder, cfg, stepper, net,
                            resume.Position(step, *((end, 0) if whole else (epoch, i + 1)), best, bad),
                            resume.loader_state(loader) if whole else epoch_rng)
                if improved:
                    runs.mark(folder, "best", step, val_loss=val, epoch=end)
            stopper.saved(acc, folder, step)
            bar.write(f"epoch {end}: val_loss {val:.4f} (best {best:.4f})") if cfg.progress else None
            if cfg.patience and bad >= cfg.patience:
                acc.print(f"early stop: no improvement in {cfg.patience} validations")
                break
        if stop:
            break
    bar.close()
    tracker.finish()
    acc.wait_for_everyone()
    if acc.is_main_process:
        plot_loss(folder, cfg.formats)
    return folder


def _ema_val(ema: EMAModel, params, validate, net) -> float:
    """Validate with the EMA weights, then put the live weights back."""
    ema.store(params)
    ema.copy_to(params)
    try:
        return validate(net)
    finally:
        ema.restore(params)


def _save_state(folder, cfg, stepper, net, at: resume.Position, epoch_rng) -> Path:
    return resume.save(folder, stepper, net, at, epoch_rng, cfg.keep_checkpoints,
                       method=cfg.method, base_model=cfg.model)


def plot_loss(folder: Path, formats: str = "png") -> Path | None:
    """``viz.loss_figure`` of a run's log → ``<run>/figures/loss_curve.<format>`` (the first path)."""
    fig = viz.loss_figure(runs.read_log(folder), Path(folder).name)
    return None if fig is None else viz.save_figure(fig, Path(folder) / "figures", "loss_curve", formats)[0]
