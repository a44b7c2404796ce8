"""defectlab: few-shot generation of product-defect images with a fine-tuned class-conditional DiT.

Stages (one module each): data → model/methods → train → sample → evaluate; notebooks and the
``defectlab`` CLI call the same ``run(cfg)`` functions.
"""
__version__ = "0.1.0"
