"""Is the product in a free sample? A check without pretrained weights.

A sample shows the product when its foreground (``dataset.foreground``: what differs from the
border's colour, the product on MVTec's plain background) has the shape of a real product's: the
best overlap (IoU) of the two foregrounds over every rotation (``step`` degrees, mirrored or not),
centroids aligned, against any of the real reference images. The pass mark is the real images'
own: each reference is scored against the *other* references and the threshold is the
``quantile`` of those scores, so by construction about ``1 − quantile`` of real products pass and
the generated share is read against that. A colour blob, an empty background or a product of the
wrong size or shape overlaps no real foreground that well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..base.errors import DefectlabError
from ..data import dataset
from .gain import wilson
from .masks import centroid, rotations, warp_poses


@dataclass(frozen=True)
class Presence:
    threshold: float              # best-pose foreground IoU a sample needs (the references' own quantile)
    real: float                   # share of the references that pass (each against the others)
    per_class: dict[str, float]   # share of each class's samples that pass
    iou: dict[str, float]         # mean best IoU per class
    n_refs: int
    quantile: float
    interval: dict[str, tuple[float, float]]  # 95 % Wilson score interval of each class's share
    n: dict[str, int]             # samples per class
    iou_interval: dict[str, tuple[float, float]]  # mean best IoU ± 1.96 standard errors


def poses(images: torch.Tensor, step: float = 6.0) -> torch.Tensor:
    """[N,3,S,S] → bool [N,A,S*S]: each image's foreground with its centroid moved to the image
    centre, turned every ``step`` degrees, mirrored or not (A = 2 × 360 / step; ``step`` 0: the
    pose as it is, A = 1). An empty foreground stays empty."""
    s = images.shape[-1]
    angles, flips = rotations(step) if step > 0 else (torch.zeros(1), torch.ones(1))
    out = torch.zeros(len(images), len(angles), s * s, dtype=torch.bool)
    for i, img in enumerate(images):
        f = dataset.foreground(img)
        if f.any():
            moved = warp_poses(f.float()[None, None], centroid(f), (s / 2, s / 2), angles, flips, "bilinear")
            out[i] = (moved[:, 0] > 0.5).flatten(1)
    return out


def best_iou(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Each query's best IoU over its poses and the references: ``queries`` bool [Q,A,P]
    (``poses``), ``refs`` bool [R,P] (poses with step 0, squeezed). ``exclude_self``: query i
    is reference i and is not compared with itself."""
    q, r = queries.float(), refs.float()
    inter = torch.einsum("qap,rp->qar", q, r)
    union = q.sum(-1, keepdim=True) + r.sum(-1)[None, None] - inter
    iou = inter / union.clamp(min=1)
    if exclude_self:
        iou[torch.arange(len(q)), :, torch.arange(len(q))] = -1
    return iou.amax(dim=(1, 2))


def product_presence(real: torch.Tensor, generated: dict[str, torch.Tensor], quantile: float = 0.05,
                     step: float = 6.0, max_refs: int = 64, seed: int = 0) -> Presence:
    """The share of each class's ``generated`` images ([n,3,S,S] in [-1, 1]) that show the product,
    against ``real`` ([N,3,S,S], at least 3 images; at most ``max_refs`` drawn with ``seed``) —
    see the module doc."""
    if not 0 < quantile < 1:
        raise DefectlabError(f"presence quantile must be in (0, 1) (got {quantile})")
    if len(real) < 3:
        raise DefectlabError(f"product presence needs at least 3 real reference images (got {len(real)})")
    if any(x.shape[-2:] != real.shape[-2:] for x in generated.values() if len(x)):
        raise DefectlabError("product presence: generated and real images must have the same size")
    pick = np.random.default_rng(seed).permutation(len(real))[:max_refs]
    real = real[torch.as_tensor(np.sort(pick))]
    refs = poses(real, 0)[:, 0]
    own = best_iou(poses(real, step), refs, exclude_self=True)
    threshold = float(torch.quantile(own, quantile))
    per_class, iou, interval, n, spread = {}, {}, {}, {}, {}
    for c, x in generated.items():
        if not len(x):
            continue
        scores = best_iou(poses(x, step), refs)
        hits = int((scores >= threshold).sum())
        per_class[c], iou[c], n[c] = hits / len(x), float(scores.mean()), len(x)
        interval[c] = wilson(hits, len(x))
        se = float(scores.std()) / math.sqrt(len(x)) if len(x) > 1 else math.nan
        spread[c] = (round(iou[c] - 1.96 * se, 4), round(iou[c] + 1.96 * se, 4))
    return Presence(threshold=round(threshold, 4), real=float((own >= threshold).float().mean()),
                    per_class=per_class, iou=iou, n_refs=len(real), quantile=quantile, interval=interval, n=n,
                    iou_interval=spread)


def overall(p: Presence) -> float:
    """The share over all classes, each class weighted equally (nan without samples)."""
    return float(np.mean(list(p.per_class.values()))) if p.per_class else math.nan


def section(saved: dict) -> list[str]:
    """Markdown lines of an evaluation's ``presence`` entry (``evaluate``'s metrics.json)."""
    out = ["", f"### Product in the free samples (foreground of a real product's shape: best-pose IoU ≥ "
           f"{saved['threshold']:.2f}, what {saved['real']:.0%} of the {saved['n_refs']} real training images reach "
           "against each other)", "", "| class | samples showing the product [95 % interval] | mean best IoU [95 %] |",
           "|---|---|---|"]
    out += [f"| {c} | {share:.0%} of {saved['n'][c]} [{saved['interval'][c][0]:.0%}, {saved['interval'][c][1]:.0%}] "
            f"| {saved['iou'][c]:.2f} [{saved['iou_interval'][c][0]:.2f}, {saved['iou_interval'][c][1]:.2f}] |"
            for c, share in saved["per_class"].items()]
    return out + [f"| overall (classes equally) | {saved['overall']:.0%} | |"]
