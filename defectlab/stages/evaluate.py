"""Evaluate a run's generated images: FID / KID / IS against the held-out real test images,
diversity, and the downstream gain of a defect-type classifier (``classifier.py``).

The reference is always the run's *test* split, rebuilt from its ``config.json`` and
``split.json``: images used for fine-tuning are never the reference. The numbers come from
``metrics.py`` (torch-fidelity) and ``classifier.py``; ``run(cfg)`` returns them as an
``EvalResult`` and writes it to ``<run>/metrics.json``. The report (``metrics.md``,
``metrics.csv``, figures) is ``report.py``'s: ``defectlab evaluate`` and notebook 04 write both.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base import runs
from ..base.errors import DefectlabError
from ..data import dataset, product, sources, synth
from ..core import classifier, gain, judge, masks, metrics, presence

METRICS = ("downstream", "judge", "gain", "presence", *metrics.FIDELITY)


@dataclass
class EvalConfig:
    run: str = "latest"            # run folder, name or number; latest means the newest run
    samples: str = ""              # generated images (<samples>/<product>/test/<class>/*.png); "" means the newest under <run>/samples/ (a --zoom run: under <run>/synthesized/); synthesized means the newest synthesize output
    metrics: str = "downstream,judge,fid,kid,is"  # any of downstream, judge, gain, presence, fid, kid, is (default list: unavailable ones are skipped)
    feature_weights: str = ""      # InceptionV3 weights file (torch-fidelity format); "" means the torch hub cache or a download
    feature_weights_note: str = ""  # label stored with the numbers, e.g. "random weights — numbers meaningless"
    kid_subset_size: int = 0       # KID subset size (0 = min(n_real, n_gen, 1000); capped at that)
    bootstrap: int = 0             # bootstrap resamples for FID/KID intervals (2.5-97.5 percentiles; 0 means none)
    seeds: int = 3                 # downstream classifier seeds (mean ± std over them)
    conditions: str = "real,real+gen"  # downstream training sets: real, real+gen, gen (gen: classification accuracy score)
    classifier_steps: int = 40     # optimizer steps per classifier, the same for every condition (~12 CPU-s at 64 px)
    classifier_batch: int = 8      # classifier batch size
    classifier_size: int = 64      # classifier input side (px)
    classifier_weights: str = ""   # local torchvision resnet18 ImageNet weights ("" means from scratch)
    device: str = "auto"           # auto | cpu | cuda
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    formats: str = "png"           # figure formats (png, pdf, svg)
    gain_ks: str = "5,13"          # gain study (embedded dataset only): real images per class k the classifier trains with
    gain_seeds: int = 5            # gain study: seeds per k (95 % t-interval of the paired gain)
    gain_steps: int = 300          # gain study: optimizer steps of each small classifier, the same for every condition
    gain_test_per_class: int = 100  # gain study: procedural test images per class, never trained on


@dataclass
class EvalResult:
    """What ``run`` measured, section by section; a section not measured is None (and absent
    from metrics.json). ``to_json`` is the metrics.json format; ``load`` reads one back."""
    run: str                       # the run folder
    samples: str                   # the sampler output folder evaluated
    product: str
    classes: list[str]
    image_size: int                # px, the run's training size: what FID/KID/IS and diversity see
    config: EvalConfig
    images: dict[str, dict[str, int]]  # train / test / generated → class → number of images
    skipped: dict[str, str] = field(default_factory=dict)  # metric → why it was not computed
    warnings: list[str] = field(default_factory=list)
    sample_config: dict | None = None      # the samples' sample_config.json (checkpoint, sampler settings)
    feature_extractor: dict | None = None  # metrics.describe_weights: which Inception weights, what they are worth
    distribution: dict | None = None       # metrics.per_class: {"per_class": {class: FID/KID/IS}, "pooled": …}
    diversity: dict = field(default_factory=dict)  # {"per_class": {class: metrics.diversity}, "ic_lpips_reason"}
    downstream: dict | None = None         # classifier.downstream + "setup" (model, steps, seeds, n_test, seconds)
    masks: dict | None = None              # masks.summarize, for image + mask pairs
    judge: dict | None = None              # offline proxy: share of samples a procedural-image judge assigns their class
    gain: dict | None = None               # offline proxy: gain.gain_to_json — accuracy vs k, real vs real + generated
    presence: dict | None = None           # presence.product_presence: share of free samples that show the product
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return {**out, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_json(cls, saved: dict) -> EvalResult:
        names = {f.name for f in dataclasses.fields(EvalConfig)}
        config = EvalConfig(**{k: v for k, v in saved.get("config", {}).items() if k in names})
        return cls(**{**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved}, "config": config})

    @classmethod
    def load(cls, folder: str | Path) -> EvalResult:
        """``<folder>/metrics.json`` (a run folder, or the file itself)."""
        path = Path(folder)
        path = path if path.suffix == ".json" else path / "metrics.json"
        if not path.is_file():
            raise DefectlabError(f"no evaluation in {path.parent}: run `defectlab evaluate --run {path.parent}` first")
        return cls.from_json(runs.read_json(path))


# ----------------------------------------------------------------------------- inputs
def run_split(folder: Path) -> tuple[sources.DataConfig, sources.DefectData]:
    """The run's data settings and its own split (never a rebuilt one: that could put fine-tuning
    images in the reference)."""
    dcfg = sources.from_settings(runs.load_config(folder))
    split = folder / "split.json"
    if not split.is_file():
        raise DefectlabError(f"split manifest missing: {split} (written by fine-tuning; evaluate needs the run's own split)")
    dd = sources.load(dcfg, manifest=split)
    if {s.image for s in dd.train} & {s.image for s in dd.test}:
        raise DefectlabError(f"split manifest {split} puts the same image in train and test")
    return dcfg, dd


def samples_folder(folder: Path, samples: str = "") -> Path:
    """``samples`` if it is a folder; ``"synthesized"``: the newest ``synthesize`` output under
    ``<run>/synthesized/``; ``""``: the newest sampler output under ``<run>/samples/``. A run
    trained on ``--zoom`` windows is evaluated on its synthesized full images only (its free
    samples are close-ups of defects, not pictures of products)."""
    zoom = sources.from_settings(runs.load_config(folder)).zoom
    if samples and samples != "synthesized":
        path = Path(samples).expanduser()
        if not path.is_dir():
            raise DefectlabError(f"samples folder not found: {path} (--samples)")
        if zoom > 1 and not (path / "mask_config.json").is_file():
            raise DefectlabError(f"{path} is not synthesize output, and run {folder.name} was trained on --zoom {zoom} "
                                 "windows: evaluate its `defectlab synthesize` output (--samples synthesized)")
        return path
    sub, stage = ("synthesized", "synthesize") if samples or zoom > 1 else ("samples", "sample")
    found = [p.parent for p in (folder / sub).glob("*/manifest.jsonl")]
    if not found:
        raise DefectlabError(f"no {sub} images in {folder / sub}: run `defectlab {stage} --run {folder}` first, "
                             "or pass --samples FOLDER")
    return max(found, key=lambda p: (p / "manifest.jsonl").stat().st_mtime)  # the newest export


def generated_paths(samples: Path, product: str, classes: list[str]) -> dict[str, list[Path]]:
    """The sampler's PNGs per class: ``<samples>/<product>/test/<class>/*.png``."""
    return {c: sorted((samples / product / "test" / c).glob("*.png")) for c in classes}


