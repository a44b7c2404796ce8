"""Pre-train a small autoencoder on the procedural corpus: the offline stand-in for DiT-XL's SD VAE.

``run(AEConfig(...))`` (CLI: ``defectlab pretrain-ae``) trains a diffusers ``AutoencoderKL`` (the
SD VAE's class, scaled down: 64 px → 16×16×4 latents with the default three blocks) on
``corpus.py`` images with an L1 reconstruction loss plus a small KL term, as the VAE of latent
diffusion without its perceptual and GAN terms (their weights cannot be downloaded here). It
measures the latents' spread on held-back corpus items and stores ``scaling_factor = 1 / std`` in
the config, as the SD VAE's 0.18215, so ``codec.VAECodec`` scales its latents to unit variance.
The export is a plain ``save_pretrained`` folder: a latent base ships it as its ``vae/``
subfolder and ``model.load`` takes it through the same path as DiT-XL's VAE.

Resumable like ``pretrain``: atomic checkpoints (weights, AdamW state, step) in a run folder;
corpus item ``i`` and the posterior noise of step ``s`` are seeded, so resuming gives the same
weights as one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..base import folders, paths, runs
from ..base.errors import DefectlabError
from ..data import corpus
from ..core import loop, resume

CORPUS_OFFSET = 10_000_000   # item indices the AE trains on (the DiT's pre-training reads from 0 up)
HOLDOUT = 9_000_000          # items that measure the latent spread and the reconstruction error


@dataclass
class AEConfig:
    out: str = ""                  # export folder ("" = outputs/models/ae-<size>)
    name: str = "pretrain-ae"      # run folder name (checkpoints, log)
    resume: str = ""               # run folder/name/number to continue from its last checkpoint
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    image_size: int = 64           # corpus resolution (px)
    channels: str = "32,64,64"     # widths of the encoder/decoder blocks; n blocks halve the size n-1 times
    latent_channels: int = 4       # channels of a latent cell (SD VAE: 4)
    layers_per_block: int = 1      # resnet layers per block
    corpus_seed: int = 0           # seed of the procedural corpus
    seed: int = 0                  # seeds the init and the posterior noise
    batch_size: int = 16           # images per optimizer step
    lr: float = 1e-3               # AdamW learning rate
    kl_weight: float = 1e-6        # weight of the KL term (latent diffusion's VAE: 1e-6)
    max_steps: int = 4000          # optimizer steps
    time_budget: float = 0.0       # wall-clock minutes for this call (0 = none); then checkpoint + export
    checkpoint_every: int = 250    # optimizer steps between checkpoints
    threads: int = 0               # torch CPU threads (0 = torch's default)
    progress: bool = True          # print a line every 50 steps


MAY_CHANGE = ("resume", "runs_dir", "out", "max_steps", "checkpoint_every")  # on --resume; the rest stays
PER_CALL = ("time_budget", "threads", "progress")                           # each call's own


def vae_config(cfg: AEConfig) -> dict:
    try:
        widths = [int(c) for c in str(cfg.channels).split(",") if c.strip()]
    except ValueError:
        widths = []
    if not widths or min(widths) < 8 or any(w % 8 for w in widths):
        raise DefectlabError(f"channels must be comma-separated multiples of 8 (got {cfg.channels!r})")
    if cfg.image_size % 2 ** (len(widths) - 1):
        raise DefectlabError(f"image_size {cfg.image_size} is not a multiple of {2 ** (len(widths) - 1)} "
                             f"({len(widths)} blocks)")
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(widths),
                up_block_types=["UpDecoderBlock2D"] * len(widths), block_out_channels=widths,
                layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                norm_num_groups=8, sample_size=cfg.image_size)


def build(cfg: AEConfig) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKL(**vae_config(cfg))


def loss_terms(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 reconstruction, KL to N(0, 1)) of a batch, the posterior sampled with ``gen``."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(gen)).sample
    return F.l1_loss(rec, x), post.kl().mean() / x[0].numel()


@torch.no_grad()
def measure(vae: AutoencoderKL, cfg: AEConfig, n: int = 256) -> dict:
    """Latent spread (→ ``scaling_factor``) and reconstruction error on held-back corpus items."""
    vae.eval()
    x, _ = corpus.batch(HOLDOUT, n, cfg.corpus_seed, cfg.image_size)
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, n, 64)])
    rec = torch.cat([vae.decode(z[i:i + 64]).sample for i in range(0, n, 64)])
    vae.train()
    return {"latent_std": z.std().item(), "l1": F.l1_loss(rec, x).item(),
            "psnr": (10 * torch.log10(4 / F.mse_loss(rec, x))).item()}


def run(cfg: AEConfig) -> Path:
    """Train (or resume) and export; returns the export folder."""
    if cfg.resume:
        folder = runs.resolve(cfg.resume, Path(cfg.runs_dir) if cfg.runs_dir else None)
        cfg = AEConfig(**resume.settings(runs.load_config(folder), dataclasses.asdict(cfg),
                                         dataclasses.asdict(AEConfig()), folder, MAY_CHANGE, PER_CALL))
    vae_config(cfg)  # bad settings fail before a run folder exists
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.resume:
        folder = runs.create(cfg.name, dataclasses.asdict(cfg), base=Path(cfg.runs_dir) if cfg.runs_dir else None)
    vae = build(cfg).train()
    stepper = loop.Stepper(list(vae.named_parameters()), torch.optim.AdamW(vae.parameters(), lr=cfg.lr))
    step, wall = 0, 0.0
    if (last := runs.latest_checkpoint(folder)) is not None:
        got = loop.load(last, stepper)
        vae.load_state_dict(got.state)
        step, wall = got.meta["step"], got.meta["wall_s"]
        print(f"resumed {folder.name} at step {step} ({wall / 60:.1f} min)")
    saved_step, t0, losses = step if last is not None else -1, time.time(), []
    while step < cfg.max_steps and not (cfg.time_budget and time.time() - t0 > cfg.time_budget * 60):
        x, _ = corpus.batch(CORPUS_OFFSET + step * cfg.batch_size, cfg.batch_size, cfg.corpus_seed, cfg.image_size)
        l1, kl = loss_terms(vae, x, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        stepper(l1 + cfg.kl_weight * kl, f"at step {step}")
        step += 1
        losses.append((l1.item(), kl.item()))
        if step % 50 == 0:
            rec = {"step": step, "l1": sum(a for a, _ in losses) / len(losses),
                   "kl": sum(b for _, b in losses) / len(losses), "time": round(wall + time.time() - t0, 1)}
            runs.log(folder, rec)
            losses = []
            if cfg.progress:
                print(f"step {step} l1 {rec['l1']:.4f} kl {rec['kl']:.2f} {rec['time'] / 60:.1f} min", flush=True)
        if step % cfg.checkpoint_every == 0:
            _save(folder, stepper, vae, step, wall + time.time() - t0)
            saved_step = step
    wall += time.time() - t0
    if step > saved_step:
        _save(folder, stepper, vae, step, wall)
    return export(vae, cfg, Path(cfg.out) if cfg.out else paths.MODELS / f"ae-{cfg.image_size}",
                  {"step": step, "wall_s": round(wall), "run": folder.name})


def _save(folder: Path, stepper: loop.Stepper, vae: AutoencoderKL, step: int, wall: float) -> Path:
    return loop.save(folder, step, stepper, vae.state_dict(), keep=2, wall_s=wall)


def export(vae: AutoencoderKL, cfg: AEConfig, out: Path, info: dict) -> Path:
    """``save_pretrained`` with ``scaling_factor`` = 1 / latent std, swapped in atomically."""
    stats = measure(vae, cfg)
    vae.register_to_config(scaling_factor=round(1 / stats["latent_std"], 5))
    card = {**info, **{k: round(v, 4) for k, v in stats.items()}, "config": dataclasses.asdict(cfg),
            "corpus_version": corpus.CORPUS_VERSION}
    with folders.building(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        runs.write_json(tmp / "training.json", card)
    print(f"autoencoder → {out}: held-out L1 {stats['l1']:.4f}, PSNR {stats['psnr']:.1f} dB, "
          f"scaling_factor {vae.config.scaling_factor}")
    return out
