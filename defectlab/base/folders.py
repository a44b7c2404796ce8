"""Whole folders written atomically (a model folder, an export): built complete in a temporary
folder beside the target, then swapped in, so a kill leaves the previous folder or none, never
half of one. (Single files: ``runs.atomic_write``.)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """``with building(out) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``out``
    (an existing ``out`` is removed only after the new folder is complete)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0o22)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; a model folder is not
        for f in tmp.rglob("*"):  # nor its files (diffusers' save_pretrained writes weights 0600)
            if f.is_file() and not f.is_symlink() and (mode := f.stat().st_mode) & 0o444 & ~umask != 0o444 & ~umask:
                f.chmod(mode | (0o444 & ~umask))
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
