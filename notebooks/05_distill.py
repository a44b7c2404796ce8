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
# # 05 · Distil a run into a cheaper student
#
# `steps`: progressive distillation (Salimans & Ho 2022) with the teacher's guidance distilled in
# (Meng et al. 2023): a student that samples in `student_steps` DDIM steps, one forward each.
# `size`: a DiT with fewer blocks trained on the teacher's guided outputs. The student is a run
# like any other (sample, synthesize, benchmark, export it); a batch given `distill` runs this
# notebook after 02 and hands the student to 03 and 04.

# %% tags=["parameters"]
run: str = "latest"  # the teacher: run folder/name/number, or latest
distill: str = "steps"  # steps (a student sampling in student_steps DDIM steps) | size (a DiT with fewer blocks)
student_steps: int = 4  # steps: the student's DDIM steps (its first teacher samples in student_steps × 2^phases)
phases: int = 3  # steps: halvings of the teacher's step count, iterations optimizer steps each
student_layers: int = 0  # size: the student's transformer blocks (0 means the most that keep it within a quarter of the teacher's parameters, at least 1)
teacher_guidance: float = 1.5  # the teacher's classifier-free guidance, distilled in: the student samples at guidance 1
iterations: int = 300  # optimizer steps (per phase in steps mode)
distill_batch_size: int = 8  # images per optimizer step
distill_seed: int = 0  # keys every draw: images, views, timesteps, noise, dropped labels
runs_dir: str = ""  # parent of the student's run folder ("" means the teacher's)
compare_per_class: int = 4  # images per class in the teacher / student figure
figures_dir: str = ""  # also save the figure here ("" means the student's figures folder only)
settings: str = ""  # other DistillConfig fields as JSON, e.g. {"lr": 0.001} (batch runs put them here)

# %%
from IPython.display import Markdown

from defectlab.core import viz
from defectlab.stages import distill as distill_stage
from defectlab.reports import report, students
from defectlab.app import params

config = params.with_settings(distill_stage.DistillConfig(
    run=str(report.resolve_run(run)), mode=distill, student_steps=student_steps, phases=phases,
    student_layers=student_layers, guidance=teacher_guidance, iterations=iterations, batch_size=distill_batch_size,
    seed=distill_seed, runs_dir=runs_dir), settings)

# %% [markdown]
# ## Distil
# Resumable: run again with `{"resume": "<student run>"}` in `settings` after an interruption.

# %%
student = distill_stage.run(config)
student

# %% [markdown]
# ## Teacher and student from the same seeds
# Transformer forwards and wall time per image on this machine (one batch of all images).

# %%
figure, sides = students.compare(student, per_class=compare_per_class)
viz.save_figure(figure, report.figures_folder(student), "teacher-student", "png")
if figures_dir:
    viz.save_figure(figure, figures_dir, "teacher-student", "png")
viz.show(figure)
Markdown(students.table(sides))
