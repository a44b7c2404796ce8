"""Realism without pretrained weights: can a small classifier tell generated defects from real ones?

``two_sample``: a classifier two-sample test (Lopez-Paz & Oquab, "Revisiting classifier two-sample
tests", ICLR 2017). A ``judge.SmallCNN`` is trained to tell real defect windows (label 0) from
generated ones (label 1), the two sets balanced by subsampling the larger one, and scored by
``folds``-fold cross-validation: accuracy 0.5 means the two sets are indistinguishable to it, 1.0
that every generated window gives itself away. Reported overall and per class (the held-out
predictions of the windows of each class). With ``repeats`` > 1 the test is drawn again with
another subsample of the larger side and another fold split, and the accuracies are averaged: a
few real windows against many generated ones then read more of the generated set. The interval is
the binomial (Wilson) 95 % interval of the 2n held-out predictions of one draw, and ``p_value``
the one-sided binomial test against 0.5, the test's null as Lopez-Paz & Oquab state it: with 15
windows a side, ±0.13 is noise, and the interval says so.

``difference``: two such tests compared (e.g. two runs' generated defects against the same real
windows): the difference of their accuracies with Newcombe's hybrid-score interval (method 10 of
Newcombe 1998), which treats them as independent; for two tests on the same real windows it is
conservative.

``nearest``: each generated defect window's distance to the nearest real training window of its
class (root-mean-square pixel difference in [-1, 1] units). A copy of a training defect sits near
the floor; the copy-paste baseline's distances show where that floor is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..base.errors import DefectlabError
from ..base.progress import tqdm
from . import classifier
from .gain import wilson
from .judge import fit


@dataclass(frozen=True)
class TwoSample:
    accuracy: float                 # cross-validated, 0.5 = indistinguishable
    per_class: dict[str, float]     # the same, on each class's windows
    n: int                          # windows per side after balancing
    folds: int
    low: float                      # binomial (Wilson) 95 % interval over the 2n held-out predictions
    high: float
    p_value: float                  # one-sided binomial test of accuracy > 0.5
    repeats: int                    # draws averaged (subsample of the larger side and fold split)


def two_sample(real: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], folds: int = 5,
               steps: int = 200, batch_size: int = 16, width: int = 16, seed: int = 0,
               repeats: int = 1) -> TwoSample:
    """Cross-validated accuracy of a real-vs-generated classifier (see module doc). ``real`` and
    ``generated``: class → windows [n,3,S,S] in [-1, 1]; classes missing on either side are left out."""
    classes = [c for c in real if c in generated and len(real[c]) and len(generated[c])]
    if not classes:
        raise DefectlabError("two-sample test: no class has both real and generated windows")
    if repeats < 1:
        raise DefectlabError(f"two-sample test: repeats must be ≥ 1 (got {repeats})")
    n = sum(min(len(real[c]), len(generated[c])) for c in classes)  # windows a side after balancing
    folds = max(2, min(folds, n))
    with tqdm(total=repeats * folds, desc="two-sample test", unit="fold") as bar:
        draws = [_draw(real, generated, classes, folds, steps, batch_size, width, seed + 1000 * r, bar)
                 for r in range(repeats)]
    accuracy = float(np.mean([d[0] for d in draws]))
    per_class = {c: float(np.mean([d[1][c] for d in draws])) for c in classes}
    hits = round(accuracy * 2 * n)
    test = stats.binomtest(hits, 2 * n, 0.5, alternative="greater")
    return TwoSample(accuracy, per_class, n, folds, *wilson(hits, 2 * n), float(test.pvalue), repeats)


@dataclass(frozen=True)
class Difference:
    mean: float                     # accuracy of the first test − the second's
    low: float                      # Newcombe hybrid-score 95 % interval
    high: float


def difference(a: TwoSample, b: TwoSample) -> Difference:
    """``a.accuracy − b.accuracy`` with Newcombe's interval from the two Wilson intervals (see module doc)."""
    d = a.accuracy - b.accuracy
    return Difference(d, d - math.hypot(a.accuracy - a.low, b.high - b.accuracy),
                      d + math.hypot(a.high - a.accuracy, b.accuracy - b.low))


def _draw(real, generated, classes, folds, steps, batch_size, width, seed, bar) -> tuple[float, dict]:
    """One cross-validated test: accuracy, per class."""
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
    order = rng.permutation(len(x))
    fold_of = np.empty(len(x), dtype=int)
    fold_of[order] = np.arange(len(x)) % folds
    correct = np.zeros(len(x), dtype=bool)
    for f in range(folds):
        train, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        model = fit(x[train], y[train], 2, steps, batch_size, width=width, seed=seed + f, progress=False,
                    desc=f"two-sample fold {f}")
        correct[held] = classifier.predict(model, x[held]).argmax(1) == y[held].numpy()
        bar.update()
    per_class = {name: float(correct[c == i].mean()) for i, name in enumerate(classes)}
    return float(correct.mean()), per_class


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
