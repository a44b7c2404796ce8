"""Real datasets for users with internet: DefectSpectrum from the Hugging Face hub, and MVTec AD
from an archive the user downloaded (MVTec's licence requires accepting terms on their site, so
we never download it ourselves).

DefectSpectrum source: the dataset card and file tree at
https://huggingface.co/datasets/DefectSpectrum/Defect_Spectrum — ``DS-MVTec/<product>/`` holds
``image/<defect>/NNN.png`` (with ``image/good``), ``mask/<defect>/NNN_mask.png`` and colour masks
``rgb_mask/<defect>/NNN_rgb_mask.png`` (``rbg_mask/…_rbg_mask.png`` for screw and a few others).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors

from ..base import paths, runs
from ..base.errors import DefectlabError, first_line

DS_REPO = "DefectSpectrum/Defect_Spectrum"
DS_FOLDER = "DS-MVTec"
HUB_TIMEOUT = 5.0  # seconds: the one request that asks the hub whether a model repo exists
MVTEC_PRODUCTS = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                  "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
ARCHIVE_SUFFIXES = (".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar.bz2", ".tar", ".zip")


@dataclass
class FetchConfig:
    source: str = "defectspectrum"  # "defectspectrum" (Hugging Face hub) or "mvtec" (needs archive)
    product: str = "hazelnut"       # product to fetch; "" = every product in the archive (mvtec only)
    archive: str = ""               # MVTec AD archive (.tar.xz / .tar.gz / .zip) for source=mvtec
    dest: str = ""                  # destination root; "" = data/<source>
    revision: str = ""              # hub branch, tag or commit for a reproducible download; "" = main
    force: bool = False             # mvtec: replace the archive's files in an existing product folder (nothing else)


def run(cfg: FetchConfig) -> Path:
    """Fetch and return the dataset root to pass as ``--data``."""
    dest = Path(cfg.dest) if cfg.dest else paths.DATA / cfg.source
    if cfg.source == "defectspectrum":
        return fetch_defectspectrum(cfg.product, dest, revision=cfg.revision or None)
    if cfg.source == "mvtec":
        if not cfg.archive:
            raise DefectlabError("source 'mvtec' needs --archive: the MVTec AD .tar.xz you "
                                 "downloaded from mvtec.com")
        return fetch_mvtec(Path(cfg.archive), dest, product=cfg.product or None, force=cfg.force)
    raise DefectlabError(f"unknown source {cfg.source!r}; use 'defectspectrum' or 'mvtec'")


# ----------------------------------------------------------------------------- hub
def fetch_defectspectrum(product: str, dest: Path | None = None, revision: str | None = None) -> Path:
    """Download ``DS-MVTec/<product>/`` (only that product) into ``dest``; returns ``dest/DS-MVTec``."""
    if product not in MVTEC_PRODUCTS:
        raise DefectlabError(f"unknown DS-MVTec product {product!r}; available: {', '.join(MVTEC_PRODUCTS)}")
    dest = runs.ensure_dir(Path(dest or paths.DATA / "defectspectrum"), "--dest")
    # Only the folders data.py reads (images + binary and colour masks), one product at a time:
    # the whole repository is many GB.
    patterns = [f"{DS_FOLDER}/{product}/{sub}/*" for sub in ("image", "mask", "rgb_mask", "rbg_mask")]
    try:
        snapshot_download(repo_id=DS_REPO, repo_type="dataset", revision=revision,
                          allow_patterns=patterns, local_dir=str(dest))
    except hf_errors.LocalEntryNotFoundError as err:
        # What the hub client raises when offline (or HF_HUB_OFFLINE=1) and nothing is cached.
        raise DefectlabError(f"cannot download {DS_REPO} ({product}): offline or the hub is unreachable, "
                             "and no cached copy; connect to the internet (and unset HF_HUB_OFFLINE)") from err
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError) as err:
        raise DefectlabError(f"hub refused {DS_REPO} (revision {revision or 'main'}): {_first_line(err)}") from err
    except (hf_errors.HfHubHTTPError, OSError) as err:
        raise DefectlabError(f"download of {DS_REPO} ({product}) failed: {_first_line(err)}") from err
    root = dest / DS_FOLDER
    if not any((root / product / "image").rglob("*.png")):
        raise DefectlabError(f"download finished but {root / product / 'image'} has no images "
                             f"(has the layout of {DS_REPO} changed?)")
    return root


def hub_problem(repo: str, filename: str) -> str | None:
    """Why model ``repo`` cannot come from the hub now, found fast: None when its ``filename`` is in
    the Hugging Face cache or the hub has the repo; otherwise one phrase (offline, no such repo, the
    hub unreachable) from one request with a short timeout and no retries, so a mistyped name fails
    at once instead of after the download's retries."""
    if isinstance(try_to_load_from_cache(repo, filename), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "not a folder, not cached, and the hub is offline (HF_HUB_OFFLINE is set)"
    try:
        HfApi().model_info(repo, timeout=HUB_TIMEOUT)
    except hf_errors.GatedRepoError:
        return None  # it exists: the download says how to get access
    except hf_errors.RepositoryNotFoundError:
        return "not a folder, not cached, and no such repository on the hub"
    except hf_errors.HFValidationError:
        return "not a valid hub id"
    except Exception as err:  # noqa: BLE001 - any transport error of the hub client's HTTP library
        return f"not a folder, not cached, and the hub is unreachable ({_first_line(err)})"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- archives
def _parts(name: str) -> tuple[str, ...]:
    """Path parts of an archive member, refusing anything that would land outside the destination."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DefectlabError(f"refusing archive member {name!r}: it points outside the destination folder")
    return tuple(x for x in p.parts if x not in ("", "."))


def _members(archive: Path):
    """``(opened archive, [(member, parts)])`` for zip and tar (any compression)."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        zf = zipfile.ZipFile(archive)
        return zf, [(m, _parts(m.filename)) for m in zf.infolist()]
    if name.endswith(ARCHIVE_SUFFIXES):
        tf = tarfile.open(archive, "r:*")
        out = []
        for m in tf.getmembers():
            parts = _parts(m.name)
            if m.issym() or m.islnk() or not (m.isfile() or m.isdir()):
                raise DefectlabError(f"refusing archive member {m.name!r}: links and special files "
                                     "are not extracted")
            out.append((m, parts))
        return tf, out
    raise DefectlabError(f"unsupported archive {archive}: expected one of {', '.join(ARCHIVE_SUFFIXES)}")


def fetch_mvtec(archive: Path, dest: Path | None = None, product: str | None = None, force: bool = False) -> Path:
    """Extract an MVTec AD archive (the full one or a per-product one) into ``dest`` and return the
    dataset root. With ``product``, only that product's folder is extracted. A single wrapping
    folder (``mvtec_anomaly_detection/…``) is dropped so ``dest/<product>/train`` exists.
    A product folder that already holds files is refused unless ``force``; then only the files
    the archive holds are replaced: nothing else in ``dest`` is ever deleted."""
    archive = Path(archive)
    if not archive.is_file():
        raise DefectlabError(f"archive not found: {archive}")
    dest = Path(dest or paths.DATA / "mvtec")
    try:
        handle, members = _members(archive)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise DefectlabError(f"cannot read archive {archive}: {_first_line(err)}") from err
    with handle:
        # The product folder is the top-level entry or one level below a wrapper.
        tops = {p[0] for _, p in members if p}
        is_product = any(len(p) >= 2 and p[1] in ("train", "test") for _, p in members)
        wrapper = tops.pop() if len(tops) == 1 and not is_product else None
        depth = 1 if wrapper else 0
        products = sorted({p[depth] for _, p in members if len(p) > depth + 1})
        if product is not None and product not in products:
            raise DefectlabError(f"archive {archive} has no folder {product!r}; it contains: "
                                 f"{', '.join(products) or 'nothing'}")
        chosen = [(m, p) for m, p in members if len(p) > depth and (product is None or p[depth] == product)]
        there = [dest / t for t in sorted({p[depth] for _, p in chosen}) if (dest / t).exists()
                 and (not (dest / t).is_dir() or any((dest / t).iterdir()))]
        if there and not force:
            raise DefectlabError(f"{there[0]} already exists: pass --force to replace the files that come from "
                                 "the archive (nothing else is touched), or choose another --dest")
        runs.ensure_dir(dest, "--dest")
        # Extract into a temp folder inside dest, then move the product folders into place, so an
        # interrupted extraction never leaves a half product where data.py would find it.
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            try:
                if isinstance(handle, zipfile.ZipFile):
                    for m, _ in chosen:
                        handle.extract(m, tmp)
                else:
                    handle.extractall(tmp, members=[m for m, _ in chosen], filter="data")
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
                raise (runs.write_error(err, dest, "fetch again") or  # a full disk is not a damaged archive
                       DefectlabError(f"archive {archive} is damaged or truncated: {_first_line(err)}")) from err
            merge(tmp / wrapper if wrapper else tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def merge(src: Path, dst: Path, what: str = "the archive's", then: str = "fetch again") -> None:
    """Move what ``src`` holds into ``dst``: a folder ``dst`` lacks moves whole (one rename), a file
    replaces the file of that name; anything else in ``dst`` stays."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and target.is_dir():
            merge(entry, target, what, then)
        elif entry.is_file() and target.is_file():
            os.replace(entry, target)
        else:
            raise DefectlabError(f"{target} is in the way of {what} {'folder' if entry.is_dir() else 'file'} "
                                 f"of that name: move it away and {then}")


@contextmanager
def hub_errors(repo: str, probe: str, what: str = "model"):
    """Fail fast when the hub cannot give ``repo`` (``hub_problem``: not cached, offline or
    unreachable, asked once) and turn huggingface_hub / diffusers download errors into one line
    that says how to get the model."""
    why, cause = hub_problem(repo, probe), None
    if why is None:
        try:
            yield
            return
        except (OSError, ValueError) as err:
            why, cause = ("gated: accept its licence on huggingface.co, then `hf auth login`"
                          if isinstance(err, hf_errors.GatedRepoError) else
                          "no such repository on the hub" if isinstance(err, hf_errors.RepositoryNotFoundError) else
                          "not a valid hub id" if isinstance(err, hf_errors.HFValidationError) else
                          "not in the local cache and offline" if constants.HF_HUB_OFFLINE or isinstance(
                              err, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)) else first_line(err)), err
    raise DefectlabError(
        f"{what} {repo!r} not available ({why}); looked for a local file/folder of that name and in the "
        f"Hugging Face cache {constants.HF_HUB_CACHE}; get it with `hf download {repo}` (online) or pass "
        "a local folder or .pt file (presets: tiny, mini, mini-latent, mini-scratch)") from cause
