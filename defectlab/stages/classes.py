"""Rank the base model's classes by how well they denoise each defect class.

A class-conditional diffusion model is also a classifier: the class whose embedding gives the
lowest denoising error (noise or v prediction) on an image is the class the model thinks the image shows. The
original write-up started each new class from a hand-picked ImageNet row (buckeye 990 for
hazelnut, screw 783); ``run`` scores every candidate row on each defect class's *training*
images, so that choice can be checked, and ``nearest_rows`` gives ``train --class-init nearest``
the best one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..base.progress import tqdm
from ..data import dataset, sources as data_mod
from ..core import methods, model as model_mod, viz
from ..core.codec import check_image_size
from ..core.diffusion import Objective


# Not a DataConfig subclass: its augmentation fields would be flags that do nothing here
# (ranking never augments). The data fields below keep DataConfig's names and defaults.
@dataclass
class RankConfig:
    data: str = "synthetic"        # "synthetic" (embedded default), "synthetic-v2" (drawn with version 2) or a dataset root folder
    product: str = "hazelnut"      # product folder name
    image_size: int = 0            # 0 = fine-tuning's default for the model (tiny/mini 64, DiT-XL 128)
    crop: int = 0                  # centre crop (px, before resize); 0 = none
    test_fraction: float = 0.25    # held out per class; only the training images are scored
    split_seed: int = 0            # seed of the per-class split (fine-tuning's split)
    model: str = "mini"            # mini (pre-trained, shipped) | tiny (random) | mini-scratch | facebook/DiT-XL-2-256 | local folder | original .pt
    numerics: str = "auto"         # timestep frequencies: auto (the model's own) | original | diffusers
    model_heads: int = 0           # attention heads of an original .pt whose width is not DiT-S/B/L/XL (0 = from its shape)
    candidates: str = ""           # base class ids or ranges, comma-separated (990,783,0-15); empty = all
    timesteps: int = 8             # fixed timesteps, evenly spaced over the schedule
    noise_draws: int = 1           # noise samples per (image, timestep)
    top_k: int = 5                 # classes reported per defect class
    batch_size: int = 64           # forwards per batch (noisy inputs x candidate classes)
    seed: int = 0                  # seeds the fixed noise
    out: str = ""                  # folder for ranking.json + figure ("" = outputs/class_rank/<product>-<model>)
    progress: bool = True          # tqdm progress bar
    formats: str = "png"           # figure formats, comma-separated: png, pdf, svg


# TrainConfig fields that mean the same here; ranking settings keep RankConfig's defaults
# (train's batch_size counts training images, not forwards).
_FROM_TRAIN = ("data", "product", "image_size", "crop", "test_fraction", "split_seed", "model", "numerics",
               "model_heads", "seed", "progress")
# Names of the anchor ids, for a 1000-class base that ships no id2label (tiny, a bare .pt).
_ANCHOR_NAMES = {cid: name for cid, name in data_mod.ANCHOR_CLASSES.values()}


def parse_candidates(text, n: int | None = None) -> list[int]:
    """``"990,783,0-15"`` → ids (duplicates dropped, order kept); empty = all ``n`` classes.
    ``n=None`` checks the syntax only (before a slow model load)."""
    text = ",".join(map(str, text)) if isinstance(text, (list, tuple, range)) else str(text)
    if not text.strip():
        return list(range(n or 0))
    ids: list[int] = []
    for tok in (t.strip() for t in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
        if not m or (m[2] and int(m[2]) < int(m[1])):
            raise DefectlabError(f"candidates: {tok!r} is not a class id or range (expected e.g. 990,783,0-15)")
        if n is not None and int(m[2] or m[1]) >= n:
            raise DefectlabError(f"candidates: {tok} is outside the base model's classes 0-{n - 1}")
        ids += range(int(m[1]), int(m[2] or m[1]) + 1)
    return list(dict.fromkeys(ids))


def fixed_timesteps(num_train_timesteps: int, count: int) -> torch.Tensor:
    """Evenly spaced, ends excluded (t=0 barely depends on the class, t=T-1 is almost pure noise)."""
    return torch.linspace(0, num_train_timesteps - 1, count + 2)[1:-1].round().long()


@torch.no_grad()
def scores(transformer, x0: torch.Tensor, ids: list[int], scheduler_config: dict, timesteps: int = 8,
           noise_draws: int = 1, seed: int = 0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Mean prediction MSE (noise or v, as the base predicts) ``[len(ids), N]`` of each candidate class on each clean latent
    ``x0 [N,C,H,W]``, over fixed timesteps and fixed noise shared by all candidates."""
    device, dtype = x0.device, next(transformer.parameters()).dtype
    obj = Objective(scheduler_config, device)
    n, c = len(x0), x0.shape[1]
    ts = fixed_timesteps(obj.num_timesteps, timesteps)
    # One noise per (draw, timestep, image), drawn on the CPU: the same numbers on any device.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((noise_draws * timesteps * n, *x0.shape[1:]), generator=gen).to(device)
    tt = ts.repeat_interleave(n).repeat(noise_draws).to(device)
    x0 = x0.float().repeat(noise_draws * timesteps, 1, 1, 1)
    xt = obj.add_noise(x0, noise, tt)  # shared by every candidate: built once
    target = obj.target(x0, noise, tt)  # the noise, or v for a v-prediction base
    m = len(xt)
    per_in = min(m, batch_size)                    # noisy inputs per batch ...
    per_cand = max(1, batch_size // per_in)        # ... times this many candidate classes
    batches = [(j, i) for j in range(0, len(ids), per_cand) for i in range(0, m, per_in)]
    cand = torch.tensor(ids, device=device)
    err = torch.empty(len(ids), m)
    was_training = transformer.training
    transformer.eval()  # eval: the label embedder would randomly drop labels to the null class
    try:
        for j, i in tqdm(batches, disable=not progress, desc="ranking classes", unit="batch"):
            labels, x = cand[j:j + per_cand], xt[i:i + per_in]
            k, b = len(labels), len(x)
            out = transformer(x.repeat(k, 1, 1, 1).to(dtype), timestep=tt[i:i + b].repeat(k),
                              class_labels=labels.repeat_interleave(b)).sample
            mse = ((out[:, :c].float() - target[i:i + b].repeat(k, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
            err[j:j + k, i:i + b] = mse.view(k, b).cpu()
    finally:
        transformer.train(was_training)
    return err.view(len(ids), noise_draws * timesteps, n).mean(1)


def _image_size(cfg, base: model_mod.Base) -> int:
    if cfg.image_size:
        size = cfg.image_size
    else:  # what fine-tuning uses by default, so `defectlab classes` previews --class-init nearest
        size = model_mod.preset(cfg.model)["image_size"]
    return check_image_size(size, base.codec, base.transformer.config.patch_size, base.spec)


def _data_cfg(cfg, size: int) -> data_mod.DataConfig:
    return data_mod.from_settings(cfg, image_size=size)


def class_name(base: model_mod.Base, cid: int) -> str:
    if base.class_names:
        return base.class_names[cid]
    n = methods.num_classes(base.transformer)
    return _ANCHOR_NAMES.get(cid, "") if n == 1000 else ""


def rank(base: model_mod.Base, data: data_mod.DefectData, cfg: RankConfig) -> dict:
    """Score ``cfg.candidates`` on each defect class's training images (no augmentation)."""
    for key in ("timesteps", "noise_draws", "top_k", "batch_size"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"{key} must be >= 1 (got {getattr(cfg, key)})")
    ids = parse_candidates(cfg.candidates, methods.num_classes(base.transformer))
    size = _image_size(cfg, base)
    ds = dataset.DefectDataset(data.train, _data_cfg(cfg, size), augment=False)
    labels = torch.tensor([s.label for s in data.train])
    device = next(base.transformer.parameters()).device
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():  # encode in chunks: the VAE at 256 px is the memory peak, not the DiT
        x0 = torch.cat([base.codec.encode(images[s:s + cfg.batch_size].to(device))
                        for s in range(0, len(images), cfg.batch_size)])
    err = scores(base.transformer, x0, ids, base.scheduler_config, cfg.timesteps, cfg.noise_draws,
                 cfg.seed, cfg.batch_size, cfg.progress)
    per_class = torch.stack([err[:, labels == k].mean(1) for k in range(len(data.classes))])
    order = per_class.argsort(dim=1, stable=True)  # ties: the lower id first
    top = min(cfg.top_k, len(ids))
    anchor = model_mod.anchor_class(base, data.product)
    return {
        "model": base.spec, "product": data.product, "image_size": size, "classes": data.classes,
        "images": {d: int((labels == k).sum()) for k, d in enumerate(data.classes)},
        "timesteps": fixed_timesteps(Objective(base.scheduler_config).num_timesteps, cfg.timesteps).tolist(),
        "noise_draws": cfg.noise_draws, "seed": cfg.seed, "candidates": ids,
        "ranking": {d: [{"id": ids[j], "name": class_name(base, ids[j]), "mse": per_class[k, j].item()}
                        for j in order[k, :top].tolist()] for k, d in enumerate(data.classes)},
        "nearest": [ids[order[k, 0]] for k in range(len(data.classes))],
        # where the write-up's hand-picked class lands: the hypothesis this module tests
        "anchor": None if anchor not in ids else {
            "id": anchor, "name": class_name(base, anchor),
            "rank": {d: (order[k] == ids.index(anchor)).nonzero().item() + 1 for k, d in enumerate(data.classes)}},
        "scores": {d: per_class[k].tolist() for k, d in enumerate(data.classes)},  # aligned with candidates
    }


def _as_rank_config(cfg) -> RankConfig:
    if isinstance(cfg, RankConfig):
        return cfg
    fields = {k: getattr(cfg, k) for k in _FROM_TRAIN if hasattr(cfg, k)}
    if getattr(cfg, "class_init_candidates", ""):  # a TrainConfig's shortlist for nearest/topk
        fields["candidates"] = cfg.class_init_candidates
    return RankConfig(**fields)


def nearest_rows(base: model_mod.Base, data: data_mod.DefectData, cfg) -> list[int]:
    """Best-scoring base class per defect class (``data.classes`` order), for ``set_classes(init=...)``.
    ``cfg`` is a TrainConfig (all base classes are candidates) or a RankConfig."""
    return rank(base, data, _as_rank_config(cfg))["nearest"]


def topk_mean_rows(base: model_mod.Base, data: data_mod.DefectData, cfg, k: int = 5) -> list[list[int]]:
    """The ``k`` best base classes per defect class, best first: rows to average into the new row."""
    result = rank(base, data, dataclasses.replace(_as_rank_config(cfg), top_k=k))
    return [[r["id"] for r in result["ranking"][d]] for d in data.classes]


def _slug(spec: str) -> str:
    name = Path(spec).expanduser().name if Path(spec).expanduser().exists() else spec
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"


def figure(result: dict):
    """Horizontal bars of the top-k per defect class; the anchor class in red."""
    from matplotlib.figure import Figure

    classes, anchor = result["classes"], (result["anchor"] or {}).get("id")
    cols = min(len(classes), 4)
    rows, k = math.ceil(len(classes) / cols), max(len(v) for v in result["ranking"].values())
    with viz.style():
        fig = Figure(figsize=(3.3 * cols, (0.25 * k + 0.8) * rows + 0.4), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, defect in zip(axes.flat, classes):
            top = result["ranking"][defect]
            mse = [r["mse"] for r in top]
            ax.barh(range(len(top)), mse, color=["C3" if r["id"] == anchor else "C0" for r in top])
            ax.set_yticks(range(len(top)), [f"{r['id']} {r['name'].split(',')[0]}".strip() for r in top])
            ax.invert_yaxis()
            # candidates differ by a small fraction of the MSE: start the axis near the best score
            pad = (max(mse) - min(mse)) or 0.01 * min(mse) or 1e-6
            ax.set_xlim(min(mse) - pad, max(mse) + 0.2 * pad)
            ax.set_title(f"{defect} ({result['images'][defect]} images)")
            ax.set_xlabel("denoising MSE (lower = closer)")
        for ax in list(axes.flat)[len(classes):]:
            ax.set_visible(False)
        fig.suptitle(f"{result['product']}: nearest classes of {result['model']}"
                     + (f" (red: the hand-picked {anchor})" if anchor is not None else ""))
    return fig


def run(cfg: RankConfig) -> dict:
    """Load the base and the data, rank, write ``ranking.json`` and ``ranking.png``; returns the result."""
    parse_candidates(cfg.candidates)  # a typo fails before a slow model load
    base = model_mod.load(cfg.model, device="cuda" if torch.cuda.is_available() else "cpu", numerics=cfg.numerics,
                          heads=cfg.model_heads)
    data = data_mod.load(_data_cfg(cfg, _image_size(cfg, base)))
    result = rank(base, data, cfg)
    folder = (Path(cfg.out).expanduser() if cfg.out
              else paths.OUTPUTS / "class_rank" / f"{data.product}-{_slug(cfg.model)}")
    result["config"], result["folder"] = dataclasses.asdict(cfg), str(folder)
    runs.write_json(folder / "ranking.json", result)
    viz.save_figure(figure(result), folder, "ranking", cfg.formats)
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['product']}, model {result['model']}: {len(result['candidates'])} candidate classes, "
             f"{len(result['timesteps'])} timesteps x {result['noise_draws']} noise draw(s); lower MSE = closer",
             f"{'defect':<16} {'images':>6} {'rank':>4}  {'class':<40} {'mse':>9}"]
    for defect, top in result["ranking"].items():
        for i, r in enumerate(top):
            head = f"{defect:<16} {result['images'][defect]:>6}" if i == 0 else " " * 23
            lines.append(f"{head} {i + 1:>4}  {(str(r['id']) + ' ' + r['name'])[:40]:<40} {r['mse']:>9.6f}")
    if result["anchor"]:
        a = result["anchor"]
        lines.append(f"anchor {a['id']} {a['name']}: rank " + ", ".join(f"{r} ({d})" for d, r in a["rank"].items())
                     + f" of {len(result['candidates'])}")
    return "\n".join(lines)


def cli(cfg: RankConfig) -> str:
    result = run(cfg)
    print(format_table(result))
    return str(Path(result["folder"]) / "ranking.json")
