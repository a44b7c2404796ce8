"""Mask conditioning and inpainting on the tiny model (CPU): zero-init channel, training under every
method, exact inpainting, procedural / transformed masks, MVTec pairs read back, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from defectlab.base import images, runs
from defectlab.data import dataset, sources
from defectlab.core import masks, methods, restore, sampler
from defectlab.stages import synthesize, train
from defectlab.core.codec import PixelCodec
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError


def build(method="difffit", mask_condition=True):
    cfg = train.TrainConfig(model="tiny", method=method, mask_condition=mask_condition, image_size=32)
    return restore.build(cfg, ["a", "b"])


def good_images(n=2, size=32):
    dd = sources.load(sources.DataConfig(product="hazelnut", image_size=size))
    return torch.stack([dataset.load_image(g, size) for g in dd.good[:n]])


# ----------------------------------------------------------------------------- the channel
def test_mask_channel_at_init_is_bit_identical_to_the_base():
    _, plain = build(mask_condition=False)
    _, masked = build()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 700]), torch.tensor([0, 1])
    mask = (torch.rand(2, 1, 32, 32) > 0.7).float()
    with torch.no_grad():
        ref = plain.eval()(x, timestep=t, class_labels=y).sample
        out = masked.eval()(torch.cat([x, mask], 1), timestep=t, class_labels=y).sample
    assert torch.equal(ref, out)
    assert out.shape[1] == 6  # unpatchify still uses out_channels = 2C
    assert masked.config.in_channels == 3 and methods.has_mask_channel(masked) and not methods.has_mask_channel(plain)


@pytest.mark.parametrize("method", methods.METHODS)
def test_mask_channel_trains_under_every_method_and_frozen_weights_stay(method):
    _, net = build(method)
    weight = net.pos_embed.proj.mask_weight
    assert weight.requires_grad and "pos_embed.proj.mask_weight" in methods.trainable_state(net)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen or method == "full"
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    objective = Objective(train.model_mod.dit_schedule())
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    mask, t = masks.procedural_mask("ellipse", 32).expand(2, 1, 32, 32), torch.tensor([100, 600])
    xt = objective.add_noise(x0, noise, t)
    out = net.train()(torch.cat([xt, mask], 1), timestep=t, class_labels=torch.tensor([0, 1])).sample
    mse, vb = objective.loss(out, x0, xt, noise, t)
    (mse + vb).mean().backward()
    opt.step()
    assert weight.abs().sum() > 0  # moved off zero
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("kind", masks.KINDS)
def test_procedural_masks_have_the_requested_place_and_size(kind):
    m = masks.procedural_mask(kind, 64, cx=0.3, cy=0.6, scale=0.4, seed=3)
    assert m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    x0, y0, x1, y1 = masks.bbox(m)
    assert abs((x0 + x1) / 2 - 0.3 * 64) <= 1 and abs((y0 + y1) / 2 - 0.6 * 64) <= 1
    assert abs(max(x1 - x0, y1 - y0) - 0.4 * 64) <= 2
    assert torch.equal(m, masks.procedural_mask(kind, 64, cx=0.3, cy=0.6, scale=0.4, seed=3))
    turned = masks.bbox(masks.procedural_mask(kind, 64, cx=0.5, cy=0.5, scale=0.4, angle=90, seed=3))
    upright = masks.bbox(masks.procedural_mask(kind, 64, cx=0.5, cy=0.5, scale=0.4, seed=3))
    assert abs((turned[2] - turned[0]) - (upright[3] - upright[1])) <= 2  # width ↔ height
    if kind != "ellipse":
        assert not torch.equal(m, masks.procedural_mask(kind, 64, cx=0.3, cy=0.6, scale=0.4, seed=4))


def test_dataset_mask_transforms_move_rotate_and_scale():
    bar = torch.zeros(1, 64, 64)
    bar[0, 30:34, 32:52] = 1  # a bar from the centre to the right
    moved = masks.transform_mask(bar, cx=0.25, cy=0.75)
    x0, y0, x1, y1 = masks.bbox(moved)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (16.0, 48.0) and moved.sum() == bar.sum()
    turned = masks.transform_mask(bar, angle=90)  # counter-clockwise about its centre: now vertical
    x0, y0, x1, y1 = masks.bbox(turned)
    assert (x1 - x0, y1 - y0) == (4.0, 20.0) and abs((x0 + x1) / 2 - 42) <= 1 and abs((y0 + y1) / 2 - 32) <= 1
    big = masks.transform_mask(bar, scale=1.5)
    assert abs(big.sum() / bar.sum() - 2.25) < 0.25 and set(big.unique().tolist()) == {0.0, 1.0}


def _procedural(product, defect, seed, size=64):
    from defectlab.data import synth
    img, parts = synth.product_image(product, np.random.default_rng(seed), size)
    if defect:
        img, mask = synth.draw_defect(img, defect, np.random.default_rng(seed + 1), parts)
    else:
        mask = np.zeros(parts.shape, bool)
    return (torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1,
            torch.from_numpy(mask.astype(np.float32))[None], parts)


@pytest.mark.parametrize("defect,part", [("scratch_head", 2), ("thread_top", 3)])
def test_carried_masks_land_on_the_same_part_of_another_product(defect, part):
    """A mask drawn on one screw's head lands on another screw's head, whatever the two poses; at
    its own pixels it mostly lands on the background (screws lie at any angle)."""
    from defectlab.data import synth
    part = {2: synth.HEAD, 3: synth.NECK}[part]
    on_part, kept_on_part = [], []
    for i in range(6):
        source, mask, _ = _procedural("screw", defect, 10 * i)
        target, _, parts = _procedural("screw", None, 10 * i + 5)
        near = torch.nn.functional.max_pool2d(torch.from_numpy(parts == part).float()[None, None], 5, 1, 2)[0] > 0
        moved = masks.carry(mask, source, target)
        assert set(moved.unique().tolist()) <= {0.0, 1.0} and moved.shape == mask.shape
        on_part.append(float(moved[near].sum() / moved.sum()))
        kept_on_part.append(float(mask[near].sum() / mask.sum()))
    assert min(on_part) >= 0.8 and np.mean(kept_on_part) < 0.5


def test_carry_recovers_a_known_rotation_and_shift():
    source, mask, _ = _procedural("screw", "thread_top", 3)
    for turns, shift in ((0, (3, -5)), (1, (0, 4)), (3, (-4, 2))):  # quarter turns + a wrapped shift: exact moves
        move = lambda t: torch.roll(torch.rot90(t, turns, dims=(-2, -1)), shift, dims=(-2, -1))
        got, want = masks.carry(mask, source, move(source)), move(mask)
        assert float((got * want).sum() / ((got + want) > 0).sum()) >= 0.6
    blank = torch.full_like(source, float(source[0, 0, 0]))
    assert torch.equal(masks.carry(mask, source, blank), mask)  # no product on the target: the mask stays


def test_bad_masks_are_one_clear_line():
    with pytest.warns(UserWarning, match="64x64; resized to the 32x32"):
        fitted = masks.fit_mask(masks.procedural_mask("stroke", 64, scale=0.5), 32)
    assert fitted.shape == (1, 32, 32) and fitted.sum() > 0  # a thin stroke survives the resize
    cases = [(lambda: masks.fit_mask(torch.ones(1, 32, 48), 32), "48x32, not square"),
             (lambda: masks.check_mask(torch.zeros(1, 32, 32)), "empty"),
             (lambda: masks.check_mask(torch.ones(1, 32, 32)), "covers 100% of the image"),
             (lambda: masks.procedural_mask("star", 32), "unknown mask kind 'star'"),
             (lambda: masks.transform_mask(torch.zeros(1, 8, 8), cx=0.5), "empty")]
    for call, message in cases:
        with pytest.raises(DefectlabError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("scheduler, resample", [("ddim", 1), ("ddpm", 2)])
def test_inpainting_keeps_the_outside_and_changes_only_inside(scheduler, resample):
    base, net = build(mask_condition=False)
    good = good_images()
    mask = torch.stack([masks.procedural_mask("blob", 32, 0.5, 0.5, 0.4, seed=s) for s in range(2)])
    gens = lambda: sampler.generators(0, "a", [0, 1])  # noqa: E731
    out = masks.inpaint(net, base.codec, good, mask, [0, 1], gens(), steps=3, scheduler=scheduler, resample=resample)
    assert torch.equal(out * (1 - mask), good * (1 - mask))  # exact: final composite in pixel space
    assert (out - good).abs()[mask.expand_as(good) > 0].mean() > 0.05  # something was generated inside
    share = masks.change_share(out, good, mask)
    assert share == 1.0
    metrics = masks.mask_metrics(out, mask, good)
    assert metrics["change_in_mask_share"] > 0.95 and metrics["max_change_outside"] == 0.0
    again = masks.inpaint(net, base.codec, good, mask, [0, 1], gens(), steps=3, scheduler=scheduler, resample=resample)
    assert torch.equal(out, again)  # per-sample generators


class _Blurry(PixelCodec):
    """A codec that loses fine structure (a 3 x 3 box blur on decode), as a small VAE does."""

    def decode(self, z):
        return F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, 1).clamp(-1, 1)


def test_refine_with_detail_keeps_what_the_codec_loses_of_the_copy():
    """``detail``: the copy's structure that decoding loses is added back inside the mask, so at a
    low strength the redrawn defect is far closer to the pasted one; outside the mask nothing
    changes, and a codec that loses nothing makes ``detail`` a no-op."""
    base, net = build(mask_condition=False)
    good = good_images()
    mask = torch.stack([masks.procedural_mask("blob", 32, 0.5, 0.5, 0.4, seed=s) for s in range(2)])
    pasted = good.clone()
    pasted[:, :, ::2] = torch.where(mask[:, :, ::2] > 0, -good[:, :, ::2], good[:, :, ::2])  # fine stripes inside
    gens = lambda: sampler.generators(0, "a", [0, 1])  # noqa: E731
    run = lambda codec, detail: masks.inpaint(net, codec, good, mask, [0, 1], gens(), steps=4, scheduler="ddim",  # noqa: E731
                                              init=pasted, strength=0.25, detail=detail)
    inside = mask.expand_as(good) > 0
    lossy, kept = run(_Blurry(), False), run(_Blurry(), True)
    for out in (lossy, kept):
        assert torch.equal(out * (1 - mask), good * (1 - mask))
    assert (kept - pasted).abs()[inside].mean() < 0.5 * (lossy - pasted).abs()[inside].mean()
    assert torch.equal(run(base.codec, True), run(base.codec, False))  # pixel space: nothing lost


def test_defect_detector_finds_real_defects_inside_their_masks():
    dd = sources.load(sources.DataConfig(product="hazelnut", image_size=32))
    picked = dd.train[::4]
    images = torch.stack([dataset.load_image(s.image, 32) for s in picked])
    truth = torch.stack([dataset.load_mask(s.mask, 32) for s in picked])
    real = masks.mask_metrics(images, truth)
    assert real["defect_in_mask_share"] > 0.85 and real["defect_mask_recall"] > 0.2
    assert masks.defect_pixels(good_images(8)).float().mean() < 0.002  # (almost) nothing on good images


# ----------------------------------------------------------------------------- run(cfg) end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = train.run(train.TrainConfig(
        model="tiny", method="lora", mask_condition=True, product="hazelnut", image_size=16, epochs=1, max_steps=2,
        batch_size=2, grad_accum=1, val_every=1, val_per_class=1, val_timesteps=1,
        runs_dir=str(tmp_path_factory.mktemp("runs")), progress=False))
    return folder


def test_mask_conditioned_run_restores_and_generates_pairs(trained, tmp_path):
    restored = restore.restore(trained)
    saved = runs.load_tensors(restored.checkpoint / runs.STATE_FILE)
    weight = restored.model.pos_embed.proj.mask_weight
    assert torch.equal(weight, saved["pos_embed.proj.mask_weight"]) and weight.abs().sum() > 0
    cfg = synthesize.MaskSampleConfig(run=str(trained), mode="condition", classes="crack,hole", per_class=2,
                                 mask="dataset", cx=0.5, cy=0.5, steps=2, scheduler="ddim", out=str(tmp_path / "c"))
    out = synthesize.run(cfg)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["class"], r["index"]) for r in records] == [("crack", 0), ("crack", 1), ("hole", 0), ("hole", 1)]
    back = sources.load(sources.DataConfig(data=str(out), product="hazelnut", image_size=16))
    assert back.classes == ["crack", "hole"] and all(s.mask is not None for s in back.train + back.test)
    first = back.train[0]
    mask = dataset.load_mask(first.mask, 16)
    x0, y0, x1, y1 = masks.bbox(mask)
    assert abs((x0 + x1) / 2 - 8) <= 1 and abs((y0 + y1) / 2 - 8) <= 1  # moved to the requested centre
    # resumable and seeded per pair: a deleted pair comes back (alone in its batch: equal up to float
    # rounding, ≤ 1 grey level), the others are not rewritten
    png = {p: p.read_bytes() for p in out.rglob("*.png")}
    stamp = (out / records[0]["file"]).stat().st_mtime_ns
    gone = out / records[3]["file"]
    before = images.load_png(gone)
    gone.unlink()
    synthesize.run(cfg)
    assert (images.load_png(gone) - before).abs().max() <= 1 / 127.5 + 1e-6
    assert {p: b for p, b in png.items() if p != gone} == {p: p.read_bytes() for p in out.rglob("*.png") if p != gone}
    assert (out / records[0]["file"]).stat().st_mtime_ns == stamp
    # the mask reaches the model: another mask, same seed → another image
    other = synthesize.run(synthesize.MaskSampleConfig(**{**cfg.__dict__, "cx": 0.3, "out": str(tmp_path / "c2")}))
    assert (other / records[0]["file"]).read_bytes() != png[out / records[0]["file"]]
    summary = masks.summarize(out)
    assert summary["mode"] == "condition" and set(summary["per_class"]) == {"crack", "hole"}


def test_inpaint_run_with_a_png_mask(trained, tmp_path):
    png = tmp_path / "m.png"
    Image.fromarray((masks.procedural_mask("ellipse", 64, 0.5, 0.5, 0.5)[0].numpy() * 255).astype(np.uint8)).save(png)
    cfg = synthesize.MaskSampleConfig(run=str(trained), mode="inpaint", classes="cut", per_class=2, mask=str(png),
                                 steps=2, scheduler="ddpm", resample=2, out=str(tmp_path / "i"))
    with pytest.warns(UserWarning, match="resized"):
        out = synthesize.run(cfg)
    summary = masks.summarize(out)["overall"]
    assert summary["n"] == 2 and summary["max_change_outside"] == 0.0 and summary["change_in_mask_share"] == 1.0


def test_run_refuses_bad_input(trained, tmp_path):
    plain = tmp_path / "008-plain"
    shutil.copytree(trained, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["config"]["mask_condition"] = False
    (plain / "config.json").write_text(json.dumps(cfg))
    base = dict(run=str(trained), per_class=1, steps=1, scheduler="ddim", out=str(tmp_path / "o"))
    cases = [({"run": str(plain), "mode": "condition"}, "run 008-plain was trained without mask conditioning.*--mask-condition"),
             ({"mask": "nope"}, "mask 'nope' is not dataset"),
             ({"mode": "paint"}, "unknown mode 'paint'"),
             ({"mode": "condition", "resample": 3}, "resample applies to --mode inpaint only"),
             ({"cx": 1.5}, "cx and cy are fractions"),
             ({"classes": "dent"}, "unknown class dent"),
             ({"mask": "ellipse", "cx": 0.5, "cy": 0.5, "scale": 2.0}, "covers"),
             ({"good": str(tmp_path / "none")}, "no defect-free images")]
    for override, message in cases:
        with pytest.raises(DefectlabError, match=message) as err:
            synthesize.run(synthesize.MaskSampleConfig(**{**base, **override}))
        assert "\n" not in str(err.value)
    synthesize.run(synthesize.MaskSampleConfig(**base, classes="crack"))
    with pytest.raises(DefectlabError, match="another configuration.*seed"):
        synthesize.run(synthesize.MaskSampleConfig(**base, classes="crack", seed=5))


def test_cli_entry(monkeypatch, capsys):
    """cli.STAGES' synthesize entry: flags come from MaskSampleConfig."""
    from defectlab.app import cli

    assert cli.STAGES["synthesize"][:2] == ("stages.synthesize", "MaskSampleConfig")
    assert cli.main(["synthesize", "--cx", "-1", "--mask", "ellipse", "--mode", "paint"]) == 2
    assert "unknown mode 'paint'" in capsys.readouterr().err
    args = cli.build_parser("finetune").parse_args(["finetune", "--mask-condition"])
    assert cli.config_from_args(train.TrainConfig, args).mask_condition is True


