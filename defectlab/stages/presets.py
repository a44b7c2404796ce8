"""Named recipes for the command line: ``--preset demo`` on finetune, sample, synthesize and
benchmark is exactly what ``make demo`` runs (flags given beside it still win). Each value is
written here once; ``demo.py`` builds its notebook parameters from the same table."""
from __future__ import annotations

from ..base.errors import DefectlabError

# make demo on the shipped 64 px latent base and the embedded dataset's drawing version 2 (per-image
# albedo, texture and light, so a pasted defect carries the wrong light): DiffFit on the 64 px
# window around each defect (zoom 4), defect-weighted loss, then image + mask pairs at DDIM 20 and
# guidance 7, benchmarked against copy-paste on version-2 test images of another seed with 2 real
# images per class; the benchmark's generated pairs are the copies redrawn by the run from 30 %
# noise with the copy's fine structure kept (refine + detail: the shape of the copy, the light
# and colour of the model).
_SAMPLING = {"scheduler": "ddim", "steps": 20, "guidance": 7.0}
DEMO = {
    "finetune": {"data": "synthetic-v2", "model": "mini-latent", "method": "difffit", "image_size": 64, "zoom": 4,
                 "mask_loss": 20.0, "lr": 3e-3, "epochs": 100, "batch_size": 8, "grad_accum": 1, "val_per_class": 1,
                 "val_timesteps": 4, "val_every": 20},
    "sample": dict(_SAMPLING),
    "synthesize": {"per_class": 12, **_SAMPLING},
    "benchmark": {"per_class": 12, **_SAMPLING, "source": "refine", "strength": 0.3, "detail": True, "gen_seeds": 3,
                  "clf_seeds": 3, "real_per_class": 2, "view_size": 64, "classifier_steps": 150, "realism_folds": 3,
                  "realism_repeats": 1},
}
PRESETS = {"demo": DEMO}


def commands() -> set[str]:
    """The CLI commands some preset fills."""
    return {command for preset in PRESETS.values() for command in preset}


def settings(name: str, command: str) -> dict:
    """The settings preset ``name`` gives ``command`` (one line naming the choices if unknown)."""
    if name not in PRESETS:
        raise DefectlabError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].get(command, {}))


def describe(command: str) -> str:
    """``--help`` text: what each preset sets for ``command``."""
    def flag(key: str, value) -> str:
        name = key.replace("_", "-")
        if isinstance(value, bool):
            return f"--{name}" if value else f"--no-{name}"
        return f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"
    return "; ".join(f"{name}: " + " ".join(flag(k, v) for k, v in p[command].items())
                     for name, p in PRESETS.items() if command in p)
