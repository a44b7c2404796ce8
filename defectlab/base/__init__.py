"""Base layer: paths, one-line errors, run folders and atomic writes, pixels, resumable output
folders, progress bars. Imports nothing else of defectlab."""