# ----------------------------------------------------------------------------- zoom: windows around small defects
def test_window_is_centred_on_the_defect_and_stays_inside():
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:14, 50:54] = 1
    assert dataset.window(mask, 32) == (0, 32)          # centre (12, 52) → clipped to the image
    mask = torch.zeros(1, 64, 64)
    mask[0, 30:34, 20:24] = 1
    assert dataset.window(mask, 16) == (24, 14)          # centred: 32 - 8, 22 - 8
    assert dataset.window(torch.zeros(1, 64, 64), 16) == (24, 24)  # no defect: the image centre
    gen = torch.Generator().manual_seed(0)
    y, x = dataset.window(mask, 16, gen, jitter=0.25)
    assert (y, x) != (24, 14) and abs(y - 24) <= 4 and abs(x - 14) <= 4


def test_zoom_dataset_items_are_windows_that_hold_the_defect():
    cfg = sources.DataConfig(product="hazelnut", image_size=16, zoom=2)
    dd = sources.load(cfg)
    items = [s for s in dd.train if s.mask is not None][:4]
    plain = dataset.DefectDataset(items, cfg, augment=False)
    full = [dataset.load_mask(s.mask, 32) for s in items]
    for i, whole in enumerate(full):
        item = plain[i]
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
        y, x = dataset.window(whole, 16)
        assert torch.equal(item["mask"], whole[:, y:y + 16, x:x + 16]) and item["mask"].sum() > 0
        assert torch.equal(item["image"], dataset.load_image(items[i].image, 32)[:, y:y + 16, x:x + 16])
    jittered = dataset.DefectDataset(items, cfg, augment=True, seed=0)
    a, b = jittered[0], jittered[0]
    assert torch.equal(a["image"], b["image"])  # seeded per item and epoch: the same window twice
    with pytest.raises(DefectlabError, match="zoom must be between 1"):
        dataset.DefectDataset(items, sources.DataConfig(product="hazelnut", zoom=0))


