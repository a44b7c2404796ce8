"""A judge classifier and the gain study: offline proxy measurements of generated defect images.

* ``procedural``: defect images drawn with synth's own code, in splits that never meet each
  other nor the embedded few-shot dataset: ``"judge"`` (judge training), ``"test"`` (held out from
  every fine-tune and classifier) and ``"real"`` (the study's stand-in few-shot images).
* ``judge_for``: a small CNN trained once per (product, size, seed) on abundant ``"judge"``
  images, shipped under ``assets/judge`` or cached under ``paths.MODELS``; ``judge_score``
  reports the share of images recognised as their class, with a binomial test against chance.
* ``gain_study``: the downstream classifier (one architecture and budget for every condition)
  trained on k real images per class with and without generated ones, over seeds; the mean
  gain with a 95 % Student-t interval; ``efficiency_figure`` plots accuracy against k.

All numbers are proxy numbers on procedural images, not results on real MVTec AD defects.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats  # a dependency of scikit-learn, which the package already requires
from torch import nn

from . import classifier, paths, runs, synth, viz
from .errors import DefectlabError
from .images import from_pil  # the one uint8 → [-1, 1] conversion
from .progress import tqdm

SPLITS = ("judge", "test", "real")
DRAW_SIZE = 256                       # synth's drawing size: images are resized down from it
# Per-image seeds: synth.generate seeds with (seed, product, split, class, i), five 32-bit words
# for seeds < 2**32; ours have six, the second one no product name hashes to: no image coincides.
NAMESPACE = zlib.crc32(b"defectlab.judge.procedural")
SHIPPED = paths.ASSETS / "judge"


def classes_of(product: str) -> list[str]:
    """Defect classes of a procedural product, sorted like ``data.load`` sorts class folders."""
    if product not in synth.PRODUCTS:
        raise DefectlabError(f"product: unknown procedural product {product!r}; available: {', '.join(synth.PRODUCTS)}")
    return sorted(synth.PRODUCTS[product].defects)


def draw(product: str, defect: str, rng: np.random.Generator, size: int) -> torch.Tensor:
    """One defect image as ``synth.generate`` draws it, then resized and scaled to [-1, 1] as
    ``dataset.load_image`` does (PIL bicubic, which widens its kernel when shrinking: antialiased)."""
    clean, parts = synth.product_image(product, rng, DRAW_SIZE)
    return from_pil(Image.fromarray(synth.draw_defect(clean, defect, rng, parts)[0]).resize((size, size), Image.BICUBIC))


def procedural(product: str, split: str, per_class: int, size: int, seed: int = 0,
               progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images [N,3,size,size] in [-1, 1], labels [N], classes)``, ``per_class`` images of each
    defect class; image i of a class comes from its own generator (seed, split, class, i), so
    the result is bit-identical for the same arguments and a larger ``per_class`` extends it."""
    classes = classes_of(product)
    if split not in SPLITS:
        raise DefectlabError(f"split: must be one of {', '.join(SPLITS)} (got {split!r})")
    if per_class < 1 or size < 16 or seed < 0:
        raise DefectlabError(f"per_class ≥ 1, size ≥ 16 and seed ≥ 0 required (got {per_class}, {size}, {seed})")
    keys = [(c, i) for c in range(len(classes)) for i in range(per_class)]
    images = [draw(product, classes[c], np.random.default_rng(
        [seed, NAMESPACE, *(zlib.crc32(s.encode()) for s in (product, split, classes[c])), i]), size)
        for c, i in tqdm(keys, desc=f"drawing {product}/{split}", unit="img", disable=not progress)]
    return torch.stack(images), torch.tensor([c for c, _ in keys]), classes


