"""Greyscale data stays greyscale end to end: the real MVTec screws are mode L, and
samples from a fine-tune on them came out with colour casts."""
import numpy as np
from PIL import Image

from defectlab.base import runs
from defectlab.stages import sample, synthesize, train
from test_data import make_mvtec


def test_a_greyscale_dataset_gives_grey_samples_and_pairs(tmp_path):
    root = make_mvtec(tmp_path / "grey")
    for p in root.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    folder = train.run(train.TrainConfig(data=str(root), product="widget", model="tiny", method="bitfit",
                                         image_size=16, epochs=1, val_per_class=1, val_timesteps=2, batch_size=2,
                                         runs_dir=str(tmp_path / "runs"), progress=False))
    assert runs.load_config(folder)["greyscale"] is True
    out = sample.run(sample.SampleConfig(run=str(folder), per_class=2, steps=3, guidance=1.0))
    pairs = synthesize.run(synthesize.MaskSampleConfig(run=str(folder), mask="ellipse", per_class=1, steps=3))
    pngs = [*out.rglob("*.png"), *(pairs / "widget" / "test").rglob("*.png")]
    assert len(pngs) == 4 + 2
    for png in pngs:
        with Image.open(png) as im:
            assert im.mode == "L", png
            assert np.asarray(im).std() > 0  # a picture, not a blank


def test_a_colour_dataset_keeps_colour(tmp_path):
    root = make_mvtec(tmp_path / "colour")
    folder = train.run(train.TrainConfig(data=str(root), product="widget", model="tiny", method="bitfit",
                                         image_size=16, epochs=1, val_per_class=1, val_timesteps=2, batch_size=2,
                                         runs_dir=str(tmp_path / "runs"), progress=False))
    assert runs.load_config(folder)["greyscale"] is False
    out = sample.run(sample.SampleConfig(run=str(folder), per_class=1, steps=3, guidance=1.0))
    with Image.open(next(out.rglob("*.png"))) as im:
        assert im.mode == "RGB"
