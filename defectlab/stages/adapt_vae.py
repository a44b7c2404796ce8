"""Adapt a latent base's autoencoder to a product: its decoder learns the product's own images.

``run(AdaptVAEConfig(...))`` (CLI: ``defectlab adapt-vae``) fine-tunes the *decoder* of the
base's VAE (and its ``post_quant_conv``) to reconstruct the product's defect-free images and the
training split's defect images, at every scale a fine-tune works on (``zooms``: the whole image
at ``image_size``, and ``image_size`` windows of the image read at ``image_size × zoom``, on the
product or around each defect), with an L1 + MSE loss. The encoder stays as it is, so every image
encodes to exactly the latents it had: the base's transformer, a run fine-tuned on the base and
its latent cache stay valid, and only what the latents decode to changes. (A base's autoencoder
that never saw the product — the offline one was trained on procedural shapes — loses the
product's edges and texture on the way back; no transformer can draw better than its decoder.)

The result is a model folder: the base with the adapted ``vae/`` (the transformer's files linked
or copied as they are), ``vae/adaptation.json`` saying from what, on which images, how many
steps, and the reconstruction error before and after on held-back good images and on the test
split's defect windows. ``finetune --model OUT`` and every later stage use it through the same
``from_pretrained`` path. Resumable: atomic checkpoints (decoder, AdamW state, step) in a run
folder; the views of step ``s`` are drawn from a generator seeded with (``seed``, ``s``), so a
resumed run gives the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..base import folders, paths, runs
from ..base.errors import DefectlabError
from ..base.progress import tqdm
from ..base.images import to_grey
from ..core import loop, model as model_mod, presence, resume
from ..core.codec import VAECodec
from ..data import dataset, fetch, sources

PRESENCE_REFS = 64          # training good images the presence check compares against
RECORD = "adaptation.json"  # in the output's vae/: what it was adapted on, the errors before and after
LEFT_BEHIND = {"vae", "MODEL_CARD.md", "README.md", "samples.png"}  # the base's: its autoencoder, its own card and samples


@dataclass
class AdaptVAEConfig:
    data: str = "synthetic-v2"     # dataset root (MVTec AD or DS-MVTec layout) or synthetic / synthetic-v2
    product: str = "hazelnut"      # product folder name
    model: str = "mini-latent"     # the latent base whose VAE is adapted (shipped name, folder or hub id)
    out: str = ""                  # output model folder ("" = outputs/models/<base>-<product>)
    name: str = "adapt-vae"        # run folder name (checkpoints, log)
    resume: str = ""               # run folder/name/number to continue from its last checkpoint
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    image_size: int = 0            # side the transformer works at (0 = the base's own)
    zooms: tuple[int, ...] = (1, 4)  # scales trained on: 1 = whole images, z > 1 = windows of image_size at image_size × z (finetune's --zoom)
    good_images: int = -1          # defect-free images to learn from (-1 = all but the held-back ones)
    holdout: int = 8               # defect-free images kept out of training to measure the error on
    defects: bool = True           # also learn from the training split's defect images (never its test split)
    test_fraction: float = 0.25    # the defect split, as finetune's --test-fraction (its test images are measured, never trained on)
    split_seed: int = 0            # as finetune's --split-seed
    batch_size: int = 12           # views per optimizer step
    lr: float = 1e-3               # AdamW learning rate
    max_steps: int = 1500          # optimizer steps
    seed: int = 0                  # seeds the views of each step
    checkpoint_every: int = 250    # optimizer steps between checkpoints
    threads: int = 0               # torch CPU threads (0 = torch's default)
    progress: bool = True          # progress bar


MAY_CHANGE = ("resume", "runs_dir", "out", "max_steps", "checkpoint_every")
PER_CALL = ("threads", "progress")


@dataclass
class Images:
    good: list[Path]                            # trained on
    held: list[Path]                            # measured on
    defects: list[tuple[Path, Path | None]]     # training split (image, mask): trained on
    test_defects: list[tuple[Path, Path | None]]  # test split: measured on
    greyscale: bool


def check(cfg: AdaptVAEConfig) -> None:
    if not cfg.zooms or any(not 1 <= int(z) <= 8 for z in cfg.zooms):
        raise DefectlabError(f"zooms must be between 1 and 8 (got {cfg.zooms})")
    for name in ("batch_size", "max_steps", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise DefectlabError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.holdout < 0 or cfg.good_images < -1:
        raise DefectlabError(f"holdout must be ≥ 0 and good_images ≥ -1 (got {cfg.holdout}, {cfg.good_images})")
    if cfg.lr <= 0:
        raise DefectlabError(f"lr must be positive (got {cfg.lr})")


def images(cfg: AdaptVAEConfig) -> Images:
    """The product's images, split as described in the module doc; one line if there are none."""
    data = sources.load(sources.DataConfig(data=cfg.data, product=cfg.product, test_fraction=cfg.test_fraction,
                                           split_seed=cfg.split_seed))
    good = list(data.good)
    held = good[len(good) - cfg.holdout:] if 0 < cfg.holdout < len(good) else []
    good = good[:len(good) - len(held)]
    good = good if cfg.good_images < 0 else good[:cfg.good_images]
    defects = [(s.image, s.mask) for s in data.train] if cfg.defects else []
    if not good and not defects:
        raise DefectlabError(f"adapt-vae: {data.root} has no defect-free images of {cfg.product} to learn from "
                             "(and --defects is off)")
    return Images(good, held, defects, [(s.image, s.mask) for s in data.test], data.greyscale)


