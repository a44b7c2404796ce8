"""A judge classifier: an offline proxy measurement of generated defect images.

* ``procedural``: defect images drawn with synth's own code, in splits that never meet each
  other nor the embedded few-shot dataset: ``"judge"`` (judge training), ``"test"`` (held out from
  every fine-tune and classifier) and ``"real"`` (the gain study's stand-in few-shot images).
* ``judge_for``: a small CNN trained once per (product, size, seed) on abundant ``"judge"``
  images with ``degrade`` (blur, colour casts, noise), shipped under ``assets/judge`` or cached
  under ``paths.MODELS``; ``judge_score`` reports the share of images recognised as their class,
  with a binomial test against chance; ``robustness`` checks a judge under fixed ``SHIFTS``.
* ``gain.py`` holds the gain study, which trains the same ``SmallCNN`` with ``fit``.

All numbers are proxy numbers on procedural images, not results on real MVTec AD defects.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image
from scipy import stats  # a dependency of scikit-learn, which the package already requires
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..base.images import from_pil  # the one uint8 → [-1, 1] conversion
from ..base.progress import tqdm
from ..data import synth
from . import classifier, loop

SPLITS = ("judge", "test", "real")
DRAW_SIZE = 256                       # synth's drawing size: images are resized down from it
# Per-image seeds: synth.generate seeds with (seed, product, split, class, i), five 32-bit words
# for seeds < 2**32; ours have six, the second one no product name hashes to: no image coincides.
NAMESPACE = zlib.crc32(b"defectlab.judge.procedural")
SHIPPED = paths.ASSETS / "judge"
GOOD = "good"                         # the judge's extra output: no defect shown (not recognised)
                                      # (judge.json format 2: GOOD images include EMPTY ones)
EMPTY = 0.25                          # share of GOOD images that are the empty background


def classes_of(product: str) -> list[str]:
    """Defect classes of a procedural product, sorted like ``data.load`` sorts class folders."""
    if product not in synth.PRODUCTS:
        raise DefectlabError(f"product: unknown procedural product {product!r}; available: {', '.join(synth.PRODUCTS)}")
    return sorted(synth.PRODUCTS[product].defects)


def draw(product: str, defect: str, rng: np.random.Generator, size: int, version: int | None = None) -> torch.Tensor:
    """One defect image as ``synth.generate`` draws it, then resized and scaled to [-1, 1] as
    ``dataset.load_image`` does (PIL bicubic, which widens its kernel when shrinking: antialiased).
    ``defect`` = ``GOOD``: an image that shows no defect, the product without one or, with
    probability ``EMPTY``, its empty background (a sample without the product shows none either).
    ``version``: synth's drawing version (``None``: ``synth.GENERATOR_VERSION``)."""
    img, parts = synth.product_image(product, rng, DRAW_SIZE, version)
    if defect != GOOD:
        img = synth.draw_defect(img, defect, rng, parts, version)[0]
    elif rng.random() < EMPTY:
        img = np.where(parts[..., None] > 0, np.median(img[parts == 0], axis=0), img).astype(np.uint8)
    return from_pil(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def procedural(product: str, split: str, per_class: int, size: int, seed: int = 0,
               progress: bool = True, good: bool = False,
               version: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images [N,3,size,size] in [-1, 1], labels [N], classes)``, ``per_class`` images of each
    defect class (and, with ``good``, of defect-free products, labelled ``GOOD`` last); image i of
    a class comes from its own generator (seed, split, class, i), so the result is bit-identical
    for the same arguments and a larger ``per_class`` extends it. ``version``: synth's drawing
    version (``None``: ``synth.GENERATOR_VERSION``, the one ``judge_for`` records); the seeds are
    the same in every version."""
    classes = classes_of(product) + [GOOD] * good
    version = synth.version_of(version)
    if split not in SPLITS:
        raise DefectlabError(f"split: must be one of {', '.join(SPLITS)} (got {split!r})")
    if per_class < 1 or size < 16 or seed < 0:
        raise DefectlabError(f"per_class ≥ 1, size ≥ 16 and seed ≥ 0 required (got {per_class}, {size}, {seed})")
    keys = [(c, i) for c in range(len(classes)) for i in range(per_class)]
    images = [draw(product, classes[c], np.random.default_rng(
        [seed, NAMESPACE, *(zlib.crc32(s.encode()) for s in (product, split, classes[c])), i]), size, version)
        for c, i in tqdm(keys, desc=f"drawing {product}/{split}", unit="img", disable=not progress)]
    return torch.stack(images), torch.tensor([c for c, _ in keys]), classes


# ----------------------------------------------------------------------------- classifier
class SmallCNN(nn.Sequential):
    """4 × (3×3 conv, batch norm, ReLU, 2×2 max-pool), widths w-2w-4w-4w, global average pool,
    linear. ≈ 60k parameters at w = 16: a step of batch 32 at 64 px costs ≈ 0.1 CPU-s. ``stem`` > 1
    first reads non-overlapping stem × stem patches (a strided conv, then batch norm and ReLU): a
    256 px image costs about what a 64 px one does at stem 4, and no pixel is averaged away unseen."""

    def __init__(self, num_classes: int, width: int = 16, stem: int = 1):
        widths, layers = (3 if stem == 1 else width, width, 2 * width, 4 * width, 4 * width), []
        if stem > 1:
            layers += [nn.Conv2d(3, width, stem, stride=stem, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation ``sigma`` px (torchvision's kernel, ±3σ wide)."""
    if sigma <= 0:
        return x
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def recolour(x: torch.Tensor, gain, offset) -> torch.Tensor:
    """Per-channel gain and offset in [0, 1] units, clamped: a colour cast, brighter or darker."""
    u = (x + 1) / 2 * torch.as_tensor(gain, dtype=x.dtype).view(-1, 3, 1, 1) + torch.as_tensor(
        offset, dtype=x.dtype).view(-1, 3, 1, 1)
    return u.clamp(0, 1) * 2 - 1


def degrade(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """The shifts a generator's samples show and synth's crisp drawings lack, drawn per image,
    each with probability ½: blur (σ up to S/40 px), a colour cast (gain 1 ± 0.2, offset ± 0.1 per
    channel) and pixel noise (σ up to 0.1). ``strength`` scales the ranges; 0 returns ``x``.
    The judge trains with it (``JudgeRecipe.degrade``) so that it reads the defect, not the
    rendering: a judge that only knows crisp images calls a slightly blurred crack anything."""
    if strength <= 0:
        return x
    n, s = len(x), x.shape[-1]
    u = torch.rand(n, 9, generator=gen)
    on = torch.rand(n, 3, generator=gen) < 0.5
    sigma = u[:, 0] * strength * s / 40 * on[:, 0]
    x = torch.stack([blur(xi[None], float(si))[0] for xi, si in zip(x, sigma)])
    gain = 1 + (u[:, 1:4] * 2 - 1) * 0.2 * strength * on[:, 1:2]
    offset = (u[:, 4:7] * 2 - 1) * 0.1 * strength * on[:, 1:2]
    x = recolour(x, gain, offset)
    noise = u[:, 7] * 0.1 * strength * on[:, 2]
    return (x + noise.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def fit(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, batch_size: int,
        lr: float = 3e-3, width: int = 16, seed: int = 0, desc: str = "training", progress: bool = True,
        degrade_strength: float = 0.0, stem: int = 1) -> SmallCNN:
    """``steps`` AdamW updates on uniformly drawn batches with the downstream classifier's
    augmentation (flips, small shifts; plus ``degrade`` at ``degrade_strength`` > 0, the judge's)
    and cosine decay; a budget in steps, not epochs, so a larger training set gets no more
    updates than a smaller one."""
    if len(images) == 0:
        raise DefectlabError(f"{desc}: empty training set")
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
        torch.manual_seed(seed)  # same seed → same initial weights in every condition (paired)
        model = SmallCNN(num_classes, width, stem)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    stepper = loop.Stepper(list(model.named_parameters()), opt, sched, grad_clip=None)
    model.train()
    for i in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        x = degrade(classifier.augment(images[idx], gen), gen, degrade_strength)  # strength 0: x, no draws
        loss = F.cross_entropy(model(x), labels[idx])
        stepper(loss, f"in the classifier at step {i}")
    return model.eval()


# ----------------------------------------------------------------------------- judge
@dataclass(frozen=True)
class JudgeRecipe:
    per_class: int = 400       # procedural "judge" images per class
    steps: int = 1500          # optimizer steps (600 before the GOOD output, 2026-11-30)
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16            # SmallCNN base width
    degrade: float = 1.0       # strength of ``degrade`` in training (0: crisp images only, as before 2026-11-30)
    good: bool = True          # a ``GOOD`` output trained on defect-free products (False: defect classes only,
                               # as before 2026-11-30, which filed a sample with no mark under some defect)


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
    model = SmallCNN(len(want["classes"]) + want["recipe"]["good"], want["recipe"]["width"])
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
    want = {"format": "defectlab-judge/2", "generator_version": synth.GENERATOR_VERSION, "product": product,
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
        images, labels, _ = procedural(product, "judge", recipe.per_class, size, seed, progress, recipe.good)
        model = fit(images, labels, len(classes) + recipe.good, recipe.steps, recipe.batch_size, recipe.lr, recipe.width,
                    seed, f"judge {product} {size}px", progress, recipe.degrade)
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
    good: int = 0              # of those, judged defect-free (``GOOD``): not recognised


def _score(name: str, n: int, correct: int, chance: float, good: int = 0) -> ClassScore:
    nan = float("nan")
    return ClassScore(name, n, correct, correct / n if n else nan,
                      float(stats.binom.sf(correct - 1, n, chance)) if n else nan, good)


@dataclass(frozen=True)
class JudgeScore:
    per_class: list[ClassScore]
    overall: ClassScore        # all images together
    chance: float              # 1/K (K defect classes; a ``GOOD`` answer only lowers the score)
    confusion: list[list[int]]  # [true][predicted] counts; a last column for ``GOOD`` if the judge has one

    def __str__(self) -> str:
        return "\n".join(f"{c.name:>18}  {c.correct:4d}/{c.n:<4d} {c.share:6.1%}  p={c.p_value:.2g}  good {c.good}"
                         for c in (*self.per_class, self.overall)) + f"  (chance {self.chance:.0%})"


def judge_score(judge: Judge | nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> JudgeScore:
    """Share of ``images`` (generated or procedural) the judge recognises as their label, per
    class and overall; ``labels`` index ``classes``, the judge's own class order. An image the
    judge calls ``GOOD`` (its last output, when it has K + 1) is not recognised, and counted."""
    k = len(classes)
    if isinstance(judge, Judge) and list(classes) != judge.classes:
        raise DefectlabError(f"classes: {list(classes)} differ from the judge's {judge.classes}")
    if images.ndim != 4 or len(images) != len(labels) or images.shape[-1] != getattr(judge, "size", images.shape[-1]):
        raise DefectlabError(f"images: need [N,3,S,S] at the judge's size, one label each "
                             f"(got {tuple(images.shape)}, {len(labels)} labels)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise DefectlabError(f"labels: must be class indices 0..{k - 1}")
    probs = classifier.predict(judge.model if isinstance(judge, Judge) else judge, images)
    if probs.shape[1] not in (k, k + 1):
        raise DefectlabError(f"judge: {probs.shape[1]} outputs for {k} classes (need {k}, or {k + 1} with {GOOD!r})")
    true, pred = np.asarray(labels, dtype=np.int64), probs.argmax(1)
    confusion = np.zeros((k, probs.shape[1]), np.int64)
    np.add.at(confusion, (true, pred), 1)
    good = confusion[:, k] if probs.shape[1] > k else np.zeros(k, np.int64)
    per = [_score(name, int(confusion[c].sum()), int(confusion[c, c]), 1 / k, int(good[c]))
           for c, name in enumerate(classes)]
    overall = _score("all", len(true), int(np.trace(confusion[:, :k])), 1 / k, int(good.sum()))
    return JudgeScore(per, overall, 1 / k, confusion.tolist())


SHIFTS = ("clean", "blur S/64", "blur S/32", "colour cast", "noise 0.1")


def shifted(x: torch.Tensor, shift: str) -> torch.Tensor:
    """``x`` under one fixed named shift of ``SHIFTS`` (S: image size in px)."""
    s = x.shape[-1]
    match shift:
        case "clean":
            return x
        case "blur S/64" | "blur S/32":
            return blur(x, s / int(shift[-2:]))
        case "colour cast":
            return recolour(x, (1.15, 0.9, 0.85), (0.05, 0.0, -0.05))
        case "noise 0.1":
            return (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    raise DefectlabError(f"shift: must be one of {', '.join(SHIFTS)} (got {shift!r})")


def robustness(j: Judge, per_class: int = 50, progress: bool = False) -> dict[str, float]:
    """Share of the procedural ``"test"`` split the judge recognises under each of ``SHIFTS``:
    how far a judge's score can be trusted on samples that are not crisp drawings; and, under
    ``GOOD``, the share of as many defect-free test products it calls defect-free (clean)."""
    x, y, _ = procedural(j.product, "test", per_class, j.size, progress=progress, good=j.recipe.good)
    k = len(j.classes)
    out = {shift: judge_score(j, shifted(x[y < k], shift), y[y < k], j.classes).overall.share for shift in SHIFTS}
    if j.recipe.good:
        out[GOOD] = float((classifier.predict(j.model, x[y == k]).argmax(1) == k).mean())
    return out


def json_fields(obj) -> dict:
    """A dataclass's fields for metrics.json, NaN (e.g. a share of 0 images) as null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in asdict(obj).items()}
