"""Realism without pretrained weights: can a small classifier tell generated defects from real ones?

``two_sample``: a classifier two-sample test (Lopez-Paz & Oquab, "Revisiting classifier two-sample
tests", ICLR 2017). A ``judge.SmallCNN`` is trained to tell real defect windows (label 0) from
generated ones (label 1), the two sets balanced by subsampling the larger one, and scored by
``folds``-fold cross-validation: accuracy 0.5 means the two sets are indistinguishable to it, 1.0
that every generated window gives itself away. Reported overall and per class (the held-out
predictions of the windows of each class).

``nearest``: each generated defect window's distance to the nearest real training window of its
class (root-mean-square pixel difference in [-1, 1] units). A copy of a training defect sits near
the floor; the copy-paste baseline's distances show where that floor is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base.errors import DefectlabError
from . import classifier
from .judge import fit


@dataclass(frozen=True)
class TwoSample:
    accuracy: float                 # cross-validated, 0.5 = indistinguishable
    per_class: dict[str, float]     # the same, on each class's windows
    n: int                          # windows per side after balancing
    folds: int


def two_sample(real: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], folds: int = 5,
               steps: int = 200, batch_size: int = 16, width: int = 16, seed: int = 0) -> TwoSample:
    """Cross-validated accuracy of a real-vs-generated classifier (see module doc). ``real`` and
    ``generated``: class → windows [n,3,S,S] in [-1, 1]; classes missing on either side are left out."""
    classes = [c for c in real if c in generated and len(real[c]) and len(generated[c])]
    if not classes:
        raise DefectlabError("two-sample test: no class has both real and generated windows")
    rng = np.random.default_rng(seed)
    xs, ys, cs = [], [], []
    for ci, c in enumerate(classes):  # balanced per class: as many generated as real windows, and vice versa
        n = min(len(real[c]), len(generated[c]))
        for side, x in ((0, real[c]), (1, generated[c])):
            pick = rng.permutation(len(x))[:n]
            xs.append(x[torch.as_tensor(pick)].float())
            ys += [side] * n
            cs += [ci] * n
    x, y, c = torch.cat(xs), torch.tensor(ys), np.array(cs)
    folds = max(2, min(folds, int(np.bincount(y.numpy()).min())))
    order = rng.permutation(len(x))
    fold_of = np.empty(len(x), dtype=int)
    fold_of[order] = np.arange(len(x)) % folds
    correct = np.zeros(len(x), dtype=bool)
    for f in range(folds):
        train, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        model = fit(x[train], y[train], 2, steps, batch_size, width=width, seed=seed + f, progress=False,
                    desc=f"two-sample fold {f}")
        correct[held] = classifier.predict(model, x[held]).argmax(1) == y[held].numpy()
    per_class = {name: float(correct[c == i].mean()) for i, name in enumerate(classes)}
    return TwoSample(float(correct.mean()), per_class, int(len(x) // 2), folds)


def nearest(generated: dict[str, torch.Tensor], training: dict[str, torch.Tensor]) -> dict[str, float]:
    """Class → mean over its generated windows of the RMS distance to the nearest training window
    of the same class (``{}`` entries left out where either side is empty)."""
    out = {}
    for c, g in generated.items():
        t = training.get(c)
        if t is None or not len(t) or not len(g):
            continue
        d = torch.cdist(g.flatten(1).double(), t.flatten(1).double()) / np.sqrt(g[0].numel())
        out[c] = float(d.min(1).values.mean())
    return out
