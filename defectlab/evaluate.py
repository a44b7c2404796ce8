"""Evaluate a run's generated images: FID / KID / IS against the held-out real test images,
diversity, and the downstream gain of a defect-type classifier (``classifier.py``).

The reference is always the run's *test* split, rebuilt from its ``config.json`` and
``split.json``: images used for fine-tuning are never the reference. Features come from
torch-fidelity's InceptionV3, extracted once per image set; FID, KID and IS are then
torch-fidelity's own functions applied to those features (per class, pooled, and in bootstrap
resamples) — what ``torch_fidelity.calculate_metrics`` does inside, and a test checks the
numbers agree. At a few dozen images FID is strongly biased upwards and depends on n: compare
only numbers computed from the same numbers of images, which the results record.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from . import classifier, data, runs, viz
from .errors import DefectlabError

FIDELITY = ("fid", "kid", "is")
METRICS = ("downstream", *FIDELITY)
OFFICIAL_SHA256 = "6726825d"  # prefix of the official weights' sha256 (torch hub's hash in the file name)
LAYERS = {"fid": "2048", "kid": "2048", "is": "logits_unbiased"}  # torch-fidelity's defaults
RANDOM_NOTE = "random weights — numbers meaningless"  # the label tests and smoke runs give such files


@dataclass
class EvalConfig:
    run: str = "latest"            # run folder, name or number; latest = the newest run
    samples: str = ""              # sampler output (<samples>/<product>/test/<class>/*.png); "" = newest under <run>/samples/
    metrics: str = "downstream,fid,kid,is"  # any of downstream, fid, kid, is (default list: unavailable ones are skipped)
    feature_weights: str = ""      # InceptionV3 weights file (torch-fidelity format); "" = torch hub cache or download
    feature_weights_note: str = ""  # label stored with the numbers, e.g. "random weights — numbers meaningless"
    kid_subset_size: int = 0       # KID subset size (0 = min(n_real, n_gen, 1000); capped at that)
    bootstrap: int = 0             # bootstrap resamples for FID/KID intervals (2.5-97.5 percentiles; 0 = none)
    seeds: int = 3                 # downstream classifier seeds (mean ± std over them)
    conditions: str = "real,real+gen"  # downstream training sets: real, real+gen, gen (gen = classification accuracy score)
    classifier_steps: int = 40     # optimizer steps per classifier, the same for every condition (~12 CPU-s at 64 px)
    classifier_batch: int = 8      # classifier batch size
    classifier_size: int = 64      # classifier input side (px)
    classifier_weights: str = ""   # local torchvision resnet18 ImageNet weights ("" = from scratch)
    device: str = "auto"           # auto | cpu | cuda
    runs_dir: str = ""             # parent of run folders ("" = outputs/runs)
    formats: str = "png"           # figure formats (png, pdf, svg)


# ----------------------------------------------------------------------------- Inception features
def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("DEFECTLAB_OFFLINE", "HF_HUB_OFFLINE"))


def inception_weights(path: str = "") -> tuple[Path, str]:
    """The InceptionV3 weights file and where it came from: file | torch-hub cache | download."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DefectlabError(f"Inception weights file not found: {p} (--feature-weights)")
        return p, "file"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    if cached.is_file():
        return cached, "torch-hub cache"
    hint = "no Inception weights ({}): download " + URL_INCEPTION_V3 + f" to {cached}, or pass --feature-weights FILE"
    if _offline():
        raise DefectlabError(hint.format("offline"))
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), hash_prefix=OFFICIAL_SHA256, progress=False)
    except Exception as err:  # no network, proxy, bad hash: all end the same way for the user
        raise DefectlabError(hint.format(f"download failed: {type(err).__name__}")) from err
    finally:
        socket.setdefaulttimeout(old)
    return cached, "download"


def describe_weights(path: Path, source: str, note: str = "") -> dict:
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    official = sha.startswith(OFFICIAL_SHA256)
    default = ("official torch-fidelity weights (FID comparable at equal image counts)" if official
               else "non-standard weights — absolute numbers not comparable with published FID/KID/IS")
    return {"name": "torch-fidelity inception-v3-compat", "layers": LAYERS, "weights": str(path),
            "sha256": sha[:16], "source": source, "official": official, "offline": source != "download",
            "proxy": not official, "note": note or default}


