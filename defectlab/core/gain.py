"""The gain study: do generated images help a classifier? Offline proxy measurements.

``gain_study``: the downstream classifier (``judge.SmallCNN``, one architecture and budget for
every condition) trained on k real images per class with and without generated ones, over seeds;
the mean gain with a 95 % Student-t interval; ``efficiency_figure`` plots accuracy against k.
Real and test images are ``judge.procedural`` splits unless the caller gives the real ones.

All numbers are proxy numbers on procedural images, not results on real MVTec AD defects.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats

from ..base.errors import DefectlabError
from ..base.progress import tqdm
from . import classifier, viz
from .judge import classes_of, fit, json_fields, procedural


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float                 # nan with fewer than 2 values
    high: float
    n: int


def t_interval(values, level: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval: mean ± t_{(1+level)/2, n-1} · s / √n."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return Interval(float(v.mean()) if len(v) else float("nan"), float("nan"), float("nan"), len(v))
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Interval(float(v.mean()), float(v.mean()) - half, float(v.mean()) + half, len(v))


def nested_interval(values, level: float = 0.95, draws: int = 4000, seed: int = 0) -> Interval:
    """Mean and percentile-bootstrap interval of a [G, C] table of paired differences: G
    independent sets of generated images (generation seeds), C classifier seeds each. Each draw
    resamples the G sets, then C seeds within each drawn set (a two-stage bootstrap, Davison &
    Hinkley 1997, §3.8), so the interval covers both sources of variation; ``n`` = G·C."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise DefectlabError(f"nested_interval: need a [sets, seeds] table (got shape {v.shape})")
    g, c = v.shape
    if v.size < 2:
        return Interval(float(v.mean()), float("nan"), float("nan"), v.size)
    rng = np.random.default_rng(seed)
    sets = rng.integers(0, g, (draws, g))
    seeds = rng.integers(0, c, (draws, g, c))
    means = v[sets[..., None], seeds].mean((1, 2))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(v.mean()), float(low), float(high), v.size)


