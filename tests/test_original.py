"""Faithfulness to the original DiT: weights trained by the original code compute
what the original computes — forward, training loss, DDIM-25 and DDPM-250 with guidance —
whether they come as an original ``.pt`` or as a diffusers (DiTPipeline) folder of the same
weights; ``numerics="diffusers"`` still reproduces ``DiTPipeline``. The reference is
``tests/dit_reference.py``, written from the original algorithm without defectlab code."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from defectlab.base import runs
from defectlab.core import convert, model, restore, sampler
from defectlab.stages import train
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError
from dit_reference import RefDiffusion, RefDiT, guided, space_timesteps

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)


class Identity:
    """Latents out as they are (scaled far inside generate's [-1, 1] clamp): compare the latents."""
    channels, clip_sample, scale = 4, False, 1e-6

    def latent_shape(self, image_size):
        return (4, image_size, image_size)

    def decode(self, z):
        return z * self.scale


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = RefDiT(input_size=8, patch=2, in_ch=4, hidden=128, depth=2, heads=2, classes=1000).eval()  # DiTPipeline: null = 1000
    with torch.no_grad():  # random, not zero-init: the gates and the output layer must carry signal
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return ref


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory):
    """The same weights as an original .pt and as a DiTPipeline folder (VAE beside both)."""
    root = tmp_path_factory.mktemp("original")
    torch.save(reference.state_dict(), root / "DiT-test.pt")
    (root / "config.json").write_text(json.dumps({"num_attention_heads": 2}))  # width 128 is no DiT-S/B/L/XL
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    cfg = convert.original_config(reference.state_dict(), heads=2)
    dit = DiTTransformer2DModel(**cfg).eval()
    dit.load_state_dict(convert.convert_original_state_dict(reference.state_dict()), strict=True)
    DiTPipeline(transformer=dit, vae=vae, scheduler=sampler.make_scheduler("ddim")).save_pretrained(root / "pipe")
    return {"pt": str(root / "DiT-test.pt"), "folder": str(root / "pipe"), "vae": str(root / "vae")}


@pytest.fixture
def load(sources, monkeypatch):
    monkeypatch.setenv(model.VAE_ENV, sources["vae"])
    return lambda kind, **kw: model.load(sources[kind], **kw)


def inputs(n=4):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 1, 500, 999])[:n],
            torch.tensor([3, 9, 7, 0])[:n])


# ----------------------------------------------------------------------------- forward + loss
@pytest.mark.parametrize("kind", ["pt", "folder"])
def test_forward_equals_the_original(reference, load, kind):
    base = load(kind)
    assert base.numerics == "original" and model.numerics_of(base.transformer) == "original"
    x, t, y = inputs()
    with torch.no_grad():
        want, got = reference(x, t, y), base.transformer(x, t, y).sample
    assert rel(got, want) < RTOL
    # diffusers' own frequencies (/ (half - 1)) are what was measured: a percent-level gap
    model.set_numerics(base.transformer, "diffusers")
    with torch.no_grad():
        assert rel(base.transformer(x, t, y).sample, want) > 1e-3


@pytest.mark.parametrize("kind", ["pt", "folder"])
def test_training_loss_equals_the_original(reference, load, kind):
    base = load(kind)
    objective = Objective(base.scheduler_config)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 8, 8, generator=g).clamp(-1, 1)  # the t = 0 term is a pixel likelihood
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t, y = torch.tensor([0, 1, 400, 999]), torch.tensor([1, 2, 3, 4])
    xt = objective.add_noise(x0, noise, t)
    mse, vb = objective.loss(base.transformer(xt, t, y).sample, x0, xt, noise, t)
    ref_mse, ref_vb = RefDiffusion().training_losses(reference, x0, t, y, noise)
    assert rel(mse, ref_mse) < RTOL and rel(vb, ref_vb) < RTOL


# ----------------------------------------------------------------------------- sampling
def _sample_both(reference, base, scheduler, steps, channels, guidance=4.0):
    labels, seeds = [1, 7, 3], [10, 11, 12]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ours = sampler.generate(base.transformer, Identity(), labels, gens, steps=steps, guidance=guidance,
                            scheduler=scheduler, cfg_channels="all" if channels == 4 else "first3",
                            scheduler_config=base.scheduler_config, image_size=8, progress=False) / Identity.scale
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise0 = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
    fn = guided(reference, torch.tensor(labels), guidance, channels)
    spec = f"ddim{steps}" if scheduler == "ddim" else str(steps)
    diffusion = RefDiffusion(space_timesteps(1000, spec))
    with torch.no_grad():
        want = diffusion.ddim(fn, noise0) if scheduler == "ddim" else diffusion.ddpm(fn, noise0, gens)
    return ours, want


@pytest.mark.parametrize("kind", ["pt", "folder"])
@pytest.mark.parametrize("channels", [3, 4])
def test_ddim25_with_guidance_equals_the_original(reference, load, kind, channels):
    ours, want = _sample_both(reference, load(kind), "ddim", 25, channels)
    assert rel(ours, want) < RTOL


