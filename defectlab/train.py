"""Fine-tune a class-conditional DiT on a few images per defect class.

``run(TrainConfig(...))`` is what the CLI (``defectlab finetune``), notebook 02 and the tests
call. The loop is plain accelerate: the same code runs on one CPU, one GPU, or several
processes under ``accelerate launch``. A run folder holds everything a later stage needs.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import classes as classes_mod, data as data_mod, dataset, engine, masks, methods, model as model_mod, runs, viz
from .diffusion import Objective
from .errors import DefectlabError

@dataclass
class TrainConfig(data_mod.DataConfig):
    image_size: int = 0            # 0 = the model's preset (tiny 64 px, mini 32 px, DiT-XL 128 px)
    model: str = "mini"            # mini (pre-trained, shipped) | tiny (random) | mini-scratch | facebook/DiT-XL-2-256 | local folder | original .pt
    method: str = "difffit"        # full | bitfit | difffit | bias_norm | lora
    name: str = ""                 # run name ("" = <product>-<method>)
    lr: float = 0.0                # 0 = preset (1e-5 real model, 1e-3 tiny/mini)
    epochs: int = 0                # 0 = preset (100 real model, 60 tiny/mini)
    max_steps: int = 0             # stop after this many optimizer steps (0 = no limit)
    batch_size: int = 4            # images per micro-batch (per process)
    grad_accum: int = 2            # micro-batches per optimizer step
    lr_schedule: str = "constant"  # constant | constant_with_warmup | cosine | linear
    warmup_steps: int = 0          # learning-rate warmup (optimizer steps)
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max gradient norm (0 = off)
    mixed_precision: str = "no"    # no | fp16 | bf16
    ema: float = 0.0               # EMA decay of the trained parameters (0 = off)
    label_dropout: float = 0.1     # class-label dropout, so guidance works after fine-tuning
    class_init: str = "anchor"     # anchor | nearest | topk (mean of 5 best) | mean | random | <class id>
    class_init_candidates: str = ""  # shortlist for nearest/topk, e.g. 990,783,0-99 ("" = all base classes)
    lora_rank: int = 8             # LoRA rank (method=lora)
    difffit_blocks: int = 0        # blocks with DiffFit scales (0 = all)
    val_per_class: int = 2         # training images per class held back for validation (0 = use train)
    val_timesteps: int = 8         # fixed timesteps of the validation loss
    val_every: int = 5             # validate (and checkpoint) every N epochs
    patience: int = 0              # stop after N validations without improvement (0 = off)
    keep_checkpoints: int = 2      # newest checkpoints kept (plus the best)
    seed: int = 0                  # seeds data order, noise, dropout, new class rows
    resume: str = ""               # run folder/name/number to continue from its last checkpoint
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    progress: bool = True          # tqdm progress bar
    mask_condition: bool = False   # defect mask as an extra zero-initialised input channel (masks.py); trains with any method
    frozen_dtype: str = "float32"  # float32 | bfloat16: frozen weights' dtype (trained ones stay float32; bf16 runs under autocast)
    tie_embeddings: bool = False   # one timestep/class embedder for all blocks, as the original DiT (needs identical copies: hub DiT-XL)
    grad_checkpointing: int = 0    # blocks recomputed in backward to save memory: 0 none, N the first N, -1 all
    compile: str = ""              # torch.compile mode, CUDA only: "" off | default | reduce-overhead | max-autotune
    latent_cache: bool = False     # encode each (image, augmentation view) once; same views and noise as without
    model_heads: int = 0           # attention heads of an original .pt whose width is not DiT-S/B/L/XL (0 = from its shape)
    numerics: str = "auto"         # timestep frequencies: auto (original for DiT .pt / facebook/DiT-* / DiTPipeline folders, else diffusers) | original | diffusers; stored resolved


@dataclass
class Restored:
    base: model_mod.Base
    model: torch.nn.Module
    classes: list[str]
    config: dict
    checkpoint: Path | None
    folder: Path | None = None


def resolved(cfg: TrainConfig) -> TrainConfig:
    """Fill the preset-dependent zeros so the saved config says what actually ran."""
    defaults = model_mod.preset(cfg.model)
    out = dataclasses.replace(cfg)
    for key in ("lr", "image_size", "epochs"):
        if not getattr(out, key):
            setattr(out, key, defaults[key])
    if not out.name:
        out.name = f"{out.product}-{out.method}"
    return out


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
    model_mod.check_numerics(cfg.numerics)
    if cfg.frozen_dtype not in ("float32", "bfloat16"):
        raise DefectlabError(f"frozen_dtype must be float32 or bfloat16 (got {cfg.frozen_dtype!r})")
    if cfg.compile and cfg.compile not in engine.COMPILE_MODES:
        raise DefectlabError(f"compile must be '' or one of {', '.join(engine.COMPILE_MODES)} (got {cfg.compile!r})")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise DefectlabError(f"mixed_precision must be no, fp16 or bf16 (got {cfg.mixed_precision!r})")


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


def build(cfg: TrainConfig, classes: list[str], device="cpu", data=None) -> tuple[model_mod.Base, torch.nn.Module]:
    """Base model with K class rows and the method applied — identical in training and restore."""
    base = model_mod.load(cfg.model, device=device, numerics=cfg.numerics, heads=cfg.model_heads)
    init = class_init_rows(cfg, base, data) if data is not None else "random"
    methods.set_classes(base.transformer, len(classes), init=init, seed=cfg.seed)
    for block in base.transformer.transformer_blocks:
        # diffusers draws label dropout independently in each block's own table; drop once,
        # consistently, in the loop instead (see _drop_labels).
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    if cfg.mask_condition:  # before apply (it sets requires_grad); zero init: step 0 is the base model
        methods.add_mask_channel(base.transformer)
    net = methods.apply(base.transformer, cfg.method, lora_rank=cfg.lora_rank, difffit_blocks=cfg.difffit_blocks,
                        verbose=False)  # run() prints the summary once, on the main process
    if cfg.mask_condition:  # the new channel must learn whatever the method freezes
        for p in methods.mask_parameters(net):
            p.requires_grad_(True)
    if cfg.tie_embeddings:  # changes which parameters exist: training and restore() must agree
        engine.tie_embeddings(net)
    return base, net


def restore(run: str | Path, checkpoint: str = "best", device="auto", numerics: str = "auto") -> Restored:
    """Rebuild base + trained state from a run folder (for sampling and evaluation), on
    ``device`` (``auto``: CUDA when there is one, else the CPU).

    ``numerics`` ``auto`` = what the run trained with (``config.json``; runs from before the
    setting existed trained with diffusers'), or ``original`` / ``diffusers`` to override."""
    model_mod.check_numerics(numerics)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    folder = runs.resolve(run)
    cfg = TrainConfig(**{"numerics": "diffusers", **runs.load_config(folder)})
    if numerics != "auto":
        cfg.numerics = numerics
    classes = runs.read_json(folder / "classes.json")
    ckpt = runs.find_checkpoint(folder, checkpoint)
    base, net = build(cfg, classes, device=device)
    state = runs.load_tensors(ckpt / runs.STATE_FILE)
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    trained = {k: v for k, v in state.items() if not k.startswith("ema.")}
    methods.load_trainable_state(net, ema or trained)  # EMA weights when the run kept them
    net.eval()
    return Restored(base, net, classes, dataclasses.asdict(cfg), ckpt, folder)


def _drop_labels(labels: torch.Tensor, k: int, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=gen, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, k), labels)


