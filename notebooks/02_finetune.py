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
# # 02 · Fine-tune a DiT on the defect classes
#
# One fine-tuning method (full, bitfit, difffit, bias_norm, LoRA or VPT) with the defect types as new
# classes. Writes a run folder (config, log, checkpoints, figures) that 03 and 04 read.

# %% tags=["parameters"]
data: str = "synthetic"  # "synthetic" (embedded default), "synthetic-v2" (drawn with version 2) or a dataset root folder (MVTec AD or DS-MVTec)
product: str = "hazelnut"  # product folder name
model: str = "mini"  # mini (pre-trained, shipped) | mini-latent (pre-trained latent, shipped) | tiny (random) | mini-scratch | facebook/DiT-XL-2-256 | local folder | original .pt
method: str = "difffit"  # full | bitfit | difffit | bias_norm | lora | vpt
image_size: int = 0  # 0 means the model's preset (tiny 64 px, mini 32 px, mini-latent 64 px, DiT-XL 128 px)
lr: float = 0.0  # 0 means the preset (1e-5 real model, 1e-3 tiny/mini, 3e-3 mini-latent)
epochs: int = 0  # 0 means the preset (100 real model, 60 tiny/mini, 200 mini-latent)
max_steps: int = 0  # stop after this many optimizer steps (0 means no limit)
batch_size: int = 4  # images per micro-batch (per process)
grad_accum: int = 2  # micro-batches per optimizer step
mixed_precision: str = "no"  # no | fp16 | bf16
lora_rank: int = 8  # LoRA rank (method lora)
class_init: str = "anchor"  # anchor | nearest | topk (mean of 5 best) | mean | random | <class id>
label_dropout: float = 0.1  # class-label dropout, so guidance works after fine-tuning
ema: float = 0.0  # EMA decay of the trained parameters (0 means off)
val_per_class: int = 2  # training images per class held back for validation (0 means none: the training images validate)
val_timesteps: int = 8  # fixed timesteps of the validation loss
val_every: int = 5  # validate (and checkpoint) every N epochs
patience: int = 0  # stop after N validations without improvement (0 means off)
seed: int = 0  # seeds data order, noise, dropout, new class rows
name: str = ""  # run name ("" means <product>-<method>)
runs_dir: str = ""  # parent of run folders ("" means outputs/runs)
progress: bool = True  # tqdm progress bar
formats: str = "png"  # loss-curve figure formats, comma-separated: png, pdf, svg
settings: str = ""  # other TrainConfig fields as JSON, e.g. {"crop": 200} (batch runs put them here)

# %%
from IPython.display import Markdown, display

from defectlab.core import methods, restore, viz
from defectlab.stages import train
from defectlab.reports import report
from defectlab.app import params

config = params.with_settings(train.TrainConfig(
    data=data, product=product, model=model, method=method, image_size=image_size, lr=lr, epochs=epochs,
    max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, mixed_precision=mixed_precision,
    lora_rank=lora_rank, class_init=class_init, label_dropout=label_dropout, ema=ema,
    val_per_class=val_per_class, val_timesteps=val_timesteps, val_every=val_every, patience=patience,
    seed=seed, name=name, runs_dir=runs_dir, progress=progress, formats=formats), settings)

# %% [markdown]
# ## Fine-tune

# %%
run_folder = train.run(config)
run_folder

# %% [markdown]
# ## Trainable parameters
# What the method trains, from the restored best checkpoint (the same model 03 and 04 use).

# %%
restored = restore.restore(run_folder)
display(Markdown(methods.trainable_table(restored.model)))

# %% [markdown]
# ## Loss curve
# Training loss per optimizer step and the validation loss (held-back images, fixed noise and
# timesteps, so epochs are comparable). Saved as `figures/loss_curve.<format>` in the run folder.

# %%
viz.show(train.plot_loss(run_folder, config.formats))
report.run_summary(run_folder)
