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
# # 04 · Evaluate the generated images
#
# Against the run's held-out real test images (never used for fine-tuning): the downstream
# defect-type classifier trained on real vs real + generated images, FID / KID / IS when
# Inception weights are available, diversity, and real next to generated images. On the embedded
# procedural dataset also the offline proxies: the judge (share of samples recognised as their
# class) and the gain study (accuracy against k real images per class, with and without the
# samples, 95 % intervals over seeds, on a large procedural test set).

# %% tags=["parameters"]
run: str = "latest"  # run folder, name or number; latest means the newest run
samples: str = ""  # generated images (<samples>/<product>/test/<class>/*.png); "" means the newest under <run>/samples/ (a --zoom run: under <run>/synthesized/); synthesized means the newest synthesize output
metrics: str = "downstream,judge,fid,kid,is"  # any of downstream, judge, gain, presence, fid, kid, is (default list: unavailable ones are skipped)
conditions: str = "real,real+gen"  # downstream training sets: real, real+gen, gen (gen: classification accuracy score)
seeds: int = 3  # downstream classifier seeds (mean ± std over them)
classifier_steps: int = 40  # optimizer steps per classifier, the same for every condition (~12 CPU-s at 64 px)
classifier_size: int = 64  # classifier input side (px)
classifier_weights: str = ""  # local torchvision resnet18 ImageNet weights ("" means from scratch)
feature_weights: str = ""  # InceptionV3 weights file (torch-fidelity format); "" means the torch hub cache or a download
bootstrap: int = 0  # bootstrap resamples for FID/KID intervals (2.5-97.5 percentiles; 0 means none)
gain_ks: str = "5,13"  # gain study (embedded dataset only): real images per class k the classifier trains with
gain_seeds: int = 5  # gain study: seeds per k (95 % t-interval of the paired gain)
compare_rows: int = 4  # real and generated images per class in the comparison figure
formats: str = "png"  # figure formats (png, pdf, svg)
settings: str = ""  # other EvalConfig fields as JSON, e.g. {"kid_subset_size": 50} (batch runs put them here)

# %%
from IPython.display import Markdown, display

from defectlab.core import viz
from defectlab.stages import benchmark, evaluate
from defectlab.reports import report
from defectlab.app import params

run_folder = report.resolve_run(run)
config = params.with_settings(evaluate.EvalConfig(
    run=str(run_folder), samples=samples, metrics=metrics, conditions=conditions, seeds=seeds,
    classifier_steps=classifier_steps, classifier_size=classifier_size, classifier_weights=classifier_weights,
    feature_weights=feature_weights, bootstrap=bootstrap, formats=formats, gain_ks=gain_ks,
    gain_seeds=gain_seeds), settings)

# %% [markdown]
# ## Metrics

# %%
result = report.evaluate_run(config)
display(Markdown(f"**{report.caption(result)}**"))
display(Markdown(report.format_table(result)))

# %% [markdown]
# ## Charts
# Saved in the run folder's `figures/` as `eval-*.png`; `eval-efficiency` is the gain study's
# test accuracy against k, real only vs real + generated.

# %%
viz.show(*report.figures(result))

# %% [markdown]
# ## Real and generated images, class by class

# %%
comparison = report.real_vs_generated_for_run(result.run, result.samples, rows=compare_rows)
viz.save_figure(comparison, report.figures_folder(run_folder), "real-vs-generated", formats)
viz.show(comparison)

# %% [markdown]
# ## Against copy-paste
# Every gain above is measured against real-only. The baseline a generator must beat is copying:
# the training defects' own pixels pasted under the same masks onto the same defect-free images,
# no model. `defectlab benchmark --run RUN --test-data ROOT` (a folder of test images the run
# never saw) trains the downstream classifiers on real only, real + generated pairs and real +
# cut-paste pairs over several generation seeds and classifier seeds, and tests how far a small
# classifier tells real defects from generated and from cut-paste ones. `make demo` runs it after
# this notebook; its reports for this run are shown here.

# %%
display(*[Markdown(table.read_text()) for table in benchmark.reports(run_folder)])
