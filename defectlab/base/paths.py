"""Every path the project uses, defined once (cookiecutter-data-science style).

``DEFECTLAB_HOME`` moves ``data/`` and ``outputs/`` somewhere else (tests, shared disks); the
package's own shipped files stay under ``PACKAGE``.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # defectlab/ (this file is defectlab/base/paths.py)
ROOT = Path(os.environ.get("DEFECTLAB_HOME") or PACKAGE.parent)
DATA = ROOT / "data"
SYNTHETIC = DATA / "synthetic"          # the embedded default dataset, regenerated from a seed
OUTPUTS = ROOT / "outputs"
RUNS = OUTPUTS / "runs"                 # one folder per fine-tuning run
MODELS = OUTPUTS / "models"             # locally built base models (the `tiny` preset)
CHECKOUT = PACKAGE.parent               # the repository root (committed run folders: pretrain/)
NOTEBOOKS = CHECKOUT / "notebooks"
ASSETS = PACKAGE / "assets"             # files shipped inside the package (the `mini` base model)
