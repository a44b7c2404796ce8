"""Stages: one settings dataclass and one ``run(cfg)`` each (train, distill, sample, synthesize,
evaluate, benchmark, classes, pretrain, autoencoder) and the named recipes (presets)."""
