"""Product adaptation: the product's defect-free images join a fine-tune as the unconditional
(null) class, so the model learns what the product looks like from the images every user has in
abundance, and the defect classes from the few.

The null class is what classifier-free guidance subtracts, so guidance then pushes from *the
product* towards *the defect* (rather than from an empty prior), and a free sample of the null
class ("good") shows a defect-free product. The run records what it used in ``product.json``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .sources import DefectData, Sample

GOOD = "good"           # the name the null class samples under (``sample --classes good``)
RECORD = "product.json"  # in the run folder: how many defect-free images trained, from where


def good_samples(data: DefectData, count: int, label: int) -> tuple[list[Sample], dict]:
    """``count`` of the dataset's defect-free images (-1 = all, 0 = none) as samples with the null
    ``label``, and the record of what was used. A product without defect-free images is said in
    one line and the fine-tune continues without them (``record["used"]`` 0, with the reason)."""
    if count == 0:
        return [], {"asked": 0, "used": 0, "note": "off (--good-images 0)"}
    if not data.good:
        msg = f"product adaptation: {data.root} has no defect-free images of {data.product}; training without them"
        warnings.warn(msg, stacklevel=2)
        return [], {"asked": count, "used": 0, "note": msg}
    picked = data.good if count < 0 else data.good[:count]
    samples = [Sample(Path(p), None, GOOD, label, data.product) for p in picked]
    return samples, {"asked": count, "used": len(samples), "available": len(data.good),
                     "files": [_rel(p, data.root) for p in picked], "label": label}


def _rel(path, root) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def used(config: dict, record: dict | None) -> int:
    """Defect-free images a run trained on (0 for runs from before product adaptation)."""
    return int((record or {}).get("used", 0)) if config.get("good_images", 0) else 0