@pytest.mark.parametrize("kind", ["pt", "folder"])
@pytest.mark.parametrize("channels", [3, 4])
def test_ddpm250_with_guidance_equals_the_original(reference, load, kind, channels):
    ours, want = _sample_both(reference, load(kind), "ddpm", 250, channels)
    assert rel(ours, want) < RTOL


def test_ddim_spacing_visits_the_originals_timesteps(load):
    base = load("pt")
    seen = []
    hook = base.transformer.register_forward_hook(lambda m, args, kw, out: seen.append(int(kw["timestep"][0])),
                                                  with_kwargs=True)
    run = dict(steps=25, guidance=1.0, scheduler="ddim", image_size=8, progress=False)
    sampler.generate(base.transformer, Identity(), [1], [torch.Generator().manual_seed(0)], **run)
    assert seen == sorted(space_timesteps(1000, "ddim25"), reverse=True) == list(range(960, -1, -40))
    seen.clear()
    sampler.generate(base.transformer, Identity(), [1], [torch.Generator().manual_seed(0)],
                    timestep_spacing="trailing", **run)
    assert seen[0] == 999 and seen[-1] == 39
    seen.clear()
    model.set_numerics(base.transformer, "diffusers")  # defectlab's own models keep trailing under auto
    sampler.generate(base.transformer, Identity(), [1], [torch.Generator().manual_seed(0)], **run)
    hook.remove()
    assert seen[0] == 999 and seen[-1] == 39
    with pytest.raises(DefectlabError, match="timestep_spacing"):
        sampler.spacing_for("ddim", "original", "evenly")


def test_diffusers_numerics_still_equal_dit_pipeline(sources, load):
    base = load("folder", numerics="diffusers")
    assert model.numerics_of(base.transformer) == "diffusers"
    labels, seeds = [1, 7], [3, 4]
    ours = sampler.generate(base.transformer, base.codec, labels, [torch.Generator().manual_seed(s) for s in seeds],
                            steps=4, guidance=4.0, scheduler="ddim", scheduler_config=base.scheduler_config,
                            image_size=16, progress=False)
    pipe = DiTPipeline.from_pretrained(sources["folder"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=labels, guidance_scale=4.0, generator=[torch.Generator().manual_seed(s) for s in seeds],
               num_inference_steps=4, output_type="pt").images
    assert torch.allclose((ours + 1) / 2, ref, atol=1e-5)
    faithful = sampler.generate(load("folder").transformer, base.codec, labels,
                                [torch.Generator().manual_seed(s) for s in seeds], steps=4, guidance=4.0,
                                scheduler="ddim", scheduler_config=base.scheduler_config, image_size=16,
                                progress=False, timestep_spacing="trailing")
    assert not torch.allclose(faithful, ours, atol=1e-3)  # only the timestep frequencies differ


# ----------------------------------------------------------------------------- which numerics, where
def test_auto_numerics_by_source(tmp_path):
    assert model.load("tiny").numerics == "diffusers"
    assert model.load("mini").numerics == "diffusers"
    assert model.default_numerics({"_class_name": "DiTPipeline"}) == "original"
    assert model.default_numerics({"_class_name": "DiTPipeline", "defectlab_numerics": "diffusers"}) == "diffusers"
    assert model.default_numerics(None, original_pt=True) == "original"
    with pytest.raises(DefectlabError, match="defectlab_numerics"):
        model.default_numerics({"defectlab_numerics": "fast"})
    with pytest.raises(DefectlabError, match="numerics must be"):
        model.load("tiny", numerics="dit")


def test_head_count_is_never_guessed(tmp_path):
    torch.manual_seed(0)
    ref = RefDiT(input_size=8, patch=2, in_ch=3, hidden=64, depth=1, heads=4, classes=5).eval()
    path = tmp_path / "odd.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(DefectlabError, match=r"odd.pt: width 64 .*--model-heads N.*config.json") as err:
        model.load(str(path))
    assert "\n" not in str(err.value)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        want = ref(x, t, y)
        assert rel(model.load(str(path), heads=4).transformer(x, t, y).sample, want) < RTOL
        (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
        assert rel(model.load(str(path)).transformer(x, t, y).sample, want) < RTOL
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DefectlabError, match="config.json"):
        model.load(str(path))
    with pytest.raises(DefectlabError, match="standard DiT with 6 heads"):  # DiT-S width: the table decides
        convert.original_config({**RefDiT(hidden=384, heads=6, depth=1).state_dict()}, heads=4)


def test_runs_store_and_restore_their_numerics(tmp_path):
    from test_train import tiny_cfg

    auto = train.run(tiny_cfg(tmp_path, method="difffit", epochs=1, name="auto"))
    forced = train.run(tiny_cfg(tmp_path, method="difffit", epochs=1, name="forced", numerics="original"))
    assert runs.load_config(auto)["numerics"] == "diffusers"      # tiny: what it was built with
    assert runs.load_config(forced)["numerics"] == "original"
    assert model.numerics_of(restore.restore(forced, "latest").model) == "original"
    assert model.numerics_of(restore.restore(forced, "latest", numerics="diffusers").model) == "diffusers"
    saved = runs.read_json(forced / "config.json")                 # a run from before the setting
    del saved["config"]["numerics"]
    runs.write_json(forced / "config.json", saved)
    assert model.numerics_of(restore.restore(forced, "latest").model) == "diffusers"