def _split_val(samples: list, per_class: int) -> tuple[list, list]:
    if per_class <= 0:
        return samples, samples
    train, val = [], []
    for label in sorted({s.label for s in samples}):
        members = [s for s in samples if s.label == label]
        if len(members) <= per_class:
            raise DefectlabError(f"class {members[0].defect!r} has {len(members)} training images; "
                                 f"need more than val_per_class={per_class}")
        train += members[:-per_class]
        val += members[-per_class:]
    return train, val


class Validator:
    """Loss on held-out images at fixed timesteps with fixed noise: comparable across epochs."""

    def __init__(self, samples, dcfg, base, objective, timesteps: int, seed: int, device,
                 mask_condition: bool = False):
        ds = dataset.DefectDataset(samples, dcfg, augment=False)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
        self.labels = torch.tensor([ds[i]["label"] for i in range(len(ds))], device=device)
        with torch.no_grad():
            self.x0 = base.codec.encode(images)
        gen = torch.Generator().manual_seed(seed + 12345)
        n = objective.num_timesteps
        self.timesteps = torch.linspace(0, n - 1, timesteps + 2)[1:-1].round().long().to(device)
        self.noise = torch.randn((timesteps, *self.x0.shape), generator=gen).to(device)
        self.objective = objective
        # mask_condition: the held-out masks on the latent grid, fed as the extra input channel
        self.cond = (masks.latent_mask(torch.stack([ds[i]["mask"] for i in range(len(ds))]), self.x0.shape[-2:])
                     .to(device) if mask_condition else None)

    @torch.no_grad()
    def __call__(self, net) -> float:
        was_training = net.training
        net.eval()
        total = 0.0
        for t, noise in zip(self.timesteps, self.noise):
            tt = t.repeat(len(self.x0))
            xt = self.objective.add_noise(self.x0, noise, tt)
            inp = xt if self.cond is None else torch.cat([xt, self.cond.to(xt)], 1)  # mask channel
            out = net(inp, timestep=tt, class_labels=self.labels).sample
            total += self.objective.loss(out, self.x0, xt, noise, tt)[0].mean().item()
        net.train(was_training)
        return total / len(self.timesteps)


