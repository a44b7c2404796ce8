"""The guided sampler against diffusers' DiTPipeline, guidance variants, seeding, and run(cfg).

Tiny random models on the CPU: a latent DiT (4 → 8 channels, learned variance) with a tiny
AutoencoderKL, and an identity codec for the tests that look at latent channels directly.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from defectlab.base import images, runs
from defectlab.core import model, sampler
from defectlab.stages import sample
from defectlab.base.errors import DefectlabError


def tiny_dit(classes: int = 1000, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=classes).eval()


class VAECodec:
    """Stand-in for model.VAECodec (same interface): AutoencoderKL, latents scaled by 0.18215."""
    channels = 4

    def __init__(self):
        torch.manual_seed(1)
        self.vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()

    def latent_shape(self, image_size):
        return (4, image_size // 2, image_size // 2)

    def encode(self, x):
        return self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor

    def decode(self, z):
        return self.vae.decode(z / self.vae.config.scaling_factor).sample


class LatentCodec:
    """Identity on a 4-channel latent, scaled down so x0 predictions stay inside [-1, 1] (generate
    clamps its output) and every channel can be compared directly."""
    channels = 4

    def __init__(self, scale: float = 0.05):
        self.scale = scale

    def latent_shape(self, image_size):
        return (4, image_size, image_size)

    def encode(self, x):
        return x / self.scale

    def decode(self, z):
        return z * self.scale


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def count_forwards(model):
    sizes = []
    handle = model.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_matches_dit_pipeline_ddim():
    dit, codec = tiny_dit(), VAECodec()
    labels = [1, 7, 1]
    ours = sampler.generate(dit, codec, labels, gens(10, 11, 12), steps=4, guidance=4.0, scheduler="ddim",
                           cfg_channels="all", image_size=16, progress=False)
    pipe = DiTPipeline(transformer=dit, vae=codec.vae, scheduler=sampler.make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=labels, guidance_scale=4.0, generator=gens(10, 11, 12), num_inference_steps=4,
               output_type="pt").images
    assert ours.shape == (3, 3, 16, 16)
    assert torch.allclose((ours + 1) / 2, ref, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # the class matters


def test_guidance_one_is_conditional_only_and_one_forward_per_step():
    dit, codec = tiny_dit(), VAECodec()
    sizes, handle = count_forwards(dit)
    ours = sampler.generate(dit, codec, [3, 5], gens(1, 2), steps=3, guidance=1.0, scheduler="ddim",
                           image_size=16, progress=False)
    handle.remove()
    assert sizes == [2, 2, 2]  # no unconditional half
    pipe = DiTPipeline(transformer=dit, vae=codec.vae, scheduler=sampler.make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=[3, 5], guidance_scale=1.0, generator=gens(1, 2), num_inference_steps=3,
               output_type="pt").images  # the pipeline runs conditional-only at scale ≤ 1
    assert torch.allclose((ours + 1) / 2, ref, atol=1e-5)

    sizes, handle = count_forwards(dit)
    sampler.generate(dit, codec, [3, 5], gens(1, 2), steps=3, guidance=2.0, scheduler="ddim", image_size=16,
                    progress=False)
    handle.remove()
    assert sizes == [4, 4, 4]  # conditional + unconditional in one forward


def test_first3_guides_only_the_first_three_channels():
    dit, codec = tiny_dit(), LatentCodec(scale=1e-3)  # one step from t=999 predicts x0 ≈ 100× the noise

    def one_step(**kw):
        return sampler.generate(dit, codec, [2, 9], gens(5, 6), steps=1, scheduler="ddim", progress=False, **kw)

    guided_all = one_step(guidance=3.0, cfg_channels="all")
    guided_3 = one_step(guidance=3.0, cfg_channels="first3")
    cond = one_step(guidance=1.0)
    assert (guided_all.abs() < 0.99).float().mean() > 0.95  # not saturated by the clamp
    assert torch.allclose(guided_3[:, :3], guided_all[:, :3], atol=1e-6)
    assert torch.allclose(guided_3[:, 3], cond[:, 3], atol=1e-6)
    assert not torch.allclose(guided_all[:, 3], cond[:, 3], atol=1e-3)  # guidance did change channel 3


def test_guidance_interval_limits_the_guided_steps():
    dit, codec = tiny_dit(), LatentCodec()
    run = dict(steps=4, guidance=3.0, scheduler="ddim", progress=False, image_size=8)
    sizes, handle = count_forwards(dit)
    outside = sampler.generate(dit, codec, [4], gens(3), guidance_interval=(0, 100), **run)
    part = sampler.generate(dit, codec, [4], gens(3), guidance_interval=(500, 1000), **run)
    handle.remove()
    # DDIM trailing over 4 steps: t = 999, 749, 499, 249
    assert sizes == [1, 1, 1, 1] + [2, 2, 1, 1]
    cond = sampler.generate(dit, codec, [4], gens(3), **{**run, "guidance": 1.0})
    assert torch.equal(outside, cond)
    assert not torch.allclose(part, cond, atol=1e-4)


def test_null_class_is_num_embeds_ada_norm():
    dit = tiny_dit(classes=3)  # after class surgery K=3: the null row is index 3, not 1000
    out = sampler.generate(dit, LatentCodec(), [0, 2], gens(1, 2), steps=2, guidance=2.0, scheduler="ddim",
                          progress=False)
    assert torch.isfinite(out).all()
    null = sampler.generate(dit, LatentCodec(), [3], gens(1), steps=2, guidance=2.0, progress=False)
    assert torch.isfinite(null).all()  # the null row itself: an unconditional sample
    with pytest.raises(DefectlabError, match="out of range"):
        sampler.generate(dit, LatentCodec(), [4], gens(1), steps=2, progress=False)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpmsolver"])  # stochastic steps; multistep state
def test_per_sample_determinism(scheduler):
    dit, codec = tiny_dit(), LatentCodec()
    run = dict(steps=4, guidance=2.0, scheduler=scheduler, progress=False, image_size=8)
    seeds = [sampler.sample_seed(0, c, i) for c, i in [("crack", 0), ("hole", 0), ("crack", 1), ("hole", 1)]]
    labels = [1, 2, 1, 2]
    whole = sampler.generate(dit, codec, labels, gens(*seeds), batch_size=4, **run)
    again = sampler.generate(dit, codec, labels, gens(*seeds), batch_size=4, **run)
    assert torch.equal(whole, again)  # the same call is bit-identical
    ones = sampler.generate(dit, codec, labels, gens(*seeds), batch_size=1, **run)
    # other companions: image 2 beside unrelated images, in another position
    mixed = sampler.generate(dit, codec, [7, 1, 3], gens(99, seeds[2], 98), batch_size=3, **run)
    # batched matmuls round differently by batch size (≈1e-6), hence a tolerance
    assert torch.allclose(whole, ones, atol=1e-5)
    assert torch.allclose(mixed[1], whole[2], atol=1e-5)
    assert not torch.allclose(whole[0], whole[2], atol=1e-3)  # different index → different image


def test_ddpm_learned_range_uses_variance_and_per_sample_noise():
    dit, codec = tiny_dit(), LatentCodec()
    run = dict(steps=3, guidance=1.5, scheduler="ddpm", progress=False, image_size=8)
    a = sampler.generate(dit, codec, [1, 2], gens(1, 2), **run)
    b = sampler.generate(dit, codec, [1, 2], gens(1, 2), **run)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    sched = sampler.make_scheduler("ddpm")
    assert sched.config.variance_type == "learned_range" and not sched.config.clip_sample

    def shift_variance(mod, args, out):  # move the variance half only
        out.sample[:, 4:] += 0.5

    handle = dit.register_forward_hook(shift_variance)
    shifted = {name: sampler.generate(dit, codec, [1, 2], gens(1, 2), **{**run, "scheduler": name})
               for name in ("ddpm", "ddim")}
    handle.remove()
    assert not torch.allclose(shifted["ddpm"], a, atol=1e-4)  # DDPM samples with the learned variance
    ddim = sampler.generate(dit, codec, [1, 2], gens(1, 2), **{**run, "scheduler": "ddim"})
    assert torch.equal(shifted["ddim"], ddim)  # DDIM only reads the eps half
    # a model without the variance half falls back to DiT's fixed_large instead of failing
    torch.manual_seed(0)
    plain = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    assert torch.isfinite(sampler.generate(plain, codec, [1], gens(1), **run)).all()


def test_any_step_count_and_defaults():
    dit, codec = tiny_dit(), LatentCodec()
    for name in sampler.SCHEDULERS:
        assert sampler.DEFAULT_STEPS[name] >= 1
        out = sampler.generate(dit, codec, [1], gens(1), steps=1, scheduler=name, progress=False, image_size=8)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert sampler.DEFAULT_STEPS == {"ddpm": 250, "ddim": 50, "dpmsolver": 25}


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, "steps"), ({"guidance": -1.0}, "guidance"), ({"scheduler": "euler"}, "scheduler"),
    ({"cfg_channels": "first4"}, "cfg_channels"), ({"guidance_interval": (800, 200)}, "interval"),
])
def test_generate_rejects_bad_input(kw, message):
    with pytest.raises(DefectlabError, match=message):
        sampler.generate(tiny_dit(), LatentCodec(), [1], gens(1), progress=False, **kw)


def test_seeds_are_stable():
    # crc32 of "0/crack/3": the same in every process and on every machine
    assert sampler.sample_seed(0, "crack", 3) == 1884628382
    assert len({sampler.sample_seed(s, c, i) for s in (0, 1) for c in ("a", "b") for i in range(3)}) == 12


# ----------------------------------------------------------------------------- run(cfg)
@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run folder stand-in (run() only needs _load_source's answer); counts forwards."""
    folder = tmp_path / "007-screw-difffit"
    folder.mkdir()
    dit = tiny_dit(classes=3)
    sizes, _ = count_forwards(dit)

    def load(cfg, device):
        return sample._Source(dit, LatentCodec3(), sampler.TRAINING_SCHEDULE, ["crack", "hole", "scratch"],
                              [0, 1, 2], ["crack", "hole", "scratch"], "screw", folder, folder.name,
                              "0000040", "tiny", cfg.image_size or 8)

    monkeypatch.setattr(sample, "_load_source", load)
    return folder, sizes


