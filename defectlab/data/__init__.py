"""Data layer: dataset layouts and splits (sources), pixels and augmentation (dataset), a run's
defect-free images (product), the embedded procedural dataset (synth, synth_v2, shapes), the
pre-training corpus, downloads (fetch). Imports only base."""
