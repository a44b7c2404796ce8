"""Core layer: the model (dit, model, convert, codec, engine), fine-tuning methods, the objective
and the sampler, masks, the one training step (loop, resume, validation), a run back in memory
(restore), and the measures (metrics, classifier, judge, gain, realism, viz, tracking)."""
