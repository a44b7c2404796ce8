"""defectlab-mini-latent: the shipped 64 px latent base, and the demo's recipe on it."""
import re

import pytest
import torch

from defectlab.base import paths
from defectlab.data import corpus, dataset
from defectlab.core import judge, methods, model
from defectlab.stages import pretrain, synthesize, train
from defectlab.app import demo
from defectlab.core.codec import VAECodec
from defectlab.core.diffusion import Objective

LATENT = paths.ASSETS / "mini-latent"


def test_shipped_mini_latent_loads_through_the_vae_path_and_matches_its_card():
    base = model.load("mini-latent")
    card = (LATENT / "MODEL_CARD.md").read_text()
    assert pretrain.sha256(LATENT / pretrain.WEIGHTS) == re.search(r"sha256 \| `([0-9a-f]{64})`", card).group(1)
    assert isinstance(base.codec, VAECodec) and base.default_image_size == 64
    t = base.transformer
    assert t.config.sample_size == 16 and t.config.patch_size == 2 and t.dtype == torch.float32
    assert methods.num_classes(t) == len(corpus.CLASSES) and base.class_names == corpus.CLASSES
    assert base.anchors == {"hazelnut": corpus.ANCHORS["hazelnut"], "screw": corpus.ANCHORS["screw"]}
    with torch.no_grad():  # it denoises its own corpus (through its autoencoder) far better than chance
        x, y = corpus.batch(10_000_000, 18, size=64)
        z = base.codec.encode(x)
        t_ = torch.full((18,), 300)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        obj = Objective(base.scheduler_config)
        pred = t(obj.add_noise(z, noise, t_), timestep=t_, class_labels=y).sample[:, :z.shape[1]]
        target = obj.target(z, noise, t_)
        assert ((pred - target) ** 2).mean() < 0.5 * (target ** 2).mean()
    assert model.preset("mini-latent")["image_size"] == 64


def test_a_copy_of_mini_latent_keeps_its_image_size(tmp_path):
    """A copy of the folder (e.g. with random weights, the from-scratch baseline) is loaded by
    path, without the named preset: it must still train and sample at 64 px (its autoencoder
    alone would say 128)."""
    import shutil
    shutil.copytree(LATENT, tmp_path / "copy")
    assert model.load(str(tmp_path / "copy")).default_image_size == 64


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """The demo's fine-tune recipe on mini-latent (``demo.PRESETS["mini-latent"]``: DiffFit, 64 px
    windows of 256 px hazelnuts (zoom 4), lr 3e-3, mask loss 20, batch 8) at EPOCHS of its 100
    epochs, on drawing version 1 of the embedded set, the one the judge is trained on (the demo
    itself runs on version 2), and 12 image + mask pairs per class at the demo's guidance (~1 min
    on one CPU thread)."""
    preset = demo.PRESETS["mini-latent"]
    tmp = tmp_path_factory.mktemp("latent")
    cfg = train.TrainConfig(data="synthetic", model="mini-latent", product="hazelnut", method=preset["method"], lr=preset["lr"],
                            mask_loss=preset["mask_loss"], zoom=preset["zoom"], epochs=EPOCHS, image_size=64,
                            batch_size=8, grad_accum=1, val_per_class=1, val_every=1000, val_timesteps=1,
                            report_to="none", log_samples=0, runs_dir=str(tmp / "runs"), progress=False)
    folder = train.run(cfg)
    out = synthesize.run(synthesize.MaskSampleConfig(run=str(folder), checkpoint="latest", per_class=12,
                                                     scheduler="ddim", steps=20, guidance=preset["guidance"],
                                                     out=str(tmp / "pairs")))
    return folder, out


@pytest.mark.slow
def test_demo_pairs_keep_the_judge_score_above_its_floor(demo_pairs):
    """Regression floor on the demo's recipe: the shipped 64 px judge (trained on
    abundant procedural hazelnuts, never on the fine-tune's images) recognises at least FLOOR of
    the 48 pairs. Chance is 12/48; pairs that show nothing are called good."""
    folder, out = demo_pairs
    j = judge.judge_for("hazelnut", 64, progress=False)
    xs, ys = [], []
    for i, c in enumerate(j.classes):
        files = sorted((out / "hazelnut" / "test" / c).glob("*.png"))
        assert len(files) == 12
        xs += [dataset.load_image(f, 64) for f in files]
        ys += [i] * len(files)
    score = judge.judge_score(j, torch.stack(xs), torch.tensor(ys), j.classes)
    print(f"judge on the demo pairs: {score.overall.correct}/48 (judged good: {score.overall.good}):",
          ", ".join(f"{c.name} {c.correct}" for c in score.per_class))  # pytest -s shows it
    assert score.overall.correct >= FLOOR, str(score)


EPOCHS = 30  # of the demo's 100: 41/48 (100 epochs: 44/48; 50: 46/48)
FLOOR = 34  # measured 41/48 at 30 epochs (crack 12, cut 12, hole 5, print 12; 1 judged good), torch 2.14 on the CPU
