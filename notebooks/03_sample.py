# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Sample the fine-tuned model
#
# A grid of generated images (columns are defect classes, rows are samples), exported as PNGs
# with a manifest for 04, then an explorer to try classes, steps, seeds and guidance. Image `i`
# of class `c` is seeded from `(seed, c, i)`: the explorer shows exactly the exported images for
# the same settings.

# %% tags=["parameters"]
run: str = "latest"  # run folder, name or number made by 02 (latest means the newest under outputs/runs)
checkpoint: str = "best"  # best | latest | step number
classes: str = ""  # comma-separated class names ("" means all)
per_class: int = 8  # images per class
scheduler: str = "ddpm"  # ddpm | ddim | dpmsolver (DPM-Solver++)
steps: int = 0  # denoising steps (0 means the scheduler default: ddpm 250, ddim 50, dpmsolver 25)
guidance: float = 1.5  # classifier-free guidance scale (1 means off: one forward per step)
sample_seed: int = 0  # image i of class c is seeded from (seed, c, i)
explorer_images: int = 4  # images per Run in the explorer
pairs_per_class: int = 0  # image + mask pairs per class drawn inside training masks on defect-free images (0 means none; 04 evaluates them)
formats: str = "png"  # grid figure formats, comma-separated: png, pdf, svg
settings: str = ""  # other SampleConfig fields as JSON, e.g. {"timestep_spacing": "leading"} (batch runs put them here)

# %%
from defectlab.core import restore, viz
from defectlab.stages import sample, synthesize
from defectlab.reports import report
from defectlab.app import params
from defectlab.reports.explorer import Explorer

run_folder = report.resolve_run(run)
config = params.with_settings(sample.SampleConfig(
    run=str(run_folder), checkpoint=checkpoint, classes=classes, per_class=per_class, scheduler=scheduler,
    steps=steps, guidance=guidance, seed=sample_seed, formats=formats), settings)

# %% [markdown]
# ## The fine-tuned model
# Loaded once: the sample grid and the explorer below both use it.

# %%
restored = restore.restore(run_folder, config.checkpoint, numerics=config.numerics)

# %% [markdown]
# ## Sample grid

# %%
samples = sample.run(config, restored=restored)
viz.show(report.sample_figure(samples))
samples

# %% [markdown]
# ## Image + mask pairs
# With `pairs_per_class`, the model also draws each class inside the masks of its training
# images, carried onto the product of defect-free images (`defectlab synthesize`: the mask moves
# with the product's pose, the rest of the image stays as it is). A run trained on `--zoom`
# windows draws the window around the mask. Real training images on top, pairs below.

# %%
if pairs_per_class:
    pairs = synthesize.run(synthesize.MaskSampleConfig(
        run=str(run_folder), checkpoint=checkpoint, classes=classes, per_class=pairs_per_class, scheduler=scheduler,
        steps=steps, guidance=guidance, seed=sample_seed))
    pairs_figure = report.real_vs_generated_for_run(run_folder, pairs)
    viz.save_figure(pairs_figure, report.figures_folder(run_folder), f"pairs-{pairs.name}", formats)
    viz.show(pairs_figure)

# %% [markdown]
# ## Explorer
# The settings above, with a fast sampler when they are slow (DDPM, or more than 50 steps:
# DPM-Solver++, 25 steps). It starts with the first class; pressing **Run** samples what the
# controls say, with a progress bar, and a setting seen before shows at once. A saved notebook
# shows the grid as an image where the widget cannot run.

# %%
explorer = Explorer.from_config(restored, config, n=explorer_images)
explorer.widget()
