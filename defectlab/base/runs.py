"""Run folders: ``outputs/runs/<NNN>-<name>/`` with config, classes, log, checkpoints, figures.

Everything a later stage needs is read from the run folder, so a run can be sampled or
evaluated on another machine with only the base model and this folder. Every write here is
atomic (temporary file + ``os.replace``): a killed process leaves the previous complete file.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(err, path) or err
    return path


_FULL, _DENIED = (errno.ENOSPC, errno.EDQUOT), (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(err: BaseException, path: Path, then: str = "run again") -> DefectlabError | None:
    """The one-line error for a write of ``path`` that failed for want of space or permission
    (``OSError``, or safetensors' own error type, which carries the OS error in its text); None
    for any other failure."""
    code = err.errno if isinstance(err, OSError) else None
    if isinstance(err, SafetensorError) and (found := re.search(r"os error (\d+)|code: (\d+)", str(err))):
        code = int(found.group(1) or found.group(2))
    if code in _FULL:
        return DefectlabError(f"disk full while writing {path}: free space and {then} (finished files are kept)")
    if code in _DENIED:
        return DefectlabError(f"cannot write {path}: {os.strerror(code).lower()}; make it writable or choose "
                              f"another folder, then {then} (finished files are kept)")
    return None


def ensure_dir(path: Path, what: str) -> Path:
    """Make folder ``path`` (``what`` names it for the user, e.g. ``--out``) and check that files can
    be written into it: a file in the way, a read-only disk or missing permission is one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise DefectlabError(f"{what} {path}: {blocker} is a file, not a folder: choose a folder") from err
    except OSError as err:
        if err.errno in _FULL:
            raise write_error(err, path) from err
        raise DefectlabError(f"cannot write into {what} {path}: {str(err.strerror or err).lower()}; "
                             "make it writable or pass another folder") from err
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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DefectlabError(f"malformed JSON in {path}: {err.msg} (line {err.lineno})") from err
    except UnicodeDecodeError as err:
        raise DefectlabError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8 JSON") from err


def safe_join(folder: Path, relative: str) -> Path:
    """``folder / relative`` but refuse a name that points outside ``folder`` (``..``, absolute
    paths). What a name inside the folder links to is the user's business: datasets made of
    symlinks work."""
    rel = PurePath(relative)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise DefectlabError(f"path {relative!r} escapes its folder {folder}")
    return Path(os.path.abspath(folder)) / rel


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
    ever overwrites another. The number is taken under a lock on ``base``: two processes
    creating runs at once never share one, whatever their names."""
    base = ensure_dir(Path(base or paths.RUNS), "runs folder (--runs-dir)")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    with FileLock(str(base / ".numbering.lock")):
        taken = [int(m.group(1)) for p in base.iterdir() if (m := re.match(r"(\d{3,})-", p.name))]
        folder = base / f"{max(taken, default=-1) + 1:03d}-{slug}"
        folder.mkdir()
    try:
        write_json(folder / "config.json", {"config": config, "versions": versions()})
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no run folder without its config
        raise
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
    """A run given as a path, a folder name, its number (``7`` → ``007-…``) or ``latest`` (the
    newest run that holds a checkpoint: a run that failed or is still before its first one is
    passed over)."""
    base = Path(base or paths.RUNS)
    if str(run) == "latest":
        found = [p for p in numbered(base) if latest_checkpoint(p) is not None]
        if not found:
            raise DefectlabError(f"no run with a checkpoint under {base}: fine-tune first (defectlab finetune)")
        return found[-1]
    candidate = Path(run)
    if candidate.is_dir():
        return candidate
    if base.is_dir():
        named = [p for p in base.iterdir() if p.name == str(run)]
        if str(run).isdigit() and not named:
            named = [p for p in numbered(base) if int(p.name.split("-")[0]) == int(run)]
        if len(named) > 1:
            raise DefectlabError(f"run number {run} is shared by {', '.join(sorted(p.name for p in named))} "
                                 f"under {base}: name the run by its folder name")
        if named:
            return named[0]
    raise DefectlabError(f"run not found: {run} (looked for a folder, or a name/number under {base})")


def lock(folder: Path) -> FileLock:
    """Hold this while training ``folder``: a second process (two ``--resume`` at once) gets a
    one-line error instead of writing the same checkpoints."""
    held = FileLock(str(Path(folder) / ".train.lock"))
    try:
        held.acquire(timeout=0)
    except Timeout:
        raise DefectlabError(f"run {folder} is being trained by another process (lock {held.lock_file}): "
                             "wait for it to finish, then resume") from None
    except OSError as err:
        raise write_error(err, held.lock_file, "train again") or err
    return held


def load_config(folder: Path) -> dict:
    return read_json(Path(folder) / "config.json")["config"]


def log(folder: Path, record: dict) -> None:
    """Append one JSON line; a line is written in one call so a crash loses at most that line."""
    path = Path(folder) / "log.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
    except OSError as err:
        raise write_error(err, path, "resume the run") or err


def truncate_log(folder: Path, step: int) -> None:
    """Drop the records after ``step`` (what a run did between its last checkpoint and a kill)
    and a line cut by the kill, so a resumed run logs each step once."""
    if (Path(folder) / "log.jsonl").is_file():
        kept = [r for r in read_log(folder) if not isinstance(r.get("step"), int) or r["step"] <= step]
        write_text(Path(folder) / "log.jsonl", "".join(json.dumps(r, default=_jsonable) + "\n" for r in kept))


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
    final = checkpoint_dir(folder, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / STATE_FILE))
        if optimizer is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, str(tmp / OPTIM_FILE))
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, default=_jsonable))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        if root.is_dir():
            _prune(root, keep=0, protect=())  # only the temp folder goes: earlier checkpoints stay
        # suggest --resume only where a checkpoint is left to resume from (a new run without one is removed)
        then = (f"continue with --resume {Path(folder)}" if latest_checkpoint(folder) is not None
                else "start the run again (it has no checkpoint to resume from)")
        raise write_error(err, final, then) or err
    _prune(root, keep, protect)
    return final


def marked(folder: Path, name: str = "best") -> str | None:
    """The checkpoint folder name ``checkpoints/<name>.json`` points at (None without the file)."""
    path = Path(folder) / CHECKPOINTS / f"{name}.json"
    if not path.is_file():
        return None
    entry = read_json(path)
    if not isinstance(entry, dict) or not str(entry.get("checkpoint", "")).isdigit():
        raise DefectlabError(f"{path} names no checkpoint (expected {{\"checkpoint\": \"<step>\"}}): "
                             "delete it and the newest checkpoint is used")
    return str(entry["checkpoint"])


def _prune(root: Path, keep: int, protect: tuple[str, ...]) -> None:
    keepers = {m for name in protect if (m := marked(root.parent, name))}
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
    if which not in ("best", "latest") and not str(which).isdigit():
        raise DefectlabError(f"checkpoint must be best, latest or a step number (got {which!r})")
    if which == "best" and (best := marked(folder, "best")) and (root / best).is_dir():
        return root / best
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
