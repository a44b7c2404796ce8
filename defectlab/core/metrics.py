"""Numbers about image sets, from tensors to dicts: FID / KID / IS through torch-fidelity, pixel
diversity and IC-LPIPS. No run folders and no files written (the Inception weights file is
found or downloaded into torch hub's cache); ``evaluate.py`` is the stage that uses them.

Features come from torch-fidelity's InceptionV3, extracted once per image set; FID, KID and IS
are then torch-fidelity's own functions applied to those features (per class, pooled, and in
bootstrap resamples) — what ``torch_fidelity.calculate_metrics`` does inside, and a test checks
the numbers agree. At a few dozen images FID is strongly biased upwards and depends on n:
compare only numbers computed from the same numbers of images, which the results record.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from ..base.errors import DefectlabError
from ..base.images import to_uint8
from ..base.progress import tqdm

FIDELITY = ("fid", "kid", "is")
OFFICIAL_SHA256 = "6726825d"  # prefix of the official weights' sha256 (torch hub's hash in the file name)
LAYERS = {"fid": "2048", "kid": "2048", "is": "logits_unbiased"}  # torch-fidelity's defaults
RANDOM_NOTE = "random weights — numbers meaningless"  # the label tests and smoke runs give such files


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


class Images(torch.utils.data.Dataset):
    """A tensor of images as the dataset torch-fidelity iterates over."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def features(extractor: FeatureExtractorInceptionV3, images: torch.Tensor, batch_size: int = 32) -> dict:
    """``{"2048": [N,2048], "logits_unbiased": [N,1008]}`` for uint8 images [N,3,H,W] (resized to 299 inside)."""
    cuda = next(extractor.parameters()).is_cuda
    return get_featuresdict_from_dataset(Images(images), extractor, batch_size, cuda, save_cpu_ram=True, verbose=False)


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


def per_class(extractor, gen: dict[str, torch.Tensor], real: dict[str, torch.Tensor], metrics=FIDELITY,
              kid_subset_size: int = 0, bootstrap: int = 0) -> dict:
    """``distribution`` per class and pooled, for images [n,3,H,W] in [-1, 1] keyed by class:
    features extracted once per set, pooled = their concatenation."""
    feats = {c: (features(extractor, to_uint8(gen[c])), features(extractor, to_uint8(real[c])))
             for c in tqdm([c for c in gen if len(gen[c]) and len(real[c])], desc="Inception features", unit="class")}
    out: dict = {"per_class": {}}
    for c in gen:
        if c in feats:
            out["per_class"][c] = distribution(*feats[c], metrics, kid_subset_size, bootstrap)
        else:
            out["per_class"][c] = {"n_gen": len(gen[c]), "n_real": len(real[c]),
                                   "reason": "no generated images" if len(real[c]) else "no real test images"}
    if feats:
        pooled = [{k: torch.cat([f[side][k] for f in feats.values()]) for k in LAYERS.values()} for side in (0, 1)]
        out["pooled"] = distribution(*pooled, metrics, kid_subset_size, bootstrap)
    else:
        out["pooled"] = {"reason": "no class has both real test and generated images"}
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
        import lpips  # noqa: PLC0415  (optional dependency, not installed by default)
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
    clusters = []
    for c in owner.unique():
        members = gen[owner == c]
        if len(members) >= 2:  # all pairs, a chunk at a time (a cluster of 100 has 4950)
            a, b = torch.triu_indices(len(members), len(members), 1)
            d = torch.cat([distance(members[a[i:i + 256]], members[b[i:i + 256]]) for i in range(0, len(a), 256)])
            clusters.append(float(d.mean()))
    return float(np.mean(clusters)) if clusters else None


def diversity(gen: dict[str, torch.Tensor], train: dict[str, torch.Tensor], distance=None) -> dict:
    """``pixel_diversity`` and IC-LPIPS (None without a ``distance``) per class."""
    return {c: {**pixel_diversity(gen[c], train[c]), "ic_lpips": ic_lpips(gen[c], train[c], distance) if distance
                else None} for c in tqdm(list(gen), desc="diversity", unit="class", disable=distance is None)}