def wilson(hits: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share ``hits / n`` (sound at 0 and n, unlike ± 2 se)."""
    ci = stats.binomtest(hits, n).proportion_ci(0.95, method="wilson")
    return (round(float(ci.low), 4), round(float(ci.high), 4))


@dataclass(frozen=True)
class GainRun:
    k: int
    seed: int
    real: float                # test accuracy trained on k real per class
    real_gen: float            # the same k real + the generated images
    gen: float                 # generated images only (classification accuracy score)


@dataclass
class GainResult:
    product: str
    classes: list[str]
    size: int
    steps: int
    batch_size: int
    test_per_class: int
    real_source: str           # "procedural" or "given"
    n_generated: dict[int, int]  # generated images added at each k
    runs: list[GainRun]

    @property
    def ks(self) -> list[int]:
        return sorted({r.k for r in self.runs})

    def accuracy(self, k: int, condition: str) -> Interval:
        """``condition``: "real", "real_gen" or "gen"; mean over seeds with its 95 % interval."""
        if condition not in ("real", "real_gen", "gen"):
            raise DefectlabError(f"condition: must be real, real_gen or gen (got {condition!r})")
        return t_interval([getattr(r, condition) for r in self.runs if r.k == k])

    def gain(self, k: int) -> Interval:
        """real+gen − real, paired by seed (same real images, same initial weights)."""
        return t_interval([r.real_gen - r.real for r in self.runs if r.k == k])


def _stack(by_class: dict[str, torch.Tensor], classes: list[str], size: int, name: str):
    """class → images as (images, labels) in ``classes`` order, checked against ``size``."""
    if bad := sorted(set(by_class) - set(classes)):
        raise DefectlabError(f"{name}: unknown classes {', '.join(map(str, bad))}; expected some of {', '.join(classes)}")
    for c, x in by_class.items():
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise DefectlabError(f"{name}[{c}]: need [N,3,{size},{size}] images in [-1, 1] (got {tuple(x.shape)})")
    given = [(i, by_class[c]) for i, c in enumerate(classes) if c in by_class]
    return (torch.cat([torch.empty(0, 3, size, size)] + [x.float() for _, x in given]),
            torch.cat([torch.empty(0, dtype=torch.long)] + [torch.full((len(x),), i) for i, x in given]))


def gain_study(product: str, generated: dict, ks: tuple[int, ...] = (5, 13), seeds: int = 5, size: int = 64,
               steps: int = 300, batch_size: int = 16, test_per_class: int = 100, real_pool: int = 40,
               real: dict[str, torch.Tensor] | None = None, width: int = 16, progress: bool = True) -> GainResult:
    """Downstream accuracy on ``procedural(product, "test", test_per_class, size)`` for each k and
    seed, trained on (a) k real images per class, (b) the same + ``generated``, (c) generated only.

    ``generated``: class → images [n,3,size,size] in [-1, 1], added at every k; or k → such a
    dict, when each k has its own generator (fine-tuned on k images). Real images: by default
    each seed draws k per class from ``procedural(product, "real", real_pool, size)``, a split no
    judge, test set or fine-tune sees — note that a generator fine-tuned on the embedded dataset
    then saw *other* real images than the downstream classifier, which flatters the gain. Pass
    ``real`` (class → images, e.g. the fine-tune's own training images) to draw from those.
    Every condition: the same SmallCNN, ``steps``, ``batch_size``, augmentation, and per seed
    the same initial weights and the same k real images, so differences are paired by seed."""
    classes = classes_of(product)
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1 or seeds < 1 or steps < 1 or batch_size < 1 or test_per_class < 1:
        raise DefectlabError(f"ks, seeds, steps, batch_size and test_per_class must be ≥ 1 "
                             f"(got {ks}, {seeds}, {steps}, {batch_size}, {test_per_class})")
    per_k = generated if all(isinstance(k, int) for k in generated) else {k: generated for k in ks}
    if missing := [k for k in ks if k not in per_k]:
        raise DefectlabError(f"generated: no generated images for k = {', '.join(map(str, missing))}")
    gen_sets = {k: _stack(per_k[k], classes, size, f"generated[{k}]" if per_k is generated else "generated")
                for k in ks}
    if empty := [k for k in ks if len(gen_sets[k][0]) == 0]:
        raise DefectlabError(f"generated: no images for k = {', '.join(map(str, empty))}")
    if real is None:
        if real_pool < ks[-1]:
            raise DefectlabError(f"real_pool: {real_pool} per class is fewer than k = {ks[-1]}")
        pool_x, pool_y, _ = procedural(product, "real", real_pool, size, progress=progress)
    else:
        if short := [c for c in classes if len(real.get(c, ())) < ks[-1]]:
            raise DefectlabError(f"real: fewer than k = {ks[-1]} images for {', '.join(short)}")
        pool_x, pool_y = _stack(real, classes, size, "real")
    test_x, test_y, _ = procedural(product, "test", test_per_class, size, progress=progress)

    def accuracy(x: torch.Tensor, y: torch.Tensor, seed: int, desc: str) -> float:
        model = fit(x, y, len(classes), steps, batch_size, width=width, seed=seed, desc=desc, progress=progress)
        return float((classifier.predict(model, test_x).argmax(1) == test_y.numpy()).mean())

    results, gen_only = [], {}  # gen-only accuracy depends on the generated set and seed, not on k
    with tqdm(total=len(ks) * seeds, desc=f"gain study {product}", unit="run", disable=not progress) as bar:
        for seed in range(seeds):
            # per seed one order of each class's pool; a smaller k takes a prefix of a larger one
            order = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(seed))
            for k in ks:
                pick = torch.cat([order[pool_y[order] == c][:k] for c in range(len(classes))])
                (gx, gy), key = gen_sets[k], (id(per_k[k]), seed)
                if key not in gen_only:
                    gen_only[key] = accuracy(gx, gy, seed, f"gen s{seed}")
                results.append(GainRun(k, seed, accuracy(pool_x[pick], pool_y[pick], seed, f"real k={k} s{seed}"),
                                       accuracy(torch.cat([pool_x[pick], gx]), torch.cat([pool_y[pick], gy]), seed,
                                                f"real+gen k={k} s{seed}"), gen_only[key]))
                bar.update()
    return GainResult(product, classes, size, steps, batch_size, test_per_class,
                      "procedural" if real is None else "given", {k: len(gen_sets[k][0]) for k in ks}, results)


def gain_to_json(result: GainResult) -> dict:
    """A ``GainResult`` as plain JSON (metrics.json), with each k's 95 % intervals and the
    classification accuracy score ratio (generated-only ÷ real-only accuracy) spelled out."""
    out = asdict(result)
    out["n_generated"] = {str(k): n for k, n in result.n_generated.items()}
    out["per_k"] = {str(k): {**{c: json_fields(result.accuracy(k, c)) for c in ("real", "real_gen", "gen")},
                             "gain": json_fields(result.gain(k)),
                             "cas_ratio": result.accuracy(k, "gen").mean / max(result.accuracy(k, "real").mean, 1e-9)}
                    for k in result.ks}
    return out


def gain_from_json(saved: dict) -> GainResult:
    names = {f.name for f in dataclasses.fields(GainResult)} - {"runs", "n_generated"}
    fields = {k: v for k, v in saved.items() if k in names}  # per_k and notes are derived / extra
    return GainResult(**fields, n_generated={int(k): n for k, n in saved["n_generated"].items()},
                      runs=[GainRun(**r) for r in saved["runs"]])


def efficiency_figure(result: GainResult) -> Figure:
    """Test accuracy against k: real only vs real + generated (95 % t-intervals over seeds as
    error bars), generated only dashed, chance dotted; the paired gains in the title."""
    ks = result.ks
    with viz.style():
        fig = Figure(figsize=(4.2, 3.2), layout="constrained")
        ax = fig.subplots()
        for cond, label, fmt in (("real", "real only", "o-"), ("real_gen", "real + generated", "s-"),
                                 ("gen", "generated only", "^--")):
            iv = [result.accuracy(k, cond) for k in ks]
            mean = np.array([i.mean for i in iv])
            err = np.array([[i.mean - i.low, i.high - i.mean] for i in iv]).T
            ax.errorbar(ks, mean, yerr=None if np.isnan(err).all() else err, fmt=fmt, capsize=3, label=label)
        ax.axhline(1 / len(result.classes), color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xticks(ks)
        ax.set_xlabel("real images per class (k)")
        ax.set_ylabel(f"test accuracy ({len(result.classes)} × {result.test_per_class} procedural)")
        ax.set_ylim(0, 1.02)
        ax.legend(frameon=False, fontsize=7, loc="lower right")
        gains = ", ".join(f"k={k}: {g.mean:+.3f} [{g.low:+.3f}, {g.high:+.3f}]" for k, g in zip(ks, map(result.gain, ks)))
        ax.set_title(f"{result.product}, {result.size} px, {result.runs[-1].seed + 1} seeds (proxy)\n"
                     f"gain {gains}", fontsize=7)
    return fig
