"""The benchmark stage: do a run's generated defects beat copying the training defects, on real
test images the generator never saw?

``run(BenchmarkConfig)`` (CLI ``defectlab benchmark --run RUN --test-data ROOT``):

1. ``gen_seeds`` independent sets of image + mask pairs from the run (``synthesize``, seeds
   0..n-1) and, for each, the copy-paste baseline with the same seed: the training defects' own
   pixels under the same carried masks on the same defect-free images, no model.
2. Downstream classifiers (``judge.SmallCNN``, one budget for every condition) trained on the
   run's real training images alone, + the generated pairs, + the copy-paste pairs; tested on
   every defect image of ``--test-data``. Per view: ``image`` (the whole image at ``view_size``,
   where the defects are visible) and ``window`` (the run's ``image_size`` window around the
   defect, what a zoom run draws). Each generation seed × classifier seed is one paired run: the
   same real images and initial weights in all three conditions. Differences
   (generated − copy-paste, generated − real, copy-paste − real) get a two-stage bootstrap
   interval over generation and classifier seeds (``gain.nested_interval``).
3. Realism: ``realism.two_sample`` of real test defect windows against generated ones and
   against copy-paste ones (0.5 = indistinguishable), and ``realism.nearest`` (memorisation:
   distance of each generated defect to the nearest training defect; copy-paste is the floor).

Writes ``benchmark.json``, ``benchmark.md`` and ``figures/real-generated-cutpaste.png`` into
``<run>/benchmark/<tag>/``. Numbers are on the data given: real images give real numbers, the
embedded procedural dataset gives proxy numbers (labelled as such).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import runs
from ..base.errors import DefectlabError
from ..base.progress import tqdm
from ..data import dataset, sources as data_mod
from ..core import classifier, realism, sampler, viz
from ..core.gain import nested_interval
from ..core.judge import fit, json_fields
from . import synthesize

VIEWS = ("image", "window")
CONDITIONS = ("real", "real+gen", "real+cutpaste")
DIFFERENCES = {"gen - cutpaste": ("real+gen", "real+cutpaste"), "gen - real": ("real+gen", "real"),
               "cutpaste - real": ("real+cutpaste", "real")}


@dataclass
class BenchmarkConfig:
    run: str = "latest"            # the generator: run folder/name/number, or latest
    test_data: str = ""            # root of real test images (MVTec AD / DS-MVTec layout, same product and classes) the run never saw; required
    gen_seeds: int = 3             # independent sets of pairs (seeds 0..n-1), generated and copy-paste alike
    clf_seeds: int = 5             # downstream classifier seeds per set of pairs
    real_per_class: int = 0        # real training images per class each classifier gets (0 = all the run's; k: k drawn per classifier seed)
    per_class: int = 12            # pairs per class in each set
    source: str = "model"          # the generated pairs: model (drawn from noise in the mask) | refine (the pasted defect redrawn from strength: SDEdit) | cutpaste (an ablation: copies, e.g. deformed)
    strength: float = 0.6          # source refine: how far the pasted defect is noised before the run redraws it
    detail: bool = False           # source refine: keep the fine structure the latent codec loses of the pasted defect (the model changes light and colour)
    deform: float = 0.0            # share of generated pairs on deformed (new) mask shapes; copy-paste keeps the training shapes
    scheduler: str = "ddim"        # sampler of the generated pairs: ddpm | ddim | dpmsolver
    steps: int = 20                # denoising steps (0 = the scheduler's default)
    guidance: float = 7.0          # classifier-free guidance scale of the generated pairs
    views: str = "image,window"    # image (the whole image at view_size) and/or window (the defect window the run draws)
    view_size: int = 256           # whole-image view side, px: the defects must be visible at it
    classifier_steps: int = 300    # optimizer steps per downstream classifier (a fixed budget in every condition)
    classifier_batch: int = 16     # downstream classifier batch size
    realism_folds: int = 5         # cross-validation folds of the two-sample realism test (0 = skip it)
    realism_repeats: int = 5       # two-sample draws averaged, each with another subsample of the generated windows and fold split
    checkpoint: str = "best"       # best | latest | step number
    out: str = ""                  # output folder ("" = <run>/benchmark/<sampler>-g<guidance>-<n>x<per_class>)


def _check(cfg: BenchmarkConfig) -> list[str]:
    if not cfg.test_data:
        raise DefectlabError("--test-data is required: a folder of real test images the run never saw")
    views = [v.strip() for v in cfg.views.split(",") if v.strip()]
    if not views or (bad := [v for v in views if v not in VIEWS]):
        raise DefectlabError(f"views: choose from {', '.join(VIEWS)} (got {cfg.views!r})")
    synthesize.check_source(cfg.source, cfg.detail)
    for key in ("gen_seeds", "clf_seeds", "per_class", "classifier_steps", "classifier_batch"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"{key} must be ≥ 1 (got {getattr(cfg, key)})")
    if cfg.real_per_class < 0:
        raise DefectlabError(f"real_per_class must be ≥ 0 (0 = all the run's training images; got {cfg.real_per_class})")
    if cfg.view_size < 16 or cfg.realism_folds < 0 or cfg.realism_folds == 1:
        raise DefectlabError(f"view_size ≥ 16 and realism_folds 0 or ≥ 2 required (got {cfg.view_size}, {cfg.realism_folds})")
    if cfg.realism_repeats < 1:
        raise DefectlabError(f"realism_repeats must be ≥ 1 (got {cfg.realism_repeats})")
    return views


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_set(root: str, dcfg: data_mod.DataConfig, classes: list[str], seen: list[Path]) -> list[data_mod.Sample]:
    """Every defect image of ``root`` (both halves of any split), checked to be the run's classes
    and to share no file content with ``seen`` (the run's data): one line naming what is wrong."""
    test = data_mod.load(dataclasses.replace(dcfg, data=str(Path(root).expanduser()), test_fraction=0.5))
    if set(test.classes) != set(classes):
        raise DefectlabError(f"--test-data {root}: classes {', '.join(test.classes)} are not the run's "
                             f"{', '.join(classes)}")
    samples = [dataclasses.replace(s, label=classes.index(s.defect)) for s in test.train + test.test]
    known = {_digest(p): p for p in seen}
    for s in samples:
        if (same := known.get(_digest(s.image))) is not None:
            raise DefectlabError(f"--test-data {root}: {s.image} is also in the run's data ({same}): "
                                 "test images must be new")
    return samples


def _views(paths: list[tuple[Path, Path | None]], view: str, dcfg: data_mod.DataConfig, size: int) -> torch.Tensor:
    """(image, mask) files → [N,3,S,S]: the whole image at ``size`` or the run's defect window."""
    if view == "image":
        return torch.stack([dataset.load_image(p, size, dcfg.crop) for p, _ in paths])
    full, side = dcfg.image_size * dcfg.zoom, dcfg.image_size
    out = []
    for p, m in paths:
        image, mask = dataset.load_image(p, full, dcfg.crop), dataset.load_mask(m, full, dcfg.crop)
        y, x = dataset.window(mask, side)
        out.append(image[:, y:y + side, x:x + side])
    return torch.stack(out)


def _pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    lines = [json.loads(t) for t in (folder / "manifest.jsonl").read_text().splitlines() if t.strip()]
    return [(r["class"], folder / r["file"], folder / r["mask"]) for r in sorted(lines, key=lambda r: (r["class"], r["index"]))]


def run(cfg: BenchmarkConfig) -> Path:
    """The benchmark (see module doc); returns its output folder."""
    views = _check(cfg)
    folder = runs.resolve(cfg.run)
    saved = runs.load_config(folder)
    cfg = sampler.distilled(cfg, saved)
    classes = runs.read_json(folder / "classes.json")
    dcfg = data_mod.from_settings(saved)
    dd = data_mod.load(dcfg, manifest=folder / "split.json")
    tests = test_set(cfg.test_data, dcfg, classes, [s.image for s in dd.train + dd.test] + list(dd.good))
    how = synthesize.source_tag(cfg.source, cfg.strength, cfg.detail)
    tag = f"{how}{'-' if how else ''}{cfg.scheduler}{cfg.steps}-g{cfg.guidance:g}-{cfg.gen_seeds}x{cfg.per_class}" + \
        (f"-deform{cfg.deform:g}" if cfg.deform else "") + (f"-k{cfg.real_per_class}" if cfg.real_per_class else "")
    out = Path(cfg.out) if cfg.out else folder / "benchmark" / tag
    runs.ensure_dir(out, "--out")
    runs.write_json(out / "benchmark_config.json", {**dataclasses.asdict(cfg), "run": folder.name, "out": str(out)})

    sets = {}  # (source, seed) → [(class, image, mask)]
    for seed in range(cfg.gen_seeds):
        for key, source, deform in (("model", cfg.source, cfg.deform), ("cutpaste", "cutpaste", 0.0)):
            pairs = synthesize.run(synthesize.MaskSampleConfig(
                run=str(folder), mode="inpaint", source=source, strength=cfg.strength,
                detail=cfg.detail and source == "refine", seed=seed, per_class=cfg.per_class, deform=deform,
                scheduler=cfg.scheduler, steps=cfg.steps, guidance=cfg.guidance, checkpoint=cfg.checkpoint,
                out=str(out / "pairs" / f"{key}-s{seed}")))
            sets[key, seed] = _pairs(pairs)

    label = lambda items: torch.tensor([classes.index(c) for c, *_ in items])  # noqa: E731
    real_items = [(s.defect, s.image, s.mask) for s in dd.train]
    test_items = [(s.defect, s.image, s.mask) for s in tests]
    result = {"run": folder.name, "test_data": str(Path(cfg.test_data).expanduser().resolve()),
              "classes": classes, "n_real": len(real_items), "real_per_class": cfg.real_per_class,
              "n_test": len(test_items), "generated": {"source": cfg.source, "deform": cfg.deform,
                                                       **({"strength": cfg.strength, "detail": cfg.detail}
                                                          if cfg.source == "refine" else {})},
              "n_pairs_per_set": cfg.per_class * len(classes), "views": {}}
    grids = {}
    for view in views:
        load = lambda items: _views([(p, m) for _, p, m in items], view, dcfg, cfg.view_size)  # noqa: E731
        real_x, test_x = load(real_items), load(test_items)
        gen_x = {key: load(items) for key, items in sets.items()}
        result["views"][view] = _downstream(cfg, real_x, label(real_items), test_x, label(test_items), gen_x,
                                            {key: label(items) for key, items in sets.items()}, len(classes), view)
        if view == "window":
            grids = {"real": _by_class(test_x, label(test_items), classes),
                     "generated": _by_class(gen_x["model", 0], label(sets["model", 0]), classes),
                     "cut-paste": _by_class(gen_x["cutpaste", 0], label(sets["cutpaste", 0]), classes)}
            if cfg.realism_folds:
                train_windows = _by_class(real_x, label(real_items), classes)
                result["realism"], result["realism_difference"] = _realism(cfg, grids["real"], train_windows, gen_x,
                                                                           sets, classes, label)
    runs.write_json(out / "benchmark.json", result)
    runs.write_text(out / "benchmark.md", report(result))
    if grids:
        fig = viz.stacked_figure(grids, rows=3, title=f"{folder.name}: real test windows, generated (seed 0), "
                                                        "cut-paste (seed 0)")
        viz.save_figure(fig, out / "figures", "real-generated-cutpaste")
    return out


def reports(run: str | Path) -> list[Path]:
    """The benchmark reports of a run (``<run>/benchmark/<tag>/benchmark.md``), oldest first;
    empty when none was made (notebook 04 shows them)."""
    return sorted(Path(run).glob("benchmark/*/benchmark.md"), key=lambda p: p.stat().st_mtime)


def _by_class(x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, torch.Tensor]:
    return {c: x[y == i] for i, c in enumerate(classes) if (y == i).any()}


def _downstream(cfg, real_x, real_y, test_x, test_y, gen_x, gen_y, k: int, view: str) -> dict:
    """Accuracy per condition, generation seed and classifier seed; paired differences with intervals."""
    stem = max(1, test_x.shape[-1] // 64)  # a 256 px view reads 4×4 patches: a 64 px view's cost
    acc = {c: np.zeros((cfg.gen_seeds, cfg.clf_seeds)) for c in CONDITIONS}

    def score(x, y, seed):
        model = fit(x, y, k, cfg.classifier_steps, cfg.classifier_batch, seed=seed, progress=False, stem=stem)
        return float((classifier.predict(model, test_x).argmax(1) == test_y.numpy()).mean())

    total = cfg.clf_seeds * (1 + 2 * cfg.gen_seeds)
    with tqdm(total=total, desc=f"downstream ({view} view)", unit="classifier") as bar:
        for c in range(cfg.clf_seeds):
            pick = real_subset(real_y, cfg.real_per_class, c)  # per classifier seed, the same in every condition
            rx, ry = real_x[pick], real_y[pick]
            acc["real"][:, c] = score(rx, ry, c)  # the same for every set: no pairs in it
            bar.update()
            for g in range(cfg.gen_seeds):
                for cond, source in (("real+gen", "model"), ("real+cutpaste", "cutpaste")):
                    acc[cond][g, c] = score(torch.cat([rx, gen_x[source, g]]), torch.cat([ry, gen_y[source, g]]), c)
                    bar.update()
    return {"size": int(test_x.shape[-1]), "classifier": {"model": "SmallCNN", "stem": stem,
                                                          "steps": cfg.classifier_steps, "batch": cfg.classifier_batch},
            "accuracy": {c: {**json_fields(nested_interval(a)), "runs": a.round(4).tolist()} for c, a in acc.items()},
            "differences": {name: json_fields(nested_interval(acc[a] - acc[b])) for name, (a, b) in DIFFERENCES.items()}}


def real_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` images of each class drawn with ``seed`` (all when 0 or when a class
    has fewer): the real images one downstream classifier trains with."""
    if per_class == 0:
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return torch.cat([order[labels[order] == c][:per_class] for c in labels.unique()])


def _realism(cfg, real_test: dict, train_windows: dict, gen_x: dict, sets: dict, classes, label) -> dict:
    out, tests = {}, {}
    for name, source in (("generated", "model"), ("cut-paste", "cutpaste")):
        x = torch.cat([gen_x[source, g] for g in range(cfg.gen_seeds)])
        y = torch.cat([label(sets[source, g]) for g in range(cfg.gen_seeds)])
        windows = _by_class(x, y, classes)
        tests[name] = test = realism.two_sample(real_test, windows, folds=cfg.realism_folds, repeats=cfg.realism_repeats)
        out[name] = {"two_sample_accuracy": test.accuracy, "low": test.low, "high": test.high, "p_value": test.p_value,
                     "per_class": test.per_class, "n_per_side": test.n, "folds": test.folds, "repeats": test.repeats,
                     "nearest_training_rms": realism.nearest(windows, train_windows)}
    return out, json_fields(realism.difference(tests["generated"], tests["cut-paste"]))


def _subset(result: dict) -> str:
    k = result.get("real_per_class", 0)
    return f" ({k} per class per classifier seed)" if k else ""


def _generated(result: dict) -> str:
    g = result.get("generated", {"source": "model", "deform": 0.0})
    how = {"model": "drawn by the run inside the carried training masks",
           "refine": f"the cut-paste pairs redrawn by the run from strength {g.get('strength', 0):g} (SDEdit)"
                     + (", the copy's fine structure kept (what the latent codec loses added back)" if g.get("detail") else ""),
           "cutpaste": "copies, no model (an ablation)"}[g["source"]]
    return how + (f", {g['deform']:.0%} of the masks deformed into new shapes" if g.get("deform") else ", training mask shapes")


def interval_text(iv: dict, sign: str = "+") -> str:
    """``+0.012 [-0.034, +0.056]``: a difference and its interval, as the reports print it (``–``
    for a bound one seed cannot give)."""
    def num(x):
        return "–" if x is None or x != x else f"{x:{sign}.3f}"
    return f"{num(iv['mean'])} [{num(iv['low'])}, {num(iv['high'])}]"


def realism_text(r: dict) -> str:
    """``0.813 [0.627, 0.905]``: one set's two-sample accuracy and its interval (``–`` where an
    older report has none)."""
    return interval_text({"mean": r["two_sample_accuracy"], "low": r.get("low"), "high": r.get("high")}, sign="")


def report(result: dict) -> str:
    """``benchmark.json`` as Markdown: downstream accuracy per view and condition, the paired
    differences with their intervals, and the realism test."""
    lines = [f"# Benchmark of {result['run']}", "",
             f"Real test images: {result['n_test']} from `{result['test_data']}`; real training images: "
             f"{result['n_real']}{_subset(result)}; pairs per set: {result['n_pairs_per_set']}. Intervals: 95 %, two-stage "
             "bootstrap over generation seeds and classifier seeds.", "", f"Generated pairs: {_generated(result)}.", ""]
    for view, v in result["views"].items():
        acc = v["accuracy"]
        lines += [f"## {view} view ({v['size']} px)", "", "| condition | accuracy |", "|---|---|"]
        lines += [f"| {c} | {interval_text(a, sign='')} |" for c, a in acc.items()]
        lines += ["", "| difference | mean [95 % interval] |", "|---|---|"]
        lines += [f"| {name} | {interval_text(iv)} |" for name, iv in v["differences"].items()] + [""]
    if "realism" in result:
        first = next(iter(result["realism"].values()))
        lines += ["## Realism (defect windows)", "",
                  f"A classifier told real test defect windows from each set's, {first['folds']}-fold cross-validated, "
                  f"{first['n_per_side']} windows a side, averaged over {first.get('repeats', 1)} draws; interval: binomial "
                  "(Wilson) over one draw's held-out predictions; p: one-sided binomial test against 0.5.", "",
                  "| pairs | two-sample accuracy (0.5 = indistinguishable) [95 %] | p | nearest training defect, RMS |",
                  "|---|---|---|---|"]
        for name, r in result["realism"].items():
            near = np.mean(list(r["nearest_training_rms"].values())) if r["nearest_training_rms"] else float("nan")
            shown = realism_text(r)
            p = r.get("p_value")
            p = "–" if p is None else f"{p:.3f}" if p >= 0.001 else "< 0.001"
            lines.append(f"| {name} | {shown} | {p} | {near:.3f} |")
        if "realism_difference" in result:
            lines += ["", "Generated − cut-paste two-sample accuracy: "
                      f"{interval_text(result['realism_difference'])} (Newcombe; conservative, as both face the same real windows)."]
        lines.append("")
    return "\n".join(lines)
