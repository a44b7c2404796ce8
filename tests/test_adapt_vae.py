"""Product adaptation of a latent base's autoencoder: the decoder learns the product, the latents stay."""
import json

import pytest
import torch

from defectlab.app import cli
from defectlab.base.errors import DefectlabError
from defectlab.core import model
from defectlab.stages import adapt_vae
from defectlab.stages.adapt_vae import AdaptVAEConfig


def _cfg(tmp_path, **kw):
    return AdaptVAEConfig(**{"data": "synthetic-v2", "product": "hazelnut", "batch_size": 6, "max_steps": 30,
                             "checkpoint_every": 20, "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "m"),
                             "progress": False, **kw})


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    return tmp, adapt_vae.run(_cfg(tmp))


def test_adapted_decoder_keeps_the_latents_and_reconstructs_the_product_better(adapted):
    tmp, out = adapted
    base, new = model.load("mini-latent"), model.load(str(out))
    assert new.default_image_size == base.default_image_size == 64
    enc_b, enc_n = _state(base.codec.vae.encoder), _state(new.codec.vae.encoder)
    assert all(torch.equal(enc_b[k], enc_n[k]) for k in enc_b)
    assert not all(torch.equal(a, b) for a, b in zip(base.codec.vae.decoder.state_dict().values(),
                                                     new.codec.vae.decoder.state_dict().values()))
    assert new.codec.scaling_factor == base.codec.scaling_factor
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(base.codec.encode(x), new.codec.encode(x))  # a run trained on the base stays valid
    t_b, t_n = base.transformer.state_dict(), new.transformer.state_dict()
    assert all(torch.equal(t_b[k], t_n[k]) for k in t_b)
    rec = json.loads((out / "vae" / adapt_vae.RECORD).read_text())
    assert rec["steps"] == 30 and rec["product"] == "hazelnut" and rec["base"] == "mini-latent"
    assert rec["good_images"] + rec["held_good"] == 20 and rec["held_good"] == 8
    assert rec["defect_images"] > 0 and rec["test_defects"] > 0
    for name in ("good_zoom1", "good_zoom4"):  # held-back images: never trained on
        assert rec["after"][name]["l1"] < rec["before"][name]["l1"], (name, rec)
    pres = rec["after"]["presence"]  # the product's shape through the round trip, on unseen images
    assert pres["n"] == 8 + rec["test_defects"] and 0 <= pres["round_trip"] <= 1 and pres["iou_round_trip"] > 0.5
    assert not (out / "MODEL_CARD.md").exists()  # the base's card does not describe this model


def test_resumed_adaptation_gives_the_uninterrupted_weights(tmp_path):
    small = dict(max_steps=4, batch_size=2, holdout=2, zooms=(4,))
    straight = adapt_vae.run(_cfg(tmp_path, **small, runs_dir=str(tmp_path / "a"), out=str(tmp_path / "straight")))
    adapt_vae.run(_cfg(tmp_path, **{**small, "max_steps": 2}, out=str(tmp_path / "half")))
    run = next((tmp_path / "runs").glob("000-*"))
    resumed = adapt_vae.run(AdaptVAEConfig(resume=str(run), max_steps=4, out=str(tmp_path / "full"), progress=False))
    a = model.load(str(straight)).codec.vae.decoder.state_dict()
    b = model.load(str(resumed)).codec.vae.decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in model.load("mini-latent").codec.vae.decoder.state_dict().items())


def test_adapt_vae_bad_input(tmp_path, capsys):
    with pytest.raises(DefectlabError, match="no autoencoder"):
        adapt_vae.run(_cfg(tmp_path, model="mini"))
    with pytest.raises(DefectlabError, match="zooms"):
        adapt_vae.run(_cfg(tmp_path, zooms=(0,)))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m").exists()  # nothing written
    code = cli.main(["adapt-vae", "--model", "mini", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "no autoencoder" in err and "Traceback" not in err



def test_codec_loads_without_the_transformer_weights(adapted, monkeypatch):
    tmp, out = adapted
    whole = {spec: model.load(spec) for spec in ("mini-latent", str(out), "mini")}

    def refuse(*a, **k):
        raise AssertionError("the transformer's weights were loaded")
    monkeypatch.setattr(model.dit.DiT, "from_pretrained", refuse)
    for spec, base in whole.items():
        codec, size = model.load_codec(spec)
        assert type(codec) is type(base.codec) and size == base.default_image_size
        if hasattr(codec, "vae"):
            x = torch.rand(1, 3, 64, 64) * 2 - 1
            assert torch.equal(codec.encode(x), base.codec.encode(x))
            assert torch.equal(codec.decode(codec.encode(x)), base.codec.decode(base.codec.encode(x)))
    with pytest.raises(DefectlabError, match="not a diffusers DiT folder"):
        model.load_codec(str(tmp))  # a folder that holds no model
