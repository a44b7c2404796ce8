"""Progress bars that read well where they end up, for every stage: ``from .progress import tqdm``.

A live bar (``tqdm.auto``: a widget in a notebook, a redrawn line in a terminal) only where
someone watches it. Elsewhere (notebooks executed by papermill, which sets no frontend; CI and
log files, where stderr is no terminal) plain ``tqdm.std`` text at most every ``MININTERVAL``
seconds, and nested bars (``leave=False``) stay silent; in a kernel on stdout, so a notebook does
not show progress in the pink of an error. ``batch.py`` sets ``PLAIN`` for the
kernels it starts. A bar closed after a normal end shows 100 %: an early stop (patience, a
step limit) shortens the total to the work done, so a saved notebook never ends on 40 %.
"""
from __future__ import annotations

import os
import sys

from tqdm import std
from tqdm.auto import tqdm as auto_tqdm

PLAIN = "DEFECTLAB_PLAIN_PROGRESS"   # "1": plain text bars (batch.py sets it for papermill kernels)
MININTERVAL = 30.0                   # seconds between plain-text updates


def _in_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # imported by any kernel; not imported here for nothing
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def interactive() -> bool:
    """Whether a live bar has a viewer: an IPython kernel with a frontend (not papermill: batch.py
    sets ``PLAIN``), or a terminal on stderr."""
    if os.environ.get(PLAIN) == "1":
        return False
    return _in_kernel() or sys.stderr.isatty()


class _EndsAtTotal:
    """``close()`` after fewer steps than planned (early stop) shows the work done as complete;
    a bar left by an exception (``with bar:``) keeps showing where it stopped."""
    _failed = False

    def __exit__(self, exc_type, exc_value, traceback):
        self._failed = exc_type is not None
        return super().__exit__(exc_type, exc_value, traceback)

    def close(self):
        if not self.disable and not self._failed and self.total and self.n < self.total:
            self.total = self.n
            if hasattr(self, "container"):  # tqdm.notebook: the widget keeps its own maximum
                self.container.children[1].max = self.n
            self.refresh()
        super().close()


class PlainBar(_EndsAtTotal, std.tqdm):
    """Text lines at most every ``mininterval``: a new postfix or description waits for the next one."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


class LiveBar(_EndsAtTotal, auto_tqdm):
    pass


def tqdm(iterable=None, *, disable: bool = False, leave: bool = True, **kwargs):
    """A ``tqdm(iterable, **kwargs)`` of the kind this process should show (see module doc)."""
    if interactive():
        return LiveBar(iterable, disable=disable, leave=leave, **kwargs)
    if "file" not in kwargs and _in_kernel():  # a notebook shows stderr as an error (pink): progress is not one
        kwargs["file"] = sys.stdout
    return PlainBar(iterable, disable=disable or not leave, leave=leave, mininterval=MININTERVAL, ascii=True,
                    **kwargs)