def run(cfg: TrainConfig) -> Path:
    """Train; returns the run folder. Resumes when ``cfg.resume`` names a run."""
    if cfg.resume:
        folder = runs.resolve(cfg.resume, cfg.runs_dir or None)
        saved = runs.load_config(folder)
        cfg = TrainConfig(**{"numerics": "diffusers", **saved, "resume": str(folder), "progress": cfg.progress})
    cfg = resolved(cfg)
    _check(cfg)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    dcfg = data_mod.DataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(data_mod.DataConfig)})
    folder = [cfg.resume]
    if not cfg.resume and acc.is_main_process:
        folder = [str(runs.create(cfg.name, dataclasses.asdict(cfg), base=cfg.runs_dir or None))]
    folder = Path(broadcast_object_list(folder)[0])  # every process writes into the same run
    data = data_mod.load(dcfg, manifest=folder / "split.json")
    train_samples, val_samples = _split_val(data.train, cfg.val_per_class)
    if cfg.batch_size > len(train_samples):
        raise DefectlabError(f"batch_size {cfg.batch_size} is larger than the {len(train_samples)} training images")
    runs.write_json(folder / "classes.json", data.classes)

    base, net = build(cfg, data.classes, device=acc.device, data=data)
    if cfg.numerics == "auto":  # stored resolved: restore() computes as the run trained, whatever auto means later
        cfg.numerics = base.numerics
        if acc.is_main_process:
            runs.update_config(folder, numerics=base.numerics)
    engine.prepare_for_training(net, frozen_dtype=cfg.frozen_dtype, grad_checkpointing=cfg.grad_checkpointing,
                                compile=cfg.compile)
    k = len(data.classes)
    trainable = [p for p in net.parameters() if p.requires_grad]
    acc.print(methods.summary(net))
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_set = dataset.DefectDataset(train_samples, dcfg, augment=True)
    if cfg.latent_cache:  # the codec is frozen: each (image, view) is encoded once, when first drawn
        train_set = dataset.LatentCache(train_samples, dcfg, base.codec, device=acc.device).dataset()
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size,
        shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    net, opt, loader, sched = acc.prepare(net, opt, loader, sched)
    objective = Objective(base.scheduler_config, acc.device)
    validate = Validator(val_samples, dcfg, base, objective, cfg.val_timesteps, cfg.seed, acc.device,
                         mask_condition=cfg.mask_condition)
    ema = EMAModel(trainable, decay=cfg.ema) if cfg.ema > 0 else None

    step, start_epoch, best, bad = 0, 0, float("inf"), 0
    last = runs.latest_checkpoint(folder)
    if last is not None:
        step, start_epoch, best, bad = _load_state(last, acc, net, opt, sched, loader, ema)
        acc.print(f"resumed {folder.name} from {last.name} (epoch {start_epoch}, step {step})")
    if start_epoch >= cfg.epochs or (cfg.max_steps and step >= cfg.max_steps):
        return folder

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and acc.is_main_process),
               desc=f"{cfg.method} {folder.name}", unit="step")
    net.train()
    t0, stop = time.time(), False
    for epoch in range(start_epoch, cfg.epochs):
        for batch in loader:
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
                mse, vb = objective.loss(out, x0, xt, noise, t)
                loss = (mse + vb).mean()
                if not torch.isfinite(loss):
                    kept = runs.latest_checkpoint(folder)
                    raise DefectlabError(f"loss became {loss.item()} at step {step} (epoch {epoch}); "
                                         f"last good checkpoint: {kept or 'none'}; try a lower --lr")
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                step += 1
                if ema is not None:
                    ema.step(trainable)
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "mse": mse.mean().item(),
                       "vb": vb.mean().item(), "lr": sched.get_last_lr()[0], "time": round(time.time() - t0, 2)}
                if acc.is_main_process:
                    runs.log(folder, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}")
                bar.update(1)
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = True
                    break
        end = epoch + 1
        if end % cfg.val_every == 0 or end == cfg.epochs or stop:
            val = _ema_val(ema, trainable, validate, net) if ema is not None else validate(net)
            improved = val < best
            best, bad = (val, 0) if improved else (best, bad + 1)
            if acc.is_main_process:
                runs.log(folder, {"step": step, "epoch": epoch, "val_loss": val, "best": best,
                                  "objective": objective.prediction_type})
                _save_state(folder, cfg, acc, net, opt, sched, loader, ema, step, end, best, bad)
                if improved:
                    runs.mark(folder, "best", step, val_loss=val, epoch=end)
            bar.write(f"epoch {end}: val_loss {val:.4f} (best {best:.4f})") if cfg.progress else None
            if cfg.patience and bad >= cfg.patience:
                acc.print(f"early stop: no improvement in {cfg.patience} validations")
                break
        if stop:
            break
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        plot_loss(folder)
    return folder


