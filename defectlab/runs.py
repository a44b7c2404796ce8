"""Run folders: ``outputs/runs/<NNN>-<name>/`` with config, classes, log, checkpoints, figures.

Everything a later stage needs is read from the run folder, so a run can be sampled or
evaluated on another machine with only the base model and this folder. Every write here is
atomic (temporary file + ``os.replace``): a killed process leaves the previous complete file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from . import paths
from .errors import DefectlabError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainable.safetensors"     # only the trained parameters
OPTIM_FILE = "optimizer.safetensors"     # optimizer tensors, flattened
META_FILE = "meta.json"                  # step, epoch, RNG states, optimizer layout


# ----------------------------------------------------------------------------- atomic I/O
_UMASK = os.umask(0)
os.umask(_UMASK)

def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` then move ``tmp`` onto ``path``; a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; results are not
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == 28:  # ENOSPC
            raise DefectlabError(f"disk full while writing {path}: free space and run again "
                                 "(finished files are kept)") from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DefectlabError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DefectlabError(f"not a valid safetensors file: {path} ({err})") from err


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DefectlabError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DefectlabError(f"malformed JSON in {path}: {err.msg} (line {err.lineno})") from err


def safe_join(folder: Path, relative: str) -> Path:
    """``folder / relative`` but refuse anything that escapes ``folder`` (``../``, absolute paths)."""
    folder = Path(folder).resolve()
    target = (folder / relative).resolve()
    if target != folder and folder not in target.parents:
        raise DefectlabError(f"path {relative!r} escapes its folder {folder}")
    return target


# ----------------------------------------------------------------------------- run folders
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "diffusers", "accelerate", "peft", "torchvision", "defectlab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def create(name: str, config: Any, base: Path | None = None) -> Path:
    """Make ``<base>/<NNN>-<name>/`` with ``config.json``; a new number every time, so no run
    ever overwrites another."""
    base = Path(base or paths.RUNS)
    base.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    while True:
        taken = [int(m.group(1)) for p in base.iterdir() if (m := re.match(r"(\d{3,})-", p.name))]
        folder = base / f"{max(taken, default=-1) + 1:03d}-{slug}"
        try:
            folder.mkdir()
            break
        except FileExistsError:  # another process took the number first
            continue
    write_json(folder / "config.json", {"config": config, "versions": versions()})
    return folder


def update_config(folder: Path, **changes: Any) -> None:
    """Record settings resolved after ``create`` (e.g. what ``auto`` turned out to mean)."""
    saved = read_json(folder / "config.json")
    saved["config"].update(changes)
    write_json(folder / "config.json", saved)


def numbered(base: Path | None = None) -> list[Path]:
    """Run folders ``<NNN>-<name>`` under ``base``, oldest first."""
    base = Path(base or paths.RUNS)
    found = [p for p in base.iterdir() if p.is_dir() and re.match(r"\d{3,}-", p.name)] if base.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[0]))


def resolve(run: str | Path, base: Path | None = None) -> Path:
    """A run given as a path, a folder name, its number (``7`` → ``007-…``) or ``latest``."""
    base = Path(base or paths.RUNS)
    if str(run) == "latest":
        found = numbered(base)
        if not found:
            raise DefectlabError(f"no run folders under {base}: fine-tune first (defectlab finetune)")
        return found[-1]
    candidate = Path(run)
    if candidate.is_dir():
        return candidate
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if p.name == str(run) or (str(run).isdigit() and p.name.startswith(f"{int(run):03d}-")):
                return p
    raise DefectlabError(f"run not found: {run} (looked for a folder, or a name/number under {base})")


def load_config(folder: Path) -> dict:
    return read_json(Path(folder) / "config.json")["config"]


def log(folder: Path, record: dict) -> None:
    """Append one JSON line; a line is written in one call so a crash loses at most that line."""
    with open(Path(folder) / "log.jsonl", "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")


def read_log(folder: Path) -> list[dict]:
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
    return out


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dir(folder: Path, step: int) -> Path:
    return Path(folder) / CHECKPOINTS / f"{step:07d}"


def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], meta: dict,
                    optimizer: dict[str, torch.Tensor] | None = None, keep: int = 2,
                    protect: tuple[str, ...] = ("best",)) -> Path:
    """Write ``checkpoints/<step>/`` complete in a temp folder, then rename it into place."""
    root = Path(folder) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(folder, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / STATE_FILE))
        if optimizer is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, str(tmp / OPTIM_FILE))
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, default=_jsonable))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, protect)
    return final


def _prune(root: Path, keep: int, protect: tuple[str, ...]) -> None:
    keepers = set()
    for name in protect:
        link = root / f"{name}.json"
        if link.is_file():
            keepers.add(json.loads(link.read_text())["checkpoint"])
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    for p in steps[:-keep] if keep > 0 else []:
        if p.name not in keepers:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # temp folders of a killed writer
        if p.name.startswith(".") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def mark(folder: Path, name: str, step: int, **info: Any) -> None:
    """Point ``checkpoints/<name>.json`` (e.g. ``best``) at a checkpoint."""
    write_json(Path(folder) / CHECKPOINTS / f"{name}.json", {"checkpoint": f"{step:07d}", "step": step, **info})


def latest_checkpoint(folder: Path) -> Path | None:
    root = Path(folder) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / META_FILE).is_file())
    return steps[-1] if steps else None


def find_checkpoint(folder: Path, which: str = "best") -> Path:
    """``best`` (falls back to latest), ``latest``, or a step number."""
    folder = Path(folder)
    root = folder / CHECKPOINTS
    if which == "best" and (root / "best.json").is_file():
        path = root / read_json(root / "best.json")["checkpoint"]
        if path.is_dir():
            return path
    if which in ("best", "latest"):
        path = latest_checkpoint(folder)
    else:
        path = checkpoint_dir(folder, int(which))
    if path is None or not (path / STATE_FILE).is_file():
        raise DefectlabError(f"no checkpoint in run folder {folder} (train it first, or check --checkpoint)")
    return path


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict = {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        entry = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                name = f"{pid}.{key}"
                tensors[name] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
        skeleton["state"][str(pid)] = entry
    return tensors, skeleton


def unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    state = {}
    for pid, slots in skeleton["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in slots.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}
