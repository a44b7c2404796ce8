"""A latent base built offline: ``pretrain-ae`` (a small AutoencoderKL on the corpus) and
``pretrain-mini --vae`` (a DiT on its latents), loaded, fine-tuned and sampled through the same
``VAECodec`` path as DiT-XL with the SD VAE."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from defectlab.base import paths, runs
from defectlab.core import model, restore, sampler
from defectlab.stages import autoencoder, pretrain, train
from defectlab.core.codec import VAECodec
from defectlab.base.errors import DefectlabError

AE = dict(image_size=32, channels="8,16", batch_size=4, progress=False)
BASE = dict(image_size=32, patch_size=2, width=32, heads=2, depth=1, batch_size=4, preview=0, progress=False)


@pytest.fixture(scope="module")
def latent_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent")
    ae = autoencoder.run(autoencoder.AEConfig(**AE, max_steps=3, runs_dir=str(tmp / "runs"), out=str(tmp / "ae")))
    base = pretrain.run(pretrain.PretrainConfig(**BASE, vae=str(ae), max_steps=2, runs_dir=str(tmp / "runs"),
                                                name="latent", out=str(tmp / "base")))
    return tmp, ae, base


def test_autoencoder_export_scales_its_latents_to_unit_variance(latent_base):
    _, ae, _ = latent_base
    vae = AutoencoderKL.from_pretrained(ae)
    info = json.loads((ae / "training.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(1 / info["latent_std"], rel=1e-3)
    codec = VAECodec(vae)
    assert codec.scaling_factor == vae.config.scaling_factor != 0.18215
    x, _ = autoencoder.corpus.batch(autoencoder.HOLDOUT, 64, 0, 32)
    assert codec.encode(x).std().item() == pytest.approx(1.0, rel=0.05)  # the items it was measured on
    assert info["step"] == 3 and info["psnr"] > 0


def test_autoencoder_resume_equals_one_run(tmp_path):
    one = autoencoder.run(autoencoder.AEConfig(**AE, max_steps=4, runs_dir=str(tmp_path / "a"), out=str(tmp_path / "one")))
    autoencoder.run(autoencoder.AEConfig(**AE, max_steps=2, runs_dir=str(tmp_path / "b"), out=str(tmp_path / "two")))
    two = autoencoder.run(autoencoder.AEConfig(max_steps=4, resume=str(next((tmp_path / "b").iterdir())),
                                               progress=False))
    assert two == tmp_path / "two"  # the export folder comes from the run's config
    a, b = (runs.load_tensors(p / "diffusion_pytorch_model.safetensors") for p in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the fine-tune's resume rule: a setting that decides what the run computes may not change
    with pytest.raises(DefectlabError, match="--lr may not change on --resume"):
        autoencoder.run(autoencoder.AEConfig(max_steps=6, lr=5e-4, resume=str(next((tmp_path / "b").iterdir()))))


def test_bad_autoencoder_settings_fail_before_a_run_folder(tmp_path):
    with pytest.raises(DefectlabError, match="channels"):
        autoencoder.run(autoencoder.AEConfig(channels="8,x", runs_dir=str(tmp_path)))
    with pytest.raises(DefectlabError, match="--vae .*no autoencoder"):
        pretrain.run(pretrain.PretrainConfig(**BASE, vae=str(tmp_path / "missing"), runs_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_latent_base_loads_through_the_vae_path_and_samples(latent_base):
    _, ae, base = latent_base
    assert (base / "vae" / "config.json").is_file() and not (base / "vae" / "training.json").exists()
    b = model.load(str(base))
    assert isinstance(b.codec, VAECodec) and b.codec.scaling_factor == AutoencoderKL.from_pretrained(ae).config.scaling_factor
    t = b.transformer.config
    assert (t.in_channels, t.out_channels, t.sample_size) == (4, 8, 16)  # 32 px / 2 → 16×16×4 latents
    assert b.default_image_size == 32 and b.scheduler_config["clip_sample"] is False  # latents are unbounded
    assert json.loads((base / "model_index.json").read_text())["defectlab_image_size"] == 32  # a copy keeps it
    images = sampler.generate(b.transformer, b.codec, [0, 1], sampler.generators(0, "x", range(2)),
                              steps=2, scheduler="ddim", progress=False, scheduler_config=b.scheduler_config)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert "latents of the small autoencoder" in (base / "MODEL_CARD.md").read_text()


def test_finetune_on_a_latent_base(latent_base):
    tmp, _, base = latent_base
    folder = train.run(train.TrainConfig(model=str(base), image_size=32, epochs=1, max_steps=2, batch_size=4,
                                         grad_accum=1, val_per_class=1, val_timesteps=2, progress=False,
                                         report_to="none", log_samples=0, runs_dir=str(tmp / "ft")))
    restored = restore.restore(folder)
    assert isinstance(restored.base.codec, VAECodec) and restored.base.transformer.config.in_channels == 4


def test_vae_path_is_stored_relative_to_the_checkout_and_found_from_anywhere(tmp_path, monkeypatch):
    """A run folder committed under pretrain/ must resume from any clone and any working folder:
    an autoencoder inside the checkout is stored relative to it; one outside stays absolute."""
    inside = paths.CHECKOUT / "pretrain" / "ae64-s9000"
    assert pretrain.vae_path(str(inside)) == "pretrain/ae64-s9000"
    assert pretrain.vae_path(str(tmp_path / "ae")) == str((tmp_path / "ae").resolve())
    monkeypatch.chdir(tmp_path)                                    # not the checkout: found through it
    assert pretrain.codec(pretrain.PretrainConfig(vae="pretrain/ae64-s9000")).scaling_factor > 0
    assert pretrain.vae_folder("pretrain/ae64-s9000") == inside
    # export copies the autoencoder from there too (a base is shipped with its vae/)
    cfg = pretrain.PretrainConfig(image_size=64, patch_size=4, width=16, heads=1, depth=1, fp16=False, vae="pretrain/ae64-s9000")
    out = pretrain.save_model(pretrain.build(cfg), tmp_path / "base", cfg)
    assert (out / "vae" / "config.json").is_file() and model.load(str(out)).codec.scaling_factor > 0
    with pytest.raises(DefectlabError, match="--vae pretrain/none"):
        pretrain.codec(pretrain.PretrainConfig(vae="pretrain/none"))
