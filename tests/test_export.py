"""``defectlab export``: a run as a diffusers folder that DiTPipeline (latent bases) and defectlab
load and sample as the run samples; DiffFit γ folded, LoRA merged; refusals are one line."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from defectlab.base import images
from defectlab.core import model, restore, sampler
from defectlab.stages import sample, train
from defectlab.reports import export
from defectlab.base.errors import DefectlabError
from test_train import tiny_cfg


@pytest.fixture(scope="module")
def latent_base(tmp_path_factory):
    """A tiny latent DiT (4 → 8 channels, 1000 classes) with a tiny AutoencoderKL (2x), as a DiTPipeline
    folder that says it computes diffusers' numerics."""
    folder = tmp_path_factory.mktemp("latent") / "base"
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    DiTPipeline(transformer=dit, vae=vae, scheduler=sampler.make_scheduler("ddim")).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "defectlab_numerics": "diffusers"}))
    return folder


def _generate(net, base, classes, names, seed=5, steps=4, guidance=4.0):
    gens = [sampler.generators(seed, c, [0])[0] for c in names]
    return sampler.generate(net, base.codec, [classes.index(c) for c in names], gens, steps=steps, guidance=guidance,
                            scheduler="ddim", scheduler_config=base.scheduler_config, image_size=16, progress=False)


@pytest.mark.parametrize("method, numerics", [("difffit", "diffusers"), ("lora", "original")])
def test_latent_export_samples_in_dit_pipeline_as_defectlab_does(tmp_path, latent_base, method, numerics):
    folder = train.run(tiny_cfg(tmp_path, model=str(latent_base), method=method, numerics=numerics, image_size=16,
                                epochs=2, lr=2e-2, report_to="none"))
    restored = restore.restore(folder)
    trained = dict(restored.model.named_parameters())
    if method == "difffit":  # the fold is exercised: γ moved away from 1
        assert (trained["transformer_blocks.0.difffit_gamma_attn"] - 1).abs().max() > 1e-3
    out = export.run(export.ExportConfig(run=str(folder), out=str(tmp_path / "export")))
    assert {p.name for p in out.iterdir()} >= {"transformer", "vae", "scheduler", "model_index.json", "README.md"}
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    ours_json = json.loads((out / model.SIDECAR).read_text())  # defectlab's settings, beside DiTPipeline's index
    assert ours_json["defectlab_numerics"] == numerics
    assert ours_json["id2label"] == {"0": "crack", "1": "cut", "2": "hole", "3": "print"}
    names = ["print", "crack"]
    ours = _generate(restored.model, restored.base, restored.classes, names)

    pipe = DiTPipeline.from_pretrained(out, id2label={int(k): v for k, v in ours_json["id2label"].items()})  # offline
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(names) == [3, 0]
    ref = pipe(class_labels=[3, 0], guidance_scale=4.0, generator=[sampler.generators(5, c, [0])[0] for c in names],
               num_inference_steps=4, output_type="pt").images
    card = (out / "README.md").read_text()
    if numerics == "diffusers":
        assert torch.allclose((ours + 1) / 2, ref, atol=1e-5)
        # ... and the PNGs `defectlab sample` writes for the same seed (8-bit: within one level)
        samples = sample.run(sample.SampleConfig(run=str(folder), classes="print,crack", per_class=1, steps=4,
                                                 guidance=4.0, scheduler="ddim", seed=5))
        pngs = torch.stack([images.load_png(samples / f"hazelnut/test/{c}/0000.png") for c in names])
        assert (pngs - (ref * 2 - 1)).abs().max() <= 2 / 255 + 1e-6
        assert "Numerics" not in card
    else:  # DiTPipeline computes diffusers' frequencies: not this model's; the card says so
        assert not torch.allclose((ours + 1) / 2, ref, atol=1e-3)
        assert "**Numerics.**" in card and "defectlab_numerics" in card
    # defectlab loads the export with the run's numerics and samples the run's images
    base = model.load(str(out))
    assert base.numerics == numerics and base.default_image_size == 16
    again = _generate(base.transformer, base, restored.classes, names)
    assert torch.allclose(again, ours, atol=1e-5)
    assert "DiTPipeline.from_pretrained" in card and "| best_val_loss |" in card


def test_pixel_export_loads_in_defectlab_and_says_why_not_dit_pipeline(tmp_path):
    folder = train.run(tiny_cfg(tmp_path, method="difffit", epochs=1, lr=2e-2, report_to="none"))
    out = export.run(export.ExportConfig(run=str(folder), out=str(tmp_path / "export")))
    assert not (out / "vae").exists()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    card = (out / "README.md").read_text()
    assert "DiTPipeline cannot sample this model" in card and "defectlab sample --run base --model" in card
    assert "pixel-space DiT (32 px" in card
    restored, base = restore.restore(folder), model.load(str(out))
    assert base.default_image_size == 32 and model.methods.num_classes(base.transformer) == export.NULL
    plain = [n for n, _ in base.transformer.named_parameters() if "difffit" in n or "lora" in n]
    assert not plain  # folded: a plain DiTTransformer2DModel
    net = restored.model
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 4])  # 4 = the run's null row
    with torch.no_grad():
        want = net(x, timestep=t, class_labels=y).sample
        got = base.transformer(x, timestep=t, class_labels=torch.tensor([1, export.NULL])).sample
    assert torch.allclose(got, want, atol=1e-5)


def test_vpt_export_loads_in_defectlab_with_its_prompts_and_no_pipeline_index(tmp_path, latent_base):
    """DiTPipeline cannot give prompt tokens: the export has no model_index.json (DiTPipeline
    refuses it instead of sampling without them); defectlab loads the prompts and samples the run."""
    folder = train.run(tiny_cfg(tmp_path, model=str(latent_base), method="vpt", vpt_tokens=2, image_size=16,
                                epochs=1, lr=2e-2, report_to="none"))
    restored = restore.restore(folder)
    out = export.run(export.ExportConfig(run=str(folder), out=str(tmp_path / "export")))
    assert {p.name for p in out.iterdir()} == {"transformer", "vae", "scheduler", model.SIDECAR, model.PROMPTS,
                                               "README.md"}
    assert json.loads((out / model.SIDECAR).read_text())["defectlab_prompts"] == {"tokens": 2, "depth": "shallow"}
    assert "visual prompt tuning" in (out / "README.md").read_text()
    with pytest.raises(Exception):
        DiTPipeline.from_pretrained(out)
    names = ["print", "crack"]
    base = model.load(str(out))
    assert torch.equal(base.transformer.prompts.weight, restored.model.prompts.weight)
    again = _generate(base.transformer, base, restored.classes, names)
    assert torch.allclose(again, _generate(restored.model, restored.base, restored.classes, names), atol=1e-5)


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(DefectlabError, match="not a hub repo id") as err:
        export.run(export.ExportConfig(run="no-such-run", push_to_hub="a/b/c"))
    assert "\n" not in str(err.value)
    with pytest.raises(DefectlabError, match="HF_HUB_OFFLINE"):  # tests run offline (conftest)
        export.run(export.ExportConfig(run="no-such-run", push_to_hub="me/defects"))
    masked = train.run(tiny_cfg(tmp_path, epochs=1, max_steps=1, mask_condition=True, report_to="none"))
    with pytest.raises(DefectlabError, match="mask-conditioned") as err:
        export.run(export.ExportConfig(run=str(masked)))
    assert "\n" not in str(err.value)