def _ema_val(ema: EMAModel, params, validate, net) -> float:
    """Validate with the EMA weights, then put the live weights back."""
    ema.store(params)
    ema.copy_to(params)
    try:
        return validate(net)
    finally:
        ema.restore(params)


def _save_state(folder, cfg, acc, net, opt, sched, loader, ema, step, epoch, best, bad) -> Path:
    unwrapped = acc.unwrap_model(net)
    state = methods.trainable_state(unwrapped)
    if ema is not None:
        names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        state.update({f"ema.{n}": p for n, p in zip(names, ema.shadow_params)})
    opt_tensors, skeleton = runs.flatten_optimizer(opt.state_dict())
    opt_tensors["rng.torch"] = torch.get_rng_state()
    opt_tensors["rng.loader"] = loader.generator.get_state() if getattr(loader, "generator", None) is not None \
        else torch.get_rng_state()
    meta = {"epoch": epoch, "best": best, "bad": bad, "optimizer": skeleton,
            "lr_scheduler": sched.state_dict(), "method": cfg.method, "base_model": cfg.model,
            "ema_step": ema.optimization_step if ema is not None else 0}
    return runs.save_checkpoint(folder, step, state, meta, optimizer=opt_tensors, keep=cfg.keep_checkpoints)


def _load_state(ckpt: Path, acc, net, opt, sched, loader, ema) -> tuple[int, int, float, int]:
    meta = runs.read_json(ckpt / runs.META_FILE)
    state = runs.load_tensors(ckpt / runs.STATE_FILE)
    unwrapped = acc.unwrap_model(net)
    methods.load_trainable_state(unwrapped, {k: v for k, v in state.items() if not k.startswith("ema.")})
    if ema is not None:
        names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        ema.shadow_params = [state[f"ema.{n}"].to(acc.device) for n in names]
        ema.optimization_step = meta["ema_step"]  # the decay warm-up depends on it
    tensors = runs.load_tensors(ckpt / runs.OPTIM_FILE)
    opt.load_state_dict(runs.unflatten_optimizer(tensors, meta["optimizer"]))
    sched.load_state_dict(meta["lr_scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if getattr(loader, "generator", None) is not None:
        loader.generator.set_state(tensors["rng.loader"])
    return meta["step"], meta["epoch"], meta["best"], meta["bad"]


def plot_loss(folder: Path, formats: str = "png") -> Path | None:
    """``viz.loss_figure`` of a run's log → ``<run>/figures/loss_curve.<format>`` (the first path)."""
    fig = viz.loss_figure(runs.read_log(folder), Path(folder).name)
    return None if fig is None else viz.save_figure(fig, Path(folder) / "figures", "loss_curve", formats)[0]