class LatentCodec3(LatentCodec):
    def decode(self, z):  # RGB out of the 4-channel latent
        return z[:, :3] * 0.05


def test_run_writes_mvtec_layout_manifest_and_grid(fake_run):
    folder, _ = fake_run
    cfg = sample.SampleConfig(run="7", classes="crack,scratch", per_class=3, steps=2, scheduler="ddim",
                              batch_size=4, formats="png,pdf")
    out = sample.run(cfg)
    assert out == folder / "samples" / "0000040-ddim2-g1.5-all-s0-8px"
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [f"screw/test/{c}/{i:04d}.png" for c in ("crack", "scratch") for i in range(3)]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["label"] for r in records} == {0, 2}
    assert set(records[0]) >= {"file", "class", "label", "index", "seed", "steps", "guidance", "cfg_channels",
                               "scheduler", "run", "checkpoint"}
    assert records[0]["run"] == folder.name and records[0]["checkpoint"] == "0000040"
    saved = json.loads((out / "sample_config.json").read_text())
    assert saved["steps"] == 2 and saved["classes"] == "crack,scratch"
    assert not list(out.glob(".manifest-part-*"))
    figs = sorted(p.name for p in (folder / "figures").iterdir())
    assert figs == ["samples-0000040-ddim2-g1.5-all-s0-8px.pdf", "samples-0000040-ddim2-g1.5-all-s0-8px.png"]