def load_extractor(path: Path, device: str = "cpu") -> FeatureExtractorInceptionV3:
    # torch-fidelity loads with weights_only=False: prove the file holds only tensors first
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DefectlabError(f"not a plain weights file (torch.load weights_only=True failed): {path}") from err
    if not isinstance(state, dict) or tuple(getattr(state.get("fc.weight"), "shape", ())) != (1008, 2048):
        raise DefectlabError(f"not torch-fidelity InceptionV3 weights (no fc.weight [1008, 2048]): {path}")
    try:
        fe = FeatureExtractorInceptionV3("inception-v3-compat", [LAYERS["fid"], LAYERS["is"]],
                                         feature_extractor_weights_path=str(path))
    except RuntimeError as err:  # missing / unexpected keys, wrong shapes
        raise DefectlabError(f"Inception weights do not fit torch-fidelity's InceptionV3: {path}") from err
    return fe.to(device)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float → uint8 [N,3,H,W], what torch-fidelity's feature extractors take."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def features(extractor: FeatureExtractorInceptionV3, images: torch.Tensor, batch_size: int = 32) -> dict:
    """``{"2048": [N,2048], "logits_unbiased": [N,1008]}`` for uint8 images [N,3,H,W] (resized to 299 inside)."""
    cuda = next(extractor.parameters()).is_cuda
    return get_featuresdict_from_dataset(_Images(images), extractor, batch_size, cuda, save_cpu_ram=True, verbose=False)


