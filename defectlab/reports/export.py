"""Export a fine-tuned run as a diffusers folder others can load: ``defectlab export --run … --out DIR``.

The folder has DiTPipeline's layout: ``transformer/`` (a plain ``DiTTransformer2DModel``: LoRA
merged, DiffFit's γ folded into the layers it scales, the trained class table), ``scheduler/``
(DDIM on the run's training schedule), ``vae/`` (latent bases), ``model_index.json`` (diffusers' own
keys only, so DiTPipeline loads it without a warning), ``defectlab.json`` (``model.SIDECAR``:
``id2label`` = the run's class names, ``defectlab_numerics``, ``defectlab_image_size``; it also marks the
folder as an export, which a later export may replace) and ``README.md``, a model card with the run's
settings and metrics. ``--push-to-hub REPO`` uploads it. An ``--out`` folder that holds other files
is refused unless ``--force``, which writes the export into it and keeps the files of other names.

What DiTPipeline fixes, and what the export does about it:

- its null class is always 1000: the K trained rows are followed by copies of the run's null row
  up to row 1000 (class ids K..999 sample unconditionally);
- it always decodes with a VAE. A pixel-space run (the ``tiny`` and ``mini`` bases) has none,
  and no ``AutoencoderKL`` decodes as the identity (its decoder ends in GroupNorm → SiLU → conv),
  so such a run is exported as the same folder without ``vae/`` and with ``_class_name``
  ``DiTTransformer2DModel`` (the layout of the shipped mini); the card says how to sample it
  (``defectlab sample --run base --model DIR``);
- it computes diffusers' timestep frequencies: a run trained with the original DiT's
  (``numerics`` original) samples differently there, which the card says;
- it has no mask input: mask-conditioned runs are refused.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from diffusers import DiTPipeline
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..base import folders, runs
from ..base.errors import DefectlabError, first_line
from ..data import fetch
from ..core import restore, sampler
from ..core.model import PROMPTS, SIDECAR
from ..stages import evaluate
from . import report

NULL = 1000  # DiTPipeline's unconditional class id (hard-coded there)
EXPORT_NAMES = ("transformer", "scheduler", "vae", "model_index.json", SIDECAR, PROMPTS, "README.md")  # all an export writes


@dataclass
class ExportConfig:
    run: str = "latest"            # run folder/name/number, or latest
    checkpoint: str = "best"       # best | latest | step number
    out: str = ""                  # destination folder ("" = <run>/export); an earlier export there is replaced whole
    force: bool = False            # write into an --out folder holding other files (the export's names replaced, the rest kept)
    push_to_hub: str = ""          # hub repo id (user/name) to upload the folder to: needs internet and `hf auth login`
    private: bool = True           # a repo that --push-to-hub creates is private


def run(cfg: ExportConfig) -> Path:
    """Write the export folder (see module doc) and return it; upload it when ``push_to_hub``."""
    repo = _hub_repo(cfg.push_to_hub)  # before any work: a bad id or no internet is one line
    folder = runs.resolve(cfg.run)
    out = Path(cfg.out) if cfg.out else folder / "export"
    foreign = _foreign(out, cfg.force)
    if runs.load_config(folder).get("mask_condition"):
        raise DefectlabError(f"run {folder.name} is mask-conditioned: DiTPipeline has no mask input, so it cannot "
                             "be exported (sample it with defectlab synthesize)")
    restored = restore.restore(folder, cfg.checkpoint, device="cpu")
    net = restore.plain(restored.model, NULL)
    numerics, latent = restored.config["numerics"], hasattr(restored.base.codec, "vae")
    size = restored.config.get("image_size") or restored.base.default_image_size
    scheduler = sampler.make_scheduler("ddim", restored.base.scheduler_config,
                                       spacing=sampler.spacing_for("ddim", numerics))
    prompts = getattr(restored.model, "prompts", None)
    sidecar = {"id2label": {str(i): c for i, c in enumerate(restored.classes)}, "defectlab_numerics": numerics,
               "defectlab_image_size": size, "defectlab_run": folder.name}
    with _staging(out) if foreign else folders.building(out) as tmp:
        if prompts is not None:  # VPT: no pipeline can give the prompts, so no model_index.json invites one
            net.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
            if latent:
                restored.base.codec.vae.save_pretrained(tmp / "vae")
            runs.save_tensors(tmp / PROMPTS, {"weight": prompts.weight.detach().float().contiguous()})
            sidecar["defectlab_prompts"] = prompts.settings
        elif latent:  # model_index.json as DiTPipeline writes it: any key of ours there, it warns about
            DiTPipeline(transformer=net, vae=restored.base.codec.vae, scheduler=scheduler).save_pretrained(tmp)
        else:  # DiTPipeline cannot decode pixels: the layout model.load reads, without the pipeline's name
            net.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
            runs.write_json(tmp / "model_index.json", {"_class_name": "DiTTransformer2DModel"})
        runs.write_json(tmp / SIDECAR, sidecar)
        runs.write_text(tmp / "README.md", model_card(restored, latent, size, net.config.sample_size,
                                                      Path(restored.checkpoint).name))
    if repo:
        push(out, repo, cfg.private, folder.name)
    return out


def _foreign(out: Path, force: bool) -> bool:
    """Whether ``out`` holds files that no export wrote: anything but ``EXPORT_NAMES``, or those
    without an export's mark (``SIDECAR``; older exports: ``defectlab_run`` in model_index.json).
    Refused in one line unless ``force``; an earlier export alone is replaced whole."""
    if out.exists() and not out.is_dir():
        raise DefectlabError(f"--out {out} is a file: choose a folder (new, empty, or an earlier export)")
    names = {p.name for p in out.iterdir() if not p.name.startswith(".export-")} if out.is_dir() else set()
    try:
        ours = (out / SIDECAR).is_file() or "defectlab_run" in json.loads((out / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False  # no readable model_index.json of an older export
    if not names or (ours and names <= set(EXPORT_NAMES)):
        return False
    if not force:
        raise DefectlabError(f"--out {out} holds files that no defectlab export wrote: choose a new or empty "
                             "folder, or pass --force to write the export into it (files of other names are kept)")
    print(f"defectlab: --force: writing the export into {out}, which holds other files: those named "
          f"{', '.join(EXPORT_NAMES)} are replaced, the rest kept", file=sys.stderr)
    return True


@contextmanager
def _staging(out: Path):
    """Build the export in a temporary folder inside ``out``, then move its files into ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        yield tmp
        fetch.merge(tmp, out, "the export's", "export again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the model card
def model_card(restored: restore.Restored, latent: bool, size: int, native: int, checkpoint: str) -> str:
    """README.md: what was trained, how to sample it (and where DiTPipeline differs), metrics."""
    cfg, folder = restored.config, Path(restored.folder)
    summary = report.run_summary(folder)
    ids = ", ".join(f"{i} {c}" for i, c in enumerate(restored.classes))
    hub_base = "/" in cfg["model"] and not Path(cfg["model"]).exists()
    lines = ["---", "library_name: diffusers", "tags: [defectlab, dit, class-conditional, defect-images]",
             *([f"base_model: {cfg['model']}"] if hub_base else []), "---", "",
             f"# {folder.name}: {cfg['product']} defects from a fine-tuned DiT", "",
             f"Fine-tuned with defectlab from `{cfg['model']}` on `{cfg['data']}` "
             f"({cfg['product']}), method `{cfg['method']}`, {size} px, checkpoint {checkpoint} "
             f"(best validation loss {_fmt(summary['best_val_loss'])}). Classes (id name): {ids}. "
             f"Ids {len(restored.classes)}…{NULL - 1} are copies of the unconditional row; {NULL} is the null "
             f"class DiTPipeline guides with. Licence: that of the base model.", "", "## Sampling", ""]
    if getattr(restored.model, "prompts", None) is not None:
        p = restored.model.prompts.settings
        lines += [f"DiTPipeline cannot sample this model: it was fine-tuned by visual prompt tuning ({p['tokens']} "
                  f"{p['depth']} prompt tokens, `{PROMPTS}`), an input diffusers' DiT does not have, so the folder "
                  "has no model_index.json. Sample it with defectlab installed:", "",
                  "```bash", "defectlab sample --run base --model THIS_FOLDER --classes 0,1 --per-class 8 "
                  "--scheduler ddim", "```", ""]
    elif latent:
        lines += ["```python", "from diffusers import DiTPipeline", "",
                  f'pipe = DiTPipeline.from_pretrained("THIS_FOLDER_OR_REPO", id2label={dict(enumerate(restored.classes))!r})',
                  f'images = pipe(class_labels=pipe.get_label_ids(["{restored.classes[0]}"]), '
                  "num_inference_steps=50, guidance_scale=1.5).images", "```", "",
                  "This is `defectlab sample --scheduler ddim --cfg-channels all`: with the same per-image generators "
                  "(`defectlab.core.sampler.generators(seed, class_name, indices)`) the images are the same.", ""]
    else:
        lines += [f"DiTPipeline cannot sample this model: it is a pixel-space DiT ({size} px, 3 channels, no VAE), "
                  "and DiTPipeline always decodes with a VAE, which no AutoencoderKL can do as the identity. "
                  "Sample it with defectlab installed:", "",
                  "```bash", "defectlab sample --run base --model THIS_FOLDER --classes 0,1 --per-class 8 "
                  "--scheduler ddim", "```", ""]
    if how := cfg.get("distilled"):  # a student: its sampler is part of what it learned
        lines += [f"**Distilled.** A {how['mode']} student of `{how['teacher']}` (defectlab distill): it samples with "
                  f"DDIM, {how['steps']} steps, `{how['timestep_spacing']}` spacing, guidance 1 — the teacher's "
                  f"guidance {how['teacher_guidance']:g} is inside it; `num_inference_steps={how['steps']}, "
                  "guidance_scale=1` in DiTPipeline.", ""]
    if cfg["numerics"] == "original":
        lines += ["**Numerics.** This model was trained with the original DiT's timestep frequencies "
                  "(divided by half); DiTPipeline's DiT always divides by half − 1, so its samples of this model "
                  "are not what it learned. `defectlab sample --run base --model THIS_FOLDER` computes as it "
                  f"was trained (it reads `defectlab_numerics` in {SIDECAR}).", ""]
    if latent and size != native * restored.base.codec.downsample:
        lines += [f"**Size.** Trained at {size} px; the transformer's native size is "
                  f"{native * restored.base.codec.downsample} px, which is what DiTPipeline samples at (its position "
                  f"table follows `sample_size`). defectlab samples at {size} px (`defectlab_image_size`).", ""]
    lines += ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in summary.items()], "",
              "<details><summary>config.json</summary>", "", "```json", json.dumps(cfg, indent=1), "```",
              "</details>", "", "## Metrics", ""]
    if (folder / "metrics.json").is_file():
        lines += [report.caption(evaluate.EvalResult.load(folder)), "",
                  (folder / "metrics.md").read_text() if (folder / "metrics.md").is_file() else ""]
    else:
        lines += [f"Not evaluated (`defectlab evaluate --run {folder.name}`)."]
    return "\n".join(lines).rstrip() + "\n"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the hub
def _hub_repo(repo: str) -> str:
    if not repo:
        return ""
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise DefectlabError(f"push_to_hub: {repo!r} is not a hub repo id (user/name): {first_line(err)}") from err
    if constants.HF_HUB_OFFLINE:
        raise DefectlabError("push_to_hub needs internet, and HF_HUB_OFFLINE is set: unset it, or export without "
                             "--push-to-hub and upload the folder later (`hf upload REPO DIR`)")
    return repo


def push(out: Path, repo: str, private: bool, run_name: str) -> None:
    """Create ``repo`` (when new) and upload the export folder to it."""
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), commit_message=f"defectlab export of {run_name}")
    except (OSError, ValueError) as err:  # hub HTTP errors are OSErrors
        raise DefectlabError(f"upload to {repo} failed ({first_line(err)}); the export is in {out}: "
                             f"`hf upload {repo} {out}` retries") from err