def test_run_is_resumable_and_bit_identical(fake_run, tmp_path):
    folder, sizes = fake_run
    base = dict(run="7", per_class=2, steps=2, scheduler="ddpm", guidance=1.0)
    out = sample.run(sample.SampleConfig(**base, batch_size=6))
    first = {p: p.read_bytes() for p in out.rglob("*.png")}
    (out / "screw/test/hole/0001.png").unlink()
    sizes.clear()
    sample.run(sample.SampleConfig(**base, batch_size=6))
    assert sizes == [1, 1]  # only the missing image, 2 steps, no unconditional pass
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == first
    # more per class into the same folder: allowed, earlier images kept
    sizes.clear()
    sample.run(sample.SampleConfig(**{**base, "per_class": 3}, batch_size=6))
    assert sizes == [3, 3] and len(list(out.rglob("*.png"))) == 9
    # the same call elsewhere gives bit-identical PNGs
    other = sample.run(sample.SampleConfig(**base, batch_size=6, out=str(tmp_path / "copy")))
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*.png")} == \
        {p.relative_to(out): b for p, b in first.items()}


def test_run_refuses_bad_input(fake_run, tmp_path):
    folder, _ = fake_run
    base = dict(run="7", per_class=1, steps=1, scheduler="ddim", out=str(tmp_path / "o"))
    sample.run(sample.SampleConfig(**base))
    with pytest.raises(DefectlabError, match="another configuration.*guidance"):
        sample.run(sample.SampleConfig(**{**base, "guidance": 4.0}))
    with pytest.raises(DefectlabError, match="unknown class dent.*crack, hole, scratch"):
        sample.run(sample.SampleConfig(**{**base, "classes": "dent"}))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DefectlabError, match="not empty"):
        sample.run(sample.SampleConfig(**{**base, "out": str(tmp_path / "junk")}))
    for bad, message in [({"steps": -1}, "steps"), ({"guidance": -0.5}, "guidance"),
                         ({"scheduler": "euler"}, "scheduler"), ({"cfg_channels": "x"}, "cfg_channels"),
                         ({"formats": "png,jpg"}, "format")]:
        with pytest.raises(DefectlabError, match=message):
            sample.run(sample.SampleConfig(**{**base, **bad}))