# ----------------------------------------------------------------------------- FID / KID / IS
def _project(f_gen: torch.Tensor, f_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in an orthonormal basis of their joint affine span (≤ n−1 dims instead of 2048).
    FID depends only on means and covariances, which live in that span, and is invariant to
    rotations: the library's FID of the projected features is the same number, computed from an
    (n−1)² instead of a 2048² eigenproblem (4 s each on a CPU) — and resamples stay in the span."""
    x = torch.cat([f_gen, f_real]).double()
    if len(x) - 1 >= x.shape[1]:
        return f_gen.double(), f_real.double()
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    basis = vh[s > s[0] * 1e-10].T if s[0] > 0 else vh[:1].T
    return f_gen.double() @ basis, f_real.double() @ basis


def _fid(p_gen: torch.Tensor, p_real: torch.Tensor) -> float:
    stats = [fid_features_to_statistics(f) for f in (p_gen, p_real)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def _kid(f_gen, f_real, size: int, subsets: int = 100, seed: int = 2020) -> dict:
    out = kid_features_to_metric(f_gen, f_real, kid_subset_size=size, kid_subsets=subsets, rng_seed=seed, verbose=False)
    return {"kid": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD]}


def distribution(gen: dict, real: dict, metrics=FIDELITY, kid_subset_size: int = 0, bootstrap: int = 0,
                 seed: int = 0) -> dict:
    """FID / KID / IS of generated vs real features (``features()`` dicts). KID's subset size is
    adapted to the sets (≤ min(n_real, n_gen)); IS uses min(10, n_gen // 10) splits (≥ 1); with
    ``bootstrap`` > 0 both sets are resampled with replacement and 95% percentile intervals added."""
    fg, fr = gen[LAYERS["fid"]], real[LAYERS["fid"]]
    n_gen, n_real = len(fg), len(fr)
    out: dict = {"n_gen": n_gen, "n_real": n_real}
    if min(n_gen, n_real) < 2:
        out["reason"] = f"needs ≥ 2 images on each side (real {n_real}, generated {n_gen})"
        return out
    k = min(kid_subset_size or 1000, n_gen, n_real)
    pg, pr = _project(fg, fr) if "fid" in metrics else (None, None)
    if "fid" in metrics:
        out["fid"] = _fid(pg, pr)
    if "kid" in metrics:
        out.update(_kid(fg, fr, k), kid_subset_size=k)
    if "is" in metrics:
        splits = max(1, min(10, n_gen // 10))
        isc = isc_features_to_metric(gen[LAYERS["is"]], splits=splits)
        out.update(inception_score=isc[KEY_METRIC_ISC_MEAN], inception_score_std=isc[KEY_METRIC_ISC_STD],
                   is_splits=splits)
    if bootstrap > 0 and ("fid" in metrics or "kid" in metrics):
        rng = np.random.default_rng(seed)
        reps: dict[str, list] = {"fid": [], "kid": []}
        for b in range(bootstrap):
            i, j = torch.from_numpy(rng.integers(0, n_gen, n_gen)), torch.from_numpy(rng.integers(0, n_real, n_real))
            if "fid" in metrics:
                reps["fid"].append(_fid(pg[i], pr[j]))
            if "kid" in metrics:  # 10 subsets per resample: the resamples already average
                reps["kid"].append(_kid(fg[i], fr[j], k, subsets=10, seed=b)["kid"])
        for name, vals in reps.items():
            if vals:
                out[f"{name}_ci95"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]
        out["bootstrap"] = bootstrap
    return out


# ----------------------------------------------------------------------------- diversity
def pixel_diversity(gen: torch.Tensor, train: torch.Tensor) -> dict:
    """Weight-free numbers (pixels in [0, 1], mean absolute difference): pairwise distance among
    the generated images, the same among the real training images for scale, and each generated
    image's distance to its nearest training image (≈ 0 means copies)."""
    g, t = ((gen.double() + 1) / 2).flatten(1), ((train.double() + 1) / 2).flatten(1)
    l1 = lambda x, y: torch.cdist(x, y, p=1) / x.shape[1]  # noqa: E731

    def pairwise(x):
        return float(l1(x, x)[tuple(torch.triu_indices(len(x), len(x), 1))].mean()) if len(x) > 1 else None
    nearest = float(l1(g, t).min(1).values.mean()) if len(g) and len(t) else None
    return {"pixel_l1_gen": pairwise(g), "pixel_l1_real": pairwise(t), "nearest_train_l1": nearest}


def lpips_distance(device: str = "cpu"):
    """``(distance(a, b) -> [N], None)`` when the ``lpips`` package and its weights load, else
    ``(None, reason)``. Not faked: without real LPIPS weights IC-LPIPS is reported as null."""
    try:
        import lpips  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None, "lpips package not installed (pip install lpips)"
    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as err:  # the AlexNet backbone is downloaded by torchvision
        return None, f"LPIPS weights unavailable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"

    @torch.no_grad()
    def distance(a, b):
        return torch.cat([net(a[i:i + 64].to(device), b[i:i + 64].to(device)).flatten().cpu()
                          for i in range(0, len(a), 64)])
    return distance, None


def ic_lpips(gen: torch.Tensor, train: torch.Tensor, distance) -> float | None:
    """Intra-cluster LPIPS (Ojha et al. 2021; AnomalyDiffusion, DFMGAN): each generated image
    joins the cluster of its nearest training image; mean pairwise distance inside each cluster
    of ≥ 2, averaged over clusters. None when no cluster has two members."""
    if len(gen) < 2 or len(train) == 0:
        return None
    d = torch.stack([distance(g.expand(len(train), -1, -1, -1), train) for g in gen])
    owner = d.argmin(1)
    per_cluster = []
    for c in owner.unique():
        members = gen[owner == c]
        if len(members) >= 2:  # all pairs, a chunk at a time (a cluster of 100 has 4950)
            a, b = torch.triu_indices(len(members), len(members), 1)
            d = torch.cat([distance(members[a[i:i + 256]], members[b[i:i + 256]]) for i in range(0, len(a), 256)])
            per_cluster.append(float(d.mean()))
    return float(np.mean(per_cluster)) if per_cluster else None


# ----------------------------------------------------------------------------- run(cfg)
def _run_folder(cfg: EvalConfig) -> Path:
    return runs.resolve(cfg.run, Path(cfg.runs_dir) if cfg.runs_dir else None)


def _samples_folder(folder: Path, samples: str) -> Path:
    if samples:
        path = Path(samples).expanduser()
        if not path.is_dir():
            raise DefectlabError(f"samples folder not found: {path} (--samples)")
        return path
    found = [p.parent for p in (folder / "samples").glob("*/manifest.jsonl")]
    if not found:
        raise DefectlabError(f"no samples in {folder / 'samples'}: run `defectlab sample --run {folder}` first, "
                             "or pass --samples FOLDER")
    return max(found, key=lambda p: (p / "manifest.jsonl").stat().st_mtime)  # the newest export


def _data_config(saved: dict) -> data.DataConfig:
    fields = {f.name for f in dataclasses.fields(data.DataConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    kw["image_size"] = kw.get("image_size") or 64
    return data.DataConfig(**kw)


def _load(paths_: list[Path], size: int, crop: int = 0) -> torch.Tensor:
    return torch.stack([data.load_image(p, size, crop) for p in paths_]) if paths_ else torch.zeros(0, 3, size, size)


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


def _fidelity(fe, gen_img: dict, real_img: dict, metrics: list[str], cfg: EvalConfig) -> dict:
    """Per class and pooled: features extracted once per set, pooled = their concatenation."""
    feats = {c: (features(fe, to_uint8(gen_img[c])), features(fe, to_uint8(real_img[c])))
             for c in gen_img if len(gen_img[c]) and len(real_img[c])}
    out: dict = {"per_class": {}}
    for c in gen_img:
        if c in feats:
            out["per_class"][c] = distribution(*feats[c], metrics, cfg.kid_subset_size, cfg.bootstrap)
        else:
            out["per_class"][c] = {"n_gen": len(gen_img[c]), "n_real": len(real_img[c]),
                                   "reason": "no generated images" if len(real_img[c]) else "no real test images"}
    if feats:
        pooled = [{k: torch.cat([f[side][k] for f in feats.values()]) for k in LAYERS.values()} for side in (0, 1)]
        out["pooled"] = distribution(*pooled, metrics, cfg.kid_subset_size, cfg.bootstrap)
    else:
        out["pooled"] = {"reason": "no class has both real test and generated images"}
    return out


def run(cfg: EvalConfig) -> dict:
    """Evaluate a run; writes metrics.json / .md / .csv and figures into the run folder."""
    t0 = time.time()
    wanted = _parse(cfg.metrics, METRICS, "metric")
    explicit = cfg.metrics != EvalConfig.metrics  # asked for by name: missing weights are an error
    conditions = tuple(_parse(cfg.conditions, classifier.CONDITIONS, "downstream condition"))
    for key in ("seeds", "classifier_steps", "classifier_batch", "classifier_size"):
        if getattr(cfg, key) < 1:
            raise DefectlabError(f"{key} must be ≥ 1 (got {getattr(cfg, key)})")
    if cfg.bootstrap < 0 or cfg.kid_subset_size < 0:
        raise DefectlabError("bootstrap and kid_subset_size must be ≥ 0")
    folder = _run_folder(cfg)
    dcfg = _data_config(runs.load_config(folder))
    split = folder / "split.json"
    if not split.is_file():  # rebuilding a split here could put fine-tuning images in the reference
        raise DefectlabError(f"split manifest missing: {split} (written by fine-tuning; evaluate needs the run's own split)")
    dd = data.load(dcfg, manifest=split)
    if {s.image for s in dd.train} & {s.image for s in dd.test}:
        raise DefectlabError(f"split manifest {split} puts the same image in train and test")
    samples = _samples_folder(folder, cfg.samples)
    gen_paths = {c: sorted((samples / dd.product / "test" / c).glob("*.png")) for c in dd.classes}
    if not any(gen_paths.values()):
        raise DefectlabError(f"no generated PNGs under {samples / dd.product / 'test'}/<class>/ for classes "
                             f"{', '.join(dd.classes)}")
    device = _device(cfg.device)
    test = {c: [s.image for s in dd.test if s.defect == c] for c in dd.classes}
    train = {c: [s.image for s in dd.train if s.defect == c] for c in dd.classes}
    size = dcfg.image_size
    gen_img = {c: _load(p, size) for c, p in gen_paths.items()}
    train_img = {c: _load(p, size, dcfg.crop) for c, p in train.items()}
    result: dict = {
        "run": str(folder), "samples": str(samples), "product": dd.product, "classes": dd.classes,
        "image_size": size, "config": dataclasses.asdict(cfg),
        "images": {k: {c: len(v[c]) for c in dd.classes} for k, v in
                   (("train", train), ("test", test), ("generated", gen_paths))},
        "skipped": {}, "warnings": []}
    if (samples / "sample_config.json").is_file():  # which checkpoint / sampler settings made the images
        result["sample_config"] = runs.read_json(samples / "sample_config.json")
    extra = sorted({p.name for p in (samples / dd.product / "test").iterdir() if p.is_dir()} - set(dd.classes))
    if extra:
        result["warnings"].append(f"generated classes not in the run ignored: {', '.join(extra)}")

    fidelity = [m for m in FIDELITY if m in wanted]
    if fidelity:
        try:
            weights, source = inception_weights(cfg.feature_weights)
        except DefectlabError as err:
            if explicit or cfg.feature_weights:  # a named file that is not there is a mistake, not "offline"
                raise
            result["skipped"].update({m: f"{m}: skipped — {err}" for m in fidelity})
            fidelity = []
    if fidelity:
        result["feature_extractor"] = describe_weights(weights, source, cfg.feature_weights_note)
        real_img = {c: _load(test[c], size, dcfg.crop) for c in dd.classes}
        result["distribution"] = _fidelity(load_extractor(weights, device), gen_img, real_img, fidelity, cfg)
        ns = [min(r["n_gen"], r["n_real"]) for r in result["distribution"]["per_class"].values()]
        if "fid" in fidelity and min(ns) < 2048:  # fewer images than feature dims: rank-deficient covariances
            result["warnings"].append("FID from fewer than 2048 images per set is biased upward and depends on n: "
                                      "compare only numbers computed from the same n_real and n_gen")

    distance, reason = lpips_distance(device)
    result["diversity"] = {"per_class": {}, "ic_lpips_reason": reason}
    for c in dd.classes:
        div = pixel_diversity(gen_img[c], train_img[c])
        div["ic_lpips"] = ic_lpips(gen_img[c], train_img[c], distance) if distance else None
        result["diversity"]["per_class"][c] = div

    if "downstream" in wanted:
        t1, s = time.time(), cfg.classifier_size
        labels = lambda d: torch.cat([torch.full((len(d[c]),), i) for i, c in enumerate(dd.classes)])  # noqa: E731
        sets = {"real": (torch.cat([_load(train[c], s, dcfg.crop) for c in dd.classes]), labels(train)),
                "gen": (torch.cat([_load(gen_paths[c], s) for c in dd.classes]), labels(gen_paths))}
        test_set = (torch.cat([_load(test[c], s, dcfg.crop) for c in dd.classes]), labels(test))
        down = classifier.downstream(sets, test_set, dd.classes, conditions, cfg.seeds, cfg.classifier_steps,
                                     cfg.classifier_batch, cfg.classifier_weights, device)
        down["setup"] = {"model": "resnet18", "pretrained": bool(cfg.classifier_weights), "steps": cfg.classifier_steps,
                         "batch": cfg.classifier_batch, "size": s, "seeds": cfg.seeds, "n_test": len(test_set[0]),
                         "seconds": round(time.time() - t1, 1)}
        result["downstream"] = down
    if (samples / "mask_config.json").is_file():  # image + mask pairs: how well defects keep to their masks
        from . import masks
        result["masks"] = masks.summarize(samples)
    result["seconds"] = round(time.time() - t0, 1)
    _write(result, folder, cfg.formats)
    return result


def cli(cfg: EvalConfig) -> Path:
    """``defectlab evaluate``: run, print the table, return where metrics.json went."""
    result = run(cfg)
    print(format_table(result))
    return Path(result["run"]) / "metrics.json"


# ----------------------------------------------------------------------------- reports
def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _pm(d: dict | None, spec: str = ".3f") -> str:
    if not d or d.get("mean") is None:
        return "—"
    return _fmt(d["mean"], spec) + ("" if d.get("std") is None else " ± " + _fmt(d["std"], spec.lstrip("+")))


def format_table(metrics: dict) -> str:
    """Markdown report of a ``run()`` result: what produced the numbers, then the numbers."""
    m, out = metrics, []
    out.append(f"## Evaluation: {Path(m['run']).name} — {m['product']}, {len(m['classes'])} classes, {m['image_size']} px")
    counts = ", ".join(f"{c} {m['images']['train'][c]}/{m['images']['test'][c]}/{m['images']['generated'][c]}"
                       for c in m["classes"])
    out.append(f"Samples `{m['samples']}`. Images per class (train / held-out test / generated): {counts}.")
    if "distribution" in m:
        fe, dist = m["feature_extractor"], m["distribution"]
        out += ["", "### Generated vs held-out real test images",
                f"Feature extractor: {fe['name']}, weights `{fe['weights']}` (sha256 {fe['sha256']}…, {fe['source']}) "
                f"— **{fe['note']}**.", "",
                "| class | n real | n gen | FID | FID 95% CI | KID | KID subset | IS |", "|---|---|---|---|---|---|---|---|"]
        for name, r in [*dist["per_class"].items(), ("**pooled**", dist["pooled"])]:
            if "reason" in r:
                out.append(f"| {name} | {r.get('n_real', '—')} | {r.get('n_gen', '—')} | {r['reason']} | | | | |")
                continue
            ci = lambda k: "—" if k not in r else f"[{_fmt(r[k][0])}, {_fmt(r[k][1])}]"  # noqa: E731
            kid = "—" if "kid" not in r else f"{_fmt(r['kid'])} ± {_fmt(r['kid_std'], '.2g')} {ci('kid_ci95')}"
            out.append(f"| {name} | {r['n_real']} | {r['n_gen']} | {_fmt(r.get('fid'))} | {ci('fid_ci95')} | {kid} "
                       f"| {r.get('kid_subset_size', '—')} | {_fmt(r.get('inception_score'))} |")
    out += ["", "### Diversity (weight-free: mean |Δpixel| in [0, 1]; IC-LPIPS when LPIPS weights exist)", "",
            "| class | pairwise gen | pairwise real train | gen → nearest train | IC-LPIPS |", "|---|---|---|---|---|"]
    for c, d in m["diversity"]["per_class"].items():
        out.append(f"| {c} | {_fmt(d['pixel_l1_gen'], '.3f')} | {_fmt(d['pixel_l1_real'], '.3f')} "
                   f"| {_fmt(d['nearest_train_l1'], '.3f')} | {_fmt(d['ic_lpips'], '.3f')} |")
    if m["diversity"]["ic_lpips_reason"]:
        out.append(f"\nIC-LPIPS: null — {m['diversity']['ic_lpips_reason']}.")
    if "downstream" in m:
        dn, s = m["downstream"], m["downstream"]["setup"]
        conds, diffs = list(dn["conditions"]), list(dn["diff"])
        init = "ImageNet init" if s["pretrained"] else "from scratch"
        out += ["", f"### Downstream defect-type classifier (ResNet-18, {init}, "
                f"{s['steps']} steps × batch {s['batch']}, {s['size']} px, mean ± std over {s['seeds']} seeds; "
                f"tested on {s['n_test']} held-out real images; {s['seconds']} s)", "",
                "| metric | " + " | ".join(f"{c} (n={dn['conditions'][c]['n_train']})" for c in conds)
                + "".join(f" | Δ {d}" for d in diffs) + " |", "|---" * (1 + len(conds) + len(diffs)) + "|"]
        for k in classifier.SUMMARY:
            out.append(f"| {k} | " + " | ".join(_pm(dn["conditions"][c][k]) for c in conds)
                       + "".join(f" | {_pm(dn['diff'][d][k], '+.3f')}" for d in diffs) + " |")
        out += ["", "| class | " + " | ".join(f"F1 {c} | AP {c}" for c in conds) + " |",
                "|---" * (1 + 2 * len(conds)) + "|"]
        for name in m["classes"]:
            pc = [dn["conditions"][c]["per_class"][name] for c in conds]
            out.append(f"| {name} | " + " | ".join(f"{_pm(p['f1'])} | {_pm(p['ap'])}" for p in pc) + " |")
    notes = list(m["skipped"].values()) + m["warnings"]
    if m["config"]["bootstrap"] and "distribution" in m:
        notes.append("95% intervals: percentile bootstrap over images; at small n they are wide and may exclude the "
                     "point estimate (resampling duplicates images, and FID's small-n bias grows)")
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def rows(metrics: dict) -> list[dict]:
    """Long-format rows (section, condition, class, metric, value, std, n) for metrics.csv."""
    out = []
    add = lambda sec, cond, cls, key, val, std=None, n=None: out.append(  # noqa: E731
        {"section": sec, "condition": cond, "class": cls, "metric": key, "value": val, "std": std, "n": n})
    dist = metrics.get("distribution", {})
    for cls, r in [*dist.get("per_class", {}).items(), *([("pooled", dist["pooled"])] if dist else [])]:
        for key in ("fid", "kid", "inception_score"):
            if key in r:
                add("distribution", "", cls, key, r[key], r.get(f"{key}_std"), min(r["n_gen"], r["n_real"]))
    for cls, d in metrics["diversity"]["per_class"].items():
        for key, val in d.items():
            add("diversity", "", cls, key, val)
    dn = metrics.get("downstream")
    for cond, r in (dn or {}).get("conditions", {}).items():
        for key in classifier.SUMMARY:
            add("downstream", cond, "overall", key, r[key]["mean"], r[key]["std"], r[key]["n"])
        for cls, pc in r["per_class"].items():
            for key, v in pc.items():
                add("downstream", cond, cls, key, v["mean"], v["std"], v["n"])
    for cond, r in (dn or {}).get("diff", {}).items():
        for key, v in r.items():
            add("downstream", cond, "overall", key, v["mean"], v["std"], v["n"])
    return out


def figures(metrics: dict) -> list[tuple[str, Figure]]:
    """Per-class FID/KID bars (95% CI / subset std as error bars) and downstream conditions with std over seeds."""
    figs = []
    with viz.style():
        dist = metrics.get("distribution")
        if dist:
            items = [(c, r) for c, r in [*dist["per_class"].items(), ("pooled", dist["pooled"])] if "reason" not in r]
            keys = [k for k in ("fid", "kid") if any(k in r for _, r in items)]
            if items and keys:
                names = [c for c, _ in items]
                fig = Figure(figsize=(max(4.5, 1.2 + 0.6 * len(items)), 2.4 * len(keys) + 0.4), layout="constrained")
                for ax, key in zip(fig.subplots(len(keys), 1, squeeze=False)[:, 0], keys):
                    ax.bar(names, [r.get(key, np.nan) for _, r in items], color="#4c72b0",
                           yerr=[r.get("kid_std", 0.0) for _, r in items] if key == "kid" else None, capsize=3)
                    ci = [(x, r[f"{key}_ci95"]) for x, (_, r) in enumerate(items) if f"{key}_ci95" in r]
                    if ci:  # drawn as a segment: at small n the interval may not contain the estimate
                        ax.vlines([x for x, _ in ci], [lo for _, (lo, _) in ci], [hi for _, (_, hi) in ci],
                                  color="#dd8452", lw=3, label="bootstrap 95% interval")
                        ax.legend(fontsize=7)
                    ax.set_ylabel(key.upper() + (" (± std over subsets)" if key == "kid" else ""))
                    ax.tick_params(axis="x", labelrotation=30)
                fe = metrics["feature_extractor"]
                fig.suptitle(f"generated vs held-out real test images\n{fe['note']}", fontsize=8)
                figs.append(("eval-distribution", fig))
        dn = metrics.get("downstream")
        if dn:
            conds, keys = list(dn["conditions"]), classifier.SUMMARY
            fig = Figure(figsize=(1.5 + 1.1 * len(keys), 2.8), layout="constrained")
            ax, width = fig.subplots(), 0.8 / len(conds)
            for i, c in enumerate(conds):
                r = dn["conditions"][c]
                ax.bar(np.arange(len(keys)) + (i - (len(conds) - 1) / 2) * width, [r[k]["mean"] for k in keys], width,
                       yerr=[r[k]["std"] or 0.0 for k in keys], capsize=3, label=f"{c} (n={r['n_train']})")
            ax.set_xticks(np.arange(len(keys)), keys)
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.set_title(f"downstream ResNet-18, {dn['setup']['seeds']} seeds (mean ± std), "
                         f"{dn['setup']['n_test']} real test images")
            figs.append(("eval-downstream", fig))
    return figs


def _write(metrics: dict, folder: Path, formats: str) -> None:
    runs.write_json(folder / "metrics.json", metrics)
    runs.write_text(folder / "metrics.md", format_table(metrics))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["section", "condition", "class", "metric", "value", "std", "n"])
    writer.writeheader()
    writer.writerows(rows(metrics))
    runs.write_text(folder / "metrics.csv", buf.getvalue())
    for name, fig in figures(metrics):
        viz.save_figure(fig, folder / "figures", name, formats)
