"""The main job on the embedded default: dataset → fine-tune → sample → evaluate.

``make demo`` (``defectlab demo``) executes notebooks 01-04 through papermill on the offline
embedded default (procedural hazelnut images; the shipped pre-trained ``mini-latent`` 64 px
latent DiT when it is installed, else the 32 px ``mini``, else the random-weight ``tiny``) and
leaves the executed notebooks, the run folder and every figure in ``outputs/demo/``. On
mini-latent it uses the embedded dataset's drawing version 2 (``--data``: per-image light and
texture, so a pasted defect looks out of place), fine-tunes on windows around the defects
(``--zoom``), draws image + mask pairs (the training masks carried onto defect-free hazelnuts)
and benchmarks the refined copies against copy-paste and real-only on test images of another
seed. It is sized for at most 10 minutes on 2 CPU cores. ``--no-notebooks`` calls the same stage
functions directly, without Jupyter.

Every number it prints is an offline proxy: the copy baseline (downstream accuracy with
intervals over generation and classifier seeds, two-sample realism), a ResNet-18 on the run's 20
held-out images, and on drawing version 1 the judge (share of samples a CNN trained on abundant
procedural images recognises as their class) and the gain study; no FID (a random-weight
Inception would make it meaningless). It shows what the method does on the embedded default, not
how DiT-XL does on real defects.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..data import sources, synth
from ..stages import benchmark, evaluate, presets, sample, synthesize, train
from ..reports import page, report
from . import batch, params as notebook_params


@dataclass
class DemoConfig:
    model: str = "auto"            # base model: auto (mini-latent when shipped, else mini, else tiny), tiny, mini, mini-latent
    method: str = ""               # fine-tuning method ("" = difffit on a pre-trained base, full on random tiny)
    product: str = "hazelnut"      # product of the embedded dataset (hazelnut | screw)
    data: str = ""                 # embedded dataset ("" = the preset's: synthetic-v2 for mini-latent, synthetic for mini and tiny)
    image_size: int = 0            # training and sampling size in px (0 = the preset: 64 for mini-latent, 32 for mini and tiny)
    epochs: int = 0                # fine-tuning epochs (0 = the preset: 100 for mini-latent and mini, 30 for tiny; batch 8)
    per_class: int = 12            # generated images per class (the downstream classifier trains on them)
    steps: int = 20                # DDIM sampling steps
    guidance: float = 0.0          # classifier-free guidance (0 = 4 for mini, 1.5 for tiny)
    classifier_steps: int = 30     # optimizer steps of each downstream classifier (32 px)
    seeds: int = 2                 # downstream classifier seeds (mean ± std)
    gain_ks: str = "5,13"          # gain study: real images per class k (offline proxy, procedural test set)
    gain_seeds: int = 3            # gain study: seeds per k (95 % interval of the paired gain; the full study has 10)
    benchmark: bool = True         # then the copy baseline: generated vs cut-paste vs real-only on new procedural test images
    bench_seeds: str = "3,3"       # benchmark: generation seeds, classifier seeds
    bench_real: int = 2            # benchmark: real images per class each classifier gets (where real only is not yet at 1.0)
    notebooks: bool = True         # run notebooks 01-04 through papermill (else call the stages directly)
    out: str = ""                  # folder for executed notebooks and figures ("" = outputs/demo, the run in outputs/runs); a given one holds its run too


# Per base: a random-weight tiny DiT has to learn everything (train all of it, small images,
# more epochs); the pre-trained mini only needs the new classes (DiffFit at its native 32 px).
# mask_loss: the defect region weighs 1 + 5 × its coverage in the loss (without it the
# fine-tune learns the product and all but ignores a mark on 2 % of the image).
# mini-latent (the 64 px latent base): DiffFit on --zoom windows around each defect, so a
# 7 px hole covers 4 × 4 latent cells instead of 2 × 2; the demo then draws image + mask pairs
# (synthesize: the training masks carried onto defect-free products) and evaluates those.
PRESETS = {"tiny": {"method": "full", "image_size": 32, "epochs": 30, "lr": 3e-3, "guidance": 1.5, "mask_loss": 0.0},
           "mini": {"method": "difffit", "image_size": 32, "epochs": 100, "lr": 3e-3, "guidance": 4.0, "mask_loss": 5.0},
           "mini-latent": {**{k: presets.DEMO["finetune"][k] for k in ("data", "method", "image_size", "epochs", "lr",
                                                                        "mask_loss", "zoom")},
                           "guidance": presets.DEMO["synthesize"]["guidance"], "pairs": True}}  # = --preset demo


def base_model(cfg: DemoConfig) -> str:
    if cfg.model != "auto":
        return cfg.model
    return next((m for m in ("mini-latent", "mini") if (paths.ASSETS / m).is_dir()), "tiny")


def params(cfg: DemoConfig) -> dict:
    """The notebook parameters of the demo (each notebook takes the ones it declares)."""
    model = base_model(cfg)
    preset = PRESETS.get(model, PRESETS["tiny"])
    epochs = cfg.epochs or preset["epochs"]
    data = cfg.data or preset.get("data", "synthetic")
    version = synth.embedded(data)
    if version is None:
        raise DefectlabError(f"data: the demo runs on the embedded dataset (synthetic or synthetic-v2), not {data!r}")
    return {
        # 01 explore
        "data": data, "product": cfg.product, "show_per_class": 6, "show_size": 64,
        # 02 fine-tune
        "model": model, "method": cfg.method or preset["method"], "image_size": cfg.image_size or preset["image_size"],
        "epochs": epochs, "lr": preset["lr"], "batch_size": 8, "grad_accum": 1, "val_per_class": 1,
        "val_timesteps": 4, "val_every": max(1, epochs // 5), "progress": False, "mask_loss": preset["mask_loss"],
        "zoom": preset.get("zoom", 1),
        # 03 sample (and, on mini-latent, image + mask pairs: what 04 evaluates)
        "per_class": cfg.per_class, "scheduler": "ddim", "steps": cfg.steps, "guidance": cfg.guidance or preset["guidance"],
        "explorer_images": 6, "pairs_per_class": cfg.per_class if preset.get("pairs") else 0,
        "samples": "synthesized" if preset.get("pairs") else "",
        # 04 evaluate: downstream classifier + the procedural judge and gain study where they apply
        # (drawing version 1; offline: no Inception weights, and random ones make FID meaningless)
        "metrics": "downstream,judge,gain" if version == 1 else "downstream", "seeds": cfg.seeds,
        "classifier_steps": cfg.classifier_steps,
        "classifier_size": 32, "compare_rows": 4, "gain_ks": cfg.gain_ks, "gain_seeds": cfg.gain_seeds,
    }


def run(cfg: DemoConfig) -> Path:
    t0 = time.time()
    out = Path(cfg.out) if cfg.out else paths.OUTPUTS / "demo"
    load, p = _load(), params(cfg)
    if cfg.notebooks:
        result = batch.run(batch.NotebooksConfig(out=str(out)), params={**p, "runs_dir": str(runs_dir(cfg, out))})
        run_folder = Path(runs.read_json(result / "batch.json")["run"])
    else:
        result = run_folder = _stages(cfg, out)
    _report(run_folder)
    if cfg.benchmark and sources.from_settings(runs.load_config(run_folder)).zoom > 1:  # pairs: what the copy baseline compares
        _benchmark(cfg, p, run_folder, out)
    page_ = page.run(page.PageConfig(target=str(result)))  # the batch folder (or the run): one HTML page of it all
    print(f"\nreport: {page_}")
    print(f"\nnext: defectlab sample --run {run_folder} --scheduler ddim --steps {p['steps']} --guidance {p['guidance']:g}"
          f"\n      defectlab synthesize --run {run_folder} --scheduler ddim --steps {p['steps']} --guidance {p['guidance']:g}")
    print(f"demo finished in {time.time() - t0:.0f} s on {os.cpu_count()} CPU cores "
          f"(load average {load} at start, {_load()} at the end) → {result}")
    return result


def runs_dir(cfg: DemoConfig, out: Path) -> Path:
    """Where the demo's run goes: with the CLI's runs (``outputs/runs``, where ``--run latest``,
    ``defectlab runs`` and ``tensorboard --logdir outputs/runs`` see it), or inside an ``--out``
    folder given on purpose."""
    return out / "runs" if cfg.out else paths.RUNS


def _stages(cfg: DemoConfig, out: Path) -> Path:
    """The same steps as the notebooks, without Jupyter: each stage gets the settings object its
    notebook would build from the same parameters (``params.stage_config``)."""
    given = {**params(cfg), "runs_dir": str(runs_dir(cfg, out))}
    specs = {name: notebook_params.declared(name) for name in notebook_params.NOTEBOOKS}
    config = lambda name, **extra: notebook_params.stage_config(name, {**given, **extra}, specs, "the demo")  # noqa: E731
    folder = train.run(config("02_finetune"))
    drawn = config("03_sample", run=str(folder))
    sample.run(drawn)
    if given["pairs_per_class"]:  # as notebook 03 draws its pairs
        synthesize.run(synthesize.MaskSampleConfig(run=str(folder), checkpoint=drawn.checkpoint, classes=drawn.classes,
                                                   per_class=given["pairs_per_class"], scheduler=drawn.scheduler,
                                                   steps=drawn.steps, guidance=drawn.guidance, seed=drawn.seed))
    report.evaluate_run(config("04_evaluate", run=str(folder)))
    return folder


def _report(run_folder: Path) -> None:
    result = evaluate.EvalResult.load(run_folder)
    summary = report.run_summary(run_folder)
    print(f"\nrun {run_folder}: {summary['method']}, {summary['train_steps']} steps, "
          f"best validation loss {summary['best_val_loss']:.4f}")
    for key, value in report.metrics_summary(result).items():
        if value is not None and not key.startswith("acc_gain_std"):
            print(f"  {key:<28} {value:+.3f}" if "gain" in key else f"  {key:<28} {value:.3f}")
    print(report.caption(result))


def _benchmark(cfg: DemoConfig, p: dict, run_folder: Path, out: Path) -> Path:
    """``benchmark.run`` on procedural images of another seed (never trained on): real-only,
    + generated pairs, + cut-paste pairs, and generated − cut-paste with its interval."""
    gen_seeds, clf_seeds = (int(v) for v in cfg.bench_seeds.split(","))
    test = synth.generate(out / "test-data", seed=1, per_class=10, good=2, products=(cfg.product,),
                          version=synth.embedded(p["data"]))  # the run's drawing version
    folder = benchmark.run(benchmark.BenchmarkConfig(**{
        **presets.DEMO["benchmark"], "run": str(run_folder), "test_data": str(test), "gen_seeds": gen_seeds,
        "clf_seeds": clf_seeds, "per_class": p["per_class"], "steps": p["steps"], "guidance": p["guidance"],
        "real_per_class": cfg.bench_real}))
    # (into <run>/benchmark/: notebook 04 shows it when run again)
    print("\ncopy baseline (offline proxy: procedural images):\n" + (folder / "benchmark.md").read_text())
    return folder


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"
