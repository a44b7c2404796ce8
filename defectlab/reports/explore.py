"""``defectlab explore``: a run's explorer (``explorer.py``: class, sampler, steps, seed, guidance,
a Run button, the grid) as a web page served by Voilà on 127.0.0.1.

``run(ExploreConfig)`` writes a two-cell notebook for the run (``<run>/explore/explorer.ipynb``,
atomically; rewritten each time, it only holds the run's name and settings) and serves it with
Voilà, which runs the notebook in a kernel and shows only its outputs: the widget, no code. The
page is ready when the model has loaded (seconds on a CPU for the shipped bases). ``--no-serve``
writes the notebook and prints the command instead (``jupyter lab`` opens it too).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from ..base import runs
from ..base.errors import DefectlabError
from ..stages import presets

_DEMO = presets.DEMO["sample"]


@dataclass
class ExploreConfig:
    run: str = "latest"                          # run folder/name/number, or latest
    scheduler: str = _DEMO["scheduler"]          # the explorer's first sampler (ddpm | ddim | dpmsolver)
    steps: int = _DEMO["steps"]                  # its first number of denoising steps
    guidance: float = _DEMO["guidance"]          # its first guidance scale
    seed: int = 0                                # its first seed
    images: int = 4                              # images per Run
    port: int = 8866                             # Voilà's port on 127.0.0.1
    open_browser: bool = True                    # open the page in a browser (off: print the address only)
    serve: bool = True                           # serve the page (off: write the notebook and print the command)


def notebook(folder: Path, cfg: ExploreConfig) -> nbformat.NotebookNode:
    """The explorer notebook of run ``folder``: settings, then the widget."""
    settings = {k: getattr(cfg, k) for k in ("scheduler", "steps", "guidance", "seed")}
    code = ("from defectlab.core import restore\n"
            "from defectlab.stages import sample\n"
            "from defectlab.reports.explorer import Explorer\n\n"
            f"restored = restore.restore({str(folder)!r})\n"
            f"config = sample.SampleConfig(run={str(folder)!r}, **{json.dumps(settings)})\n"
            f"Explorer.from_config(restored, config, n={cfg.images}).widget()")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {folder.name}: explorer"), nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def command(path: Path, cfg: ExploreConfig) -> list[str]:
    """The Voilà command line that serves ``path``."""
    return [sys.executable, "-m", "voila", str(path), f"--port={cfg.port}", "--Voila.ip=127.0.0.1", "--theme=light",
            "--show_tracebacks=True", *([] if cfg.open_browser else ["--no-browser"])]


def run(cfg: ExploreConfig) -> Path:
    """Write the run's explorer notebook and serve it (see module doc); returns the notebook."""
    if cfg.images < 1 or cfg.steps < 1 or not 1 <= cfg.port <= 65535:
        raise DefectlabError(f"images and steps must be ≥ 1 and port in 1..65535 (got {cfg.images}, {cfg.steps}, "
                             f"{cfg.port})")
    folder = runs.resolve(cfg.run)
    if runs.latest_checkpoint(folder) is None:
        raise DefectlabError(f"run {folder.name} has no checkpoint yet: nothing to explore")
    path = folder / "explore" / "explorer.ipynb"
    runs.ensure_dir(path.parent, "the run folder")
    runs.write_text(path, nbformat.writes(notebook(folder, cfg)))
    cmd = command(path, cfg)
    if not cfg.serve:
        print(" ".join(cmd))
        return path
    if shutil.which("voila") is None and subprocess.run([sys.executable, "-c", "import voila"]).returncode:
        raise DefectlabError("Voilà is not installed: pip install 'defectlab[notebooks]' (or open "
                             f"{path} in jupyter lab)")
    print(f"explorer of {folder.name} on http://127.0.0.1:{cfg.port}/ (Ctrl-C stops it)", flush=True)
    try:
        subprocess.run(cmd, check=False)
    except KeyboardInterrupt:
        pass
    return path
