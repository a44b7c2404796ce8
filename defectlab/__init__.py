"""defectlab: few-shot generation of product-defect images with a fine-tuned class-conditional DiT.

One folder per layer, read bottom-up: ``base`` (paths, errors, runs, images, manifest) →
``data`` (sources, dataset, product, synth, corpus, fetch) → ``core`` (dit, model, methods,
sampler, diffusion, masks, loop, restore, metrics, …) → ``stages`` (train, distill, sample,
synthesize, evaluate, benchmark, classes, pretrain, autoencoder: one ``run(cfg)`` each) →
``reports`` (report, compare, page, explorer, export) → ``app`` (cli, batch, demo, params).
A module imports from its own folder or the ones below it. Notebooks and the ``defectlab`` CLI
call the same ``run(cfg)`` functions; ``docs/interfaces.md`` has the contracts.
"""
__version__ = "0.1.0"