def test_zoom_run_synthesizes_full_size_images_changed_only_in_the_window(tmp_path):
    folder = train.run(train.TrainConfig(
        model="tiny", method="full", product="hazelnut", image_size=16, zoom=2, epochs=1, max_steps=1,
        batch_size=2, grad_accum=1, val_every=1, val_per_class=1, val_timesteps=1, log_samples=0,
        runs_dir=str(tmp_path / "runs"), progress=False))
    out = synthesize.run(synthesize.MaskSampleConfig(run=str(folder), classes="hole", per_class=2, steps=2,
                                                     scheduler="ddim"))
    assert out == folder / "synthesized" / "inpaint-dataset-ddim2-s0-16px-zoom2"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert json.loads((out / "mask_config.json").read_text())["zoom"] == 2
    for r in records:
        img, mask = images.load_png(out / r["file"]), dataset.load_mask(out / r["mask"], 32)
        good = dataset.load_image(Path(r["good"]), 32)
        assert img.shape[-1] == 32 and mask.shape[-1] == 32 and mask.sum() > 0
        y, x = dataset.window(mask, 16)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[y:y + 16, x:x + 16] = False
        assert (img - images.quantised(good)).abs()[:, outside].max() <= 1 / 127.5 + 1e-6  # untouched outside the window
    from defectlab.stages import evaluate  # a zoom run is evaluated on its synthesized full images, found by default
    assert evaluate.samples_folder(folder) == out == evaluate.samples_folder(folder, "synthesized")
    (tmp_path / "free" / "hazelnut").mkdir(parents=True)
    with pytest.raises(DefectlabError, match="not synthesize output.*--zoom 2"):
        evaluate.samples_folder(folder, str(tmp_path / "free"))
    summary = masks.summarize(out)["overall"]  # read at the full size the windows were pasted into
    assert summary["n"] == 2 and summary["change_in_mask_share"] == 1.0
    with pytest.raises(DefectlabError, match="trained on --zoom 2 windows"):
        synthesize.run(synthesize.MaskSampleConfig(run=str(folder), mode="condition", per_class=1, out=str(tmp_path / "c")))
