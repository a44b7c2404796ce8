"""defectlab: few-shot generation of product-defect images with a fine-tuned class-conditional DiT.

Read top-down: base (paths, errors, runs, images, manifest) → data (data, dataset, synth,
corpus, fetch) → core (model, methods, sampler, diffusion, masks, metrics, engine, viz, …) →
stages (train, sample, synthesize, evaluate, classes, pretrain, each one ``run(cfg)``) →
reports (report, explorer) → batch / cli / demo. Notebooks and the ``defectlab`` CLI call the
same ``run(cfg)`` functions; ``docs/interfaces.md`` has the contracts.
"""
__version__ = "0.1.0"
