"""Downstream gain: a defect-type classifier trained on real (and generated) images, tested on
the held-out real test images.

The conditions share everything but the training set: the same split, the same number of
optimizer steps (a fixed budget, not epochs — otherwise the larger real+generated set would
simply get more updates), the same augmentation, the same seeds (so condition pairs start from
the same initial weights and their difference is paired). Images are tensors [N,3,S,S] in
[-1, 1]; labels are class indices.

Model: torchvision ResNet-18. With a local ImageNet checkpoint (``weights``) its standard stem
is kept and the classifier head is replaced. From scratch the stem is adapted to the image
size so that layer1 sees about 16×16 (standard 7×7/2 conv + max-pool at ≥ 64 px; a 3×3/1 conv
+ max-pool from 32 px; a 3×3/1 conv and no pool below 32 px): small defects are not pooled
away at 32 px, and a step costs about the same at 16-64 px (≈ 0.28 CPU-s at batch 8, one core).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from ..base.errors import DefectlabError
from ..base.progress import tqdm
from . import loop

CONDITIONS = ("real", "real+gen", "gen")   # "gen" alone = the classification accuracy score (CAS)
SUMMARY = ("accuracy", "macro_f1", "precision", "recall", "map")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Normalize(torch.nn.Module):
    """[-1, 1] images → ImageNet statistics (what a pretrained stem expects; harmless from scratch)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 2 - 1)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 2)

    def forward(self, x):
        return (x - self.mean) / self.std


def build(num_classes: int, size: int, weights: str = "") -> torch.nn.Module:
    net = torchvision.models.resnet18(num_classes=1000 if weights else num_classes)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DefectlabError(f"classifier weights not found: {path} (--classifier-weights: a torchvision "
                                 "resnet18 ImageNet state_dict, e.g. resnet18-f37072fd.pth)")
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            raise DefectlabError(f"not a torchvision resnet18 state_dict: {path} ({type(err).__name__})") from err
        net.fc = torch.nn.Linear(net.fc.in_features, num_classes)
    elif size < 64:
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if size < 32:
            net.maxpool = torch.nn.Identity()
    return torch.nn.Sequential(_Normalize(), net)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and a ±S/16 px translation (reflect padding) — label-preserving for defect types."""
    n, _, s, _ = x.shape
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    x = torch.where(flip_v.view(-1, 1, 1, 1).to(x.device), x.flip(2), x)
    pad = max(1, s // 16)
    x = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return x[:, :, dy:dy + s, dx:dx + s]


def train(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, batch_size: int = 8,
          lr: float = 2e-3, seed: int = 0, weights: str = "", device: str = "cpu") -> torch.nn.Module:
    """``steps`` AdamW updates on batches drawn uniformly from the training set (cosine decay)."""
    if len(images) == 0:
        raise DefectlabError("downstream classifier: empty training set")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)  # same seed → same initial weights in every condition (paired comparison)
        model = build(num_classes, images.shape[-1], weights).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4, fused=True)  # 5x faster step on a CPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    stepper = loop.Stepper(list(model.named_parameters()), opt, sched, grad_clip=None)
    model.train()
    for i in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        x = augment(images[idx].to(device), gen)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        stepper(loss, f"in the classifier at step {i}")
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).softmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def scores(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1 and mAP (one-vs-rest average precision from softmax
    scores), overall and per class. AP of a class absent from the test labels is None."""
    k = len(classes)
    pred = probs.argmax(1)
    p, r, f1, support = precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
    ap = [float(average_precision_score(labels == c, probs[:, c])) if (labels == c).any() else None
          for c in range(k)]
    present = [c for c in range(k) if support[c] > 0]  # macro over the classes in the test set
    per_class = {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f1[c]), "ap": ap[c],
                        "support": int(support[c])} for c, name in enumerate(classes)}
    return {"accuracy": float((pred == labels).mean()),
            "macro_f1": float(np.mean(f1[present])), "precision": float(np.mean(p[present])),
            "recall": float(np.mean(r[present])), "map": float(np.mean([ap[c] for c in present])),
            "per_class": per_class}


def _mean_std(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None  # sample std over seeds
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def downstream(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], test: tuple[torch.Tensor, torch.Tensor],
               classes: list[str], conditions: tuple[str, ...] = ("real", "real+gen"), seeds: int = 3,
               steps: int = 40, batch_size: int = 8, weights: str = "", device: str = "cpu") -> dict:
    """Train one classifier per (condition, seed) and score it on ``test``.

    ``sets`` holds ``"real"`` and ``"gen"`` as (images, labels); ``"real+gen"`` is their union.
    Returns per condition the per-seed scores and their mean ± std (sample std over seeds), and
    ``diff["<cond> - real"]``: the paired per-seed differences' mean ± std.
    """
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise DefectlabError(f"unknown downstream condition {', '.join(bad) or '(none)'}; use {', '.join(CONDITIONS)}")
    if len(test[0]) == 0:
        raise DefectlabError("downstream classifier: no held-out real test images")
    if seeds < 1 or steps < 1:
        raise DefectlabError(f"seeds and classifier_steps must be ≥ 1 (got {seeds}, {steps})")
    train_sets = dict(sets)
    if "gen" in sets and "real" in sets:
        train_sets["real+gen"] = (torch.cat([sets["real"][0], sets["gen"][0]]), torch.cat([sets["real"][1], sets["gen"][1]]))
    labels = test[1].numpy()
    out: dict = {"conditions": {}, "diff": {}}
    bar = tqdm(total=len(conditions) * seeds, desc="downstream classifiers", unit="run")
    for cond in conditions:
        if cond not in train_sets or len(train_sets[cond][0]) == 0:
            raise DefectlabError(f"downstream condition {cond!r} has no training images (no generated samples?)")
        x, y = train_sets[cond]
        runs_ = []
        for s in range(seeds):  # one classifier per seed: the long step of an evaluation
            bar.set_postfix_str(f"{cond}, seed {s}")
            runs_.append(scores(labels, predict(train(x, y, len(classes), steps, batch_size, seed=s, weights=weights,
                                                      device=device), test[0]), classes))
            bar.update(1)
        out["conditions"][cond] = {
            "n_train": len(x), "seeds": runs_,
            **{m: _mean_std([r[m] for r in runs_]) for m in SUMMARY},
            "per_class": {name: {m: _mean_std([r["per_class"][name][m] for r in runs_])
                                 for m in ("precision", "recall", "f1", "ap")} for name in classes}}
    if "real" in conditions:
        base = out["conditions"]["real"]["seeds"]
        for cond in (c for c in conditions if c != "real"):
            other = out["conditions"][cond]["seeds"]
            out["diff"][f"{cond} - real"] = {m: _mean_std([o[m] - b[m] for o, b in zip(other, base)]) for m in SUMMARY}
    bar.close()
    return out