def view(path: Path, mask: Path | None, size: int, zoom: int, gen: torch.Generator | None) -> torch.Tensor:
    """The ``size`` view of an image at ``zoom``: the whole image (1), else a window around the
    mask or on a product pixel drawn with ``gen``."""
    img = dataset.load_image(path, size * zoom)
    if zoom == 1:
        return img
    if mask is not None:
        y, x = dataset.window(dataset.load_mask(mask, size * zoom), size)
    else:
        y, x = dataset.product_window(img, size, gen)
    return img[:, y:y + size, x:x + size]


def batch(imgs: Images, cfg: AdaptVAEConfig, size: int, step: int) -> torch.Tensor:
    """Step ``step``'s views: a third defect images (when there are any), the rest good ones, each
    at a zoom drawn from ``zooms``, flipped at random — all drawn from a (seed, step) generator."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    n_def = 0 if not imgs.defects else max(1, cfg.batch_size // 3) if imgs.good else cfg.batch_size
    picks = ([(imgs.good[int(i)], None) for i in torch.randint(len(imgs.good), (cfg.batch_size - n_def,), generator=gen)]
             if imgs.good else [])
    picks += [imgs.defects[int(i)] for i in torch.randint(len(imgs.defects), (n_def,), generator=gen)] if n_def else []
    out = []
    for path, mask in picks:
        zoom = int(cfg.zooms[int(torch.randint(len(cfg.zooms), (), generator=gen))])
        x = view(path, mask, size, zoom, gen)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-2)
        out.append(x)
    return torch.stack(out)


def round_trip(vae, x: torch.Tensor, grey: bool) -> torch.Tensor:
    """Encode (posterior mean) and decode, 16 at a time; grey for a greyscale dataset, as its samples are."""
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 16]).latent_dist.mean).sample.clamp(-1, 1)
                     for i in range(0, len(x), 16)])
    return to_grey(rec) if grey else rec


def probe(imgs: Images, cfg: AdaptVAEConfig, size: int) -> dict[str, torch.Tensor]:
    """The views ``measure`` scores, read once for before and after, none of them trained on:
    the held-back good images at each zoom, the test split's defect windows at the largest zoom,
    and (``unseen``, ``refs``) the held-back and test images whole with the training good images
    the presence check compares them against."""
    whole = [view(p, None, size, 1, None) for p in [*imgs.held, *(q for q, _ in imgs.test_defects)]]
    sets = {f"good_zoom{z}": (whole[:len(imgs.held)] if z == 1 else
                              [view(p, None, size, z, torch.Generator().manual_seed(i)) for i, p in enumerate(imgs.held)])
            for z in cfg.zooms}
    sets[f"test_defects_zoom{max(cfg.zooms)}"] = [view(p, m, size, max(cfg.zooms), None) for p, m in imgs.test_defects]
    if len(imgs.good) >= 3 and whole:
        sets["unseen"] = whole
        sets["refs"] = [view(p, None, size, 1, None) for p in imgs.good[:PRESENCE_REFS]]
    return {name: torch.stack(views) for name, views in sets.items() if views}


@torch.no_grad()
def measure(vae, views: dict[str, torch.Tensor], grey: bool) -> dict:
    """Reconstruction L1 and PSNR ([-1, 1] images) of each of ``probe``'s views; and ``presence``:
    whether the product survives the round trip, ``presence.product_presence`` of the unseen whole
    images before and after encoding and decoding — the ceiling of any free sample drawn through
    this autoencoder."""
    out = {}
    for name, x in views.items():
        if name not in ("unseen", "refs"):
            rec = round_trip(vae, x, grey)
            out[name] = {"n": len(x), "l1": round(F.l1_loss(rec, x).item(), 5),
                         "psnr": round((10 * torch.log10(4 / F.mse_loss(rec, x))).item(), 2)}
    if "unseen" in views:
        x = views["unseen"]
        p = presence.product_presence(views["refs"], {"real": x, "round_trip": round_trip(vae, x, grey)})
        out["presence"] = {"n": len(x), "threshold": p.threshold, "real": p.per_class["real"],
                           "round_trip": p.per_class["round_trip"], "interval": list(p.interval["round_trip"]),
                           "iou_real": round(p.iou["real"], 4), "iou_round_trip": round(p.iou["round_trip"], 4)}
    return out


def run(cfg: AdaptVAEConfig) -> Path:
    """Adapt (or resume), export the model folder; returns it."""
    if cfg.resume:
        folder = runs.resolve(cfg.resume, Path(cfg.runs_dir) if cfg.runs_dir else None)
        saved = runs.load_config(folder)
        cfg = AdaptVAEConfig(**{**resume.settings(saved, dataclasses.asdict(cfg), dataclasses.asdict(AdaptVAEConfig()),
                                                  folder, MAY_CHANGE, PER_CALL), "zooms": tuple(saved["zooms"])})
    cfg.zooms = tuple(int(z) for z in cfg.zooms)
    check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    codec, default_size = model_mod.load_codec(cfg.model)  # the transformer's weights are not needed
    if not isinstance(codec, VAECodec):
        raise DefectlabError(f"model {cfg.model} works on pixels: it has no autoencoder to adapt")
    size = cfg.image_size or default_size
    imgs = images(cfg)
    out = Path(cfg.out) if cfg.out else paths.MODELS / f"{Path(cfg.model).name}-{cfg.product}"
    if not cfg.resume:
        folder = runs.create(cfg.name, {**dataclasses.asdict(cfg), "image_size": size},
                             base=Path(cfg.runs_dir) if cfg.runs_dir else None)
    vae = codec.vae.float().requires_grad_(False)
    views = probe(imgs, cfg, size)
    before = measure(vae.eval(), views, imgs.greyscale)
    trained = {"decoder": vae.decoder, **({"post_quant_conv": vae.post_quant_conv}
                                          if getattr(vae, "post_quant_conv", None) is not None else {})}
    named = [(f"{i}.{n}", p) for i, m in enumerate(trained.values()) for n, p in m.named_parameters()]
    for _, p in named:
        p.requires_grad_(True)
    stepper = loop.Stepper(named, torch.optim.AdamW([p for _, p in named], lr=cfg.lr))
    step, wall = 0, 0.0
    if (last := runs.latest_checkpoint(folder)) is not None:
        got = loop.load(last, stepper)
        with torch.no_grad():
            for n, p in named:
                p.copy_(got.state[n])
        step, wall = got.meta["step"], got.meta["wall_s"]
    t0, losses = time.time(), []
    vae.decoder.train()
    with tqdm(total=cfg.max_steps, initial=step, desc="adapt-vae", disable=not cfg.progress) as bar:
        while step < cfg.max_steps:
            x = batch(imgs, cfg, size, step)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
            rec = vae.decode(z).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            stepper(loss, f"at step {step}")
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % 50 == 0:
                runs.log(folder, {"step": step, "loss": sum(losses) / len(losses), "time": round(wall + time.time() - t0, 1)})
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
                losses = []
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:  # the last step is always saved
                _save(folder, stepper, named, step, wall + time.time() - t0)
    wall += time.time() - t0
    after = measure(vae.eval(), views, imgs.greyscale)
    record = {"base": cfg.model, "data": cfg.data, "product": cfg.product, "image_size": size, "zooms": list(cfg.zooms),
              "steps": step, "wall_s": round(wall), "run": folder.name, "trained": " + ".join(trained),
              "good_images": len(imgs.good), "defect_images": len(imgs.defects), "held_good": len(imgs.held),
              "test_defects": len(imgs.test_defects), "before": before, "after": after, "config": dataclasses.asdict(cfg)}
    export(cfg.model, vae, out, record)
    for name in (n for n in after if n != "presence"):
        print(f"{name}: L1 {before[name]['l1']:.4f} → {after[name]['l1']:.4f}, "
              f"PSNR {before[name]['psnr']:.1f} → {after[name]['psnr']:.1f} dB ({after[name]['n']} views)")
    if "presence" in after:
        b, a = before["presence"], after["presence"]
        print(f"product kept by the round trip (presence, {a['n']} unseen images): {b['round_trip']:.0%} → "
              f"{a['round_trip']:.0%} (the images themselves: {a['real']:.0%}); mean best IoU {b['iou_round_trip']:.3f} → "
              f"{a['iou_round_trip']:.3f} ({a['iou_real']:.3f})")
    print(f"model with the adapted autoencoder → {out} (finetune --model {out})")
    return out


def _save(folder: Path, stepper: loop.Stepper, named: list, step: int, wall: float) -> Path:
    return loop.save(folder, step, stepper, {n: p.detach() for n, p in named}, keep=2, wall_s=wall)


def _source_folder(spec: str) -> Path:
    """The files of base ``spec``: a shipped name, a folder or a hub id (from the local cache or the hub)."""
    if spec in model_mod.SHIPPED:
        return paths.ASSETS / spec
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    if Path(spec).expanduser().is_file():
        raise DefectlabError(f"adapt-vae: {spec} is a single checkpoint file; convert it to a folder first "
                             "(defectlab export) or use a hub id")
    from huggingface_hub import snapshot_download
    with fetch.hub_errors(spec, "model_index.json"):
        return Path(snapshot_download(spec, allow_patterns=["transformer/*", "scheduler/*", "model_index.json", "*.json",
                                                            "*.safetensors"], ignore_patterns=["vae/*"]))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export(spec: str, vae, out: Path, record: dict) -> Path:
    """The base's folder with ``vae/`` replaced by ``vae`` (+ ``vae/adaptation.json``), swapped in atomically."""
    source = _source_folder(spec)
    with folders.building(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if n in LEFT_BEHIND] if Path(d) == source else [])
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        runs.write_json(tmp / "vae" / RECORD, record)
    return out
