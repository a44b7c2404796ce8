"""Defect image folders → samples, a per-class train/test split, and a torch dataset.

Two real layouts are detected automatically:

* MVTec AD: ``<root>/<product>/train/good/*.png``, ``<root>/<product>/test/<defect>/*.png``,
  masks ``<root>/<product>/ground_truth/<defect>/<stem>_mask.png``.
* DefectSpectrum DS-MVTec: ``<root>/<product>/image/<defect>/*.png`` (``image/good`` = good
  images), masks ``<root>/<product>/mask/<defect>/<stem>_mask.png``; colour masks under
  ``rgb_mask/`` (hazelnut) or ``rbg_mask/`` (screw, the dataset's own spelling) are used when the
  binary mask is missing.

``"synthetic"`` names the embedded dataset (``synth.py``), generated under ``paths.SYNTHETIC``
on first use. Files in a class folder that are not images are skipped with a ``warnings.warn``
naming them (hidden files such as ``.DS_Store`` silently). ``load()`` checks every defect image
and mask with PIL's ``verify()`` (header + PNG chunk CRCs, no decoding), so a corrupt or
truncated file is reported by name before training starts; good images get a header check.
"""
from __future__ import annotations

import dataclasses

import json
import os
import shutil
import tempfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..base.images import GREY_MODES
from . import synth

# Closest ImageNet-1k class per product: the class-table row a fine-tune can start from.
ANCHOR_CLASSES = {"hazelnut": (990, "buckeye, horse chestnut, conker"), "screw": (783, "screw")}