def load_images(paths: list[Path], size: int, crop: int = 0) -> torch.Tensor:
    """Image files → [N,3,size,size] in [-1, 1] (an empty list → 0 images)."""
    return torch.stack([dataset.load_image(p, size, crop) for p in paths]) if paths else torch.zeros(0, 3, size, size)


def _parse(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise DefectlabError(f"unknown {what} {', '.join(bad) or '(none)'}; use {', '.join(allowed)}")
    return items


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise DefectlabError(f"device {name!r} is not available; use auto, cpu or cuda")
    return name


def _check(cfg: EvalConfig) -> None:
    for key in ("seeds", "classifier_steps", "classifier_batch", "classifier_size", "gain_seeds", "gain_steps",
                "gain_test_per_class"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"{key} must be ≥ 1 (got {getattr(cfg, key)})")
    if cfg.bootstrap < 0 or cfg.kid_subset_size < 0:
        raise DefectlabError("bootstrap and kid_subset_size must be ≥ 0")


# ----------------------------------------------------------------------------- run(cfg)
def run(cfg: EvalConfig) -> EvalResult:
    """Evaluate a run; writes ``<run>/metrics.json`` and returns what it holds."""
    t0 = time.time()
    wanted = _parse(cfg.metrics, METRICS, "metric")
    explicit = cfg.metrics != EvalConfig.metrics  # asked for by name: missing weights are an error
    conditions = tuple(_parse(cfg.conditions, classifier.CONDITIONS, "downstream condition"))
    _check(cfg)
    folder = runs.resolve(cfg.run, Path(cfg.runs_dir) if cfg.runs_dir else None)
    dcfg, dd = run_split(folder)
    samples = samples_folder(folder, cfg.samples)
    gen_paths = generated_paths(samples, dd.product, dd.classes)
    if not any(gen_paths.values()):
        raise DefectlabError(f"no generated PNGs under {samples / dd.product / 'test'}/<class>/ for classes "
                             f"{', '.join(dd.classes)}")
    device = _device(cfg.device)
    test = {c: [s.image for s in dd.test if s.defect == c] for c in dd.classes}
    train = {c: [s.image for s in dd.train if s.defect == c] for c in dd.classes}
    size = dcfg.image_size
    gen_img = {c: load_images(p, size) for c, p in gen_paths.items()}
    train_img = {c: load_images(p, size, dcfg.crop) for c, p in train.items()}
    result = EvalResult(
        run=str(folder), samples=str(samples), product=dd.product, classes=dd.classes, image_size=size, config=cfg,
        images={k: {c: len(v[c]) for c in dd.classes} for k, v in
                (("train", train), ("test", test), ("generated", gen_paths))})
    if (samples / "sample_config.json").is_file():  # which checkpoint / sampler settings made the images
        result.sample_config = runs.read_json(samples / "sample_config.json")
    read = {*dd.classes, *([product.GOOD] if "presence" in wanted else [])}  # presence also reads "good"
    extra = sorted({p.name for p in (samples / dd.product / "test").iterdir() if p.is_dir()} - read)
    if extra:
        result.warnings.append(f"generated classes not in the run ignored: {', '.join(extra)}")

    fidelity = [m for m in metrics.FIDELITY if m in wanted]
    if fidelity:
        try:
            weights, source = metrics.inception_weights(cfg.feature_weights)
        except DefectlabError as err:
            if explicit or cfg.feature_weights:  # a named file that is not there is a mistake, not "offline"
                raise
            result.skipped.update({m: f"{m}: skipped — {err}" for m in fidelity})
            fidelity = []
    # the held-out real images at the run's size, read once for FID/KID/IS and the judge's own check
    real_img = ({c: load_images(test[c], size, dcfg.crop) for c in dd.classes}
                if fidelity or "judge" in wanted else {})
    if fidelity:
        result.feature_extractor = metrics.describe_weights(weights, source, cfg.feature_weights_note)
        result.distribution = metrics.per_class(metrics.load_extractor(weights, device), gen_img, real_img, fidelity,
                                                cfg.kid_subset_size, cfg.bootstrap)
        ns = [min(r["n_gen"], r["n_real"]) for r in result.distribution["per_class"].values()]
        if "fid" in fidelity and min(ns) < 2048:  # fewer images than feature dims: rank-deficient covariances
            result.warnings.append("FID from fewer than 2048 images per set is biased upward and depends on n: "
                                   "compare only numbers computed from the same n_real and n_gen")

    distance, reason = metrics.lpips_distance(device)
    result.diversity = {"per_class": metrics.diversity(gen_img, train_img, distance), "ic_lpips_reason": reason}
    if "downstream" in wanted:
        result.downstream = _downstream(cfg, dd, dcfg.crop, train, test, gen_paths, conditions, device)
    if "judge" in wanted:
        result.judge = _judge(dcfg, dd, gen_img, real_img)
        if result.judge is None:
            result.skipped["judge"] = ("judge: skipped — it is trained on the procedural generator's images, so it "
                                       "judges runs on the embedded synthetic dataset (hazelnut, screw) only")
    if "gain" in wanted:
        result.gain = _gain(cfg, dcfg, dd, gen_img, train_img)
        if result.gain is None:
            result.skipped["gain"] = ("gain: skipped — its test set is drawn by the procedural generator, so it "
                                      "measures runs on the embedded synthetic dataset (hazelnut, screw) only")
    if "presence" in wanted:
        result.presence, why = _presence(dcfg, dd, samples, gen_img, train_img)
        if result.presence is None:
            result.skipped["presence"] = why
    if (samples / "mask_config.json").is_file():  # image + mask pairs: how well defects keep to their masks
        result.masks = masks.summarize(samples)
    result.seconds = round(time.time() - t0, 1)
    runs.write_json(folder / "metrics.json", result.to_json())
    return result


def _presence(dcfg: sources.DataConfig, dd: sources.DefectData, samples: Path, gen_img: dict,
              train_img: dict) -> tuple[dict | None, str]:
    """``presence.product_presence`` of the free samples (each defect class, and ``good`` when the
    run learned the product) against the run's own training images (``train_img``, as loaded for
    diversity), defect-free ones included."""
    if (samples / "mask_config.json").is_file():
        return None, "presence: skipped — image + mask pairs keep the real image outside the mask"
    size = dcfg.image_size
    refs = torch.cat([*(train_img[c] for c in dd.classes), load_images(list(dd.good), size, dcfg.crop)])
    gen = {c: x for c, x in gen_img.items() if len(x)}
    good = sorted((samples / dd.product / "test" / product.GOOD).glob("*.png"))
    if good:
        gen[product.GOOD] = load_images(good, size)
    if len(refs) < 3:
        return None, f"presence: skipped — {len(refs)} real training images at hand, it needs at least 3"
    p = presence.product_presence(refs, gen)
    return {**dataclasses.asdict(p), "overall": presence.overall(p),
            "note": "best-pose foreground IoU against the run's real training images; the pass mark is the "
                    f"{p.quantile:.0%} quantile of the real images against each other"}, ""


def _procedural(dcfg: sources.DataConfig, dd: sources.DefectData) -> bool:
    """The run's data is the embedded procedural dataset, whose generator the judge and the gain
    study draw from."""
    return dcfg.data == "synthetic" and dd.product in synth.PRODUCTS and dd.classes == judge.classes_of(dd.product)


def _gain(cfg: EvalConfig, dcfg: sources.DataConfig, dd: sources.DefectData, gen_img: dict, train_img: dict) -> dict | None:
    """``gain.gain_study`` of the samples: k of the run's own training images per class (the ones
    the generator was fine-tuned on) with and without the generated images, tested on
    ``gain_test_per_class`` procedural images per class; None off the procedural dataset."""
    if not _procedural(dcfg, dd):
        return None
    try:
        ks = tuple(sorted({int(k) for k in cfg.gain_ks.split(",") if k.strip()}))
    except ValueError:
        ks = ()
    if not ks or ks[0] < 1:
        raise DefectlabError(f"gain_ks must be comma-separated counts ≥ 1 (got {cfg.gain_ks!r})")
    short = [c for c in dd.classes if len(train_img[c]) < ks[-1]]
    if short:
        raise DefectlabError(f"gain_ks: k = {ks[-1]} needs {ks[-1]} training images per class; the run has fewer "
                             f"for {', '.join(short)}")
    r = gain.gain_study(dd.product, {c: x for c, x in gen_img.items() if len(x)}, ks, cfg.gain_seeds,
                         dcfg.image_size, cfg.gain_steps, test_per_class=cfg.gain_test_per_class, real=train_img,
                         progress=False)
    return {**gain.gain_to_json(r), "note": "offline proxy: a small CNN per condition and seed, k of the run's own "
            "training images per class (the generator saw all of them), procedural test images"}


def _judge(dcfg: sources.DataConfig, dd: sources.DefectData, gen_img: dict, real_img: dict) -> dict | None:
    """``judge.judge_score`` of the samples (and, as the judge's own check, of the real held-out
    images) at the run's size; None when the run's data is not the procedural dataset."""
    if not _procedural(dcfg, dd):
        return None
    j = judge.judge_for(dd.product, dcfg.image_size)

    def score(images: dict) -> dict:
        labels = torch.cat([torch.full((len(images[c]),), i) for i, c in enumerate(dd.classes)])
        s = judge.judge_score(j, torch.cat([images[c] for c in dd.classes]), labels, dd.classes)
        return {"per_class": {c.name: judge.json_fields(c) for c in s.per_class}, "overall": judge.json_fields(s.overall)}

    return {"generated": score(gen_img), "real_test": score(real_img), "chance": 1 / len(dd.classes),
            "judge": {"size": j.size, "seed": j.seed, "source": j.source, "recipe": dataclasses.asdict(j.recipe)},
            "note": "offline proxy: a small CNN trained on abundant procedural images of the product, never on "
                    "this run's images"}


def _downstream(cfg: EvalConfig, dd: sources.DefectData, crop: int, train: dict, test: dict, gen_paths: dict,
                conditions: tuple[str, ...], device: str) -> dict:
    """The classifier trained per condition and seed at ``classifier_size``, tested on the real test split."""
    t0, s = time.time(), cfg.classifier_size
    labels = lambda d: torch.cat([torch.full((len(d[c]),), i) for i, c in enumerate(dd.classes)])  # noqa: E731
    sets = {"real": (torch.cat([load_images(train[c], s, crop) for c in dd.classes]), labels(train)),
            "gen": (torch.cat([load_images(gen_paths[c], s) for c in dd.classes]), labels(gen_paths))}
    test_set = (torch.cat([load_images(test[c], s, crop) for c in dd.classes]), labels(test))
    down = classifier.downstream(sets, test_set, dd.classes, conditions, cfg.seeds, cfg.classifier_steps,
                                 cfg.classifier_batch, cfg.classifier_weights, device)
    down["setup"] = {"model": "resnet18", "pretrained": bool(cfg.classifier_weights), "steps": cfg.classifier_steps,
                     "batch": cfg.classifier_batch, "size": s, "seeds": cfg.seeds, "n_test": len(test_set[0]),
                     "seconds": round(time.time() - t0, 1)}
    return down
