"""Application layer: the command line (cli), papermill notebooks and sweeps (batch, params) and
the main job on the embedded default (demo)."""