LAYOUTS = {"mvtec": "MVTec AD", "ds-mvtec": "DefectSpectrum DS-MVTec"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
COLOUR_MASK_DIRS = ("rgb_mask", "rbg_mask")  # DS-MVTec spells it both ways
SYNTHETIC = {"seed": 0, "size": 256, "per_class": 20, "good": 20}  # the embedded default
STAMP = ".defectlab-synthetic.json"
MANIFEST_FORMAT = "defectlab-split/1"
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class DataConfig:
    data: str = "synthetic"        # "synthetic" (embedded default), "synthetic-v2" (drawn with version 2) or a dataset root folder (MVTec AD or DS-MVTec)
    product: str = "hazelnut"      # product folder name
    image_size: int = 64           # square side after crop+resize
    crop: int = 0                  # centre crop (px, before resize); 0 = none
    test_fraction: float = 0.25    # held out per class, never used for fine-tuning
    split_seed: int = 0            # seed of the per-class split
    hflip: bool = True             # random horizontal flip
    vflip: bool = True             # random vertical flip
    rotations: tuple[int, ...] = (45, 65, 120)  # random rotation angles (degrees); empty = none
    zoom: int = 1                  # > 1: read images at image_size × zoom and train on the image_size window around each defect (a small defect spans zoom × more latent cells per side; synthesize pastes the windows back)


def from_settings(settings: dict | object, **changes) -> DataConfig:
    """The ``DataConfig`` inside a stage's settings: a dataclass (``TrainConfig``, ``RankConfig``)
    or a run's saved ``config.json`` dict (lists back to tuples). A saved run always has its
    resolved ``image_size``; ``changes`` override (e.g. another ``image_size``)."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    items = settings if isinstance(settings, dict) else {n: getattr(settings, n) for n in names if hasattr(settings, n)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in items.items() if k in names}
    return DataConfig(**{**kw, **changes})


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None
    defect: str
    label: int
    product: str


@dataclass
class DefectData:
    layout: str            # "mvtec" | "ds-mvtec"
    root: Path
    product: str
    classes: list[str]     # sorted defect names, "good" excluded; label = index here
    train: list[Sample]
    test: list[Sample]
    good: list[Path]       # defect-free images (train/good for MVTec), may be empty
    greyscale: bool = False  # every image has one channel (MVTec screws): generated images are made grey too


# ----------------------------------------------------------------------------- roots and layouts
def resolve_root(data: str, version: int | None = None) -> Path:
    """``"synthetic"`` → ``paths.SYNTHETIC`` (generated on first use), ``"synthetic-v<N>"`` → the
    same drawn with version N (beside it, ``synthetic-v<N>``), else an existing folder;
    ``version``: synth's drawing version for ``"synthetic"`` (``None``: the default)."""
    if (drawn := synth.embedded(data, version)) is not None:  # synthetic, synthetic-v2
        return _ensure_synthetic(drawn)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DefectlabError(f"dataset folder not found: {root}")
    return root.resolve()


def _ensure_synthetic(version: int | None = None) -> Path:
    """Generate in a temp sibling, then rename into place: a killed run never leaves half a
    dataset, and the stamp (generator version + settings) makes an outdated copy regenerate."""
    version = synth.version_of(version)  # a non-default version lives beside the default: no back-and-forth regeneration
    target = paths.SYNTHETIC if version == synth.GENERATOR_VERSION else paths.SYNTHETIC.with_name(f"synthetic-v{version}")
    stamp = {"generator_version": version, **SYNTHETIC}
    if _read_stamp(target) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # processes started together (a sweep, parallel CI jobs) must not swap the folder under
    # a reader: one generates, the others wait and then find the stamp
    lock = Path(tempfile.gettempdir()) / f"defectlab-{zlib.crc32(str(target.resolve()).encode()):08x}.lock"
    with FileLock(str(lock)):  # outside the data folder: nothing stray is left beside the dataset
        if _read_stamp(target) == stamp:
            return target
        return _generate_synthetic(target, stamp)


def _generate_synthetic(target: Path, stamp: dict) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-new-", dir=target.parent))
    try:
        synth.generate(tmp, **SYNTHETIC, version=stamp["generator_version"])
        (tmp / STAMP).write_text(json.dumps(stamp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        if _read_stamp(target) != stamp:  # not just another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _product_layout(folder: Path) -> str | None:
    if (folder / "test").is_dir():
        return "mvtec"
    if (folder / "image").is_dir():
        return "ds-mvtec"
    return None


def detect_layout(root: Path) -> tuple[str, list[str]]:
    """``(layout, sorted product names)`` of a dataset root."""
    root = Path(root)
    if not root.is_dir():
        raise DefectlabError(f"dataset folder not found: {root}")
    found = {p.name: lay for p in sorted(root.iterdir())
             if p.is_dir() and not p.name.startswith(".") and (lay := _product_layout(p))}
    if not found:
        hint = " (it looks like a product folder: pass its parent)" if _product_layout(root) else ""
        raise DefectlabError(
            f"{root} is in neither known layout{hint}: expected <root>/<product>/test/<defect>/*.png "
            "with train/good and ground_truth/ (MVTec AD) or <root>/<product>/image/<defect>/*.png "
            "with mask/ (DS-MVTec)")
    if len(set(found.values())) > 1:
        raise DefectlabError(f"{root} mixes MVTec AD and DS-MVTec product folders: "
                             + ", ".join(f"{k} ({v})" for k, v in found.items()))
    return next(iter(found.values())), sorted(found)


def _images(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted; other files are skipped with a warning."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        else:
            warnings.warn(f"skipping non-image file {p}", stacklevel=3)
    return out


# Per layout: class folders, mask folders (first match wins), good images, extra good images.
_FOLDERS = {
    "mvtec": ("test", ("ground_truth",), "train/good", "test/good"),
    "ds-mvtec": ("image", ("mask", *COLOUR_MASK_DIRS), "image/good", None),
}


def _scan(root: Path, layout: str, product: str, strict: bool = True):
    """``({defect: [(image, mask|None)]}, good images, extra good images)``."""
    prod = root / product
    classes, masks, good, extra = _FOLDERS[layout]
    class_root, mask_dirs = prod / classes, [prod / m for m in masks]
    by_class = {}
    for folder in sorted(class_root.iterdir()):
        if not folder.is_dir() or folder.name == "good" or folder.name.startswith("."):
            continue
        files = _images(folder)
        if not files and strict:
            raise DefectlabError(f"defect class folder has no images: {folder}")
        by_class[folder.name] = [(f, _find_mask(mask_dirs, folder.name, f.stem)) for f in files]
    if not by_class and strict:
        raise DefectlabError(f"no defect class folders in {class_root} (only 'good' or nothing)")
    return by_class, _images(prod / good), _images(prod / extra) if extra else []


def _find_mask(mask_dirs: list[Path], defect: str, stem: str) -> Path | None:
    for d in mask_dirs:
        suffix = "_mask" if d.name == "mask" or d.name == "ground_truth" else f"_{d.name}"
        candidate = d / defect / f"{stem}{suffix}.png"
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- load + split
def check_config(cfg: DataConfig) -> None:
    if cfg.image_size < 8:
        raise DefectlabError(f"image_size must be at least 8 (got {cfg.image_size})")
    if cfg.crop < 0:
        raise DefectlabError(f"crop must be 0 (none) or a positive size in pixels (got {cfg.crop})")
    if not 1 <= cfg.zoom <= 8:
        raise DefectlabError(f"zoom must be between 1 (whole images) and 8 (got {cfg.zoom})")
    if not 0 < cfg.test_fraction < 1:
        raise DefectlabError(f"test_fraction must be between 0 and 1 (got {cfg.test_fraction})")


def _header(path: Path, verify: bool = True) -> tuple[tuple[int, int], str]:
    """Size and mode from the header; ``verify()`` also walks the PNG chunks (CRCs, truncation)
    without decoding pixels."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if verify:
                im.verify()
    except UNREADABLE as err:
        raise DefectlabError(f"unreadable or corrupt image {path}: {err}") from err
    return size, mode


def _verify(pairs: list[tuple[Path, Path | None]], crop: int, full: bool = True) -> set[str]:
    """Check headers (``full``: PNG chunks too), crop and mask sizes; the images' modes."""
    modes = set()
    for image, mask in pairs:
        size, mode = _header(image, full)
        modes.add(mode)
        if crop > min(size):
            raise DefectlabError(f"crop {crop} px is larger than image {image} ({size[0]}x{size[1]})")
        if mask is not None and (msize := _header(mask)[0]) != size:
            raise DefectlabError(f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} "
                                 f"is {size[0]}x{size[1]}")
    return modes


def split(by_class: dict[str, list], test_fraction: float, seed: int) -> tuple[dict, dict]:
    """Per class: shuffle the sorted items with a (seed, class) generator and hold out
    ``round(n * test_fraction)``, at least 1 test and 1 train item when n >= 2."""
    train, test = {}, {}
    for name, items in sorted(by_class.items()):
        items = sorted(items)
        n = len(items)
        n_test = 0 if n < 2 else min(n - 1, max(1, int(n * test_fraction + 0.5)))
        if n < 2:
            warnings.warn(f"class {name!r} has a single image: it is used for training only", stacklevel=2)
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)
        held = set(order[:n_test].tolist())
        test[name] = [it for i, it in enumerate(items) if i in held]
        train[name] = [it for i, it in enumerate(items) if i not in held]
    return train, test


def load(cfg: DataConfig, manifest: Path | None = None) -> DefectData:
    """Scan, verify and split one product. With ``manifest``: write the split there, or, if the
    file exists, reuse it (refusing when it no longer matches the folder or the config)."""
    check_config(cfg)
    root = resolve_root(cfg.data)
    layout, products = detect_layout(root)
    if cfg.product not in products:
        raise DefectlabError(f"unknown product {cfg.product!r} in {root}; available: {', '.join(products)}")
    by_class, good, _ = _scan(root, layout, cfg.product)
    modes = _verify([p for pairs in by_class.values() for p in pairs], cfg.crop)
    # Good images: header only. There can be hundreds of them, they are not what we fine-tune
    # on, and load_image still names a corrupt one if a later stage reads it.
    modes |= _verify([(g, None) for g in good], cfg.crop, full=False)
    classes = sorted(by_class)
    if manifest is not None and Path(manifest).is_file():
        train, test = _read_manifest(Path(manifest), root, layout, cfg, by_class)
    else:
        train, test = split(by_class, cfg.test_fraction, cfg.split_seed)

    def make(groups: dict) -> list[Sample]:
        return [Sample(img, mask, d, classes.index(d), cfg.product) for d in classes for img, mask in groups[d]]

    data = DefectData(layout, root, cfg.product, classes, make(train), make(test), good, modes <= set(GREY_MODES))
    if manifest is not None and not Path(manifest).is_file():
        write_manifest(Path(manifest), data, cfg)
    return data


def _rel(path: Path | None, root: Path) -> str | None:
    return None if path is None else path.relative_to(root).as_posix()


def write_manifest(path: Path, data: DefectData, cfg: DataConfig) -> None:
    """The split as ``load(cfg, manifest=path)`` reads it back (paths relative to the root)."""
    def entry(s: Sample) -> dict:
        return {"image": _rel(s.image, data.root), "mask": _rel(s.mask, data.root), "defect": s.defect}

    runs.write_json(path, {
        "format": MANIFEST_FORMAT, "layout": data.layout, "product": data.product,
        "split_seed": cfg.split_seed, "test_fraction": cfg.test_fraction, "classes": data.classes,
        "train": [entry(s) for s in data.train], "test": [entry(s) for s in data.test],
        "good": [_rel(g, data.root) for g in data.good],
    })


def _read_manifest(path: Path, root: Path, layout: str, cfg: DataConfig, by_class: dict) -> tuple[dict, dict]:
    m = runs.read_json(path)
    fix = f"(delete {path} to make a new split)"
    if m.get("format") != MANIFEST_FORMAT:
        raise DefectlabError(f"{path} is not a defectlab split manifest")
    expected = {"layout": layout, "product": cfg.product, "split_seed": cfg.split_seed,
                "test_fraction": cfg.test_fraction}
    for key, value in expected.items():
        if m.get(key) != value:
            raise DefectlabError(f"split manifest {path} has {key}={m.get(key)!r} but this run has "
                                 f"{value!r} {fix}")
    on_disk = {_rel(img, root): (d, (img, mask)) for d, pairs in by_class.items() for img, mask in pairs}
    groups: dict[str, dict] = {"train": {d: [] for d in by_class}, "test": {d: [] for d in by_class}}
    seen = set()
    for part in ("train", "test"):
        for e in m[part]:
            runs.safe_join(root, e["image"])  # refuses ../ and absolute paths
            if e["image"] not in on_disk or on_disk[e["image"]][0] != e["defect"] or e["image"] in seen:
                raise DefectlabError(f"split manifest {path} does not match {root}: {e['image']} "
                                     f"is missing, duplicated or in another class {fix}")
            seen.add(e["image"])
            groups[part][e["defect"]].append(on_disk[e["image"]][1])
    if missing := sorted(set(on_disk) - seen):
        raise DefectlabError(f"split manifest {path} does not match {root}: {missing[0]} is not in it {fix}")
    return groups["train"], groups["test"]


# ----------------------------------------------------------------------------- info
def info(root: str | Path) -> dict:
    """Layout, products, classes and counts, image sizes and modes (headers only)."""
    root = resolve_root(str(root))
    layout, products = detect_layout(root)
    out = {"root": str(root), "layout": layout, "products": {}}
    for product in products:
        by_class, good, extra = _scan(root, layout, product, strict=False)
        sizes, modes, bad = Counter(), Counter(), []
        for f in [img for pairs in by_class.values() for img, _ in pairs] + good + extra:
            try:
                with Image.open(f) as im:
                    sizes[f"{im.size[0]}x{im.size[1]}"] += 1
                    modes[im.mode] += 1
            except UNREADABLE:
                bad.append(str(f))
        out["products"][product] = {
            "classes": {d: len(pairs) for d, pairs in by_class.items()},
            "masks": sum(m is not None for pairs in by_class.values() for _, m in pairs),
            "good": len(good), "test_good": len(extra),
            "colour_masks": [d for d in COLOUR_MASK_DIRS if (root / product / d).is_dir()],
            "sizes": dict(sizes), "modes": dict(modes), "unreadable": bad,
        }
    return out


def format_info(info: dict) -> str:
    lines = [f"{info['root']}: {LAYOUTS[info['layout']]} layout ({info['layout']}), "
             f"{len(info['products'])} product(s)"]
    for name, p in info["products"].items():
        n = sum(p["classes"].values())
        good = f"{p['good']} good" + (f" (+{p['test_good']} test/good)" if p["test_good"] else "")
        lines.append(f"  {name}: {len(p['classes'])} defect classes, {n} images, {p['masks']} masks, {good}")
        for label, (d, count) in enumerate(sorted(p["classes"].items())):
            lines.append(f"    {label:>3}  {d:<24} {count}")
        fmt = lambda c: ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))  # noqa: E731
        lines.append(f"    sizes: {fmt(p['sizes'])}; modes: {fmt(p['modes'])}")
        if p["colour_masks"]:
            lines.append(f"    colour masks: {', '.join(p['colour_masks'])}/")
        for f in p["unreadable"]:
            lines.append(f"    UNREADABLE: {f}")
    return "\n".join(lines)
