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
# # 01 · Explore a defect dataset
#
# Which layout was found, the defect classes and how many images each has, image sizes, and
# examples of every class with its mask. Works on the embedded default (`data="synthetic"`,
# generated on first use) and on an MVTec AD or DefectSpectrum DS-MVTec root folder.

# %% tags=["parameters"]
data: str = "synthetic"  # "synthetic" (embedded default), "synthetic-v2" (drawn with version 2) or a dataset root folder (MVTec AD or DS-MVTec)
product: str = "hazelnut"  # product folder name
show_per_class: int = 6  # examples shown per defect class
show_size: int = 96  # side in px of each example in the figure
with_masks: bool = True  # overlay the defect masks in red
figures_dir: str = ""  # folder for the figures ("" means outputs/figures)
formats: str = "png"  # figure formats, comma-separated: png, pdf, svg
settings: str = ""  # other DataConfig fields as JSON, e.g. {"test_fraction": 0.5} (batch runs put them here)

# %%
from pathlib import Path

from defectlab.data import sources as datasets
from defectlab.base import paths
from defectlab.core import viz
from defectlab.app import params

figures = Path(figures_dir) if figures_dir else paths.OUTPUTS / "figures"
config = params.with_settings(datasets.DataConfig(data=data, product=product), settings)

# %% [markdown]
# ## Layout, classes, counts and image sizes

# %%
print(datasets.format_info(datasets.info(data)))

# %% [markdown]
# ## Fine-tuning / held-out split per class
# The held-out test images are never used for fine-tuning; 04 evaluates against them.

# %%
dataset = datasets.load(config)
counts = viz.counts_figure(dataset)
viz.save_figure(counts, figures, f"{product}-images-per-class", formats)
viz.show(counts)

# %% [markdown]
# ## Examples of every defect class

# %%
examples = viz.dataset_figure(dataset, show_per_class, with_masks=with_masks, size=show_size)
viz.save_figure(examples, figures, f"{product}-examples-per-class", formats)
viz.show(examples)