def test_latest_run_is_the_highest_number(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.paths, "RUNS", tmp_path)
    with pytest.raises(DefectlabError, match="no run with a checkpoint"):
        runs.resolve("latest")
    for name in ("002-a", "010-b", "009-c"):
        runs.save_checkpoint(tmp_path / name, 1, {"w": torch.zeros(1)}, {})
    for name in ("011-failed", "notes"):  # a run without a checkpoint is passed over
        (tmp_path / name).mkdir()
    assert runs.resolve("latest").name == "010-b"


def test_run_folder_without_checkpoint(tmp_path):
    folder = tmp_path / "003-empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(DefectlabError, match="no checkpoint"):
        sample.run(sample.SampleConfig(run=str(folder)))


def test_run_folder_end_to_end(tmp_path):
    """A real (very short) fine-tuning run: sample.run restores it and seeds images as documented."""
    from defectlab.core import restore
    from defectlab.stages import train

    folder = train.run(train.TrainConfig(model="tiny", method="difffit", product="hazelnut", image_size=16,
                                         epochs=1, max_steps=1, batch_size=2, grad_accum=1, val_every=1,
                                         val_per_class=1, val_timesteps=1, runs_dir=str(tmp_path), progress=False))
    cfg = sample.SampleConfig(run=str(folder), classes="hole,crack", per_class=1, steps=2, guidance=2.0,
                              scheduler="ddpm", seed=3)
    out = sample.run(cfg)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["class"], r["file"]) for r in records] == [("crack", "hazelnut/test/crack/0000.png"),
                                                         ("hole", "hazelnut/test/hole/0000.png")]
    restored = restore.restore(folder)
    assert records[0]["checkpoint"] == restored.checkpoint.name
    assert (folder / "figures" / f"samples-{out.name}.png").is_file()
    # the PNG is generate() on the restored model with the documented per-sample generator
    label = restored.classes.index("hole")
    img = sampler.generate(restored.model, restored.base.codec, [label], sampler.generators(3, "hole", [0]), steps=2,
                          guidance=2.0, scheduler="ddpm", scheduler_config=restored.base.scheduler_config,
                          image_size=16, progress=False)
    assert torch.allclose(images.load_png(out / records[1]["file"]), img[0], atol=1.5 / 127.5)


def test_pixel_space_sampling_clips_x0_by_default():
    """Without a scheduler_config, a pixel-space codec still gets DiT's clipped x0 (what
    Base.scheduler_config says for tiny/mini): unclipped pixel samples saturate to ±1."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4).eval()
    run = dict(steps=4, guidance=2.0, scheduler="ddim", progress=False)
    default = sampler.generate(dit, model.PixelCodec(), [1, 2], gens(1, 2), **run)
    clipped = sampler.generate(dit, model.PixelCodec(), [1, 2], gens(1, 2), **run,
                              scheduler_config={**sampler.TRAINING_SCHEDULE, "clip_sample": True})
    raw = sampler.generate(dit, model.PixelCodec(), [1, 2], gens(1, 2), **run,
                          scheduler_config={**sampler.TRAINING_SCHEDULE, "clip_sample": False})
    assert torch.equal(default, clipped) and not torch.allclose(default, raw, atol=1e-3)
    assert model.PixelCodec.clip_sample and not model.VAECodec.clip_sample


class VOracle(torch.nn.Module):
    """Knows the one clean image ``x0`` and returns its exact v for any (x_t, t): every correct
    v sampler lands on ``x0``, whatever the noise."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.anchor = x0, torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(out_channels=3, in_channels=3, sample_size=x0.shape[-1], num_embeds_ada_norm=2)
        self.abar = DDPMScheduler.from_config(sampler.TRAINING_SCHEDULE).alphas_cumprod

    def forward(self, x, timestep, class_labels):
        a = self.abar[timestep.long()].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * self.x0)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver"])
def test_samplers_follow_the_bases_prediction_type(scheduler):
    """A v-prediction base (defectlab-mini) is sampled as v: with its own prediction type an
    oracle's samples are its image; read as eps, the same outputs are not."""
    x0 = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    oracle = VOracle(x0)
    run = dict(steps=10, guidance=1.0, scheduler=scheduler, progress=False)
    v = {**sampler.TRAINING_SCHEDULE, "variance_type": "fixed_small", "prediction_type": "v_prediction"}
    out = sampler.generate(oracle, model.PixelCodec(), [0, 1], gens(1, 2), **run, scheduler_config=v)
    assert (out - x0).abs().max() < 0.02
    if scheduler != "ddpm":  # ddpm's last step is t=0, where v = eps: the oracle would mend it there
        as_eps = sampler.generate(oracle, model.PixelCodec(), [0, 1], gens(1, 2), **run,
                                 scheduler_config={**v, "prediction_type": "epsilon"})
        assert (as_eps - x0).abs().max() > 0.3