# ----------------------------------------------------------------------------- classifier
class SmallCNN(nn.Sequential):
    """4 × (3×3 conv, batch norm, ReLU, 2×2 max-pool), widths w-2w-4w-4w, global average pool,
    linear. ≈ 60k parameters at w = 16: a step of batch 32 at 64 px costs ≈ 0.1 CPU-s."""

    def __init__(self, num_classes: int, width: int = 16):
        widths, layers = (3, width, 2 * width, 4 * width, 4 * width), []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def fit(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, batch_size: int,
        lr: float = 3e-3, width: int = 16, seed: int = 0, desc: str = "training", progress: bool = True) -> SmallCNN:
    """``steps`` AdamW updates on uniformly drawn batches with the downstream classifier's
    augmentation (flips, small shifts) and cosine decay; a budget in steps, not epochs, so a
    larger training set gets no more updates than a smaller one."""
    if len(images) == 0:
        raise DefectlabError(f"{desc}: empty training set")
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
        torch.manual_seed(seed)  # same seed → same initial weights in every condition (paired)
        model = SmallCNN(num_classes, width)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        loss = F.cross_entropy(model(classifier.augment(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------- judge
@dataclass(frozen=True)
class JudgeRecipe:
    per_class: int = 400       # procedural "judge" images per class
    steps: int = 600           # optimizer steps
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16            # SmallCNN base width


@dataclass
class Judge:
    model: SmallCNN
    product: str
    classes: list[str]
    size: int
    seed: int
    recipe: JudgeRecipe
    source: str                # "shipped", "cache" or "trained": where this call got the weights


def judge_dir(product: str, size: int, seed: int = 0, base: Path | None = None) -> Path:
    return Path(base or paths.MODELS) / f"judge-{product}-{size}px-s{seed}"


def _load(folder: Path, want: dict) -> SmallCNN | None:
    """The judge in ``folder`` if its recipe json says it was built as ``want``, else None
    (absent, unreadable, or built with another recipe or generator version: rebuild it)."""
    model = SmallCNN(len(want["classes"]), want["recipe"]["width"])
    try:
        if runs.read_json(folder / "judge.json") != want:
            return None
        model.load_state_dict(runs.load_tensors(folder / "judge.safetensors"))
    except DefectlabError:
        return None
    return model.eval()


def judge_for(product: str, size: int, seed: int = 0, recipe: JudgeRecipe = JudgeRecipe(),
              progress: bool = True) -> Judge:
    """The judge for ``product`` at ``size`` px: shipped weights, else the cache
    (``judge_dir``), else trained from ``procedural(product, "judge", …)`` and saved there."""
    classes = classes_of(product)
    want = {"format": "defectlab-judge/1", "generator_version": synth.GENERATOR_VERSION, "product": product,
            "classes": classes, "size": size, "seed": seed, "recipe": asdict(recipe)}
    if (model := _load(judge_dir(product, size, seed, SHIPPED), want)) is not None:
        return Judge(model, product, classes, size, seed, recipe, "shipped")
    final = judge_dir(product, size, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    # processes started together train once: the others wait, then load what the first saved
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if (model := _load(final, want)) is not None:
            return Judge(model, product, classes, size, seed, recipe, "cache")
        (final / "judge.json").unlink(missing_ok=True)  # stale weights are overwritten next: unmark them first
        images, labels, _ = procedural(product, "judge", recipe.per_class, size, seed, progress)
        model = fit(images, labels, len(classes), recipe.steps, recipe.batch_size, recipe.lr, recipe.width,
                    seed, f"judge {product} {size}px", progress)
        runs.save_tensors(final / "judge.safetensors", model.state_dict())
        runs.write_json(final / "judge.json", want)  # written last: it marks the weights complete
    return Judge(model, product, classes, size, seed, recipe, "trained")


@dataclass(frozen=True)
class ClassScore:
    name: str
    n: int                     # images labelled with this class
    correct: int               # of those, recognised as this class
    share: float               # correct / n (nan when n = 0)
    p_value: float             # one-sided binomial P(X ≥ correct | chance 1/K)


def _score(name: str, n: int, correct: int, chance: float) -> ClassScore:
    nan = float("nan")
    return ClassScore(name, n, correct, correct / n if n else nan,
                      float(stats.binom.sf(correct - 1, n, chance)) if n else nan)


@dataclass(frozen=True)
class JudgeScore:
    per_class: list[ClassScore]
    overall: ClassScore        # all images together
    chance: float              # 1/K
    confusion: list[list[int]]  # [true][predicted] counts

    def __str__(self) -> str:
        return "\n".join(f"{c.name:>18}  {c.correct:4d}/{c.n:<4d} {c.share:6.1%}  p={c.p_value:.2g}"
                         for c in (*self.per_class, self.overall)) + f"  (chance {self.chance:.0%})"


def judge_score(judge: Judge | nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> JudgeScore:
    """Share of ``images`` (generated or procedural) the judge recognises as their label, per
    class and overall; ``labels`` index ``classes``, the judge's own class order."""
    k = len(classes)
    if isinstance(judge, Judge) and list(classes) != judge.classes:
        raise DefectlabError(f"classes: {list(classes)} differ from the judge's {judge.classes}")
    if images.ndim != 4 or len(images) != len(labels) or images.shape[-1] != getattr(judge, "size", images.shape[-1]):
        raise DefectlabError(f"images: need [N,3,S,S] at the judge's size, one label each "
                             f"(got {tuple(images.shape)}, {len(labels)} labels)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise DefectlabError(f"labels: must be class indices 0..{k - 1}")
    pred = classifier.predict(judge.model if isinstance(judge, Judge) else judge, images).argmax(1)
    true = np.asarray(labels, dtype=np.int64)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true, pred), 1)
    per = [_score(name, int(confusion[c].sum()), int(confusion[c, c]), 1 / k) for c, name in enumerate(classes)]
    return JudgeScore(per, _score("all", len(true), int(np.trace(confusion)), 1 / k), 1 / k, confusion.tolist())


# ----------------------------------------------------------------------------- gain study
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


def json_fields(obj) -> dict:
    """A dataclass's fields for metrics.json, NaN (e.g. a share of 0 images) as null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in asdict(obj).items()}


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
